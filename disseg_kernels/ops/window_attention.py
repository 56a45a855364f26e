"""Contrast-driven window attention: the ``disseg::window_attention*`` custom ops, their
autograd, and ConDSeg's ``ContrastDrivenFeatureAggregation`` block.

The fused kernels compute softmax over the taps, the weighted gather over each k×k window
and the fold in one pass, as a gather per output pixel (no atomics):

    y[b, c, q] = Σ_s Σ_t A[b, h, q − o_s, s, t] · v[b, c, q − o_s + o_t]

over the window centres p = q − o_s inside the image, A = softmax_t(logits). The backward
saves only v and logits and recomputes A:

    dA[b, h, p, s, t]  = Σ_{c ∈ h} dy[b, c, p + o_s] · v[b, c, p + o_t]   (p + o_s inside)
    dlogits            = A ⊙ (dA − Σ_t A ⊙ dA)                           (softmax Jacobian)
    dv[b, c, r]        = Σ_t Σ_s A[b, h, r − o_t, s, t] · dy[b, c, r − o_t + o_s]

The first is one window-centred pass that also keeps the per-row log-sum-exp (B, heads,
H·W, k²: 1/k² of the logits); the second is a gather per input pixel using it. Neither
the (B, C·k², H·W) unfold buffer nor the (B, heads, H·W, k², head_dim) product exists
at any point.

Layouts: the kernels read any strides of ``logits`` whose last two dims are contiguous
(so the permuted view of the attention Linear's output is used as is) and return ``y`` and
``dv`` in channels-last memory (B, C, H, W with C innermost), which is what the block's
per-pixel Linear projections read and write without a copy.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _backend
from ..reference.window_attention import window_attention_reference
from ._args import as_int
from ._autograd import first_order_only
from .telu import TeLU

_FAMILY = "window_attention"


def _y_like(v: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(v.shape, dtype=dtype or v.dtype, device=v.device, memory_format=torch.channels_last)


def _run_forward(backend: str, v, logits, kernel_size):
    if backend in ("cpu", "cuda"):
        return torch.ops.disseg.window_attention_forward(v, logits, kernel_size)
    if backend == "triton":
        from ..triton.window_attention import window_attention_forward_triton

        return window_attention_forward_triton(v, logits, kernel_size)
    raise ValueError(f"no fused window_attention kernel for backend {backend!r}")


def _run_backward(backend: str, grad_y, v, logits, kernel_size, need_dv, need_dlogits):
    if backend in ("cpu", "cuda"):
        return torch.ops.disseg.window_attention_backward(grad_y, v, logits, kernel_size, need_dv, need_dlogits)
    if backend == "triton":
        from ..triton.window_attention import window_attention_backward_triton

        return window_attention_backward_triton(grad_y, v, logits, kernel_size, need_dv, need_dlogits)
    raise ValueError(f"no fused window_attention kernel for backend {backend!r}")


@torch.library.custom_op("disseg::window_attention", mutates_args=())
def _window_attention_op(v: torch.Tensor, logits: torch.Tensor, kernel_size: int, backend: str) -> torch.Tensor:
    """y (B, C, H, W), channels-last, of v (B, C, H, W) and logits (B, heads, H·W, k², k²)."""
    return _run_forward(backend, v, logits, kernel_size)


@_window_attention_op.register_fake
def _(v, logits, kernel_size, backend):
    return _y_like(v)


@torch.library.custom_op("disseg::window_attention_grad", mutates_args=())
def _window_attention_grad_op(
    grad_y: torch.Tensor,
    v: torch.Tensor,
    logits: torch.Tensor,
    kernel_size: int,
    need_dv: bool,
    need_dlogits: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dv, dlogits); dv is channels-last, dlogits has logits' strides; either is empty
    (shape (0,)) when not needed."""
    dv, dlogits = _run_backward(backend, grad_y, v, logits, kernel_size, need_dv, need_dlogits)
    return dv, dlogits


@_window_attention_grad_op.register_fake
def _(grad_y, v, logits, kernel_size, need_dv, need_dlogits, backend):
    dv = _y_like(v) if need_dv else v.new_empty((0,))
    dlogits = torch.empty_like(logits) if need_dlogits else logits.new_empty((0,))
    return dv, dlogits


def _setup_context(ctx, inputs, output):
    v, logits, kernel_size, backend = inputs
    ctx.save_for_backward(v, logits)
    ctx.kernel_size, ctx.backend = kernel_size, backend


def _backward(ctx, grad_y):
    v, logits = ctx.saved_tensors
    need_dv, need_dlogits = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dv or need_dlogits):
        return None, None, None, None
    dv, dlogits = _window_attention_grad_op(
        grad_y.contiguous(memory_format=torch.channels_last),
        v,
        logits,
        ctx.kernel_size,
        need_dv,
        need_dlogits,
        ctx.backend,
    )
    return (dv if need_dv else None), (dlogits if need_dlogits else None), None, None


_window_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _WindowAttentionEager(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager mode only.

    A ``torch.library.custom_op`` call with autograd costs ~60 µs of Python per forward and
    ~200 µs per forward+backward on a CPU core before any kernel runs: more than the whole
    GPU work at H = W = 16 or 32. Eager calls come here (one ``Function.apply``, the same
    kernels); torch.compile traces the custom ops (``window_attention`` picks by
    ``_backend.use_custom_op()``)."""

    @staticmethod
    def forward(ctx, v, logits, kernel_size, backend):
        ctx.save_for_backward(v, logits)
        ctx.kernel_size, ctx.backend = kernel_size, backend
        return _run_forward(backend, v, logits, kernel_size)

    @staticmethod
    @first_order_only("window_attention")
    def backward(ctx, grad_y):
        v, logits = ctx.saved_tensors
        need_dv, need_dlogits = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dv or need_dlogits):
            return None, None, None, None
        if not grad_y.is_contiguous(memory_format=torch.channels_last):
            grad_y = grad_y.contiguous(memory_format=torch.channels_last)
        dv, dlogits = _run_backward(ctx.backend, grad_y, v, logits, ctx.kernel_size, need_dv, need_dlogits)
        return (dv if need_dv else None), (dlogits if need_dlogits else None), None, None


def _kernel_logits(logits: torch.Tensor, kk: int) -> torch.Tensor:
    """``logits`` itself if the kernels can read its strides (last two dims contiguous,
    dense and non-overlapping: e.g. the permuted view of a Linear's output), else a
    contiguous copy."""
    if logits.stride(-1) == 1 and logits.stride(-2) == kk:
        # dense and non-overlapping: the strides of the dims of size > 1, taken in the
        # order that makes each equal the product of the sizes before it, leave no gap.
        # (A selection, not sorted(): sorted() of symbolic sizes breaks torch.compile's
        # dynamic shapes.)
        dims = [(n, st) for n, st in zip(logits.shape, logits.stride()) if n != 1]
        expected = 1
        while dims:
            hit = next((i for i, (_, st) in enumerate(dims) if st == expected), None)
            if hit is None:
                break
            expected *= dims.pop(hit)[0]
        else:
            return logits
    return logits.contiguous()


def _validate(v, logits, kernel_size):
    if not isinstance(v, torch.Tensor) or not isinstance(logits, torch.Tensor):
        raise TypeError(f"v and logits must be tensors, got {type(v).__name__} and {type(logits).__name__}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int ≥ 1, got {kernel_size!r}")
    if v.dim() != 4:
        raise ValueError(f"v must have shape (B, C, H, W), got shape {tuple(v.shape)}")
    if not v.dtype.is_floating_point:
        raise TypeError(f"v must be a floating-point tensor, got dtype {v.dtype}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.device != v.device:
        raise ValueError(f"logits must be on v's device {v.device}, got {logits.device}")
    B, C, H, W = v.shape
    kk = kernel_size * kernel_size
    if logits.dim() != 5 or logits.shape[0] != B or tuple(logits.shape[2:]) != (H * W, kk, kk):
        raise ValueError(
            f"logits must have shape (B, heads, H·W, k², k²) = ({B}, heads, {H * W}, {kk}, {kk}), "
            f"got {tuple(logits.shape)}"
        )
    heads = logits.shape[1]
    if heads < 1 or C % heads:
        raise ValueError(f"v has C={C} channels, not a multiple of heads={heads} (logits.shape[1])")


def window_attention(
    v: torch.Tensor, logits: torch.Tensor, kernel_size: int = 3, backend: str = "auto"
) -> torch.Tensor:
    """One contrast-driven window-attention step (``shared/spec/cdfa.md``).

    y[b, c, q] = Σ_s U[b, c, q − o_s, s],  U[b, c, p, s] = Σ_t softmax_t(logits)[b, h(c), p, s, t]
    · v[b, c, p + o_t], for k×k windows of stride 1 and zero padding k // 2.

    Args:
        v: (B, C, H, W) value map, C = heads · head_dim; float64, float32, bfloat16 or
            float16 (half types accumulate in float32). Channels-last memory is read
            without a copy by the CPU kernel; any strides work.
        logits: (B, heads, H·W, k², k²) attention logits (slot s, then tap t). A dtype
            other than v's is promoted with it: both are computed in the wider one.
        kernel_size: k, odd (a NumPy or 0-d tensor integer is taken too).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        (B, C, H, W) in the promoted dtype of v and logits; under autocast on v's device,
        in the autocast dtype unless an input is float64 (the reference's last step is a
        matmul, which autocast runs in that dtype). Channels-last memory from the fused
        backends.
        Differentiable once through the fused backends (no double backward).
    """
    kernel_size = as_int(kernel_size)
    _validate(v, logits, kernel_size)
    out_dtype = _autocast_dtype(v, logits)
    if logits.dtype != v.dtype:
        common = torch.promote_types(v.dtype, logits.dtype)
        v, logits = v.to(common), logits.to(common)
    chosen = _backend.resolve(_FAMILY, backend, v.device)
    if chosen == "reference" or v.numel() == 0 or logits.numel() == 0:
        y = window_attention_reference(v, logits, kernel_size)
    else:
        y = _window_attention_fused(v, _kernel_logits(logits, kernel_size * kernel_size), kernel_size, chosen)
    # The fused kernels accumulate in float32 whatever the autocast dtype; only the result
    # is rounded to it, as the reference's autocast matmul rounds its output.
    return y if out_dtype is None or y.dtype == out_dtype else y.to(out_dtype)


def _window_attention_fused(v, logits, kernel_size, chosen):
    if _backend.use_custom_op():
        return _window_attention_op(v, logits, kernel_size, chosen)
    if not (torch.is_grad_enabled() and (v.requires_grad or logits.requires_grad)):
        return _run_forward(chosen, v, logits, kernel_size)
    return _WindowAttentionEager.apply(v, logits, kernel_size, chosen)


def _autocast_dtype(v, logits):
    """The dtype autocast gives the reference's final matmul on v's device, or None when
    autocast is off there or does not cast (a float64 input)."""
    device_type = v.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    if torch.float64 in (v.dtype, logits.dtype):
        return None
    return torch.get_autocast_dtype(device_type)


# --------------------------------------------------------------------------- the block


class _CBT(nn.Module):
    """3×3 conv (no bias) → BatchNorm → TeLU (x · tanh(eˣ), Med-DisSeg's activation in place
    of ConDSeg's ReLU): ``conv.0`` / ``conv.1`` as in the authors' state dicts, so their
    checkpoints load by name. TeLU is disseg_kernels' (fused or eager with the block)."""

    def __init__(self, in_c: int, out_c: int, fused: bool, backend: str):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_c, out_c, 3, padding=1, bias=False), nn.BatchNorm2d(out_c))
        self.telu = TeLU(fused=fused, backend="reference" if backend == "reference" else "auto")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.telu(self.conv(x))


class ContrastDrivenFeatureAggregation(nn.Module):
    """ConDSeg's CDFA block with Med-DisSeg's TeLU (``shared/spec/cdfa.md``).

    input CBTs (in_c → out_c → out_c) → value Linear → window attention with logits
    predicted from the fg guide → proj → window attention of that result with logits from
    the bg guide → proj (the same Linear) → output CBTs (out_c → out_c → out_c).

    Parameters (names as in the authors' code): ``v`` Linear(C, C), ``attn_fg`` and
    ``attn_bg`` Linear(C, heads·k⁴), ``proj`` Linear(C, C), ``input_cbt.{0,1}.conv.{0,1}``,
    ``output_cbt.{0,1}.conv.{0,1}``; 707,464 of them for in_c = out_c = 128, 854,920 for
    in_c = 256, out_c = 128.

    ``fused=True`` runs each attention step through :func:`window_attention` (one kernel,
    forward and backward) and folds the head_dim^-0.5 scale into the logits Linear (the
    same map, one logits-sized tensor fewer); ``fused=False`` is the eager unfold / matmul
    / fold formula. Both hold the same parameters and give the same outputs and gradients.
    The fused kernels support stride 1, padding k // 2 and no attention dropout (raised
    at construction otherwise; ``fused=False`` supports them all).

    forward(x, fg, bg): x (B, in_c, H, W); fg, bg (B, out_c, H, W) guide maps →
    (B, out_c, H, W).
    """

    def __init__(
        self,
        in_c: int,
        out_c: int,
        num_heads: int = 4,
        kernel_size: int = 3,
        padding: int = 1,
        stride: int = 1,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if num_heads < 1 or out_c % num_heads:
            raise ValueError(f"out_c={out_c} must be a positive multiple of num_heads={num_heads}")
        if fused:
            if kernel_size % 2 == 0 or padding != kernel_size // 2 or stride != 1:
                raise ValueError(
                    "fused=True supports odd kernel_size with padding=kernel_size//2 and stride=1, "
                    f"got kernel_size={kernel_size}, padding={padding}, stride={stride}; use fused=False"
                )
            if attn_drop != 0.0:
                raise ValueError(f"fused=True does not apply attention dropout, got attn_drop={attn_drop}; use fused=False")
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        self.in_c, self.dim, self.num_heads = in_c, out_c, num_heads
        self.kernel_size, self.padding, self.stride = kernel_size, padding, stride
        self.head_dim = out_c // num_heads
        self.scale = self.head_dim**-0.5
        self.fused, self.backend = fused, backend
        kk = kernel_size * kernel_size

        self.v = nn.Linear(out_c, out_c)
        self.attn_fg = nn.Linear(out_c, kk * kk * num_heads)
        self.attn_bg = nn.Linear(out_c, kk * kk * num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(out_c, out_c)
        self.proj_drop = nn.Dropout(proj_drop)
        self.input_cbt = nn.Sequential(_CBT(in_c, out_c, fused, backend), _CBT(out_c, out_c, fused, backend))
        self.output_cbt = nn.Sequential(_CBT(out_c, out_c, fused, backend), _CBT(out_c, out_c, fused, backend))

    # (B, C, H, W) guide → (B, heads, h·w, k², k²) scaled logits, a view of the Linear's
    # (B, h, w, heads·k⁴) output
    def _logits(self, guide: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        B = guide.shape[0]
        if self.stride != 1:
            guide = F.avg_pool2d(guide, self.stride, self.stride, ceil_mode=True)
        h, w = guide.shape[-2:]
        g = guide.permute(0, 2, 3, 1)
        if self.fused:
            out = F.linear(g, layer.weight * self.scale, layer.bias * self.scale)
        else:
            out = layer(g) * self.scale
        kk = self.kernel_size * self.kernel_size
        return out.reshape(B, h * w, self.num_heads, kk, kk).permute(0, 2, 1, 3, 4)

    def _step(self, v: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → proj(window attention) as (B, H, W, C)."""
        if self.fused:
            y = window_attention(v, logits, self.kernel_size, self.backend)
        else:
            y = window_attention_reference(
                v, logits, self.kernel_size, self.padding, self.stride, attn_drop=self.attn_drop
            )
        return self.proj_drop(self.proj(y.permute(0, 2, 3, 1)))

    def forward(self, x: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_c:
            raise ValueError(f"x must have shape (B, {self.in_c}, H, W), got {tuple(x.shape)}")
        for name, g in (("fg", fg), ("bg", bg)):
            if g.dim() != 4 or g.shape[0] != x.shape[0] or g.shape[1] != self.dim or g.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"{name} must have shape ({x.shape[0]}, {self.dim}, {x.shape[2]}, {x.shape[3]}), got {tuple(g.shape)}"
                )
        x = self.input_cbt(x)
        v = self.v(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # channels-last memory
        x = self._step(v, self._logits(fg, self.attn_fg))
        x = self._step(x.permute(0, 3, 1, 2), self._logits(bg, self.attn_bg))
        return self.output_cbt(x.permute(0, 3, 1, 2))

    def extra_repr(self) -> str:
        return (
            f"in_c={self.in_c}, out_c={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
            f"padding={self.padding}, stride={self.stride}, "
            f"fused={self.fused}, backend={self.backend!r}"
        )
