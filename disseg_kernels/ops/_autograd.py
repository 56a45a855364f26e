"""First-order-only backward passes, said so when a second derivative is asked for.

The fused kernels compute gradients directly; they build no graph for them, so there is no
double backward. ``torch.autograd.function.once_differentiable`` marks such a backward, but
it attaches its error only when the incoming gradient itself requires grad. A gradient
penalty (``torch.autograd.grad(y.sum(), x, create_graph=True)``, then a loss on that
gradient) hands in a constant gradient, so the result came back detached and the penalty's
contribution through the fused op was silently dropped. ``first_order_only`` attaches the
error whenever a graph is being built (``create_graph=True``): the gradients still flow as
values, and differentiating them raises a message naming the op.
"""
from __future__ import annotations

import functools

import torch


_SCALE_CHUNK = 1 << 24  # elements per float32 temporary (64 MB) in scale_saved_grad


def scale_saved_grad(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad · scale`` in grad's dtype, for a loss whose forward saved dL/dz: the backward of
    the fused dispersive loss. For half grads each product is taken in float32 and rounded
    once, because the scale itself may not fit: GradScaler's default 2**16 is inf in float16
    (max 65504), which made every gradient inf and the scaler skip the step (and bf16 would
    round the scale to 8 bits). In chunks, so that the float32 copy stays 64 MB where the
    gradient is gigabytes (N·D > 2**31 in bf16 is 4.3 GB)."""
    if grad.dtype not in (torch.float16, torch.bfloat16):
        return grad * scale.to(grad.dtype)
    out = torch.empty_like(grad, memory_format=torch.contiguous_format)
    src, dst, s = grad.reshape(-1), out.view(-1), scale.float()
    for k in range(0, src.numel(), _SCALE_CHUNK):
        dst[k:k + _SCALE_CHUNK].copy_(src[k:k + _SCALE_CHUNK].float().mul_(s))
    return out


def error_on_differentiation(outputs, op: str):
    """``outputs`` (a tensor or a tuple, Nones allowed) as values that raise if differentiated."""
    single = not isinstance(outputs, tuple)
    items = (outputs,) if single else outputs
    err = torch._C._functions.DelayedError(
        f"disseg: {op} has no double backward (its fused kernels return gradients without a graph); "
        "for second derivatives use backend='reference' or the module with fused=False".encode(),
        len(items),
    )

    def alias(t):  # DelayedError needs inputs that require grad to give its outputs a grad_fn
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        t.requires_grad_(True)
        return t

    wrapped = err(*[alias(t) for t in items])
    wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
    return wrapped[0] if single else tuple(wrapped)


def first_order_only(op: str):
    """Decorate an ``autograd.Function.backward``: it runs without building a graph; under
    ``create_graph=True`` its gradients raise a clear error if differentiated again."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            return error_on_differentiation(outputs, op)

        return wrapper

    return decorate
