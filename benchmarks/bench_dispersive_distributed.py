"""Benchmark of the global-batch dispersive loss: communication volume and time.

    python -m benchmarks.bench_dispersive_distributed --quick          # 2-4 gloo processes, CPU
    python -m benchmarks.bench_dispersive_distributed --worlds 2 4 --shapes 1024x128,8x65536
    python -m benchmarks.bench_dispersive_distributed --device cuda    # NCCL if ≥ 2 GPUs; with
                                                                       # one GPU: a rank's share
    python -m benchmarks.bench_dispersive_distributed --bank           # the memory-bank loss, one
                                                                       # process: fused vs PyTorch

``--bank`` times ``dispersive_loss_with_bank`` (forward, backward, forward+backward, peak
memory) for N×D×K shapes (``--bank-shapes 2048x256x4096,8x262144x64``) with the fused row
statistics (``backend="auto"``: C++ on CPU, Triton on CUDA) against the PyTorch tiles
(``backend="reference"``) and against the N×(N+K)-matrix formula
(``reference/dispersive_bank.py``) eager and under ``torch.compile``; it writes
``dispersive_bank_<device>[_quick]_<date>.csv/.md``.

For every world size W and per-rank shape (n, D) it spawns W processes (gloo on CPU, NCCL on
CUDA, loopback) and times forward+backward of the global loss (median of repeats, a
barrier before each, the slowest rank's time) in three ways:

- ``baseline``: all-gather everything. z is gathered with autograd
  (``torch.distributed.nn.functional.all_gather``), every rank computes the whole loss
  (``dispersive_loss``, backend auto: the fused kernel where built) on the N×D
  concatenation, and the backward sends the N×D gradient back (reduce-scatter on NCCL,
  all-to-all on gloo). ``baseline_reference``: the same with the plain-PyTorch reference.
- ``allgather``: ``distributed_dispersive_loss(ring=False)``: one all-gather of z, per-row
  statistics (``_row_stats``, backend auto: the fused C++ / Triton row statistics), two
  scalar all-reduces; each rank computes only its n×N pairs; no backward communication.
- ``ring``: ``distributed_dispersive_loss(ring=True)``: W−1 P2P steps, two blocks resident.

Bytes per rank are counted at the call sites (``disseg_kernels.distributed.count_communication``:
all-gather (W−1)·chunk, all-reduce 2(W−1)/W·size, P2P the tensor; the baseline's are
counted the same way by hand). Peak memory: CUDA ``max_memory_allocated``; CPU the larger
of malloc's sampled bytes in use and the resident-set high-water mark, above the level
before the call (benchmarks/_memory.py).

The markdown also writes the scaling model (bytes per rank, ring steps) with its
predictions for 8 GPUs. Writes benchmarks/results/dispersive_distributed_<device>[_quick]_<date>
.csv and .md. ``main(argv)`` is importable.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import socket
import statistics
import tempfile
import time
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks._args import dims, out_folder, positive_int, require_device
from benchmarks._memory import PeakMemory

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_SHAPES = [(256, 64), (8, 16384)]
FULL_SHAPES = [(1024, 128), (8, 65536)]
METHODS = ("baseline", "baseline_reference", "allgather", "ring")


def machine_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.device_count()}× {torch.cuda.get_device_name()}"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------------------
# The three methods


def _baseline(z, variant, counter, backend):
    from disseg_kernels import dispersive_loss
    from torch.distributed.nn.functional import all_gather

    world = dist.get_world_size()
    with warnings.catch_warnings():  # "deprecated": its replacement has no autograd here
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(z)  # n must be equal on every rank here (it is in this benchmark)
    chunk = z.numel() * z.element_size()
    counter.add("all_gather(z)", (world - 1) * chunk)
    counter.add("backward reduce-scatter/all-to-all(grad)", (world - 1) * chunk)
    return dispersive_loss(torch.cat(parts), variant=variant, backend=backend)


def _ours(z, variant, ring):
    from disseg_kernels import distributed_dispersive_loss

    return distributed_dispersive_loss(z, variant=variant, ring=ring)


def _worker(rank, world, port, device_type, cases, reps, outdir):
    from disseg_kernels.distributed import count_communication

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rows = []
    try:
        for n, dim, variant in cases:
            g = torch.Generator().manual_seed(rank)
            base = (torch.randn(n, dim, generator=g) / dim**0.5).to(device)
            values = {}
            for method in METHODS:
                times, counted, peak = [], None, 0
                for rep in range(reps + 1):  # the first is a warm-up
                    z = base.clone().requires_grad_(True)
                    dist.barrier()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    with count_communication() as c, PeakMemory(device) as pk:
                        t0 = time.perf_counter()
                        if method.startswith("baseline"):
                            loss = _baseline(z, variant, c, "reference" if method == "baseline_reference" else "auto")
                        else:
                            loss = _ours(z, variant, ring=method == "ring")
                        loss.backward()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        dt = time.perf_counter() - t0
                    if rep:
                        times.append(dt)
                        peak = max(peak, pk.extra)
                    counted = c
                    values[method] = float(loss.detach())
                t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
                rows.append(dict(world=world, n_per_rank=n, D=dim, variant=variant, method=method,
                                 time_ms=float(t) * 1e3, bytes_per_rank=int(counted.total),
                                 comm_detail=";".join(f"{k}={int(v)}" for k, v in counted.bytes.items()),
                                 peak_extra_mb=peak / 2**20, loss=values[method]))
            assert abs(values["allgather"] - values["baseline"]) <= 1e-4 * max(1.0, abs(values["baseline"])), values
            assert abs(values["ring"] - values["allgather"]) <= 1e-5 * max(1.0, abs(values["baseline"])), values
        if rank == 0:
            torch.save(rows, os.path.join(outdir, "rows.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world, device_type, cases, reps):
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(world, _free_port(), device_type, cases, reps, outdir), nprocs=world, join=True)
        return torch.load(os.path.join(outdir, "rows.pt"))


# ----------------------------------------------------------------------------------------
# One rank's share on a single device (what a single GPU can measure)


def shard_compute(n, dim, world, variant, device, reps):
    """Time of rank 0's compute for W ranks of n rows: its n rows against all N = W·n
    columns (the all-gather mode without communication), and the baseline's whole loss."""
    from disseg_kernels import dispersive_loss
    from disseg_kernels.distributed import _row_stats

    z = torch.randn(world * n, dim, device=device) / dim**0.5

    def ours():
        st = _row_stats(z[:n], z, variant, 0.5, 1.0, False, False, 0, 2.0, True)
        return st.acc.sum()

    def whole():
        zz = z.clone().requires_grad_(True)
        dispersive_loss(zz, variant=variant).backward()

    out = {}
    for name, fn in (("ours_rank_share", ours), ("baseline_whole_loss", whole)):
        times = []
        for rep in range(reps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep:
                times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) * 1e3
    return out


# ----------------------------------------------------------------------------------------
# The scaling model


def scaling_model(world, n, dim, bytes_per_el, bw_gbs):
    """Bytes per rank and idealised transfer time (bytes / per-direction link bandwidth).

    all-gather mode: (W−1)·n·D·b (z) + 16·(W−1) (sizes) + 2·2(W−1)/W·8 (two scalars);
    ring: the same z bytes in W−1 steps of n·D·b, 2·n·D resident instead of W·n·D;
    baseline: 2·(W−1)·n·D·b (z gathered, gradient reduce-scattered) and N² pairs per rank
    instead of n·N.
    """
    zb = (world - 1) * n * dim * bytes_per_el
    small = 16 * (world - 1) + 2 * 2 * (world - 1) / world * 8
    ours = zb + small
    base = 2 * zb
    return dict(
        ours_bytes=ours, baseline_bytes=base, ring_steps=world - 1, ring_step_bytes=n * dim * bytes_per_el,
        ours_ms=ours / (bw_gbs * 1e9) * 1e3, baseline_ms=base / (bw_gbs * 1e9) * 1e3,
        ours_resident_mb_ring=2 * n * dim * bytes_per_el / 2**20,
        ours_resident_mb_allgather=world * n * dim * bytes_per_el / 2**20,
        pairs_per_rank_ours=n * world * n, pairs_per_rank_baseline=(world * n) ** 2,
    )


MODEL_CASES = [  # (label, n per rank, D, bytes per element)
    ("model regime, fp32", 8, 262144, 4),
    ("model regime, bf16", 8, 262144, 2),
    ("many samples, fp32", 8192, 256, 4),
    ("pixel-level, bf16", 16384, 64, 2),
]
NVLINK_GBS = 450.0  # H100 SXM NVLink 4: 900 GB/s bidirectional, 450 GB/s per direction
IB_GBS = 50.0  # 400 Gb/s InfiniBand NDR per GPU, across nodes


def scaling_markdown(world=8):
    lines = [
        f"## Scaling model, predicted for {world} GPUs",
        "",
        "Bytes sent per rank (b = bytes per element, n rows per rank, W ranks):",
        "",
        "| mode | bytes per rank | resident z blocks | pairs computed per rank | backward comm |",
        "| --- | --- | --- | --- | --- |",
        "| all-gather (ours) | (W−1)·n·D·b + O(W) | W·n·D | n·N | none |",
        "| ring (ours) | (W−1)·n·D·b in W−1 P2P steps of n·D·b, overlapped with compute | 2·n·D | n·N | none |",
        "| all-gather everything (baseline) | 2·(W−1)·n·D·b | W·n·D (+ N×D grad) | N² | reduce-scatter N×D |",
        "",
        "The ring hides its transfers when a step's compute (≈ 6·n²·D flops: distances, exp, "
        "the weighted column sum) outlasts the transfer of one block (n·D·b / bandwidth), i.e. "
        "n ≳ b·FLOP/s / (6·bandwidth): at 60 TFLOP/s fp32 and 450 GB/s that is n ≳ 90 rows per rank. "
        "Covariance adds two all-reduces of D floats (or one of D×D with covariance_mode='dxd').",
        "",
        f"Predicted for W = {world} (transfer time = bytes / per-direction bandwidth; NVLink "
        f"{NVLINK_GBS:.0f} GB/s within a node, InfiniBand {IB_GBS:.0f} GB/s across nodes):",
        "",
        "| case | n/rank | D | ours MB/rank | baseline MB/rank | ring steps × MB | ring resident MB | "
        "all-gather resident MB | ours ms NVLink | baseline ms NVLink | ours ms IB | baseline ms IB | "
        "pairs/rank ours | pairs/rank baseline |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, n, dim, b in MODEL_CASES:
        m = scaling_model(world, n, dim, b, NVLINK_GBS)
        ib = scaling_model(world, n, dim, b, IB_GBS)
        lines.append(
            f"| {label} | {n} | {dim} | {m['ours_bytes'] / 2**20:.1f} | {m['baseline_bytes'] / 2**20:.1f} | "
            f"{m['ring_steps']} × {m['ring_step_bytes'] / 2**20:.1f} | {m['ours_resident_mb_ring']:.1f} | "
            f"{m['ours_resident_mb_allgather']:.1f} | {m['ours_ms']:.3f} | {m['baseline_ms']:.3f} | "
            f"{ib['ours_ms']:.2f} | {ib['baseline_ms']:.2f} | {m['pairs_per_rank_ours']:,} | "
            f"{m['pairs_per_rank_baseline']:,} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------
def _write_csv(stem, fields, rows, machine, date):
    """rows (dicts with ``fields``) to ``stem``.csv, each prefixed by the machine and date."""
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["machine", "date"] + fields)
        w.writeheader()
        for r in rows:
            w.writerow(dict(machine=machine, date=date.isoformat(timespec="seconds"), **r))


def _command(argv):
    return " ".join(["python -m benchmarks.bench_dispersive_distributed", *(sys.argv[1:] if argv is None else argv)])


# --bank: the memory-bank loss in one process

BANK_SHAPES = [(2048, 256, 4096), (8, 262144, 64)]
BANK_QUICK_SHAPES = [(512, 128, 1024), (8, 65536, 64)]


def _time(fn, reps, device):
    times = []
    for rep in range(reps + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if rep:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bank_benchmark(shapes, variant, device, reps, compile_ref=True):
    """Rows of (N, D, K, method, fwd_ms, bwd_ms, fwdbwd_ms, peak_extra_mb, loss)."""
    from disseg_kernels import dispersive_loss_with_bank
    from disseg_kernels._backend import resolve
    from disseg_kernels.reference.dispersive_bank import dispersive_loss_bank_reference

    fused = resolve("dispersive_rows", "auto", device)
    methods = {
        f"fused ({fused})": lambda z, b: dispersive_loss_with_bank(z, b, variant=variant, backend="auto"),
        "pytorch tiles (backend=reference)":
            lambda z, b: dispersive_loss_with_bank(z, b, variant=variant, backend="reference"),
        "formula, eager": lambda z, b: dispersive_loss_bank_reference(z, b, variant=variant),
    }
    if compile_ref:
        compiled = torch.compile(dispersive_loss_bank_reference, dynamic=False)
        methods["formula, torch.compile"] = lambda z, b: compiled(z, b, variant=variant)
    rows = []
    for n, d, k in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        z0 = (torch.randn(n, d, generator=g) / d**0.5 * 8).to(device)  # d ~ 11: the softmax spreads
        bank = (torch.randn(k, d, generator=g) / d**0.5 * 8).to(device)
        for name, fn in methods.items():
            print(f"  N={n} D={d} K={k} {name} ...", flush=True)
            try:
                with torch.no_grad():
                    fwd = _time(lambda: fn(z0, bank), reps, device)

                def fwdbwd():
                    z = z0.clone().requires_grad_(True)
                    fn(z, bank).backward()

                both = _time(fwdbwd, reps, device)
                z = z0.clone().requires_grad_(True)
                losses = []

                def bwd_only():
                    z.grad = None
                    loss = fn(z, bank)
                    losses.append(loss)
                    return loss

                bwd_times = []
                for rep in range(reps + 1):
                    loss = bwd_only()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    loss.backward()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if rep:
                        bwd_times.append(time.perf_counter() - t0)
                with PeakMemory(device) as pk:
                    fwdbwd()
                rows.append(dict(N=n, D=d, K=k, variant=variant, method=name, fwd_ms=fwd,
                                 bwd_ms=statistics.median(bwd_times) * 1e3, fwdbwd_ms=both,
                                 peak_extra_mb=pk.extra / 2**20, loss=float(losses[-1].detach())))
            except Exception as exc:  # a compile failure is reported, not fatal
                rows.append(dict(N=n, D=d, K=k, variant=variant, method=name, fwd_ms=float("nan"),
                                 bwd_ms=float("nan"), fwdbwd_ms=float("nan"), peak_extra_mb=float("nan"),
                                 loss=float("nan"), error=f"{type(exc).__name__}: {str(exc)[:120]}"))
    return rows


def bank_main(args, argv):
    device = torch.device(args.device)
    shapes = args.bank_shapes or (BANK_QUICK_SHAPES if args.quick else BANK_SHAPES)
    reps = args.reps or (2 if args.quick else 5)
    date = _dt.datetime.now(_dt.timezone.utc)
    machine = machine_name(args.device)
    load = os.getloadavg()
    rows = bank_benchmark(shapes, args.variant, device, reps, compile_ref=not args.no_compile)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = ("_quick" if args.quick else "") + (f"_t{args.threads}" if args.threads else "")
    stem = args.out / f"dispersive_bank_{args.device}{tag}_{date:%Y-%m-%d}"
    fields = ["N", "D", "K", "variant", "method", "fwd_ms", "bwd_ms", "fwdbwd_ms", "peak_extra_mb", "loss", "error"]
    _write_csv(stem, fields, rows, machine, date)
    command = _command(argv)
    md = [
        "# Dispersive loss with a memory bank: fused row statistics vs PyTorch",
        "",
        f"Machine: {machine}; torch {torch.__version__}; {date:%Y-%m-%d %H:%M} UTC; variant {args.variant}; "
        f"threads {torch.get_num_threads()}; load average before the run {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f}; median of {reps} after a warm-up.",
        f"Command: `{command}`",
        "`fused`: `dispersive_loss_with_bank(backend='auto')` (the C++ or Triton row statistics); "
        "`pytorch tiles`: the same function with `backend='reference'` (`_row_stats` over PyTorch tiles, "
        "torch.cdist); `formula`: `dispersive_loss_bank_reference` (builds the N×(N+K) matrices). "
        "The fused and tiled paths compute the gradient in the forward pass (backward only scales it), "
        "so their fwd with grad is the fwd+bwd time; `fwd` is timed with grad off.",
        "",
        "| N | D | K | method | fwd ms | bwd ms | fwd+bwd ms | fused speed-up (fwd+bwd) | peak extra MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        f = next(x for x in rows if x["N"] == r["N"] and x["D"] == r["D"] and x["K"] == r["K"]
                 and x["method"].startswith("fused"))
        sp = f"{r['fwdbwd_ms'] / f['fwdbwd_ms']:.2f}×" if f["fwdbwd_ms"] == f["fwdbwd_ms"] else ""
        err = f" ({r['error']})" if r.get("error") else ""
        md.append(f"| {r['N']} | {r['D']} | {r['K']} | {r['method']}{err} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | "
                  f"{r['fwdbwd_ms']:.1f} | {sp} | {r['peak_extra_mb']:.1f} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {stem}.csv and .md")
    return rows


_parse_bank_shapes = dims(3)  # N×D×K
_parse_shapes = dims(2)  # per-rank n×D


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, 2 repeats")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--worlds", type=positive_int, nargs="+", default=[2, 3, 4])
    p.add_argument("--shapes", type=_parse_shapes, default=None, help="per-rank n×D list, e.g. 1024x128,8x65536")
    p.add_argument("--variant", default="infonce_l2")
    p.add_argument("--reps", type=positive_int, default=None)
    p.add_argument("--out", type=out_folder, default=RESULTS)
    p.add_argument("--bank", action="store_true", help="time dispersive_loss_with_bank in one process instead")
    p.add_argument("--bank-shapes", type=_parse_bank_shapes, default=None, help="N×D×K list, e.g. 2048x256x4096")
    p.add_argument("--no-compile", action="store_true", help="--bank: skip the torch.compile baseline")
    p.add_argument("--threads", type=int, default=None,
                   help="--bank: torch.set_num_threads (1 gives stable figures on a shared machine)")
    args = p.parse_args(argv)
    require_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bank:
        return bank_main(args, argv)

    shapes = args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    reps = args.reps or (2 if args.quick else 5)
    cases = [(n, d, args.variant) for n, d in shapes]
    date = _dt.datetime.now(_dt.timezone.utc)
    machine = machine_name(args.device)
    rows, notes = [], []
    from disseg_kernels._backend import resolve

    notes.append(f"`baseline` ran dispersive_loss with backend auto = "
                 f"{resolve('dispersive', 'auto', torch.device(args.device))!r}; `allgather`/`ring` ran the "
                 f"row statistics (`_row_stats`) with backend auto = "
                 f"{resolve('dispersive_rows', 'auto', torch.device(args.device))!r}.")
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        notes.append(f"Only {torch.cuda.device_count()} GPU: no multi-process run; one rank's compute share measured "
                     "for W = 8 instead (the communication is the model's).")
        dev = torch.device("cuda")
        for n, d in shapes:
            r = shard_compute(n, d, 8, args.variant, dev, reps)
            rows.append(dict(world=8, n_per_rank=n, D=d, variant=args.variant, method="shard_compute",
                             time_ms=r["ours_rank_share"], bytes_per_rank=0, comm_detail="",
                             peak_extra_mb=0.0, loss=float("nan")))
            rows.append(dict(world=8, n_per_rank=n, D=d, variant=args.variant, method="baseline_whole_loss",
                             time_ms=r["baseline_whole_loss"], bytes_per_rank=0, comm_detail="",
                             peak_extra_mb=0.0, loss=float("nan")))
    else:
        for world in args.worlds:
            if args.device == "cuda" and torch.cuda.device_count() < world:
                notes.append(f"W = {world} skipped: {torch.cuda.device_count()} GPUs")
                continue
            print(f"W = {world} ...", flush=True)
            rows += run_world(world, args.device, cases, reps)

    args.out.mkdir(parents=True, exist_ok=True)
    mode = "_quick" if args.quick else ""
    stem = args.out / f"dispersive_distributed_{args.device}{mode}_{date:%Y-%m-%d}"
    fields = ["world", "n_per_rank", "D", "variant", "method", "time_ms", "bytes_per_rank", "comm_detail",
              "peak_extra_mb", "loss"]
    _write_csv(stem, fields, rows, machine, date)

    command = _command(argv)
    md = [
        "# Global-batch dispersive loss: communication and time",
        "",
        f"Machine: {machine}; torch {torch.__version__}; {date:%Y-%m-%d %H:%M} UTC; "
        f"{'NCCL' if args.device == 'cuda' else 'gloo on loopback'}; variant {args.variant}; "
        f"median of {reps} after a warm-up, slowest rank.",
        f"Command: `{command}`",
        "Bytes are counted exactly; times on a shared CPU with W processes on few cores are noisy "
        "(repeat runs differ by 2× or more on the 2-core development machine).",
        "",
        *notes,
        "",
        "| W | n/rank | D | method | fwd+bwd ms | bytes/rank | bytes / baseline bytes | speed-up vs baseline "
        "| peak extra MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        base = next((b for b in rows if b["method"] == "baseline" and b["world"] == r["world"]
                     and b["n_per_rank"] == r["n_per_rank"] and b["D"] == r["D"]), None)
        rb = f"{r['bytes_per_rank'] / base['bytes_per_rank']:.2f}×" if base and base["bytes_per_rank"] else ""
        rt = f"{base['time_ms'] / r['time_ms']:.2f}×" if base and r["time_ms"] else ""
        md.append(f"| {r['world']} | {r['n_per_rank']} | {r['D']} | {r['method']} | {r['time_ms']:.2f} | "
                  f"{r['bytes_per_rank']:,} | {rb} | {rt} | {r['peak_extra_mb']:.1f} |")
    md += ["", scaling_markdown(8), ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"\nwrote {stem}.csv and .md")
    return rows


if __name__ == "__main__":
    main()
