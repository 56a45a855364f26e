"""Training-step benchmark of the whole Med-DisSeg network: fused against plain.

    python -m benchmarks.bench_models                    # CPU: ResNet-50, batch 4, 128×128
    python -m benchmarks.bench_models --quick            # CPU: ResNet-18, batch 2, 64×64
    python -m benchmarks.bench_models --device cuda      # GPU: ResNet-50, batch 8, 256×256
    python -m benchmarks.bench_models --stages 2 --compile

For Stage I and Stage II, "plain" (``fused=False``) and "fused" (``fused=True``) with the
same weights (and, with ``--compile``, ``torch.compile`` of the plain model, inductor):
one training step = forward, loss (with-logits BCE on every mask + 0.2 × the dispersive
loss), backward, Adam step. Reported: the median forward, backward and full-step time
and images/s over ``--steps`` steps after ``--warmup``; the peak extra memory of one
forward+backward above the level before it (gradients included; CUDA:
``max_memory_allocated``; CPU: the larger of malloc's sampled bytes in use and the
resident-set high-water mark, benchmarks/_memory.py; each case in its own process); and the bytes autograd saves for backward (distinct storages
seen by ``saved_tensors_hooks``, parameters excluded), which does not depend on the
allocator or the machine's noise.

Writes benchmarks/results/models_<device>[_quick]_<date>.csv and .md (machine, torch,
threads, load average before and after: a shared machine's timings are only as good as
its load). ``main(argv)`` is importable.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import contextlib

import torch
import torch.nn.functional as F

import disseg_kernels as dk
from disseg_kernels import _backend
from benchmarks._args import comma_list, non_negative_int, out_folder, positive_int, require_device
from benchmarks._memory import PeakMemory
from benchmarks.bench_dispersive import machine_name
from models import FUSED_OPS, DispersiveConfig, build_model
from models.trainer import freed_memory_kept, keep_freed_memory, make_adam

RESULTS = Path(__file__).resolve().parent / "results"
# compiled: torch.compile of plain; fused_compiled: of fused; fused: "auto" (on CUDA since
# 2026-11-27: the CUDA kernels first for TeLU, gates, multi-scale; Triton first for window
# attention and the dispersive loss); fused_cuda / fused_triton: "auto" trying the CUDA /
# the Triton kernels first for every family (disseg_kernels._backend.auto_order);
# *_graph (CUDA): the training step's forward, loss and backward captured once as a CUDA
# graph and replayed, the Adam step eager (models.step_graph, what `disseg train --cuda-graph`
# runs), so almost no host work per step: what a host-bound step can reach
MODES = ("plain", "fused", "fused_cuda", "fused_triton", "compiled", "fused_compiled", "plain_graph", "fused_graph",
         "fused_cuda_graph")

# device -> quick -> (encoder, batch, size, warmup, steps)
PRESETS = {
    "cpu": {False: ("resnet50", 4, 128, 1, 3), True: ("resnet18", 2, 64, 1, 2)},
    "cuda": {False: ("resnet50", 8, 256, 3, 10), True: ("resnet50", 8, 256, 2, 5)},
}


def seg_loss(out, target, weight: float) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(out.mask, target)
    for aux in (out.fg, out.bg, out.uncertainty):
        if aux is not None:
            loss = loss + F.binary_cross_entropy_with_logits(aux, target)
    if out.disp_loss is not None:
        loss = loss + weight * out.disp_loss
    return loss


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def saved_bytes(model, x) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())


AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Case:
    """One (stage, mode) training setup: model, input, Adam, scaler; one timed step at a time."""

    def __init__(self, stage: int, mode: str, encoder: str, batch: int, size: int, device: str, amp: str,
                 channels_last: bool, compile_mode: str):
        torch.manual_seed(0)
        self.stage, self.mode, self.device = stage, mode, device
        self.encoder, self.batch, self.size, self.amp, self.channels_last = encoder, batch, size, amp, channels_last
        model = build_model(stage, encoder=encoder, fused=mode.startswith("fused"), dispersive=DispersiveConfig())
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=fmt).train()
        self.x = torch.randn(batch, 3, size, size, device=device).to(memory_format=fmt)
        self.target = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
        self.amp_dtype = AMP[amp]
        self.scaler = torch.amp.GradScaler(device, enabled=self.amp_dtype is torch.float16)
        self.compiled = mode.endswith("compiled")
        self.graphed = mode.endswith("_graph")
        self.graph, self.error = None, ""
        self.run = torch.compile(self.model, mode=compile_mode) if self.compiled else self.model
        self.compile_s = float("nan")
        # the trainer's Adam (fused where torch has it)
        self.opt = make_adam(self.model.parameters(), lr=1e-4)
        self.peak = float("nan")
        self.fwd, self.bwd, self.step = [], [], []

    def backends(self):
        """The op backends of this mode: fused_cuda / fused_triton put the CUDA / the
        Triton kernels first for every family; the others use "auto" as it is (a *_graph
        mode's capture chooses as captured code: StepGraph)."""
        if self.mode.startswith("fused_cuda"):
            return _backend.auto_order("cuda", ("cuda", "triton"))
        if self.mode.startswith("fused_triton"):
            return _backend.auto_order("cuda", ("triton", "cuda"))
        return contextlib.nullcontext()

    def autocast(self):
        # no weight-cast cache in a captured step (CUDA graphs and autocast's cache do not mix)
        return torch.autocast(self.device, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None,
                              cache_enabled=not self.graphed)

    def forward_loss(self, x=None, target=None):
        """The segmentation loss of the case's batch (or of ``x``, ``target``: a capture's inputs)."""
        with self.autocast():
            return seg_loss(self.run(self.x if x is None else x), self.target if target is None else target, 0.2)

    def peak_fwd_bwd(self) -> float:
        """Peak memory of one forward+backward (gradients included) above the level before."""
        self.opt.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        with PeakMemory(self.device) as mem:
            self.forward_loss().backward()
        self.opt.zero_grad(set_to_none=True)
        return mem.extra

    def capture(self) -> None:
        """Capture forward, loss and backward as one CUDA graph, as ``disseg train
        --cuda-graph`` does (``models.step_graph``: warm-up on a side stream that leaves
        BatchNorm's statistics and the RNG as they were, gradients allocated in the
        graph's pool and rewritten by each replay); the Adam step stays eager."""
        from models.step_graph import StepGraph

        def body(x, target):
            loss = self.forward_loss(x, target)
            self.scaler.scale(loss).backward()
            return (loss,)

        self.opt.zero_grad(set_to_none=True)
        graph = StepGraph(body, list(self.model.parameters()), [self.model], emulate=self.device != "cuda")
        graph.capture(self.x, self.target)
        self.graph = graph

    def graph_step(self, i: int, record: bool) -> None:
        if self.error:
            return
        if self.graph is None:
            try:
                self.capture()
            except Exception as exc:  # noqa: BLE001 - reported in the row, the other modes go on
                self.error = f"capture failed: {type(exc).__name__}: {exc}"[:300]
                print(f"stage {self.stage} {self.mode}: {self.error}", flush=True)
                return
        _sync(self.device)
        t0 = time.perf_counter()
        (loss,) = self.graph.replay(self.x, self.target)
        self.scaler.step(self.opt)
        self.scaler.update()
        _sync(self.device)
        t3 = time.perf_counter()
        if not torch.isfinite(loss):
            raise RuntimeError(f"stage {self.stage} {self.mode}: non-finite loss {loss.item()} at step {i}")
        if record:
            self.fwd.append(float("nan"))
            self.bwd.append(float("nan"))
            self.step.append(t3 - t0)

    def timed_step(self, i: int, record: bool) -> None:
        if self.graphed:
            return self.graph_step(i, record)
        device, opt = self.device, self.opt
        opt.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        loss = self.forward_loss()
        _sync(device)
        t1 = time.perf_counter()
        self.scaler.scale(loss).backward()
        _sync(device)
        t2 = time.perf_counter()
        self.scaler.step(opt)
        self.scaler.update()
        _sync(device)
        t3 = time.perf_counter()
        if not torch.isfinite(loss):
            raise RuntimeError(f"stage {self.stage} {self.mode}: non-finite loss {loss.item()} at step {i}")
        if i == 0 and self.compiled:
            self.compile_s = t3 - t0
        if record:
            self.fwd.append(t1 - t0)
            self.bwd.append(t2 - t1)
            self.step.append(t3 - t0)

    def free_steps(self, n: int) -> None:
        """n training steps as a training loop runs them: no synchronisation between the
        forward, the backward and the optimizer step, nor between steps."""
        for _ in range(n):
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(self.forward_loss()).backward()
            self.scaler.step(self.opt)
            self.scaler.update()

    def host_profile(self, n: int, top: int = 25) -> dict:
        """Where the host's time goes in ``n`` free-running steps (cProfile; on a GPU the time
        the host spends blocked on the device shows under the synchronising call), and those
        steps' wall time per step without the profiler."""
        import cProfile
        import pstats

        def ms_per_step(prof=None) -> float:
            _sync(self.device)
            t0 = time.perf_counter()
            with prof or contextlib.nullcontext():
                self.free_steps(n)
                _sync(self.device)
            return (time.perf_counter() - t0) / n * 1e3

        prof = cProfile.Profile()
        free_ms, profiled_ms = ms_per_step(), ms_per_step(prof)
        self.opt.zero_grad(set_to_none=True)
        return host_breakdown(pstats.Stats(prof).stats, n, free_ms, profiled_ms, top)

    def row(self, profile: int) -> dict:
        device = self.device
        if self.error or not self.step:
            nan = float("nan")
            return {"stage": self.stage, "mode": self.mode, "encoder": self.encoder, "amp": self.amp,
                    "channels_last": self.channels_last, "batch": self.batch, "size": self.size, "fwd_ms": nan,
                    "bwd_ms": nan, "step_ms": nan, "step_ms_min": nan, "step_ms_max": nan, "images_per_s": nan,
                    "peak_fwd_bwd_mb": nan, "saved_for_backward_mb": nan, "compile_s": nan,
                    "params": sum(p.numel() for p in self.model.parameters()), "profile": [],
                    "error": self.error or "no timed step"}
        if device == "cuda":  # peak memory of one forward+backward, after the warm-up
            self.peak = self.peak_fwd_bwd()
        with self.autocast():
            saved = saved_bytes(self.model, self.x) if not self.compiled else float("nan")
        top = []
        if profile > 0 and not self.graphed:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as profiler

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profiler(activities=acts) as prof:
                self.scaler.scale(self.forward_loss()).backward()
                _sync(device)
            self.opt.zero_grad(set_to_none=True)
            top = top_kernels(prof, device, profile)
        step_s = statistics.median(self.step)
        med = lambda xs: statistics.median(xs) * 1e3 if xs and xs[0] == xs[0] else float("nan")  # noqa: E731
        return {
            "stage": self.stage,
            "mode": self.mode,
            "encoder": self.encoder,
            "amp": self.amp,
            "channels_last": self.channels_last,
            "batch": self.batch,
            "size": self.size,
            "fwd_ms": med(self.fwd),
            "bwd_ms": med(self.bwd),
            "step_ms": step_s * 1e3,
            "step_ms_min": min(self.step) * 1e3,
            "step_ms_max": max(self.step) * 1e3,
            "images_per_s": self.batch / step_s,
            "peak_fwd_bwd_mb": self.peak / 2**20,
            "saved_for_backward_mb": saved / 2**20,
            "compile_s": self.compile_s,
            "params": sum(p.numel() for p in self.model.parameters()),
            "profile": top,
            "error": "",
        }


def run_group(
    stage: int, modes: list[str], encoder: str, batch: int, size: int, warmup: int, steps: int, device: str,
    amp: str = "none", channels_last: bool = False, profile: int = 0, compile_mode: str = "default",
    malloc: str = "cache", host_profile: int = 0,
) -> list[dict]:
    """The (stage, mode) cases of ``modes`` in this process, their steps interleaved: round
    i runs one step of every case, the order rotated each round, so that a drift of the
    machine's speed over the run falls on every mode alike. ``amp``: autocast dtype (fp16
    with a GradScaler); every step's loss must be finite. ``profile`` > 0: one more
    forward+backward under torch.profiler, its ``profile`` most expensive kernels (CUDA)
    or ops (CPU) in ``row["profile"]``. ``host_profile`` > 0: that many free-running steps
    (no synchronisation inside or between them) timed, then run under cProfile: ``row["host"]``
    (see host_breakdown); not for the captured modes, which have no host work per step."""
    cases = [_Case(stage, m, encoder, batch, size, device, amp, channels_last, compile_mode) for m in modes]
    if device == "cpu":
        # The resident-set peak needs the system allocator (with freed memory cached the
        # resident set stays at its peak and the next step adds nothing): measured on the
        # first step, before the allocator is switched for the timed steps. Only for a
        # lone case: a second case would reuse what the first freed and read low.
        if not freed_memory_kept() and len(cases) == 1:
            cases[0].peak = cases[0].peak_fwd_bwd()
        if malloc == "cache":
            keep_freed_memory()
    for i in range(warmup + steps):
        k = i % len(cases)
        for c in cases[k:] + cases[:k]:
            with c.backends():
                c.timed_step(i, record=i >= warmup)
    rows = []
    for c in cases:
        with c.backends():
            rows.append(c.row(profile))
            if host_profile > 0 and not c.graphed and not c.error:
                rows[-1]["host"] = c.host_profile(host_profile)
    return rows


def run_case(stage: int, mode: str, **kwargs) -> dict:
    """One (stage, mode) case in this process; returns its row (see run_group)."""
    return run_group(stage, [mode], **kwargs)[0]


# cProfile's self time by where the function lives: our glue, the model, Triton's launcher,
# torch's Python, and the C functions they call (ATen ops, kernel launches, synchronisation)
HOST_AREAS = (("disseg_kernels (ops, glue, references)", "/disseg_kernels/"), ("models", "/models/"), ("triton", "/triton/"),
              ("torch (Python)", "/torch/"))


_REPO = str(Path(__file__).resolve().parent.parent) + os.sep  # paths in the table are relative to it


def host_breakdown(stats: dict, n: int, free_ms: float, profiled_ms: float, top: int) -> dict:
    """pstats' raw table -> ms per step by area, and the ``top`` functions by self time.
    Built-in (C) calls are their own area; the synchronising ones (the host waiting for the
    device) are split out, so a host-bound step shows little time there."""
    areas: dict[str, float] = {}
    funcs = []
    for (path, line, name), (_cc, calls, tt, ct, _callers) in stats.items():
        if path == "~":
            area = "wait for device (synchronize, item, copies to host)" if any(
                k in name for k in ("synchronize", "_local_scalar_dense", "'item'", "'tolist'", "'cpu'")) \
                else "C calls (ATen ops, launches)"
            label = name
        else:
            area = next((a for a, key in HOST_AREAS if key in path), "other Python")
            label = f"{path.rsplit('/site-packages/', 1)[-1].rsplit(_REPO, 1)[-1]}:{line}({name})"
        areas[area] = areas.get(area, 0.0) + tt * 1e3 / n
        funcs.append({"name": label, "calls": calls / n, "self_ms": tt * 1e3 / n, "cum_ms": ct * 1e3 / n})
    funcs.sort(key=lambda f: -f["self_ms"])
    return {"free_ms": free_ms, "profiled_ms": profiled_ms, "areas": dict(sorted(areas.items(), key=lambda kv: -kv[1])),
            "top": funcs[:top]}


def top_kernels(prof, device: str, n: int) -> list[dict]:
    """The ``n`` device kernels (CUDA) or ATen ops (CPU, self time) that took longest in
    one profiled forward+backward, with their call counts and share of the total."""
    events = prof.key_averages()
    if device == "cuda":
        kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
        times = {e.key: (e.count, getattr(e, "self_device_time_total", 0.0)) for e in kernels}
    else:
        times = {e.key: (e.count, e.self_cpu_time_total) for e in events if e.key.startswith(("aten::", "disseg::"))}
    total = sum(t for _, t in times.values()) or 1.0
    ranked = sorted(times.items(), key=lambda kv: -kv[1][1])[:n]
    return [{"name": k[:90], "calls": c, "ms": t / 1e3, "share": t / total} for k, (c, t) in ranked] + [
        {"name": "(total)", "calls": sum(c for c, _ in times.values()), "ms": total / 1e3, "share": 1.0}]


def _case_in_subprocess(args_json: str) -> list[dict]:
    """CPU case(s) in a fresh process: its resident set starts clean."""
    cmd = [sys.executable, "-m", "benchmarks.bench_models", "--_case", args_json]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"case {args_json} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _captured(family: str, device: str) -> str:
    with _backend.captured_auto_order():
        return _backend.resolve(family, "auto", device)


def _backends(device: str) -> dict[str, str]:
    out = {}
    for family in FUSED_OPS:
        try:
            out[family] = ",".join(dk.available_backends(family, device)) or "none"
        except KeyError:
            out[family] = "not registered"
    return out


def write_results(rows, header: dict, device: str, quick: bool, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    date = _dt.date.today().isoformat()
    tag = "".join(f"_{t}" for t in header.get("tags", ()))
    stem = f"models_{device}{tag}{'_quick' if quick else ''}_{date}"
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    fields = [k for k in rows[0] if k not in ("profile", "host")] + ["free_step_ms", "machine", "date"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "free_step_ms": r.get("host", {}).get("free_ms", ""), "machine": header["machine"],
                        "date": header["date"]})
    lines = [f"# Med-DisSeg training step: fused vs plain ({device})", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += [
        "",
        "| stage | mode | encoder | batch×size | fwd ms | bwd ms | step ms (min–max) | images/s | "
        "peak fwd+bwd MB | saved for bwd MB |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['stage']} | {r['mode']} | {r['encoder']} | {r['batch']}×{r['size']}² | {r['fwd_ms']:.0f} | "
            f"{r['bwd_ms']:.0f} | {r['step_ms']:.0f} ({r['step_ms_min']:.0f}–{r['step_ms_max']:.0f}) | "
            f"{r['images_per_s']:.2f} | {r['peak_fwd_bwd_mb']:.0f} | {r['saved_for_backward_mb']:.0f} |"
        )
    lines += ["", "## each mode / plain", "", "| stage | mode | step time × | images/s × | peak memory × | saved for bwd × |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    by = {(r["stage"], r["mode"]): r for r in rows}
    for stage in sorted({r["stage"] for r in rows}):
        p = by.get((stage, "plain"))
        for mode in MODES[1:]:
            f = by.get((stage, mode))
            if p and f:
                lines.append(
                    f"| {stage} | {mode} | {f['step_ms'] / p['step_ms']:.2f} | "
                    f"{f['images_per_s'] / p['images_per_s']:.2f} | "
                    f"{f['peak_fwd_bwd_mb'] / max(p['peak_fwd_bwd_mb'], 1e-9):.2f} | "
                    f"{f['saved_for_backward_mb'] / max(p['saved_for_backward_mb'], 1e-9):.2f} |"
                )
    graphs = [(r["stage"], r["mode"]) for r in rows if r["mode"].endswith("_graph") and r["mode"] != "plain_graph"]
    if any(by.get((st, "plain_graph")) for st, _ in graphs):
        lines += ["", "## each captured mode / plain_graph", "", "| stage | mode | step time × | images/s × |",
                  "| --- | --- | ---: | ---: |"]
        for st, mode in graphs:
            p, f = by.get((st, "plain_graph")), by[(st, mode)]
            if p:
                lines.append(f"| {st} | {mode} | {f['step_ms'] / p['step_ms']:.2f} | "
                             f"{f['images_per_s'] / p['images_per_s']:.2f} |")
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += [""] + [f"- stage {r['stage']} {r['mode']}: {r['error']}" for r in failed]
    if any(r["mode"].endswith("_graph") for r in rows):
        lines += ["", "*_graph: one CUDA-graph replay per step (fwd/bwd not separable); peak and saved "
                  "memory are those of an eager forward+backward of the same model"]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU: ResNet-18, batch 2, 64×64)")
    ap.add_argument("--stages", default="1,2", type=comma_list((1, 2), int), help="comma-separated, e.g. 2")
    ap.add_argument("--modes", default="plain,fused", type=comma_list(MODES), help=f"comma-separated among {MODES}")
    ap.add_argument("--compile", action="store_true", help="add the 'compiled' mode (torch.compile of plain)")
    ap.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"),
                    help="torch.compile mode of the compiled modes (reduce-overhead: CUDA graphs)")
    ap.add_argument("--encoder", choices=("resnet18", "resnet34", "resnet50"))
    ap.add_argument("--batch", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--warmup", type=non_negative_int)
    ap.add_argument("--steps", type=positive_int)
    ap.add_argument("--amp", choices=tuple(AMP), default="none", help="autocast dtype (fp16 with GradScaler)")
    ap.add_argument("--channels-last", action="store_true", help="model and input in channels_last")
    ap.add_argument("--malloc", choices=("cache", "system"), default="cache",
                    help="CPU: the timed steps with glibc keeping freed memory (the trainer's default, "
                         "--cpu-malloc cache) or with glibc's defaults; the peak memory is measured before, "
                         "with the system allocator")
    ap.add_argument("--no-isolate", action="store_true", help="CPU: run the cases in this process")
    ap.add_argument("--interleave", action="store_true",
                    help="each stage's modes in one process, their steps alternating (robust to a machine "
                         "whose speed drifts); CPU: no peak memory (run without it for that)")
    ap.add_argument("--out", type=out_folder, default=RESULTS)
    ap.add_argument("--tag", default="", help="appended to the result files' names")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also profile one step per case and write its N most expensive kernels (CUDA) or ops (CPU)")
    ap.add_argument("--host-profile", type=int, default=0, metavar="N",
                    help="also time N free-running steps per case (no sync inside or between them, as a "
                         "training loop runs) and profile N more with cProfile: where the host's time goes "
                         "(our glue, Triton's launcher, torch, C calls, waiting for the device)")
    ap.add_argument("--_case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._case:  # CPU cases in their own process (see _case_in_subprocess)
        spec = json.loads(args._case)
        print(json.dumps(run_group(**spec) if "modes" in spec else [run_case(**spec)]))
        return []

    if args.device == "cuda" and not torch.cuda.is_available():
        require_device(args.device)
    enc, batch, size, warmup, steps = PRESETS[args.device][args.quick]
    enc, batch, size = args.encoder or enc, args.batch or batch, args.size or size
    warmup = warmup if args.warmup is None else args.warmup
    steps = steps if args.steps is None else args.steps
    modes = [m for m in args.modes.split(",") if m]
    if args.compile and "compiled" not in modes:
        modes.append("compiled")
    cuda_only = [m for m in modes if m.startswith(("fused_cuda", "fused_triton")) or m.endswith("_graph")]
    if cuda_only and args.device != "cuda":
        raise SystemExit(f"--modes {','.join(cuda_only)}: needs --device cuda")
    if any(m.startswith("fused_cuda") for m in modes) and "cuda" not in dk.available_backends("gates", "cuda"):
        why = _backend.unavailable_reason("gates", "cuda", torch.device("cuda"))
        for m in [m for m in modes if m.startswith("fused_cuda")]:
            print(f"--modes {m}: skipped, the CUDA kernels cannot run ({why})", flush=True)
            modes.remove(m)
    stages = [int(s) for s in args.stages.split(",") if s]

    header = {
        "machine": machine_name(args.device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load average before": _loadavg(),
        "backends available per family": _backends(args.device),
        "what \"auto\" runs per family (eager; in a captured step)": {
            f: f"{_backend.resolve(f, 'auto', args.device)}; {_captured(f, args.device)}" for f in FUSED_OPS
            if f in _backend.FAMILIES},
        "config": (
            f"{enc}, batch {batch}, {size}×{size}, warmup {warmup}, {steps} timed steps, "
            f"amp {args.amp}, {'channels_last' if args.channels_last else 'contiguous'}, Adam"
            + (f", torch.compile mode {args.compile_mode}" if any(m.endswith("compiled") for m in modes) else "")
            + (f", CPU allocator for the timed steps: {args.malloc} (peak memory: first step, system "
               "allocator)" if args.device == "cpu" else "")
            + (", modes interleaved step by step" if args.interleave else "")
        ),
        "command": "python -m benchmarks.bench_models " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    rows = []
    common = dict(encoder=enc, batch=batch, size=size, warmup=warmup, steps=steps, device=args.device, amp=args.amp,
                  channels_last=args.channels_last, profile=args.profile, compile_mode=args.compile_mode,
                  malloc=args.malloc, host_profile=args.host_profile)
    groups = ([dict(stage=stage, modes=modes, **common) for stage in stages] if args.interleave else
              [dict(stage=stage, mode=mode, **common) for stage in stages for mode in modes])
    for group in groups:
        if args.device == "cpu" and not args.no_isolate:
            new_rows = _case_in_subprocess(json.dumps(group))
        else:
            new_rows = run_group(**group) if "modes" in group else [run_case(**group)]
        for row in new_rows:
            rows.append(row)
            print(
                f"stage {row['stage']} {row['mode']:14s} fwd {row['fwd_ms']:8.0f} ms  bwd {row['bwd_ms']:8.0f} ms  "
                f"step {row['step_ms']:8.0f} ms  {row['images_per_s']:7.2f} img/s  "
                f"peak {row['peak_fwd_bwd_mb']:7.0f} MB  saved {row['saved_for_backward_mb']:7.0f} MB",
                flush=True,
            )
    header["load average after"] = _loadavg()
    header["tags"] = [
        t for t in (args.amp if args.amp != "none" else "", "cl" if args.channels_last else "",
                    "malloc_system" if args.device == "cpu" and args.malloc == "system" else "", args.tag) if t
    ]
    csv_path, md_path = write_results(rows, header, args.device, args.quick, args.out)
    print(f"wrote {csv_path} and {md_path}")
    if args.profile:
        print(f"wrote {write_profile(rows, header, md_path)}")
    if any("host" in r for r in rows):
        print(f"wrote {write_host_profile(rows, header, md_path)}")
    return rows


def write_host_profile(rows, header: dict, md_path: Path) -> Path:
    """Each case's host breakdown (--host-profile), next to the results' markdown."""
    path = md_path.with_name(md_path.stem + "_host.md")
    lines = [f"# Med-DisSeg training step: where the host's time goes ({header['machine']})", ""]
    lines += [f"- {k}: {header[k]}" for k in ("date", "torch", "config", "command")]
    lines += ["- free-running: steps issued back to back as a training loop does (one synchronisation at the "
              "end), wall time per step; profiled: the same under cProfile, which slows Python calls (compare "
              "areas within a case, and cases by their free-running time)", ""]
    for r in rows:
        h = r.get("host")
        if not h:
            continue
        lines += [f"## stage {r['stage']}, {r['mode']}: free-running {h['free_ms']:.1f} ms/step "
                  f"(synchronised timed steps: {r['step_ms']:.1f}), profiled {h['profiled_ms']:.1f}", "",
                  "| area | self ms / step |", "| --- | ---: |"]
        lines += [f"| {a} | {ms:.2f} |" for a, ms in h["areas"].items()]
        lines += ["", "| function | calls / step | self ms | cumulative ms |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| `{f['name'][:100]}` | {f['calls']:.0f} | {f['self_ms']:.2f} | {f['cum_ms']:.2f} |" for f in h["top"]]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def write_profile(rows, header: dict, md_path: Path) -> Path:
    """The profiled step of every case, one table each, next to the results' markdown."""
    path = md_path.with_name(md_path.stem + "_profile.md")
    lines = [f"# Med-DisSeg training step: where the time goes ({header['machine']})", ""]
    lines += [f"- {k}: {header[k]}" for k in ("date", "torch", "config", "command")]
    lines += ["- one forward+backward under torch.profiler after the timed steps; CUDA: device time of each "
              "kernel, CPU: self time of each op", ""]
    for r in rows:
        lines += [f"## stage {r['stage']}, {r['mode']}", "", "| kernel / op | calls | ms | share |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| `{e['name']}` | {e['calls']} | {e['ms']:.2f} | {100 * e['share']:.1f}% |" for e in r["profile"]]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    main()
