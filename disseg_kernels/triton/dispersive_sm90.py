"""The many-samples dispersive row kernel for Hopper (sm_90), written in Gluon (issue 2).

Why a second row kernel: the Triton kernel (``dispersive._dispersive_rows_kernel``) spends
its time in three phases one after the other (the Gram product, the per-pair scalar work,
the weights' product), and Triton 3.6-3.9 cannot overlap them on sm_90: it waits for each
Gram product right after issuing it, and its warp specialisation does not lower for
Hopper (docs/dispersive_gpu_floor.md). Gluon states the schedule explicitly. This kernel
uses FlashAttention-3's intra-warpgroup pipelining:

    iteration t:  issue S(t+1) = Z_I Z_{t+1}^T          (tensor cores, asynchronous)
                  scalar work on S(t) -> weights W(t)    (MUFU / FP32, meanwhile)
                  wait for PV(t-1); rescale acc; prefetch tile t-1+STAGES into its slot
                  issue acc += W(t) Z_t                  (tensor cores, asynchronous)
                  wait for S(t+1)

so the tensor cores run the next Gram product and the previous weights' product while the
warpgroup computes exponentials. One warpgroup (4 warps, 64 rows) per program; two
programs fit an SM (registers, shared memory), so a second overlap comes from the other
program. Z's column tiles arrive by TMA into a ring of STAGES shared-memory slots.

The math is the Triton kernel's, line for line (``_rows_tile``): the same duplicate test,
the same base-2 online logsumexp, the weights rounded once to bfloat16 and summed as
rounded. The outputs are the same (OUT, M_OUT, S_OUT) arrays, merged by the same host code
(``dispersive._rows_path``). Scope: bfloat16 inputs, ``infonce_l2`` and ``infonce_l2sq``,
the gradient on, N > 64, D a multiple of 8 from 16 to 128. ``kernel="sm90"`` asks for it (anything else
stays on the Triton kernel); ``eligible`` says why a call cannot take it.

Status (2026-11-27): compiled for sm_90 ahead of time with Triton 3.9 and 3.6 (``python -m
benchmarks.bench_dispersive_tiles --compile-check sm90``: no spills, wgmmas not serialised);
**not yet run on a GPU**. Its schedule is tested on the CPU through a model
(``tests/sm90_schedule.py``); the GPU test ``test_gpu_sm90_rows_kernel_matches_reference_and_triton``,
``benchmarks/gpu/sm90_diagnose.py`` and the tile sweep's ``--kernels sm90`` check and time
it on a GPU (the ``sm90_rows`` stage of ``benchmarks/gpu/run_all.sh``).
"""
from __future__ import annotations

import torch

try:  # Gluon ships with Triton >= 3.4; its Hopper module is what this kernel needs.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # The TMA load's name: async_load from Triton 3.7, async_copy_global_to_shared before
    # (the GPU image of 2026-11-27 has 3.6).
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the installed Triton
    _IMPORT_ERROR = f"this Triton has no Gluon Hopper module ({exc})"

BLOCK_M = 64  # one warpgroup of rows
BLOCK_N = 64  # columns per tile
STAGES = 4  # shared-memory slots for Z's column tiles (>= 3: see the schedule)
NUM_WARPS = 4
MAX_D = 128
VARIANTS = (0, 1)  # infonce_l2, infonce_l2sq


def eligible(z: torch.Tensor, variant: int, need_grad: bool) -> str | None:
    """None when the sm_90 kernel can run this call, else why not (for the error message)."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if z.device.type != "cuda":
        return f"it needs a CUDA tensor, got device {z.device}"
    major, minor = torch.cuda.get_device_capability(z.device)
    if major != 9:
        return f"it is written for sm_90 (Hopper), this GPU is sm_{major}{minor}"
    if z.dtype != torch.bfloat16:
        return f"it takes bfloat16 inputs, got {z.dtype}"
    if variant not in VARIANTS:
        return "it covers infonce_l2 and infonce_l2sq only"
    if not need_grad:
        return "it always computes the gradient (use the Triton kernel for the loss alone)"
    n, d = z.shape
    if n <= BLOCK_N:
        return f"it needs N > {BLOCK_N} (two column tiles), got N = {n}"
    if d % 8 != 0 or not 16 <= d <= MAX_D:
        return (f"it needs D a multiple of 8 (TMA rows of 16-byte multiples) from 16 to {MAX_D} (D <= 8 takes "
                f"the Triton kernel's exact differences), got D = {d}")
    if not z.is_contiguous():
        return "it needs a contiguous input"
    if z.data_ptr() % 16:
        return "TMA needs the input's base address 16-byte aligned (a row-sliced view may not be)"
    return None


if _IMPORT_ERROR is None:

    @gluon.jit
    def _pair_weights(
        s, n_i, SQN, N, start_n, row0, masked, m_i, s_i,
        scale, c2,
        mma_s: gl.constexpr, VARIANT: gl.constexpr, INCLUDE_DIAG: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    ):
        """One tile's scalar work (the Triton kernel's ``_rows_tile`` after its Gram product):
        returns the float32 weights, the rescale factor alpha and the updated (m, s).
        ``masked`` (a run-time flag, true on the tiles that meet the diagonal or end past
        N) applies the masks in one branch that changes only the exponent and the weight
        factor, so the rest of the code is not compiled twice."""
        col_l: gl.constexpr = gl.SliceLayout(0, mma_s)
        cols = start_n + gl.arange(0, BLOCK_N, layout=col_l)
        col_ok = cols < N
        n_j = gl.load(SQN + cols, mask=col_ok, other=0.0)
        d2 = n_i[:, None] + n_j[None, :] - 2.0 * s
        dup = d2 <= 0.0  # as the Triton kernel's float32 tiles
        # f: the factor that turns p into the weight; 0 on duplicates (their subgradient)
        if VARIANT == 1:
            f = gl.where(dup, 0.0, 1.0)
            dd = gl.where(dup, 0.0, d2)
        else:
            f = gl.where(dup, 0.0, gl.rsqrt(d2))
            dd = d2 * f
        e2 = dd * c2  # c2 = -scale / tau * log2(e)
        if masked:
            local = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma_s))[:, None] + (row0 - start_n)
            on_diag = local == gl.arange(0, BLOCK_N, layout=col_l)[None, :]
            if INCLUDE_DIAG:  # the pair (i, i): d = 0 exactly, weight 0
                e2 = gl.where(on_diag, 0.0, e2)
                f = gl.where(on_diag, 0.0, f)
            else:
                e2 = gl.where(on_diag, float("-inf"), e2)
            e2 = gl.where(col_ok[None, :], e2, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(e2, 1))
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_use)
        p = gl.exp2(e2 - m_use[:, None])
        s_i = s_i * alpha + gl.sum(p, 1)
        return p * f, alpha, m_new, s_i

    @gluon.jit
    def _weights_operand(w, alpha, r_i, w_l: gl.constexpr):
        """The weights rounded once to bfloat16 (the tensor cores' operand), and r_i summed
        from the same rounded values. Called only once the previous weights' product is
        done: the operand registers are its inputs until then (ptxas C7513)."""
        wv = w.to(gl.bfloat16)
        r_i = r_i * alpha + gl.sum(wv.to(gl.float32), 1)
        return gl.convert_layout(wv, w_l), r_i

    @gluon.jit
    def _dispersive_rows_sm90_kernel(
        z_desc,  # TMA descriptor of Z (N, D) bfloat16, block [BLOCK_N, D_PAD]; the row tile uses the same block
        SQN,  # (N,) float32: ||z_i||^2
        OUT,  # (SPLITS, N, D) float32: r_i z_i - sum_j w_ij z_j over the split's columns
        M_OUT,  # (SPLITS, N) float32: per-row max of -d/tau (natural log units)
        S_OUT,  # (SPLITS, N) float32: per-row sum of exp(-d/tau - m_i)
        N, D, COL_CHUNK,
        PARAMS,  # (4,) float32: scale, 1/tau, margin and exact_threshold (both unused here)
        VARIANT: gl.constexpr, INCLUDE_DIAG: gl.constexpr, D_PAD: gl.constexpr,
        BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ):
        gl.static_assert(BLOCK_M == BLOCK_N, "the row tile is loaded with the column tiles' descriptor")
        gl.static_assert(STAGES >= 3, "tile t+1's slot is freed in iteration t-1")
        pid_m = gl.program_id(0)
        pid_s = gl.program_id(1)
        row0 = pid_m * BLOCK_M

        # The Gram tile S (BLOCK_M x BLOCK_N) and the accumulator (BLOCK_M x D_PAD): one
        # warpgroup along M, one wgmma instruction per k-step across the whole width.
        mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
        mma_o: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, D_PAD, 16])
        w_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_o, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, mma_s)
        row_o: gl.constexpr = gl.SliceLayout(1, mma_o)

        zi_smem = gl.allocate_shared_memory(z_desc.dtype, [BLOCK_M, D_PAD], z_desc.layout)
        zj_smem = gl.allocate_shared_memory(z_desc.dtype, [STAGES, BLOCK_N, D_PAD], z_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        zi_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        mbarrier.init(zi_bar, count=1)
        fence_async_shared()

        scale = gl.load(PARAMS)
        inv_tau = gl.load(PARAMS + 1)
        c2 = -scale * inv_tau * 1.4426950408889634
        rows_s = row0 + gl.arange(0, BLOCK_M, layout=row_s)
        n_i = gl.load(SQN + rows_s, mask=rows_s < N, other=0.0)

        # This program's columns [lo, hi): the last split runs to N. Every split holds at
        # least two column tiles (``launch``), so the column loop below always runs: a loop
        # that may run zero times gives ptxas a path that sets the accumulator's registers
        # while a wgmma may be in flight, and it then serialises every wgmma (C7515).
        lo = pid_s * COL_CHUNK
        hi = lo + COL_CHUNK
        if pid_s == gl.num_programs(1) - 1:
            hi = N
        n_tiles = gl.cdiv(hi - lo, BLOCK_N)
        tile_bytes: gl.constexpr = BLOCK_N * D_PAD * 2

        mbarrier.expect(zi_bar, tile_bytes)
        _tma_load(z_desc, [row0, 0], zi_bar, zi_smem)
        for i in gl.static_range(STAGES):
            pred = i < n_tiles
            mbarrier.expect(bars.index(i), tile_bytes, pred=pred)
            _tma_load(z_desc, [lo + i * BLOCK_N, 0], bars.index(i), zj_smem.index(i), pred=pred)

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
        s_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        r_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
        acc = warpgroup_mma_init(gl.zeros([BLOCK_M, D_PAD], gl.float32, layout=mma_o))
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=mma_s)

        # Prologue: S(0).
        mbarrier.wait(zi_bar, 0)
        mbarrier.wait(bars.index(0), 0)
        s_cur = warpgroup_mma(zi_smem, zj_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s_cur = warpgroup_mma_wait(num_outstanding=0, deps=(s_cur,))

        # Tiles whose pairs need the masks: the last (columns past N) and those meeting the
        # row block's diagonal.
        diag_lo = row0 - BLOCK_N
        diag_hi = row0 + BLOCK_M
        for t in range(0, gl.maximum(n_tiles - 1, 1)):  # the maximum lets LLVM drop the zero-trip guard
            start_n = lo + t * BLOCK_N
            # 1. The next Gram product, in flight during this tile's scalar work.
            nxt = (t + 1) % STAGES
            mbarrier.wait(bars.index(nxt), ((t + 1) // STAGES) & 1)
            s_next = warpgroup_mma(zi_smem, zj_smem.index(nxt).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
            # 2. This tile's weights.
            masked = (start_n > diag_lo) & (start_n < diag_hi)
            w, alpha, m_i, s_i = _pair_weights(s_cur, n_i, SQN, N, start_n, row0, masked, m_i, s_i, scale,
                                               c2, mma_s, VARIANT, INCLUDE_DIAG, BLOCK_M, BLOCK_N)
            # 3. Both products in flight are done: the previous weights' product (its slot
            #    takes the tile STAGES - 1 ahead of it) and S(t+1). A wait for zero
            #    outstanding: with one, ptxas serialises every wgmma of the kernel (C7514).
            acc, s_cur = warpgroup_mma_wait(num_outstanding=0, deps=(acc, s_next))
            prev = t - 1 + STAGES
            if (t >= 1) & (prev < n_tiles):
                slot = (t - 1) % STAGES
                mbarrier.expect(bars.index(slot), tile_bytes)
                _tma_load(z_desc, [lo + prev * BLOCK_N, 0], bars.index(slot), zj_smem.index(slot))
            # 4. This tile's weights' product, in flight during the next tile's scalar work.
            acc = acc * gl.convert_layout(alpha, row_o)[:, None]
            wv, r_i = _weights_operand(w, alpha, r_i, w_l)
            acc = warpgroup_mma(wv, zj_smem.index(t % STAGES), acc, is_async=True)

        # The last tile (it always holds column N - 1 or the split's end: masked).
        t_last = n_tiles - 1
        start_n = lo + t_last * BLOCK_N
        w, alpha, m_i, s_i = _pair_weights(s_cur, n_i, SQN, N, start_n, row0, True, m_i, s_i, scale,
                                           c2, mma_s, VARIANT, INCLUDE_DIAG, BLOCK_M, BLOCK_N)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        wv, r_i = _weights_operand(w, alpha, r_i, w_l)
        acc = warpgroup_mma(wv, zj_smem.index(t_last % STAGES), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))

        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))
        mbarrier.invalidate(zi_bar)

        stat = pid_s * N + rows_s
        row_ok_s = rows_s < N
        gl.store(M_OUT + stat, m_i * 0.6931471805599453, mask=row_ok_s)
        gl.store(S_OUT + stat, s_i, mask=row_ok_s)
        rows_o = row0 + gl.arange(0, BLOCK_M, layout=row_o)
        dcols = gl.arange(0, D_PAD, layout=gl.SliceLayout(0, mma_o))
        zo = zi_smem.load(mma_o).to(gl.float32)
        out = gl.convert_layout(r_i, row_o)[:, None] * zo - acc
        out_rows = (pid_s * N + rows_o).to(gl.int64)
        mask = (rows_o < N)[:, None] & (dcols < D)[None, :]
        gl.store(OUT + out_rows[:, None] * D + dcols[None, :], out, mask=mask)


def z_layout(d_pad: int):
    """The shared-memory layout of a (BLOCK_N, d_pad) bfloat16 tile (TMA and wgmma)."""
    return gl.NVMMASharedLayout.get_default_for([BLOCK_N, d_pad], gl.bfloat16)


def check_splits(n: int, col_chunk: int, splits: int, block_n: int = BLOCK_N) -> None:
    """The kernel's column loop needs every split to hold two or more column tiles, the
    inner ones whole (a one-tile split would run its tile twice: see the loop's bound)."""
    if col_chunk % block_n or (splits > 1 and col_chunk < 2 * block_n) or n - (splits - 1) * col_chunk <= block_n:
        raise ValueError(f"every split needs two or more column tiles of {block_n}, the inner ones whole: got n={n}, "
                         f"col_chunk={col_chunk}, splits={splits}")


def launch(z, sqn, out, m_out, s_out, n, d, col_chunk, splits, params, variant, include_diagonal) -> None:
    """Run the kernel into the Triton row kernel's output arrays (``dispersive._rows_path``).
    Split s covers columns [s * col_chunk, (s + 1) * col_chunk), the last one up to n."""
    import triton

    check_splits(n, col_chunk, splits)
    d_pad = max(16, triton.next_power_of_2(d))
    desc = TensorDescriptor(z, [n, d], [d, 1], [BLOCK_N, d_pad], z_layout(d_pad))
    grid = (triton.cdiv(n, BLOCK_M), splits)
    _dispersive_rows_sm90_kernel[grid](
        desc, sqn, out, m_out, s_out, n, d, col_chunk, params,
        VARIANT=variant, INCLUDE_DIAG=bool(include_diagonal), D_PAD=d_pad,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, STAGES=STAGES, num_warps=NUM_WARPS,
    )
