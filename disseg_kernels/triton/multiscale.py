"""Multi-scale upsample-and-concatenate, Triton kernels.

Forward: one program per (b, c) plane and block of output pixels of one input, reading
that input's four bilinear taps (align_corners=True) and writing straight into its
channel slice of the output. Backward: each output pixel of the slice adds its four
weighted taps into a float32 buffer of the input's size (atomics). Strided indexing
throughout (NCHW or channels_last); int64 index arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 256


@triton.jit
def _up_fwd_kernel(x_ptr, out_ptr, C, Hi, Wi, H, W, scale_h, scale_w,
                   sB, sC, sH, sW, osB, osC, osH, osW, c0, BLOCK: tl.constexpr):
    bc = tl.program_id(0).to(tl.int64)
    b = bc // C
    c = bc % C
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < H * W
    oh = offs // W
    ow = offs % W
    src_h = scale_h * oh.to(tl.float32)
    src_w = scale_w * ow.to(tl.float32)
    h0 = tl.minimum(src_h.to(tl.int64), Hi - 1)
    w0 = tl.minimum(src_w.to(tl.int64), Wi - 1)
    h1 = tl.where(h0 < Hi - 1, h0 + 1, h0)
    w1 = tl.where(w0 < Wi - 1, w0 + 1, w0)
    lh = src_h - h0.to(tl.float32)
    lw = src_w - w0.to(tl.float32)
    base = x_ptr + b * sB + c * sC
    v00 = tl.load(base + h0 * sH + w0 * sW, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(base + h0 * sH + w1 * sW, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(base + h1 * sH + w0 * sW, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(base + h1 * sH + w1 * sW, mask=mask, other=0.0).to(tl.float32)
    v = (1.0 - lh) * ((1.0 - lw) * v00 + lw * v01) + lh * ((1.0 - lw) * v10 + lw * v11)
    tl.store(out_ptr + b * osB + (c0 + c) * osC + oh * osH + ow * osW, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _up_bwd_kernel(g_ptr, acc_ptr, C, Hi, Wi, H, W, scale_h, scale_w,
                   gsB, gsC, gsH, gsW, c0, BLOCK: tl.constexpr):
    bc = tl.program_id(0).to(tl.int64)
    b = bc // C
    c = bc % C
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < H * W
    oh = offs // W
    ow = offs % W
    src_h = scale_h * oh.to(tl.float32)
    src_w = scale_w * ow.to(tl.float32)
    h0 = tl.minimum(src_h.to(tl.int64), Hi - 1)
    w0 = tl.minimum(src_w.to(tl.int64), Wi - 1)
    h1 = tl.where(h0 < Hi - 1, h0 + 1, h0)
    w1 = tl.where(w0 < Wi - 1, w0 + 1, w0)
    lh = src_h - h0.to(tl.float32)
    lw = src_w - w0.to(tl.float32)
    g = tl.load(g_ptr + b * gsB + (c0 + c) * gsC + oh * gsH + ow * gsW, mask=mask, other=0.0).to(tl.float32)
    plane = acc_ptr + bc * Hi * Wi
    tl.atomic_add(plane + h0 * Wi + w0, (1.0 - lh) * (1.0 - lw) * g, mask=mask)
    tl.atomic_add(plane + h0 * Wi + w1, (1.0 - lh) * lw * g, mask=mask)
    tl.atomic_add(plane + h1 * Wi + w0, lh * (1.0 - lw) * g, mask=mask)
    tl.atomic_add(plane + h1 * Wi + w1, lh * lw * g, mask=mask)


def _scale(i, o):
    return (i - 1) / (o - 1) if o > 1 else 0.0


def multiscale_fwd_triton(tensors, scales):
    t0 = tensors[0]
    b, h, w = t0.shape[0], t0.shape[2] * scales[0], t0.shape[3] * scales[0]
    fmt = torch.channels_last if (t0.is_contiguous(memory_format=torch.channels_last) and not t0.is_contiguous()) else torch.contiguous_format
    out = t0.new_empty((b, sum(t.shape[1] for t in tensors), h, w)).contiguous(memory_format=fmt)
    c0 = 0
    for t, s in zip(tensors, scales):
        c, hi, wi = t.shape[1], t.shape[2], t.shape[3]
        if b * c and h * w:
            grid = (b * c, triton.cdiv(h * w, _BLOCK))
            _up_fwd_kernel[grid](t, out, c, hi, wi, h, w, _scale(hi, h), _scale(wi, w), *t.stride(), *out.stride(), c0,
                                 BLOCK=_BLOCK)
        c0 += c
    return out


def multiscale_bwd_triton(grad, c0, like):
    b, c, hi, wi = like.shape
    h, w = grad.shape[2], grad.shape[3]
    acc = torch.zeros((b, c, hi, wi), dtype=torch.float32, device=grad.device)
    if b * c and h * w:
        grid = (b * c, triton.cdiv(h * w, _BLOCK))
        _up_bwd_kernel[grid](grad, acc, c, hi, wi, h, w, _scale(hi, h), _scale(wi, w), *grad.stride(), c0, BLOCK=_BLOCK)
    return acc.to(like.dtype).contiguous(memory_format=torch.channels_last if (like.is_contiguous(memory_format=torch.channels_last) and not like.is_contiguous()) else torch.contiguous_format)
