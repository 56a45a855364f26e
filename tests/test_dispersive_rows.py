"""The fused row statistics (``_row_stats`` of disseg_kernels/distributed.py).

What these tests protect:
- the C++ op ``disseg::dispersive_row_stats`` (backend "cpu") and the Triton kernel
  (backend "triton", under TRITON_INTERPRET=1 here) give the RowStats (m, s, acc) of the
  contract, checked against the pairwise definition in float64 (m + log s is the row
  logsumexp, acc / s the softmax-weighted Σ w (z_i − z_j) or Σ ẑ_j; hinge's plain sums),
  for every pair variant, self_offset None / 0 / k / negative, the self pair dropped or
  included, grad_weight 1 and 2, and odd sizes (n = 1, m = 1, m = 0, n = 0, sizes that
  are not multiples of the tiles, several row and column tiles, the column-group split of
  few rows over many threads);
- float32: the fused kernel is at least as accurate as the PyTorch tiles (error against
  the float64 truth of the same rounded input), with a large common offset and with near
  duplicates;
- dispatch: ``backend=`` reaches ``_row_stats`` from ``dispersive_loss_with_bank`` and
  ``distributed_dispersive_loss``; every backend gives the reference loss and gradient;
  an unavailable backend raises naming it; float64 gradcheck through the fused path.
"""

import math

import pytest
import torch

from disseg_kernels import DistributedDispersiveLoss, dispersive_loss_with_bank, distributed_dispersive_loss
from disseg_kernels._backend import BackendUnavailable
from disseg_kernels.distributed import _row_stats
from disseg_kernels.reference.dispersive_bank import dispersive_loss_bank_reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
PAIR_VARIANTS = ("infonce_l2", "infonce_l2sq", "infonce_cosine", "hinge")
TAU, MARGIN = 0.6, 2.0


def _inputs(n, m, dim, variant, self_offset, seed=0, dtype=torch.float64):
    """rows (n, D), cols (m, D); with self_offset, cols[i + off] = rows[i] where in range;
    one more column duplicates row 0 without being its self pair (d = 0, weight 0)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, dim, generator=g, dtype=torch.float64)
    cols = torch.randn(m, dim, generator=g, dtype=torch.float64)
    if self_offset is not None:
        for i in range(n):
            if 0 <= i + self_offset < m:
                cols[i + self_offset] = rows[i]
    if n and m >= 2:
        j = m - 1
        if self_offset is None or not 0 <= j - self_offset < n:  # column j is nobody's self
            cols[j] = rows[0]
    if variant == "infonce_cosine":
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cols = cols / cols.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return rows.to(dtype), cols.to(dtype)


def _truth(rows, cols, variant, self_offset, include_diagonal, grad_weight, scale_by_dim=False):
    """(lse or None, s for hinge or None, acc / s or acc) from full matrices, pair by pair, float64."""
    rows, cols = rows.double(), cols.double()
    n, m, dim = rows.shape[0], cols.shape[0], rows.shape[1]
    diff = rows[:, None, :] - cols[None, :, :]
    dist_ = diff.square().sum(-1).sqrt()
    if variant == "infonce_cosine":
        d = 1.0 - rows @ cols.T
    else:
        d = dist_.square() if variant == "infonce_l2sq" else dist_
    if scale_by_dim:
        d = d / dim
    keep = torch.ones(n, m, dtype=torch.bool)
    if self_offset is not None and not include_diagonal:
        for i in range(n):
            if 0 <= i + self_offset < m:
                keep[i, i + self_offset] = False
    inv = torch.where(dist_ > 0, 1.0 / dist_.clamp_min(1e-300), torch.zeros_like(dist_))
    if variant == "hinge":
        h = torch.relu(MARGIN - d) * keep
        w = h * inv * grad_weight
        return None, h.square().sum(1), (w[:, :, None] * diff).sum(1)
    logits = (-d / TAU).masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(logits, dim=1)
    p = torch.exp(logits - lse[:, None]).nan_to_num(0.0)
    if variant == "infonce_cosine":
        return lse, None, (p * grad_weight) @ cols
    w = p * (inv if variant == "infonce_l2" else 2.0 * (dist_ > 0)) * grad_weight
    return lse, None, (w[:, :, None] * diff).sum(1)


def _row_errors(st, truth, variant, per_row=True):
    """(error of m + log s or of s, relative error of acc / s or acc: per row, or relative
    to the largest row when ``per_row`` is False: float32 underflows the rows whose acc
    is ~e^-400 of their s)."""
    lse, s_ref, acc_ref = truth
    m, s, acc = (t.double() for t in st)
    if variant == "hinge":
        e1 = float((s - s_ref).abs().max()) / max(1.0, float(s_ref.abs().max())) if len(s) else 0.0
        got = acc
    else:
        empty = torch.isinf(lse)
        assert torch.equal(torch.isinf(m) & (s == 0), empty), "a row without pairs has m = -inf and s = 0"
        assert not acc[empty].abs().any()
        ok = ~empty
        e1 = float((m[ok] + s[ok].log() - lse[ok]).abs().max()) if ok.any() else 0.0
        got = torch.where(ok[:, None], acc / s.clamp_min(1e-300)[:, None], torch.zeros_like(acc))
    if got.numel() == 0:
        return e1, 0.0
    scale = acc_ref.abs().amax(1, keepdim=True) if per_row else acc_ref.abs().amax()
    scale = scale.clamp_min(1e-300)
    return e1, float(((got - acc_ref).abs() / scale).max())


def _call(rows, cols, variant, self_offset, include_diagonal, grad_weight, backend, need_grad=True, tile=1024,
          scale_by_dim=False):
    return _row_stats(rows, cols, variant, TAU, MARGIN, scale_by_dim, include_diagonal, self_offset, grad_weight,
                      need_grad, tile, backend=backend)


SHAPES = [(7, 13, 5), (1, 1, 3), (1, 0, 4), (0, 5, 3), (3, 2, 1), (300, 290, 33)]


@pytest.mark.parametrize("variant", PAIR_VARIANTS)
@pytest.mark.parametrize("self_offset", [None, 0, 3, -2], ids=["disjoint", "off0", "off3", "off-2"])
@pytest.mark.parametrize("include_diagonal", [False, True], ids=["excl", "incl"])
def test_cpu_kernel_matches_definition_float64(variant, self_offset, include_diagonal):
    """C++ RowStats == the pairwise definition (float64, ~1e-12), both grad weights, odd
    sizes including n = 1, m = 1, m = 0, n = 0, D = 1 and 300 × 290 (two row tiles, two
    column tiles of 256, not multiples)."""
    for n, m, dim in SHAPES:
        rows, cols = _inputs(n, m, dim, variant, self_offset, seed=n + m)
        for gw in (1.0, 2.0):
            st = _call(rows, cols, variant, self_offset, include_diagonal, gw, "cpu")
            assert st.m.shape == (n,) and st.s.shape == (n,) and st.acc.shape == (n, dim)
            e1, e2 = _row_errors(st, _truth(rows, cols, variant, self_offset, include_diagonal, gw), variant)
            assert e1 <= 1e-12 and e2 <= 1e-10, (n, m, dim, gw, e1, e2)


def test_cpu_kernel_many_tiles_and_column_groups(monkeypatch):
    """Every tiling of the C++ kernel gives the definition's statistics: many small tiles
    (DISSEG_DISPERSIVE_BLOCK=16: 7 × 4 ragged tiles), fewer row tiles than threads (the
    column groups, merged online), and the few-rows path (n <= 64: two column tiles, the
    reduction over D split in three chunks across threads)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(threads, 4))
        for block, n, m, dim in (("16", 100, 53, 9), ("64", 70, 150, 9), ("256", 5, 70, 1100)):
            monkeypatch.setenv("DISSEG_DISPERSIVE_BLOCK", block)
            for variant in PAIR_VARIANTS:
                rows, cols = _inputs(n, m, dim, variant, 2, seed=m)
                for inc in (False, True):
                    st = _call(rows, cols, variant, 2, inc, 2.0, "cpu")
                    e1, e2 = _row_errors(st, _truth(rows, cols, variant, 2, inc, 2.0), variant)
                    assert e1 <= 1e-12 and e2 <= 1e-10, (block, variant, n, m, inc, e1, e2)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", PAIR_VARIANTS)
def test_need_grad_false_and_scale_by_dim(variant):
    """need_grad=False: the same m and s, acc of shape (n, 0); scale_by_dim divides d by D."""
    rows, cols = _inputs(9, 11, 6, variant, None, seed=5)
    full = _call(rows, cols, variant, None, False, 1.0, "cpu", scale_by_dim=True)
    lite = _call(rows, cols, variant, None, False, 1.0, "cpu", need_grad=False, scale_by_dim=True)
    assert lite.acc.shape == (9, 0)
    assert torch.equal(full.m, lite.m) and torch.allclose(full.s, lite.s, rtol=1e-14)
    e1, e2 = _row_errors(full, _truth(rows, cols, variant, None, False, 1.0, scale_by_dim=True), variant)
    assert e1 <= 1e-12 and e2 <= 1e-10


def _f32_errors(rows, cols, variant, off, inc, backend):
    truth = _truth(rows.double(), cols.double(), variant, off, inc, 2.0)
    return _row_errors(_call(rows, cols, variant, off, inc, 2.0, backend), truth, variant)


@pytest.mark.parametrize("variant", PAIR_VARIANTS)
@pytest.mark.parametrize("case", ["random", "offset1000", "near_duplicates", "small_norms"])
def test_cpu_kernel_float32_at_least_as_accurate_as_the_tiles(variant, case):
    """float32: the fused kernel's error against the float64 truth (same rounded input)
    is at most twice the PyTorch tiles' (or at float32 level), for random rows, rows with
    a common offset of 1000 (spread 0.3), near-duplicate columns (d ~ 1e-3 ‖z‖), and
    small norms (‖z‖ ~ 0.7: infonce_l2sq's float32 tiles)."""
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(70, 24, generator=g)
    cols = torch.randn(90, 24, generator=g)
    if case == "offset1000":
        rows, cols = rows * 0.3 + 1000.0, cols * 0.3 + 1000.0
    if case == "near_duplicates":
        cols[:70] = rows + 1e-3 * torch.randn(70, 24, generator=g)
    if case == "small_norms":
        rows, cols = rows * 0.15, cols * 0.15
    if variant == "infonce_cosine":
        rows = rows / rows.norm(dim=1, keepdim=True)
        cols = cols / cols.norm(dim=1, keepdim=True)
    off = 0 if case == "random" else None
    ek = _f32_errors(rows, cols, variant, off, False, "cpu")
    er = _f32_errors(rows, cols, variant, off, False, "reference")
    for k, r in zip(ek, er):
        assert k <= max(2.0 * r, 2e-5), (ek, er)


@pytest.mark.parametrize("variant", PAIR_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_triton_kernel_matches_definition(variant, dtype):
    """Triton (interpreter here) RowStats == the definition: self pair dropped, included,
    or absent; D = 20 (one K chunk) and D = 140 (three K chunks, two output chunks)."""
    tol = (1e-11, 1e-9) if dtype == torch.float64 else (2e-4, 2e-4)
    for n, m, dim, off, inc in ((19, 37, 20, 3, False), (19, 37, 20, 0, True), (5, 9, 140, None, False),
                                (1, 1, 3, 0, False), (4, 0, 3, None, False)):
        rows, cols = _inputs(n, m, dim, variant, off, seed=dim, dtype=dtype)
        st = _call(rows, cols, variant, off, inc, 2.0, "triton")
        assert st.m.dtype == dtype and st.acc.shape == (n, dim)
        e1, e2 = _row_errors(st, _truth(rows, cols, variant, off, inc, 2.0), variant,
                             per_row=dtype == torch.float64)
        if variant == "infonce_l2sq" and dtype == torch.float32:
            e1 /= max(1.0, float(_truth(rows, cols, variant, off, inc, 2.0)[0].abs().max()))  # lse ~ d²/τ
        assert e1 <= tol[0] and e2 <= tol[1], (n, m, dim, off, inc, e1, e2)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_l2sq", "hinge"])
def test_float64_near_duplicate_columns_keep_their_weight(backend, variant):
    """float64 rows 1e-9 apart from a column, at unit norm (in the first and in a later
    column tile). The Triton kernel counted Gram distances <= 1e-12 (n_i + n_j) as
    duplicates, weight 0 where these pairs dominate the row; close pairs now take d^2
    from exact differences, as the C++ kernel's do."""
    g = torch.Generator().manual_seed(1)
    rows = torch.nn.functional.normalize(torch.randn(20, 16, generator=g, dtype=torch.float64), dim=1)
    cols = torch.nn.functional.normalize(torch.randn(70, 16, generator=g, dtype=torch.float64), dim=1)
    cols[3] = rows[0] + 1e-9 * torch.randn(16, generator=g, dtype=torch.float64)
    cols[66] = rows[5] + 1e-9 * torch.randn(16, generator=g, dtype=torch.float64)
    st = _call(rows, cols, variant, None, False, 1.0, backend)
    e1, e2 = _row_errors(st, _truth(rows, cols, variant, None, False, 1.0), variant)
    assert e1 <= 1e-11 and e2 <= 1e-6, (e1, e2)


@pytest.mark.parametrize("variant", PAIR_VARIANTS)
def test_bank_loss_every_backend_equals_reference(variant):
    """dispersive_loss_with_bank and distributed_dispersive_loss (no group) with
    backend cpu / triton / reference: the bank reference's value and gradient (float64)."""
    g = torch.Generator().manual_seed(4)
    z = torch.randn(10, 3, 4, generator=g, dtype=torch.float64)
    z[7] = z[2]  # a duplicate pair inside the batch
    bank = torch.randn(13, 12, generator=g, dtype=torch.float64)
    opts = dict(variant=variant, tau=0.4, margin=3.0)
    zr = z.clone().requires_grad_(True)
    ref = dispersive_loss_bank_reference(zr, bank, **opts)
    (gref,) = torch.autograd.grad(ref, zr)
    for backend in ("cpu", "triton", "reference"):
        for fn in (lambda x: dispersive_loss_with_bank(x, bank, backend=backend, **opts),
                   lambda x: distributed_dispersive_loss(x, bank=bank, backend=backend, **opts)):
            zt = z.clone().requires_grad_(True)
            loss = fn(zt)
            loss.backward()
            assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-10, abs=1e-12), backend
            assert torch.allclose(zt.grad, gref, rtol=1e-8, atol=1e-12), (backend, (zt.grad - gref).abs().max())


@pytest.mark.parametrize("variant", PAIR_VARIANTS)
def test_gradcheck_bank_loss_through_the_fused_path(variant):
    """float64 gradcheck of dispersive_loss_with_bank with backend="cpu" (the gradient
    comes from the kernel's acc, the value from its m and s)."""
    g = torch.Generator().manual_seed(8)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(6, 4, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x: dispersive_loss_with_bank(x, bank, variant=variant, tau=0.7, margin=3.0, backend="cpu"), (z,),
        eps=1e-6, atol=1e-8, rtol=1e-6)


def test_backend_errors_name_the_backend():
    """An unknown backend is a ValueError; one the row statistics do not have (cuda) or
    that cannot run here raises BackendUnavailable naming it and why."""
    z = torch.randn(4, 3)
    bank = torch.randn(2, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        dispersive_loss_with_bank(z, bank, backend="fast")
    with pytest.raises(BackendUnavailable, match="backend='cuda'.*dispersive_rows.*no cuda implementation"):
        dispersive_loss_with_bank(z, bank, backend="cuda")
    with pytest.raises(BackendUnavailable, match="backend='cuda'"):
        distributed_dispersive_loss(z, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        DistributedDispersiveLoss(backend="gpu")
    mod = DistributedDispersiveLoss(variant="hinge", backend="reference")
    assert "backend='reference'" in repr(mod)
    assert float(mod(z)) == pytest.approx(float(distributed_dispersive_loss(z, variant="hinge")), rel=1e-6)


def test_model_regime_shape_matches_reference():
    """Few rows of a wide D (the model's regime, scaled down: N = 8, D = 32768, K = 16)
    with float32: fused loss and gradient within float32 accuracy of the float64 reference."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(8, 32768, generator=g)
    bank = torch.randn(16, 32768, generator=g)
    zr = z.double().requires_grad_(True)
    ref = dispersive_loss_bank_reference(zr, bank.double())
    (gref,) = torch.autograd.grad(ref, zr)
    zt = z.clone().requires_grad_(True)
    loss = dispersive_loss_with_bank(zt, bank, backend="cpu")
    loss.backward()
    loss, ref = float(loss.detach()), float(ref.detach())
    assert math.isfinite(loss) and loss == pytest.approx(ref, rel=1e-6)
    assert float((zt.grad.double() - gref).abs().max()) <= 1e-4 * float(gref.abs().max())


def test_opcheck_cpu_op():
    """torch.library.opcheck of disseg::dispersive_row_stats (schema, fake tensor, dispatch)."""
    rows, cols = _inputs(6, 9, 5, "infonce_l2", 2, seed=1)
    for args in ((rows, cols, 0, TAU, MARGIN, False, False, 2, 2.0, True),
                 (rows.float(), cols.float(), 3, TAU, MARGIN, True, True, None, 1.0, False)):
        torch.library.opcheck(torch.ops.disseg.dispersive_row_stats.default, args)


@requires_cuda
@pytest.mark.parametrize("variant", PAIR_VARIANTS)
def test_triton_on_cuda_matches_definition(variant):
    """On a GPU (compiled, not interpreted): float32 RowStats of 300 rows × 700 columns,
    D = 300 (three output chunks), self pair dropped, within float32 accuracy."""
    rows, cols = _inputs(300, 700, 300, variant, 100, seed=3, dtype=torch.float32)
    st = _call(rows.cuda(), cols.cuda(), variant, 100, False, 2.0, "triton")
    e1, e2 = _row_errors(tuple(t.cpu() for t in st), _truth(rows, cols, variant, 100, False, 2.0), variant,
                         per_row=False)
    if variant == "infonce_l2sq":
        e1 /= max(1.0, float(_truth(rows, cols, variant, 100, False, 2.0)[0].abs().max()))
    assert e1 <= 1e-4 and e2 <= 1e-3, (e1, e2)
