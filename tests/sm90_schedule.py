"""A model of ``disseg_kernels/triton/dispersive_sm90.py``'s schedule in plain PyTorch.

The Gluon kernel runs only on a Hopper GPU (Gluon has no interpreter). This model follows
its control flow step for step: the programs (row block, column split), the split bounds
(the last split runs to N), the column tiles in their order (the prologue's S(0), the loop
over ``max(n_tiles - 1, 1)`` tiles, the last tile), which tiles take the masks, and the
per-tile math, including the weights rounded to the operand dtype before both the product
and r_i. With it, the host code (``dispersive._rows_path`` with ``kernel="sm90"``: split
folding, the launch arguments, the merge) and the schedule are tested on the CPU in
float64, where any dropped, doubled or wrongly masked tile shows at far above 1e-9. What it
cannot check: Gluon's layouts, barriers and TMA coordinates (the GPU test does).
"""
from __future__ import annotations

import math

import torch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def launch_model(z, sqn, out, m_out, s_out, n, d, col_chunk, splits, params, variant, include_diagonal,
                 block_m=64, block_n=64):
    """Drop-in for ``dispersive_sm90.launch`` (same arguments, same outputs)."""
    from disseg_kernels.triton.dispersive_sm90 import check_splits

    check_splits(n, col_chunk, splits, block_n)
    acc_t = out.dtype
    operand_t = z.dtype if z.dtype in (torch.bfloat16, torch.float16) else acc_t
    scale, inv_tau, _, dup_eps = (float(v) for v in params)
    c2 = -scale * inv_tau * LOG2E
    zf = z.to(acc_t)
    dev = z.device

    def rows_of(start, count):  # TMA: rows past N read as zeros
        block = torch.zeros(count, d, dtype=acc_t, device=dev)
        stop = min(start + count, n)
        if stop > start:
            block[: stop - start] = zf[start:stop]
        return block

    for pid_s in range(splits):
        lo = pid_s * col_chunk
        hi = n if pid_s == splits - 1 else lo + col_chunk
        n_tiles = math.ceil((hi - lo) / block_n)
        for row0 in range(0, n, block_m):
            zi = rows_of(row0, block_m)
            rows = torch.arange(row0, row0 + block_m, device=dev)
            n_i = torch.where(rows < n, sqn[rows.clamp(max=n - 1)], torch.zeros((), dtype=acc_t, device=dev))
            m_i = torch.full((block_m,), -math.inf, dtype=acc_t, device=dev)
            s_i = torch.zeros(block_m, dtype=acc_t, device=dev)
            r_i = torch.zeros(block_m, dtype=acc_t, device=dev)
            acc = torch.zeros(block_m, d, dtype=acc_t, device=dev)

            def tile(t, masked):
                nonlocal m_i, s_i, r_i, acc
                start_n = lo + t * block_n
                zj = rows_of(start_n, block_n)
                s = zi @ zj.T
                cols = torch.arange(start_n, start_n + block_n, device=dev)
                col_ok = cols < n
                n_j = torch.where(col_ok, sqn[cols.clamp(max=n - 1)], torch.zeros((), dtype=acc_t, device=dev))
                nsum = n_i[:, None] + n_j[None, :]
                d2 = nsum - 2.0 * s
                dup = d2 <= dup_eps * nsum
                on_diag = rows[:, None] == cols[None, :]
                if masked and include_diagonal:
                    dup = dup | on_diag
                if variant == 1:
                    dd = torch.where(dup, 0.0, d2)
                else:
                    rs = torch.where(dup, 0.0, d2.clamp_min(1e-300).rsqrt())
                    dd = d2 * rs
                e2 = dd * c2
                if masked:
                    e2 = torch.where(col_ok[None, :], e2, -math.inf)
                    if not include_diagonal:
                        e2 = torch.where(on_diag, -math.inf, e2)
                m_new = torch.maximum(m_i, e2.max(1).values)
                m_use = torch.where(m_new == -math.inf, 0.0, m_new)
                alpha = torch.exp2(m_i - m_use)
                p = torch.exp2(e2 - m_use[:, None])
                s_i = s_i * alpha + p.sum(1)
                m_i = m_new
                w = p * rs if variant == 0 else torch.where(dup, 0.0, p)
                wv = w.to(operand_t).to(acc_t)
                r_i = r_i * alpha + wv.sum(1)
                acc = acc * alpha[:, None] + wv @ zj

            for t in range(max(n_tiles - 1, 1)):
                start_n = lo + t * block_n
                tile(t, row0 - block_n < start_n < row0 + block_m)
            tile(n_tiles - 1, True)

            keep = rows < n
            r = rows[keep]
            m_out[pid_s, r] = (m_i * LN2)[keep]
            s_out[pid_s, r] = s_i[keep]
            out[pid_s, r] = (r_i[:, None] * zi - acc)[keep]
