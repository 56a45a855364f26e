"""Edge cases of the public API found by a user-acceptance pass (2026-11-28): empty inputs,
dtypes a kernel cannot compute in, and the messages of bad calls. Each was a crash deep
inside (ZeroDivisionError, F.unfold's message, a kernel's "not implemented for 'Int'") or
a silent float32 computation of float64 inputs."""
from __future__ import annotations

import re

import pytest
import torch

import disseg_kernels as dk
from disseg_kernels import _backend

CPU = torch.device("cpu")


def _backends(family):
    return ["reference"] + [b for b in ("cpu", "triton") if _backend.unavailable_reason(family, b, CPU) is None]


@pytest.mark.parametrize("backend", _backends("gates"))
def test_gates_on_empty_maps(backend):
    """An empty batch runs (empty output, backward included); a map without pixels is an
    error naming the module and the shape (the max pools over H·W are undefined)."""
    for make in (lambda: dk.CBATGates(8, backend=backend), lambda: dk.ELAT(8, backend=backend),
                 lambda: dk.ChannelAttention(8, backend=backend)):
        x = torch.randn(0, 8, 5, 6, requires_grad=True)
        y = make()(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
    for shape in ((1, 8, 0, 3), (2, 8, 3, 0), (0, 8, 0, 4)):  # the empty batch without pixels was a raw pool error
        with pytest.raises(ValueError, match=re.escape(f"ChannelAttention: x has no pixels (H·W = 0, shape {shape})")):
            dk.ChannelAttention(8, backend=backend)(torch.randn(shape))
    # no channels: SpatialAttention's mean/max over C (was an IndexError from max())
    with pytest.raises(ValueError, match=re.escape("SpatialAttention: x has no channels (C = 0, shape (1, 0, 4, 4))")):
        dk.SpatialAttention(backend=backend)(torch.randn(1, 0, 4, 4))


def test_argument_types_are_named():
    """Found by an audit on 2026-11-28: each was accepted silently or failed inside torch."""
    import numpy as np

    with pytest.raises(TypeError, match="check_finite must be a bool, got 'yes'"):
        dk.dispersive_loss(torch.randn(3, 2), check_finite="yes")
    with pytest.raises(TypeError, match="check_finite must be a bool, got 1"):
        dk.DispersiveLoss(check_finite=1)
    with pytest.raises(TypeError, match="scales must be a sequence of integers, one per tensor, got 2"):
        dk.multiscale_concat([torch.randn(1, 2, 2, 2)], 2)
    with pytest.raises(TypeError, match="channels must be an int, got 8.0"):
        dk.ChannelAttention(8.0)
    with pytest.raises(TypeError, match="reduction must be an int, got 2.5"):
        dk.CBAM(8, reduction=2.5)
    assert dk.ChannelAttention(np.int64(8), ratio=np.int32(4)).fc1.out_channels == 2  # integers of any kind


@pytest.mark.parametrize("backend", _backends("window_attention"))
def test_window_attention_on_empty_maps(backend):
    for v, logits in ((torch.randn(1, 0, 4, 4), torch.randn(1, 1, 16, 9, 9)),
                      (torch.randn(1, 2, 0, 4), torch.randn(1, 1, 0, 9, 9))):
        y = dk.window_attention(v, logits, 3, backend=backend)
        assert y.shape == v.shape


@pytest.mark.parametrize("family,call", [
    ("telu", lambda b: dk.telu(torch.randn(3, dtype=torch.float64), backend=b)),
    ("multiscale", lambda b: dk.multiscale_concat([torch.randn(1, 2, 4, 4, dtype=torch.float64)], [1], backend=b)),
    ("gates", lambda b: dk.ChannelAttention(4, backend=b).double()(torch.randn(1, 4, 3, 3, dtype=torch.float64))),
])
def test_float32_only_kernels_refuse_float64_and_auto_passes_them_over(family, call):
    """The Triton TeLU, gate and multi-scale kernels compute in float32: asked for float64
    they are unavailable, saying why (multiscale computed it in float32 silently, 2e-7
    off); "auto" never picks them for float64 (resolve's dtype)."""
    if _backend.unavailable_reason(family, "triton", CPU) is None:
        with pytest.raises(dk.BackendUnavailable, match="compute in float32; float64 inputs run on"):
            call("triton")
    assert _backend.resolve(family, "auto", CPU, torch.float64) != "triton"
    assert call("auto").dtype == torch.float64


def test_multiscale_dtype_and_mismatch_messages():
    with pytest.raises(TypeError, match=r"tensors\[0\] must be a floating-point tensor, got dtype torch.int32"):
        dk.multiscale_concat([torch.ones(1, 2, 4, 4, dtype=torch.int32)], [1])
    with pytest.raises(ValueError, match=r"tensors\[1\] has batch size 2, tensors\[0\] has 1"):
        dk.multiscale_concat([torch.ones(1, 2, 4, 4), torch.ones(2, 2, 2, 2)], [1, 2])


def test_unknown_family_is_named_and_no_cuda_means_no_cuda_backends():
    with pytest.raises(ValueError, match="family must be one of .* got 'nope'"):
        dk.available_backends("nope", "cpu")
    if not torch.cuda.is_available():  # Triton was listed for "cuda" on a CPU-only torch
        assert dk.available_backends("telu", "cuda") == []


def test_module_reprs_show_fused_and_backend():
    """A printed model says which path each gate module takes (TeLU and CDFA already did)."""
    text = repr(dk.CBATGates(8, fused=False, backend="reference"))
    assert text.count("fused=False, backend='reference'") >= 4  # the chain and each gate in it
    assert "channels=8, fused=False" in text
    assert "fused=True, backend='auto'" in repr(dk.TeLU())


@pytest.mark.parametrize("name", ["ChannelAttention", "SpatialAttention", "CBAM", "ELAT", "CBATGates"])
def test_fused_gates_take_float64_x_with_float32_parameters(name):
    """README, "Mixed dtypes are accepted": a fused gate module computes a float64 x in
    float64 with its float32 parameters cast, returns float64 and gives float32 parameter
    gradients; the values are the plain formula's on the same parameters cast to float64.
    The plain module refuses the mismatch (as nn.Conv2d does)."""
    torch.manual_seed(0)
    make = getattr(dk, name)
    args = () if name == "SpatialAttention" else (16,)
    fused = make(*args, fused=True, backend="cpu")
    plain64 = make(*args, fused=False).double()
    plain64.load_state_dict(fused.state_dict())
    x = torch.randn(2, 16, 7, 9, dtype=torch.float64, requires_grad=True)
    y = fused(x)
    y.square().sum().backward()
    x64 = x.detach().clone().requires_grad_()
    y64 = plain64(x64)
    y64.square().sum().backward()
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y64, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x64.grad, rtol=1e-9, atol=1e-11)
    for (pname, p), p64 in zip(fused.named_parameters(), plain64.parameters()):
        assert p.grad.dtype == torch.float32, pname
        torch.testing.assert_close(p.grad, p64.grad.float(), rtol=1e-5, atol=1e-6, msg=pname)
    with pytest.raises(RuntimeError):
        make(*args, fused=False)(x.detach())


def test_reference_dispersive_refuses_what_cannot_fit(monkeypatch):
    """backend="reference" builds N×N matrices; a call that cannot fit the device's whole
    memory is a MemoryError naming N and the sizes, before any allocation (the process was
    OOM-killed without a message: a fused=False model at pixel granularity of f1 and the
    paper's batch is N = 131,072). A call that fits is unchanged, and so are the fused
    backends; a fused=False model says which option to change."""
    from disseg_kernels.ops import dispersive as ops_dispersive
    from models import DispersiveConfig, MedDisSegStage1

    z = torch.empty(131072, 64)
    monkeypatch.setattr(ops_dispersive, "_device_memory_bytes", lambda device: 64 * 2**30)  # any host
    with pytest.raises(MemoryError, match=r"N = 131072 needs at least 275 GB \(4·N² values of 4 bytes\), more "
                                          r"than this cpu device's 68.7 GB"):
        dk.dispersive_loss(z, backend="reference")
    monkeypatch.setattr(ops_dispersive, "_device_memory_bytes", lambda device: 1_000_000)
    small = torch.randn(200, 3, requires_grad=True)  # 4·200²·4 = 640 kB: fits
    dk.dispersive_loss(small, backend="reference").backward()
    with pytest.raises(MemoryError, match="N = 600 needs at least 0.00576 GB"):
        dk.dispersive_loss(torch.randn(600, 3), backend="reference")
    torch.testing.assert_close(dk.dispersive_loss(torch.ones(600, 3), backend="cpu"), torch.tensor(0.0))
    cfg = DispersiveConfig(feature="f1", granularity="pixel")
    x = torch.randn(2, 3, 64, 64)  # f1 at stride 2: N = 2·32·32 = 2048 rows
    with pytest.raises(MemoryError, match=r"fused=False computes the dispersive loss in plain PyTorch .*"
                                          r"N = 2048 .* at granularity 'pixel' of f1 use fused=True"):
        MedDisSegStage1("resnet18", fused=False, dispersive=cfg).train()(x)
    assert MedDisSegStage1("resnet18", fused=True, dispersive=cfg).train()(x).disp_loss.isfinite()


@pytest.mark.parametrize("backend", _backends("dispersive"))
@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_l2sq", "infonce_cosine", "hinge", "covariance"])
def test_dispersive_rows_of_length_zero_agree_with_the_reference(backend, variant):
    """z of shape (N, 0): every pair is at the same distance, so the spec's formula gives
    -1/τ for cosine (d = 1 - 0), ε² for the hinge (d = 0) and 0 otherwise. The fused
    backends answered 0 for all five (the reference, the bank and distributed losses did
    not)."""
    z = torch.empty(5, 0, requires_grad=True)
    want = {"infonce_cosine": -1 / 0.4, "hinge": 1.5**2}.get(variant, 0.0)
    for diagonal in ("exclude", "include"):
        loss = dk.dispersive_loss(z, variant, tau=0.4, margin=1.5, diagonal=diagonal, backend=backend)
        ref = dk.dispersive_loss(z, variant, tau=0.4, margin=1.5, diagonal=diagonal, backend="reference")
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(loss, torch.tensor(want))
        loss.backward()
        assert z.grad.shape == (5, 0)


@pytest.mark.parametrize("backend", _backends("multiscale"))
def test_multiscale_promotes_mixed_dtypes_like_cat(backend):
    """A bf16 map (an autocast convolution's output) next to a float32 skip: the result is
    float32, as F.interpolate + torch.cat give, with each gradient in its input's dtype
    (it was a ValueError, on the reference backend too)."""
    torch.manual_seed(0)
    a = torch.randn(2, 3, 8, 6, requires_grad=True)
    b = torch.randn(2, 2, 4, 3, dtype=torch.bfloat16, requires_grad=True)
    y = dk.multiscale_concat((a, b), (1, 2), backend=backend)
    ref = dk.multiscale_concat([a, b.float()], [1, 2], backend="reference")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref)
    y.square().sum().backward()
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", _backends("window_attention"))
def test_window_attention_promotes_mixed_dtypes(backend):
    """Under CPU bf16 autocast a Linear's bf16 v met float32 logits: the fused op raised a
    TypeError where the plain formula runs. Both are now computed in the promoted dtype."""
    from disseg_kernels.reference.window_attention import window_attention_reference

    torch.manual_seed(0)
    v = torch.randn(1, 4, 5, 6, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(1, 2, 30, 9, 9, requires_grad=True)
    y = dk.window_attention(v, logits, backend=backend)
    ref = window_attention_reference(v.detach().float(), logits.detach())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert v.grad.dtype == torch.bfloat16 and logits.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(dk.window_attention(v, logits, backend=backend)).all()


@pytest.mark.parametrize("backend", _backends("window_attention"))
def test_window_attention_under_autocast_gives_the_autocast_dtype(backend):
    """Under CPU bf16 autocast the reference's last step is an autocast matmul, so it
    returns bf16 for float32 (or mixed) inputs; the fused op returned float32, so a model
    switching fused=True changed its dtypes. It now rounds its float32-accumulated result
    to bf16, and float64 inputs (which autocast leaves alone) stay float64."""
    from disseg_kernels.reference.window_attention import window_attention_reference

    torch.manual_seed(0)
    v = torch.randn(1, 4, 5, 6, requires_grad=True)
    logits = torch.randn(1, 2, 30, 9, 9, requires_grad=True)
    exact = window_attention_reference(v.detach().double(), logits.detach().double())
    for v_dtype in (torch.float32, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = dk.window_attention(v.to(v_dtype), logits, backend=backend)
            ref = window_attention_reference(v.to(v_dtype), logits)
        assert y.dtype == ref.dtype == torch.bfloat16, (v_dtype, y.dtype, ref.dtype)
        err = (y.double() - exact).abs().max().item()
        ref_err = (ref.double() - exact).abs().max().item()
        assert err <= 2 * ref_err, (v_dtype, err, ref_err)
        (dv,) = torch.autograd.grad(y.float().sum(), v)
        assert dv.dtype == torch.float32 and torch.isfinite(dv).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64 = dk.window_attention(v.detach().double(), logits.detach().double(), backend=backend)
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, exact)


def test_integer_like_arguments_and_container_types():
    """NumPy integers and 0-d integer tensors are integers (F.unfold / F.interpolate take
    them; the message used to say "must be an odd int, got np.int64(3)"); one tensor where
    a sequence belongs is named as such (it was reported as tensors[0] of the wrong rank)."""
    np = pytest.importorskip("numpy")
    v, logits = torch.randn(1, 4, 5, 6), torch.randn(1, 2, 30, 9, 9)
    torch.testing.assert_close(dk.window_attention(v, logits, np.int64(3)), dk.window_attention(v, logits, 3))
    torch.testing.assert_close(dk.window_attention(v, logits, torch.tensor(3)), dk.window_attention(v, logits, 3))
    with pytest.raises(ValueError, match="kernel_size must be an odd int ≥ 1, got 3.0"):
        dk.window_attention(v, logits, 3.0)
    a, b = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(dk.multiscale_concat([a, b], [1, np.int64(2)]), dk.multiscale_concat([a, b], [1, 2]))
    with pytest.raises(TypeError, match=r"tensors must be a sequence of \(B, C, H, W\) tensors, got one Tensor"):
        dk.multiscale_concat(a, [1])
    # any sequence or iterable still works (a range, a generator, a NumPy array of scales)
    want = dk.multiscale_concat([a, b], [1, 2])
    torch.testing.assert_close(dk.multiscale_concat((t for t in (a, b)), range(1, 3)), want)
    torch.testing.assert_close(dk.multiscale_concat([a, b], np.array([1, 2])), want)
    with pytest.raises(ValueError, match=r"scales\[1\] must be an integer ≥ 1, got 2.0"):
        dk.multiscale_concat([a, b], [1, 2.0])
