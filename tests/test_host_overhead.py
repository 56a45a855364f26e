"""The fusion, counted: how many device operations one call of each fused op issues on
the Triton path (``benchmarks/bench_host_overhead.py``'s counter: Triton launches plus
every non-view ATen op, from the profiler's op tree). At the model's shapes on a GPU a
fused op costs what its launches and their Python cost, so a change that adds operations
to a fused path fails here and must raise the bound on purpose. Runs under the Triton
interpreter with the launches stubbed (they compute nothing: only the counts are read)."""

from __future__ import annotations

import pytest
import torch

from disseg_kernels import _backend

pytestmark = pytest.mark.skipif(
    _backend.unavailable_reason("gates", "triton", torch.device("cpu")) is not None,
    reason="needs the Triton interpreter on CPU tensors (TRITON_INTERPRET=1, no GPU)",
)

# op -> (fwd ops, fwd+bwd ops, fwd Triton launches, fwd+bwd Triton launches), as measured
# when the autograd.Function paths and the one-program dispersive epilogue landed
# (multiscale: since its gather backward, no zero fill per upsampled input); eager
# PyTorch in brackets: cbat (38, 120), telu (3, 9), multiscale (3, 11),
# window_attention (5, 14), dispersive (6, 21).
BOUNDS = {
    "cbat": (11, 42, 11, 24),
    "telu": (1, 3, 1, 2),
    "multiscale": (3, 9, 3, 5),
    "window_attention": (1, 5, 1, 3),
    "dispersive": (3, 7, 2, 3),
}


@pytest.fixture
def stubbed(monkeypatch):
    import triton.runtime.interpreter as interp

    from benchmarks import bench_host_overhead as bho

    monkeypatch.setattr(interp.InterpretedFunction, "run", bho._counting_run)
    monkeypatch.setitem(_backend._AUTO_OVERRIDE, "cpu", ("triton",))  # the model's "auto" picks Triton
    return bho


@pytest.mark.parametrize("op", sorted(BOUNDS))
def test_fused_op_device_operations(stubbed, op):
    """Each fused op's forward and forward+backward issue at most the counted operations,
    and fewer than eager PyTorch's."""
    fn, inputs = stubbed._cases(op, "triton", "cpu", True)
    grad_out = torch.ones_like(fn(*inputs).detach())
    fn(*inputs).backward(grad_out)  # as in training: the gradients exist and accumulate
    fwd, launches_fwd = stubbed._count_ops(fn, inputs, grad_out, False)
    both, launches_both = stubbed._count_ops(fn, inputs, grad_out, True)
    counted = (fwd, both, launches_fwd, launches_both)
    assert all(c <= b for c, b in zip(counted, BOUNDS[op])), (op, counted, BOUNDS[op])
    efn, einputs = stubbed._cases(op, "triton", "cpu", False)
    efn(*einputs).backward(grad_out)
    eager, _ = stubbed._count_ops(efn, einputs, grad_out, True)
    assert both < eager, (op, both, eager)


def test_stage2_step_issues_fewer_operations_than_plain(stubbed):
    """A whole Stage II training step (ResNet-18 encoder, 32×32) with the fused ops issues
    at most 0.7× the device operations of the plain model (ResNet-50: 2,185 vs 3,330)."""
    counts = {}
    for fused in (False, True):
        fn, inputs = stubbed._cases("stage2", "triton", "cpu", fused, encoder="resnet18")
        fn(*inputs).backward()
        counts[fused], _ = stubbed._count_ops(fn, inputs, None, True)
    assert counts[True] <= 0.7 * counts[False], counts


# ATen ops that torch.use_deterministic_algorithms(True) rejects on CUDA (no deterministic
# CUDA kernel; torch.use_deterministic_algorithms' documentation), by overload packet name.
NONDETERMINISTIC_ON_CUDA = {
    "upsample_linear1d_backward", "upsample_bilinear2d_backward", "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward", "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward", "adaptive_max_pool3d_backward", "avg_pool3d_backward",
    "max_pool3d_with_indices_backward", "fractional_max_pool2d_backward", "fractional_max_pool3d_backward",
    "reflection_pad1d_backward", "reflection_pad2d_backward", "reflection_pad3d_backward",
    "replication_pad1d_backward", "replication_pad2d_backward", "replication_pad3d_backward",
    "grid_sampler_2d_backward", "grid_sampler_3d_backward", "embedding_bag_backward", "_embedding_bag_backward",
    "histc", "bincount", "kthvalue", "median", "nanmedian", "ctc_loss_backward", "_ctc_loss_backward",
    "max_unpool2d", "max_unpool3d",
}


def _aten_ops_of_step(fn, inputs) -> set[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func._overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fn(*inputs).backward()
    return seen


def test_stage2_step_runs_under_cuda_deterministic_mode(stubbed):
    """The fused Stage II training step (the GPU's Triton path: "auto" picks Triton, the
    launches stubbed) issues no ATen op that torch's deterministic mode rejects on CUDA,
    so `disseg train --deterministic` can run it on a GPU; the plain model cannot (its
    F.interpolate backward, upsample_bilinear2d_backward, accumulates with atomics)."""
    ops = {}
    for fused in (False, True):
        fn, inputs = stubbed._cases("stage2", "triton", "cpu", fused, encoder="resnet18")
        ops[fused] = _aten_ops_of_step(fn, inputs)
    assert not ops[True] & NONDETERMINISTIC_ON_CUDA, sorted(ops[True] & NONDETERMINISTIC_ON_CUDA)
    assert "upsample_bilinear2d_backward" in ops[False]


# ATen ops whose CUDA kernels accumulate through atomics (different bits from run to run
# where two updates meet, unless torch's deterministic mode swaps in a slower kernel).
ATOMIC_ACCUMULATION = {"scatter_add", "scatter_add_", "index_add", "index_add_", "scatter_reduce", "scatter_reduce_",
                       "index_put", "index_put_", "_index_put_impl_", "put_"}


def test_compiled_engine_step_accumulates_without_atomics(stubbed, monkeypatch):
    """The fused Stage II training step on the C++/CUDA gate engine (what "auto" runs in
    eager code on a GPU; here its CPU twin, the same Python calling the same op schemas)
    issues no ATen op that accumulates through atomics on CUDA, so two runs give the same
    bits without deterministic mode. Until 2026-11-27 (evening) the max pools' arg-max terms
    were gathered and scatter_add_-ed around gates_reduce / gates_grad_x."""
    monkeypatch.setitem(_backend._AUTO_OVERRIDE, "cpu", ("cpu",))  # the model's "auto": the compiled engine
    fn, inputs = stubbed._cases("stage2", "cpu", "cpu", True, encoder="resnet18")
    ops = _aten_ops_of_step(fn, inputs)
    assert "gates_grad_x" in ops and "gates_reduce" in ops, sorted(ops)  # the engine really ran
    assert not ops & ATOMIC_ACCUMULATION, sorted(ops & ATOMIC_ACCUMULATION)


def test_jit_launcher_stand_in_issues_the_interpreted_launches(stubbed, tmp_path):
    """``bench_host_overhead --triton-launcher jit`` (compiled-mode kernels through Triton's
    own launcher, a stand-in driver) really launches through ``JITFunction.run``: it counts
    the same launches per call as the interpreted path, and times Triton's launcher. If the
    stand-in stopped reaching Triton's launch (a Triton upgrade), the counts would read 0.
    Runs in a subprocess: the stand-in replaces Triton's active driver for the process."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    want = {}
    for op in ("telu", "cbat"):
        fn, inputs = stubbed._cases(op, "triton", "cpu", True)
        grad_out = torch.ones_like(fn(*inputs).detach())
        want[op] = (stubbed._count_ops(fn, inputs, grad_out, False)[1], stubbed._count_ops(fn, inputs, grad_out, True)[1])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_host_overhead", "--triton-launcher", "jit",
                           "--ops", "telu,cbat", "--calls", "2", "--rounds", "1", "--out", str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (table,) = tmp_path.glob("host_overhead_cpu_*_jit_launcher.csv")
    rows = {r["op"]: r for r in csv.DictReader(table.open()) if r["path"] == "triton"}
    for op, (fwd, both) in want.items():
        assert (int(rows[op]["launches_fwd"]), int(rows[op]["launches_fwd_bwd"])) == (fwd, both), (op, rows[op])
        assert float(rows[op]["launcher_us_fwd_bwd"]) > 0, rows[op]
    assert "stand-in sm_90 driver" in table.with_suffix(".md").read_text()


def test_jit_launcher_stand_in_is_cpu_only():
    """On a GPU the launches are real: the stand-in is refused there, with the reason."""
    from benchmarks import bench_host_overhead as bho

    with pytest.raises(SystemExit, match="--triton-launcher jit: CPU only"):
        bho.main(["--triton-launcher", "jit", "--device", "cuda"])
