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


def saved_grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the dL/dz that the fused dispersive kernels return and the forward saves:
    float32 for float16 z, z's own dtype otherwise.

    That gradient is taken at a loss scale of 1, before the backward knows grad_output.
    A float16 one lost what GradScaler exists to keep: at (100, 33) its entries are ~1e-5,
    where float16 is subnormal or zero (16-22% of them were exactly 0, 2-8% relative error
    after scaling by 2**16; found 2026-11-28). bfloat16 has float32's exponent range, so
    rounding its gradient before or after a power-of-two scale is the same."""
    return torch.float32 if dtype == torch.float16 else dtype


def scale_saved_grad(grad: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``grad · scale`` in ``dtype`` (grad's own by default), for a loss whose forward saved
    dL/dz: the backward of the fused dispersive loss. For half results each product is taken
    in float32 and rounded once, because the scale itself may not fit: GradScaler's default
    2**16 is inf in float16 (max 65504), which made every gradient inf and the scaler skip
    the step (and bf16 would round the scale to 8 bits). In chunks, so that the float32
    temporary stays 64 MB where the gradient is gigabytes (N·D > 2**31 in bf16 is 4.3 GB).
    ``grad`` is never written: a backward with retain_graph=True may run again."""
    dtype = grad.dtype if dtype is None else dtype
    if grad.dtype == dtype and dtype not in (torch.float16, torch.bfloat16):
        return grad * scale.to(dtype)
    out = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    src, dst, s = grad.reshape(-1), out.view(-1), scale.float()
    for k in range(0, src.numel(), _SCALE_CHUNK):
        dst[k:k + _SCALE_CHUNK].copy_(src[k:k + _SCALE_CHUNK].to(torch.float32) * s)
    return out


def error_on_differentiation(outputs, op: str, anchors=()):
    """``outputs`` (a tensor or a tuple, Nones allowed) as values that raise if differentiated.

    ``anchors``: the op's inputs as the backward pass sees them (saved tensors unpacked with
    grad mode on). They become inputs of the raising node, so that the node lies on the
    path from the gradients back to the op's inputs. Without them the node hangs off a
    detached leaf: ``.backward()`` reaches it, but ``torch.autograd.grad(penalty, x)`` asks
    only for nodes on a path to x and never ran it (x "not used in the graph", or, with
    ``allow_unused=True``, a None that silently drops the penalty)."""
    single = not isinstance(outputs, tuple)
    items = (outputs,) if single else outputs
    anchors = tuple(t for t in anchors if isinstance(t, torch.Tensor) and t.requires_grad)
    err = torch._C._functions.DelayedError(
        f"disseg: {op} has no double backward (its fused kernels return gradients without a graph); "
        "for second derivatives use backend='reference' or the module with fused=False".encode(),
        len(items) + len(anchors),
    )

    def alias(t):  # DelayedError needs inputs that require grad to give its outputs a grad_fn
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach()
        t.requires_grad_(True)
        return t

    wrapped = err(*[alias(t) for t in items], *anchors)
    wrapped = (wrapped if isinstance(wrapped, tuple) else (wrapped,))[:len(items)]
    return wrapped[0] if single else tuple(wrapped)


def first_order_only(op: str):
    """Decorate an ``autograd.Function.backward``: it runs without building a graph; under
    ``create_graph=True`` its gradients raise a clear error if differentiated again. The
    op's saved tensors anchor that error to its inputs (``error_on_differentiation``), so
    the op's forward must save the inputs that require grad."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            return error_on_differentiation(outputs, op, ctx.saved_tensors)

        return wrapper

    return decorate
