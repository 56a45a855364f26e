"""Attention gates, Triton kernels.

Entry points: the map passes of csrc/gates.cpp (``pool_hw``, ``pool_c``, ``apply``,
``reduce``, ``grad_x``, and ``grad_x_terms`` with the arg-max and stencil terms folded
in), plus the gate programs' small math that the C++ path leaves to PyTorch
(``channel_mlp_fwd/bwd``: the channel gates' MLPs; ``spatial_gate_fwd/bwd``: the 2→1
k×k convolution of the spatial gates), because on a GPU every small ATen op is a launch
and host time dominated at the model's shapes.

x is (B, C, H, W) viewed as (B, C, P), P = H·W, through its strides (sB, sC, sP): NCHW
(sP = 1) and channels_last (sC = 1) are both read in place. Gates are dense (B, C) /
(B, P) float32; a missing gate is 1. Index arithmetic is int64.

Why the kernels look the way they do (docs/gates_gpu.md has the numbers):
- Every pass is memory-bound, so a program must have enough bytes in flight and the grid
  must fill the GPU. Tiles hold ~2048 elements and are shaped by the layout: long along P
  for NCHW (rows of H·W are contiguous), long along C for channels_last.
- A reduction whose output is too small to give each SM several programs (avg/max over
  H·W at C = 64; mean/max over C at H = W = 16) is split along the reduced axis: each
  program writes a partial (sum, max, arg-max) and a second launch combines the splits in
  index order. Deterministic, no atomics; the split count is chosen on the host from the
  shape and the SM count, never from data (no host sync).
- The backward reduction (U over P, V over C in one read of x and grad) writes per-block
  partials of both and sums them (no atomics: V used to be accumulated with one atomic
  per element per channel block).
- On the GPU ``triton.autotune`` picks num_warps per (C, P, layout) for the map passes;
  DISSEG_TRITON_AUTOTUNE=0 and the interpreter use the fixed default.
- ``python -m benchmarks.bench_gates --compile-check`` compiles every variant for sm_90
  on a machine without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .telu import _tanh_pos
from ._settings import autotune_enabled as _autotune_enabled
from ._settings import interpret as _interpret

# ---------------------------------------------------------------------------------------
# Tiling and split heuristics (module globals so tests can force small tiles and splits)
# ---------------------------------------------------------------------------------------

TILE_ELEMS = 2048  # elements per [BLOCK_C, BLOCK_P] tile
MAX_BLOCK_P = 512  # NCHW: longest contiguous run per tile row
KEEP_SPATIAL_GATES = True  # ops/gates.py: keep the spatial gates for backward (fewer launches)
IDX_DTYPE = torch.int32  # arg-max indices (only these kernels read them; half int64's memory)
MAX_BLOCK_C = 128  # channels_last: longest contiguous run per tile column
# A reduction is split until it has about this many programs per SM (each split costs a
# combine launch; DISSEG_GATES_PROGRAMS_PER_SM tries another value without an edit).
PROGRAMS_PER_SM = int(os.environ.get("DISSEG_GATES_PROGRAMS_PER_SM", "4"))
FORCE_TILES: tuple[int, int] | None = None  # tests: (BLOCK_C, BLOCK_P)
FORCE_TARGET_PROGRAMS: int | None = None  # tests: force splits at tiny sizes


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(x: torch.Tensor) -> int:
    if FORCE_TARGET_PROGRAMS is not None:
        return FORCE_TARGET_PROGRAMS
    if x.is_cuda:
        return PROGRAMS_PER_SM * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return 4  # the interpreter runs programs one by one: fewer, larger programs


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _geometry(x: torch.Tensor):
    b, c, h, w = x.shape
    if h > 1 and x.stride(2) != w * x.stride(3):
        raise ValueError(f"x must be contiguous or channels_last, got strides {x.stride()}")
    return b, c, h * w, x.stride(0), x.stride(1), x.stride(3)


def _tiles(c: int, p: int, sC: int, sP: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): long along the axis with stride 1, ~TILE_ELEMS in all."""
    if FORCE_TILES is not None:
        return FORCE_TILES
    if sC == 1 and sP != 1:  # channels_last
        bc = min(MAX_BLOCK_C, _pow2(c))
        return bc, max(1, min(_pow2(p), TILE_ELEMS // bc))
    bp = min(MAX_BLOCK_P, max(16, _pow2(p)))
    return max(1, min(_pow2(c), TILE_ELEMS // bp)), bp


def _split(n_out_programs: int, length: int, block: int, target: int) -> tuple[int, int]:
    """(chunk, n_splits) along a reduced axis of ``length``: chunk is a multiple of block."""
    want = max(1, -(-target // max(1, n_out_programs)))
    n = max(1, min(want, -(-length // block)))
    chunk = -(-(-(-length // n)) // block) * block
    return chunk, -(-length // chunk)


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _above(v, best):
    # The pools' order, as on the CPU: a NaN is above every number (as PyTorch's max pools
    # have it); one NaN is not above another. Values met in index order keep the first.
    return (v > best) | ((v != v) & (best == best))


@triton.jit
def _ahead(v, i, best, besti):
    # _above, and for equals (two NaNs included) the smaller index: values in any order.
    tie = (v == best) | ((v != v) & (best != best))
    return _above(v, best) | (tie & (i < besti))


@triton.jit
def _max_first_at(v, offs, base, NONE, AXIS: tl.constexpr):
    # (max, first position) along AXIS of a tile v (masked entries -inf) whose positions
    # along AXIS are offs = base + 0, 1, ...: tl.max over its numbers (it is not given the
    # NaNs: what it does with them is not specified, and the interpreter's nanargmax
    # raises), then the first NaN, which wins (NONE: a sentinel above every position).
    isn = v != v
    mx, arg = tl.max(tl.where(isn, float("-inf"), v), axis=AXIS, return_indices=True,
                     return_indices_tie_break_left=True)
    nan_at = tl.min(tl.where(isn, tl.expand_dims(offs, 1 - AXIS), NONE), axis=AXIS)
    has_nan = nan_at < NONE
    return tl.where(has_nan, float("nan"), mx), tl.where(has_nan, nan_at, base + arg.to(tl.int64))


@triton.jit
def _max_first(v, idx, AXIS: tl.constexpr):
    # (max, its smallest index) along AXIS of v (masked entries already -inf) whose indices
    # idx are stored per element (the lanes' first arg-maxes), NaN first, as _max_first_at.
    isn = v != v
    nan_i = tl.min(tl.where(isn, idx, 2147483647), axis=AXIS)
    has_nan = nan_i < 2147483647
    vf = tl.where(isn, float("-inf"), v)
    mx = tl.max(vf, axis=AXIS)
    mx_i = tl.min(tl.where(vf == tl.expand_dims(mx, AXIS), idx, 2147483647), axis=AXIS)
    return tl.where(has_nan, float("nan"), mx), tl.where(has_nan, nan_i, mx_i)


@triton.jit
def _pool_hw_kernel(x_ptr, s_ptr, sum_ptr, max_ptr, idx_ptr, C, P, CHUNK, N_SPLIT, sB, sC, sP,
                    HAS_S: tl.constexpr, FINAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # Sum, max and first arg-max over p ∈ [split·CHUNK, (split+1)·CHUNK) of x·S for a block
    # of channels. FINAL (one split): writes the mean; else partials at [b, split, c].
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    mask_c = offs_c < C
    p_lo = split * CHUNK
    p_hi = tl.minimum(p_lo + CHUNK, P)
    # Per lane (element of the tile) across the tiles: sum, max and where it first occurred
    # (strict >: a later tile never takes a tie; a NaN is above every number and the first
    # NaN stays, as on the CPU); reduced across lanes once at the end, not once
    # per tile (a cross-lane max with indices per tile made this pass 1.7-2x a read of x on
    # the H200).
    acc2 = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    best2 = tl.full((BLOCK_C, BLOCK_P), float("-inf"), dtype=tl.float32)
    besti2 = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.int32)
    xb = x_ptr + b * sB + offs_c[:, None] * sC
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        mask_p = offs_p < p_hi
        m = mask_c[:, None] & mask_p[None, :]
        v = tl.load(xb + offs_p[None, :] * sP, mask=m, other=0.0).to(tl.float32)
        if HAS_S:
            v = v * tl.load(s_ptr + b * P + offs_p, mask=mask_p, other=0.0)[None, :]
        acc2 += v
        gt = m & _above(v, best2)  # a lane keeps its first NaN
        best2 = tl.where(gt, v, best2)
        besti2 = tl.where(gt, offs_p.to(tl.int32)[None, :], besti2)
    acc = tl.sum(acc2, axis=1)
    # the max and its first position: the smallest index among the lanes that hold it (a
    # NaN first; all lanes at -inf: index 0, as before)
    best, besti = _max_first(best2, besti2, 1)
    besti = besti.to(tl.int64)
    besti = tl.where(best == float("-inf"), 0, besti)
    besti = tl.minimum(besti, P - 1)
    if FINAL:
        tl.store(sum_ptr + b * C + offs_c, acc / P, mask=mask_c)
        tl.store(max_ptr + b * C + offs_c, best, mask=mask_c)
        tl.store(idx_ptr + b * C + offs_c, besti.to(idx_ptr.dtype.element_ty), mask=mask_c)
    else:
        o = (b * N_SPLIT + split) * C + offs_c
        tl.store(sum_ptr + o, acc, mask=mask_c)
        tl.store(max_ptr + o, best, mask=mask_c)
        tl.store(idx_ptr + o, besti.to(idx_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _pool_c_kernel(x_ptr, g_ptr, sum_ptr, max_ptr, idx_ptr, C, P, CHUNK, N_SPLIT, sB, sC, sP,
                   HAS_G: tl.constexpr, FINAL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # Sum, max and first arg-max over c ∈ [split·CHUNK, (split+1)·CHUNK) of x·G for a block
    # of positions. FINAL: writes the mean; else partials at [b, split, p].
    b = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    mask_p = offs_p < P
    c_lo = split * CHUNK
    c_hi = tl.minimum(c_lo + CHUNK, C)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    best = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
    besti = tl.zeros((BLOCK_P,), dtype=tl.int64)
    xb = x_ptr + b * sB + offs_p[None, :] * sP
    for c0 in range(c_lo, c_hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask_c = offs_c < c_hi
        m = mask_c[:, None] & mask_p[None, :]
        v = tl.load(xb + offs_c[:, None] * sC, mask=m, other=0.0).to(tl.float32)
        if HAS_G:
            v = v * tl.load(g_ptr + b * C + offs_c, mask=mask_c, other=0.0)[:, None]
        acc += tl.sum(v, axis=0)
        # one more reduction per tile than before NaN was propagated (the first NaN)
        tmax, targ = _max_first_at(tl.where(m, v, float("-inf")), offs_c, c0, C, 0)
        gt = _ahead(tmax, targ, best, besti)
        best = tl.where(gt, tmax, best)
        besti = tl.where(gt, targ, besti)
    besti = tl.minimum(besti, C - 1)
    if FINAL:
        tl.store(sum_ptr + b * P + offs_p, acc / C, mask=mask_p)
        tl.store(max_ptr + b * P + offs_p, best, mask=mask_p)
        tl.store(idx_ptr + b * P + offs_p, besti.to(idx_ptr.dtype.element_ty), mask=mask_p)
    else:
        o = (b * N_SPLIT + split) * P + offs_p
        tl.store(sum_ptr + o, acc, mask=mask_p)
        tl.store(max_ptr + o, best, mask=mask_p)
        tl.store(idx_ptr + o, besti.to(idx_ptr.dtype.element_ty), mask=mask_p)


@triton.jit
def _pool_combine_kernel(psum_ptr, pmax_ptr, pidx_ptr, mean_ptr, max_ptr, idx_ptr, N, N_SPLIT, COUNT,
                         BLOCK_N: tl.constexpr):
    # Second stage of a split pool: splits in index order, strict > keeps the first arg-max.
    b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    mask = offs < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    besti = tl.zeros((BLOCK_N,), dtype=tl.int64)
    for s in range(0, N_SPLIT):
        o = (b * N_SPLIT + s) * N + offs
        acc += tl.load(psum_ptr + o, mask=mask, other=0.0)
        v = tl.load(pmax_ptr + o, mask=mask, other=float("-inf"))
        i = tl.load(pidx_ptr + o, mask=mask, other=0)
        gt = _above(v, best)  # splits in index order: the first NaN stays
        best = tl.where(gt, v, best)
        besti = tl.where(gt, i.to(tl.int64), besti)
    tl.store(mean_ptr + b * N + offs, acc / COUNT, mask=mask)
    tl.store(max_ptr + b * N + offs, best, mask=mask)
    tl.store(idx_ptr + b * N + offs, besti.to(idx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_kernel(x_ptr, g_ptr, s_ptr, out_ptr, C, P, sB, sC, sP,
                  HAS_G: tl.constexpr, HAS_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    offs_p = tl.program_id(2).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_c = offs_c < C
    mask_p = offs_p < P
    m = mask_c[:, None] & mask_p[None, :]
    off = b * sB + offs_c[:, None] * sC + offs_p[None, :] * sP
    v = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    if HAS_G:
        v = v * tl.load(g_ptr + b * C + offs_c, mask=mask_c, other=0.0)[:, None]
    if HAS_S:
        v = v * tl.load(s_ptr + b * P + offs_p, mask=mask_p, other=0.0)[None, :]
    tl.store(out_ptr + off, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _reduce_kernel(x_ptr, r_ptr, g_ptr, s_ptr, gi_ptr, gv_ptr, si_ptr, sv_ptr, u_ptr, v_ptr,
                   C, P, CHUNK, N_PSPLIT, N_CBLK, sB, sC, sP,
                   HAS_R: tl.constexpr, HAS_G: tl.constexpr, HAS_S: tl.constexpr,
                   HAS_GI: tl.constexpr, HAS_SI: tl.constexpr, NEED_U: tl.constexpr, NEED_V: tl.constexpr,
                   U_FINAL: tl.constexpr, V_FINAL: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # One read of x (and R), t = R·x: U[b, c] = Σ_p t·S' over this program's p-chunk,
    # V[b, p] = Σ_c t·G' over its channel block, where G' = G plus, with HAS_GI, gv[b, c] at
    # p = gi[b, c] (an arg-max term; S' likewise with si/sv at c = si[b, p]). Partials go
    # to [b, split, c] / [b, cblock, p] and are summed by the caller (no atomics); a FINAL
    # flag writes straight to the output.
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    if HAS_G:
        g = tl.load(g_ptr + b * C + offs_c, mask=mask_c, other=0.0)
    else:
        g = tl.where(mask_c, 1.0, 0.0)
    if HAS_GI:
        gi = tl.load(gi_ptr + b * C + offs_c, mask=mask_c, other=-1)
        gv = tl.load(gv_ptr + b * C + offs_c, mask=mask_c, other=0.0)
    p_lo = split * CHUNK
    p_hi = tl.minimum(p_lo + CHUNK, P)
    u = tl.zeros((BLOCK_C,), dtype=tl.float32)
    xb = b * sB + offs_c[:, None] * sC
    for p0 in range(p_lo, p_hi, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        mask_p = offs_p < p_hi
        m = mask_c[:, None] & mask_p[None, :]
        off = xb + offs_p[None, :] * sP
        t = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        if HAS_R:
            t = t * tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
        if NEED_U:
            if HAS_S:
                s = tl.load(s_ptr + b * P + offs_p, mask=mask_p, other=0.0)
            else:
                s = tl.where(mask_p, 1.0, 0.0)
            if HAS_SI:
                si = tl.load(si_ptr + b * P + offs_p, mask=mask_p, other=-1)
                sv = tl.load(sv_ptr + b * P + offs_p, mask=mask_p, other=0.0)
                u += tl.sum(t * (s[None, :] + tl.where(offs_c[:, None] == si[None, :], sv[None, :], 0.0)), axis=1)
            else:
                u += tl.sum(t * s[None, :], axis=1)
        if NEED_V:
            if HAS_GI:
                vpart = tl.sum(t * (g[:, None] + tl.where(offs_p[None, :] == gi[:, None], gv[:, None], 0.0)), axis=0)
            else:
                vpart = tl.sum(t * g[:, None], axis=0)
            if V_FINAL:
                tl.store(v_ptr + b * P + offs_p, vpart, mask=mask_p)
            else:
                tl.store(v_ptr + (b * N_CBLK + cb) * P + offs_p, vpart, mask=mask_p)
    if NEED_U:
        if U_FINAL:
            tl.store(u_ptr + b * C + offs_c, u, mask=mask_c)
        else:
            tl.store(u_ptr + (b * N_PSPLIT + split) * C + offs_c, u, mask=mask_c)


@triton.jit
def _dx_term(acc, l_ptr, r_ptr, i_ptr, d_ptr, b, offs_c, offs_p, mask_c, mask_p, C, P, MODE: tl.constexpr):
    # One pooled statistic's share of dx. MODE bits: 1 present, 2 a statistic over c (else
    # over p), 4 L given (else ones), 8 R given (else ones), 16 a max with its arg-max.
    # dx += L[b, c]·R[b, p]; a max over p adds d[b, c]·R[b, p] at p = i[b, c], a max over
    # c adds d[b, p]·L[b, c] at c = i[b, p] (so no gather/scatter launches are needed).
    if MODE & 1:
        if MODE & 4:
            lv = tl.load(l_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        else:
            lv = tl.where(mask_c, 1.0, 0.0)
        if MODE & 8:
            rv = tl.load(r_ptr + b * P + offs_p, mask=mask_p, other=0.0)
        else:
            rv = tl.where(mask_p, 1.0, 0.0)
        acc += lv[:, None] * rv[None, :]
        if MODE & 16:
            if MODE & 2:
                iv = tl.load(i_ptr + b * P + offs_p, mask=mask_p, other=-1)
                dv = tl.load(d_ptr + b * P + offs_p, mask=mask_p, other=0.0)
                acc += tl.where(offs_c[:, None] == iv[None, :], lv[:, None] * dv[None, :], 0.0)
            else:
                iv = tl.load(i_ptr + b * C + offs_c, mask=mask_c, other=-1)
                dv = tl.load(d_ptr + b * C + offs_c, mask=mask_c, other=0.0)
                acc += tl.where(offs_p[None, :] == iv[:, None], dv[:, None] * rv[None, :], 0.0)
    return acc


@triton.jit
def _grad_x_kernel(grad_ptr, g_ptr, s_ptr,
                   l0, r0, i0, d0, l1, r1, i1, d1, l2, r2, i2, d2, l3, r3, i3, d3,
                   wt_ptr, dl_ptr, dx_ptr, C, P, W, sB, sC, sP,
                   HAS_GRAD: tl.constexpr, HAS_G: tl.constexpr, HAS_S: tl.constexpr,
                   MODE0: tl.constexpr, MODE1: tl.constexpr, MODE2: tl.constexpr, MODE3: tl.constexpr,
                   STENCIL: tl.constexpr, ELAT_TAPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # dx = grad·G·S + up to four statistics' terms (_dx_term) (+ with STENCIL the input
    # gradient of a 7×7 C→1 convolution, padding 3: Σ_{i,j} w[c, i, j]·dl[b, y + 3 − i,
    # x + 3 − j]): one read of grad, one write. ELAT_TAPS skips the 24 taps that ELAT's
    # composite stencil leaves at zero (those off the three dilated 3×3 grids).
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    offs_p = tl.program_id(2).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_c = offs_c < C
    mask_p = offs_p < P
    m = mask_c[:, None] & mask_p[None, :]
    off = b * sB + offs_c[:, None] * sC + offs_p[None, :] * sP
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    if HAS_GRAD:
        acc = tl.load(grad_ptr + off, mask=m, other=0.0).to(tl.float32)
        if HAS_G:
            acc = acc * tl.load(g_ptr + b * C + offs_c, mask=mask_c, other=0.0)[:, None]
        if HAS_S:
            acc = acc * tl.load(s_ptr + b * P + offs_p, mask=mask_p, other=0.0)[None, :]
    acc = _dx_term(acc, l0, r0, i0, d0, b, offs_c, offs_p, mask_c, mask_p, C, P, MODE0)
    acc = _dx_term(acc, l1, r1, i1, d1, b, offs_c, offs_p, mask_c, mask_p, C, P, MODE1)
    acc = _dx_term(acc, l2, r2, i2, d2, b, offs_c, offs_p, mask_c, mask_p, C, P, MODE2)
    acc = _dx_term(acc, l3, r3, i3, d3, b, offs_c, offs_p, mask_c, mask_p, C, P, MODE3)
    if STENCIL:
        H = P // W
        yy = offs_p // W
        xx = offs_p % W
        for t in tl.static_range(49):
            di = t // 7 - 3
            dj = t % 7 - 3
            if (not ELAT_TAPS) or (di * di == 0) or (dj * dj == 0) or (di * di == dj * dj):
                ys = yy - di
                xs = xx - dj
                ok = mask_p & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
                dl = tl.load(dl_ptr + b * P + ys * W + xs, mask=ok, other=0.0)
                wv = tl.load(wt_ptr + t * C + offs_c, mask=mask_c, other=0.0)
                acc += wv[:, None] * dl[None, :]
    tl.store(dx_ptr + off, acc.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pixel_block(P, W, BLOCK_P: tl.constexpr):
    # The program's batch row b and block pb of BLOCK_P positions of an H×W map (P = H·W):
    # (b, pb, positions, their mask, H, row and column of each position); int64.
    b = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1).to(tl.int64)
    offs = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    return b, pb, offs, offs < P, P // W, offs // W, offs % W


@triton.jit
def _stencil_fwd_kernel(x_ptr, wt_ptr, out_ptr, psum_ptr, pmax_ptr, pidx_ptr, C, P, W, sB, sC, sP,
                        ELAT_TAPS: tl.constexpr, POOL: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # out[b, p] = Σ_c Σ_{i,j} w[c, i, j]·x[b, c, y + i − 3, x + j − 3] (a 7×7 C→1
    # convolution, padding 3, no bias), float32. One program: one block of pixels, every
    # channel; the taps' shifted tiles come mostly from cache (x is read from memory about
    # once). ELAT_TAPS visits only the 25 taps of ELAT's composite stencil. POOL: the centre
    # tap's tile also gives this block's partial (sum, max, first arg-max) over p of every
    # channel, at [b, block, c] (ELAT's H·W pool in the same read of x; _pool_combine_kernel
    # merges the blocks in order).
    b, pb, offs_p, mask_p, H, yy, xx = _pixel_block(P, W, BLOCK_P)
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask_c = offs_c < C
        base = b * sB + offs_c[:, None] * sC
        for t in tl.static_range(49):
            di = t // 7 - 3
            dj = t % 7 - 3
            if (not ELAT_TAPS) or (di * di == 0) or (dj * dj == 0) or (di * di == dj * dj):
                ys = yy + di
                xs = xx + dj
                ok = mask_p & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
                xv = tl.load(x_ptr + base + (ys * W + xs)[None, :] * sP, mask=mask_c[:, None] & ok[None, :],
                             other=0.0).to(tl.float32)
                wv = tl.load(wt_ptr + t * C + offs_c, mask=mask_c, other=0.0)
                acc += wv[:, None] * xv
                if POOL and di == 0 and dj == 0:
                    vm = tl.where(mask_c[:, None] & mask_p[None, :], xv, float("-inf"))
                    tmax, targ = _max_first_at(vm, offs_p, pb * BLOCK_P, P, 1)
                    gt = tmax != float("-inf")  # as _pool_hw_kernel: a block of no max above -inf keeps index 0
                    o = (b * tl.num_programs(1) + pb) * C + offs_c
                    tl.store(psum_ptr + o, tl.sum(xv, axis=1), mask=mask_c)
                    tl.store(pmax_ptr + o, tmax, mask=mask_c)
                    tl.store(pidx_ptr + o, tl.where(gt, targ, 0).to(pidx_ptr.dtype.element_ty), mask=mask_c)
    tl.store(out_ptr + b * P + offs_p, tl.sum(acc, axis=0), mask=mask_p)


@triton.jit
def _stencil_taps(ELAT_TAPS: tl.constexpr, NT: tl.constexpr):
    # (di, dj, is_tap) per column of an NT-wide tap matrix. Dense: the 49 taps of the 7×7
    # grid in row-major order. ELAT: its composite stencil's 25 taps, column 0 the centre and
    # 1 + 3·dir + (dist − 1) the tap at distance 1..3 in direction dir (N, NE, E, SE, S, SW,
    # W, NW), so its weight gradient is a 32-wide product, not a 64-wide one.
    cols = tl.arange(0, NT)
    if ELAT_TAPS:
        k = tl.maximum(cols - 1, 0)
        d = k // 3
        dist = k % 3 + 1
        dy = tl.where((d == 0) | (d == 1) | (d == 7), -1, tl.where((d == 2) | (d == 6), 0, 1))
        dx = tl.where((d == 0) | (d == 4), 0, tl.where(d <= 3, 1, -1))
        di = tl.where(cols == 0, 0, dy * dist)
        dj = tl.where(cols == 0, 0, dx * dist)
        return di, dj, cols < 25
    else:
        return cols // 7 - 3, cols % 7 - 3, cols < 49


@triton.jit
def _stencil_grad_weight_kernel(x_ptr, dl_ptr, part_ptr, C, P, W, sB, sC, sP, N_QBLK, N_BLK, CHUNK,
                                ELAT_TAPS: tl.constexpr, NT: tl.constexpr, BLOCK_C: tl.constexpr,
                                BLOCK_Q: tl.constexpr):
    # part[split, c, (3 + di)·7 + 3 + dj] = Σ over this split's pixel blocks (b, q) of
    # x[b, c, q]·dl[b, q − (di, dj)] (= Σ_p x[b, c, p + (di, dj)]·dl[b, p], the 7×7 stencil's
    # weight gradient), summed over the splits on the host side in a fixed order
    # (deterministic, no atomics). Each block of x is read once, unshifted; the taps are a
    # gather from the one-channel dl (cached) into a (BLOCK_Q, NT) matrix, and the block's
    # contribution is one (BLOCK_C × BLOCK_Q)·(BLOCK_Q × NT) product in float32.
    offs_c = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    mask_c = offs_c < C
    H = P // W
    di, dj, tap = _stencil_taps(ELAT_TAPS, NT)
    acc = tl.zeros((BLOCK_C, NT), dtype=tl.float32)
    k0 = split * CHUNK
    for k in range(k0, tl.minimum(k0 + CHUNK, N_BLK)):
        b = k // N_QBLK
        offs_q = (k % N_QBLK) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
        mask_q = offs_q < P
        xv = tl.load(x_ptr + b * sB + offs_c[:, None] * sC + offs_q[None, :] * sP,
                     mask=mask_c[:, None] & mask_q[None, :], other=0.0).to(tl.float32)
        ys = (offs_q // W)[:, None] - di[None, :]
        xs = (offs_q % W)[:, None] - dj[None, :]
        ok = mask_q[:, None] & tap[None, :] & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        dv = tl.load(dl_ptr + b * P + ys * W + xs, mask=ok, other=0.0)
        acc += tl.dot(xv, dv, input_precision="ieee")
    pos = (3 + di) * 7 + 3 + dj
    tl.store(part_ptr + split * C * 49 + offs_c[:, None] * 49 + pos[None, :], acc, mask=mask_c[:, None] & tap[None, :])


# ---------------------------------------------------------------------------------------
# The channel gate's small MLP (B rows, or 2B with [avg; max]): one launch forward, two
# backward, instead of ~10 and ~20 small ATen ops (host launches dominate at these sizes)
# ---------------------------------------------------------------------------------------


@triton.jit
def _mlp_act(h, TELU: tl.constexpr):
    # (activation, e^{min(h, 20)}, tanh of it); TeLU's tanh(u) in the finite form of telu.py
    if TELU:
        u = tl.exp(tl.minimum(h, 20.0))
        th = _tanh_pos(u, tl.exp(-2.0 * u))
        return h * th, u, th
    else:
        return tl.where(h < 0.0, 0.0, h), h, h  # a NaN stays NaN, as torch.relu


@triton.jit
def _mlp_act_grad(dt, h, u, th, TELU: tl.constexpr):
    if TELU:
        return dt * (th + h * u * (1.0 - th * th))
    else:
        return tl.where(h <= 0.0, 0.0, dt)  # as torch.relu's backward


@triton.jit
def _channel_mlp_fwd_kernel(a_ptr, m_ptr, g0_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                            h_ptr, t_ptr, u_ptr, th_ptr, g_ptr, gate_ptr, B, C, HID,
                            HAS_G0: tl.constexpr, HAS_B: tl.constexpr, TELU: tl.constexpr, PAIR: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    # One batch row: H = W1·(a·G0) + b1 (and the max row), T = act(H),
    # g = σ(W2·(T_a + T_m) + 2·b2) (one row without PAIR), gate = G0·g.
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    mask_h = offs_h < HID
    ha = tl.zeros((BLOCK_H,), dtype=tl.float32)
    hm = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask_c = offs_c < C
        w = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :], mask=mask_h[:, None] & mask_c[None, :], other=0.0)
        av = tl.load(a_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        if HAS_G0:
            g0 = tl.load(g0_ptr + b * C + offs_c, mask=mask_c, other=0.0)
            av = av * g0
        ha += tl.sum(w * av[None, :], axis=1)
        if PAIR:
            mv = tl.load(m_ptr + b * C + offs_c, mask=mask_c, other=0.0)
            if HAS_G0:
                mv = mv * g0
            hm += tl.sum(w * mv[None, :], axis=1)
    if HAS_B:
        b1 = tl.load(b1_ptr + offs_h, mask=mask_h, other=0.0)
        ha += b1
        hm += b1
    ta, ua, tha = _mlp_act(ha, TELU)
    tl.store(h_ptr + b * HID + offs_h, ha, mask=mask_h)
    tl.store(t_ptr + b * HID + offs_h, ta, mask=mask_h)
    if TELU:
        tl.store(u_ptr + b * HID + offs_h, ua, mask=mask_h)
        tl.store(th_ptr + b * HID + offs_h, tha, mask=mask_h)
    tsum = ta
    if PAIR:
        tm, um, thm = _mlp_act(hm, TELU)
        rm = (B + b) * HID + offs_h
        tl.store(h_ptr + rm, hm, mask=mask_h)
        tl.store(t_ptr + rm, tm, mask=mask_h)
        if TELU:
            tl.store(u_ptr + rm, um, mask=mask_h)
            tl.store(th_ptr + rm, thm, mask=mask_h)
        tsum = ta + tm
    tsum = tl.where(mask_h, tsum, 0.0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask_c = offs_c < C
        w = tl.load(w2_ptr + offs_c[:, None] * HID + offs_h[None, :], mask=mask_c[:, None] & mask_h[None, :], other=0.0)
        z = tl.sum(w * tsum[None, :], axis=1)
        if HAS_B:
            b2 = tl.load(b2_ptr + offs_c, mask=mask_c, other=0.0)
            if PAIR:
                z += 2.0 * b2
            else:
                z += b2
        g = tl.sigmoid(z)
        tl.store(g_ptr + b * C + offs_c, g, mask=mask_c)
        if HAS_G0:
            g0 = tl.load(g0_ptr + b * C + offs_c, mask=mask_c, other=0.0)
            tl.store(gate_ptr + b * C + offs_c, g0 * g, mask=mask_c)


@triton.jit
def _channel_mlp_bwd_rows_kernel(dgate_ptr, g_ptr, g0_ptr, w2_ptr, h_ptr, u_ptr, th_ptr, dz_ptr, dh_ptr, B, C, HID,
                                 HAS_G0: tl.constexpr, TELU: tl.constexpr, PAIR: tl.constexpr,
                                 BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    # One batch row: dz = σ'(·)·dgate·G0, dT = W2ᵀ·dz (the same for both rows), dH = dT·act'(H).
    b = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    mask_h = offs_h < HID
    dt = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask_c = offs_c < C
        dg = tl.load(dgate_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        if HAS_G0:
            dg = dg * tl.load(g0_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        g = tl.load(g_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        dz = dg * g * (1.0 - g)
        tl.store(dz_ptr + b * C + offs_c, dz, mask=mask_c)
        w = tl.load(w2_ptr + offs_c[:, None] * HID + offs_h[None, :], mask=mask_c[:, None] & mask_h[None, :], other=0.0)
        dt += tl.sum(w * dz[:, None], axis=0)
    ra = b * HID + offs_h
    ha = tl.load(h_ptr + ra, mask=mask_h, other=0.0)
    ua = tl.load(u_ptr + ra, mask=mask_h, other=0.0)
    tha = tl.load(th_ptr + ra, mask=mask_h, other=0.0)
    tl.store(dh_ptr + ra, _mlp_act_grad(dt, ha, ua, tha, TELU), mask=mask_h)
    if PAIR:
        rm = (B + b) * HID + offs_h
        hm = tl.load(h_ptr + rm, mask=mask_h, other=0.0)
        um = tl.load(u_ptr + rm, mask=mask_h, other=0.0)
        thm = tl.load(th_ptr + rm, mask=mask_h, other=0.0)
        tl.store(dh_ptr + rm, _mlp_act_grad(dt, hm, um, thm, TELU), mask=mask_h)


@triton.jit
def _channel_mlp_bwd_cols_kernel(dz_ptr, dh_ptr, t_ptr, a_ptr, m_ptr, g0_ptr, dgate_ptr, g_ptr, w1_ptr,
                                 dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, da_ptr, dm_ptr, dg0_ptr, B, C, HID, SCALE_A,
                                 HAS_G0: tl.constexpr, HAS_B: tl.constexpr, PAIR: tl.constexpr,
                                 BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    # One block of channels, summing over the batch in order (deterministic): dW2 = Σ dz⊗T,
    # dW1 = Σ dH⊗A, db's; per row dA = W1ᵀ·dH; with G0, dG0 = dgate·g + Σ_rows dA·A_raw and
    # the statistics' gradients da, dm = dA·G0.
    cb = tl.program_id(0).to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    offs_h = tl.arange(0, BLOCK_H).to(tl.int64)
    mask_h = offs_h < HID
    mhc = mask_h[:, None] & mask_c[None, :]
    w1 = tl.load(w1_ptr + offs_h[:, None] * C + offs_c[None, :], mask=mhc, other=0.0)
    dw2 = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    db2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for bb in range(0, B):
        b = cb * 0 + bb  # int64 (cb is)
        dz = tl.load(dz_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        tsum = tl.load(t_ptr + b * HID + offs_h, mask=mask_h, other=0.0)
        dha = tl.load(dh_ptr + b * HID + offs_h, mask=mask_h, other=0.0)
        av = tl.load(a_ptr + b * C + offs_c, mask=mask_c, other=0.0)
        if HAS_G0:
            g0 = tl.load(g0_ptr + b * C + offs_c, mask=mask_c, other=0.0)
            Aa = av * g0
        else:
            Aa = av
        dw1 += dha[:, None] * Aa[None, :]
        db1 += dha
        daa = tl.sum(dha[:, None] * w1, axis=0)
        if PAIR:
            tsum += tl.load(t_ptr + (B + b) * HID + offs_h, mask=mask_h, other=0.0)
            dhm = tl.load(dh_ptr + (B + b) * HID + offs_h, mask=mask_h, other=0.0)
            mv = tl.load(m_ptr + b * C + offs_c, mask=mask_c, other=0.0)
            if HAS_G0:
                Am = mv * g0
            else:
                Am = mv
            dw1 += dhm[:, None] * Am[None, :]
            db1 += dhm
            dam = tl.sum(dhm[:, None] * w1, axis=0)
        dw2 += dz[:, None] * tsum[None, :]
        db2 += dz
        if HAS_G0:
            dg0 = tl.load(dgate_ptr + b * C + offs_c, mask=mask_c, other=0.0) * \
                tl.load(g_ptr + b * C + offs_c, mask=mask_c, other=0.0) + daa * av
            if PAIR:
                dg0 += dam * mv
            tl.store(dg0_ptr + b * C + offs_c, dg0, mask=mask_c)
            daa = daa * g0
            if PAIR:
                dam = dam * g0
        tl.store(da_ptr + b * C + offs_c, daa * SCALE_A, mask=mask_c)
        if PAIR:
            tl.store(dm_ptr + b * C + offs_c, dam, mask=mask_c)
    tl.store(dw2_ptr + offs_c[:, None] * HID + offs_h[None, :], dw2, mask=mask_c[:, None] & mask_h[None, :])
    tl.store(dw1_ptr + offs_h[:, None] * C + offs_c[None, :], dw1, mask=mhc)
    if HAS_B:
        if PAIR:
            db2 = 2.0 * db2
        tl.store(db2_ptr + offs_c, db2, mask=mask_c)
        if cb == 0:  # every block has the same db1
            tl.store(db1_ptr + offs_h, db1, mask=mask_h)


# ---------------------------------------------------------------------------------------
# The spatial gate's 2→1 k×k convolution on [mean, max] (B, H·W) maps: one launch forward,
# two backward (and one sum of per-block weight-gradient partials)
# ---------------------------------------------------------------------------------------


@triton.jit
def _gated_stats(mean_ptr, max_ptr, s0_ptr, q, ok, HAS_S0: tl.constexpr):
    # The spatial gate's inputs [mean, max]·S0 at offsets q (zero where not ok)
    mv = tl.load(mean_ptr + q, mask=ok, other=0.0)
    xv = tl.load(max_ptr + q, mask=ok, other=0.0)
    if HAS_S0:
        sv = tl.load(s0_ptr + q, mask=ok, other=0.0)
        mv = mv * sv
        xv = xv * sv
    return mv, xv


@triton.jit
def _spatial_fwd_kernel(mean_ptr, max_ptr, s0_ptr, w_ptr, bias_ptr, s_ptr, gate_ptr, P, W,
                        HAS_S0: tl.constexpr, HAS_BIAS: tl.constexpr, K: tl.constexpr, BLOCK_P: tl.constexpr):
    # s = σ(bias + Σ_{ch, i, j} w[ch, i, j]·M[ch, y + i − k/2, x + j − k/2]) with M = [mean, max]·S0
    # (zero outside the map), gate = S0·s.
    b, _, offs, mask, H, yy, xx = _pixel_block(P, W, BLOCK_P)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr)
    for t in tl.static_range(K * K):
        ys = yy + (t // K - K // 2)
        xs = xx + (t % K - K // 2)
        ok = mask & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        mv, xv = _gated_stats(mean_ptr, max_ptr, s0_ptr, b * P + ys * W + xs, ok, HAS_S0)
        acc += tl.load(w_ptr + t) * mv + tl.load(w_ptr + K * K + t) * xv
    sg = tl.sigmoid(acc)
    tl.store(s_ptr + b * P + offs, sg, mask=mask)
    if HAS_S0:
        tl.store(gate_ptr + b * P + offs, tl.load(s0_ptr + b * P + offs, mask=mask, other=0.0) * sg, mask=mask)


@triton.jit
def _spatial_bwd_logit_kernel(dgate_ptr, s0_ptr, s_ptr, mean_ptr, max_ptr, dl_ptr, ds0_ptr, part_ptr, P, W, N_PB,
                              HAS_S0: tl.constexpr, K: tl.constexpr, TAPS: tl.constexpr, BLOCK_P: tl.constexpr):
    # dlogit = dgate·S0·s(1 − s); dS0 = dgate·s (its first part); per block of positions the
    # partial sums of the weight gradient Σ dlogit·M[ch, shifted] and of the bias gradient.
    # The K·K taps are the columns of a (BLOCK_P, TAPS) gather, so a block ends in two
    # column sums, not 2·K·K separate ones (which took 37 µs a launch for 8×128×128 on an H200).
    b, pb, offs, mask, H, yy, xx = _pixel_block(P, W, BLOCK_P)
    dg = tl.load(dgate_ptr + b * P + offs, mask=mask, other=0.0)
    sg = tl.load(s_ptr + b * P + offs, mask=mask, other=0.0)
    if HAS_S0:
        tl.store(ds0_ptr + b * P + offs, dg * sg, mask=mask)
        dg = dg * tl.load(s0_ptr + b * P + offs, mask=mask, other=0.0)
    dl = tl.where(mask, dg * sg * (1.0 - sg), 0.0)
    tl.store(dl_ptr + b * P + offs, dl, mask=mask)
    cols = tl.arange(0, TAPS)
    is_tap = cols < K * K
    ys = yy[:, None] + (cols // K - K // 2)[None, :]
    xs = xx[:, None] + (cols % K - K // 2)[None, :]
    ok = mask[:, None] & is_tap[None, :] & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
    mv, xv = _gated_stats(mean_ptr, max_ptr, s0_ptr, b * P + ys * W + xs, ok, HAS_S0)
    row = part_ptr + (b * N_PB + pb) * (2 * K * K + 1)
    tl.store(row + cols, tl.sum(dl[:, None] * mv, axis=0), mask=is_tap)
    tl.store(row + K * K + cols, tl.sum(dl[:, None] * xv, axis=0), mask=is_tap)
    tl.store(row + 2 * K * K, tl.sum(dl, axis=0))


@triton.jit
def _spatial_bwd_input_kernel(dl_ptr, w_ptr, s0_ptr, mean_ptr, max_ptr, ds0_ptr, dmean_ptr, dmax_ptr, P, W, SCALE_MEAN,
                              HAS_S0: tl.constexpr, K: tl.constexpr, BLOCK_P: tl.constexpr):
    # dM[ch, y, x] = Σ_{i,j} w[ch, i, j]·dlogit[y − i + k/2, x − j + k/2]; with S0,
    # dS0 += Σ_ch dM·[mean, max] and the statistics' gradients are dM·S0.
    b, _, offs, mask, H, yy, xx = _pixel_block(P, W, BLOCK_P)
    a0 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    a1 = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for t in tl.static_range(K * K):
        ys = yy - (t // K - K // 2)
        xs = xx - (t % K - K // 2)
        ok = mask & (ys >= 0) & (ys < H) & (xs >= 0) & (xs < W)
        d = tl.load(dl_ptr + b * P + ys * W + xs, mask=ok, other=0.0)
        a0 += tl.load(w_ptr + t) * d
        a1 += tl.load(w_ptr + K * K + t) * d
    if HAS_S0:
        o = b * P + offs
        ds0 = tl.load(ds0_ptr + o, mask=mask, other=0.0) + a0 * tl.load(mean_ptr + o, mask=mask, other=0.0) \
            + a1 * tl.load(max_ptr + o, mask=mask, other=0.0)
        tl.store(ds0_ptr + o, ds0, mask=mask)
        sv = tl.load(s0_ptr + o, mask=mask, other=0.0)
        a0 = a0 * sv
        a1 = a1 * sv
    tl.store(dmean_ptr + b * P + offs, a0 * SCALE_MEAN, mask=mask)
    tl.store(dmax_ptr + b * P + offs, a1, mask=mask)


# ---------------------------------------------------------------------------------------
# Launch helpers: autotuned num_warps on the GPU, fixed under the interpreter
# ---------------------------------------------------------------------------------------

_TUNE_KEY = ["C", "P", "sC", "sP"]
_TUNED: dict[str, object] = {}


def _launcher(kernel, name: str):
    """The kernel to launch and the extra launch options (num_warps when not tuned)."""
    if not _autotune_enabled():
        return kernel, ({} if _interpret() else {"num_warps": 4})
    if name not in _TUNED:
        configs = [triton.Config({}, num_warps=w) for w in (4, 8)]
        _TUNED[name] = triton.autotune(configs=configs, key=_TUNE_KEY)(kernel)
    return _TUNED[name], {}


def _check_f32(x):
    if x.dtype == torch.float64:
        raise ValueError("the Triton gate kernels accumulate in float32; float64 x runs on the 'cpu' or 'reference' backend")


def _gate(t):
    return t.contiguous() if t is not None else None


def pool_hw(x, S):
    """(mean, max, first arg-max) over p of x·S[b, p]: (B, C) float32, float32, int64."""
    _check_f32(x)
    b, c, p, sB, sC, sP = _geometry(x)
    bc, bp = _tiles(c, p, sC, sP)
    n_cblk = triton.cdiv(c, bc)
    chunk, n_split = _split(b * n_cblk, p, bp, _target_programs(x))
    mean = x.new_empty((b, c), dtype=torch.float32)
    mx = x.new_empty((b, c), dtype=torch.float32)
    idx = x.new_empty((b, c), dtype=IDX_DTYPE)
    S = _gate(S)
    final = n_split == 1
    if final:
        outs = (mean, mx, idx)
    else:
        outs = (x.new_empty((b, n_split, c), dtype=torch.float32), x.new_empty((b, n_split, c), dtype=torch.float32),
                x.new_empty((b, n_split, c), dtype=IDX_DTYPE))
    kern, opts = _launcher(_pool_hw_kernel, "pool_hw")
    kern[(b, n_cblk, n_split)](x, S if S is not None else mean, *outs, c, p, chunk, n_split, sB, sC, sP,
                               HAS_S=S is not None, FINAL=final, BLOCK_C=bc, BLOCK_P=bp, **opts)
    if not final:
        _combine(outs, (mean, mx, idx), c, n_split, p)
    return mean, mx, idx


def pool_c(x, G):
    """(mean, max, first arg-max) over c of x·G[b, c]: (B, P) float32, float32, int64."""
    _check_f32(x)
    b, c, p, sB, sC, sP = _geometry(x)
    bc, bp = _tiles(c, p, sC, sP)
    n_pblk = triton.cdiv(p, bp)
    chunk, n_split = _split(b * n_pblk, c, bc, _target_programs(x))
    mean = x.new_empty((b, p), dtype=torch.float32)
    mx = x.new_empty((b, p), dtype=torch.float32)
    idx = x.new_empty((b, p), dtype=IDX_DTYPE)
    G = _gate(G)
    final = n_split == 1
    if final:
        outs = (mean, mx, idx)
    else:
        outs = (x.new_empty((b, n_split, p), dtype=torch.float32), x.new_empty((b, n_split, p), dtype=torch.float32),
                x.new_empty((b, n_split, p), dtype=IDX_DTYPE))
    kern, opts = _launcher(_pool_c_kernel, "pool_c")
    kern[(b, n_pblk, n_split)](x, G if G is not None else mean, *outs, c, p, chunk, n_split, sB, sC, sP,
                               HAS_G=G is not None, FINAL=final, BLOCK_C=bc, BLOCK_P=bp, **opts)
    if not final:
        _combine(outs, (mean, mx, idx), p, n_split, c)
    return mean, mx, idx


def _combine(parts, outs, n, n_split, count):
    b = outs[0].shape[0]
    block = min(1024, _pow2(n))
    _pool_combine_kernel[(b, triton.cdiv(n, block))](*parts, *outs, n, n_split, count, BLOCK_N=block)


def apply(x, G, S):
    """out = x·G[b, c]·S[b, p] in x's dtype and strides."""
    _check_f32(x)
    b, c, p, sB, sC, sP = _geometry(x)
    out = torch.empty_like(x)
    if out.stride() != x.stride():
        raise ValueError(f"could not allocate the output in x's layout (strides {x.stride()})")
    G, S = _gate(G), _gate(S)
    bc, bp = _tiles(c, p, sC, sP)
    kern, opts = _launcher(_apply_kernel, "apply")
    kern[(b, triton.cdiv(c, bc), triton.cdiv(p, bp))](
        x, G if G is not None else x, S if S is not None else x, out, c, p, sB, sC, sP,
        HAS_G=G is not None, HAS_S=S is not None, BLOCK_C=bc, BLOCK_P=bp, **opts)
    return out


def reduce(x, R, G, S, g_arg=None, s_arg=None, need=(True, True)):
    """U[b, c] = Σ_p R·x·S[b, p], V[b, p] = Σ_c R·x·G[b, c] (R, G, S optional), float32.

    ``g_arg = (idx, val)``, (B, C): V also gets val[b, c]·R·x[b, c, idx[b, c]] at p =
    idx[b, c] (a max pool's gradient carried to its spatial gate); ``s_arg``, (B, P):
    U gets val[b, p]·R·x[b, idx[b, p], p] at c = idx[b, p]. ``need`` = (U, V): an output
    not needed is returned as None and costs no work.
    """
    _check_f32(x)
    b, c, p, sB, sC, sP = _geometry(x)
    if R is not None and (R.shape != x.shape or R.stride() != x.stride()):
        raise ValueError(f"R must match x in shape and strides, got {tuple(R.shape)} {R.stride()}")
    need_u, need_v = need
    bc, bp = _tiles(c, p, sC, sP)
    n_cblk = triton.cdiv(c, bc)
    chunk, n_split = _split(b * n_cblk, p, bp, _target_programs(x))
    U = x.new_empty((b, c), dtype=torch.float32) if need_u else None
    V = x.new_empty((b, p), dtype=torch.float32) if need_v else None
    u_final, v_final = n_split == 1, n_cblk == 1
    Ub = (U if u_final else x.new_empty((b, n_split, c), dtype=torch.float32)) if need_u else None
    Vb = (V if v_final else x.new_empty((b, n_cblk, p), dtype=torch.float32)) if need_v else None
    G, S = _gate(G), _gate(S)
    gi, gv = (g_arg[0].contiguous(), g_arg[1].contiguous()) if g_arg is not None else (None, None)
    si, sv = (s_arg[0].contiguous(), s_arg[1].contiguous()) if s_arg is not None else (None, None)
    dummy = Ub if Ub is not None else Vb
    kern, opts = _launcher(_reduce_kernel, "reduce")
    kern[(b, n_cblk, n_split)](
        x, R if R is not None else x, G if G is not None else dummy, S if S is not None else dummy,
        gi if gi is not None else dummy, gv if gv is not None else dummy,
        si if si is not None else dummy, sv if sv is not None else dummy,
        Ub if Ub is not None else dummy, Vb if Vb is not None else dummy,
        c, p, chunk, n_split, n_cblk, sB, sC, sP, HAS_R=R is not None, HAS_G=G is not None, HAS_S=S is not None,
        HAS_GI=g_arg is not None, HAS_SI=s_arg is not None, NEED_U=bool(need_u), NEED_V=bool(need_v),
        U_FINAL=u_final, V_FINAL=v_final, BLOCK_C=bc, BLOCK_P=bp, **opts)
    if need_u and not u_final:
        torch.sum(Ub, dim=1, out=U)
    if need_v and not v_final:
        torch.sum(Vb, dim=1, out=V)
    return U, V


MAX_TERMS = 4  # statistics per gate program (the CBAT chain has four)


def grad_x_terms(grad, x, G, S, terms, stencil=None, elat_taps=False):
    """dx = grad·G·S + each statistic's term, in x's dtype and strides, in one pass.

    ``terms``: up to MAX_TERMS tuples (kind, L, R, idx, d): dx += L[b, c]·R[b, p] (None =
    ones); kind "hw" (a max over p): dx[b, c, idx[b, c]] += d[b, c]·R[b, idx[b, c]];
    kind "c" (a max over c): dx[b, idx[b, p], p] += d[b, p]·L[b, idx[b, p]] (d None: no
    max term). ``stencil = (w7, dlogit)``: also the input gradient of conv2d(x, w7,
    padding=3) for w7 (1, C, 7, 7), dlogit (B, H·W). ``elat_taps``: the caller guarantees
    w7 is ELAT's composite stencil (zero off the three dilated 3×3 grids): 25 taps visited.
    """
    _check_f32(x)
    b, c, p, sB, sC, sP = _geometry(x)
    if grad is not None and (grad.shape != x.shape or grad.stride() != x.stride()):
        raise ValueError(f"grad must match x in shape and strides, got {tuple(grad.shape)} {grad.stride()}")
    if len(terms) > MAX_TERMS:
        raise ValueError(f"terms: at most {MAX_TERMS} statistics per dx pass, got {len(terms)}")
    dx = torch.empty_like(x)
    G, S = _gate(G), _gate(S)
    slots, modes = [], []
    for t in list(terms) + [None] * (MAX_TERMS - len(terms)):
        if t is None:
            slots += [dx] * 4
            modes.append(0)
            continue
        kind, L, R, idx, d = t
        if kind not in ("hw", "c"):
            raise ValueError(f"terms: kind must be 'hw' or 'c', got {kind!r}")
        mode = 1 | (2 if kind == "c" else 0) | (4 if L is not None else 0) | (8 if R is not None else 0)
        mode |= 16 if d is not None else 0
        slots += [_gate(L) if L is not None else dx, _gate(R) if R is not None else dx,
                  idx.contiguous() if d is not None else dx, d.contiguous() if d is not None else dx]
        modes.append(mode)
    wt = dl = None
    if stencil is not None:
        w7, dl = stencil
        if tuple(w7.shape) != (1, c, 7, 7) or tuple(dl.shape) != (b, p):
            raise ValueError(f"stencil must be (w7 (1, {c}, 7, 7), dlogit ({b}, {p})), got {tuple(w7.shape)}, {tuple(dl.shape)}")
        wt = _tap_major(w7)
        dl = dl.float().contiguous()
    bc, bp = _tiles(c, p, sC, sP)
    kern, opts = _launcher(_grad_x_kernel, "grad_x")
    kern[(b, triton.cdiv(c, bc), triton.cdiv(p, bp))](
        grad if grad is not None else x, G if G is not None else dx, S if S is not None else dx, *slots,
        wt if wt is not None else dx, dl if dl is not None else dx, dx, c, p, x.shape[3], sB, sC, sP,
        HAS_GRAD=grad is not None, HAS_G=G is not None, HAS_S=S is not None,
        MODE0=modes[0], MODE1=modes[1], MODE2=modes[2], MODE3=modes[3],
        STENCIL=stencil is not None, ELAT_TAPS=bool(elat_taps), BLOCK_C=bc, BLOCK_P=bp, **opts)
    return dx


def grad_x(grad, x, G, S, L, Rk, stencil=None, elat_taps=False):
    """dx = grad·G·S + Σ_k L[k, b, c]·Rk[k, b, p] (K ≤ MAX_TERMS), as csrc/gates.cpp's
    gates_grad_x; see :func:`grad_x_terms` for ``stencil``."""
    terms = [("hw", L[k], Rk[k], None, None) for k in range(L.shape[0])]
    return grad_x_terms(grad, x, G, S, terms, stencil=stencil, elat_taps=elat_taps)


def _stencil_tiles(c: int, p: int, sC: int, sP: int) -> tuple[int, int]:
    """The stencil's tiles: the map passes' shape, at most 1024 elements (each of the 25
    taps is a shifted load of the whole tile)."""
    bc, bp = _tiles(c, p, sC, sP)
    while bc * bp > 1024 and FORCE_TILES is None:
        if bp >= bc and bp > 16:
            bp //= 2
        else:
            bc //= 2
    return bc, bp


def _tap_major(w7):
    """w7 (1, C, 7, 7) as (49, C) float32: one tap's weights over the channels contiguous."""
    return w7.reshape(w7.shape[1], 49).t().float().contiguous()


def _check_stencil(x, w7):
    _check_f32(x)
    c = x.shape[1]
    if tuple(w7.shape) != (1, c, 7, 7):
        raise ValueError(f"w7 must be (1, {c}, 7, 7) for x of shape {tuple(x.shape)}, got {tuple(w7.shape)}")


def stencil(x, w7, elat_taps=False):
    """ELAT's logit: conv2d(x, w7, padding=3) for w7 (1, C, 7, 7), as (B, H·W) float32,
    in one pass over x (cuDNN took 1.04 ms for it at (8, 64, 256, 256) on an H200, ~30× its
    byte floor). ``elat_taps``: w7 is ELAT's composite stencil (zero off the three dilated
    3×3 grids), so only its 25 taps are visited."""
    return _stencil(x, w7, elat_taps, pool=False)[0]


def pool_hw_stencil(x, w7, elat_taps=False):
    """:func:`pool_hw` (no gate) and :func:`stencil` in the same read of x: (mean, max,
    first arg-max) over p, (B, C) float32, float32, int32, and the logit (B, H·W) float32.
    ELAT's forward, which needs both of x before anything else."""
    return _stencil(x, w7, elat_taps, pool=True)


def _stencil(x, w7, elat_taps, pool):
    _check_stencil(x, w7)
    b, c, p, sB, sC, sP = _geometry(x)
    wt = _tap_major(w7)
    out = x.new_empty((b, p), dtype=torch.float32)
    bc, bp = _stencil_tiles(c, p, sC, sP)
    n_pb = triton.cdiv(p, bp)
    parts = ((x.new_empty((b, n_pb, c), dtype=torch.float32), x.new_empty((b, n_pb, c), dtype=torch.float32),
              x.new_empty((b, n_pb, c), dtype=IDX_DTYPE)) if pool else (out, out, out))
    _stencil_fwd_kernel[(b, n_pb)](x, wt, out, *parts, c, p, x.shape[3], sB, sC, sP, ELAT_TAPS=bool(elat_taps),
                                   POOL=pool, BLOCK_C=bc, BLOCK_P=bp, **({} if _interpret() else {"num_warps": 4}))
    if not pool:
        return (out,)
    stats = (x.new_empty((b, c), dtype=torch.float32), x.new_empty((b, c), dtype=torch.float32),
             x.new_empty((b, c), dtype=IDX_DTYPE))
    _combine(parts, stats, c, n_pb, p)
    return (*stats, out)


def stencil_grad_weight(x, dlogit, w7, elat_taps=False):
    """The weight gradient of :func:`stencil`: dw7[0, c, i, j] = Σ_{b, y, x} x[b, c, y + i − 3,
    x + j − 3]·dlogit[b, y·W + x], (1, C, 7, 7) float32 (taps off ELAT's grids are 0 with
    ``elat_taps``, whose 25 taps take a 32-wide product). x is read once (cuDNN's weight
    gradient took 2.04 ms at (8, 64, 256, 256) on an H200); split over pixel blocks, the
    splits summed in order."""
    _check_stencil(x, w7)
    b, c, p, sB, sC, sP = _geometry(x)
    if tuple(dlogit.shape) != (b, p):
        raise ValueError(f"dlogit must be ({b}, {p}), got {tuple(dlogit.shape)}")
    dl = dlogit.float().contiguous()
    # tl.dot needs every dimension >= 16; 64 channels x 64 pixels per block
    bc, bq = (FORCE_TILES[0], FORCE_TILES[1]) if FORCE_TILES is not None else (min(64, max(16, _pow2(c))), 64)
    n_cblk, n_qblk = triton.cdiv(c, bc), triton.cdiv(p, bq)
    chunk, n_split = _split(n_cblk, b * n_qblk, 1, _target_programs(x))
    # ELAT: the 24 taps off its grids are never written (zeros)
    part = (x.new_zeros if elat_taps else x.new_empty)((n_split, c, 49), dtype=torch.float32)
    _stencil_grad_weight_kernel[(n_cblk, n_split)](x, dl, part, c, p, x.shape[3], sB, sC, sP, n_qblk, b * n_qblk, chunk,
                                                   ELAT_TAPS=bool(elat_taps), NT=32 if elat_taps else 64, BLOCK_C=bc,
                                                   BLOCK_Q=bq, **({} if _interpret() else {"num_warps": 4}))
    dw = part[0] if n_split == 1 else part.sum(0)
    return dw.view(1, c, 7, 7)


def _mlp_blocks(c: int, hid: int) -> tuple[int, int]:
    bh = _pow2(hid)
    return max(16, min(_pow2(c), 4096 // bh)), bh


def channel_mlp_fwd(a, m, G0, w1, b1, w2, b2, telu, pair):
    """The channel gate's MLP on pooled statistics (float32, (B, C)): H = W1·(x·G0) + b1,
    T = act(H) (TeLU or ReLU), g = σ(W2·(T_a + T_m) + 2·b2) (one row set without ``pair``),
    gate = G0·g. Returns (H, T, (u, th) or None, g, gate); rows are [avg; max] with pair."""
    b, c = a.shape
    hid = w1.shape[0]
    rows = 2 * b if pair else b
    H = a.new_empty((rows, hid))
    T = a.new_empty((rows, hid))
    parts = (a.new_empty((rows, hid)), a.new_empty((rows, hid))) if telu else None
    g = a.new_empty((b, c))
    gate = a.new_empty((b, c)) if G0 is not None else g
    bc, bh = _mlp_blocks(c, hid)
    dummy = g
    _channel_mlp_fwd_kernel[(b,)](
        a, m if m is not None else dummy, G0 if G0 is not None else dummy, w1.contiguous(),
        b1 if b1 is not None else dummy, w2.contiguous(), b2 if b2 is not None else dummy,
        H, T, parts[0] if telu else dummy, parts[1] if telu else dummy, g, gate, b, c, hid,
        HAS_G0=G0 is not None, HAS_B=b1 is not None, TELU=bool(telu), PAIR=bool(pair), BLOCK_C=bc, BLOCK_H=bh)
    return H, T, parts, g, gate


def channel_mlp_bwd(dgate, a, m, G0, H, T, parts, g, w1, w2, telu, pair, biases, scale_a=1.0):
    """Backward of :func:`channel_mlp_fwd` for the gradient of ``gate``: (da, dm, dG0, dw1,
    db1, dw2, db2); da/dm are the gradients of the statistics a, m (None where absent), da
    multiplied by ``scale_a`` (1/P turns a mean's gradient into its per-element weight)."""
    b, c = a.shape
    hid = w1.shape[0]
    rows = 2 * b if pair else b
    bc, bh = _mlp_blocks(c, hid)
    dz = a.new_empty((b, c))
    dh = a.new_empty((rows, hid))
    dummy = dz
    w1, w2 = w1.contiguous(), w2.contiguous()
    _channel_mlp_bwd_rows_kernel[(b,)](
        dgate.contiguous(), g, G0 if G0 is not None else dummy, w2, H, parts[0] if telu else H, parts[1] if telu else H,
        dz, dh, b, c, hid, HAS_G0=G0 is not None, TELU=bool(telu), PAIR=bool(pair), BLOCK_C=bc, BLOCK_H=bh)
    da = a.new_empty((b, c))
    dm = a.new_empty((b, c)) if pair else None
    dG0 = a.new_empty((b, c)) if G0 is not None else None
    dw1, dw2 = w1.new_empty(w1.shape), w2.new_empty(w2.shape)
    db1 = w1.new_empty((hid,)) if biases else None
    db2 = w1.new_empty((c,)) if biases else None
    bc2 = max(16, min(_pow2(c), 2048 // bh))
    _channel_mlp_bwd_cols_kernel[(triton.cdiv(c, bc2),)](
        dz, dh, T, a, m if m is not None else dummy, G0 if G0 is not None else dummy, dgate.contiguous(), g, w1,
        dw1, db1 if biases else dummy, dw2, db2 if biases else dummy, da, dm if pair else dummy,
        dG0 if G0 is not None else dummy, b, c, hid, float(scale_a),
        HAS_G0=G0 is not None, HAS_B=bool(biases), PAIR=bool(pair), BLOCK_C=bc2, BLOCK_H=bh)
    return da, dm, dG0, dw1, db1, dw2, db2


_SPATIAL_BLOCK = 256
SPATIAL_LOGIT_BLOCK = 64  # positions per block of the spatial gate's logit backward (tests: smaller)


def _spatial_block(p: int) -> int:
    return min(_SPATIAL_BLOCK, max(16, _pow2(p)))


def spatial_gate_fwd(mean, mx, S0, cw, cb, width):
    """The spatial gate from [mean, max] (B, P) maps of a (H, W = width) grid: s = σ(conv_k(
    [mean, max]·S0, cw, cb, padding k//2)) and gate = S0·s (= s without S0), float32."""
    b, p = mean.shape
    k = cw.shape[-1]
    s = mean.new_empty((b, p))
    gate = mean.new_empty((b, p)) if S0 is not None else s
    block = _spatial_block(p)
    w = cw.reshape(-1).contiguous()
    _spatial_fwd_kernel[(b, triton.cdiv(p, block))](
        mean, mx, S0 if S0 is not None else s, w, cb if cb is not None else w, s, gate, p, width,
        HAS_S0=S0 is not None, HAS_BIAS=cb is not None, K=k, BLOCK_P=block)
    return s, gate


def spatial_gate_bwd(dgate, S0, s, mean, mx, cw, has_bias, width, scale_mean=1.0):
    """Backward of :func:`spatial_gate_fwd`: (dmean, dmax, dS0, dcw, dcb) (dS0 None without
    S0, dcb None without a bias), dmean multiplied by ``scale_mean``. Deterministic:
    per-block partials summed in order."""
    b, p = mean.shape
    k = cw.shape[-1]
    block = _spatial_block(p)
    n_pb = triton.cdiv(p, block)
    # the logit kernel's blocks hold (positions × taps) tiles: fewer positions per block
    block_l = min(SPATIAL_LOGIT_BLOCK, block)
    n_lb = triton.cdiv(p, block_l)
    dl = mean.new_empty((b, p))
    dS0 = mean.new_empty((b, p)) if S0 is not None else None
    part = mean.new_empty((b * n_lb, 2 * k * k + 1))
    w = cw.reshape(-1).contiguous()
    dgate = dgate.contiguous()
    _spatial_bwd_logit_kernel[(b, n_lb)](
        dgate, S0 if S0 is not None else dl, s, mean, mx, dl, dS0 if dS0 is not None else dl, part, p, width, n_lb,
        HAS_S0=S0 is not None, K=k, TAPS=max(16, _pow2(k * k)), BLOCK_P=block_l)
    dmean, dmax = mean.new_empty((b, p)), mean.new_empty((b, p))
    _spatial_bwd_input_kernel[(b, n_pb)](
        dl, w, S0 if S0 is not None else dl, mean, mx, dS0 if dS0 is not None else dl, dmean, dmax, p, width,
        float(scale_mean), HAS_S0=S0 is not None, K=k, BLOCK_P=block)
    sums = part.sum(0)
    return dmean, dmax, dS0, sums[: 2 * k * k].view(cw.shape), (sums[2 * k * k :] if has_bias else None)
