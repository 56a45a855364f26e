"""Contrast-driven window attention, plain PyTorch (``shared/spec/cdfa.md``).

One attention step of ConDSeg's CDFA block, written the way the eager model computes
it: ``unfold`` the value map (a k²-fold copy), softmax the predicted logits over the
taps, a batched matmul, then ``fold`` (the scatter-add of the overlapping windows).

For window position p, slot s and tap t (offsets o_s, o_t of the k×k window):

    A[b, h, p, s, :] = softmax_t(logits[b, h, p, s, :])
    U[b, c, p, s]    = Σ_t A[b, h(c), p, s, t] · v[b, c, p + o_t]      (v zero-padded)
    y[b, c, q]       = Σ_s U[b, c, q − o_s, s]     over windows q − o_s inside the image

This is the executable form of the spec and what every fused backend is tested against;
it is float64-capable and works on any device.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def window_attention_reference(
    v: torch.Tensor,
    logits: torch.Tensor,
    kernel_size: int = 3,
    padding: int | None = None,
    stride: int = 1,
    attn_drop: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """y = fold(softmax(logits) @ unfold(v)).

    Args:
        v: (B, C, H, W) value map, C = heads · head_dim.
        logits: (B, heads, L, k², k²) attention logits (already scaled), L the number of
            window positions (H·W for stride 1 and padding k // 2); dims 3 and 4 are the
            slot s and the tap t.
        kernel_size: k, the window side.
        padding: zero padding of the windows (default k // 2).
        stride: window stride (the fused kernels support 1 only).
        attn_drop: optional function applied to the softmax (the module's dropout).

    Returns:
        (B, C, H, W), v's dtype.
    """
    k = int(kernel_size)
    pad = k // 2 if padding is None else int(padding)
    B, C, H, W = v.shape
    if v.numel() == 0 and stride == 1 and 2 * pad == k - 1:  # no channel or no pixel: nothing to attend (unfold refuses)
        return v.clone()
    heads = logits.shape[1]
    if C % heads:
        raise ValueError(f"v has C={C} channels, not a multiple of heads={heads} (logits.shape[1])")
    head_dim = C // heads
    kk = k * k
    cols = F.unfold(v, kernel_size=k, padding=pad, stride=stride)  # (B, C·k², L), index c·k² + t
    L = cols.shape[-1]
    if tuple(logits.shape) != (B, heads, L, kk, kk):
        raise ValueError(
            f"logits must have shape (B, heads, L, k², k²) = {(B, heads, L, kk, kk)}, got {tuple(logits.shape)}"
        )
    attn = torch.softmax(logits, dim=-1)  # over the taps t
    if attn_drop is not None:
        attn = attn_drop(attn)
    cols = cols.reshape(B, heads, head_dim, kk, L).permute(0, 1, 4, 3, 2)  # (B, h, L, t, d)
    u = attn @ cols  # (B, h, L, s, d)
    u = u.permute(0, 1, 4, 3, 2).reshape(B, C * kk, L)  # index c·k² + s
    return F.fold(u, output_size=(H, W), kernel_size=k, padding=pad, stride=stride)


def window_attention_direct(v: torch.Tensor, logits: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """The same function by the gather formula, one slot and one tap at a time.

    y[b, c, q] = Σ_s Σ_t A[b, h, q − o_s, s, t] · v[b, c, q − o_s + o_t], summed over the
    window centres q − o_s inside the image. No unfold or fold: a second, independent
    reading of the spec that the tests hold the reference against (stride 1, padding k//2).
    """
    k = int(kernel_size)
    r = k // 2
    B, C, H, W = v.shape
    heads = logits.shape[1]
    d = C // heads
    attn = torch.softmax(logits, dim=-1).reshape(B, heads, H, W, k * k, k * k)
    vp = F.pad(v, (2 * r, 2 * r, 2 * r, 2 * r)).reshape(B, heads, d, H + 4 * r, W + 4 * r)
    y = v.new_zeros(B, heads, d, H, W)
    for s in range(k * k):
        sy, sx = s // k - r, s % k - r
        # centres p = q − o_s; keep only those inside the image
        a_s = F.pad(attn[:, :, :, :, s, :], (0, 0, r, r, r, r))  # (B, h, H+2r, W+2r, t)
        a_s = a_s[:, :, r - sy : r - sy + H, r - sx : r - sx + W, :]
        for t in range(k * k):
            ty, tx = t // k - r, t % k - r
            oy, ox = ty - sy, tx - sx  # q − o_s + o_t
            src = vp[:, :, :, 2 * r + oy : 2 * r + oy + H, 2 * r + ox : 2 * r + ox + W]
            y = y + a_s[..., t].unsqueeze(2) * src
    return y.reshape(B, C, H, W)
