"""Triton kernels of the dispersive loss (``shared/spec/dispersive.md``).

``dispersive_fused_triton(z, variant_code, tau, margin, include_diagonal, scale_by_dim,
need_grad) -> (loss, grad)`` has the contract of ``torch.ops.disseg.dispersive_fused``:
z is a contiguous (N, D) tensor (N >= 2, D >= 1) of float32, bfloat16, float16 or float64;
the loss is 0-d (float32 for half inputs, else z's dtype); grad = dL/dz in z's shape and
dtype (float32 for float16 z: ``ops._autograd.saved_grad_dtype``), or an empty tensor when
``need_grad`` is False. Variant codes: 0 infonce_l2,
1 infonce_l2sq, 2 infonce_cosine, 3 hinge, 4 covariance.

Two regimes, two kernel sets:

* Many samples (N > ``SMALL_N_MAX``): ``_dispersive_rows_kernel``, FlashAttention-style.
  One program per block of BLOCK_M rows loops over column blocks: S = Z_I Z_J^T on the
  tensor cores (fp32 accumulation), the distance tile, an online per-row max m_i and sum
  s_i of exp(-d/tau), and the unnormalised gradient rows acc_i += u_ij z_j (a second
  tl.dot) with flash-style rescaling. Nothing N x N is ever stored. A tiny torch
  epilogue combines the per-row statistics into the global logsumexp and scales the
  gradient rows by exp(m_i - LSE). When D is too wide for the accumulator to stay in
  registers (D > 256), the output columns are split over a second grid axis and the
  Gram tile is recomputed per column chunk.
  For D <= 8 the row kernel computes exact differences sum_k (z_ik - z_jk)^2 (and the
  cosine projection term by term) instead of the Gram trick, for any N.
* Few samples, huge D (N <= ``SMALL_N_MAX`` and D > 8, e.g. N = 8, D = 262,144):
  ``_gram_partial_kernel`` splits the reduction over D and accumulates each chunk's
  N x N Gram matrix in float64 (fp32 products are exact in float64), the partials are
  summed in float64, the N x N math (distances, softmax, weights) is done in float64 by
  torch, and ``_rowmix_kernel`` forms grad = C Z, again split over D. This keeps the
  relative gradient error near 1e-6 where float32 Gram methods have ~1e-2 (d/tau ~ 1e6
  there, so the absolute error of d decides the softmax).
* covariance is GEMM-bound and done with plain torch matmuls (N x N Gram when N <= D,
  D x D when D < N).

All variants of the L2 family have a gradient of the form grad_i = coef_i (a_i z_i -
sum_j u_ij z_j); the kernels output the bracket, the epilogue applies coef_i.
"""

from __future__ import annotations

import math
import os
import struct

import torch
import triton
import triton.language as tl

from ._settings import autotune_enabled as _autotune_enabled
from ._settings import interpret as _interpret
from . import ROWS_KERNELS, ROWS_LOOPS  # noqa: F401  (the names; tdisp.ROWS_KERNELS stays)
from ..ops._autograd import saved_grad_dtype

INFONCE_L2, INFONCE_L2SQ, INFONCE_COSINE, HINGE, COVARIANCE = 0, 1, 2, 3, 4
_VARIANT_NAMES = ("infonce_l2", "infonce_l2sq", "infonce_cosine", "hinge", "covariance")

# N at or below which the split-D (few samples, huge D) path is used.
SMALL_N_MAX = 64
# D at or below which the row kernel computes exact differences instead of the Gram trick.
_DIRECT_MAX_D = 8
# Widest output-column chunk one row program keeps in registers.
_MAX_DO = 256

_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HALF = (torch.float16, torch.bfloat16)

# A pair is a duplicate (d = 0, subgradient 0, never 1/0) where its distance d^2 is <= 0.
# The Gram distance d^2 = n_i + n_j - 2 g_ij of close rows is mostly rounding noise:
# - float32 tiles keep it (as eager's float32 Gram does). A threshold of 2e-6 (n_i + n_j)
#   once dropped the gradient of every pair closer than ~1.4e-3 at unit norm: a relative
#   gradient error of 1.0 where near-duplicates dominate the softmax, against eager's
#   0.03-0.13.
# - float64 tiles take the d^2 of a pair below EXACT_D2 (n_i + n_j) from exact differences
#   sum_k (z_ik - z_jk)^2, as the C++ kernels do (kExactD2): ``_exact_close_pairs``. They
#   used a threshold of 1e-12 (n_i + n_j), which dropped the gradient of rows within ~1e-6
#   of a norm (relative error ~1 where those pairs dominate). The float64 few-samples path
#   takes every L2-family distance from exact differences (``_small_path``).
# The row kernels read the threshold from PARAMS (``exact_threshold``: 0 turns it off).
EXACT_D2 = 1e-3


def exact_threshold(dtype: torch.dtype) -> float:
    """The EXACT_D2 of the tiles a kernel accumulates for inputs of ``dtype``: EXACT_D2 for
    float64, 0 (no exact recomputation) for the float32 tiles of every other dtype."""
    return EXACT_D2 if dtype == torch.float64 else 0.0


@triton.jit
def _exact_close_pairs(R, C, rows, cols, row_ok, col_ok, D, d2, nsum, skip, exact_eps,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(d2, dup) of a float64 tile: pairs with Gram distance d2 < exact_eps (n_i + n_j),
    outside ``skip``, get d^2 = sum_k (r_ik - c_jk)^2 from rows R and columns C (D wide);
    dup marks d^2 <= 0. The loop over D runs only in tiles that hold such a pair (rare:
    near-duplicate rows), so the other tiles pay one compare per pair and one reduction."""
    close = (d2 < exact_eps * nsum) & ~skip
    dup = d2 <= 0.0
    if tl.max(tl.max(close.to(tl.int32), 1), 0) > 0:
        # summed into d2 itself (a second float64 tile would stay live: sm_90 spilled 240 B)
        d2 = tl.where(close, 0.0, d2)
        for k in range(0, D):
            a = tl.load(R + rows * D + k, mask=row_ok, other=0.0).to(tl.float64)
            b = tl.load(C + cols * D + k, mask=col_ok, other=0.0).to(tl.float64)
            diff = a[:, None] - b[None, :]
            d2 += tl.where(close, diff * diff, 0.0)
        dup = d2 <= 0.0
    return d2, dup


_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------
# Many samples: row-block kernel with an online logsumexp
# --------------------------------------------------------------------------------------


@triton.jit
def _rows_tile(
    start_n, Z, SQN, RINV, N, D,
    zi, row0, rows, n_i, rinv_i, nrm_i, has_norm_i, ks, dcols, dcol_ok,
    m_i, s_i, r_i, acc,
    scale, margin, exact_eps, e_scale,
    VARIANT: tl.constexpr, INCLUDE_DIAG: tl.constexpr, NEED_GRAD: tl.constexpr, DIRECT_D: tl.constexpr,
    SINGLE_K: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, GRAM_PREC: tl.constexpr,
    PV_DTYPE: tl.constexpr, PV_PREC: tl.constexpr, TF32_ROUND: tl.constexpr, UPCAST: tl.constexpr,
    LAZY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,  # the tile crosses the diagonal or the last column: apply the masks
    ONE_LOOP: tl.constexpr = False,  # the masks depend on masked_rt, a run-time flag (see the kernel)
    masked_rt=False,
):
    """One BLOCK_M x BLOCK_N tile of pairs: returns the updated (m_i, s_i, r_i, acc).

    Unmasked tiles (the vast majority) lie fully inside [0, N) and off the diagonal, so
    they skip the validity mask and the diagonal test. Rows past N are never masked: they
    read zeros, stay finite, and are never stored. With ONE_LOOP (all of D in one tile, no
    lazy rescale) the column loads are always masked and the masks are applied in one
    run-time branch on ``masked_rt``, which changes only the exponent, the distance (the
    hinge's), the weight factor and the duplicate flags.
    """
    cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    if DIRECT_D > 0:
        # Few features: d^2 = sum_k (z_ik - z_jk)^2 exactly, no n_i + n_j - 2G cancellation.
        d2x = tl.zeros((BLOCK_M, BLOCK_N), ACC)
        g = tl.zeros((BLOCK_M, BLOCK_N), ACC)
        row_ok = rows < N
        if VARIANT == 2:
            nrm_j = tl.load(SQN + cols, mask=col_ok, other=1.0)
        for k in tl.static_range(DIRECT_D):
            zik = tl.load(Z + rows * D + k, mask=row_ok, other=0.0).to(ACC)
            zjk = tl.load(Z + cols * D + k, mask=col_ok, other=0.0).to(ACC)
            if VARIANT == 2:
                # zhat by division, as the reference computes it (exactly +-1 at D = 1)
                g += (zik / nrm_i)[:, None] * (zjk / nrm_j)[None, :]
            else:
                diff = zik[:, None] - zjk[None, :]
                d2x += diff * diff
    elif SINGLE_K:
        if MASKED or ONE_LOOP:
            zj = tl.load(Z + cols[:, None] * D + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < D), other=0.0)
        else:
            zj = tl.load(Z + cols[:, None] * D + ks[None, :], mask=ks[None, :] < D, other=0.0)
        if UPCAST:
            zj = zj.to(tl.float32)
        g = tl.dot(zi, tl.trans(zj), input_precision=GRAM_PREC, out_dtype=ACC)
    else:
        row_ok = rows < N
        g = tl.zeros((BLOCK_M, BLOCK_N), ACC)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + ks
            k_ok = kk < D
            zik = tl.load(Z + rows[:, None] * D + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            zjk = tl.load(Z + cols[:, None] * D + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                zik = zik.to(tl.float32)
                zjk = zjk.to(tl.float32)
            g = tl.dot(zik, tl.trans(zjk), g, input_precision=GRAM_PREC, out_dtype=ACC)

    if MASKED:
        # Local int32 indices: the diagonal test costs one compare per pair.
        local = tl.arange(0, BLOCK_M)[:, None] + (row0 - start_n)
        diag = local == tl.arange(0, BLOCK_N)[None, :]
        if INCLUDE_DIAG:
            valid = col_ok[None, :]
        else:
            valid = col_ok[None, :] & (local != tl.arange(0, BLOCK_N)[None, :])

    if VARIANT == 2:
        rinv_j = tl.load(RINV + cols, mask=col_ok, other=0.0)
        if DIRECT_D > 0:
            ghat = g
        else:
            ghat = g * rinv_i[:, None] * rinv_j[None, :]
        d = scale * (1.0 - ghat)
        e2 = d * (-e_scale)
    else:
        n_j = tl.load(SQN + cols, mask=col_ok, other=0.0)
        if DIRECT_D > 0:
            d2 = d2x
            dup = d2 == 0.0
        else:
            nsum = n_i[:, None] + n_j[None, :]
            d2 = nsum - 2.0 * g
            if ACC == tl.float64:
                if MASKED:
                    skip = diag  # the pair (i, i): a duplicate or not a pair
                else:
                    skip = tl.zeros((BLOCK_M, BLOCK_N), tl.int1)
                d2, dup = _exact_close_pairs(Z, Z, rows, cols, rows < N, col_ok, D, d2, nsum, skip, exact_eps,
                                             BLOCK_M, BLOCK_N)
            else:
                dup = d2 <= 0.0
        if INCLUDE_DIAG and MASKED:
            dup = dup | diag
        if VARIANT == 1:
            d2 = tl.where(dup, 0.0, d2)
            dd = d2
        else:
            # rs = 1/d off the duplicates and 0 on them (d2 may be <= 0 there: the rsqrt's
            # NaN or inf is never selected), so d = d2 * rs is 0 on duplicates.
            if ACC == tl.float64:
                rs = tl.where(dup, 0.0, 1.0 / tl.sqrt(tl.where(dup, 1.0, d2)))
            else:
                rs = tl.where(dup, 0.0, tl.math.rsqrt(d2))  # one MUFU op
            dd = d2 * rs
        d = scale * dd
        e2 = dd * (-scale * e_scale)

    if ONE_LOOP:
        if masked_rt:  # the masks of MASKED tiles, applied at run time
            local_rt = tl.arange(0, BLOCK_M)[:, None] + (row0 - start_n)
            diag_rt = local_rt == tl.arange(0, BLOCK_N)[None, :]
            if INCLUDE_DIAG:
                invalid = (cols >= N)[None, :]
                if VARIANT != 2:  # the pair (i, i) is a duplicate: d = 0 exactly, weight 0
                    dup = dup | diag_rt
                    e2 = tl.where(diag_rt, 0.0, e2)
                    d = tl.where(diag_rt, 0.0, d)
                    if VARIANT != 1:
                        rs = tl.where(diag_rt, 0.0, rs)
            else:
                invalid = (cols >= N)[None, :] | diag_rt
            e2 = tl.where(invalid, float("-inf"), e2)
            d = tl.where(invalid, float("inf"), d)  # the hinge's max(margin - d, 0) is 0 there

    if VARIANT == 3:
        h = tl.maximum(margin - d, 0.0)
        if MASKED:
            h = tl.where(valid, h, 0.0)
        s_i += tl.sum(h * h, 1)
        if NEED_GRAD:
            w = (-2.0 * scale) * h * rs
    else:
        if MASKED:
            e2 = tl.where(valid, e2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(e2, 1))
        if LAZY:
            # Rescale only when some row's maximum grows by more than 2^8: p stays <= 256,
            # far inside float32 (and bf16) range, and most tiles skip the BLOCK_M x D
            # multiply of the accumulator.
            grow = tl.where(m_new > m_i, m_new - tl.maximum(m_i, -3.0e38), 0.0)  # no inf - inf
            if tl.max(grow, 0) > 8.0:
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_use)
                s_i = s_i * alpha
                r_i = r_i * alpha
                if NEED_GRAD:
                    acc = acc * alpha[:, None]
                m_i = m_new
            m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)
            p = tl.exp2(e2 - m_ref[:, None])
            s_i += tl.sum(p, 1)
            if NEED_GRAD and VARIANT == 2:
                r_i += tl.sum(p * ghat, 1)
        else:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(e2 - m_use[:, None])
            s_i = s_i * alpha + tl.sum(p, 1)
            m_i = m_new
            if NEED_GRAD:
                if VARIANT == 2:
                    r_i = r_i * alpha + tl.sum(p * ghat, 1)
                else:
                    r_i = r_i * alpha
                acc = acc * alpha[:, None]
        if NEED_GRAD:
            if VARIANT == 0:
                w = p * rs
            elif VARIANT == 1:
                w = tl.where(dup, 0.0, p)  # exact: z_i - z_j = 0 there
            else:
                w = p if DIRECT_D > 0 else p * rinv_j[None, :]

    if NEED_GRAD:
        # Round the weights once, to what the tensor cores will read, and sum the same
        # rounded values into r_i: then r_i z_i - sum_j w_ij z_j = sum_j w_ij (z_i - z_j)
        # up to fp32 accumulation, even where w_ij is large (near-duplicate rows).
        if DIRECT_D > 0:
            # acc_i += sum_j w_ij (z_j - z_i) column by column; cosine: the projected
            # sum_j w_ij (zhat_j - ghat_ij zhat_i), exactly 0 at D = 1 as in the reference.
            row_ok = rows < N
            for k in tl.static_range(DIRECT_D):
                zjk = tl.load(Z + cols * D + k, mask=col_ok, other=0.0).to(ACC)
                zik = tl.load(Z + rows * D + k, mask=row_ok, other=0.0).to(ACC)
                if VARIANT == 2:
                    zik = tl.where(has_norm_i, zik / nrm_i, 0.0)
                    ck = tl.sum(w * ((zjk / nrm_j)[None, :] - ghat * zik[:, None]), 1)
                else:
                    ck = tl.sum(w * (zjk[None, :] - zik[:, None]), 1)
                acc += tl.where(dcols[None, :] == k, ck[:, None], 0.0)
        else:
            if TF32_ROUND:
                w = (w.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
            wv = w.to(PV_DTYPE)
            if VARIANT != 2:
                r_i += tl.sum(wv.to(ACC), 1)
            if SINGLE_K:
                zv = zj
            else:
                zv = tl.load(Z + cols[:, None] * D + dcols[None, :], mask=col_ok[:, None] & dcol_ok[None, :], other=0.0)
            zv = zv.to(PV_DTYPE)
            if UPCAST:
                wv = wv.to(tl.float32)
                zv = zv.to(tl.float32)
            acc = tl.dot(wv, zv, acc, input_precision=PV_PREC, out_dtype=ACC)
    return m_i, s_i, r_i, acc


@triton.jit
def _dispersive_rows_kernel(
    Z,  # (N, D) input, any supported dtype, contiguous
    SQN,  # (N,) ACC dtype: ||z_i||^2 (L2 family), max(||z_i||, 1e-12) (cosine)
    RINV,  # (N,) 1 / max(||z_i||, 1e-12) (cosine only)
    PROJ,  # (N,) RINV where ||z_i|| > 1e-12 else 0 (cosine only)
    OUT,  # (SPLITS, N, D) ACC dtype: a_i z_i - sum_j u_ij z_j over the split's columns
    M_OUT,  # (SPLITS, N) per-row max of -d/tau (natural log units); 0 for hinge
    S_OUT,  # (SPLITS, N) per-row sum of exp(-d/tau - m_i); hinge: sum of max(0, margin - d)^2
    N,
    D,
    COL_CHUNK,  # columns per split (grid axis 2), a multiple of 128 (so of every BLOCK_N)
    N_BUCKET,  # only a key for the autotuner
    PARAMS,  # (4,) ACC dtype: scale (1/D with scale_by_dim else 1), 1/tau, margin, exact_threshold
    VARIANT: tl.constexpr,
    INCLUDE_DIAG: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    DIRECT_D: tl.constexpr,  # D <= 8: exact differences on the CUDA cores instead of the Gram trick (0: off)
    SINGLE_K: tl.constexpr,  # all of D in one BLOCK_K chunk (then BLOCK_DO == BLOCK_K)
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    ACC: tl.constexpr,  # tl.float32, or tl.float64 for float64 inputs
    GRAM_PREC: tl.constexpr,
    PV_DTYPE: tl.constexpr,  # operand dtype of the weights @ Z_J product
    PV_PREC: tl.constexpr,
    TF32_ROUND: tl.constexpr,  # truncate the weights to TF32 (the fp16 path's PV product)
    UPCAST: tl.constexpr,  # interpreter only: its tl.dot cannot multiply bfloat16, run it in fp32
    LAZY: tl.constexpr,  # rescale the accumulator only when a row maximum grows by > 2^8
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ONE_LOOP: tl.constexpr = False,  # one column loop with run-time masks (``_one_loop_applies``)
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    row0 = pid_m * BLOCK_M
    rows = row0.to(tl.int64) + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    dcols = pid_d.to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    dcol_ok = dcols < D

    scale = tl.load(PARAMS)
    inv_tau = tl.load(PARAMS + 1)
    margin = tl.load(PARAMS + 2)
    exact_eps = tl.load(PARAMS + 3)
    n_i = tl.load(SQN + rows, mask=row_ok, other=0.0)
    # Cosine-only row data (loaded for every variant: one vector per program, kept simple).
    rinv_i = tl.load(RINV + rows, mask=row_ok, other=0.0)
    nrm_i = tl.load(SQN + rows, mask=row_ok, other=1.0)
    has_norm_i = tl.load(PROJ + rows, mask=row_ok, other=0.0) > 0
    if SINGLE_K and DIRECT_D == 0:
        zi = tl.load(Z + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)
        if UPCAST:
            zi = zi.to(tl.float32)
    else:
        zi = tl.zeros((1,), tl.float32)  # unused

    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    s_i = tl.zeros((BLOCK_M,), ACC)
    r_i = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC)
    e_scale = inv_tau * 1.4426950408889634  # exp(x) = exp2(x * log2 e)

    # This program's columns: [lo, hi). Tiles that cross the diagonal block or the last
    # column are masked; the others (all but about BLOCK_M / BLOCK_N + 1 per row block)
    # are not.
    lo = pid_s * COL_CHUNK
    hi = tl.minimum(lo + COL_CHUNK, N)
    if DIRECT_D > 0:
        full_end = lo
        dlo = lo
        dhi = lo
    else:
        full_end = tl.minimum(hi, (N // BLOCK_N) * BLOCK_N)
        dlo = tl.minimum(tl.maximum((row0 // BLOCK_N) * BLOCK_N, lo), full_end)
        dhi = tl.minimum(tl.maximum(((row0 + BLOCK_M + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, lo), full_end)
    if ONE_LOOP:
        # One loop over the split's tiles, the masks in a run-time branch. Its trip count is
        # at least 1 to the compiler (every split has columns): the four possibly-empty
        # segment loops below give ptxas paths that set the accumulator's registers while
        # a wgmma may be in flight, and it then serialises every wgmma of the kernel
        # (C7515, ``bench_dispersive_tiles --compile-check``).
        for t in range(0, tl.maximum(tl.cdiv(hi - lo, BLOCK_N), 1)):
            start_n = lo + t * BLOCK_N
            masked_rt = ((start_n > row0 - BLOCK_N) & (start_n < row0 + BLOCK_M)) | (start_n + BLOCK_N > N)
            m_i, s_i, r_i, acc = _rows_tile(
                start_n, Z, SQN, RINV, N, D, zi, row0, rows, n_i, rinv_i, nrm_i, has_norm_i, ks, dcols, dcol_ok,
                m_i, s_i, r_i, acc, scale, margin, exact_eps, e_scale,
                VARIANT, INCLUDE_DIAG, NEED_GRAD, DIRECT_D, SINGLE_K, BLOCK_K, ACC, GRAM_PREC, PV_DTYPE, PV_PREC,
                TF32_ROUND, UPCAST, LAZY, BLOCK_M, BLOCK_N, False, True, masked_rt)
    else:
        # Four column segments: unmasked [lo, dlo), masked [dlo, dhi), unmasked [dhi, full_end),
        # masked [full_end, hi). The segment index is a compile-time constant (static_range),
        # so each segment's loop is compiled with its own MASKED.
        for seg in tl.static_range(4):
            if seg == 0:
                seg_lo, seg_hi = lo, dlo
            elif seg == 1:
                seg_lo, seg_hi = dlo, dhi
            elif seg == 2:
                seg_lo, seg_hi = dhi, full_end
            else:
                seg_lo, seg_hi = full_end, hi
            for start_n in range(seg_lo, seg_hi, BLOCK_N):
                m_i, s_i, r_i, acc = _rows_tile(
                    start_n, Z, SQN, RINV, N, D, zi, row0, rows, n_i, rinv_i, nrm_i, has_norm_i, ks, dcols, dcol_ok,
                    m_i, s_i, r_i, acc, scale, margin, exact_eps, e_scale,
                    VARIANT, INCLUDE_DIAG, NEED_GRAD, DIRECT_D, SINGLE_K, BLOCK_K, ACC, GRAM_PREC, PV_DTYPE, PV_PREC,
                    TF32_ROUND, UPCAST, LAZY, BLOCK_M, BLOCK_N, seg % 2 == 1)

    stat = pid_s.to(tl.int64) * N + rows
    if pid_d == 0:
        if VARIANT == 3:
            tl.store(M_OUT + stat, tl.zeros((BLOCK_M,), ACC), mask=row_ok)
        else:
            tl.store(M_OUT + stat, m_i * 0.6931471805599453, mask=row_ok)
        tl.store(S_OUT + stat, s_i, mask=row_ok)
    if NEED_GRAD:
        if DIRECT_D > 0:
            a_i = tl.zeros((BLOCK_M,), ACC)  # acc already holds the whole bracket
        elif VARIANT == 2:
            a_i = r_i * tl.load(PROJ + rows, mask=row_ok, other=0.0)
        else:
            a_i = r_i
        out_mask = row_ok[:, None] & dcol_ok[None, :]
        if DIRECT_D > 0:
            zo = tl.load(Z + rows[:, None] * D + dcols[None, :], mask=out_mask, other=0.0).to(ACC)
        elif SINGLE_K:
            zo = zi.to(ACC)
        else:
            zo = tl.load(Z + rows[:, None] * D + dcols[None, :], mask=out_mask, other=0.0).to(ACC)
        out_rows = pid_s.to(tl.int64) * N + rows
        tl.store(OUT + out_rows[:, None] * D + dcols[None, :], a_i[:, None] * zo - acc, mask=out_mask)


def _fma_layout(dtype: torch.dtype) -> bool:
    """float32 (IEEE products, as eager computes them) and float64 products run on the
    CUDA cores, not the tensor cores: Triton's FMA dot keeps both operand tiles and the
    product in registers, so with all of D in one tile (the bf16/fp16 layout) it spilled
    8-23 KB per thread at sm_90. These dtypes take the chunked layout instead."""
    return dtype in (torch.float32, torch.float64)


# The chunked (FMA) layout: the Gram tile accumulates over BLOCK_K-wide feature chunks, and
# the gradient's output columns are split over grid axis 1 in BLOCK_DO-wide chunks (the
# Gram tile is recomputed per chunk: 1.5x the FLOPs at D = 128, on units that would
# otherwise wait on local memory).
_FMA_BLOCK_K = 16
_FMA_BLOCK_DO = 64


def _layout(d_pad: int, fma: bool) -> tuple[bool, int, int]:
    """(SINGLE_K, BLOCK_K, BLOCK_DO) of the row kernel for a padded width."""
    if fma:
        return False, min(d_pad, _FMA_BLOCK_K), min(d_pad, _FMA_BLOCK_DO)
    if d_pad <= _MAX_DO:
        return True, d_pad, d_pad
    return False, 64, _MAX_DO


def _rows_configs(d_pad: int, fma: bool = False) -> list[triton.Config]:
    """A short autotune list (each shape tunes once: keep it cheap).

    (BLOCK_M, BLOCK_N, warps, stages), chosen from sm_90 compiles
    (``python -m benchmarks.bench_dispersive_tiles --compile-check all [--dtype ...]``):
    every entry keeps the accumulator, the Gram tile and the operands in registers
    without spilling, or spills under 64 bytes per thread. Larger tiles spilled hundreds
    of bytes (bf16, D = 256: (64, 64) with 4 warps 312 B, (128, 64) 352 B).
    """
    if fma:
        shapes = FMA_SHAPES
    elif d_pad <= 64:
        shapes = [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)]
    elif d_pad <= 128:
        shapes = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 64, 4, 3)]
    elif d_pad <= _MAX_DO:  # one 256-wide chunk: the accumulator alone is 64 fp32 per thread
        shapes = [(64, 32, 8, 2), (64, 32, 8, 3), (64, 64, 8, 2), (32, 64, 4, 2)]
    else:  # the split-D loop, 256-wide output chunks
        shapes = [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 8, 3), (64, 128, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


FMA_SHAPES = [(64, 64, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)]  # sm_90: fp32 none; fp64 56 B for the first (its exact close-pair loop; none without it)

_TUNED: dict[tuple[int, bool], object] = {}


def _tuned_rows_kernel(d_pad: int, fma: bool = False):
    if (d_pad, fma) not in _TUNED:
        _TUNED[(d_pad, fma)] = triton.autotune(
            configs=_rows_configs(d_pad, fma),
            key=["D", "N_BUCKET", "COL_CHUNK", "VARIANT", "INCLUDE_DIAG", "NEED_GRAD", "LAZY", "ONE_LOOP"],
        )(_dispersive_rows_kernel)
    return _TUNED[(d_pad, fma)]


def _default_rows_config(d_pad: int, fma: bool = False) -> dict:
    """Fixed blocks: the interpreter (64-wide, ~0.1 s per call at N <= 512) and
    DISSEG_TRITON_AUTOTUNE=0 (the first, spill-free entry of the autotune list)."""
    if _interpret():
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    c = _rows_configs(d_pad, fma)[0]
    return dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)


# Column splits: a split handles a multiple of this many columns (every BLOCK_N divides it).
_SPLIT_QUANTUM = 128
# A split is worth its partial-result traffic only with at least this many columns.
_MIN_SPLIT_COLS = 1024
_MAX_SPLITS = 16


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        out = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if out < 1:
        raise ValueError(f"{name} must be >= 1, got {out}")
    return out


def _num_splits(n: int, d_pad: int, n_dchunks: int, device: torch.device) -> int:
    """How many column splits (grid axis 2) the row kernel runs on ``device``.

    ``DISSEG_TRITON_SPLITS`` overrides (benchmark sweeps); CPU tensors run one split."""
    forced = _env_int("DISSEG_TRITON_SPLITS")
    if forced is not None:
        return max(1, min(forced, triton.cdiv(n, _SPLIT_QUANTUM)))
    if device.type != "cuda":
        return 1
    return _splits_for(n, d_pad, n_dchunks, torch.cuda.get_device_properties(device).multi_processor_count)


def _splits_for(n: int, d_pad: int, n_dchunks: int, sms: int) -> int:
    """Column splits for ``sms`` multiprocessors. Few row blocks leave most of a GPU idle
    (N = 2,048 with 128-row blocks is 16 programs): the column loop is then split over
    programs, like flash-decoding, and the epilogue merges the per-split statistics (a
    logsumexp and linear sums, so the merge is exact). Aim: one program per SM. The kernel
    holds 216-255 registers per thread (sm_90 compile check), so an 8-warp program fills an
    SM; at N = 16,384, D = 128 (128 programs on the H200's 132 SMs) the old aim of two per SM
    split the columns in two and cost 17% (0.784 vs 0.668 ms at 128x64, 8 warps, 3 stages;
    every config was slower split: benchmarks/results/dispersive_tiles_cuda_2026-11-27_bfloat16.md)."""
    block_m = 128 if d_pad <= 128 else 64  # the usual autotune winner's row block
    programs = triton.cdiv(n, block_m) * n_dchunks
    if programs >= 0.9 * sms:
        return 1
    most = max(1, min(_MAX_SPLITS, n // _MIN_SPLIT_COLS))
    return max(1, min(most, round(sms / programs)))


def _dot_settings(dtype: torch.dtype):
    """(ACC, GRAM_PREC, PV_DTYPE, PV_PREC) for an input dtype."""
    if dtype == torch.float64:
        return tl.float64, "ieee", tl.float64, "ieee"
    if dtype == torch.float32:
        # Full float32 products (no TF32), as eager PyTorch computes them.
        return tl.float32, "ieee", tl.float32, "ieee"
    if dtype == torch.bfloat16:
        return tl.float32, "ieee", tl.bfloat16, "ieee"
    # float16: the weights u_ij (and 1/d in them) can exceed the float16 range, so the
    # second product runs on TF32 operands, which hold float16's 10-bit mantissa exactly.
    return tl.float32, "ieee", tl.float32, "tf32"


def _named_choice(value: str | None, env: str, choices: tuple, what: str) -> str:
    """``value``, else the environment variable ``env``, else ``choices[0]``; a name outside
    ``choices`` is an error naming ``what``, the variable and the choices."""
    if value is None:
        value = os.environ.get(env, "") or choices[0]
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices} (argument or {env}), got {value!r}")
    return value


def _rows_kernel_choice(kernel: str | None) -> str:
    """The row kernel asked for: ``kernel``, else ``DISSEG_TRITON_ROWS_KERNEL``, else
    "triton". "sm90" is the Gluon kernel of ``dispersive_sm90`` (Hopper, opt-in until it
    has been timed on a GPU)."""
    return _named_choice(kernel, "DISSEG_TRITON_ROWS_KERNEL", ROWS_KERNELS, "the row kernel")


def _one_loop_applies(variant: int, single_k: bool, direct_d: int, lazy: bool) -> bool:
    """Where the row kernel's ONE_LOOP form exists: the InfoNCE variants and the hinge on
    the tensor-core layout (all of D in one tile, the Gram trick), without the lazy rescale."""
    return variant in (INFONCE_L2, INFONCE_L2SQ, INFONCE_COSINE, HINGE) and single_k and direct_d == 0 and not lazy


def _rows_loop_choice(loop: str | None) -> str:
    """The Triton row kernel's column loop: ``loop``, else ``DISSEG_TRITON_LOOP``, else
    "segments" (four loops, the masks compiled in or out; measured on the H200). "one"
    (one loop, run-time masks: the form whose wgmmas ptxas does not serialise) is opt-in
    until a GPU run has timed it; it applies where ``_one_loop_applies``, elsewhere the
    segments run."""
    return _named_choice(loop, "DISSEG_TRITON_LOOP", ROWS_LOOPS, "the row kernel's loop")


def _rows_path(z, variant, tau, margin, include_diagonal, scale, need_grad, autotune=None,
               splits=None, lazy=None, config=None, kernel=None, loop=None):
    """The many-samples path. ``splits`` (column splits), ``lazy`` (conditional rescaling)
    and ``config`` (a fixed {BLOCK_M, BLOCK_N, num_warps, num_stages}) are for tests and
    benchmark sweeps; None means the heuristic / ``DISSEG_TRITON_LAZY`` / autotuning.
    ``kernel`` picks the row kernel (``_rows_kernel_choice``); "sm90" ignores ``lazy``,
    ``config`` and ``autotune`` (its blocks are fixed). ``loop`` picks the Triton kernel's
    column loop (``_rows_loop_choice``)."""
    kernel = _rows_kernel_choice(kernel)
    loop = _rows_loop_choice(loop)
    if kernel == "sm90":
        from . import dispersive_sm90

        why = dispersive_sm90.eligible(z, variant, need_grad)
        if why is not None:
            raise ValueError(f"the sm90 row kernel cannot run this call: {why}")
    n, d = z.shape
    acc_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    zf = z if z.dtype == acc_dtype else z.to(acc_dtype)
    sqn = zf.square().sum(1) if n * d < 2**27 else torch.linalg.vector_norm(z, dim=1, dtype=acc_dtype).square()
    del zf
    if variant == INFONCE_COSINE:
        norm = sqn.sqrt()
        nrm = norm.clamp_min(1e-12)
        rinv = 1.0 / nrm
        proj = torch.where(norm > 1e-12, rinv, torch.zeros_like(rinv))
        sqn = nrm
    else:
        rinv = proj = sqn  # unused by the kernel

    d_pad = max(16, triton.next_power_of_2(d))
    fma = _fma_layout(z.dtype)
    single, block_k, block_do = _layout(d_pad, fma)
    n_dchunks = triton.cdiv(d, block_do) if (need_grad and not single) else 1
    if splits is None:
        splits = _num_splits(n, d_pad, n_dchunks, z.device)
    if not (isinstance(splits, int) and splits >= 1):
        raise ValueError(f"splits must be an int >= 1, got {splits!r}")
    col_chunk = triton.cdiv(triton.cdiv(n, splits), _SPLIT_QUANTUM) * _SPLIT_QUANTUM
    splits = triton.cdiv(n, col_chunk)  # no empty split
    if kernel == "sm90" and splits > 1 and n - (splits - 1) * col_chunk <= dispersive_sm90.BLOCK_N:
        splits -= 1  # its last split runs to N and needs two column tiles: fold a one-tile tail into it
    if lazy is None:
        lazy = os.environ.get("DISSEG_TRITON_LAZY", "0") == "1"

    m_out = torch.empty((splits, n), device=z.device, dtype=acc_dtype)
    s_out = torch.empty((splits, n), device=z.device, dtype=acc_dtype)
    out = torch.empty((splits, n, d) if need_grad else (1, 1, 1), device=z.device, dtype=acc_dtype)

    ACC, GRAM_PREC, PV_DTYPE, PV_PREC = _dot_settings(z.dtype)
    params = device_params((scale, 1.0 / tau, margin, exact_threshold(z.dtype)), acc_dtype, z.device)
    args = (z, sqn, rinv, proj, out, m_out, s_out, n, d, col_chunk, min(triton.next_power_of_2(n), 16384), params)
    direct_d = d if d <= _DIRECT_MAX_D else 0
    meta = dict(
        VARIANT=variant, INCLUDE_DIAG=bool(include_diagonal), NEED_GRAD=bool(need_grad), SINGLE_K=single,
        DIRECT_D=direct_d,
        BLOCK_K=block_k, BLOCK_DO=block_do, ACC=ACC, GRAM_PREC=GRAM_PREC, PV_DTYPE=PV_DTYPE, PV_PREC=PV_PREC,
        TF32_ROUND=PV_PREC == "tf32", UPCAST=_interpret() and z.dtype == torch.bfloat16, LAZY=bool(lazy),
        ONE_LOOP=loop == "one" and _one_loop_applies(variant, single, direct_d, bool(lazy)),
    )
    if autotune is None:
        autotune = config is None and _autotune_enabled()
    if kernel == "sm90":
        dispersive_sm90.launch(z, sqn, out, m_out, s_out, n, d, col_chunk, splits, params, variant, include_diagonal)
    elif autotune:
        grid = lambda META: (triton.cdiv(n, META["BLOCK_M"]), n_dchunks, splits)  # noqa: E731
        _tuned_rows_kernel(d_pad, fma)[grid](*args, **meta)
    else:
        cfg = dict(config) if config is not None else _default_rows_config(d_pad, fma)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), n_dchunks, splits)
        _dispersive_rows_kernel[grid](*args, **meta, **cfg)

    # Merge the (split, row) statistics: every split's bracket carries its own shift m.
    pairs = n * n if include_diagonal else n * (n - 1)
    stat = torch.float64
    if variant == HINGE:
        loss = s_out.to(stat).sum() / pairs
        coef = torch.full((splits, n), 2.0 / pairs, device=z.device, dtype=acc_dtype)
    else:
        row_lse = m_out.to(stat) + s_out.to(stat).log()
        lse = torch.logsumexp(row_lse.reshape(-1), 0)
        loss = lse - math.log(pairs)
        e = (m_out.to(stat) - lse).exp()  # exp(m_si - LSE): the softmax normaliser per (split, row)
        k = {INFONCE_L2: 2.0, INFONCE_L2SQ: 4.0, INFONCE_COSINE: 2.0}[variant] * scale / tau
        coef = (-k * e).to(acc_dtype)
        if variant == INFONCE_COSINE:
            coef = coef * rinv
    grad = None
    if need_grad:
        if splits == 1:
            grad = out[0].mul_(coef[0][:, None])
        else:
            grad = torch.einsum("sn,snd->nd", coef, out)
    return loss, grad  # in acc_dtype: dispersive_fused_triton casts it (saved_grad_dtype)


# --------------------------------------------------------------------------------------
# Few samples, huge D: split-D Gram in float64, N x N math in torch, split-D grad = C Z
# --------------------------------------------------------------------------------------


@triton.jit
def _gram_partial_kernel(
    Z,  # (N, D)
    PART,  # (n_chunks, BLOCK_N, BLOCK_N) float64 partial Gram matrices
    N,
    D,
    CHUNK,  # columns per program, a multiple of BLOCK_K
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SHIFT: tl.constexpr,  # the Gram of z_i - z_0 (the L2 family: distances ignore a shift)
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    g = tl.zeros((BLOCK_N, BLOCK_N), tl.float64)
    start = pid * CHUNK
    for k0 in range(0, CHUNK, BLOCK_K):
        kk = start + k0 + ks
        zt = tl.load(Z + rows[:, None] * D + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < D), other=0.0)
        zt = zt.to(tl.float32)
        if SHIFT:
            # rows sharing a large common part (features after a ReLU) would leave d^2 =
            # n_i + n_j - 2 g_ij the difference of large, float32-rounded chunk products
            z0 = tl.load(Z + kk, mask=kk < D, other=0.0).to(tl.float32)
            zt = tl.where(row_ok[:, None], zt - z0[None, :], 0.0)
        # float64 tl.dot does not lower on GPUs (Hopper: "PassManager::run failed"): each
        # BLOCK_K-long partial product is exact-ish in float32 (fp32 FMA, no TF32), and the
        # long sum over D, where float32 loses ~6e-3, is carried in float64.
        part = tl.dot(zt, tl.trans(zt), input_precision="ieee", out_dtype=tl.float32)
        g += part.to(tl.float64)
    tl.store(PART + pid * BLOCK_N * BLOCK_N + rows[:, None] * BLOCK_N + rows[None, :], g)


@triton.jit
def _rowmix_kernel(
    C,  # (BLOCK_N, BLOCK_N) coefficient matrix, zero-padded
    Z,  # (N, D)
    OUT,  # (N, D) in z's dtype: OUT = C[:N, :N] @ Z
    N,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CDT: tl.constexpr,
    SHIFT: tl.constexpr,  # C @ (Z - 1 z_0^T): equal to C @ Z where C's rows sum to 0 (the L2 family)
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    c = tl.load(C + rows[:, None] * BLOCK_N + rows[None, :])
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    mask = row_ok[:, None] & (cols[None, :] < D)
    zt = tl.load(Z + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(CDT)
    if SHIFT:  # without the common part, sum_j c_ij z_j cancels nothing large
        z0 = tl.load(Z + cols, mask=cols < D, other=0.0).to(CDT)
        zt = tl.where(mask, zt - z0[None, :], 0.0)
    out = tl.dot(c, zt, input_precision="ieee", out_dtype=CDT)
    if OUT.dtype.element_ty != CDT:
        out = out.to(tl.float32)  # float64 -> half goes through float32 (the interpreter needs it)
    tl.store(OUT + rows[:, None] * D + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


def _gram_float64(z: torch.Tensor, block_n: int, shift: bool = False) -> torch.Tensor:
    """The N x N Gram matrix of z (of z_i - z_0 with ``shift``) accumulated in float64,
    split over D, zero-padded to (block_n, block_n)."""
    n, d = z.shape
    if z.dtype == torch.float64:
        gram = z @ z.T  # a float64 GEMM (float64 tl.dot does not lower on GPUs)
        return torch.nn.functional.pad(gram, (0, block_n - n, 0, block_n - n))
    block_k = 32 if block_n >= 64 else 64
    if _interpret():
        chunk = triton.cdiv(d, block_k) * block_k  # one program: the interpreter pays per program
    else:
        # Enough programs to fill the device several times over, each a multiple of BLOCK_K.
        chunk = max(block_k, triton.cdiv(triton.cdiv(d, 1024), block_k) * block_k)
    n_chunks = triton.cdiv(d, chunk)
    part = torch.empty((n_chunks, block_n, block_n), device=z.device, dtype=torch.float64)
    _gram_partial_kernel[(n_chunks,)](z, part, n, d, chunk, BLOCK_N=block_n, BLOCK_K=block_k, SHIFT=shift,
                                      num_warps=8 if block_n >= 64 else 4)
    return part.sum(0) if n_chunks > 1 else part[0]


@triton.jit
def _small_coefficients_kernel(
    GRAM,  # (BLOCK_N, BLOCK_N) float64 Gram matrix, zero-padded (GRAM_IS_D2: squared distances)
    C,  # (BLOCK_N, BLOCK_N) out: grad = C[:N, :N] @ Z, zero outside N x N
    LOSS,  # (1,) float64 out
    N,
    TAU,  # τ, ε, the distance scale and the number of pairs as float64 bit patterns
    MARGIN,  # (int64: a Python float argument would reach the kernel as float32)
    SCALE,
    PAIRS,
    VARIANT: tl.constexpr,
    INCLUDE_DIAG: tl.constexpr,
    DUP_EPS: tl.constexpr,  # a Gram distance <= DUP_EPS (n_i + n_j) is a duplicate
    GRAM_IS_D2: tl.constexpr,  # GRAM holds exact d^2 (the L2 family of float64 z): duplicates are d^2 <= 0
    BLOCK_N: tl.constexpr,
):
    """(loss, C) from the exact Gram matrix, in float64, in one program: the whole epilogue
    of the few-samples regime (the reference formulas of ``reference/dispersive.py`` on
    Gram entries; w_ij below is dL/dd_ij up to the chain rule of the distance)."""
    tau = TAU.to(tl.int64).to(tl.float64, bitcast=True)
    margin = MARGIN.to(tl.int64).to(tl.float64, bitcast=True)
    scale = SCALE.to(tl.int64).to(tl.float64, bitcast=True)
    pairs = PAIRS.to(tl.int64).to(tl.float64, bitcast=True)
    r = tl.arange(0, BLOCK_N)
    i = r[:, None]
    j = r[None, :]
    valid = (i < N) & (j < N)
    eye = i == j
    g = tl.load(GRAM + i * BLOCK_N + j)
    diag = tl.where(eye, g, 0.0)
    sq_i = tl.sum(diag, axis=1)[:, None]
    sq_j = tl.sum(diag, axis=0)[None, :]
    if INCLUDE_DIAG:
        pair = valid
    else:
        pair = valid & (i != j)
    if VARIANT == 2:  # infonce_cosine: d = 1 - ẑ_i·ẑ_j
        norm_i = tl.sqrt(tl.maximum(sq_i, 0.0))
        rinv_i = 1.0 / tl.maximum(norm_i, 1e-12)
        rinv_j = 1.0 / tl.maximum(tl.sqrt(tl.maximum(sq_j, 0.0)), 1e-12)
        ghat = g * rinv_i * rinv_j
        d = scale * (1.0 - ghat)
    else:
        if GRAM_IS_D2:
            d2 = tl.maximum(g, 0.0)
            dup = (d2 <= 0.0) | eye
        else:
            nsum = sq_i + sq_j
            d2 = tl.maximum(nsum - 2.0 * g, 0.0)
            dup = (d2 <= DUP_EPS * nsum) | eye  # equal rows: distance 0, subgradient 0
        d2 = tl.where(dup, 0.0, d2)
        dist = tl.sqrt(d2)
        if VARIANT == 1:
            d = scale * d2
        else:
            d = scale * dist
        inv_dist = tl.where(dup, 0.0, 1.0 / tl.where(dup, 1.0, dist))
    if VARIANT == 3:  # hinge: mean of max(0, ε − d)²
        h = tl.where(pair, tl.maximum(margin - d, 0.0), 0.0)
        loss = tl.sum(tl.sum(h * h, axis=1), axis=0) / pairs
        w = (-2.0 * scale) * h * inv_dist
        coef = 2.0 / pairs
    else:  # InfoNCE: log mean exp(−d/τ) as a logsumexp
        e = tl.where(pair, -d / tau, float("-inf"))
        m = tl.max(tl.max(e, axis=1), axis=0)
        lse = m + tl.log(tl.sum(tl.sum(tl.exp(e - m), axis=1), axis=0))
        loss = lse - tl.log(pairs)
        p = tl.where(pair, tl.exp(e - lse), 0.0)
        if VARIANT == 1:
            w = tl.where(dup, 0.0, p)
            coef = -4.0 * scale / tau
        elif VARIANT == 0:
            w = p * scale * inv_dist
            coef = -2.0 / tau
        else:
            w = p
            coef = 1.0
    if VARIANT == 2:
        # g_i = (2s/τ) Σ_j p_ij ẑ_j, dz_i = (g_i − (ẑ_i·g_i) ẑ_i) / ‖z_i‖
        k = 2.0 * scale / tau
        q = k * tl.sum(w * ghat, axis=1)[:, None]
        proj = tl.where(norm_i > 1e-12, rinv_i, 0.0)
        c = rinv_i * (k * w * rinv_j) - tl.where(eye, q * rinv_i * proj, 0.0)
    else:
        # grad_i = Σ_j w_ij (z_i − z_j): C = coef · (diag(rowsum w) − w)
        rows = tl.sum(w, axis=1)[:, None]
        c = coef * (tl.where(eye, rows, 0.0) - w)
    c = tl.where(valid, c, 0.0)
    tl.store(C + i * BLOCK_N + j, c.to(C.dtype.element_ty))
    tl.store(LOSS, loss)


# The few-samples epilogue's duplicate threshold on a Gram distance (float32 and half z: a
# float64 sum of float32 chunk products, whose noise (~1e-7 (n_i + n_j)) hides any pair this
# close anyway; float64 z takes exact distances instead).
SMALL_DUP_EPS = 1e-12


def _small_warps(block_n: int) -> int:
    """Warps of the epilogue and C @ Z programs: 8 at N > 32 (with 4, sm_90 spills 40-448 B
    per thread there: benchmarks/bench_dispersive_tiles.py --compile-check small)."""
    return 8 if block_n >= 64 else 4


_PARAMS_CACHE: dict = {}


def device_params(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small read-only tensor of scalar kernel parameters on ``device``, cached by value.

    ``torch.tensor(values).to(cuda)`` is a blocking copy from pageable memory: PyTorch
    synchronises the stream after it, so the host would wait for the GPU to drain on every
    loss call (and a CUDA graph capture would fail on it). A cached tensor is copied once;
    the kernels only read it, so calls and streams can share it."""
    key = (tuple(float(v) for v in values), dtype, torch.device(device))
    t = _PARAMS_CACHE.get(key)
    if t is None:
        if len(_PARAMS_CACHE) >= 256:  # options a run actually uses are few; bound it anyway
            _PARAMS_CACHE.clear()
        t = torch.tensor(key[0], dtype=dtype).to(device)
        _PARAMS_CACHE[key] = t
    return t


def _f64_bits(x: float) -> int:
    """The bit pattern of float64 x as an int64 (the kernel bitcasts it back)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _small_path(z, variant, tau, margin, include_diagonal, scale, need_grad):
    """Few samples, huge D: the float64 Gram split over D, the epilogue in one program, then
    one pass C @ Z for the gradient: four launches whatever the variant."""
    n, d = z.shape
    block_n = max(16, triton.next_power_of_2(n))
    # The L2 family's distances and gradient ignore a common shift of the rows, so float32
    # and half z are read as z_i - z_0: float32 chunk products of rows 1 ± 0.01 cost 100x eager's error
    # unshifted. Cosine depends on the norms themselves.
    shift = variant != 2 and z.dtype != torch.float64
    exact = variant != 2 and z.dtype == torch.float64
    if exact:
        # float64: d^2 from exact differences (never n_i + n_j - 2 G_ij, which keeps no digit
        # of rows 1e-9 apart): N^2 D / 2 more FLOPs than the Gram, on a validation dtype.
        d2 = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").square_()
        gram = torch.nn.functional.pad(d2, (0, block_n - n, 0, block_n - n))
    else:
        gram = _gram_float64(z, block_n, shift)
    # C is at most 64 x 64: each gradient entry sums <= 64 products, so float32 (fp32 FMA,
    # no TF32) keeps it within ~1e-7 of float64; float64 z keeps float64.
    c = torch.empty((block_n, block_n), device=z.device, dtype=torch.float64 if z.dtype == torch.float64 else torch.float32)
    loss = torch.empty((1,), device=z.device, dtype=torch.float64)
    pairs = n * n if include_diagonal else n * (n - 1)
    _small_coefficients_kernel[(1,)](
        gram, c, loss, n, _f64_bits(tau), _f64_bits(margin), _f64_bits(scale), _f64_bits(pairs), VARIANT=variant,
        INCLUDE_DIAG=bool(include_diagonal), DUP_EPS=SMALL_DUP_EPS, GRAM_IS_D2=exact, BLOCK_N=block_n,
        num_warps=_small_warps(block_n))
    loss = loss[0]
    grad = None
    if need_grad:
        if z.dtype == torch.float64:
            return loss, c[:n, :n] @ z  # float64 tl.dot does not lower on GPUs
        grad = torch.empty_like(z, dtype=saved_grad_dtype(z.dtype))
        block_d = 64 if block_n >= 64 else 128
        _rowmix_kernel[(triton.cdiv(d, block_d),)](
            c, z, grad, n, d, BLOCK_N=block_n, BLOCK_D=block_d, CDT=tl.float32, SHIFT=shift,
            num_warps=_small_warps(block_n),
        )
    return loss, grad


# --------------------------------------------------------------------------------------
# covariance: GEMM-bound, plain torch matmuls
# --------------------------------------------------------------------------------------


def _covariance(z, need_grad):
    n, d = z.shape
    # Few samples: memory-bound, so float64 costs nothing and keeps the cancelling terms
    # (||G||_F^2 - sum c_a^2, Zc Zc^T Zc - Zc diag(c)) exact; many samples: float32 GEMMs.
    wide = z.dtype == torch.float64 or n <= SMALL_N_MAX
    zc = z.to(torch.float64 if wide else torch.float32)
    zc = zc - zc.mean(0, keepdim=True)
    col = zc.square().sum(0)  # c_a = sum_i Zc_ia^2
    denom = float(n - 1) ** 2
    if n <= d:
        gram = zc @ zc.T  # N x N, never D x D at huge D
        frob = gram.square().sum()
        zzz = (gram @ zc) if need_grad else None
    else:
        # D x D, smaller than N x N here. Its diagonal is exactly col, so the off-diagonal
        # form needs no cancelling subtraction: L = sum_{a != b} C_ab^2, dZc = 4 Zc C_off.
        cov = (zc.T @ zc).fill_diagonal_(0.0)
        loss = cov.square().sum() / denom
        return loss, ((4.0 / denom) * (zc @ cov)) if need_grad else None
    loss = (frob - col.square().sum()) / denom
    grad = None
    if need_grad:
        grad = (4.0 / denom) * (zzz - zc * col[None, :])
    return loss, grad


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------


def dispersive_fused_triton(
    z: torch.Tensor,
    variant_code: int,
    tau: float,
    margin: float,
    include_diagonal: bool,
    scale_by_dim: bool,
    need_grad: bool,
    _path: str = "auto",
    _autotune: bool | None = None,
    _splits: int | None = None,
    _lazy: bool | None = None,
    _config: dict | None = None,
    _kernel: str | None = None,
    _loop: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dL/dz) of a contiguous (N, D) z; the contract of torch.ops.disseg.dispersive_fused.

    ``_path`` ("auto", "small", "rows"), ``_autotune``, ``_splits``, ``_lazy``, ``_config``,
    ``_kernel`` and ``_loop`` (see ``_rows_path``) are for tests and benchmarks.
    """
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D (N, D) tensor, got {getattr(z, 'shape', type(z))}")
    if z.dtype not in _SUPPORTED:
        raise TypeError(f"z must be float32, bfloat16, float16 or float64 for the triton backend, got dtype {z.dtype}")
    if not z.is_contiguous():
        raise ValueError(f"z must be contiguous, got strides {z.stride()} for shape {tuple(z.shape)}")
    n, d = z.shape
    if n < 2 or d < 1:
        raise ValueError(f"z must have N >= 2 rows and D >= 1 columns, got shape {tuple(z.shape)}")
    if z.device.type != "cuda" and not (z.device.type == "cpu" and _interpret()):
        raise ValueError(f"triton kernels need a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1), got device {z.device}")
    if variant_code not in range(5):
        raise ValueError(f"variant_code must be 0..4 ({', '.join(_VARIANT_NAMES)}), got {variant_code!r}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau!r}")
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin!r}")
    if _path not in ("auto", "small", "rows"):
        raise ValueError(f"_path must be 'auto', 'small' or 'rows', got {_path!r}")
    if _path == "small" and n > 128:
        raise ValueError(f"_path='small' holds N x N tiles in registers and needs N <= 128, got N={n}")

    scale = 1.0 / d if scale_by_dim else 1.0
    if variant_code == COVARIANCE:
        loss, grad = _covariance(z, need_grad)
    elif _path == "small" or (_path == "auto" and n <= SMALL_N_MAX and d > _DIRECT_MAX_D):
        loss, grad = _small_path(z, variant_code, float(tau), float(margin), include_diagonal, scale, need_grad)
    else:
        loss, grad = _rows_path(z, variant_code, float(tau), float(margin), include_diagonal, scale, need_grad,
                                autotune=_autotune, splits=_splits, lazy=_lazy, config=_config, kernel=_kernel,
                                loop=_loop)
    loss_dtype = torch.float32 if z.dtype in _HALF else z.dtype
    loss = loss.to(loss_dtype)
    if need_grad:
        grad = grad.to(saved_grad_dtype(z.dtype))
    else:
        grad = z.new_empty((0,))
    return loss, grad
