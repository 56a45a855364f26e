"""Benchmark of the dispersive loss: every fused backend against eager and torch.compile.

    python -m benchmarks.bench_dispersive                 # CPU, float32, the issue's shapes
    python -m benchmarks.bench_dispersive --quick         # small shapes, a few seconds
    python -m benchmarks.bench_dispersive --device cuda --dtype bfloat16
    python -m benchmarks.bench_dispersive --shapes 2048x1024,8192x256 --variant infonce_l2sq

For each shape (N, D) it times forward, backward and forward+backward (median of repeats,
synchronised; ``triton.testing.do_bench`` on CUDA), measures peak extra memory (``benchmarks/_memory.py``: CUDA
``max_memory_allocated``; CPU the larger of malloc's sampled bytes in use and the
resident-set high-water mark, each above the level before the call), and reports GFLOP/s on the 4·N²·D basis (forward Gram
2·N²·D plus the gradient's W·Z 2·N²·D) next to the machine's measured matmul rate, with
ratios against eager (cdist → mask → exp → mean → log with autograd) and against
torch.compile of eager (with the mask as ``torch.where`` of fixed shape, so that compile
sees one graph: ``eager_dispersive_loss(fixed_shape_mask=True)``). Eager and compile are skipped where their N×N buffers would not
fit the memory budget, and the table says how much they would need.

Writes benchmarks/results/dispersive_<device>_<date>[_<dtype>].csv and .md. ``main(argv)``
is importable (the GPU script calls it).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import disseg_kernels
from benchmarks._args import dims, out_folder, positive_int, require_device
from benchmarks._memory import PeakMemory
from benchmarks._memory import describe as describe_peak
from disseg_kernels import dispersive_loss
from disseg_kernels.reference.dispersive import VARIANTS, eager_dispersive_loss

# The backward pass is timed repeatedly on one graph (retain_graph=True); AOTAutograd's
# donated buffers forbid that for the torch.compile baseline, so they are turned off.
try:
    import torch._functorch.config as _functorch_config

    _functorch_config.donated_buffer = False
except (ImportError, AttributeError):
    pass

FULL_SHAPES = [(8, 262144), (2048, 1024), (8192, 256), (32768, 128), (65536, 64)]
QUICK_SHAPES = [(8, 32768), (1024, 256), (2048, 64)]
RESULTS = Path(__file__).resolve().parent / "results"

# Bytes per N² element that eager's autograd graph holds at its peak (cdist output, the
# masked copy, exp, their gradients): about 8 float32 N×N buffers, i.e. 2.2 GB at
# N = 8192 and 137 GB at N = 65,536.
EAGER_NN_BUFFERS = 8


# ----------------------------------------------------------------------------------------
# Machine description and memory
# ----------------------------------------------------------------------------------------


def machine_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1-minute load average and the core count: how quiet the machine was."""
    try:
        with open("/proc/loadavg") as f:
            return f"{float(f.read().split()[0]):.1f} on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def available_memory_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


# ----------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_times_ms(fn, device: str, repeats: int, setup=None) -> list[float]:
    """Wall time (ms) of each of ``repeats`` calls of fn, ``setup()`` untimed before each."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _median_ms(fn, device: str, repeats: int, setup=None) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=max(20, 4 * repeats)))
    return statistics.median(wall_times_ms(fn, device, repeats, setup))


def matmul_rate_gflops(device: str, dtype: torch.dtype) -> float:
    """The machine's dense matmul rate in this dtype (n×n @ n×n), GFLOP/s."""
    n = 8192 if device == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    ms = _median_ms(lambda: torch.mm(a, b), device, 5)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def _loss_fns(variant: str, backends: list[str], tau: float):
    """name -> callable(z) -> loss, for the fused backends and the baselines."""
    fns = {}
    for b in backends:
        fns[b] = lambda z, b=b: dispersive_loss(z, variant, tau=tau, backend=b)
    fns["eager"] = lambda z: eager_dispersive_loss(z, variant, tau=tau)  # noqa: E731
    # torch.compile of the same formula with the excluded diagonal as a fixed-shape mask: the
    # boolean index of eager splits the graph (aten.nonzero), which would weaken this baseline
    # (until 2026-11-28 it did: "x compile" figures before that date are against the split graph)
    fns["compile"] = torch.compile(lambda z: eager_dispersive_loss(z, variant, tau=tau, fixed_shape_mask=True),
                                   dynamic=False)  # static shapes: one specialised graph per shape
    return fns


def measure(fn, z: torch.Tensor, device: str, repeats: int) -> dict:
    """Forward, backward and forward+backward times (ms) and peak extra memory (MB)."""

    def fwd():
        return fn(z)

    def fwd_bwd():
        z.grad = None
        fn(z).backward()

    fwd_bwd()  # warm-up (and compilation)
    fwd_bwd()
    t_fwd = _median_ms(fwd, device, repeats)
    holder = {}

    def make_loss():
        z.grad = None
        holder["loss"] = fn(z)

    if device == "cuda":
        make_loss()
        t_bwd = _median_ms(lambda: holder["loss"].backward(retain_graph=True), device, repeats)
    else:
        t_bwd = _median_ms(lambda: holder["loss"].backward(), device, repeats, setup=make_loss)
    holder.clear()
    t_both = _median_ms(fwd_bwd, device, repeats)

    peak = 0
    for _ in range(1 if device == "cuda" else 2):  # CPU: keep the larger of two (see benchmarks/_memory.py)
        z.grad = None
        with PeakMemory(device) as mem:
            fwd_bwd()
        peak = max(peak, mem.extra)
    z.grad = None
    return {"fwd_ms": t_fwd, "bwd_ms": t_bwd, "fwdbwd_ms": t_both, "peak_mb": peak / 2**20}


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------


_parse_shapes = dims(2)  # "2048x1024,8192x256" -> [(2048, 1024), (8192, 256)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--variant", choices=VARIANTS, default="infonce_l2")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--shapes", type=_parse_shapes, default=None, help="e.g. 2048x1024,8192x256")
    p.add_argument("--quick", action="store_true", help=f"small shapes {QUICK_SHAPES}, 3 repeats")
    p.add_argument("--repeats", type=positive_int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="largest N×N footprint for eager/compile (default: half the available memory, at most 8 GB on CPU)",
    )
    p.add_argument("--out-dir", type=out_folder, default=RESULTS)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        require_device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    repeats = args.repeats or (3 if args.quick else 5)

    backends = [
        b
        for b in disseg_kernels.available_backends("dispersive", device)
        if b != "reference" and not (device == "cpu" and b == "triton")  # the interpreter is not a benchmark
    ]
    budget = args.memory_budget_gb * 2**30 if args.memory_budget_gb else available_memory_bytes(device) / 2
    if device == "cpu" and not args.memory_budget_gb:
        budget = min(budget, 8 * 2**30)

    machine = machine_name(device)
    date = _dt.datetime.now(_dt.timezone.utc)
    load = load_average()
    mm_rate = matmul_rate_gflops(device, dtype)
    print(f"machine: {machine}")
    print(f"load average at start: {load}")
    print(f"date: {date:%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"matmul rate ({args.dtype}): {mm_rate:.1f} GFLOP/s")
    fns = _loss_fns(args.variant, backends, args.tau)
    impls = backends + ["eager"] + ([] if args.no_compile else ["compile"])
    print(f"variant {args.variant}, dtype {args.dtype}, implementations {impls}")
    rows = []
    for n, d in shapes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        z = torch.randn(n, d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()
        flops = 4.0 * n * n * d
        times = {}
        for impl in impls:
            row = {
                "device": device,
                "machine": machine,
                "date": f"{date:%Y-%m-%d}",
                "dtype": args.dtype,
                "variant": args.variant,
                "N": n,
                "D": d,
                "impl": impl,
            }
            side = d if args.variant == "covariance" else n  # eager's covariance is D×D
            need = EAGER_NN_BUFFERS * side * side * torch.finfo(dtype).bits // 8
            if impl in ("eager", "compile") and need > budget:
                row["note"] = f"skipped: would need {need / 2**30:.1f} GB"
            else:
                try:
                    row.update(measure(fns[impl], z, device, repeats))
                    row["gflops"] = flops / (row["fwdbwd_ms"] * 1e-3) / 1e9
                    times[impl] = row["fwdbwd_ms"]
                except Exception as exc:  # report and go on with the other rows
                    row["note"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            rows.append(row)
        for row in rows[-len(impls):]:
            t = row.get("fwdbwd_ms")
            if t:
                if "eager" in times:
                    row["x_vs_eager"] = times["eager"] / t
                if "compile" in times:
                    row["x_vs_compile"] = times["compile"] / t
            print(_format_row(row))
        del z
    _write(rows, args, device, date, machine, mm_rate, load)
    return rows


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else ""


def _format_row(r: dict) -> str:
    return (
        f"{r['N']:>6} x {r['D']:<7} {r['impl']:>8}  fwd {_fmt(r.get('fwd_ms'), '9.2f')} ms  "
        f"bwd {_fmt(r.get('bwd_ms'), '9.2f')} ms  fwd+bwd {_fmt(r.get('fwdbwd_ms'), '9.2f')} ms  "
        f"peak {_fmt(r.get('peak_mb'), '8.1f')} MB  {_fmt(r.get('gflops'), '7.1f')} GFLOP/s  "
        f"x eager {_fmt(r.get('x_vs_eager'), '6.2f')}  x compile {_fmt(r.get('x_vs_compile'), '6.2f')}  "
        f"{r.get('note', '')}"
    )


FIELDS = [
    "device", "machine", "date", "dtype", "variant", "N", "D", "impl", "fwd_ms", "bwd_ms",
    "fwdbwd_ms", "peak_mb", "gflops", "x_vs_eager", "x_vs_compile", "note",
]  # fmt: skip


def write_csv(path, rows: list[dict], fields: list[str]) -> None:
    """rows as CSV with the given columns (floats to 4 significant digits, missing = "")."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in fields})


def _write(rows, args, device, date, machine, mm_rate, load) -> None:
    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    if args.variant != "infonce_l2":
        suffix += f"_{args.variant}"
    if args.quick:
        suffix += "_quick"
    stem = args.out_dir / f"dispersive_{device}_{date:%Y-%m-%d}{suffix}"
    write_csv(stem.with_suffix(".csv"), rows, FIELDS)
    lines = [
        f"# Dispersive loss benchmark ({device}, {args.dtype}, {args.variant})",
        "",
        f"- machine: {machine}",
        f"- date: {date:%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; {torch.get_num_threads()} threads",
        f"- measured matmul rate ({args.dtype}): {mm_rate:.1f} GFLOP/s; load average at start: {load}",
        "- command: `python -m benchmarks.bench_dispersive " + " ".join(args.argv) + "`",
        "- GFLOP/s on the 4·N²·D basis of forward+backward; x eager / x compile: fwd+bwd speed-up",
        "- peak: extra memory of one forward+backward"
        + f" ({describe_peak(device)})",
        "",
        "| N | D | impl | fwd ms | bwd ms | fwd+bwd ms | peak MB | GFLOP/s | x eager | x compile | note |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['D']} | {r['impl']} | {_fmt(r.get('fwd_ms'), '.2f')} | {_fmt(r.get('bwd_ms'), '.2f')} | "
            f"{_fmt(r.get('fwdbwd_ms'), '.2f')} | {_fmt(r.get('peak_mb'), '.1f')} | {_fmt(r.get('gflops'), '.1f')} | "
            f"{_fmt(r.get('x_vs_eager'), '.2f')} | {_fmt(r.get('x_vs_compile'), '.2f')} | {r.get('note', '')} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv and {stem}.md")


if __name__ == "__main__":
    main()
