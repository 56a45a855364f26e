"""Host cost per call of every fused op: the Python and dispatch work that issues it.

At the model's shapes on a GPU most of the attention ops move a few MB, a few µs of device
time at several TB/s, while the Python that issues a custom op, its glue and its launches
costs tens to hundreds of µs. Until the device queue fills, that host time *is* the op's
time. This script measures it on tiny tensors, where the kernels themselves cost nothing:

    python -m benchmarks.bench_host_overhead               # CPU: Triton launches stubbed
    python -m benchmarks.bench_host_overhead --device cuda # GPU: real launches, tiny tensors

CPU (no GPU needed): the Triton path runs under ``TRITON_INTERPRET=1`` with every kernel
launch replaced by a counting stub, so what is timed is exactly our Python glue, the
custom-op/autograd machinery and the torch ops around the launches (a real GPU launch
adds its own issue cost per launch on top: see the ``launches`` column). With
``--triton-launcher jit`` the kernels are compiled-mode ``JITFunction``s instead, launched
through Triton's own ``kernel[grid](...)`` path (binder, specialization, cache key, global
check, launch metadata) against a stand-in sm_90 driver whose compiled kernel's ``run``
only counts: the time then includes Triton's launcher up to the driver call, everything
but the CUDA driver's own launch cost. The C++ path
runs its real kernels on tiny tensors. "eager" is the plain-PyTorch formula of the
spec (``fused=False`` / the reference), which is what the fused op replaces.

CUDA: real launches on tiny tensors; a call's time is the wall time of issuing
``--calls`` calls plus one final synchronisation, divided by the calls (host-bound by
construction: the device finishes each tiny kernel before the next is issued).

Columns: host µs of a forward under ``no_grad`` and of forward+backward (the backward of
a fixed output gradient, parameters' gradients accumulated as in training), the fastest
of ``--rounds`` rounds; the device operations one forward and one forward+backward issue
(Triton launches plus every non-view ATen/C++ op, counted from the profiler's op tree
on the CPU path); and the fused path's fwd+bwd host time over eager's. Writes
benchmarks/results/host_overhead_<device>_<date>.csv and .md.
"""

from __future__ import annotations

import argparse
import contextlib
import collections
import datetime as _dt
import os
import sys
import time
from pathlib import Path

from benchmarks._args import comma_list, out_folder, positive_int

RESULTS = Path(__file__).resolve().parent / "results"

# ATen ops that launch nothing on a device (views, allocations, metadata).
NO_LAUNCH = {
    "view", "_unsafe_view", "expand", "squeeze", "unsqueeze", "t", "transpose", "permute", "detach", "alias",
    "slice", "select", "as_strided", "reshape", "_reshape_alias", "split", "unbind", "flatten", "unflatten",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "sym_size",
    "sym_stride", "is_same_size", "contiguous", "to",
}  # contiguous / to / reshape copy only sometimes: their children (clone, _to_copy) count then
OPS = ("telu", "ca", "sa", "cbam", "elat", "cbat", "multiscale", "window_attention", "cdfa", "dispersive", "stage2")
FAMILY = {"ca": "gates", "sa": "gates", "cbam": "gates", "elat": "gates", "cbat": "gates", "cdfa": "window_attention",
          "stage2": "gates"}
FIELDS = ["op", "path", "fwd_us", "fwd_bwd_us", "fwd_ops", "fwd_bwd_ops", "launches_fwd", "launches_fwd_bwd", "host_time_over_eager",
          "launcher_us_fwd_bwd"]
_JIT_STAND_IN = False  # set by _jit_launcher_stand_in()

_LAUNCHES = collections.Counter()


def _counting_run(self, *args, **kwargs):
    """Stands in for ``InterpretedFunction.run``: counts the launch, computes nothing."""
    _LAUNCHES["triton"] += 1


def _stub_triton_launches() -> None:
    """Replace every interpreted Triton launch by a counter (TRITON_INTERPRET=1 only)."""
    import triton.runtime.interpreter as interp

    interp.InterpretedFunction.run = _counting_run


class _CountingCompiledKernel:
    """Stands in for a ``CompiledKernel`` under ``--triton-launcher jit``: what Triton's
    ``JITFunction.run`` reads of it, and a ``run`` that counts the launch."""

    function = 0
    packed_metadata = None

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        _LAUNCHES["triton"] += 1


class _StandInDriver:
    """The sm_90 CUDA driver, as far as ``JITFunction.run`` asks it (device 0, stream 0)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


def _jit_launcher_stand_in() -> None:
    """``--triton-launcher jit``: compiled-mode kernels launched through Triton's own
    ``JITFunction.run`` against ``_StandInDriver``; "compiling" a specialization stores a
    ``_CountingCompiledKernel`` where Triton caches its compiled kernels. Must run before
    our Triton modules are imported (TRITON_INTERPRET unset). Written against Triton 3.9's
    internals; another version that lacks them is refused with the reason."""
    import inspect

    import triton
    import triton.runtime.jit as jit
    from triton.runtime import driver

    from disseg_kernels import _backend

    missing = [name for name, ok in (("triton.runtime.driver.set_active", hasattr(driver, "set_active")),
                                     ("JITFunction._do_compile", hasattr(jit.JITFunction, "_do_compile")),
                                     ("JITFunction.device_caches",
                                      "self.device_caches" in inspect.getsource(jit.JITFunction.__init__)))
               if not ok]
    if missing:
        raise SystemExit(f"--triton-launcher jit: Triton {triton.__version__} lacks {', '.join(missing)} "
                         "(written against Triton 3.9); use --triton-launcher stub")

    def stand_in_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = _CountingCompiledKernel()
        self.device_caches[device][0][key] = kernel  # (kernel_cache, key_cache, target, backend, binder)
        return kernel

    global _JIT_STAND_IN
    _JIT_STAND_IN = True
    driver.set_active(_StandInDriver())
    jit.JITFunction._do_compile = stand_in_compile
    from disseg_kernels.triton import _settings

    # CPU tensors may take the Triton path; the wrappers then pick their interpreter-sized
    # configurations (the same launches, other block sizes and grids)
    _backend.triton_interpret = lambda: True
    _settings.INTERPRET = True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--ops", default=",".join(OPS), type=comma_list(OPS), help=f"comma-separated among {OPS}")
    p.add_argument("--calls", type=positive_int, default=200, help="calls per timed round")
    p.add_argument("--rounds", type=positive_int, default=7)
    p.add_argument("--out", type=out_folder, default=RESULTS)
    p.add_argument("--tag", default="", help="appended to the result files' names")
    p.add_argument("--eager-custom-ops", action="store_true",
                   help="call the fused ops through their torch.library custom ops in eager mode too "
                        "(DISSEG_EAGER_CUSTOM_OPS=1; the default is one autograd.Function per call)")
    p.add_argument("--launch-cost", action="store_true",
                   help="CUDA: the host cost of one launch, issued each way our ops can issue it (Triton's "
                        "kernel[grid](...), the same compiled kernel called directly, an ATen op, our C++ op, "
                        "the fused telu() on each backend); writes launch_cost_cuda_<date>.md")
    p.add_argument("--triton-launcher", choices=("stub", "jit"), default="stub",
                   help="CPU: how the Triton path's launches are stood in for. stub: interpreted kernels, each "
                        "launch a counter (our Python only); jit: compiled-mode kernels through Triton's own "
                        "launcher, against a stand-in driver (adds Triton's host cost up to the driver call)")
    return p


def launch_costs(calls: int, rounds: int) -> list[dict]:
    """Host µs per launch of the TeLU forward on a 1,024-element tensor (the device work is
    ~2 µs, so back-to-back launches are host-bound), each way it can be issued. "direct":
    the ``CompiledKernel`` that ``kernel[grid](...)`` returns, called as Triton >= 3.3's own
    ``JITFunction.run`` calls it, skipping the binder, the cache key and the checks: what a
    lean launcher of our own would cost (docs/gates_gpu.md). A way that fails on this
    Triton is reported in its row, not raised."""
    import torch
    import triton

    import disseg_kernels as dk
    from disseg_kernels import _backend
    from disseg_kernels.triton.telu import _BLOCK, _telu_fwd_kernel

    x = torch.randn(1024, device="cuda")
    y = torch.empty_like(x)
    n, grid = x.numel(), (triton.cdiv(x.numel(), _BLOCK),)
    compiled = _telu_fwd_kernel[grid](x, y, n, BLOCK=_BLOCK)

    def direct():
        from triton import knobs
        from triton.runtime import driver

        stream = driver.active.get_current_stream(torch.cuda.current_device())
        compiled.run(grid[0], 1, 1, stream, compiled.function, compiled.packed_metadata, None,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, x, y, n, _BLOCK)

    ways = [
        ("Triton kernel[grid](...) (JITFunction.run)", lambda: _telu_fwd_kernel[grid](x, y, n, BLOCK=_BLOCK)),
        ("Triton CompiledKernel.run, direct", direct),
        ("ATen op: torch.mul(x, x, out=y)", lambda: torch.mul(x, x, out=y)),
    ]
    cpp = _backend.unavailable_reason("telu", "cuda", x.device) is None  # the extension's CUDA kernels
    if cpp:
        ways.append(("C++ op: torch.ops.disseg.telu_fwd (CUDA)", lambda: torch.ops.disseg.telu_fwd(x)))
    ways.append(("fused telu(x, backend='triton'), no grad", lambda: dk.telu(x, backend="triton")))
    if cpp:
        ways.append(("fused telu(x, backend='cuda'), no grad", lambda: dk.telu(x, backend="cuda")))
    rows = []
    with torch.no_grad():
        for name, fn in ways:
            try:
                fn()
                torch.cuda.synchronize()
                y.zero_()
                if name.startswith("Triton"):  # the direct call must compute what the normal one does
                    fn()
                    torch.cuda.synchronize()
                    want = dk.telu(x, backend="reference")
                    if not torch.allclose(y, want, rtol=1e-5, atol=1e-6):
                        raise RuntimeError("wrong output")
                rows.append({"way": name, "us": _host_us(fn, "cuda", calls, rounds), "error": ""})
            except Exception as exc:  # noqa: BLE001 - one row per way
                rows.append({"way": name, "us": float("nan"), "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(f"{rows[-1]['us']:8.1f} us  {name}  {rows[-1]['error']}", flush=True)
    return rows


def _cases(op, backend, device, fused, encoder="resnet50"):
    """(fn, inputs): fn(*inputs) -> tensor, at a tiny model-like shape (``encoder``: the
    stage2 case's)."""
    import torch

    import disseg_kernels as dk

    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device).requires_grad_(True)

    c, h = 64, 8
    be = backend if fused else "reference"
    if op in ("telu", "ca", "sa", "cbam", "elat", "cbat"):
        ctor = {
            "telu": lambda: dk.TeLU(fused=fused, backend=backend),
            "ca": lambda: dk.ChannelAttention(c, fused=fused, backend=backend),
            "sa": lambda: dk.SpatialAttention(fused=fused, backend=backend),
            "cbam": lambda: dk.CBAM(c, fused=fused, backend=backend),
            "elat": lambda: dk.ELAT(c, fused=fused, backend=backend),
            "cbat": lambda: dk.CBATGates(c, fused=fused, backend=backend),
        }[op]
        torch.manual_seed(0)
        return ctor().to(device), [rand(2, c, h, h)]
    if op == "multiscale":
        return (lambda *ts: dk.multiscale_concat(ts, [1, 2, 4], backend=be)), [
            rand(2, c, h, h), rand(2, c, h // 2, h // 2), rand(2, c, h // 4, h // 4)]
    if op == "window_attention":
        return (lambda v, lg: dk.window_attention(v, lg, 3, backend=be)), [rand(2, c, h, h), rand(2, 4, h * h, 9, 9)]
    if op == "cdfa":
        torch.manual_seed(0)
        block = dk.ContrastDrivenFeatureAggregation(c, c, 4, fused=fused, backend=backend).to(device)
        return block, [rand(2, c, h, h), rand(2, c, h, h), rand(2, c, h, h)]
    if op == "dispersive":
        return (lambda z: dk.dispersive_loss(z, backend=be)), [rand(8, c * h * h)]
    if op == "stage2":  # the whole network (ResNet-50, batch 2, 32×32): every op of a training step
        from models import build_model

        torch.manual_seed(0)
        model = build_model(stage=2, encoder=encoder, fused=fused).to(device)

        def step(x):
            out = model(x)
            loss = sum(t.float().mean() for t in (out.mask, out.fg, out.bg, out.uncertainty) if t is not None)
            return loss + (0.2 * out.disp_loss if out.disp_loss is not None else 0.0)

        return step, [rand(2, 3, 32, 32)]
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def _launches(event) -> int:
    """Device operations under one profiler event: a non-view ATen op is one (its own
    sub-calls are not counted again), a view/allocation op counts what it calls (e.g.
    contiguous → copy_), a ``disseg::`` op counts its ATen calls, or one for itself when
    it makes none (a C++ kernel); anything else (autograd nodes, Python custom ops'
    wrappers) counts its children."""
    name = event.name
    if name.startswith("aten::") and name[6:] not in NO_LAUNCH:
        return 1
    inner = sum(_launches(c) for c in event.cpu_children)
    if name.startswith("disseg::") and inner == 0 and not any(c.name.startswith("disseg::") for c in event.cpu_children):
        return 1
    return inner


def _count_ops(fn, inputs, grad_out, backward: bool) -> tuple[int, int]:
    """(device ops, Triton launches) one call issues (CPU path only), counted from the
    profiler's op tree, so ops inside Python custom ops and autograd nodes are seen."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    _LAUNCHES.clear()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        if backward:
            fn(*inputs).backward(grad_out)
        else:
            with torch.no_grad():
                fn(*inputs)
    roots = [e for e in prof.events() if e.cpu_parent is None]
    return sum(_launches(e) for e in roots) + _LAUNCHES["triton"], _LAUNCHES["triton"]


def _host_us(call, device, calls, rounds) -> float:
    import torch

    for _ in range(5):
        call()
    times = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return min(times)  # the least-disturbed round: host cost is a floor, noise only adds


def measure(op, path, device, calls, rounds) -> dict:
    from disseg_kernels import _backend

    fused = path != "eager"
    backend = path if fused else "auto"
    # the model's ops ask for "auto": make it pick the path measured here
    with _backend.auto_order(device, (path,)) if fused else contextlib.nullcontext():
        fn, inputs = _cases(op, backend, device, fused)
        return _measure(op, path, fn, inputs, device, calls, rounds)


def _measure(op, path, fn, inputs, device, calls, rounds) -> dict:
    import torch

    with torch.no_grad():
        grad_out = torch.ones_like(fn(*inputs))

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        fn(*inputs).backward(grad_out)

    row = {"op": op, "path": path}
    row["fwd_us"] = _host_us(fwd, device, calls, rounds)
    row["fwd_bwd_us"] = _host_us(fwd_bwd, device, max(1, calls // 2), rounds)
    if device == "cpu" and _JIT_STAND_IN and path == "triton":
        row["launcher_us_fwd_bwd"] = _launcher_us(fn, inputs, grad_out, rounds)
    if device == "cpu":
        row["fwd_ops"], row["launches_fwd"] = _count_ops(fn, inputs, grad_out, False)
        row["fwd_bwd_ops"], row["launches_fwd_bwd"] = _count_ops(fn, inputs, grad_out, True)
    return row


def _launcher_us(fn, inputs, grad_out, rounds: int, calls: int = 50) -> float:
    """``--triton-launcher jit``: µs that Triton's ``kernel[grid](...)`` path spends on the
    launches of one forward+backward. Each launch is recorded once, then re-issued
    ``calls`` times alone (fastest of ``rounds``); the sum is the launcher's share of the
    op's host time, what a launcher that called the compiled kernel directly would save
    (less its own C call)."""
    import triton.runtime.jit as jit

    recorded, run = [], jit.JITFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        recorded.append((self, grid, args, dict(kwargs)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    jit.JITFunction.run = recording
    try:
        fn(*inputs).backward(grad_out)
    finally:
        jit.JITFunction.run = run
    return sum(_host_us(lambda k=k, g=g, a=a, kw=kw: k[g](*a, **kw), "cpu", calls, rounds)
               for k, g, a, kw in recorded)


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.launch_cost and args.device != "cuda":
        raise SystemExit("--launch-cost: needs --device cuda (a CPU has no launches to time)")
    if args.triton_launcher == "jit" and args.device != "cpu":
        raise SystemExit("--triton-launcher jit: CPU only (on a GPU the launches are real)")
    if args.device == "cpu":
        if args.triton_launcher == "stub":
            os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        elif os.environ.get("TRITON_INTERPRET", "0") == "1":
            raise SystemExit("--triton-launcher jit: unset TRITON_INTERPRET (the kernels must be JITFunctions)")
        os.environ["DISSEG_TRITON_AUTOTUNE"] = "0"  # stand-ins cannot be autotuned
    import torch

    from benchmarks.bench_dispersive import load_average, machine_name
    from disseg_kernels import _backend

    _backend._EAGER_CUSTOM_OPS = _backend._EAGER_CUSTOM_OPS or args.eager_custom_ops
    if _backend._EAGER_CUSTOM_OPS and "custom_ops" not in args.tag:
        args.tag = "_".join(t for t in (args.tag, "custom_ops") if t)
    if args.triton_launcher == "jit":
        _jit_launcher_stand_in()
        if "jit_launcher" not in args.tag:
            args.tag = "_".join(t for t in (args.tag, "jit_launcher") if t)
    if args.device == "cpu":
        if args.triton_launcher == "stub" and _backend.unavailable_reason("telu", "triton", torch.device("cpu")) is None:
            _stub_triton_launches()
        torch.set_num_threads(1)
        # The stubs leave their outputs unwritten: garbage that may hold denormals, which
        # would make the CPU's arithmetic on them (not the host path) slow.
        torch.set_flush_denormal(True)
    elif not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.launch_cost:
        rows = launch_costs(args.calls * 10, args.rounds)
        args.out.mkdir(parents=True, exist_ok=True)
        date = _dt.datetime.now(_dt.timezone.utc)
        import triton

        lines = [f"# Host cost of one launch ({machine_name('cuda')})", "",
                 f"- date: {date:%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; triton {triton.__version__}",
                 f"- command: `python -m benchmarks.bench_host_overhead {' '.join(sys.argv[1:] if argv is None else argv)}`",
                 "- the TeLU forward on 1,024 elements, issued back to back; µs per call, fastest of "
                 f"{args.rounds} rounds of {args.calls * 10}", "", "| way | host µs per launch | error |",
                 "| --- | ---: | --- |"]
        lines += [f"| {r['way']} | {r['us']:.1f} | {r['error']} |" for r in rows]
        path = args.out / f"launch_cost_cuda_{date:%Y-%m-%d}{('_' + args.tag) if args.tag else ''}.md"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")
        return rows
    ops = [o for o in args.ops.split(",") if o]
    fused_paths = ["triton", "cpu"] if args.device == "cpu" else ["triton", "cuda"]
    date = _dt.datetime.now(_dt.timezone.utc)
    load = load_average()
    # Path by path (eager, then Triton, then the compiled kernels), the results rewritten
    # after each: on a GPU the CUDA kernels come last, so a fault there loses nothing else.
    rows, eager = [], {}
    for path in ["eager"] + fused_paths:
        for op in ops:
            if path != "eager" and _backend.unavailable_reason(FAMILY.get(op, op), path, torch.device(args.device)):
                continue
            calls, rounds = (4, 3) if op == "stage2" else (args.calls, args.rounds)
            r = measure(op, path, args.device, calls, rounds)
            if path == "eager":
                eager[op] = r
            else:
                r["host_time_over_eager"] = r["fwd_bwd_us"] / eager[op]["fwd_bwd_us"]
            rows.append(r)
            print("  ".join(f"{k}={r[k]:.1f}" if isinstance(r.get(k), float) else f"{k}={r.get(k, '')}" for k in FIELDS),
                  flush=True)
        order = {(op, p): i for i, (op, p) in enumerate((o, p) for o in ops for p in ["eager"] + fused_paths)}
        rows.sort(key=lambda r: order[(r["op"], r["path"])])
        _write(rows, args, date, machine_name(args.device), load, argv)
    return rows


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def _write(rows, args, date, machine, load, argv) -> None:
    import torch

    from benchmarks.bench_dispersive import _fmt, write_csv

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"host_overhead_{args.device}_{date:%Y-%m-%d}{('_' + args.tag) if args.tag else ''}"
    write_csv(stem.with_suffix(".csv"), rows, FIELDS)
    cmd = " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"# Host cost per call of the fused ops ({args.device})",
        "",
        f"- machine: {machine}; torch {torch.__version__}; triton {_triton_version()}; {torch.get_num_threads()} thread(s)",
        f"- date: {date:%Y-%m-%d %H:%M} UTC; load average at start: {load}",
        f"- command: `python -m benchmarks.bench_host_overhead {cmd}`".rstrip(),
        "- eager calls: " + ("through the torch.library custom ops (DISSEG_EAGER_CUSTOM_OPS=1)"
                             if "custom_ops" in args.tag else "one torch.autograd.Function per fused op (the default)"),
        "- tiny model-like inputs (batch 2, C = 64, 8×8; dispersive: N = 8, D = 4096); host µs = fastest of "
        f"{args.rounds} rounds of {args.calls} calls (fwd+bwd: {max(1, args.calls // 2)})",
        "- stage2: one training step of the whole Stage II network (ResNet-50, batch 2, 32×32; 3 rounds of 4 "
        "calls); its time includes the CPU's real convolutions, the same in every path, so compare the op counts",
    ]
    jit = "jit_launcher" in args.tag
    if args.device == "cpu":
        lines.append(("- triton: compiled-mode kernels launched through Triton's own kernel[grid](...) path against a "
                      "stand-in sm_90 driver whose compiled kernel only counts (--triton-launcher jit), so the time is "
                      "our Python, the op machinery, the torch ops around the launches and Triton's launcher up to the "
                      "driver call; a GPU adds the driver's launch cost. The last column: µs of Triton's launcher summed "
                      "over one fwd+bwd's launches, each re-issued alone (what calling the compiled kernels directly "
                      "would save, less that C call). " if jit else
                      "- triton: interpreted launches replaced by counting stubs, so the time is the Python glue, the "
                      "op machinery and the torch ops around the launches; a GPU adds each launch's own issue cost. ") +
                     "eager and cpu: the CPU's real arithmetic on these tiny tensors is in their times (ELAT: a 7×7 "
                     "conv's weight gradient, ~1 ms here, also on the triton path; window_attention eager: unfold + "
                     "bmm + fold)")
    lines += [
        "",
        "| op | path | fwd µs | fwd+bwd µs | device ops fwd | fwd+bwd | of which Triton launches fwd | fwd+bwd | fwd+bwd host time ÷ eager (< 1: faster) |"
        + (" of which Triton's launcher µs |" if jit else ""),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if jit else ""),
    ]

    f = _fmt
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['path']} | {f(r.get('fwd_us'), '.0f')} | {f(r.get('fwd_bwd_us'), '.0f')} | "
            f"{f(r.get('fwd_ops'), 'd')} | {f(r.get('fwd_bwd_ops'), 'd')} | {f(r.get('launches_fwd'), 'd')} | "
            f"{f(r.get('launches_fwd_bwd'), 'd')} | {f(r.get('host_time_over_eager'), '.2f')} |"
            + (f" {f(r.get('launcher_us_fwd_bwd'), '.0f')} |" if jit else "")
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.csv')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
