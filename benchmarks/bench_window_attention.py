"""Benchmark of contrast-driven window attention: the fused op and a whole CDFA block
against eager and torch.compile of the reference.

    python -m benchmarks.bench_window_attention                  # CPU, B=8, C=128, 4 heads, H=W=16..128
    python -m benchmarks.bench_window_attention --quick          # B=2, H=W=16, 32; a minute
    python -m benchmarks.bench_window_attention --sizes 64 --what op --no-compile
    python -m benchmarks.bench_window_attention --device cuda --dtype bfloat16
    # the short GPU subset (~1 min: autotuning, 4 sizes, torch.compile at one size)
    python -m benchmarks.bench_window_attention --device cuda --what op --sizes 16,32,64,128 \
        --compile-sizes 64 --repeats 5

Rows: for each H = W, the ``op`` (``window_attention`` on the block's own layouts: v a
channels-last view of the value Linear's output, logits the permuted view of the attention
Linear's output) and the ``block`` (one ContrastDrivenFeatureAggregation, in_c = out_c =
C, convolutions and BatchNorm included, train mode), each as: the fused backend(s),
``eager`` (the unfold / matmul / fold reference) and ``compile`` (torch.compile of eager).
Times are medians of ``--repeats`` runs (ms): forward, backward alone, forward+backward.
Peak memory is the extra memory of one forward+backward above what the inputs hold:
CUDA ``max_memory_allocated``; CPU the larger of malloc's sampled bytes in use and the
resident-set high-water mark (benchmarks/_memory.py).

Writes benchmarks/results/window_attention_<device>_<date>[_<dtype>].csv and .md with the
machine and the date. ``main(argv)`` is importable (the GPU script calls it).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import time
from pathlib import Path

import torch

import disseg_kernels as dk
from benchmarks._args import comma_list, out_folder, positive_int, require_device
from benchmarks._memory import PeakMemory
from benchmarks.bench_dispersive import machine_name
from disseg_kernels import _backend
from disseg_kernels.reference.window_attention import window_attention_reference

RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(batch=8, channels=128, heads=4, sizes=[16, 32, 64, 128])
QUICK = dict(batch=2, channels=128, heads=4, sizes=[16, 32])


def _load_average() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device, repeats, setup=None) -> float:
    times = []
    for _ in range(repeats):
        state = setup() if setup is not None else None
        _sync(device)
        t0 = time.perf_counter()
        fn(state)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(forward, leaves, device: str, repeats: int) -> dict:
    """forward() -> output; leaves: tensors/params whose .grad is reset between runs."""

    def clear():
        for t in leaves:
            t.grad = None

    def fwd_bwd(_=None):
        clear()
        y = forward()
        y.backward(torch.ones_like(y))

    fwd_bwd()  # warm-up (and compilation)
    fwd_bwd()
    t_fwd = _median_ms(lambda _: forward(), device, repeats)

    def setup():
        clear()
        return forward()

    t_bwd = _median_ms(lambda y: y.backward(torch.ones_like(y)), device, repeats, setup)
    t_all = _median_ms(fwd_bwd, device, repeats)
    clear()
    import gc

    gc.collect()
    with PeakMemory(device) as mem:
        fwd_bwd()
    peak = mem.extra_mb
    clear()
    return dict(fwd_ms=t_fwd, bwd_ms=t_bwd, fwd_bwd_ms=t_all, peak_mb=peak)


def _op_inputs(B, C, H, W, heads, device, dtype):
    v = torch.randn(B, H, W, C, device=device, dtype=dtype).permute(0, 3, 1, 2).requires_grad_()
    logits = (
        torch.randn(B, H * W, heads, 81, device=device, dtype=dtype)
        .reshape(B, H * W, heads, 9, 9)
        .permute(0, 2, 1, 3, 4)
        .requires_grad_()
    )
    return v, logits


def bench_op(B, C, S, heads, device, dtype, backends, repeats, compile_ref) -> list[dict]:
    v, logits = _op_inputs(B, C, S, S, heads, device, dtype)
    fns = {b: (lambda b=b: dk.window_attention(v, logits, 3, b)) for b in backends}
    fns["eager"] = lambda: window_attention_reference(v, logits, 3)
    if compile_ref:
        compiled = torch.compile(window_attention_reference, dynamic=False)
        fns["compile"] = lambda: compiled(v, logits, 3)
    rows = []
    for name, fn in fns.items():
        try:
            rows.append(dict(what="op", impl=name, H=S, **measure(fn, [v, logits], device, repeats)))
        except Exception as exc:  # a torch.compile failure must not lose the other rows
            if name != "compile":
                raise
            print(f"op compile H={S} failed: {type(exc).__name__}: {str(exc)[:200]}")
    return rows


def bench_block(B, C, S, heads, device, dtype, backends, repeats, compile_ref) -> list[dict]:
    torch.manual_seed(0)
    plain = dk.ContrastDrivenFeatureAggregation(C, C, heads, fused=False).to(device, dtype)
    x = torch.randn(B, C, S, S, device=device, dtype=dtype, requires_grad=True)
    fg = torch.randn(B, C, S, S, device=device, dtype=dtype, requires_grad=True)
    bg = torch.randn(B, C, S, S, device=device, dtype=dtype, requires_grad=True)
    mods = {}
    for b in backends:
        m = dk.ContrastDrivenFeatureAggregation(C, C, heads, fused=True, backend=b).to(device, dtype)
        m.load_state_dict(plain.state_dict())
        mods[b] = m
    mods["eager"] = plain
    rows = []
    for name, m in mods.items():
        rows.append(dict(what="block", impl=name, H=S, **measure(lambda m=m: m(x, fg, bg), [x, fg, bg, *m.parameters()], device, repeats)))
    if compile_ref:
        compiled = torch.compile(plain, dynamic=False)
        try:
            rows.append(dict(what="block", impl="compile", H=S, **measure(lambda: compiled(x, fg, bg), [x, fg, bg, *plain.parameters()], device, repeats)))
        except Exception as exc:  # a torch.compile failure must not lose the other rows
            print(f"block compile H={S} failed: {type(exc).__name__}: {str(exc)[:200]}")
    return rows


def _ratios(rows: list[dict]) -> None:
    base = {(r["what"], r["H"]): r for r in rows if r["impl"] == "eager"}
    for r in rows:
        e = base.get((r["what"], r["H"]))
        r["speedup_vs_eager"] = e["fwd_bwd_ms"] / r["fwd_bwd_ms"] if e else float("nan")
        r["mem_vs_eager"] = r["peak_mb"] / e["peak_mb"] if e and e["peak_mb"] > 0 else float("nan")


def write_results(rows, args, device, dtype, header) -> tuple[Path, Path]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    suffix = "" if dtype == torch.float32 else f"_{str(dtype).split('.')[-1]}"
    tag = ("_quick" if args.quick else "") + (f"_H{args.sizes.replace(',', '-')}" if args.sizes else "")
    stem = out / f"window_attention_{device}_{date}{suffix}{tag}"
    fields = ["what", "impl", "H", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "peak_mb", "speedup_vs_eager", "mem_vs_eager"]
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["machine", "date", "batch", "channels", "heads", "dtype", *fields])
        w.writeheader()
        for r in rows:
            w.writerow(dict(machine=header["machine"], date=date, batch=args.batch, channels=args.channels,
                            heads=args.heads, dtype=str(dtype).split(".")[-1], **{k: r[k] for k in fields}))
    lines = [
        f"# window_attention benchmark ({device})",
        "",
        f"- machine: {header['machine']}",
        f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; load average at start: {header['load']}",
        f"- batch {args.batch}, C = {args.channels}, {args.heads} heads, k = 3, dtype {dtype}; medians of {args.repeats}",
        f"- command: `python -m benchmarks.bench_window_attention {' '.join(header['argv'])}`",
        "",
        "| what | impl | H=W | fwd ms | bwd ms | fwd+bwd ms | peak MB | × eager speed | × eager memory |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['what']} | {r['impl']} | {r['H']} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | "
            f"{r['peak_mb']:.0f} | {r['speedup_vs_eager']:.2f} | {r['mem_vs_eager']:.2f} |"
        )
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    return Path(f"{stem}.csv"), Path(f"{stem}.md")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 2, H=W=16, 32")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--batch", type=positive_int, default=None)
    p.add_argument("--channels", type=positive_int, default=None)
    p.add_argument("--heads", type=positive_int, default=None, help="must divide --channels")
    p.add_argument("--sizes", default=None, type=comma_list(item=positive_int), help="comma-separated H=W values")
    p.add_argument("--what", default="op,block", type=comma_list(("op", "block")), help="op, block or both (comma-separated)")
    p.add_argument("--backends", default=None, type=comma_list(_backend.BACKENDS[1:]), help="fused backends (default: all available)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--compile-sizes", default=None, type=comma_list(item=positive_int),
                   help="comma-separated H=W values that also time torch.compile (default: every size)")
    p.add_argument("--no-write", action="store_true", help="print the rows only (the ratios are then printed too)")
    p.add_argument("--out", type=out_folder, default=RESULTS, help="folder for the CSV and markdown")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.batch = args.batch or preset["batch"]
    args.channels = args.channels or preset["channels"]
    args.heads = args.heads or preset["heads"]
    if args.channels % args.heads:
        parser.error(f"--heads {args.heads} must divide --channels {args.channels}")
    require_device(args.device)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else preset["sizes"]
    device, dtype = args.device, getattr(torch, args.dtype)
    if args.backends:
        backends = args.backends.split(",")
    else:
        backends = [b for b in _backend.available_backends("window_attention", device) if b != "reference"]
        if device == "cpu":
            backends = [b for b in backends if b != "triton"]  # the interpreter is not a benchmark
    header = dict(machine=machine_name(device), load=_load_average(), argv=argv if argv is not None else os.sys.argv[1:])
    print(f"# {header['machine']}; load {header['load']}; backends {backends}")
    rows = []
    what = args.what.split(",")
    compile_sizes = set(sizes) if args.compile_sizes is None else {int(s) for s in args.compile_sizes.split(",")}
    for S in sizes:
        comp = not args.no_compile and S in compile_sizes
        if "op" in what:
            rows += bench_op(args.batch, args.channels, S, args.heads, device, dtype, backends, args.repeats, comp)
        if "block" in what:
            rows += bench_block(args.batch, args.channels, S, args.heads, device, dtype, backends, args.repeats, comp)
        for r in rows:
            if r["H"] == S:
                print(f"{r['what']:5s} {r['impl']:8s} H={S:4d} fwd {r['fwd_ms']:9.1f} bwd {r['bwd_ms']:9.1f} "
                      f"fwd+bwd {r['fwd_bwd_ms']:9.1f} ms  peak {r['peak_mb']:8.0f} MB", flush=True)
    _ratios(rows)
    if not args.no_write:
        csv_path, md_path = write_results(rows, args, device, dtype, header)
        print(f"wrote {csv_path} and {md_path}")
        print(md_path.read_text())
    else:
        for r in rows:
            if r["impl"] != "eager":
                print(f"{r['what']:5s} {r['impl']:8s} H={r['H']:4d} x eager {r['speedup_vs_eager']:.2f}, "
                      f"peak x eager {r['mem_vs_eager']:.2f}")
    return rows


if __name__ == "__main__":
    main()
