"""TeLU, Triton kernels: y = x·tanh(eˣ) and grad·telu'(x), one read and one write each.

The same finite formulation as csrc/telu.cpp: with u = e^{min(x, 20)} and e = e^{−2u},
tanh(u) = (1 − e)/(1 + e) (a series for u < 0.05) and 1 − tanh²u = 4e/(1 + e)². The
tensor is processed in its memory order (any dense layout). Index arithmetic is int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _tanh_pos(u, e):
    us = tl.minimum(u, 0.05)  # the series is only used below 0.05; keep it finite elsewhere
    u2 = us * us
    series = us * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0))))
    return tl.where(u < 0.05, series, (1.0 - e) / (1.0 + e))


@triton.jit
def _telu_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.exp(tl.minimum(x, 20.0))
    e = tl.exp(-2.0 * u)
    tl.store(y_ptr + offs, (x * _tanh_pos(u, e)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _telu_bwd_kernel(g_ptr, x_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.exp(tl.minimum(x, 20.0))
    e = tl.exp(-2.0 * u)
    d = 1.0 + e
    dy = _tanh_pos(u, e) + x * (4.0 * (u * e)) / (d * d)  # 4·(u·e) first: 4·x overflows past 8.5e37
    tl.store(dx_ptr + offs, (g * dy).to(dx_ptr.dtype.element_ty), mask=mask)


def _check(x):
    if x.dtype == torch.float64:
        raise ValueError("the Triton TeLU kernels compute in float32; float64 runs on the 'cpu' or 'reference' backend")
    if not (x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))):
        raise ValueError(f"x must be dense (any layout), got strides {x.stride()}")


def telu_fwd_triton(x: torch.Tensor) -> torch.Tensor:
    _check(x)
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _telu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](x, y, n, BLOCK=_BLOCK)
    return y


def telu_bwd_triton(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    _check(x)
    if grad.stride() != x.stride():
        raise ValueError(f"grad must have x's strides {x.stride()}, got {grad.stride()}")
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        _telu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](grad, x, dx, n, BLOCK=_BLOCK)
    return dx
