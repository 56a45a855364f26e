"""Benchmark of the attention-calibration ops: fused against eager and torch.compile.

    python -m benchmarks.bench_gates                     # CPU, float32, the model's shapes
    python -m benchmarks.bench_gates --quick             # small shapes, under a minute
    python -m benchmarks.bench_gates --device cuda
    python -m benchmarks.bench_gates --ops cbat,telu --no-compile

Cases: ChannelAttention, SpatialAttention, CBAM, the CBAT gate chain (ca → sa → cbam),
ELAT, TeLU and the multi-scale concat, on the shapes the model runs at batch 8 and a
256×256 input (C = 64…1024, H = W = 16…128; ELAT at 64 channels and full resolution).
For each: forward, backward and forward+backward time (median of repeats, synchronised;
``triton.testing.do_bench`` on CUDA), peak extra memory of a forward+backward (CUDA:
``max_memory_allocated``; CPU: sampled resident set) and the bytes autograd saves for
backward (unique storages seen by ``saved_tensors_hooks``, weights excluded) as a
multiple of the input's size. "eager" is the module with ``fused=False``; "compile" is
``torch.compile`` of that module (inductor).

Writes benchmarks/results/gates_<device>_<date>.csv and .md; ``main(argv)`` is importable.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
from pathlib import Path

import torch

import disseg_kernels as dk
from benchmarks.bench_dispersive import _RssSampler, _sync, machine_name
from benchmarks.bench_dispersive import _median_ms as _median_ms_cuda

RESULTS = Path(__file__).resolve().parent / "results"
STAT = {"value": "median"}


def _median_ms(fn, device, repeats, setup=None):
    """Median (or, with --stat min, minimum) wall time in ms; CUDA: triton's do_bench.

    The minimum is the better estimate on a shared CPU where other jobs preempt the run.
    """
    if device == "cuda":
        return _median_ms_cuda(fn, device, repeats, setup)
    import statistics
    import time

    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times) if STAT["value"] == "min" else statistics.median(times)

# (op, B, C, H, W): the decoder gates at each scale, ELAT at full resolution, TeLU on a
# decoder map, the output block's 1×/2×/4× concat and a decoder up ⊕ skip.
FULL = [
    ("ca", 8, 64, 128, 128), ("ca", 8, 512, 32, 32),
    ("sa", 8, 64, 128, 128), ("sa", 8, 512, 32, 32),
    ("cbam", 8, 64, 128, 128), ("cbam", 8, 512, 32, 32),
    ("cbat", 8, 64, 128, 128), ("cbat", 8, 128, 64, 64), ("cbat", 8, 256, 64, 64), ("cbat", 8, 512, 32, 32),
    ("cbat", 8, 1024, 16, 16),
    ("elat", 8, 64, 256, 256), ("elat", 8, 64, 128, 128),
    ("telu", 8, 64, 256, 256), ("telu", 8, 256, 64, 64),
    ("multiscale", 8, 64, 256, 256), ("multiscale", 8, 128, 64, 64),
]
QUICK = [
    ("ca", 2, 64, 64, 64), ("sa", 2, 64, 64, 64), ("cbam", 2, 64, 64, 64),
    ("cbat", 2, 64, 64, 64), ("cbat", 2, 512, 16, 16), ("elat", 2, 64, 64, 64),
    ("telu", 2, 64, 128, 128), ("multiscale", 2, 64, 64, 64),
]
MODULES = {
    "ca": lambda c, fused: dk.ChannelAttention(c, fused=fused),
    "sa": lambda c, fused: dk.SpatialAttention(fused=fused),
    "cbam": lambda c, fused: dk.CBAM(c, fused=fused),
    "cbat": lambda c, fused: dk.CBATGates(c, fused=fused),
    "elat": lambda c, fused: dk.ELAT(c, fused=fused),
    "telu": lambda c, fused: dk.TeLU(fused=fused),
}


def _make_case(op, b, c, h, w, device, dtype, fused):
    """(fn, inputs): fn(*inputs) → output; inputs require grad."""
    if op == "multiscale":
        # The output block's 1×, 2×, 4× fusion: c/4 + c/4 + c/2 channels to c.
        xs = [
            torch.randn(b, c // 4, h, w, device=device, dtype=dtype),
            torch.randn(b, c // 4, h // 2, w // 2, device=device, dtype=dtype),
            torch.randn(b, c // 2, h // 4, w // 4, device=device, dtype=dtype),
        ]
        xs = [t.requires_grad_() for t in xs]
        backend = "auto" if fused else "reference"
        return (lambda *ts: dk.multiscale_concat(list(ts), [1, 2, 4], backend=backend)), xs
    module = MODULES[op](c, fused).to(device=device, dtype=dtype)
    x = torch.randn(b, c, h, w, device=device, dtype=dtype, requires_grad=True)
    return module, [x]


def saved_bytes(fn, inputs) -> int:
    """Bytes of the distinct storages autograd saves for backward, weights excluded."""
    seen = {}
    params = set()
    if isinstance(fn, torch.nn.Module):
        params = {p.untyped_storage().data_ptr() for p in fn.parameters()}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(seen.values())


def measure(fn, inputs, device, repeats) -> dict:
    go = None

    def fwd():
        return fn(*inputs)

    def fwd_bwd():
        nonlocal go
        for t in inputs:
            t.grad = None
        y = fn(*inputs)
        if go is None:
            go = torch.randn_like(y)
        y.backward(go)

    fwd_bwd()  # warm-up (and compilation)
    fwd_bwd()
    with torch.no_grad():
        t_fwd = _median_ms(fwd, device, repeats)
    holder = {}

    def make():
        for t in inputs:
            t.grad = None
        holder["y"] = fn(*inputs)

    if device == "cuda":
        make()
        t_bwd = _median_ms(lambda: holder["y"].backward(go, retain_graph=True), device, repeats)
    else:
        t_bwd = _median_ms(lambda: holder["y"].backward(go), device, repeats, setup=make)
    holder.clear()
    t_both = _median_ms(fwd_bwd, device, repeats)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = 0
        for _ in range(2):
            with _RssSampler() as s:
                fwd_bwd()
            peak = max(peak, s.extra)
    for t in inputs:
        t.grad = None
    return {"fwd_ms": t_fwd, "bwd_ms": t_bwd, "fwdbwd_ms": t_both, "peak_mb": peak / 2**20}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (batch 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--ops", default="", help="comma-separated subset of ca,sa,cbam,cbat,elat,telu,multiscale")
    p.add_argument("--repeats", type=int, default=0, help="timing repeats (default 5 CPU / 20 CUDA)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--stat", default="median", choices=["median", "min"], help="CPU timing statistic")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--out", default=str(RESULTS))
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device on this machine")
    dtype = getattr(torch, args.dtype)
    STAT["value"] = args.stat
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (20 if device == "cuda" else 5)
    cases = QUICK if args.quick else FULL
    if args.ops:
        wanted = set(args.ops.split(","))
        cases = [c for c in cases if c[0] in wanted]
    machine = machine_name(device)
    date = _dt.date.today().isoformat()
    rows = []
    for op, b, c, h, w in cases:
        torch.manual_seed(0)
        variants = [("fused", True), ("eager", False)] + ([] if args.no_compile else [("compile", False)])
        res = {}
        for name, fused in variants:
            fn, inputs = _make_case(op, b, c, h, w, device, dtype, fused)
            in_bytes = sum(t.numel() * t.element_size() for t in inputs)
            sb = saved_bytes(fn, inputs)
            if name == "compile":
                fn = torch.compile(fn)
            try:
                r = measure(fn, inputs, device, repeats)
            except Exception as exc:  # noqa: BLE001 - report, keep going
                r = {"fwd_ms": float("nan"), "bwd_ms": float("nan"), "fwdbwd_ms": float("nan"), "peak_mb": float("nan"),
                     "error": f"{type(exc).__name__}: {exc}"[:200]}
            r.update(op=op, shape=f"{b}x{c}x{h}x{w}", variant=name, saved_x=sb / in_bytes if name != "compile" else float("nan"),
                     device=device, dtype=args.dtype, machine=machine, date=date)
            res[name] = r
            rows.append(r)
        for name in res:
            res[name]["speedup_vs_eager"] = res["eager"]["fwdbwd_ms"] / res[name]["fwdbwd_ms"]
        print(" | ".join(
            f"{op} {b}x{c}x{h}x{w} {n}: {r['fwdbwd_ms']:.1f} ms ({r['speedup_vs_eager']:.2f}x eager), saved {r['saved_x']:.2f}x in"
            for n, r in res.items()), flush=True)
    _write(rows, args, device, date, machine)
    return rows


def _write(rows, args, device, date, machine):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gates_{device}_{date}" + ("_quick" if args.quick else "") + ("" if args.dtype == "float32" else f"_{args.dtype}")
    keys = ["op", "shape", "variant", "fwd_ms", "bwd_ms", "fwdbwd_ms", "speedup_vs_eager", "peak_mb", "saved_x",
            "device", "dtype", "machine", "date", "error"]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow(r)
    lines = [
        f"# Attention-calibration ops, {device}, {args.dtype}",
        "",
        f"Machine: {machine}. Date: {date}. Command: `python -m benchmarks.bench_gates"
        + (" --quick" if args.quick else "") + f" --device {device}" + (f" --dtype {args.dtype}" if args.dtype != "float32" else "")
        + (" --no-compile" if args.no_compile else "") + (f" --ops {args.ops}" if args.ops else "")
        + (f" --stat {args.stat}" if args.stat != "median" else "") + (f" --threads {args.threads}" if args.threads else "")
        + (f" --repeats {args.repeats}" if args.repeats else "") + "`.",
        "",
        f"Times are {args.stat}s (ms) over {args.repeats or 'default'} repeats, {torch.get_num_threads()} threads; speedup is eager fwd+bwd / this fwd+bwd; saved = bytes autograd keeps for "
        "backward (weights excluded) / input bytes; peak = extra memory of one fwd+bwd.",
        "",
        "| op | shape | variant | fwd ms | bwd ms | fwd+bwd ms | speedup vs eager | peak MB | saved / input |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['variant']} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | {r['fwdbwd_ms']:.2f} | "
            f"{r['speedup_vs_eager']:.2f} | {r['peak_mb']:.0f} | {r['saved_x']:.2f} |" + (f" {r['error']}" if r.get("error") else "")
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / stem}.csv and .md")


if __name__ == "__main__":
    main()
