"""Triton kernels of the dispersive loss (``shared/spec/dispersive.md``).

``dispersive_fused_triton(z, variant_code, tau, margin, include_diagonal, scale_by_dim,
need_grad) -> (loss, grad)`` has the contract of ``torch.ops.disseg.dispersive_fused``:
z is a contiguous (N, D) tensor (N >= 2, D >= 1) of float32, bfloat16, float16 or float64;
the loss is 0-d (float32 for half inputs, else z's dtype); grad = dL/dz in z's shape and
dtype, or an empty tensor when ``need_grad`` is False. Variant codes: 0 infonce_l2,
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

import torch
import triton
import triton.language as tl

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

# Relative threshold under which d^2 computed from the Gram matrix is rounding noise and the
# pair is treated as a duplicate (d = 0, subgradient 0, never 1/0).
_DUP_EPS_FP32 = 2e-6
_DUP_EPS_FP64 = 1e-12

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------
# Many samples: row-block kernel with an online logsumexp
# --------------------------------------------------------------------------------------


@triton.jit
def _dispersive_rows_kernel(
    Z,  # (N, D) input, any supported dtype, contiguous
    SQN,  # (N,) ACC dtype: ||z_i||^2 (L2 family), max(||z_i||, 1e-12) (cosine)
    RINV,  # (N,) 1 / max(||z_i||, 1e-12) (cosine only)
    PROJ,  # (N,) RINV where ||z_i|| > 1e-12 else 0 (cosine only)
    OUT,  # (N, D) ACC dtype: a_i z_i - sum_j u_ij z_j (unnormalised gradient rows)
    M_OUT,  # (N,) per-row max of -d/tau (natural log units); 0 for hinge
    S_OUT,  # (N,) per-row sum of exp(-d/tau - m_i); hinge: sum of max(0, margin - d)^2
    N,
    D,
    N_BUCKET,  # only a key for the autotuner
    PARAMS,  # (4,) ACC dtype: scale (1/D with scale_by_dim else 1), 1/tau, margin, dup_eps
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < N
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    dcols = pid_d.to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    dcol_ok = dcols < D

    scale = tl.load(PARAMS)
    inv_tau = tl.load(PARAMS + 1)
    margin = tl.load(PARAMS + 2)
    dup_eps = tl.load(PARAMS + 3)
    n_i = tl.load(SQN + rows, mask=row_ok, other=0.0)
    if VARIANT == 2:
        rinv_i = tl.load(RINV + rows, mask=row_ok, other=0.0)
        if DIRECT_D > 0:
            nrm_i = tl.load(SQN + rows, mask=row_ok, other=1.0)
            has_norm_i = tl.load(PROJ + rows, mask=row_ok, other=0.0) > 0
    if SINGLE_K and DIRECT_D == 0:
        zi = tl.load(Z + rows[:, None] * D + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < D), other=0.0)
        if UPCAST:
            zi = zi.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    s_i = tl.zeros((BLOCK_M,), ACC)
    r_i = tl.zeros((BLOCK_M,), ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC)
    e_scale = inv_tau * 1.4426950408889634  # exp(x) = exp2(x * log2 e)

    for start_n in range(0, N, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        if DIRECT_D > 0:
            # Few features: d^2 = sum_k (z_ik - z_jk)^2 exactly, no n_i + n_j - 2G cancellation.
            d2x = tl.zeros((BLOCK_M, BLOCK_N), ACC)
            g = tl.zeros((BLOCK_M, BLOCK_N), ACC)
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
            zj = tl.load(Z + cols[:, None] * D + ks[None, :], mask=col_ok[:, None] & (ks[None, :] < D), other=0.0)
            if UPCAST:
                zj = zj.to(tl.float32)
            g = tl.dot(zi, tl.trans(zj), input_precision=GRAM_PREC, out_dtype=ACC)
        else:
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

        valid = row_ok[:, None] & col_ok[None, :]
        if not INCLUDE_DIAG:
            valid = valid & (rows[:, None] != cols[None, :])

        if VARIANT == 2:
            rinv_j = tl.load(RINV + cols, mask=col_ok, other=0.0)
            if DIRECT_D > 0:
                ghat = g
            else:
                ghat = g * rinv_i[:, None] * rinv_j[None, :]
            d = scale * (1.0 - ghat)
        else:
            n_j = tl.load(SQN + cols, mask=col_ok, other=0.0)
            nsum = n_i[:, None] + n_j[None, :]
            if DIRECT_D > 0:
                d2 = d2x
                dup = d2 == 0.0
            else:
                d2 = nsum - 2.0 * g
                dup = d2 <= dup_eps * nsum
            if INCLUDE_DIAG:
                dup = dup | (rows[:, None] == cols[None, :])
            d2 = tl.where(dup, 0.0, d2)
            if VARIANT == 1:
                d = scale * d2
            else:
                if ACC == tl.float64:
                    rs = tl.where(dup, 0.0, 1.0 / tl.sqrt(tl.where(dup, 1.0, d2)))
                else:
                    rs = tl.where(dup, 0.0, tl.math.rsqrt(tl.where(dup, 1.0, d2)))  # one MUFU op
                d = scale * (d2 * rs)

        if VARIANT == 3:
            h = tl.where(valid, tl.maximum(margin - d, 0.0), 0.0)
            s_i += tl.sum(h * h, 1)
            if NEED_GRAD:
                w = (-2.0 * scale) * h * rs
        else:
            e2 = tl.where(valid, -d * e_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(e2, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(e2 - m_use[:, None])
            s_i = s_i * alpha + tl.sum(p, 1)
            m_i = m_new
            if NEED_GRAD:
                if VARIANT == 0:
                    w = p * rs
                elif VARIANT == 1:
                    w = tl.where(dup, 0.0, p)  # exact: z_i - z_j = 0 there
                else:
                    w = p if DIRECT_D > 0 else p * rinv_j[None, :]
                    r_i = r_i * alpha + tl.sum(p * ghat, 1)
                acc = acc * alpha[:, None]
                if VARIANT != 2:
                    r_i = r_i * alpha

        if NEED_GRAD:
            # Round the weights once, to what the tensor cores will read, and sum the same
            # rounded values into r_i: then r_i z_i - sum_j w_ij z_j = sum_j w_ij (z_i - z_j)
            # up to fp32 accumulation, even where w_ij is large (near-duplicate rows).
            if DIRECT_D > 0:
                # acc_i += sum_j w_ij (z_j - z_i) column by column; cosine: the projected
                # sum_j w_ij (zhat_j - ghat_ij zhat_i), exactly 0 at D = 1 as in the reference.
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

    if pid_d == 0:
        if VARIANT == 3:
            tl.store(M_OUT + rows, tl.zeros((BLOCK_M,), ACC), mask=row_ok)
        else:
            tl.store(M_OUT + rows, m_i * 0.6931471805599453, mask=row_ok)
        tl.store(S_OUT + rows, s_i, mask=row_ok)
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
        tl.store(OUT + rows[:, None] * D + dcols[None, :], a_i[:, None] * zo - acc, mask=out_mask)


def _rows_configs(d_pad: int) -> list[triton.Config]:
    """A short autotune list (each shape tunes once: keep it cheap)."""
    if d_pad <= 64:
        shapes = [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2)]
    elif d_pad <= 128:
        shapes = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)]
    else:  # 256-wide output chunk (or the split-D loop)
        shapes = [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 3), (128, 64, 8, 2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


_TUNED: dict[int, object] = {}


def _tuned_rows_kernel(d_pad: int):
    if d_pad not in _TUNED:
        _TUNED[d_pad] = triton.autotune(
            configs=_rows_configs(d_pad),
            key=["D", "N_BUCKET", "VARIANT", "INCLUDE_DIAG", "NEED_GRAD"],
        )(_dispersive_rows_kernel)
    return _TUNED[d_pad]


def _default_rows_config(d_pad: int) -> dict:
    """Fixed blocks: the interpreter (64-wide, ~0.1 s per call at N <= 512) and
    DISSEG_TRITON_AUTOTUNE=0."""
    if _interpret():
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    if d_pad <= 128:
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}


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


def _rows_path(z, variant, tau, margin, include_diagonal, scale, need_grad, autotune=None):
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
    m_out = torch.empty(n, device=z.device, dtype=acc_dtype)
    s_out = torch.empty(n, device=z.device, dtype=acc_dtype)
    out = torch.empty((n, d) if need_grad else (1, 1), device=z.device, dtype=acc_dtype)

    d_pad = max(16, triton.next_power_of_2(d))
    single = d_pad <= _MAX_DO
    block_k = d_pad if single else 64
    block_do = d_pad if single else _MAX_DO
    n_dchunks = triton.cdiv(d, block_do) if (need_grad and not single) else 1
    ACC, GRAM_PREC, PV_DTYPE, PV_PREC = _dot_settings(z.dtype)
    dup_eps = _DUP_EPS_FP64 if z.dtype == torch.float64 else _DUP_EPS_FP32
    params = torch.tensor([scale, 1.0 / tau, margin, dup_eps], dtype=acc_dtype).to(z.device)
    args = (z, sqn, rinv, proj, out, m_out, s_out, n, d, min(triton.next_power_of_2(n), 16384), params)
    meta = dict(
        VARIANT=variant, INCLUDE_DIAG=bool(include_diagonal), NEED_GRAD=bool(need_grad), SINGLE_K=single,
        DIRECT_D=d if d <= _DIRECT_MAX_D else 0,
        BLOCK_K=block_k, BLOCK_DO=block_do, ACC=ACC, GRAM_PREC=GRAM_PREC, PV_DTYPE=PV_DTYPE, PV_PREC=PV_PREC,
        TF32_ROUND=PV_PREC == "tf32", UPCAST=_interpret() and z.dtype == torch.bfloat16,
    )
    if autotune is None:
        autotune = not _interpret() and os.environ.get("DISSEG_TRITON_AUTOTUNE", "1") != "0"
    if autotune:
        grid = lambda META: (triton.cdiv(n, META["BLOCK_M"]), n_dchunks)  # noqa: E731
        _tuned_rows_kernel(d_pad)[grid](*args, **meta)
    else:
        cfg = _default_rows_config(d_pad)
        grid = (triton.cdiv(n, cfg["BLOCK_M"]), n_dchunks)
        _dispersive_rows_kernel[grid](*args, **meta, **cfg)

    pairs = n * n if include_diagonal else n * (n - 1)
    stat = torch.float64
    if variant == HINGE:
        loss = s_out.to(stat).sum() / pairs
        coef = torch.full((n,), 2.0 / pairs, device=z.device, dtype=acc_dtype)
    else:
        row_lse = m_out.to(stat) + s_out.to(stat).log()
        lse = torch.logsumexp(row_lse, 0)
        loss = lse - math.log(pairs)
        e = (m_out.to(stat) - lse).exp()  # exp(m_i - LSE): the softmax normaliser per row
        k = {INFONCE_L2: 2.0, INFONCE_L2SQ: 4.0, INFONCE_COSINE: 2.0}[variant] * scale / tau
        coef = (-k * e).to(acc_dtype)
        if variant == INFONCE_COSINE:
            coef = coef * rinv
    grad = None
    if need_grad:
        grad = out.mul_(coef[:, None])
        if grad.dtype != z.dtype:
            grad = grad.to(z.dtype)
    return loss, grad


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
):
    pid = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    c = tl.load(C + rows[:, None] * BLOCK_N + rows[None, :])
    cols = pid * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    mask = row_ok[:, None] & (cols[None, :] < D)
    zt = tl.load(Z + rows[:, None] * D + cols[None, :], mask=mask, other=0.0).to(CDT)
    out = tl.dot(c, zt, input_precision="ieee", out_dtype=CDT)
    if OUT.dtype.element_ty != CDT:
        out = out.to(tl.float32)  # float64 -> half goes through float32 (the interpreter needs it)
    tl.store(OUT + rows[:, None] * D + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


def _gram_float64(z: torch.Tensor, block_n: int) -> torch.Tensor:
    """The N x N Gram matrix of z, accumulated in float64, split over D."""
    n, d = z.shape
    if z.dtype == torch.float64:
        return z @ z.T  # a float64 GEMM (float64 tl.dot does not lower on GPUs)
    block_k = 32 if block_n >= 64 else 64
    if _interpret():
        chunk = triton.cdiv(d, block_k) * block_k  # one program: the interpreter pays per program
    else:
        # Enough programs to fill the device several times over, each a multiple of BLOCK_K.
        chunk = max(block_k, triton.cdiv(triton.cdiv(d, 1024), block_k) * block_k)
    n_chunks = triton.cdiv(d, chunk)
    part = torch.empty((n_chunks, block_n, block_n), device=z.device, dtype=torch.float64)
    _gram_partial_kernel[(n_chunks,)](z, part, n, d, chunk, BLOCK_N=block_n, BLOCK_K=block_k,
                                      num_warps=8 if block_n >= 64 else 4)
    return part.sum(0)[:n, :n]


def _small_coefficients(gram, variant, tau, margin, include_diagonal, scale):
    """(loss, C) in float64 from the exact N x N Gram matrix: grad = C @ Z."""
    n = gram.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=gram.device)
    pair = torch.ones_like(eye) if include_diagonal else ~eye
    pairs = n * n if include_diagonal else n * (n - 1)
    sq = gram.diagonal()
    if variant == INFONCE_COSINE:
        norm = sq.clamp_min(0).sqrt()
        rinv = 1.0 / norm.clamp_min(1e-12)
        ghat = gram * rinv[:, None] * rinv[None, :]
        d = scale * (1.0 - ghat)
    else:
        nsum = sq[:, None] + sq[None, :]
        d2 = (nsum - 2.0 * gram).clamp_min(0)
        dup = (d2 <= _DUP_EPS_FP64 * nsum) | eye
        d2 = d2.masked_fill(dup, 0.0)
        dist = d2.sqrt()
        d = scale * (d2 if variant == INFONCE_L2SQ else dist)
        inv_dist = torch.where(dup, torch.zeros_like(dist), 1.0 / dist.masked_fill(dup, 1.0))

    def laplacian(w):  # grad_i = sum_j w_ij (z_i - z_j)  =>  C = diag(rowsum w) - w
        return torch.diag(w.sum(1)) - w

    if variant == HINGE:
        h = torch.relu(margin - d) * pair
        loss = h.square().sum() / pairs
        return loss, (2.0 / pairs) * laplacian(-2.0 * scale * h * inv_dist)
    e = (-d / tau).masked_fill(~pair, float("-inf"))
    lse = torch.logsumexp(e.reshape(-1), 0)
    loss = lse - math.log(pairs)
    p = (e - lse).exp()
    if variant == INFONCE_L2SQ:
        return loss, (-4.0 * scale / tau) * laplacian(p.masked_fill(dup, 0.0))  # exact: z_i = z_j there
    if variant == INFONCE_L2:
        return loss, (-2.0 / tau) * laplacian(p * scale * inv_dist)
    # cosine: g_i = (2s/tau) sum_j p_ij zhat_j, dz_i = rinv_i (g_i - (zhat_i . g_i) zhat_i)
    k = 2.0 * scale / tau
    a = k * p * rinv[None, :]
    q = k * (p * ghat).sum(1)
    proj = torch.where(norm > 1e-12, rinv, torch.zeros_like(rinv))
    return loss, rinv[:, None] * a - torch.diag(q * rinv * proj)


def _small_path(z, variant, tau, margin, include_diagonal, scale, need_grad):
    n, d = z.shape
    block_n = max(16, triton.next_power_of_2(n))
    gram = _gram_float64(z, block_n)
    loss, c = _small_coefficients(gram, variant, tau, margin, include_diagonal, scale)
    grad = None
    if need_grad:
        # float64 products: cheap at these N (the pass is memory-bound) and exact enough that
        # cancelling terms (the cosine projection, equal rows) leave no float32 residue.
        if z.dtype == torch.float64:
            return loss, c @ z  # float64 tl.dot does not lower on GPUs
        # C is at most 64 x 64: each output sums <= 64 products, so float32 (fp32 FMA, no
        # TF32) keeps the gradient within ~1e-7 of float64.
        cdt = torch.float32
        c_pad = torch.zeros((block_n, block_n), device=z.device, dtype=cdt)
        c_pad[:n, :n] = c
        grad = torch.empty_like(z)
        block_d = 64 if block_n >= 64 else 128
        _rowmix_kernel[(triton.cdiv(d, block_d),)](
            c_pad, z, grad, n, d, BLOCK_N=block_n, BLOCK_D=block_d, CDT=tl.float32, num_warps=4,
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dL/dz) of a contiguous (N, D) z; the contract of torch.ops.disseg.dispersive_fused.

    ``_path`` ("auto", "small", "rows") and ``_autotune`` are for tests and benchmarks.
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
                                autotune=_autotune)
    loss_dtype = torch.float32 if z.dtype in _HALF else z.dtype
    loss = loss.to(loss_dtype)
    if need_grad:
        grad = grad.to(z.dtype)
    else:
        grad = z.new_empty((0,))
    return loss, grad
