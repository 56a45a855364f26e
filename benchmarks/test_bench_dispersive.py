"""pytest-benchmark cases for the dispersive loss (small shapes; not part of `make test`).

    .venv/bin/python -m pytest benchmarks/test_bench_dispersive.py --benchmark-only

Each case times one forward+backward of a fused backend or of a baseline (eager:
cdist → mask → exp → mean → log with autograd). The full script with GFLOP/s, memory and
torch.compile is benchmarks/bench_dispersive.py.
"""

import pytest
import torch

from benchmarks._cases import DEVICE, fused_backends
from disseg_kernels import dispersive_loss
from disseg_kernels.reference.dispersive import eager_dispersive_loss

pytest.importorskip("pytest_benchmark")

SHAPES = [(8, 32768), (512, 256), (1024, 64)]
BACKENDS = fused_backends("dispersive")


def _fwd_bwd(fn, z):
    def step():
        z.grad = None
        fn(z).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return step


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", BACKENDS + ["eager"])
def test_dispersive_fwd_bwd(benchmark, impl, shape):
    n, d = shape
    z = torch.randn(n, d, device=DEVICE).requires_grad_()
    if impl == "eager":
        fn = lambda x: eager_dispersive_loss(x, "infonce_l2", tau=0.5)  # noqa: E731
    else:
        fn = lambda x: dispersive_loss(x, "infonce_l2", tau=0.5, backend=impl)  # noqa: E731
    benchmark.extra_info["gflop"] = 4 * n * n * d / 1e9
    benchmark(_fwd_bwd(fn, z))
