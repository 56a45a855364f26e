"""CPU-specific tests of the C++ dispersive kernel (csrc/dispersive.cpp).

The shared parity grid lives in tests/test_dispersive.py; these cases protect what is
particular to the C++ kernel: the switch between its two regimes (float64 Gram split over
D for N <= 64, symmetric tiles with an online logsumexp above), the round-robin schedule
of the tiles, the per-block rescaling when a block's maximum rises, results that do not
depend on the thread count, and the float64 accuracy of the few-samples regime.
"""

import math

import pytest
import torch

from disseg_kernels._backend import unavailable_reason
from disseg_kernels.reference.dispersive import VARIANTS, dispersive_loss_reference

pytestmark = pytest.mark.skipif(
    unavailable_reason("dispersive", "cpu", torch.device("cpu")) is not None, reason="C++ extension not built"
)

CODES = {v: i for i, v in enumerate(VARIANTS)}


def _fused(z, variant, tau=0.5, margin=1.0, diagonal="exclude", scale_by_dim=False, need_grad=True):
    return torch.ops.disseg.dispersive_fused(
        z.contiguous(), CODES[variant], tau, margin, diagonal == "include", scale_by_dim, need_grad
    )


def _ref(z, variant, tau=0.5, margin=1.0, diagonal="exclude", scale_by_dim=False):
    z64 = z.detach().double().requires_grad_()
    loss = dispersive_loss_reference(z64, variant, tau, margin, diagonal, scale_by_dim)
    (g,) = torch.autograd.grad(loss, z64)
    return loss.detach(), g


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", [64, 65, 130])
def test_float64_exact_on_both_sides_of_the_regime_switch(variant, n):
    """float64 inputs are computed in float64 in both regimes: agreement to ~1e-12."""
    torch.manual_seed(n)
    z = torch.randn(n, 23, dtype=torch.float64)
    for diagonal, scale_by_dim in [("exclude", False), ("include", True)]:
        ref, ref_g = _ref(z, variant, 0.7, 1.5, diagonal, scale_by_dim)
        got, got_g = _fused(z, variant, 0.7, 1.5, diagonal, scale_by_dim)
        assert float(got) == pytest.approx(float(ref), rel=1e-11, abs=1e-12)
        assert _rel(got_g, ref_g) < 1e-10


@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_l2sq", "infonce_cosine", "hinge"])
def test_many_small_tiles_and_rounds(variant, monkeypatch):
    """Blocks of 16 rows over N = 203 (a ragged last block, 16 blocks, 15 rounds): every
    pair counted once per direction, in float64."""
    monkeypatch.setenv("DISSEG_DISPERSIVE_BLOCK", "16")
    torch.manual_seed(1)
    z = torch.randn(203, 9, dtype=torch.float64) * 0.3
    ref, ref_g = _ref(z, variant)
    got, got_g = _fused(z, variant)
    assert float(got) == pytest.approx(float(ref), rel=1e-11, abs=1e-12)
    assert _rel(got_g, ref_g) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_block_maxima_far_apart_rescale_online(dtype, monkeypatch):
    """A tight cluster in late rows and spread-out early rows: the per-block reference
    maxima differ by far more than float32's exp range (88), and a block's maximum rises
    after it has accumulated (the rescaling path). Rows far from everything have
    gradients that underflow to 0, like the reference's."""
    monkeypatch.setenv("DISSEG_DISPERSIVE_BLOCK", "32")
    torch.manual_seed(2)
    n, d = 256, 16
    z = torch.randn(n, d, dtype=torch.float64) * 20.0
    z[200:] = z[200] + 0.05 * torch.randn(56, d, dtype=torch.float64)
    z = z.to(dtype)
    for variant in ["infonce_l2", "infonce_l2sq", "infonce_cosine"]:
        ref, ref_g = _ref(z, variant, tau=0.1)
        got, got_g = _fused(z, variant, tau=0.1)
        tol = 1e-11 if dtype == torch.float64 else 2e-5
        assert float(got) == pytest.approx(float(ref), rel=tol, abs=tol), variant
        assert float((got_g.double() - ref_g).abs().max()) <= tol * 10 * float(ref_g.abs().max()), variant


def test_thread_count_does_not_change_the_result():
    """One thread and all threads: the same tiles, the same loss and gradient."""
    torch.manual_seed(3)
    z = torch.randn(300, 40)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a, ga = _fused(z, "infonce_l2")
    finally:
        torch.set_num_threads(threads)
    b, gb = _fused(z, "infonce_l2")
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    assert _rel(ga, gb) < 1e-5


def test_few_samples_huge_d_float64_accuracy():
    """(8, 262144) float32, infonce_l2sq (distances ~5e5): the float64 Gram gives a
    gradient within ~1e-6 of float64 (a float32 Gram, cdist included, is off by ~6e-3),
    and the loss is finite where log(mean(exp)) underflows."""
    torch.manual_seed(4)
    z = torch.randn(8, 262144)
    ref, ref_g = _ref(z, "infonce_l2sq")
    got, got_g = _fused(z, "infonce_l2sq")
    assert math.isfinite(float(got))
    assert float(got) == pytest.approx(float(ref), rel=1e-7)
    assert _rel(got_g, ref_g) < 1e-5


def test_tiled_regime_duplicate_rows_are_finite():
    """Duplicate rows in the tiled regime: d = 0 exactly (one GEMM code path gives G_ii
    and G_ij), finite loss and gradient, matching the reference."""
    torch.manual_seed(5)
    base = torch.randn(100, 12)
    z = torch.cat([base, base[:40]])  # rows 100..139 duplicate rows 0..39
    for variant in ["infonce_l2", "hinge", "infonce_l2sq"]:
        ref, ref_g = _ref(z, variant)
        got, got_g = _fused(z, variant)
        assert torch.isfinite(got) and torch.isfinite(got_g).all(), variant
        assert float(got) == pytest.approx(float(ref), rel=1e-5), variant
        assert float((got_g.double() - ref_g).abs().max()) <= 1e-4 * float(ref_g.abs().max()), variant


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_in_the_tiled_regime(dtype):
    """Half inputs accumulate in float32 (float64 for l2sq): the result matches the float64
    reference of the same rounded input. The gradient comes back in float32 for float16
    (``saved_grad_dtype``: a float16 one at loss scale 1 flushes small entries to 0)."""
    from disseg_kernels.ops._autograd import saved_grad_dtype

    torch.manual_seed(6)
    z = torch.randn(150, 33).to(dtype)
    for variant in VARIANTS:
        ref, ref_g = _ref(z, variant)
        got, got_g = _fused(z, variant)
        assert got.dtype == torch.float32 and got_g.dtype == saved_grad_dtype(dtype)
        assert float(got) == pytest.approx(float(ref), rel=1e-5, abs=1e-5), variant
        tol = 4 * torch.finfo(dtype).eps * float(ref_g.abs().max())
        assert float((got_g.double() - ref_g).abs().max()) <= tol, variant


def test_loss_only_call_matches():
    """need_grad=False returns an empty gradient and the same loss in both regimes."""
    torch.manual_seed(7)
    for n in (10, 200):
        z = torch.randn(n, 17)
        for variant in VARIANTS:
            a, ga = _fused(z, variant, need_grad=False)
            b, _ = _fused(z, variant)
            assert ga.numel() == 0
            assert float(a) == pytest.approx(float(b), rel=1e-6, abs=1e-7), (n, variant)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(variant=7), "variant"),
        (dict(tau=0.0), "tau"),
        (dict(margin=-1.0), "margin"),
    ],
)
def test_bad_arguments_to_the_operator(kwargs, match):
    """The C++ operator itself names the bad argument and its value."""
    args = dict(variant=0, tau=0.5, margin=1.0)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.disseg.dispersive_fused(torch.randn(4, 3), args["variant"], args["tau"], args["margin"], False, False, True)


@pytest.mark.parametrize("n", [5, 100])  # the few-samples path (N <= 64) and the tiles
@pytest.mark.parametrize("gap", [1e-7, 1e-9])
@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_l2sq", "hinge"])
def test_float64_near_duplicate_rows_keep_their_gradient(n, gap, variant):
    """Two float64 rows `gap` apart at unit norm. The float64 tiles counted a pair with Gram
    distance <= 1e-12 (n_i + n_j) as a duplicate (zero gradient), and the few-samples path
    lost every digit of d^2 = n_i + n_j - 2 G_ij to cancellation: a relative gradient error
    of 0.7-1.0 (found by an audit, 2026-11-28). Close pairs now take d^2 from exact
    differences, as the distributed row kernel already did."""
    g = torch.Generator().manual_seed(n)
    z = torch.nn.functional.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)
    z[1] = z[0] + gap * torch.randn(16, generator=g, dtype=torch.float64)
    ref, ref_g = _ref(z, variant, margin=0.5)
    got, got_g = _fused(z, variant, margin=0.5)
    assert float(got) == pytest.approx(float(ref), rel=1e-12, abs=1e-14)
    assert float((got_g - ref_g).norm() / ref_g.norm()) <= 1e-6
