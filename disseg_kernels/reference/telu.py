"""TeLU in plain PyTorch, as written in ``shared/spec/attention.md``.

telu(x) = x · tanh(eˣ). This is the eager formula (autograd differentiates it): its
gradient is NaN from x ≈ 89 in float32 and x ≈ 11 in float16, where eˣ overflows and
autograd forms inf · 0. ``telu_grad_reference`` is the derivative written so that it is
finite for every finite x; the fused kernels implement that one.
"""

from __future__ import annotations

import torch


def telu_reference(x: torch.Tensor) -> torch.Tensor:
    """x · tanh(eˣ), elementwise, in x's dtype (the eager formula)."""
    return x * torch.tanh(torch.exp(x))


def telu_grad_reference(x: torch.Tensor) -> torch.Tensor:
    """d telu / dx = tanh(eˣ) + x · eˣ · (1 − tanh²(eˣ)), finite for every finite x.

    With u = eˣ: 1 − tanh²(u) = 4e^{−2u} / (1 + e^{−2u})², so x·u·(1 − tanh²u) =
    4·x·u·e^{−2u}/(1 + e^{−2u})², which underflows to 0 (not inf·0) for large x. eˣ is
    taken of min(x, 30): beyond that e^{−2u} is 0 in float64 already. Computed in
    float32 for half inputs.
    """
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    u = torch.exp(xf.clamp(max=30.0))
    e = torch.exp(-2.0 * u)
    g = torch.tanh(u) + xf * (4.0 * u * e) / (1.0 + e).square()  # not 4·x: it overflows past 8.5e37
    return g.to(x.dtype)
