"""Benchmark of the attention-calibration ops: fused against eager and torch.compile.

    python -m benchmarks.bench_gates                     # CPU, float32, the model's shapes
    python -m benchmarks.bench_gates --quick             # small shapes, under a minute
    python -m benchmarks.bench_gates --device cuda
    python -m benchmarks.bench_gates --ops cbat,telu --no-compile
    python -m benchmarks.bench_gates --device cuda --ops cbat,elat --sizes 8x64x128x128,elat:8x64x256x256

Cases: ChannelAttention, SpatialAttention, CBAM, the CBAT gate chain (ca → sa → cbam),
ELAT, TeLU and the multi-scale concat, on the shapes the model runs at batch 8 and a
256×256 input (C = 64…1024, H = W = 16…128; ELAT at 64 channels and full resolution).
For each: forward, backward and forward+backward time (median of repeats, synchronised;
``triton.testing.do_bench`` on CUDA), peak extra memory of a forward+backward (CUDA:
``max_memory_allocated``; CPU: the larger of malloc's sampled bytes in use and the
resident-set high-water mark; benchmarks/_memory.py) and the bytes autograd saves for
backward (unique storages seen by ``saved_tensors_hooks``, weights excluded) as a
multiple of the input's size. "eager" is the module with ``fused=False`` (for TeLU the
authors' formula ``telu_eager``, one elementwise pass fewer than the module's finite-gradient
``telu_reference``); "compile" is ``torch.compile`` of it (inductor, static shapes, dynamo
reset per case).

On CUDA, times are CUDA-event medians with L2 flushed before each repeat, the backward
timed on a fresh forward each repeat (``retain_graph`` breaks compiled backwards), and two
more columns separate the device from the host: ``gpu_ms`` is the summed kernel time of
one forward+backward (torch.profiler) and ``floor_ms`` the time the op's minimum bytes
(``MIN_MAPS`` full maps, docs/gates_gpu.md) take at the measured copy bandwidth. A
fwd+bwd whose ``gpu_ms`` is far below its wall time is bound by host-side launches;
``--graphs`` adds fused and eager captured as CUDA graphs (no host work per call).

On CUDA, when the extension was built with its CUDA kernels, a ``fused_cuda`` row (and
``fused_cuda_graph`` with ``--graphs``) times backend="cuda" (csrc/*.cu) next to ``fused``,
which on CUDA is backend="triton" (named, since "auto" puts the CUDA kernels of TeLU, the
gates and the multi-scale concat first in eager code and the Triton ones first in captured
code: disseg_kernels._backend); on the CPU ``fused`` is "auto" (the C++ kernels).

Writes benchmarks/results/gates_<device>_<date>.csv and .md; ``main(argv)`` is importable.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
from pathlib import Path

import torch

import disseg_kernels as dk
from disseg_kernels.reference.telu import telu_eager
from benchmarks._args import comma_list, out_folder, positive_int, require_device
from benchmarks._memory import PeakMemory
from benchmarks.bench_dispersive import machine_name, wall_times_ms

RESULTS = Path(__file__).resolve().parent / "results"
STAT = {"value": "median"}


_FLUSH: dict[str, torch.Tensor] = {}


def _cuda_ms(fn, repeats, setup=None):
    """Median ms between CUDA events around fn; setup (untimed) and an L2 flush first."""
    import statistics

    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")  # 256 MB > L2
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        _FLUSH["buf"].zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return min(times) if STAT["value"] == "min" else statistics.median(times)


def _kernel_ms(fn, iters=3, per_kernel=None):
    """Summed device time (ms) of the kernels, memsets and copies of one fn() call;
    ``per_kernel`` (a dict), when given, receives name -> [ms, launches] per call."""
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
            torch.cuda.synchronize()
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        if per_kernel is not None:
            for e in events:
                entry = per_kernel.setdefault(e.name, [0.0, 0.0])
                entry[0] += e.time_range.elapsed_us() / 1e3 / iters
                entry[1] += 1 / iters
        return sum(e.time_range.elapsed_us() for e in events) / 1e3 / iters
    except Exception as exc:  # noqa: BLE001 - a profiler problem must not stop the timings
        print(f"  (kernel time unavailable: {type(exc).__name__}: {exc})")
        return float("nan")


_COPY: dict[str, float] = {}


def copy_bandwidth_gbps(device) -> float:
    """Device-to-device copy rate of a 1 GiB buffer, GB/s (read + write bytes)."""
    if device != "cuda":
        return float("nan")
    if "gbps" not in _COPY:
        a = torch.empty(2**28, dtype=torch.float32, device="cuda")
        b = torch.empty_like(a)
        for _ in range(3):
            b.copy_(a)
        ms = _cuda_ms(lambda: b.copy_(a), 10)
        _COPY["gbps"] = 2 * a.numel() * 4 / (ms * 1e-3) / 1e9
        del a, b
    return _COPY["gbps"]


# Minimum traffic of forward+backward in full maps of the input (docs/gates_gpu.md): the
# reads and writes the spec counts, given that each gate's statistic depends on the gates
# before it. TeLU: x→y, (x, grad)→dx. A gate op: one read per statistic, a read and a write
# to apply; backward one read of (x, grad), one read of x per statistic taken under an
# earlier gate, a read of grad and a write of dx. ELAT: its pool and 7×7 logit share one
# read; backward adds one read of x for the stencil's weight gradient.
MIN_MAPS = {"telu": 5, "ca": 7, "sa": 7, "cbam": 9, "cbat": 13, "elat": 8, "multiscale": 4}


def _median_ms(fn, device, repeats, setup=None):
    """Median (or, with --stat min, minimum) time in ms: CUDA events on the GPU, wall
    time on the CPU. The minimum is the better estimate on a shared CPU where other jobs
    preempt the run."""
    if device == "cuda":
        return _cuda_ms(fn, repeats, setup)
    import statistics

    times = wall_times_ms(fn, device, repeats, setup)
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
    ("upsample", 8, 64, 128, 128), ("upsample", 8, 128, 64, 64), ("upsample", 8, 256, 32, 32),
]
QUICK = [
    ("ca", 2, 64, 64, 64), ("sa", 2, 64, 64, 64), ("cbam", 2, 64, 64, 64),
    ("cbat", 2, 64, 64, 64), ("cbat", 2, 512, 16, 16), ("elat", 2, 64, 64, 64),
    ("telu", 2, 64, 128, 128), ("multiscale", 2, 64, 64, 64), ("upsample", 2, 64, 64, 64),
]
MODULES = {
    "ca": lambda c, fused, backend="auto": dk.ChannelAttention(c, fused=fused, backend=backend),
    "sa": lambda c, fused, backend="auto": dk.SpatialAttention(fused=fused, backend=backend),
    "cbam": lambda c, fused, backend="auto": dk.CBAM(c, fused=fused, backend=backend),
    "cbat": lambda c, fused, backend="auto": dk.CBATGates(c, fused=fused, backend=backend),
    "elat": lambda c, fused, backend="auto": dk.ELAT(c, fused=fused, backend=backend),
    "telu": lambda c, fused, backend="auto": dk.TeLU(fused=fused, backend=backend) if fused else _EagerTeLU(),
}


class _EagerTeLU(torch.nn.Module):
    """The authors' TeLU (``reference.telu.telu_eager``): the eager baseline."""

    def forward(self, x):
        return telu_eager(x)
OPS = tuple(sorted(MODULES)) + ("multiscale", "upsample")  # what --ops and --sizes may name


def _family(op):
    return {"telu": "telu", "multiscale": "multiscale", "upsample": "multiscale"}.get(op, "gates")


def cuda_backend_available(op) -> bool:
    """Whether the CUDA kernels of csrc/<family>.cu can run op here (built, and a GPU)."""
    from disseg_kernels import _backend

    return torch.cuda.is_available() and _backend.unavailable_reason(_family(op), "cuda", torch.device("cuda")) is None


def _make_case(op, b, c, h, w, device, dtype, fused, backend="auto", channels_last=False):
    """(fn, inputs): fn(*inputs) → output; inputs require grad. ``backend`` picks the fused
    path ("auto", "triton", "cuda": the kernels of csrc/*.cu). With
    ``channels_last`` the inputs (and a module's weights) are NHWC."""
    fn, inputs = _make_case_contiguous(op, b, c, h, w, device, dtype, fused, backend)
    if channels_last:
        inputs = [t.detach().to(memory_format=torch.channels_last).requires_grad_() for t in inputs]
        if isinstance(fn, torch.nn.Module):
            fn = fn.to(memory_format=torch.channels_last)
    return fn, inputs


def _randn(*shape, device, dtype):
    """Inputs drawn by the CPU generator: a failed CUDA graph capture can leave the CUDA one
    unusable ("Offset increment outside graph capture")."""
    return torch.randn(*shape, dtype=torch.float32).to(device=device, dtype=dtype)


def _make_case_contiguous(op, b, c, h, w, device, dtype, fused, backend):
    if op == "multiscale":
        # The output block's 1×, 2×, 4× fusion: c/4 + c/4 + c/2 channels to c.
        xs = [
            _randn(b, c // 4, h, w, device=device, dtype=dtype),
            _randn(b, c // 4, h // 2, w // 2, device=device, dtype=dtype),
            _randn(b, c // 2, h // 4, w // 4, device=device, dtype=dtype),
        ]
        xs = [t.requires_grad_() for t in xs]
        backend = backend if fused else "reference"
        return (lambda *ts: dk.multiscale_concat(list(ts), [1, 2, 4], backend=backend)), xs
    if op == "upsample":
        # A ×2 bilinear upsample to (h, w) (align_corners=True), as the fused model runs every
        # standalone one: multiscale_concat of one input, against F.interpolate.
        x = _randn(b, c, h // 2, w // 2, device=device, dtype=dtype).requires_grad_()
        if fused:
            return (lambda t: dk.multiscale_concat([t], [2], backend=backend)), [x]
        return (lambda t: torch.nn.functional.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)), [x]
    module = MODULES[op](c, fused, backend).to(device=device, dtype=dtype)
    x = _randn(b, c, h, w, device=device, dtype=dtype).requires_grad_()
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


def measure(fn, inputs, device, repeats, per_kernel=None) -> dict:
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

    t_bwd = _median_ms(lambda: holder["y"].backward(go), device, repeats, setup=make)
    holder.clear()
    t_both = _median_ms(fwd_bwd, device, repeats)
    gpu_ms = _kernel_ms(fwd_bwd, per_kernel=per_kernel) if device == "cuda" else float("nan")
    peak = 0
    for _ in range(1 if device == "cuda" else 2):  # CPU: keep the larger of two (benchmarks/_memory.py)
        with PeakMemory(device) as mem:
            fwd_bwd()
        peak = max(peak, mem.extra)
    for t in inputs:
        t.grad = None
    return {"fwd_ms": t_fwd, "bwd_ms": t_bwd, "fwdbwd_ms": t_both, "gpu_ms": gpu_ms, "peak_mb": peak / 2**20}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (batch 2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--ops", default="", type=comma_list(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--sizes", default="", type=comma_list(item=_size_item),
                   help="comma-separated BxCxHxW shapes instead of the built-in list, for every op of --ops; "
                        "op:BxCxHxW pins a shape to one op (e.g. 8x64x128x128,elat:8x64x256x256)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timing repeats (default 5 CPU / 20 CUDA)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    p.add_argument("--compile-check", action="store_true",
                   help="only compile the Triton kernel variants the fused modules launch, for sm_90 (no GPU needed; "
                        "--quick: float32 and fewer shapes)")
    p.add_argument("--count-launches", action="store_true",
                   help="only count the device operations of one fused fwd+bwd per case (Triton path, no GPU needed)")
    p.add_argument("--graphs", action="store_true",
                   help="CUDA: also time fused and eager captured as CUDA graphs (torch.cuda.make_graphed_callables)")
    p.add_argument("--channels-last", action="store_true", help="NHWC inputs (and module weights)")
    p.add_argument("--kernels", action="store_true",
                   help="CUDA: print each fused variant's kernels (device ms and launches per fwd+bwd, and the "
                        "share of the floor each would be at copy bandwidth) and write them to gates_kernels_*.md")
    p.add_argument("--tag", default="", help="appended to the result files' names")
    p.add_argument("--stat", default="median", choices=["median", "min"], help="CPU timing statistic")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--out", type=out_folder, default=RESULTS)
    return p


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        b, c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes: expected BxCxHxW, got {text!r}") from None
    return b, c, h, w


def _size_item(text: str) -> tuple[int, int, int, int]:
    """One item of --sizes: BxCxHxW, or op:BxCxHxW for one op."""
    op, _, shape = text.rpartition(":")
    if op and op not in OPS:
        raise ValueError(f"unknown op {op!r} (one of {', '.join(OPS)})")
    return _parse_shape(shape)


def select_cases(args) -> list[tuple]:
    """(op, B, C, H, W) from --quick / --ops / --sizes (both checked by the parser)."""
    ops = [o for o in args.ops.split(",") if o] if args.ops else []
    if not args.sizes:
        cases = QUICK if args.quick else FULL
        return [c for c in cases if not ops or c[0] in ops]
    cases = []
    for item in args.sizes.split(","):
        if ":" in item:
            op, shape = item.split(":", 1)
            if ops and op not in ops:
                continue
            cases.append((op, *_parse_shape(shape)))
        else:
            cases += [(op, *_parse_shape(item)) for op in (ops or sorted(MODULES))]
    return cases


def min_bytes(op, inputs) -> int:
    """The minimum bytes a forward+backward moves (MIN_MAPS; multiscale: inputs and output,
    twice; upsample: the input and the 4× output, twice)."""
    in_bytes = sum(t.numel() * t.element_size() for t in inputs)
    if op == "upsample":
        return 2 * 5 * in_bytes
    if op == "multiscale":
        b, _, h, w = inputs[0].shape
        out_bytes = b * sum(t.shape[1] for t in inputs) * h * w * inputs[0].element_size()
        return 2 * (in_bytes + out_bytes)
    return MIN_MAPS[op] * in_bytes


def _autotune_off() -> None:
    """No triton.autotune from here on: stubbed or ahead-of-time-compiled kernels cannot be
    timed. The setting is read once, when disseg_kernels.triton is imported (set both)."""
    from disseg_kernels.triton import _settings

    os.environ["DISSEG_TRITON_AUTOTUNE"] = "0"
    _settings.AUTOTUNE = False


def count_launches(op, b, c, h, w, sms=132) -> dict:
    """Device operations one fused fwd and bwd issue on the Triton path, counted on the CPU:
    the Triton kernels are replaced by counting stubs (index outputs zeroed, the rest left
    unwritten) and every non-view ATen op inside ``disseg::gates_fwd`` / ``gates_bwd`` is
    counted under a TorchDispatchMode; reductions split as on a GPU with ``sms`` SMs.
    Changes the Triton module in place: run it in a process of its own (--count-launches)."""
    import collections

    import triton
    from torch.utils._python_dispatch import TorchDispatchMode

    from disseg_kernels.ops import gates as og
    from disseg_kernels.triton import gates as tg

    count = collections.Counter()
    state = {"stub": False}

    class _Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                count["triton"] += 1
                state["stub"] = True
                for t in args:
                    if isinstance(t, torch.Tensor) and t.dtype == torch.long:
                        t.zero_()
                state["stub"] = False

            return launch

    kernels = getattr(tg, "_bench_kernel_names", None)
    if kernels is None:
        kernels = [n for n in dir(tg) if n.endswith("_kernel") and isinstance(getattr(tg, n), triton.runtime.jit.JITFunction)]
        tg._bench_kernel_names = kernels
    for name in kernels:  # fresh stubs per call: each counts into this call's counter
        setattr(tg, name, _Stub(name))
    tg.FORCE_TARGET_PROGRAMS = getattr(tg, "PROGRAMS_PER_SM", 4) * sms  # (absent before the split kernels)
    _autotune_off()  # the stubs cannot be autotuned
    from benchmarks.bench_host_overhead import NO_LAUNCH as no_launch

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not state["stub"] and func.overloadpacket.__name__ not in no_launch:
                count["aten"] += 1
            return out

    module = MODULES[op](c, True)
    params = [p.detach() for p in module._params()]
    x, go = torch.empty(b, c, h, w), torch.empty(b, c, h, w)
    with _Mode():
        _, saved = og._gates_forward(x, params, op, "triton")
    fwd = dict(count)
    count.clear()
    with _Mode():
        og._gates_backward_grads(go, x, params, saved, op, "triton")
    return {"fwd_triton": fwd.get("triton", 0), "fwd_aten": fwd.get("aten", 0),
            "bwd_triton": count.get("triton", 0), "bwd_aten": count.get("aten", 0)}


def compile_check(quick: bool) -> int:
    """Compile every Triton kernel variant the fused CBAT chain and ELAT launch for sm_90
    (Triton's ahead-of-time compiler with its bundled ptxas: no GPU needed). The kernels
    are replaced by stubs that record each launch's signature; the modules run on empty
    tensors. Needs a process without TRITON_INTERPRET. Returns the number of failures."""
    import time

    import triton

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("--compile-check: unset TRITON_INTERPRET (the interpreter has no compiler)")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        print(f"SKIP: no Triton ahead-of-time compiler ({exc})")
        return 0
    from disseg_kernels.ops import gates as og
    from disseg_kernels.triton import gates as tg

    types = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32", torch.int64: "*i64"}
    variants = {}

    class _Stub:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                sig, consts = {}, {}
                for name, v in zip(self.fn.arg_names, args):
                    if isinstance(v, torch.Tensor):
                        sig[name] = types[v.dtype]
                        if not v.dtype.is_floating_point:
                            v.zero_()  # indices stay in range for the next stage
                    elif isinstance(v, int) and not isinstance(v, bool) and v != 1:
                        sig[name] = "i64" if abs(v) >= 2**31 else "i32"
                    elif isinstance(v, float):
                        sig[name] = "fp32"
                    else:  # flags, and ints equal to 1 (Triton specialises those)
                        sig[name], consts[name] = "constexpr", v
                for name, v in kwargs.items():
                    if name not in ("num_warps", "num_stages"):
                        sig[name], consts[name] = "constexpr", v
                key = (self.fn.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(consts.items())))
                variants[key] = (self.fn, sig, consts)

            return launch

    _autotune_off()
    for name in dir(tg):
        if name.endswith("_kernel") and isinstance(getattr(tg, name), triton.runtime.jit.JITFunction):
            setattr(tg, name, _Stub(getattr(tg, name)))
    tg.FORCE_TARGET_PROGRAMS = tg.PROGRAMS_PER_SM * 132
    dtypes = (torch.float32,) if quick else (torch.float32, torch.bfloat16, torch.float16)
    cases = (("cbat", 64, 32), ("elat", 64, 32)) if quick else (("cbat", 64, 32), ("cbat", 1024, 16), ("elat", 64, 64))
    for dtype in dtypes:
        for cl in (False, True):
            for program, c, hw in cases:
                module = MODULES[program](c, True)
                x = torch.empty(8, c, hw, hw, dtype=dtype)
                if cl:
                    x = x.to(memory_format=torch.channels_last)
                params = [p.detach().to(dtype) for p in module._params()]
                _, saved = og._gates_forward(x, params, program, "triton")
                og._gates_backward_grads(torch.empty_like(x), x, params, saved, program, "triton")
    failures = 0
    t0 = time.time()
    for (kname, _, consts), (fn, sig, cdict) in variants.items():
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cdict), target=GPUTarget("cuda", 90, 32))
        except Exception as exc:  # noqa: BLE001 - report them all
            failures += 1
            print(f"FAIL {kname} {dict(consts)}: {type(exc).__name__}: {str(exc)[:1500]}", flush=True)
    print(f"{len(variants)} kernel variants compiled for sm_90 in {time.time() - t0:.0f} s; failures: {failures}")
    return failures


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        require_device(args.device)
    dtype = getattr(torch, args.dtype)
    STAT["value"] = args.stat
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (20 if device == "cuda" else 5)
    if args.compile_check:
        if compile_check(args.quick):
            raise SystemExit(1)
        return []
    cases = select_cases(args)
    if args.count_launches:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise SystemExit("--count-launches: unset TRITON_INTERPRET (it counts stubs of the compiled-mode "
                             "kernels; under the interpreter it would run them)")
        for op, b, c, h, w in cases:
            if op not in ("ca", "sa", "cbam", "cbat", "elat"):
                continue
            n = count_launches(op, b, c, h, w)
            print(f"{op:5s} {b}x{c}x{h}x{w}: fwd {n['fwd_triton']} Triton + {n['fwd_aten']} ATen, "
                  f"bwd {n['bwd_triton']} Triton + {n['bwd_aten']} ATen, "
                  f"total {sum(n.values())}", flush=True)
        return []
    machine = machine_name(device)
    copy_gbps = copy_bandwidth_gbps(device)
    if device == "cuda":
        print(f"copy bandwidth: {copy_gbps:.0f} GB/s", flush=True)
    date = _dt.date.today().isoformat()
    rows, kernel_rows = [], []

    def run_variant(op, b, c, h, w, name, fused):
        backend = "cuda" if name.startswith("fused_cuda") else "triton" if device == "cuda" and fused else "auto"
        fn, inputs = _make_case(op, b, c, h, w, device, dtype, fused, backend, channels_last=args.channels_last)
        in_bytes = sum(t.numel() * t.element_size() for t in inputs)
        sb = saved_bytes(fn, inputs)
        if name == "compile":
            torch._dynamo.reset()  # one static graph per case, never the recompile limit
            fn = torch.compile(fn, dynamic=False)
        try:
            if name.endswith("_graph"):
                # Forward and backward captured as CUDA graphs: no host work per call,
                # what a training step with static shapes can reach (reduce-overhead).
                fn = torch.cuda.make_graphed_callables(fn, tuple(inputs), num_warmup_iters=3)
            per_kernel = {} if args.kernels and fused and device == "cuda" else None
            r = measure(fn, inputs, device, repeats, per_kernel)
            if per_kernel:
                kernel_rows.extend(_kernel_table(op, f"{b}x{c}x{h}x{w}", name, per_kernel, min_bytes(op, inputs),
                                                 copy_gbps))
        except Exception as exc:  # noqa: BLE001 - report, keep going
            r = {"fwd_ms": float("nan"), "bwd_ms": float("nan"), "fwdbwd_ms": float("nan"), "gpu_ms": float("nan"),
                 "peak_mb": float("nan"), "error": f"{type(exc).__name__}: {exc}"[:200]}
        floor_ms = min_bytes(op, inputs) / (copy_gbps * 1e9) * 1e3
        r.update(op=op, shape=f"{b}x{c}x{h}x{w}", variant=name, saved_x=sb / in_bytes if name != "compile" else float("nan"),
                 floor_ms=floor_ms, gpu_over_floor=r.get("gpu_ms", float("nan")) / floor_ms, copy_gbps=copy_gbps,
                 device=device, dtype=args.dtype, machine=machine, date=date)
        del fn, inputs
        rows.append(r)
        return r

    def report(op, b, c, h, w, res, names):
        for n in names:
            r = res[n]
            r["speedup_vs_eager"] = res["eager"]["fwdbwd_ms"] / r["fwdbwd_ms"]
            line = (f"{op:5s} {b}x{c}x{h}x{w:<4d} {n:10s} fwd {r['fwd_ms']:7.3f} bwd {r['bwd_ms']:7.3f} fwd+bwd {r['fwdbwd_ms']:7.3f} ms"
                    f" ({r['speedup_vs_eager']:5.2f}x eager) saved {r['saved_x']:.2f}x in, peak {r['peak_mb']:.0f} MB")
            if device == "cuda":
                line += f" | kernels {r['gpu_ms']:.3f} ms = {r['gpu_over_floor']:.2f}x floor {r['floor_ms']:.3f} ms"
            if r.get("error"):
                line += f" | {r['error']}"
            print(line, flush=True)

    # The eager reference captured as a graph comes after every other measurement: on the
    # H200 (2026-11-27, twice) the capture of eager CBAT failed and left the CUDA generator
    # unusable ("Offset increment outside graph capture") for every case after it.
    deferred = []
    for op, b, c, h, w in cases:
        torch.manual_seed(0)
        variants = [("fused", True), ("eager", False)] + ([] if args.no_compile else [("compile", False)])
        # The CUDA kernels of csrc/*.cu next to "fused" (on CUDA: the Triton kernels).
        with_cuda = device == "cuda" and cuda_backend_available(op)
        if with_cuda:
            variants.insert(1, ("fused_cuda", True))
        graphs = args.graphs and device == "cuda" and op not in ("multiscale", "upsample")
        if graphs:
            variants += [("fused_graph", True)] + ([("fused_cuda_graph", True)] if with_cuda else [])
        res = {name: run_variant(op, b, c, h, w, name, fused) for name, fused in variants}
        report(op, b, c, h, w, res, list(res))
        if graphs:
            deferred.append((op, b, c, h, w, res))
        _write(rows, args, device, date, machine, quiet=True)  # a stage timeout keeps the finished cases
        if kernel_rows:
            _write_kernels(kernel_rows, args, device, date, machine)
    for op, b, c, h, w, res in deferred:
        torch.manual_seed(0)
        res["eager_graph"] = run_variant(op, b, c, h, w, "eager_graph", False)
        report(op, b, c, h, w, res, ["eager_graph"])
        _write(rows, args, device, date, machine, quiet=True)
    _write(rows, args, device, date, machine)
    return rows


def _kernel_table(op, shape, variant, per_kernel, floor_bytes, copy_gbps) -> list[dict]:
    """Rows of one case's kernels, the slowest first, printed as they come. ``x floor``:
    the kernel's time over the time the whole op's minimum bytes take at copy bandwidth
    (a map pass, 2 of the chain's 13 maps, is ideally ~0.15 of it)."""
    floor_ms = floor_bytes / (copy_gbps * 1e9) * 1e3
    out = []
    for name, (ms, launches) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0]):
        out.append(dict(op=op, shape=shape, variant=variant, kernel=name, ms=ms, launches=launches,
                        x_floor=ms / floor_ms))
        print(f"    {variant:10s} {ms:8.4f} ms  {launches:4.0f}x  {ms / floor_ms:5.2f} of floor  {name[:90]}", flush=True)
    return out


def _write_kernels(rows, args, device, date, machine) -> None:
    out = Path(args.out)
    stem = f"gates_kernels_{device}_{date}" + ("" if args.dtype == "float32" else f"_{args.dtype}") + (
        "_cl" if args.channels_last else "") + (f"_{args.tag}" if args.tag else "")
    lines = [f"# Kernels of the fused attention-calibration ops, {device}, {args.dtype}", "",
             f"Machine: {machine}. Date: {date}. `python -m benchmarks.bench_gates --kernels` (see the gates_* table of "
             "the same run for the command). Device ms and launches per forward+backward (torch.profiler, 3 calls); "
             "x floor: the kernel's time over the op's whole minimum-bytes time at the measured copy bandwidth.", "",
             "| op | shape | variant | kernel | ms | launches | x floor |", "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['op']} | {r['shape']} | {r['variant']} | `{r['kernel'][:80]}` | {r['ms']:.4f} | {r['launches']:.0f} | "
              f"{r['x_floor']:.2f} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")


def _write(rows, args, device, date, machine, quiet=False):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (f"gates_{device}_{date}" + ("_quick" if args.quick else "") + ("" if args.dtype == "float32" else f"_{args.dtype}")
            + ("_cl" if args.channels_last else "") + (f"_{args.tag}" if args.tag else ""))
    keys = ["op", "shape", "variant", "fwd_ms", "bwd_ms", "fwdbwd_ms", "speedup_vs_eager", "gpu_ms", "floor_ms",
            "gpu_over_floor", "copy_gbps", "peak_mb", "saved_x", "device", "dtype", "machine", "date", "error"]
    with open(out / f"{stem}.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow(r)
    lines = [
        f"# Attention-calibration ops, {device}, {args.dtype}" + (", channels_last" if args.channels_last else ""),
        "",
        f"Machine: {machine}. Date: {date}. Command: `python -m benchmarks.bench_gates"
        + (" --quick" if args.quick else "") + f" --device {device}" + (f" --dtype {args.dtype}" if args.dtype != "float32" else "")
        + (" --channels-last" if args.channels_last else "") + (f" --tag {args.tag}" if args.tag else "")
        + (" --no-compile" if args.no_compile else "") + (" --graphs" if args.graphs else "") + (f" --ops {args.ops}" if args.ops else "")
        + (f" --stat {args.stat}" if args.stat != "median" else "") + (f" --threads {args.threads}" if args.threads else "")
        + (f" --repeats {args.repeats}" if args.repeats else "") + (f" --sizes {args.sizes}" if args.sizes else "") + "`.",
        "",
        f"Times are {args.stat}s (ms) over {args.repeats or 'default'} repeats, {torch.get_num_threads()} threads; speedup is eager fwd+bwd / this fwd+bwd; saved = bytes autograd keeps for "
        "backward (weights excluded) / input bytes; peak = extra memory of one fwd+bwd.",
        "",
        "| op | shape | variant | fwd ms | bwd ms | fwd+bwd ms | speedup vs eager | kernel ms | floor ms | kernel / floor | peak MB | saved / input |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    if device == "cuda" and rows:
        lines[-3:-3] = [f"Kernel ms: summed device time of one fwd+bwd (torch.profiler); floor: the minimum bytes "
                        f"(benchmarks/bench_gates.py MIN_MAPS) at the measured copy bandwidth {rows[0]['copy_gbps']:.0f} GB/s.", ""]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['variant']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | {r['fwdbwd_ms']:.3f} | "
            f"{r['speedup_vs_eager']:.2f} | {r['gpu_ms']:.3f} | {r['floor_ms']:.3f} | {r['gpu_over_floor']:.2f} | "
            f"{r['peak_mb']:.0f} | {r['saved_x']:.2f} |" + (f" {r['error']}" if r.get("error") else "")
        )
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print(f"wrote {out / stem}.csv and .md")


if __name__ == "__main__":
    main()
