"""Tile sweep of the Triton dispersive row kernel (the many-samples path), for tuning.

    python -m benchmarks.bench_dispersive_tiles --device cuda                 # bf16, issue 2's shapes
    python -m benchmarks.bench_dispersive_tiles --device cuda --splits 1,2,4 --lazy 0,1
    python -m benchmarks.bench_dispersive_tiles --quick                       # CPU interpreter smoke run

For each shape it times the fused forward (which also produces dL/dz: the loss is a scalar,
so forward+backward costs the forward) of ``infonce_l2`` for every block configuration of
the autotune list (``disseg_kernels.triton.dispersive._rows_configs``) × column splits ×
lazy rescaling on/off, and the library's default launch (autotuned, heuristic splits), and
reports TFLOP/s on the 4·N²·D basis and the fraction of the device's measured matmul rate
in the same dtype (issue 2's bar: ≥ 60 % at N ≥ 16,384). Configurations that do not fit
(out of shared memory or registers) are listed as failed, with the reason.

``--compile-check defaults|all`` (and ``small``, ``sm90``, ``row_stats`` for the other
Triton dispersive kernels) needs no GPU: it compiles the kernel for sm_90 with
Triton's bundled ptxas, for the fixed default blocks or the whole autotune list, and
prints each variant's registers, local-memory stack (spills) and wgmma count from
``cuobjdump`` (tests/test_dispersive_triton.py checks that the defaults do not spill).

Writes benchmarks/results/dispersive_tiles_<device>_<date>_<dtype>.csv and .md.
``--budget-s`` stops the sweep early (the GPU script's stage limit) and still writes what
was measured.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import time
from pathlib import Path

import torch

from benchmarks._args import comma_list, non_negative_int, out_folder, positive_int, require_device
from benchmarks.bench_dispersive import _median_ms, _parse_shapes, machine_name, matmul_rate_gflops, write_csv
from disseg_kernels.triton import ROWS_KERNELS, ROWS_LOOPS  # names only: no triton import

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["N", "D", "dtype", "config", "splits", "lazy", "loop", "ms", "tflops", "pct_matmul", "note"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--shapes", default="16384x256,16384x128,65536x128", type=comma_list(item=_parse_shapes))
    p.add_argument("--splits", default="1,2,4", type=comma_list(item=non_negative_int), help="column splits to try (0 = the library's heuristic)")
    p.add_argument("--lazy", default="0,1", type=comma_list((0, 1), int), help="lazy rescaling off/on")
    p.add_argument("--loops", default="segments", type=comma_list(ROWS_LOOPS),
                   help="the Triton kernel's column loop: segments (the default form) and/or one (one loop, "
                        "run-time masks; its wgmmas are not serialised by ptxas)")
    p.add_argument("--kernels", default="triton", type=comma_list(ROWS_KERNELS),
                   help="row kernels: triton (the autotune list) and/or sm90 (the Gluon Hopper kernel, "
                        "disseg_kernels/triton/dispersive_sm90.py), timed right after the default launch")
    p.add_argument("--repeats", type=positive_int, default=10)
    p.add_argument("--budget-s", type=float, default=0.0, help="stop the sweep after this long (0: no limit)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one configuration (CPU interpreter smoke run)")
    p.add_argument("--out-dir", type=out_folder, default=RESULTS)
    p.add_argument("--compile-check", choices=["defaults", "all", "small", "sm90", "row_stats"],
                   help="compile for sm_90 without a GPU and report registers and spills, then exit")
    return p


CHECK_WIDTHS = (64, 128, 256, 512)  # one D per branch of the autotune list


def _sm90_toolchain() -> str | None:
    """None when Triton can compile for sm_90 here and cuobjdump is bundled, else why not."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("--compile-check: unset TRITON_INTERPRET (the interpreter has no compiler)")
    try:
        import triton.backends.nvidia as nv
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
    except ImportError as exc:
        return f"no Triton ahead-of-time compiler ({exc})"
    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    if not os.access(cuobjdump, os.X_OK):
        return f"Triton's bundled cuobjdump is missing ({cuobjdump})"
    return None


def wgmma_serialisation(ptx: str) -> str:
    """What ptxas says about the kernel's wgmma pipelining: "no", or the codes of its
    "wgmma.mma_async instructions are serialized" notes (C7513-C7515: a non-wgmma
    instruction touches a wgmma's input or accumulator registers while it may be in
    flight). A serialised kernel waits for every wgmma before issuing the next, so its
    tensor-core work cannot overlap anything. Uses Triton's bundled ptxas (the first that
    reads the PTX's version); "?" where none runs."""
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia as nv

    bindir = os.path.join(os.path.dirname(nv.__file__), "bin")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for name in ("ptxas", "ptxas-blackwell"):
            exe = os.path.join(bindir, name)
            if not os.access(exe, os.X_OK):
                continue
            r = subprocess.run([exe, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                codes = re.findall(r"\((C75\d\d)\) Potential Performance Loss: wgmma", r.stdout + r.stderr)
                return ",".join(sorted(set(codes))) or "no"
    return "?"


def compile_sm90(fn, sig: dict, consts: dict, attrs: dict, num_warps: int, num_stages: int = 2,
                 gluon: bool = False) -> dict:
    """Compile one specialisation of a Triton (or, with ``gluon``, Gluon) kernel for sm_90
    (no GPU needed) and read its registers, local-memory stack bytes (spills) and HGMMA
    count from the cubin, and whether ptxas serialised its wgmmas; a compiler error is
    returned as {"error": ...}."""
    import re
    import subprocess
    import tempfile

    import triton
    import triton.backends.nvidia as nv
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource  # noqa: N814

    cuobjdump = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    target = GPUTarget("cuda", 90, 32)
    sig = dict(sig, **{k: "constexpr" for k in consts})
    try:
        opts = make_backend(target).parse_options({"num_warps": num_warps, "num_stages": num_stages})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=target,
                           options=opts.__dict__)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
        return {"regs": int(re.search(r"REG:(\d+)", res).group(1)),
                "stack": int(re.search(r"STACK:(\d+)", res).group(1)),
                "hgmma": len(re.findall(r"HGMMA", sass)),
                "serialised": wgmma_serialisation(k.asm["ptx"])}
    except Exception as exc:  # noqa: BLE001 - report every variant
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def compile_check_sm90_gluon() -> list[dict]:
    """Compile the Gluon Hopper row kernel (``dispersive_sm90``) for every padded width
    (16 ... 128), variant and diagonal option; report registers, spills, HGMMA count and
    wgmma serialisation. [] (and SKIP) where Triton has no Gluon or no sm_90 toolchain."""
    why = _sm90_toolchain()
    if why:
        print(f"SKIP: {why}")
        return []
    from disseg_kernels.triton import dispersive_sm90 as k90

    if k90._IMPORT_ERROR:
        print(f"SKIP: {k90._IMPORT_ERROR}")
        return []
    fn = k90._dispersive_rows_sm90_kernel
    rows = []
    for d_pad in (16, 32, 64, 128):
        sig = {"z_desc": f"tensordesc<bf16[{k90.BLOCK_N},{d_pad}],{k90.z_layout(d_pad)!r}>", "SQN": "*fp32",
               "OUT": "*fp32", "M_OUT": "*fp32", "S_OUT": "*fp32", "N": "i32", "D": "i32", "COL_CHUNK": "i32",
               "PARAMS": "*fp32"}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if sig.get(a, "").startswith("*") or a in ("N", "D", "COL_CHUNK")}
        for variant in k90.VARIANTS:
            for include in (False, True):
                consts = dict(VARIANT=variant, INCLUDE_DIAG=include, D_PAD=d_pad, BLOCK_M=k90.BLOCK_M,
                              BLOCK_N=k90.BLOCK_N, STAGES=k90.STAGES)
                row = {"kernel": "sm90 gluon", "D_PAD": d_pad, "variant": variant, "include_diag": include,
                       **compile_sm90(fn, sig, consts, attrs, k90.NUM_WARPS, gluon=True)}
                rows.append(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    bad = [r for r in rows if "error" in r or r["stack"] or r["serialised"] != "no"]
    print(f"{len(rows)} Gluon variants compiled for sm_90; failures (error, spill or serialised wgmma): {len(bad)}")
    return rows


def compile_check_small() -> list[dict]:
    """Compile the few-samples path's kernels (the split float64 Gram, the one-program
    epilogue for each InfoNCE/hinge variant, the C @ Z pass) for sm_90 at every padded N
    (16, 32, 64). Returns [] (and says SKIP) where the toolchain is absent."""
    why = _sm90_toolchain()
    if why:
        print(f"SKIP: {why}")
        return []
    import triton.language as tl

    from disseg_kernels.triton import dispersive as tdisp

    rows = []
    div16 = [["tt.divisibility", 16]]
    for block_n in (16, 32, 64):
        block_k = 32 if block_n >= 64 else 64
        cases = [("gram_partial", tdisp._gram_partial_kernel,
                  {"Z": "*bf16", "PART": "*fp64", "N": "i32", "D": "i32", "CHUNK": "i32"},
                  {"BLOCK_N": block_n, "BLOCK_K": block_k, "SHIFT": True}, 8 if block_n >= 64 else 4)]
        for variant in range(4):
            cases.append((f"coefficients v{variant}", tdisp._small_coefficients_kernel,
                          {"GRAM": "*fp64", "C": "*fp32", "LOSS": "*fp64", "N": "i32", "TAU": "i64", "MARGIN": "i64",
                           "SCALE": "i64", "PAIRS": "i64"},
                          {"VARIANT": variant, "INCLUDE_DIAG": False, "DUP_EPS": tdisp.SMALL_DUP_EPS, "GRAM_IS_D2": False,
                           "BLOCK_N": block_n}, tdisp._small_warps(block_n)))
        cases.append(("rowmix", tdisp._rowmix_kernel,
                      {"C": "*fp32", "Z": "*bf16", "OUT": "*bf16", "N": "i32", "D": "i32"},
                      {"BLOCK_N": block_n, "BLOCK_D": 64 if block_n >= 64 else 128, "CDT": tl.float32, "SHIFT": True},
                      tdisp._small_warps(block_n)))
        for name, fn, sig, consts, warps in cases:
            attrs = {(i,): div16 for i, a in enumerate(fn.arg_names) if sig.get(a, "").startswith("*")}
            row = {"kernel": name, "BLOCK_N": block_n, **compile_sm90(fn, sig, consts, attrs, warps)}
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    bad = [r for r in rows if "error" in r]
    print(f"{len(rows)} small-path kernels compiled for sm_90; failures: {len(bad)}")
    return rows


def compile_check_row_stats(dtypes=("fp32", "fp64")) -> list[dict]:
    """Compile the row-statistics kernel of the bank and distributed losses
    (``triton/dispersive_rows._row_stats_kernel``, the blocks of its ``_blocks``) for
    sm_90, for ``dtypes`` ("fp32", "fp64"), every pair variant, with and without the gradient and the
    self pair. Returns [] (and says SKIP) where the toolchain is absent."""
    why = _sm90_toolchain()
    if why:
        print(f"SKIP: {why}")
        return []
    import triton.language as tl

    from disseg_kernels.triton import dispersive_rows as trows

    fn = trows._row_stats_kernel
    bm, bn, bk, bdo, warps = trows._blocks(4096, 4096, 128, interpret=False)
    rows = []
    for name in dtypes:
        acc = {"fp32": tl.float32, "fp64": tl.float64}[name]
        sig = {a: f"*{name}" for a in ("R", "C", "SHIFT", "M_OUT", "S_OUT", "ACC", "PARAMS")}
        sig.update({a: "i32" for a in ("n", "m", "D", "self_offset")})
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig.get(a, "").startswith("*")}
        for variant in range(4):
            for need_grad, has_self in ((True, True), (True, False), (False, True)):
                consts = dict(VARIANT=variant, HAS_SELF=has_self, INCLUDE_DIAG=False, NEED_GRAD=need_grad, ACC_T=acc,
                              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_DO=bdo)
                row = {"kernel": "row_stats", "dtype": name, "variant": variant, "need_grad": need_grad,
                       "self": has_self, **compile_sm90(fn, sig, consts, attrs, warps)}
                rows.append(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    bad = [r for r in rows if "error" in r or r["stack"]]
    print(f"{len(rows)} row-statistics kernels compiled for sm_90; failures (error or spill): {len(bad)}")
    return rows


def compile_check(which: str, dtypes=("bfloat16",), loops=("segments", "one")) -> list[dict]:
    """Compile the row kernel (infonce_l2, gradient on) for sm_90 for each D of
    CHECK_WIDTHS and each block config (the fixed default, or the autotune list), and read
    registers / stack bytes / HGMMA count from the cubin. Needs a process without
    TRITON_INTERPRET; returns [] (and says SKIP) where the compiler or cuobjdump is absent."""
    if which == "small":
        return compile_check_small()
    if which == "sm90":
        return compile_check_sm90_gluon()
    if which == "row_stats":
        return compile_check_row_stats()
    why = _sm90_toolchain()
    if why:
        print(f"SKIP: {why}")
        return []
    import triton

    from disseg_kernels.triton import dispersive as tdisp

    fn = tdisp._dispersive_rows_kernel
    ptr_types = {"Z": None, "SQN": "*fp32", "RINV": "*fp32", "PROJ": "*fp32", "OUT": "*fp32", "M_OUT": "*fp32",
                 "S_OUT": "*fp32", "PARAMS": "*fp32"}
    rows = []
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        acc, gram_prec, pv_dtype, pv_prec = tdisp._dot_settings(dtype)
        for d in CHECK_WIDTHS:
            d_pad = max(16, triton.next_power_of_2(d))
            fma = tdisp._fma_layout(dtype)
            single, block_k, block_do = tdisp._layout(d_pad, fma)
            cfgs = tdisp._rows_configs(d_pad, fma)
            if which == "defaults":
                cfgs = cfgs[:1]
            forms = [o for o in (False, True) if ("one" if o else "segments") in loops
                     and (not o or tdisp._one_loop_applies(0, single, 0, False))]
            for c, one_loop in ((c, o) for c in cfgs for o in forms):
                sig, attrs = {}, {}
                for i, name in enumerate(fn.arg_names):
                    if name in ptr_types:
                        sig[name] = ptr_types[name] or {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "float64": "*fp64"}[dtype_name]
                        attrs[(i,)] = [["tt.divisibility", 16]]
                    elif name in ("N", "D", "COL_CHUNK", "N_BUCKET"):
                        sig[name] = "i32"
                        attrs[(i,)] = [["tt.divisibility", 16]]  # what a launch with N, D % 16 == 0 gets
                consts = dict(VARIANT=0, INCLUDE_DIAG=False, NEED_GRAD=True, SINGLE_K=single, DIRECT_D=0,
                              BLOCK_K=block_k, BLOCK_DO=block_do, ACC=acc,
                              GRAM_PREC=gram_prec, PV_DTYPE=pv_dtype, PV_PREC=pv_prec, TF32_ROUND=pv_prec == "tf32",
                              UPCAST=False, LAZY=False, ONE_LOOP=one_loop, **c.kwargs)
                label = "{BLOCK_M}x{BLOCK_N} w{w} s{s}".format(w=c.num_warps, s=c.num_stages, **c.kwargs)
                row = {"dtype": dtype_name, "D": d, "config": label, "loop": "one" if one_loop else "segments"}
                row.update(compile_sm90(fn, sig, consts, attrs, c.num_warps, c.num_stages))
                rows.append(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    bad = [r for r in rows if "error" in r]
    print(f"{len(rows)} variants compiled for sm_90; failures: {len(bad)}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.compile_check:  # ahead of time: no GPU needed
        return compile_check(args.compile_check, (args.dtype,))
    require_device(args.device)
    device = args.device
    if device == "cpu":
        if not args.quick:  # the GPU shapes under the interpreter would run for hours, silently
            raise SystemExit("--device cpu runs the Triton kernels under the interpreter: use --quick "
                             "(the sweep's shapes are for a GPU)")
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from disseg_kernels.triton import dispersive as tdisp  # after TRITON_INTERPRET is set

    dtype = DTYPES[args.dtype]
    shapes = [(256, 16), (200, 32)] if args.quick else _parse_shapes(args.shapes)
    splits_list = [1, 2] if args.quick else _ints(args.splits)
    lazy_list = [0, 1] if args.quick else _ints(args.lazy)
    loops_list = [x.strip() for x in args.loops.split(",") if x.strip()] or ["segments"]
    repeats = 1 if args.quick else args.repeats
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()] or ["triton"]
    mm_rate = matmul_rate_gflops(device, dtype) if device == "cuda" else float("nan")
    start = time.perf_counter()
    rows: list[dict] = []

    def out_of_time() -> bool:
        return args.budget_s > 0 and time.perf_counter() - start > args.budget_s

    for n, d in shapes:
        g = torch.Generator(device="cpu").manual_seed(n + d)
        z = (torch.randn(n, d, generator=g) / d**0.5).to(device=device, dtype=dtype)
        d_pad = max(16, 1 << (d - 1).bit_length())
        configs = [None]  # the library's default launch first
        if "sm90" in kernels:
            configs.append("sm90")
        if "triton" in kernels and args.quick:
            configs.append({"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1})
        elif "triton" in kernels:
            configs += [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                        for c in tdisp._rows_configs(d_pad, tdisp._fma_layout(dtype))]
        flops = 4.0 * n * n * d
        first = None  # the first launch's (loss, grad): every later one is checked against it
        for cfg in configs:
            sm90 = cfg == "sm90"
            if cfg is None:
                combos = [(0, None, lp) for lp in loops_list]
            elif sm90:
                combos = [(sp, None, "-") for sp in [0] + splits_list]
            else:  # the one-loop form has no lazy rescale
                combos = [(sp, lz, lp) for sp in splits_list for lz in lazy_list for lp in loops_list
                          if not (lz and lp == "one")]
            for splits, lazy, loop in combos:
                if out_of_time():
                    break
                if cfg is None:
                    label = "default (autotuned)"
                elif sm90:
                    label = "sm90 Gluon 64x64 w4"
                else:
                    label = "{BLOCK_M}x{BLOCK_N} w{num_warps} s{num_stages}".format(**cfg)
                row = {"N": n, "D": d, "dtype": args.dtype, "config": label,
                       "splits": "auto" if splits == 0 else splits,
                       "lazy": "-" if sm90 else "env" if lazy is None else lazy, "loop": loop}
                kw = dict(_path="rows", _splits=None if splits == 0 else splits,
                          _lazy=None if lazy is None else bool(lazy), _config=None if sm90 else cfg,
                          _kernel="sm90" if sm90 else "triton", _loop=None if sm90 else loop)
                if cfg is None and device == "cpu":
                    kw["_autotune"] = False
                try:
                    fn = lambda: tdisp.dispersive_fused_triton(z, 0, 0.5, 1.0, False, False, True, **kw)  # noqa: E731
                    loss, grad = fn()
                    if first is None:
                        first = (float(loss), grad.float())
                    else:  # a fast configuration must also be a correct one
                        dl = abs(float(loss) - first[0]) / max(1.0, abs(first[0]))
                        dg = float((grad.float() - first[1]).abs().max() / first[1].abs().max().clamp_min(1e-30))
                        if dl > 1e-3 or dg > 3e-2:
                            row["note"] = f"MISMATCH with the default launch: loss {dl:.1e}, grad {dg:.1e}"
                    ms = _median_ms(fn, device, repeats)
                    row.update(ms=ms, tflops=flops / (ms * 1e-3) / 1e12)
                    if mm_rate == mm_rate:
                        row["pct_matmul"] = 100.0 * row["tflops"] * 1e3 / mm_rate
                except Exception as exc:  # a configuration that does not fit: record and go on
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                rows.append(row)
                print(" ".join(f"{k}={row.get(k, '')}" for k in FIELDS if row.get(k, "") != ""), flush=True)
    _write(rows, args, device, mm_rate, time.perf_counter() - start, out_of_time())
    return rows


def _fmt(v, spec):
    return "" if v is None or v == "" else format(v, spec)


def _write(rows, args, device, mm_rate, elapsed, truncated) -> None:
    date = _dt.datetime.now(_dt.timezone.utc)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"dispersive_tiles_{device}_{date:%Y-%m-%d}_{args.dtype}{'_quick' if args.quick else ''}"
    write_csv(stem.with_suffix(".csv"), rows, FIELDS)
    best = {}  # (N, D) -> the fastest row
    for r in rows:
        key = (r["N"], r["D"])
        if r.get("tflops") and r["tflops"] > best.get(key, {}).get("tflops", 0.0):
            best[key] = r
    lines = [
        f"# Triton dispersive row kernel: tile sweep ({device}, {args.dtype}, infonce_l2, fwd = fwd+bwd)",
        "",
        f"- machine: {machine_name(device)}",
        f"- date: {date:%Y-%m-%d %H:%M} UTC; torch {torch.__version__}",
        f"- measured matmul rate ({args.dtype}): {mm_rate / 1e3:.1f} TFLOP/s" if mm_rate == mm_rate else "- matmul rate: not measured (CPU)",
        "- command: `python -m benchmarks.bench_dispersive_tiles " + " ".join(args_to_text(args)) + "`",
        f"- sweep time {elapsed:.0f} s" + (" (stopped early by --budget-s: the list is incomplete)" if truncated else ""),
        "- TFLOP/s on the 4·N²·D basis; config = BLOCK_M x BLOCK_N, warps, pipeline stages; splits = column splits; "
        "loop = the Triton kernel's column loop (segments / one: run-time masks, wgmmas not serialised)",
        "",
        "| N | D | config | splits | lazy | loop | ms | TFLOP/s | % of matmul | note |",
        "|---:|---:|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        mark = " **best**" if best.get((r["N"], r["D"])) is r else ""
        lines.append(
            f"| {r['N']} | {r['D']} | {r['config']}{mark} | {r['splits']} | {r['lazy']} | {r.get('loop', '')} | "
            f"{_fmt(r.get('ms'), '.3f')} | "
            f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('pct_matmul'), '.1f')} | {r.get('note', '')} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv and {stem}.md")


def args_to_text(args) -> list[str]:
    out = [f"--device {args.device}", f"--dtype {args.dtype}"]
    if args.quick:
        return out + ["--quick", f"--loops {args.loops}", f"--kernels {args.kernels}"]
    return out + [f"--shapes {args.shapes}", f"--splits {args.splits}", f"--lazy {args.lazy}",
                  f"--loops {args.loops}", f"--kernels {args.kernels}", f"--repeats {args.repeats}"] + ([f"--budget-s {args.budget_s:g}"] if args.budget_s else [])


if __name__ == "__main__":
    main()
