"""TeLU: public API, the ``disseg::telu`` custom op and its autograd.

telu(x) = x · tanh(eˣ). Forward: one read of x, one write. Backward: one read of x and of
the incoming gradient, one write; the derivative is the finite form of
``reference.telu.telu_grad_reference`` (→ 1 for large x, never inf · 0).
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference.telu import telu_reference
from ._autograd import first_order_only


def telu(x: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x · tanh(eˣ) elementwise; any float dtype, any strides. See the module docstring."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    chosen = _backend.resolve("telu", backend, x.device.type, x.dtype)
    if chosen == "reference":
        return telu_reference(x)
    return _telu_fused(x, chosen)


def _dense(x: torch.Tensor) -> bool:
    """Contiguous or channels_last: one linear memory order shared by x, y and dx."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _run_fwd(x, backend):
    if backend in ("cpu", "cuda"):  # csrc/telu.cpp, csrc/telu_cuda.cu: one op, dispatched on the device
        return torch.ops.disseg.telu_fwd(x)
    if backend == "triton":
        from ..triton.telu import telu_fwd_triton

        return telu_fwd_triton(x)
    raise ValueError(f"no fused TeLU kernel for backend {backend!r}")


def _run_bwd(grad, x, backend):
    if backend in ("cpu", "cuda"):
        return torch.ops.disseg.telu_bwd(grad, x)
    if backend == "triton":
        from ..triton.telu import telu_bwd_triton

        return telu_bwd_triton(grad, x)
    raise ValueError(f"no fused TeLU kernel for backend {backend!r}")


@torch.library.custom_op("disseg::telu", mutates_args=())
def _telu_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    """x · tanh(eˣ) of a dense x (any layout), in x's dtype and strides."""
    return _run_fwd(x, backend)


@_telu_op.register_fake
def _(x, backend):
    return torch.empty_like(x)


@torch.library.custom_op("disseg::telu_backward", mutates_args=())
def _telu_backward_op(grad: torch.Tensor, x: torch.Tensor, backend: str) -> torch.Tensor:
    """grad · telu'(x), finite for every finite x."""
    if grad.stride() != x.stride():
        grad = torch.empty_like(x).copy_(grad)  # an upstream op handed back another layout
    return _run_bwd(grad, x, backend)


@_telu_backward_op.register_fake
def _(grad, x, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, backend = inputs
    ctx.backend = backend
    ctx.save_for_backward(x)


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _telu_backward_op(grad, x, ctx.backend), None


_telu_op.register_autograd(_backward, setup_context=_setup_context)


class _TeluEager(torch.autograd.Function):
    """The same forward and backward as ``disseg::telu`` / ``telu_backward``, for eager
    mode only: through the custom op a forward+backward costs 96 µs of Python against 61 µs
    through one ``Function.apply`` (this CPU, Triton launch stubbed:
    benchmarks/bench_host_overhead.py), more than the GPU work of a (8, 64, 128, 128) map. torch.compile traces the
    custom ops (``_telu_fused`` picks by ``_backend.use_custom_op()``)."""

    @staticmethod
    def forward(ctx, x, backend):
        ctx.backend = backend
        ctx.save_for_backward(x)
        return _run_fwd(x, backend)

    @staticmethod
    @first_order_only("telu")
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if grad.stride() != x.stride():
            grad = torch.empty_like(x).copy_(grad)  # an upstream op handed back another layout
        return _run_bwd(grad, x, ctx.backend), None


def _telu_fused(x, backend):
    if not _dense(x):
        x = x.contiguous()  # another layout (e.g. a sliced view): the kernels need a dense one
    if _backend.use_custom_op():
        return _telu_op(x, backend)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _run_fwd(x, backend)
    return _TeluEager.apply(x, backend)


class TeLU(torch.nn.Module):
    """TeLU(x) = x · tanh(eˣ). ``fused=False`` is ``reference.telu.telu_reference``: plain
    PyTorch, the eager formula's values, and a finite gradient (eager's is NaN past x ≈ 89
    in float32 and x ≈ 11 in float16)."""

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
        return f"fused={self.fused}, backend={self.backend!r}"
