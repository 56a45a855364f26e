"""torch.compile(fullgraph=True) with shapes and τ that change between calls.

A user-acceptance pass (2026-11-28) found two ops that compiled once and then broke at the
recompile torch makes when a shape or a float argument changes (the next image size, the
last short batch, a temperature schedule), or at once with ``dynamic=True``:
window_attention sorted its logits' symbolic strides (``sorted()`` of symbolic values is
unsupported), and dispersive_loss checked τ with ``math.isfinite``, which dynamo cannot
call on a symbolic float. Values and gradients are compared with the reference at every
call. ``aot_eager`` traces the same graph as inductor without compiling C++ (seconds).
"""
from __future__ import annotations

import pytest
import torch

import disseg_kernels as dk
from disseg_kernels.reference.window_attention import window_attention_reference


def _check(fn, ref, inputs_list, dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for inputs in inputs_list:
        a = [t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
        b = [t.clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
        ya, yb = compiled(*a), ref(*b)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        ya.sum().backward()
        yb.sum().backward()
        for x, y in zip(a, b):
            if isinstance(x, torch.Tensor):
                torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamic", [None, True])
def test_window_attention_recompiles_for_new_shapes(dynamic):
    torch.manual_seed(0)
    shapes = [(2, 4, 3, 5, 2), (2, 4, 4, 6, 2), (1, 6, 5, 2, 3)]
    inputs = [(torch.randn(b, c, h, w), torch.randn(b, h * w, heads, 81).view(b, h * w, heads, 9, 9).permute(0, 2, 1, 3, 4))
              for b, c, h, w, heads in shapes]
    _check(lambda v, l: dk.window_attention(v, l), window_attention_reference, inputs, dynamic)


def test_window_attention_keeps_a_permuted_dense_view_and_copies_a_gapped_one():
    """The stride test that replaced sorted(): a permuted view of a Linear's output is read
    in place; a sliced one is copied (the kernels index densely)."""
    from disseg_kernels.ops.window_attention import _kernel_logits

    base = torch.randn(2, 12, 3, 81)  # (B, H·W, heads, k⁴) as a Linear writes it
    view = base.view(2, 12, 3, 9, 9).permute(0, 2, 1, 3, 4)  # (B, heads, H·W, k², k²)
    assert _kernel_logits(view, 9) is view
    gapped = torch.randn(2, 12, 4, 81)[:, :, :3].view(2, 12, 3, 9, 9).permute(0, 2, 1, 3, 4)
    out = _kernel_logits(gapped, 9)
    assert out is not gapped and out.is_contiguous() and torch.equal(out, gapped)
    overlapping = torch.randn(1, 1, 1, 9, 9).expand(2, 3, 12, 9, 9)
    assert _kernel_logits(overlapping, 9).is_contiguous()


@pytest.mark.parametrize("dynamic", [None, True])
def test_dispersive_loss_recompiles_for_new_tau_and_shapes(dynamic):
    torch.manual_seed(0)
    inputs = [(torch.randn(6, 5), 0.5), (torch.randn(6, 5), 0.4), (torch.randn(9, 3), 0.3)]
    _check(lambda z, tau: dk.dispersive_loss(z, tau=tau),
           lambda z, tau: dk.dispersive_loss(z, tau=tau, backend="reference"), inputs, dynamic)
    bank = torch.randn(4, 5)
    _check(lambda z, tau: dk.dispersive_loss_with_bank(z, bank, tau=tau),
           lambda z, tau: dk.dispersive_loss_with_bank(z, bank, tau=tau, backend="reference"),
           inputs[:2], dynamic)
