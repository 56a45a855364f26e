"""Contrast-driven window attention, Triton kernels (formulas: ops/window_attention.py).

Three kernels, each over blocks of BLOCK_P pixels of one (batch, head), the head's channels
in one BLOCK_D tile and the k² slots/taps in one KKP tile (k² padded to a power of two):

- ``_window_attention_fwd_kernel``: per output pixel q, for each slot s the softmax row
  of the window p = q − o_s and the (BLOCK_P, k², BLOCK_D) tile of v at p + o_t, reduced
  over t; the fold is this sum over s. Nothing is written but y.
- ``_window_logits_grad_kernel``: per window p, v at p + o_t is loaded once; for each slot
  s, dA = dy[p + o_s] · v[p + o_t] over the head's channels, A recomputed from logits,
  dlogits = A ⊙ (dA − Σ_t A ⊙ dA); also the row log-sum-exp (B, heads, H·W, k²).
- ``_window_value_grad_kernel``: per input pixel r, for each tap t the windows p = r − o_t,
  A[p, s, t] = exp(logits − lse) over s, and dy at p + o_s, reduced over s.

Every index is int64; any strides of v, dy and logits are read as given (no copies), y and
dv are written channels-last and dlogits with logits' strides (the fake implementations
in ops/window_attention.py promise exactly these layouts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _window_attention_fwd_kernel(
    v_ptr, l_ptr, y_ptr,
    H, W, HEADS, HD,
    svb, svc, svh, svw,
    slb, slh, slp,
    syb, syc, syh, syw,
    K: tl.constexpr, KKP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    pid_p = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    R: tl.constexpr = K // 2
    KK: tl.constexpr = K * K
    q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    qmask = q < H * W
    qy = q // W
    qx = q % W
    t = tl.arange(0, KKP)
    tmask = t < KK
    ty = t // K - R
    tx = t % K - R
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    c = (h * HD + d).to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
    for s in tl.static_range(KK):
        py = qy - (s // K - R)
        px = qx - (s % K - R)
        pvalid = qmask & (py >= 0) & (py < H) & (px >= 0) & (px < W)
        lmask = pvalid[:, None] & tmask[None, :]
        lptrs = l_ptr + b * slb + h * slh + (py * W + px)[:, None] * slp + s * KK + t[None, :]
        logit = tl.load(lptrs, mask=lmask, other=float("-inf")).to(ACC)
        m = tl.where(pvalid, tl.max(logit, axis=1), 0.0)
        e = tl.where(lmask, tl.exp(logit - m[:, None]), 0.0)
        den = tl.where(pvalid, tl.sum(e, axis=1), 1.0)
        a = e / den[:, None]
        ny = py[:, None] + ty[None, :]
        nx = px[:, None] + tx[None, :]
        nvalid = lmask & (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        vptrs = v_ptr + b * svb + c[None, None, :] * svc + ny[:, :, None] * svh + nx[:, :, None] * svw
        vt = tl.load(vptrs, mask=nvalid[:, :, None] & dmask[None, None, :], other=0.0).to(ACC)
        acc += tl.sum(a[:, :, None] * vt, axis=1)
    yptrs = y_ptr + b * syb + c[None, :] * syc + qy[:, None] * syh + qx[:, None] * syw
    tl.store(yptrs, acc.to(y_ptr.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])


@triton.jit
def _window_logits_grad_kernel(
    dy_ptr, v_ptr, l_ptr, dl_ptr, lse_ptr,
    H, W, HEADS, HD,
    sgb, sgc, sgh, sgw,
    svb, svc, svh, svw,
    slb, slh, slp,
    K: tl.constexpr, KKP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
    NEED_DLOGITS: tl.constexpr,
):
    pid_p = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    R: tl.constexpr = K // 2
    KK: tl.constexpr = K * K
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pmask = p < H * W
    py = p // W
    px = p % W
    t = tl.arange(0, KKP)
    tmask = t < KK
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    c = (h * HD + d).to(tl.int64)
    lmask = pmask[:, None] & tmask[None, :]
    if NEED_DLOGITS:
        ny = py[:, None] + (t // K - R)[None, :]
        nx = px[:, None] + (t % K - R)[None, :]
        nvalid = lmask & (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        vptrs = v_ptr + b * svb + c[None, None, :] * svc + ny[:, :, None] * svh + nx[:, :, None] * svw
        v3 = tl.load(vptrs, mask=nvalid[:, :, None] & dmask[None, None, :], other=0.0).to(ACC)
    lse_base = lse_ptr + (pid_bh * H * W + p) * KK
    for s in tl.static_range(KK):
        lrow = b * slb + h * slh + p[:, None] * slp + s * KK + t[None, :]
        logit = tl.load(l_ptr + lrow, mask=lmask, other=float("-inf")).to(ACC)
        m = tl.where(pmask, tl.max(logit, axis=1), 0.0)
        e = tl.where(lmask, tl.exp(logit - m[:, None]), 0.0)
        den = tl.where(pmask, tl.sum(e, axis=1), 1.0)
        tl.store(lse_base + s, m + tl.log(den), mask=pmask)
        if NEED_DLOGITS:
            qy = py + (s // K - R)
            qx = px + (s % K - R)
            qvalid = pmask & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
            gptrs = dy_ptr + b * sgb + c[None, :] * sgc + qy[:, None] * sgh + qx[:, None] * sgw
            g = tl.load(gptrs, mask=qvalid[:, None] & dmask[None, :], other=0.0).to(ACC)
            dA = tl.sum(v3 * g[:, None, :], axis=2)
            a = e / den[:, None]
            gsum = tl.sum(a * dA, axis=1)
            dl = tl.where(qvalid[:, None], a * (dA - gsum[:, None]), 0.0)
            tl.store(dl_ptr + lrow, dl.to(dl_ptr.dtype.element_ty), mask=lmask)


@triton.jit
def _window_value_grad_kernel(
    dy_ptr, l_ptr, lse_ptr, dv_ptr,
    H, W, HEADS, HD,
    sgb, sgc, sgh, sgw,
    slb, slh, slp,
    sdb, sdc, sdh, sdw,
    K: tl.constexpr, KKP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
):
    pid_p = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    R: tl.constexpr = K // 2
    KK: tl.constexpr = K * K
    r = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    rmask = r < H * W
    ry = r // W
    rx = r % W
    s = tl.arange(0, KKP)
    smask = s < KK
    sy = s // K - R
    sx = s % K - R
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    c = (h * HD + d).to(tl.int64)
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
    for t in tl.static_range(KK):
        py = ry - (t // K - R)
        px = rx - (t % K - R)
        pvalid = rmask & (py >= 0) & (py < H) & (px >= 0) & (px < W)
        p = py * W + px
        qy = py[:, None] + sy[None, :]
        qx = px[:, None] + sx[None, :]
        qvalid = pvalid[:, None] & smask[None, :] & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
        logit = tl.load(l_ptr + b * slb + h * slh + p[:, None] * slp + s[None, :] * KK + t, mask=qvalid, other=0.0)
        lse = tl.load(lse_ptr + (pid_bh * H * W + p)[:, None] * KK + s[None, :], mask=qvalid, other=0.0)
        a = tl.where(qvalid, tl.exp(logit.to(ACC) - lse), 0.0)
        gptrs = dy_ptr + b * sgb + c[None, None, :] * sgc + qy[:, :, None] * sgh + qx[:, :, None] * sgw
        g = tl.load(gptrs, mask=qvalid[:, :, None] & dmask[None, None, :], other=0.0).to(ACC)
        acc += tl.sum(a[:, :, None] * g, axis=1)
    dptrs = dv_ptr + b * sdb + c[None, :] * sdc + ry[:, None] * sdh + rx[:, None] * sdw
    tl.store(dptrs, acc.to(dv_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def _meta(v: torch.Tensor, logits: torch.Tensor, kernel_size: int):
    B, C, H, W = v.shape
    heads = logits.shape[1]
    hd = C // heads
    kkp = triton.next_power_of_2(kernel_size * kernel_size)
    block_d = triton.next_power_of_2(hd)
    # a (BLOCK_P, KKP, BLOCK_D) tile of about 8K elements
    block_p = max(1, min(64, 8192 // (kkp * block_d)))
    block_p = min(block_p, triton.next_power_of_2(H * W))
    acc = tl.float64 if v.dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(H * W, block_p), B * heads)
    return B, C, H, W, heads, hd, kkp, block_d, block_p, acc, grid


def _channels_last_empty(v: torch.Tensor) -> torch.Tensor:
    return torch.empty(v.shape, dtype=v.dtype, device=v.device, memory_format=torch.channels_last)


def window_attention_forward_triton(v: torch.Tensor, logits: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """y (B, C, H, W), channels-last; logits' last two dims must be contiguous."""
    B, C, H, W, heads, hd, kkp, block_d, block_p, acc, grid = _meta(v, logits, kernel_size)
    y = _channels_last_empty(v)
    _window_attention_fwd_kernel[grid](
        v, logits, y,
        H, W, heads, hd,
        *v.stride(), *logits.stride()[:3], *y.stride(),
        K=kernel_size, KKP=kkp, BLOCK_P=block_p, BLOCK_D=block_d, ACC=acc,
    )
    return y


def window_attention_backward_triton(
    grad_y: torch.Tensor, v: torch.Tensor, logits: torch.Tensor, kernel_size: int, need_dv: bool, need_dlogits: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dv channels-last, dlogits with logits' strides); an unneeded one is empty (0,)."""
    B, C, H, W, heads, hd, kkp, block_d, block_p, acc, grid = _meta(v, logits, kernel_size)
    kk = kernel_size * kernel_size
    dv = _channels_last_empty(v) if need_dv else v.new_empty((0,))
    dlogits = torch.empty_like(logits) if need_dlogits else logits.new_empty((0,))
    if not (need_dv or need_dlogits):
        return dv, dlogits
    lse_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    lse = torch.empty((B, heads, H * W, kk), dtype=lse_dtype, device=v.device)
    _window_logits_grad_kernel[grid](
        grad_y, v, logits, dlogits if need_dlogits else logits, lse,
        H, W, heads, hd,
        *grad_y.stride(), *v.stride(), *logits.stride()[:3],
        K=kernel_size, KKP=kkp, BLOCK_P=block_p, BLOCK_D=block_d, ACC=acc, NEED_DLOGITS=need_dlogits,
    )
    if need_dv:
        _window_value_grad_kernel[grid](
            grad_y, logits, lse, dv,
            H, W, heads, hd,
            *grad_y.stride(), *logits.stride()[:3], *dv.stride(),
            K=kernel_size, KKP=kkp, BLOCK_P=block_p, BLOCK_D=block_d, ACC=acc,
        )
    return dv, dlogits
