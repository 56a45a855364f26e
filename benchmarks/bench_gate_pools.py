"""The C++ gate pools alone on the CPU: ``gates_pool_hw`` (mean, max, first arg-max over
H·W per channel) and ``gates_pool_c`` (the same over C per pixel), both layouts.

    python benchmarks/bench_gate_pools.py [--repeats 30] [--threads 2] [--out FILE.md]

Prints (and with ``--out`` writes) one markdown row per op, layout, shape and gate: the
minimum and median of ``--repeats`` calls. "gate" is the (B, H·W) or (B, C) factor the
model's gate chain passes (the spatial gate's S to the pool over H·W, the channel gate's G
to the pool over C); "none" pools x itself. These pools run in every channel and spatial gate of the
model; a change to them is an A/B between two builds, so run this in both trees, one after
the other, several times (single runs on a 2-core machine move by 10-20 %).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import time

import torch

if __package__ in (None, ""):  # run as a script (python benchmarks/bench_gate_pools.py): the repo root importable
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import disseg_kernels  # noqa: F401,E402  (registers torch.ops.disseg)
from benchmarks._args import positive_int  # noqa: E402
from benchmarks.bench_dispersive import machine_name  # noqa: E402

SHAPES = [(4, 64, 128, 128), (8, 64, 64, 64), (8, 256, 32, 32), (8, 1024, 16, 16)]


def _time(fn, repeats: int) -> tuple[float, float]:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[0] * 1e3, ts[len(ts) // 2] * 1e3


def main(argv: list[str] | None = None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=positive_int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="", help="also write the markdown table to this file (a file path, e.g. "
                   "benchmarks/results/gate_pools_cpu_DATE.md; default: print only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"# C++ gate pools, CPU ({machine_name('cpu')}, {args.threads} threads), "
             f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, float32, min / median of {args.repeats}",
             "", "| op | layout | shape | gate | min ms | median ms |", "|---|---|---|---|---:|---:|"]
    print("\n".join(lines), flush=True)
    for layout in ("nchw", "channels_last"):
        for shape in SHAPES:
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            if layout != "nchw":
                x = x.contiguous(memory_format=torch.channels_last)
            b, c, h, w = shape
            gates = {"gates_pool_hw": torch.rand(b, h * w) + 0.5, "gates_pool_c": torch.rand(b, c) + 0.5}
            for op in ("gates_pool_hw", "gates_pool_c"):
                f = getattr(torch.ops.disseg, op)
                for gate in (None, gates[op]):
                    lo, med = _time(lambda: f(x, gate), args.repeats)  # noqa: B023
                    row = (f"| {op} | {layout} | {'x'.join(map(str, shape))} | {'none' if gate is None else 'yes'} "
                           f"| {lo:.3f} | {med:.3f} |")
                    lines.append(row)
                    print(row, flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
