"""Triton kernel of the dispersive row statistics: rows against a rectangular column set.

``dispersive_row_stats_triton(rows, cols, variant_code, tau, margin, scale_by_dim,
include_diagonal, self_offset, grad_weight, need_grad) -> (m, s, acc)`` has the contract of
``torch.ops.disseg.dispersive_row_stats`` and of ``disseg_kernels.distributed._row_stats``
(its docstring): rows (n, D) and cols (m, D) prepared in the compute dtype (float32 or
float64; unit rows for the cosine variant), column ``i + self_offset`` is row i itself.
With l_ij = −d_ij/τ:

    m_i = max_j l_ij,  s_i = Σ_j exp(l_ij − m_i),
    acc_i = Σ_j g e_ij w_ij (z_i − z_j)   (l2: w = 1/d, 0 at d = 0; l2sq: w = 2)
            Σ_j g e_ij ẑ_j                (cosine)
    hinge: m_i = 0, s_i = Σ_j h_ij², acc_i = Σ_j g (h_ij/d_ij)(z_i − z_j), h = max(0, ε − d).

``_row_stats_kernel``: one program per block of BLOCK_M rows (and per BLOCK_DO-wide chunk of
acc's columns when D is wide), looping over column blocks: the Gram tile R̃ C̃ᵀ by tl.dot,
the distance tile, an online per-row max, and acc += V C̃ by a second tl.dot, flash-style.
For the L2 family rows and columns are shifted by the row block's mean (computed by torch,
one (D,) vector per row block): distances ignore it, and it removes the cancellation of a
large common offset in both the Gram distance and r_i z_i − Σ_j v_ij z_j. A pair whose
distance d² is at or below 0 is a duplicate (d = 0, weight 0), as in
``triton/dispersive.py``; the self pair, when included, has d = 0 exactly. float64 tiles
take the d² of a pair closer than ``EXACT_D2``·(‖r̃_i‖² + ‖c̃_j‖²) from exact differences
(``_exact_close_pairs``), as the C++ kernel does. float32 tiles have no float64
recomputation of close pairs (unlike the C++ kernel): they keep a float32 Gram error (of
order 1e-7 (‖r̃_i‖² + ‖c̃_j‖²) in d²).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from disseg_kernels.triton.dispersive import _exact_close_pairs, device_params, exact_threshold
from ._settings import interpret as _interpret

INFONCE_L2, INFONCE_L2SQ, INFONCE_COSINE, HINGE = 0, 1, 2, 3


@triton.jit
def _row_stats_kernel(
    R,  # (n, D) rows, contiguous
    C,  # (m, D) columns, contiguous
    SHIFT,  # (cdiv(n, BLOCK_M), D): the mean of each row block (L2 family), else unused
    M_OUT,  # (n,)
    S_OUT,  # (n,)
    ACC,  # (n, D), or (1, 1) without need_grad
    n,
    m,
    D,
    self_offset,  # column i + self_offset is row i (when HAS_SELF)
    PARAMS,  # (5,): scale (1/D or 1), 1/tau, margin, grad_weight, exact_threshold
    VARIANT: tl.constexpr,
    HAS_SELF: tl.constexpr,
    INCLUDE_DIAG: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    ACC_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    SHIFTED: tl.constexpr = VARIANT != 2
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n
    ks = tl.arange(0, BLOCK_K).to(tl.int64)
    dcols = pid_d.to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO).to(tl.int64)
    dcol_ok = dcols < D
    shift_row = SHIFT + pid_m.to(tl.int64) * D

    scale = tl.load(PARAMS)
    inv_tau = tl.load(PARAMS + 1)
    margin = tl.load(PARAMS + 2)
    gw = tl.load(PARAMS + 3)
    exact_eps = tl.load(PARAMS + 4)

    # ||r~_i||^2 of the shifted rows
    nr = tl.zeros((BLOCK_M,), ACC_T)
    if SHIFTED:
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + ks
            kok = kk < D
            r = tl.load(R + rows[:, None] * D + kk[None, :], mask=row_ok[:, None] & kok[None, :], other=0.0).to(ACC_T)
            sh = tl.load(shift_row + kk, mask=kok, other=0.0).to(ACC_T)
            r = tl.where(row_ok[:, None] & kok[None, :], r - sh[None, :], 0.0)
            nr += tl.sum(r * r, axis=1)

    m_i = tl.full((BLOCK_M,), float("-inf"), ACC_T)
    s_i = tl.zeros((BLOCK_M,), ACC_T)
    r_i = tl.zeros((BLOCK_M,), ACC_T)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC_T)
    if SHIFTED:
        sh_do = tl.load(shift_row + dcols, mask=dcol_ok, other=0.0).to(ACC_T)

    for start_n in range(0, m, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < m
        g = tl.zeros((BLOCK_M, BLOCK_N), ACC_T)
        nc = tl.zeros((BLOCK_N,), ACC_T)
        for k0 in range(0, D, BLOCK_K):
            kk = k0 + ks
            kok = kk < D
            rmask = row_ok[:, None] & kok[None, :]
            cmask = col_ok[:, None] & kok[None, :]
            r = tl.load(R + rows[:, None] * D + kk[None, :], mask=rmask, other=0.0).to(ACC_T)
            c = tl.load(C + cols[:, None] * D + kk[None, :], mask=cmask, other=0.0).to(ACC_T)
            if SHIFTED:
                sh = tl.load(shift_row + kk, mask=kok, other=0.0).to(ACC_T)
                r = tl.where(rmask, r - sh[None, :], 0.0)
                c = tl.where(cmask, c - sh[None, :], 0.0)
                nc += tl.sum(c * c, axis=1)
            g += tl.dot(r, tl.trans(c), input_precision="ieee", out_dtype=ACC_T)

        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_SELF:
            is_self = cols[None, :] == rows[:, None] + self_offset
        else:
            is_self = tl.zeros((BLOCK_M, BLOCK_N), tl.int1)
        if not INCLUDE_DIAG:
            valid = valid & ~is_self
        if VARIANT == 2:
            d = (1.0 - g) * scale
            d_raw = d
        else:
            nsum = nr[:, None] + nc[None, :]
            d2 = tl.maximum(nsum - 2.0 * g, 0.0)
            if ACC_T == tl.float64:
                d2, dup = _exact_close_pairs(R, C, rows, cols, row_ok, col_ok, D, d2, nsum, is_self, exact_eps,
                                             BLOCK_M, BLOCK_N)
            else:
                dup = d2 <= 0.0
            d2 = tl.where(dup | is_self, 0.0, d2)  # duplicates: d = 0 exactly
            d_raw = tl.sqrt(d2)  # ||z_i - z_j||
            if VARIANT == 1:
                d = d2 * scale
            else:
                d = d_raw * scale

        if VARIANT == 3:
            h = tl.where(valid, tl.maximum(margin - d, 0.0), 0.0)
            s_i += tl.sum(h * h, axis=1)
            v = tl.where(d_raw > 0, h / tl.where(d_raw > 0, d_raw, 1.0), 0.0) * gw
        else:
            logit = tl.where(valid, -d * inv_tau, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(logit, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(logit - m_safe[:, None])
            s_i = s_i * alpha + tl.sum(p, axis=1)
            if VARIANT == 0:
                v = tl.where(d_raw > 0, p / tl.where(d_raw > 0, d_raw, 1.0), 0.0) * gw
            elif VARIANT == 1:
                v = tl.where(d_raw > 0, p, 0.0) * (2.0 * gw)  # a duplicate's gradient is 0
            else:
                v = p * gw
            r_i = r_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        if NEED_GRAD:
            r_i += tl.sum(v, axis=1)
            cmask = col_ok[:, None] & dcol_ok[None, :]
            c = tl.load(C + cols[:, None] * D + dcols[None, :], mask=cmask, other=0.0).to(ACC_T)
            if SHIFTED:
                c = tl.where(cmask, c - sh_do[None, :], 0.0)
            acc += tl.dot(v.to(ACC_T), c, input_precision="ieee", out_dtype=ACC_T)

    if VARIANT == 3:
        m_i = tl.zeros((BLOCK_M,), ACC_T)
    if pid_d == 0:
        tl.store(M_OUT + rows, m_i, mask=row_ok)
        tl.store(S_OUT + rows, s_i, mask=row_ok)
    if NEED_GRAD:
        omask = row_ok[:, None] & dcol_ok[None, :]
        if SHIFTED:
            r = tl.load(R + rows[:, None] * D + dcols[None, :], mask=omask, other=0.0).to(ACC_T)
            r = tl.where(omask, r - sh_do[None, :], 0.0)
            out = r_i[:, None] * r - acc
        else:
            out = acc
        tl.store(ACC + rows[:, None] * D + dcols[None, :], out, mask=omask)


def _blocks(n: int, m: int, d: int, interpret: bool | None = None):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DO, num_warps).

    On a GPU: the chunked layout of the main row kernel's float32/float64 FMA dots, 16-wide
    feature chunks and 64-wide output chunks over 8 warps. Until 2026-11-28 it used
    64-wide chunks, 128-wide outputs and 4 warps, which sm_90 compiled with 4.6-9.0 KB
    (float32) and 1.5-2.0 KB (float64) of local-memory spills per thread; these blocks
    spill nothing (``python -m benchmarks.bench_dispersive_tiles --compile-check
    row_stats``). Output chunks of 64 recompute the Gram tile once per 64 columns of D."""
    d_pad = max(16, triton.next_power_of_2(max(d, 1)))
    if _interpret() if interpret is None else interpret:
        return 32, 32, min(64, d_pad), min(128, d_pad), 4
    return 64, 64, 16, min(64, d_pad), 8


def dispersive_row_stats_triton(
    rows: torch.Tensor,
    cols: torch.Tensor,
    variant_code: int,
    tau: float,
    margin: float,
    scale_by_dim: bool,
    include_diagonal: bool,
    self_offset: int | None,
    grad_weight: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m (n,), s (n,), acc (n, D) or (n, 0)) in rows' dtype; see the module docstring."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or not isinstance(cols, torch.Tensor) or cols.dim() != 2:
        raise ValueError(f"rows and cols must be 2-D tensors, got {getattr(rows, 'shape', rows)} and "
                         f"{getattr(cols, 'shape', cols)}")
    if rows.dtype not in (torch.float32, torch.float64) or cols.dtype != rows.dtype:
        raise TypeError(f"rows and cols must both be float32 or float64 (the compute dtype), got {rows.dtype} "
                        f"and {cols.dtype}")
    if rows.shape[1] != cols.shape[1]:
        raise ValueError(f"rows and cols must have the same D, got {tuple(rows.shape)} and {tuple(cols.shape)}")
    if rows.device != cols.device:
        raise ValueError(f"rows are on {rows.device} and cols on {cols.device}")
    if rows.device.type != "cuda" and not (rows.device.type == "cpu" and _interpret()):
        raise ValueError(f"triton kernels need CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got "
                         f"device {rows.device}")
    if variant_code not in (INFONCE_L2, INFONCE_L2SQ, INFONCE_COSINE, HINGE):
        raise ValueError(f"variant_code must be 0..3 (infonce_l2, infonce_l2sq, infonce_cosine, hinge), "
                         f"got {variant_code!r}")
    rows, cols = rows.contiguous(), cols.contiguous()
    n, d = rows.shape
    m = cols.shape[0]
    dt = rows.dtype
    m_out = torch.full((n,), 0.0 if variant_code == HINGE else float("-inf"), dtype=dt, device=rows.device)
    s_out = torch.zeros(n, dtype=dt, device=rows.device)
    acc = torch.zeros((n, d) if need_grad else (n, 0), dtype=dt, device=rows.device)
    if d == 0 and n and m:
        raise ValueError(f"rows must have D >= 1 features for the triton backend, got shape {tuple(rows.shape)}")
    if n == 0 or m == 0:
        return m_out, s_out, acc
    bm, bn, bk, bdo, warps = _blocks(n, m, d)
    n_blocks = triton.cdiv(n, bm)
    if variant_code != INFONCE_COSINE:
        pad = n_blocks * bm - n
        blocks = torch.nn.functional.pad(rows, (0, 0, 0, pad)).reshape(n_blocks, bm, d)
        counts = torch.full((n_blocks, 1), float(bm), dtype=dt, device=rows.device)
        counts[-1, 0] = bm - pad
        shift = blocks.sum(1) / counts
    else:
        shift = rows.new_zeros((1, 1))
    params = device_params((1.0 / d if scale_by_dim else 1.0, 1.0 / tau, margin, grad_weight,
                            exact_threshold(dt)), dt, rows.device)
    out = acc if need_grad else rows.new_empty((1, 1))
    grid = (n_blocks, triton.cdiv(d, bdo) if need_grad else 1)
    _row_stats_kernel[grid](
        rows, cols, shift, m_out, s_out, out, n, m, d, 0 if self_offset is None else int(self_offset), params,
        VARIANT=variant_code, HAS_SELF=self_offset is not None, INCLUDE_DIAG=bool(include_diagonal),
        NEED_GRAD=bool(need_grad), ACC_T=tl.float64 if dt == torch.float64 else tl.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_DO=bdo, num_warps=warps,
    )
    return m_out, s_out, acc
