"""No fused op returns a wrong second derivative: asking for one is an error naming the op.

The fused kernels compute first derivatives without a graph. Before 2026-11-28 a second
derivative through them came back silently wrong (found by a user-acceptance pass): the
dispersive loss's was exactly 0, and a gradient penalty through TeLU, the gates, window
attention or the multi-scale concat was dropped, because ``once_differentiable`` attaches
its error only when the incoming gradient requires grad. Each case here checks that the
first derivative under ``create_graph=True`` keeps its value and that differentiating it
raises.
"""
from __future__ import annotations

import pytest
import torch

import disseg_kernels as dk
from disseg_kernels import _backend

CPU = torch.device("cpu")


def _cpu_backend(family):
    why = _backend.unavailable_reason(family, "cpu", CPU)
    return pytest.mark.skipif(why is not None, reason=f"C++ kernels unavailable: {why}")


def _check(fn, *inputs, match):
    """First derivatives under create_graph=True equal plain ones; a second one raises."""
    plain = torch.autograd.grad(fn(*inputs).sum(), inputs)
    grads = torch.autograd.grad(fn(*inputs).sum(), inputs, create_graph=True)
    for g, p in zip(grads, plain):
        torch.testing.assert_close(g, p, rtol=0, atol=0)
    assert all(g.requires_grad for g in grads)
    with pytest.raises(RuntimeError, match=match):
        sum(g.square().sum() for g in grads).backward()
    # torch.autograd.grad runs only the nodes on a path to its inputs: the error's node must
    # be on it. Before 2026-11-28 (12:20 UTC) it hung off a detached leaf, so this returned
    # None with allow_unused=True (the penalty silently dropped) and otherwise said only
    # "appears to not have been used in the graph".
    for allow_unused in (False, True):
        grads = torch.autograd.grad(fn(*inputs).sum(), inputs, create_graph=True)
        with pytest.raises(RuntimeError, match=match):
            torch.autograd.grad(sum(g.square().sum() for g in grads), inputs, allow_unused=allow_unused)


@_cpu_backend("dispersive")
@pytest.mark.parametrize("variant", ["infonce_l2", "covariance"])
def test_dispersive_second_derivative_raises(variant):
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    _check(lambda t: dk.dispersive_loss(t, variant=variant, backend="cpu"), z, match="dispersive_loss has no double backward")
    # the reference backend has one (plain autograd; torch.cdist, under infonce_l2, has none)
    (g,) = torch.autograd.grad(dk.dispersive_loss(z, variant="covariance", backend="reference"), z, create_graph=True)
    (h,) = torch.autograd.grad(g.square().sum(), z)
    assert h.abs().sum() > 0


@_cpu_backend("telu")
def test_telu_second_derivative_raises():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    _check(lambda t: dk.telu(t, backend="cpu"), x, match="telu has no double backward")


@_cpu_backend("gates")
def test_gate_chain_penalty_raises_instead_of_vanishing():
    """The helper's case: a gradient penalty through CBATGates (fused) left the parameters'
    gradient at the first-order term only."""
    torch.manual_seed(0)
    m = dk.CBATGates(8, fused=True, backend="cpu").double()
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64, requires_grad=True)
    _check(m, x, match="the gate ops has no double backward")


@_cpu_backend("window_attention")
def test_window_attention_second_derivative_raises():
    v = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(1, 2, 36, 9, 9, dtype=torch.float64, requires_grad=True)  # 2 heads
    _check(lambda a, b: dk.window_attention(a, b, 3, backend="cpu"), v, logits, match="window_attention has no double")


@_cpu_backend("multiscale")
def test_multiscale_second_derivative_raises():
    a = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    _check(lambda s, t: dk.multiscale_concat([s, t], [1, 2], backend="cpu") ** 2, a, b,
           match="multiscale_concat has no double backward")


def test_bank_loss_second_derivative_raises():
    """The bank / distributed loss (its own autograd.Function, any backend)."""
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(5, 4, dtype=torch.float64)
    _check(lambda t: dk.dispersive_loss_with_bank(t, bank), z, match="bank / distributed dispersive loss has no double")
