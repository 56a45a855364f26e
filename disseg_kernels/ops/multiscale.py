"""Multi-scale upsample-and-concatenate: public API and the ``disseg::multiscale_concat`` op.

Each input is read once and written once, bilinearly upsampled (align_corners=True) by its
integer factor straight into its channel slice of the output; the backward pass
accumulates the output gradient's slices into the small inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .. import _backend
from ..reference.multiscale import multiscale_concat_reference
from ._args import as_int
from ._autograd import first_order_only


def _validate(tensors, scales):
    if not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
        raise ValueError(f"tensors must be a non-empty list of (B, C, H, W) tensors, got {type(tensors).__name__}")
    if len(scales) != len(tensors):
        raise ValueError(f"scales must have one entry per tensor ({len(tensors)}), got {list(scales)}")
    out_hw = None
    for i, (t, s) in enumerate(zip(tensors, scales)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"tensors[{i}] must be a 4-d (B, C, H, W) tensor, got {getattr(t, 'shape', t)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"tensors[{i}] must be a floating-point tensor, got dtype {t.dtype}")
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"scales[{i}] must be an integer ≥ 1, got {s!r}")
        hw = (t.shape[2] * s, t.shape[3] * s)
        if out_hw is None:
            out_hw = hw
        elif hw != out_hw:
            raise ValueError(
                f"tensors[{i}] upsampled by {s} is {hw[0]}×{hw[1]}, but tensors[0] gives {out_hw[0]}×{out_hw[1]}"
            )
        for what, a, b in (("batch size", t.shape[0], tensors[0].shape[0]), ("device", t.device, tensors[0].device)):
            if a != b:
                raise ValueError(f"tensors[{i}] has {what} {a}, tensors[0] has {b}: they must match")


def multiscale_concat(tensors: Sequence[torch.Tensor], scales: Sequence[int], backend: str = "auto") -> torch.Tensor:
    """cat([up_{scales[i]}(tensors[i])], dim=1), bilinear with align_corners=True.

    Args:
        tensors: (B, Cᵢ, Hᵢ, Wᵢ) tensors with Hᵢ·sᵢ and Wᵢ·sᵢ equal for all i.
        scales: integer factors sᵢ ≥ 1 (1 = as is).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
    Returns:
        (B, ΣCᵢ, H, W), in the inputs' promoted dtype (as ``torch.cat``: a bf16 map from
        an autocast convolution next to a float32 skip gives float32).
    """
    if isinstance(tensors, torch.Tensor):  # iterating it would give its batch entries
        raise TypeError("tensors must be a sequence of (B, C, H, W) tensors, got one Tensor (wrap it: [t])")
    tensors = list(tensors)
    if isinstance(scales, (str, bytes)) or not hasattr(scales, "__iter__"):
        raise TypeError(f"scales must be a sequence of integers, one per tensor, got {scales!r}")
    scales = [as_int(s) for s in scales]
    _validate(tensors, scales)
    if any(t.dtype != tensors[0].dtype for t in tensors):  # (promote_types is an aten call: only then)
        common = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        tensors = [t if t.dtype == common else t.to(common) for t in tensors]
    chosen = _backend.resolve("multiscale", backend, tensors[0].device.type, tensors[0].dtype)
    if chosen == "reference":
        return multiscale_concat_reference(tensors, scales)
    return _multiscale_fused(tensors, scales, chosen)


def _run_fwd(tensors, scales, backend):
    if backend in ("cpu", "cuda"):  # csrc/multiscale.cpp, csrc/multiscale_cuda.cu: one op, dispatched on the device
        return torch.ops.disseg.multiscale_fwd(tensors, scales)
    if backend == "triton":
        from ..triton.multiscale import multiscale_fwd_triton

        return multiscale_fwd_triton(tensors, scales)
    raise ValueError(f"no fused multiscale kernel for backend {backend!r}")


def _run_bwd(grad, c0, t, scale, backend):
    if scale == 1:
        return grad[:, c0 : c0 + t.shape[1]].clone(memory_format=torch.preserve_format)
    if backend in ("cpu", "cuda"):
        return torch.ops.disseg.multiscale_bwd(grad, c0, t.shape[1], t.shape[2], t.shape[3], t)
    if backend == "triton":
        from ..triton.multiscale import multiscale_bwd_triton

        return multiscale_bwd_triton(grad, c0, t)
    raise ValueError(f"no fused multiscale kernel for backend {backend!r}")


@torch.library.custom_op("disseg::multiscale_concat", mutates_args=())
def _multiscale_op(tensors: list[torch.Tensor], scales: list[int], backend: str) -> torch.Tensor:
    """cat of the upsampled inputs, written straight into the output's channel slices."""
    return _run_fwd(tensors, scales, backend)


def _out_format(t):
    return torch.channels_last if (t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()) else torch.contiguous_format


@_multiscale_op.register_fake
def _(tensors, scales, backend):
    t0 = tensors[0]
    c = sum(t.shape[1] for t in tensors)
    return t0.new_empty((t0.shape[0], c, t0.shape[2] * scales[0], t0.shape[3] * scales[0])).contiguous(
        memory_format=_out_format(t0)
    )


@torch.library.custom_op("disseg::multiscale_concat_backward", mutates_args=())
def _multiscale_backward_op(grad: torch.Tensor, tensors: list[torch.Tensor], scales: list[int], backend: str) -> list[torch.Tensor]:
    """The gradient of each input: its channel slice of grad, accumulated onto its pixels."""
    out, c0 = [], 0
    for t, s in zip(tensors, scales):
        out.append(_run_bwd(grad, c0, t, s, backend))
        c0 += t.shape[1]
    return out


@_multiscale_backward_op.register_fake
def _(grad, tensors, scales, backend):
    return [torch.empty_like(t) for t in tensors]


def _setup_context(ctx, inputs, output):
    tensors, scales, backend = inputs
    ctx.scales, ctx.backend = list(scales), backend
    # Only the shapes are needed; the inputs themselves are saved as shape carriers.
    ctx.shapes = [(t.shape, t.dtype, t.device, _out_format(t)) for t in tensors]


def _shape_carrier(shape, dtype, device, fmt) -> torch.Tensor:
    """An unwritten tensor with an input's shape, dtype and memory format (one allocation,
    no copy): what the backward kernels read those from."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=fmt)


def _backward(ctx, grad):
    likes = [_shape_carrier(s, d, dev, f) for s, d, dev, f in ctx.shapes]
    grads = _multiscale_backward_op(grad, likes, ctx.scales, ctx.backend)
    return list(grads), None, None


_multiscale_op.register_autograd(_backward, setup_context=_setup_context)


class _MultiscaleEager(torch.autograd.Function):
    """The same forward and backward as ``disseg::multiscale_concat`` and its backward op,
    for eager mode only (no custom-op dispatch of two tensor lists; shape carriers only for
    the inputs that need a gradient). torch.compile traces the custom ops (``_multiscale_fused`` picks
    by ``_backend.use_custom_op()``)."""

    @staticmethod
    def forward(ctx, scales, backend, *tensors):
        ctx.scales, ctx.backend = scales, backend
        ctx.shapes = [(t.shape[1], t.shape[2], t.shape[3], t.dtype, _out_format(t)) for t in tensors]
        out = _run_fwd(list(tensors), scales, backend)
        # An empty second output, saved: unpacked in backward its grad_fn is this node, which
        # is how first_order_only's error reaches the inputs' graph (no input is saved: the
        # backward needs only their shapes, and saving them would keep them alive).
        anchor = out.new_empty((0,))
        ctx.save_for_backward(anchor)
        ctx.set_materialize_grads(False)
        return out, anchor

    @staticmethod
    @first_order_only("multiscale_concat")
    def backward(ctx, grad, _grad_anchor):
        if grad is None:
            return (None, None) + (None,) * len(ctx.shapes)
        grads, c0 = [], 0
        for (c, h, w, dtype, fmt), s, need in zip(ctx.shapes, ctx.scales, ctx.needs_input_grad[2:]):
            if need:
                like = _shape_carrier((grad.shape[0], c, h, w), dtype, grad.device, fmt)
                grads.append(_run_bwd(grad, c0, like, s, ctx.backend))
            else:
                grads.append(None)
            c0 += c
        return (None, None, *grads)


def _multiscale_fused(tensors, scales, backend):
    if _backend.use_custom_op():
        return _multiscale_op(tensors, scales, backend)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return _run_fwd(tensors, scales, backend)
    return _MultiscaleEager.apply(scales, backend, *tensors)[0]
