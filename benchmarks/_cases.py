"""What the pytest-benchmark cases (benchmarks/test_bench_*.py) time: the device, and the
fused backends of an op family on it."""

import torch

import disseg_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fused_backends(family: str) -> list[str]:
    """The family's backends available on DEVICE, less the reference and, on the CPU, Triton
    (the interpreter is a test harness, not a benchmark)."""
    return [
        b
        for b in disseg_kernels.available_backends(family, DEVICE)
        if b != "reference" and not (DEVICE == "cpu" and b == "triton")
    ]
