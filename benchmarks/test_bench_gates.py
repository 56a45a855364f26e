"""pytest-benchmark cases for the attention-calibration ops (small shapes; not part of `make test`).

    .venv/bin/python -m pytest benchmarks/test_bench_gates.py --benchmark-only

Each case times one forward+backward of a fused backend or of eager PyTorch (the module
with ``fused=False``; for TeLU the authors' formula ``telu_eager``; for the multi-scale
concat ``cat(F.interpolate(...))``) at batch 2 and the model's channel counts. The full
script, with torch.compile, peak memory, saved-for-backward bytes and the model's real
shapes, is benchmarks/bench_gates.py.
"""

import pytest
import torch

import disseg_kernels as dk
from benchmarks._cases import DEVICE, fused_backends
from disseg_kernels.reference.multiscale import multiscale_concat_reference
from disseg_kernels.reference.telu import telu_eager

pytest.importorskip("pytest_benchmark")


def _fwd_bwd(fn, inputs, params=()):
    """One forward+backward of fn(*inputs) against a fixed random output gradient."""
    with torch.no_grad():
        grad = torch.randn_like(fn(*inputs))
    leaves = [t for t in (*inputs, *params) if t.requires_grad]

    def step():
        torch.autograd.grad(fn(*inputs), leaves, grad)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return step


MODULES = {
    "cbat": lambda c, fused, backend: dk.CBATGates(c, fused=fused, backend=backend),
    "elat": lambda c, fused, backend: dk.ELAT(c, fused=fused, backend=backend),
}
GATE_SHAPES = {"cbat": [(2, 64, 64, 64), (2, 512, 16, 16)], "elat": [(2, 64, 64, 64)]}


@pytest.mark.parametrize(
    "op,shape", [(op, s) for op, shapes in GATE_SHAPES.items() for s in shapes], ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v
)
@pytest.mark.parametrize("impl", fused_backends("gates") + ["eager"])
def test_gates_fwd_bwd(benchmark, impl, op, shape):
    torch.manual_seed(0)
    fused = impl != "eager"
    module = MODULES[op](shape[1], fused, impl if fused else "auto").to(DEVICE)
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    benchmark.extra_info["bytes_in"] = x.numel() * x.element_size()
    benchmark(_fwd_bwd(module, (x,), tuple(module.parameters())))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("impl", fused_backends("telu") + ["eager"])
def test_telu_fwd_bwd(benchmark, impl, dtype):
    x = torch.randn(2, 64, 64, 64, device=DEVICE).to(dtype).requires_grad_()
    fn = telu_eager if impl == "eager" else (lambda t: dk.telu(t, backend=impl))
    benchmark(_fwd_bwd(fn, (x,)))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("impl", fused_backends("multiscale") + ["eager"])
def test_multiscale_fwd_bwd(benchmark, impl, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shapes, scales = [(2, 64, 64, 64), (2, 64, 32, 32), (2, 64, 16, 16)], [1, 2, 4]
    ts = [torch.randn(s, device=DEVICE).to(memory_format=fmt).requires_grad_() for s in shapes]
    if impl == "eager":
        fn = lambda *t: multiscale_concat_reference(t, scales)  # noqa: E731
    else:
        fn = lambda *t: dk.multiscale_concat(t, scales, backend=impl)  # noqa: E731
    benchmark(_fwd_bwd(fn, ts))
