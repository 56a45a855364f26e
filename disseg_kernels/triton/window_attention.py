"""Contrast-driven window attention, Triton kernels (formulas: ops/window_attention.py).

Three kernels, each over blocks of BLOCK_P pixels of one (batch, head), the head's channels
in one BLOCK_D tile; one launch forward, two backward (docs/window_attention_gpu.md):

- ``_window_attention_fwd_kernel`` (a gather per output pixel q, two algorithms, ALGO):
  0 "taps": per slot s, the softmax row of window q − o_s and a (BLOCK_P, k², BLOCK_D)
  tile of v at q − o_s + o_t reduced over t (k⁴ channel FMAs per output);
  1 "offsets": first the log-sum-exp of each row the program gathers from (into a
  (B, heads, H·W, k²) scratch, 1/k² of the logits), then y[q] = Σ_δ w[q, δ] · v[q + δ]
  over the (2k−1)² offsets δ = o_t − o_s, w[q, δ] = Σ_s A[q − o_s, s, δ + o_s]
  ((2k−1)² = 25 channel FMAs per output instead of 81, every tile 2-D).
- ``_window_logits_grad_kernel``: per window p, v at p + o_t is loaded once; for each slot
  s, dA = dy[p + o_s] · v[p + o_t] over the head's channels, A recomputed from logits,
  dlogits = A ⊙ (dA − Σ_t A ⊙ dA); also the row log-sum-exp (B, heads, H·W, k²).
- ``_window_value_grad_kernel``: per input pixel r, the same two algorithms on
  dv[r] = Σ_t Σ_s A[r − o_t, s, t] · dy[r − o_t + o_s] (offsets δ = o_s − o_t).

Loops over slots, taps and offsets are runtime loops: unrolled (``static_range``), the
bodies were too long for ptxas to keep in registers (kilobytes of local-memory spills per
thread). On the GPU ``triton.autotune`` picks (BLOCK_P, num_warps, ALGO) per (H, W, heads,
head_dim); under the interpreter or with DISSEG_TRITON_AUTOTUNE=0 a fixed configuration.

Every index is int64; any strides of v, dy and logits are read as given (no copies), y and
dv are written channels-last and dlogits with logits' strides (the fake implementations
in ops/window_attention.py promise exactly these layouts).
"""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl

from ._settings import autotune_enabled as _autotune_enabled
from ._settings import interpret as _interpret


@triton.jit
def _window_attention_fwd_kernel(
    v_ptr, l_ptr, y_ptr, lse_ptr,
    H, W, HEADS, HD,
    svb, svc, svh, svw,
    slb, slh, slp,
    syb, syc, syh, syw,
    K: tl.constexpr, KKP: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
    ALGO: tl.constexpr,
):
    pid_p = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    R: tl.constexpr = K // 2
    KK: tl.constexpr = K * K
    E: tl.constexpr = 2 * K - 1  # side of the square of offsets o_t − o_s
    q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    qmask = q < H * W
    qy = q // W
    qx = q % W
    t = tl.arange(0, KKP)
    tmask = t < KK
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    c = (h * HD + d).to(tl.int64)
    l_bh = l_ptr + b * slb + h * slh
    lse_bh = lse_ptr + pid_bh * H * W * KK
    v_bc = v_ptr + b * svb + c * svc
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
    if ALGO == 0:
        # "taps": per slot s, the softmax row of window q − o_s and the (BLOCK_P, k², BLOCK_D)
        # tile of v at q − o_s + o_t, reduced over t. A runtime loop: unrolled, the body
        # is too long for ptxas to keep in registers (it spilled kilobytes per thread).
        for s in range(0, KK):
            sy = s // K - R
            sx = s % K - R
            py = qy - sy
            px = qx - sx
            pvalid = qmask & (py >= 0) & (py < H) & (px >= 0) & (px < W)
            lmask = pvalid[:, None] & tmask[None, :]
            logit = tl.load(l_bh + (py * W + px)[:, None] * slp + s * KK + t[None, :], mask=lmask,
                            other=float("-inf")).to(ACC)
            m = tl.where(pvalid, tl.max(logit, axis=1), 0.0)
            e = tl.where(lmask, tl.exp(logit - m[:, None]), 0.0)
            a = e / tl.where(pvalid, tl.sum(e, axis=1), 1.0)[:, None]
            ny = py[:, None] + (t // K - R)[None, :]
            nx = px[:, None] + (t % K - R)[None, :]
            nvalid = lmask & (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
            vptrs = v_bc[None, None, :] + (ny * svh + nx * svw)[:, :, None]
            vt = tl.load(vptrs, mask=nvalid[:, :, None] & dmask[None, None, :], other=0.0).to(ACC)
            acc += tl.sum(a[:, :, None] * vt, axis=1)
    else:
        # "offsets". Phase 1: the log-sum-exp of each softmax row (window q − o_s, slot s)
        # this program gathers from (each row belongs to exactly one output pixel).
        for s in range(0, KK):
            py = qy - (s // K - R)
            px = qx - (s % K - R)
            pvalid = qmask & (py >= 0) & (py < H) & (px >= 0) & (px < W)
            p = py * W + px
            lmask = pvalid[:, None] & tmask[None, :]
            row = tl.load(l_bh + p[:, None] * slp + s * KK + t[None, :], mask=lmask, other=float("-inf")).to(ACC)
            m = tl.where(pvalid, tl.max(row, axis=1), 0.0)
            den = tl.sum(tl.where(lmask, tl.exp(row - m[:, None]), 0.0), axis=1)
            tl.store(lse_bh + p * KK + s, m + tl.log(tl.where(pvalid, den, 1.0)), mask=pvalid)
        tl.debug_barrier()  # phase 2 reads rows written by other threads of this program
        # Phase 2: y[q] = Σ_δ w[q, δ] · v[q + δ] over the (2k−1)² offsets δ = o_t − o_s,
        # w[q, δ] = Σ_s A[q − o_s, s, t(δ + o_s)]: (2k−1)² channel FMAs per output, not k⁴.
        v_q = v_bc[None, :] + (qy * svh + qx * svw)[:, None]
        # window q − o_s is q shifted by a scalar: its rows are q's addresses plus a constant
        l_q = l_bh + q * slp
        lse_q = lse_bh + q * KK
        for e in range(0, E * E):
            ey = e // E - (K - 1)
            ex = e % E - (K - 1)
            ny = qy + ey
            nx = qx + ex
            nvalid = qmask & (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
            w = tl.zeros((BLOCK_P,), dtype=ACC)
            for s in range(0, KK):
                sy = s // K - R
                sx = s % K - R
                ty = ey + sy
                tx = ex + sx
                if (ty >= -R) & (ty <= R) & (tx >= -R) & (tx <= R):  # tap t inside the window
                    py = qy - sy
                    px = qx - sx
                    pvalid = nvalid & (py >= 0) & (py < H) & (px >= 0) & (px < W)
                    shift = (sy * W + sx).to(tl.int64)
                    lg = tl.load(l_q + (s * KK + (ty + R) * K + (tx + R) - shift * slp), mask=pvalid, other=0.0)
                    ls = tl.load(lse_q + (s - shift * KK), mask=pvalid, other=0.0)
                    w += tl.where(pvalid, tl.exp(lg.to(ACC) - ls), 0.0)
            vt = tl.load(v_q + (ey * svh + ex * svw), mask=nvalid[:, None] & dmask[None, :], other=0.0).to(ACC)
            acc += w[:, None] * vt
    yptrs = y_ptr + b * syb + c[None, :] * syc + qy[:, None] * syh + qx[:, None] * syw
    tl.store(yptrs, acc.to(y_ptr.dtype.element_ty), mask=qmask[:, None] & dmask[None, :])


@triton.jit
def _window_logits_grad_kernel(
    dy_ptr, v_ptr, l_ptr, dl_ptr, lse_ptr,
    H, W, HEADS, HD,
    sgb, sgc, sgh, sgw,
    svb, svc, svh, svw,
    slb, slh, slp,
    K: tl.constexpr, KKP: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, NEED_DLOGITS: tl.constexpr,
    BLOCK_P: tl.constexpr,
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
    for s in range(0, KK):
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
    K: tl.constexpr, KKP: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
    ALGO: tl.constexpr,
):
    pid_p = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HEADS
    h = pid_bh % HEADS
    R: tl.constexpr = K // 2
    KK: tl.constexpr = K * K
    E: tl.constexpr = 2 * K - 1
    r = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    rmask = r < H * W
    ry = r // W
    rx = r % W
    d = tl.arange(0, BLOCK_D)
    dmask = d < HD
    c = (h * HD + d).to(tl.int64)
    l_bh = l_ptr + b * slb + h * slh
    lse_bh = lse_ptr + pid_bh * H * W * KK
    g_bc = dy_ptr + b * sgb + c * sgc
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=ACC)
    if ALGO == 0:
        # "taps": per tap t, the windows p = r − o_t, A[p, s, t] = exp(logits − lse) over
        # the slots s and the (BLOCK_P, k², BLOCK_D) tile of dy at p + o_s, reduced over s.
        s = tl.arange(0, KKP)
        smask = s < KK
        for t in range(0, KK):
            py = ry - (t // K - R)
            px = rx - (t % K - R)
            pvalid = rmask & (py >= 0) & (py < H) & (px >= 0) & (px < W)
            p = py * W + px
            qy = py[:, None] + (s // K - R)[None, :]
            qx = px[:, None] + (s % K - R)[None, :]
            qvalid = pvalid[:, None] & smask[None, :] & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
            logit = tl.load(l_bh + p[:, None] * slp + s[None, :] * KK + t, mask=qvalid, other=0.0)
            lse = tl.load(lse_bh + p[:, None] * KK + s[None, :], mask=qvalid, other=0.0)
            a = tl.where(qvalid, tl.exp(logit.to(ACC) - lse), 0.0)
            gptrs = g_bc[None, None, :] + (qy * sgh + qx * sgw)[:, :, None]
            g = tl.load(gptrs, mask=qvalid[:, :, None] & dmask[None, None, :], other=0.0).to(ACC)
            acc += tl.sum(a[:, :, None] * g, axis=1)
    else:
        # "offsets": dv[r] = Σ_δ w[r, δ] · dy[r + δ] over δ = o_s − o_t,
        # w[r, δ] = Σ_t A[r − o_t, s(δ + o_t), t]
        g_r = g_bc[None, :] + (ry * sgh + rx * sgw)[:, None]
        l_r = l_bh + r * slp
        lse_r = lse_bh + r * KK
        for e in range(0, E * E):
            ey = e // E - (K - 1)
            ex = e % E - (K - 1)
            ny = ry + ey
            nx = rx + ex
            nvalid = rmask & (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
            w = tl.zeros((BLOCK_P,), dtype=ACC)
            for t in range(0, KK):
                ty = t // K - R
                tx = t % K - R
                sy = ey + ty
                sx = ex + tx
                if (sy >= -R) & (sy <= R) & (sx >= -R) & (sx <= R):  # slot s inside the window
                    py = ry - ty
                    px = rx - tx
                    pvalid = nvalid & (py >= 0) & (py < H) & (px >= 0) & (px < W)
                    shift = (ty * W + tx).to(tl.int64)
                    s_idx = (sy + R) * K + (sx + R)
                    lg = tl.load(l_r + (s_idx * KK + t - shift * slp), mask=pvalid, other=0.0)
                    ls = tl.load(lse_r + (s_idx - shift * KK), mask=pvalid, other=0.0)
                    w += tl.where(pvalid, tl.exp(lg.to(ACC) - ls), 0.0)
            g = tl.load(g_r + (ey * sgh + ex * sgw), mask=nvalid[:, None] & dmask[None, :], other=0.0).to(ACC)
            acc += w[:, None] * g
    dptrs = dv_ptr + b * sdb + c[None, :] * sdc + ry[:, None] * sdh + rx[:, None] * sdw
    tl.store(dptrs, acc.to(dv_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


# ---------------------------------------------------------------------------------------
# Launch helpers: autotuned (BLOCK_P, num_warps) on the GPU, fixed under the interpreter
# ---------------------------------------------------------------------------------------

# (BLOCK_P, num_warps, ALGO) of the gather kernels (forward, dv): ALGO 0 ("taps") holds a
# (BLOCK_P, KKP, BLOCK_D) tile, so small pixel blocks; ALGO 1 ("offsets") two (BLOCK_P,
# BLOCK_D) tiles. The logits-gradient kernel: (BLOCK_P, num_warps), a (BLOCK_P, KKP,
# BLOCK_D) tile of v. Chosen from sm_90 compiles (docs/window_attention_gpu.md): about 8
# tile elements per thread keeps ALGO 1 at ~116 registers (16 per thread: ~187, 32: spills)
# and the logits-gradient kernel at ~174 with 8 warps. The autotuner times them per key.
_GATHER_CONFIGS = [(16, 8, 0), (32, 4, 1), (64, 8, 1), (64, 4, 1), (128, 8, 1)]
_LOGITS_GRAD_CONFIGS = [(8, 4), (16, 8), (16, 4)]
# Without autotuning: the GPU default, and small blocks under the interpreter (several
# programs per image even at test sizes, so block borders are exercised).
_FIXED = {"gather": (64, 8, 1), "logits_grad": (16, 8)}
_FIXED_INTERPRET = {"gather": (64, 4, 1), "logits_grad": (16, 4)}
_TUNE_KEY = ["H", "W", "HEADS", "HD"]
_TUNED: dict[str, object] = {}
FORCE_BLOCK_P: int | None = None  # tests: run every kernel with this pixel block
FORCE_ALGO: int | None = None  # tests: run the gather kernels with this ALGO


def _config(values: tuple, kind: str) -> dict:
    meta = {"BLOCK_P": values[0]}
    if kind == "gather":
        meta["ALGO"] = values[2]
    return meta


def _short_bench(fn, quantiles=None, **_):
    """The autotuner's timing, shortened (each shape tunes 15 configurations of 3 kernels)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _launcher(kernel, kind: str):
    """(kernel, extra launch options): the autotuned kernel (BLOCK_P, num_warps and ALGO
    chosen per key), or the plain kernel with a fixed configuration."""
    forced = FORCE_BLOCK_P is not None or (FORCE_ALGO is not None and kind == "gather")
    if forced or not _autotune_enabled():
        values = (_FIXED_INTERPRET if _interpret() else _FIXED)[kind]
        meta = _config(values, kind)
        if FORCE_BLOCK_P is not None:
            meta["BLOCK_P"] = FORCE_BLOCK_P
        if FORCE_ALGO is not None and kind == "gather":
            meta["ALGO"] = FORCE_ALGO
        if not _interpret():
            meta["num_warps"] = values[1]
        return kernel, meta
    name = kernel.__name__
    if name not in _TUNED:
        configs = _GATHER_CONFIGS if kind == "gather" else _LOGITS_GRAD_CONFIGS
        # older Triton has no do_bench argument: it then times each config for its default 100 ms
        short = {"do_bench": _short_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}
        _TUNED[name] = triton.autotune(
            configs=[triton.Config(_config(c, kind), num_warps=c[1]) for c in configs], key=_TUNE_KEY, **short
        )(kernel)
    return _TUNED[name], {}


def _grid(n_pixels: int, n_bh: int):
    return lambda meta: (triton.cdiv(n_pixels, meta["BLOCK_P"]), n_bh)


def _meta(v: torch.Tensor, logits: torch.Tensor, kernel_size: int):
    B, C, H, W = v.shape
    heads = logits.shape[1]
    hd = C // heads
    kkp = triton.next_power_of_2(kernel_size * kernel_size)
    block_d = triton.next_power_of_2(hd)
    acc = tl.float64 if v.dtype == torch.float64 else tl.float32
    return B, C, H, W, heads, hd, kkp, block_d, acc, _grid(H * W, B * heads)


def _channels_last_empty(v: torch.Tensor) -> torch.Tensor:
    return torch.empty(v.shape, dtype=v.dtype, device=v.device, memory_format=torch.channels_last)


def _lse_empty(v: torch.Tensor, heads: int, kk: int) -> torch.Tensor:
    B, _, H, W = v.shape
    dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    return torch.empty((B, heads, H * W, kk), dtype=dtype, device=v.device)


def window_attention_forward_triton(v: torch.Tensor, logits: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """y (B, C, H, W), channels-last; logits' last two dims must be contiguous. One launch
    (the row log-sum-exps go through a (B, heads, H·W, k²) scratch, 1/k² of the logits)."""
    B, C, H, W, heads, hd, kkp, block_d, acc, grid = _meta(v, logits, kernel_size)
    y = _channels_last_empty(v)
    lse = _lse_empty(v, heads, kernel_size * kernel_size)
    kern, opts = _launcher(_window_attention_fwd_kernel, "gather")
    kern[grid](
        v, logits, y, lse,
        H, W, heads, hd,
        *v.stride(), *logits.stride()[:3], *y.stride(),
        K=kernel_size, KKP=kkp, BLOCK_D=block_d, ACC=acc, **opts,
    )
    return y


def window_attention_backward_triton(
    grad_y: torch.Tensor, v: torch.Tensor, logits: torch.Tensor, kernel_size: int, need_dv: bool, need_dlogits: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dv channels-last, dlogits with logits' strides); an unneeded one is empty (0,).
    Two launches: dlogits and the row log-sum-exps (window-centred), then dv (a gather)."""
    B, C, H, W, heads, hd, kkp, block_d, acc, grid = _meta(v, logits, kernel_size)
    dv = _channels_last_empty(v) if need_dv else v.new_empty((0,))
    dlogits = torch.empty_like(logits) if need_dlogits else logits.new_empty((0,))
    if not (need_dv or need_dlogits):
        return dv, dlogits
    lse = _lse_empty(v, heads, kernel_size * kernel_size)
    kern, opts = _launcher(_window_logits_grad_kernel, "logits_grad")
    kern[grid](
        grad_y, v, logits, dlogits if need_dlogits else logits, lse,
        H, W, heads, hd,
        *grad_y.stride(), *v.stride(), *logits.stride()[:3],
        K=kernel_size, KKP=kkp, BLOCK_D=block_d, ACC=acc, NEED_DLOGITS=need_dlogits, **opts,
    )
    if need_dv:
        kern, opts = _launcher(_window_value_grad_kernel, "gather")
        kern[grid](
            grad_y, logits, lse, dv,
            H, W, heads, hd,
            *grad_y.stride(), *logits.stride()[:3], *dv.stride(),
            K=kernel_size, KKP=kkp, BLOCK_D=block_d, ACC=acc, **opts,
        )
    return dv, dlogits
