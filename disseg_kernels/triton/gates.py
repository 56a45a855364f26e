"""Attention gates, Triton kernels (the same five kernels as csrc/gates.cpp).

x is (B, C, H, W) viewed as (B, C, P), P = H·W, through its strides (sB, sC, sP): NCHW
(sP = 1) and channels_last (sC = 1) are both read in place. Every kernel works on
[BLOCK_C, BLOCK_P] tiles, coalesced along whichever of the two has stride 1. Gates are
dense (B, C) / (B, P) float32 (float64 for float64 x); a missing gate is 1.
Index arithmetic is int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BC = 32
_BP = 64


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _geometry(x: torch.Tensor):
    b, c, h, w = x.shape
    if h > 1 and x.stride(2) != w * x.stride(3):
        raise ValueError(f"x must be contiguous or channels_last, got strides {x.stride()}")
    return b, c, h * w, x.stride(0), x.stride(1), x.stride(3)


@triton.jit
def _pool_hw_kernel(x_ptr, s_ptr, mean_ptr, max_ptr, idx_ptr, C, P, sB, sC, sP,
                    HAS_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1).to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    best = tl.full((BLOCK_C, BLOCK_P), float("-inf"), dtype=tl.float32)
    besti = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.int64)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        mask_p = offs_p < P
        m = mask_c[:, None] & mask_p[None, :]
        v = tl.load(x_ptr + b * sB + offs_c[:, None] * sC + offs_p[None, :] * sP, mask=m, other=0.0).to(tl.float32)
        if HAS_S:
            s = tl.load(s_ptr + b * P + offs_p, mask=mask_p, other=0.0)
            v = v * s[None, :]
        acc += v
        vm = tl.where(m, v, float("-inf"))
        gt = vm > best  # strict: each lane keeps its first maximum
        best = tl.where(gt, vm, best)
        besti = tl.where(gt, offs_p[None, :] + tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.int64), besti)
    row_max = tl.max(best, axis=1)
    cand = tl.where(best == row_max[:, None], besti, P)
    row_idx = tl.min(cand, axis=1)
    row_idx = tl.minimum(row_idx, P - 1)
    tl.store(mean_ptr + b * C + offs_c, tl.sum(acc, axis=1) / P, mask=mask_c)
    tl.store(max_ptr + b * C + offs_c, row_max, mask=mask_c)
    tl.store(idx_ptr + b * C + offs_c, row_idx, mask=mask_c)


@triton.jit
def _pool_c_kernel(x_ptr, g_ptr, mean_ptr, max_ptr, idx_ptr, C, P, sB, sC, sP,
                   HAS_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1).to(tl.int64)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_p = offs_p < P
    acc = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    best = tl.full((BLOCK_C, BLOCK_P), float("-inf"), dtype=tl.float32)
    besti = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.int64)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        mask_c = offs_c < C
        m = mask_c[:, None] & mask_p[None, :]
        v = tl.load(x_ptr + b * sB + offs_c[:, None] * sC + offs_p[None, :] * sP, mask=m, other=0.0).to(tl.float32)
        if HAS_G:
            g = tl.load(g_ptr + b * C + offs_c, mask=mask_c, other=0.0)
            v = v * g[:, None]
        acc += v
        vm = tl.where(m, v, float("-inf"))
        gt = vm > best
        best = tl.where(gt, vm, best)
        besti = tl.where(gt, offs_c[:, None] + tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.int64), besti)
    col_max = tl.max(best, axis=0)
    cand = tl.where(best == col_max[None, :], besti, C)
    col_idx = tl.minimum(tl.min(cand, axis=0), C - 1)
    tl.store(mean_ptr + b * P + offs_p, tl.sum(acc, axis=0) / C, mask=mask_p)
    tl.store(max_ptr + b * P + offs_p, col_max, mask=mask_p)
    tl.store(idx_ptr + b * P + offs_p, col_idx, mask=mask_p)


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
def _reduce_kernel(x_ptr, r_ptr, g_ptr, s_ptr, u_ptr, v_ptr, C, P, sB, sC, sP,
                   HAS_R: tl.constexpr, HAS_G: tl.constexpr, HAS_S: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    # U[b, c] = Σ_p R·x·S, V[b, p] = Σ_c R·x·G: the c-block owns its U rows, V is summed
    # over the c-blocks with atomics.
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mask_c = offs_c < C
    if HAS_G:
        g = tl.load(g_ptr + b * C + offs_c, mask=mask_c, other=0.0)
    else:
        g = tl.where(mask_c, 1.0, 0.0)
    u = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        mask_p = offs_p < P
        m = mask_c[:, None] & mask_p[None, :]
        off = b * sB + offs_c[:, None] * sC + offs_p[None, :] * sP
        t = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        if HAS_R:
            t = t * tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
        if HAS_S:
            s = tl.load(s_ptr + b * P + offs_p, mask=mask_p, other=0.0)
            u += tl.sum(t * s[None, :], axis=1)
        else:
            u += tl.sum(t, axis=1)
        tl.atomic_add(v_ptr + b * P + offs_p, tl.sum(t * g[:, None], axis=0), mask=mask_p)
    tl.store(u_ptr + b * C + offs_c, u, mask=mask_c)


@triton.jit
def _grad_x_kernel(grad_ptr, g_ptr, s_ptr, l_ptr, rk_ptr, dx_ptr, K, B, C, P, sB, sC, sP,
                   HAS_GRAD: tl.constexpr, HAS_G: tl.constexpr, HAS_S: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
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
    for k in range(0, K):
        row = b + k * B  # int64 (b is)
        lv = tl.load(l_ptr + row * C + offs_c, mask=mask_c, other=0.0)
        rv = tl.load(rk_ptr + row * P + offs_p, mask=mask_p, other=0.0)
        acc += lv[:, None] * rv[None, :]
    tl.store(dx_ptr + off, acc.to(dx_ptr.dtype.element_ty), mask=m)


def _check_f32(x):
    if x.dtype == torch.float64:
        raise ValueError("the Triton gate kernels accumulate in float32; float64 x runs on the 'cpu' or 'reference' backend")


def _gate(t):
    return t.contiguous() if t is not None else None


def pool_hw(x, S):
    _check_f32(x)
    b, c, p, sB, sC, sP = _geometry(x)
    mean = x.new_empty((b, c), dtype=torch.float32)
    mx = x.new_empty((b, c), dtype=torch.float32)
    idx = x.new_empty((b, c), dtype=torch.long)
    S = _gate(S)
    grid = (b, triton.cdiv(c, _BC))
    _pool_hw_kernel[grid](x, S if S is not None else mean, mean, mx, idx, c, p, sB, sC, sP,
                          HAS_S=S is not None, BLOCK_C=_BC, BLOCK_P=_BP)
    return mean, mx, idx


def pool_c(x, G):
    _check_f32(x)
    b, c, p, sB, sC, sP = _geometry(x)
    mean = x.new_empty((b, p), dtype=torch.float32)
    mx = x.new_empty((b, p), dtype=torch.float32)
    idx = x.new_empty((b, p), dtype=torch.long)
    G = _gate(G)
    grid = (b, triton.cdiv(p, _BP))
    _pool_c_kernel[grid](x, G if G is not None else mean, mean, mx, idx, c, p, sB, sC, sP,
                         HAS_G=G is not None, BLOCK_C=_BC, BLOCK_P=_BP)
    return mean, mx, idx


def apply(x, G, S):
    _check_f32(x)
    b, c, p, sB, sC, sP = _geometry(x)
    out = torch.empty_like(x)
    if out.stride() != x.stride():
        raise ValueError(f"could not allocate the output in x's layout (strides {x.stride()})")
    G, S = _gate(G), _gate(S)
    grid = (b, triton.cdiv(c, _BC), triton.cdiv(p, _BP))
    _apply_kernel[grid](x, G if G is not None else x, S if S is not None else x, out, c, p, sB, sC, sP,
                        HAS_G=G is not None, HAS_S=S is not None, BLOCK_C=_BC, BLOCK_P=_BP)
    return out


def reduce(x, R, G, S):
    _check_f32(x)
    b, c, p, sB, sC, sP = _geometry(x)
    if R is not None and (R.shape != x.shape or R.stride() != x.stride()):
        raise ValueError(f"R must match x in shape and strides, got {tuple(R.shape)} {R.stride()}")
    U = x.new_zeros((b, c), dtype=torch.float32)
    V = x.new_zeros((b, p), dtype=torch.float32)
    G, S = _gate(G), _gate(S)
    grid = (b, triton.cdiv(c, _BC))
    _reduce_kernel[grid](x, R if R is not None else x, G if G is not None else U, S if S is not None else V, U, V,
                         c, p, sB, sC, sP, HAS_R=R is not None, HAS_G=G is not None, HAS_S=S is not None,
                         BLOCK_C=_BC, BLOCK_P=_BP)
    return U, V


def grad_x(grad, x, G, S, L, Rk):
    _check_f32(x)
    b, c, p, sB, sC, sP = _geometry(x)
    if grad is not None and (grad.shape != x.shape or grad.stride() != x.stride()):
        raise ValueError(f"grad must match x in shape and strides, got {tuple(grad.shape)} {grad.stride()}")
    dx = torch.empty_like(x)
    G, S = _gate(G), _gate(S)
    L, Rk = L.contiguous(), Rk.contiguous()
    grid = (b, triton.cdiv(c, _BC), triton.cdiv(p, _BP))
    _grad_x_kernel[grid](grad if grad is not None else x, G if G is not None else L, S if S is not None else Rk,
                         L, Rk, dx, L.shape[0], b, c, p, sB, sC, sP,
                         HAS_GRAD=grad is not None, HAS_G=G is not None, HAS_S=S is not None,
                         BLOCK_C=_BC, BLOCK_P=_BP)
    return dx
