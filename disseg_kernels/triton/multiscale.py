"""Multi-scale upsample-and-concatenate, Triton kernels.

Forward: each program takes a block of one input's output elements, reads their four
bilinear taps (align_corners=True) and writes straight into the input's channel slice of
the output. Backward: a gather, as csrc/multiscale_cuda.cu's (no atomics, so deterministic): each input
element sums the weighted output gradients of the output rows and columns whose taps reach
it, found from a candidate range and tested with the forward's own tap arithmetic. It is
separable: one pass along W into a float32 (B, C, H, Wi) buffer, one along H writing the
input's gradient once, in its dtype and layout. On the H200 the one-pass 2-D gather (NW·NH
= 81 candidates per element at ×2, 441 at ×8) was compute-bound at ~7x PyTorch's
upsample backward in the Stage II step (benchmarks/results/models_cuda_2026-11-27_profile.md);
the two passes test NW + NH. Small gradients keep the one-pass gather: there the launch,
not the arithmetic, is the cost.

The block follows the layout of what the program writes: NCHW, one (b, c) plane's pixels
(unit stride along the block); channels_last, one image's (pixel, channel) pairs with the
channel fastest, so that neighbouring lanes write neighbouring channels instead of
addresses C apart. Strided indexing throughout; int64 index arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 256
# Input-gradient elements below which the backward is the one-pass 2-D gather (one launch
# per input: at such sizes a launch costs more than the NW·NH candidate tests) instead of
# the two separable passes (two launches and a buffer, about NW + NH tests per element).
SEPARABLE_MIN_ELEMENTS = 1 << 16


@triton.jit
def _block_elements(C, n_pix, BLOCK: tl.constexpr, CHANNEL_FAST: tl.constexpr):
    """(b, c, pixel, mask) of this program's block. Grid: (B·C, cdiv(n_pix, BLOCK)) for
    planes, (cdiv(n_pix·C, BLOCK), B) with the channel fastest (the long axis first: grid
    axis 1 stops at 65,535)."""
    if CHANNEL_FAST:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        b = tl.program_id(1).to(tl.int64)
        c = offs % C
        pix = offs // C
        mask = offs < n_pix * C
    else:
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        bc = tl.program_id(0).to(tl.int64)
        b = bc // C
        c = bc % C
        pix = offs
        mask = offs < n_pix
    return b, c, pix, mask


@triton.jit
def _up_fwd_kernel(x_ptr, out_ptr, C, Hi, Wi, H, W, scale_h, scale_w,
                   sB, sC, sH, sW, osB, osC, osH, osW, c0, BLOCK: tl.constexpr, CHANNEL_FAST: tl.constexpr):
    b, c, pix, mask = _block_elements(C, H * W, BLOCK, CHANNEL_FAST)
    oh = pix // W
    ow = pix % W
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
def _tap_weight(o, k, n_in, scale):
    """The weight of input index k in output index o's two taps (the forward's arithmetic),
    and whether k is one of them."""
    src = scale * o.to(tl.float32)
    i0 = tl.minimum(src.to(tl.int64), n_in - 1)
    i1 = tl.where(i0 < n_in - 1, i0 + 1, i0)
    lam = src - i0.to(tl.float32)
    w = tl.where(i0 == k, 1.0 - lam, 0.0) + tl.where(i1 == k, lam, 0.0)
    return w, (i0 == k) | (i1 == k)


@triton.jit
def _first_candidate(k, n_in, n_out):
    """The first output index that may have a tap on input index k (csrc/multiscale_cuda.cu's
    ``candidates``: a superset, the tap test decides)."""
    lo = ((k - 1) * (n_out - 1)) // tl.maximum(n_in - 1, 1) - 1
    return tl.where((k >= 1) & (n_in > 1), tl.maximum(lo, 0), 0)


@triton.jit
def _up_bwd_kernel(g_ptr, gin_ptr, C, Hi, Wi, H, W, scale_h, scale_w, NH, NW,
                   gsB, gsC, gsH, gsW, isB, isC, isH, isW, c0, BLOCK: tl.constexpr, CHANNEL_FAST: tl.constexpr):
    b, c, pix, mask = _block_elements(C, Hi * Wi, BLOCK, CHANNEL_FAST)
    hi = pix // Wi
    wi = pix % Wi
    oh_lo = _first_candidate(hi, Hi, H)
    ow_lo = _first_candidate(wi, Wi, W)
    g_plane = g_ptr + b * gsB + (c0 + c) * gsC
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, NH):
        oh = oh_lo + i
        wh, hit_h = _tap_weight(oh, hi, Hi, scale_h)
        hit_h = hit_h & mask & (oh < H)
        row = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(0, NW):
            ow = ow_lo + j
            ww, hit_w = _tap_weight(ow, wi, Wi, scale_w)
            g = tl.load(g_plane + oh * gsH + ow * gsW, mask=hit_h & hit_w & (ow < W), other=0.0).to(tl.float32)
            row += ww * g
        acc += wh * row
    tl.store(gin_ptr + b * isB + c * isC + hi * isH + wi * isW, acc.to(gin_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _up_bwd_axis_kernel(src_ptr, dst_ptr, C, Hd, Wd, n_in, n_out, scale, NC,
                        ssB, ssC, ssH, ssW, dsB, dsC, dsH, dsW, c0,
                        ALONG_W: tl.constexpr, BLOCK: tl.constexpr, CHANNEL_FAST: tl.constexpr):
    """One axis of the backward gather: dst[b, c, h, w] = Σ_o weight(o, k) · src[b, c0 + c, ., .]
    over the source indices o along the axis (W when ALONG_W, else H) whose taps reach the
    destination index k there (w or h); the other index is the same in src and dst."""
    b, c, pix, mask = _block_elements(C, Hd * Wd, BLOCK, CHANNEL_FAST)
    h = pix // Wd
    w = pix % Wd
    if ALONG_W:
        k = w
        line = src_ptr + b * ssB + (c0 + c) * ssC + h * ssH
        step = ssW
    else:
        k = h
        line = src_ptr + b * ssB + (c0 + c) * ssC + w * ssW
        step = ssH
    lo = _first_candidate(k, n_in, n_out)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in range(0, NC):
        o = lo + j
        wt, hit = _tap_weight(o, k, n_in, scale)
        g = tl.load(line + o * step, mask=mask & hit & (o < n_out), other=0.0).to(tl.float32)
        acc += wt * g
    tl.store(dst_ptr + b * dsB + c * dsC + h * dsH + w * dsW, acc.to(dst_ptr.dtype.element_ty), mask=mask)


def _scale(i, o):
    return (i - 1) / (o - 1) if o > 1 else 0.0


def _grid(written: torch.Tensor, b: int, c: int, n_pix: int):
    """The launch grid and CHANNEL_FAST for blocks that write ``written``'s (b, c, pixel)
    elements: channel-fast when its channels are unit-stride (channels_last), else planes."""
    channel_fast = c > 1 and written.stride(1) == 1
    if channel_fast:
        return (triton.cdiv(n_pix * c, _BLOCK), b), True
    return (b * c, triton.cdiv(n_pix, _BLOCK)), False


def multiscale_fwd_triton(tensors, scales):
    t0 = tensors[0]
    if t0.dtype == torch.float64:  # (the backward takes the forward's dtype: checked here once)
        raise ValueError("the Triton multiscale kernels compute in float32; float64 runs on the 'cpu', 'cuda' or "
                         "'reference' backend")
    b, h, w = t0.shape[0], t0.shape[2] * scales[0], t0.shape[3] * scales[0]
    fmt = torch.channels_last if (t0.is_contiguous(memory_format=torch.channels_last) and not t0.is_contiguous()) else torch.contiguous_format
    out = t0.new_empty((b, sum(t.shape[1] for t in tensors), h, w)).contiguous(memory_format=fmt)
    c0 = 0
    for t, s in zip(tensors, scales):
        c, hi, wi = t.shape[1], t.shape[2], t.shape[3]
        if b * c and h * w:
            grid, channel_fast = _grid(out, b, c, h * w)
            _up_fwd_kernel[grid](t, out, c, hi, wi, h, w, _scale(hi, h), _scale(wi, w), *t.stride(), *out.stride(), c0,
                                 BLOCK=_BLOCK, CHANNEL_FAST=channel_fast)
        c0 += c
    return out


def _n_candidates(n_in: int, n_out: int) -> int:
    """An upper bound on the output indices that have a tap on one input index."""
    if n_in <= 1:
        return n_out
    return min(n_out, (2 * (n_out - 1) + n_in - 2) // (n_in - 1) + 4)


def _gather_axis(src, dst, c0: int, along_w: bool, n_in: int, n_out: int) -> None:
    b, c, hd, wd = dst.shape
    grid, channel_fast = _grid(dst, b, c, hd * wd)
    _up_bwd_axis_kernel[grid](src, dst, c, hd, wd, n_in, n_out, _scale(n_in, n_out), _n_candidates(n_in, n_out),
                              *src.stride(), *dst.stride(), c0, ALONG_W=along_w, BLOCK=_BLOCK,
                              CHANNEL_FAST=channel_fast)


def multiscale_bwd_triton(grad, c0, like):
    """The gradient of the input ``like`` stands for (its shape, dtype and layout): a gather
    over the output pixels whose taps reach each input pixel, separable: along W into a
    float32 (B, C, H, Wi) buffer in ``like``'s layout, then along H into the result (about
    NW + NH candidate reads per element instead of NW·NH); below SEPARABLE_MIN_ELEMENTS the
    one-pass 2-D gather, one launch. One factor scales both axes: an unscaled input's
    gradient is a copy of its channel slice."""
    b, c, hi, wi = like.shape
    h, w = grad.shape[2], grad.shape[3]
    gin = torch.empty_like(like)
    if not (b * c and hi * wi):
        return gin
    if hi == h and wi == w:
        gin.copy_(grad[:, c0:c0 + c])
        return gin
    if gin.numel() < SEPARABLE_MIN_ELEMENTS:
        grid, channel_fast = _grid(gin, b, c, hi * wi)
        _up_bwd_kernel[grid](grad, gin, c, hi, wi, h, w, _scale(hi, h), _scale(wi, w),
                             _n_candidates(hi, h), _n_candidates(wi, w), *grad.stride(), *gin.stride(), c0,
                             BLOCK=_BLOCK, CHANNEL_FAST=channel_fast)
        return gin
    fmt = torch.channels_last if gin.stride(1) == 1 and c > 1 else torch.contiguous_format
    rows = torch.empty((b, c, h, wi), device=grad.device, dtype=torch.float32, memory_format=fmt)
    _gather_axis(grad, rows, c0, True, wi, w)
    _gather_axis(rows, gin, 0, False, hi, h)
    return gin
