"""pytest-benchmark cases for CDFA's window attention (small shapes; not part of `make test`).

    .venv/bin/python -m pytest benchmarks/test_bench_window_attention.py --benchmark-only

Each case times one forward+backward (gradients of v and of the logits) of a fused backend
or of the reference (softmax @ unfold(v), folded back: the authors' formulation), k = 3,
4 heads, C = 64. The full script, with torch.compile, peak memory and the whole CDFA
block, is benchmarks/bench_window_attention.py.
"""

import pytest
import torch

import disseg_kernels as dk
from benchmarks._cases import DEVICE, fused_backends
from disseg_kernels.reference.window_attention import window_attention_reference

pytest.importorskip("pytest_benchmark")

BACKENDS = fused_backends("window_attention")


@pytest.mark.parametrize("size", [16, 32], ids=lambda s: f"H=W={s}")
@pytest.mark.parametrize("impl", BACKENDS + ["eager"])
def test_window_attention_fwd_bwd(benchmark, impl, size):
    torch.manual_seed(0)
    b, c, heads, k = 2, 64, 4, 3
    v = torch.randn(b, c, size, size, device=DEVICE, requires_grad=True)
    logits = torch.randn(b, heads, size * size, k * k, k * k, device=DEVICE, requires_grad=True)
    if impl == "eager":
        fn = lambda: window_attention_reference(v, logits, k)  # noqa: E731
    else:
        fn = lambda: dk.window_attention(v, logits, k, backend=impl)  # noqa: E731
    grad = torch.randn(b, c, size, size, device=DEVICE)

    def step():
        torch.autograd.grad(fn(), (v, logits), grad)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
