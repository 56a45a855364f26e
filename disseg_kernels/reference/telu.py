"""TeLU in plain PyTorch, as written in ``shared/spec/attention.md``.

telu(x) = x · tanh(eˣ).
- ``telu_reference``: the formula with eˣ taken of min(x, 10). tanh(e¹⁰) is exactly 1.0
  in float16, bfloat16, float32 and float64, so its values are bit for bit the eager
  formula's in every dtype (inf and NaN included), and autograd's gradient is bit for bit
  eager's wherever eager's is finite and the finite limit (1) elsewhere. It is the
  ``fused=False`` path of TeLU and of the gates' MLPs (so of the plain Med-DisSeg), and
  the ``"reference"`` backend.
- ``telu_eager``: the authors' formula as written. Its gradient is NaN from x ≈ 89 in
  float32 and x ≈ 11 in float16, where eˣ overflows and autograd forms inf · 0. The
  benchmarks' eager baseline (one elementwise pass fewer than ``telu_reference``).
- ``telu_grad_reference``: the derivative written so that it is finite for every finite
  x; the fused kernels implement that one.
"""

from __future__ import annotations

import torch


# min(x, TELU_EXP_CAP) inside eˣ: tanh(e^10) = 1.0 in every float dtype (1 - 2e^-44052).
TELU_EXP_CAP = 10.0


def telu_reference(x: torch.Tensor) -> torch.Tensor:
    """x · tanh(e^min(x, 10)), elementwise, in x's dtype: the eager formula's values, with
    a gradient that is finite for every finite x (see the module docstring)."""
    return x * torch.tanh(torch.exp(x.clamp(max=TELU_EXP_CAP)))


def telu_eager(x: torch.Tensor) -> torch.Tensor:
    """x · tanh(eˣ) as the authors write it: autograd's gradient is NaN past x ≈ 89
    (float32) and x ≈ 11 (float16). The benchmarks' eager baseline."""
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
