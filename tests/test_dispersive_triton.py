"""Triton dispersive kernels, path by path (disseg_kernels/triton/dispersive.py).

tests/test_dispersive.py checks the public op on every backend; this file forces each of the
Triton kernels' code paths (the row-block online-logsumexp kernel, its split output columns
for D > 256, its exact-difference mode for D <= 8, the float64 split-D Gram path, the
autotuned launch) on shapes that the public dispatch would not send there, and checks them
against the float64 reference. Without a GPU it runs under TRITON_INTERPRET=1 at small
sizes (tests/conftest.py sets it).
"""

from __future__ import annotations

import itertools
import os
import math

import pytest
import torch

from disseg_kernels._backend import unavailable_reason
from disseg_kernels.ops._autograd import saved_grad_dtype
from disseg_kernels.reference.dispersive import VARIANTS, dispersive_loss_reference, eager_dispersive_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_reason = unavailable_reason("dispersive", "triton", torch.device(DEVICE))
pytestmark = pytest.mark.skipif(_reason is not None, reason=str(_reason))

if _reason is None:
    import triton

    from disseg_kernels.triton import dispersive as tdisp


def _ref(z, code, tau=0.5, margin=1.0, include=False, scale_by_dim=False):
    z64 = z.detach().cpu().double().requires_grad_(True)
    loss = dispersive_loss_reference(
        z64, VARIANTS[code], tau, margin, "include" if include else "exclude", scale_by_dim
    )
    (grad,) = torch.autograd.grad(loss, z64)
    return loss.detach(), grad


def _z(n, d, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * (scale / math.sqrt(d))
    return z.to(dtype).to(DEVICE)


def _check(z, code, path, tol, **opts):
    loss, grad = tdisp.dispersive_fused_triton(
        z, code, opts.get("tau", 0.5), opts.get("margin", 1.0), opts.get("include", False),
        opts.get("scale_by_dim", False), True, _path=path,
    )
    ref, ref_g = _ref(z, code, **opts)
    assert loss.dtype == (torch.float32 if z.dtype in (torch.float16, torch.bfloat16) else z.dtype)
    assert grad.dtype == saved_grad_dtype(z.dtype) and grad.shape == z.shape  # float32 for float16
    assert torch.isfinite(grad).all()
    assert abs(float(loss) - float(ref)) <= tol * max(1.0, abs(float(ref))), (float(loss), float(ref))
    gscale = float(ref_g.abs().max())
    err = float((grad.cpu().double() - ref_g).abs().max())
    assert err <= tol * gscale + 1e-12, (err, gscale)
    return loss, grad


@pytest.mark.parametrize("code", range(4))
@pytest.mark.parametrize("path", ["rows", "small"])
@pytest.mark.parametrize("include,scale_by_dim", [(False, False), (True, True)])
def test_both_paths_float64_exact(code, path, include, scale_by_dim):
    """Both kernel paths compute the spec in float64 to ~1e-10 (odd N across two tiles)."""
    z = _z(67 if path == "rows" else 37, 19, torch.float64, seed=code, scale=2.0)
    _check(z, code, path, 1e-9, tau=0.37, margin=0.8, include=include, scale_by_dim=scale_by_dim)


@pytest.mark.parametrize("code", range(4))
def test_rows_path_split_output_columns(code):
    """D > 256: the Gram tile loops over 64-wide feature chunks and the gradient columns are
    split over a second grid axis (D = 300: a ragged last chunk)."""
    _check(_z(70, 300, seed=1, scale=1.5), code, "rows", 2e-5)


@pytest.mark.parametrize("code", range(4))
def test_rows_path_exact_differences_small_d(code):
    """D <= 8: exact differences, no Gram cancellation, for close points on a line."""
    _check(_z(150, 1, seed=2), code, "rows", 2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("code", [0, 1, 3])
def test_rows_path_half_inputs(dtype, code):
    """bf16/fp16 read directly (tensor-core operands), fp32 accumulation."""
    _check(_z(80, 40, dtype, seed=3, scale=2.0), code, "rows", 2e-2)


def _rows_vs_eager(z, code, **opts):
    """(Triton rows path's, eager float32's) largest gradient error against float64, relative
    to the largest gradient entry. Eager (torch.cdist, its Gram form at N > 25) has the same
    float32 Gram noise in d² as the kernel: the bar is twice its error."""
    tau = opts.get("tau", 0.5)
    loss, grad = tdisp.dispersive_fused_triton(z, code, tau, 1.0, False, False, True, _path="rows")
    assert torch.isfinite(grad).all()
    _, ref_g = _ref(z, code, tau=tau)
    ze = z.detach().cpu().clone().requires_grad_(True)
    eager_dispersive_loss(ze, VARIANTS[code], tau=tau).backward()
    scale = float(ref_g.abs().max())
    return (float((grad.cpu().double() - ref_g).abs().max()) / scale,
            float((ze.grad.double() - ref_g).abs().max()) / scale)


def test_rows_path_duplicate_rows_finite():
    """Duplicate rows through the Gram trick: finite, and the pair contributes nothing, or
    as little as eager's float32 Gram noise lets it (within twice eager's error)."""
    base = _z(40, 16, seed=4)
    z = torch.cat([base, base[:30]])  # 70 rows: 30 duplicated pairs, across tiles
    for code in (0, 1, 3):
        got, eager = _rows_vs_eager(z, code)
        assert got <= 2 * eager + 1e-6, (code, got, eager)
    same = base[:1].repeat(70, 1)
    for code in (0, 1, 3):
        _, g = tdisp.dispersive_fused_triton(same, code, 0.5, 1.0, False, False, True, _path="rows")
        assert float(g.abs().max()) == 0.0


@pytest.mark.parametrize("code", [0, 1, 3])
def test_rows_path_near_duplicate_rows_keep_their_gradient(code):
    """Rows 1e-3 apart (at unit norm) dominate the softmax at small tau. A threshold of
    2e-6·(n_i + n_j) on the Gram distance treated them as duplicates and dropped their
    gradient: a relative error of 1.0 against eager's ~0.08 (infonce_l2sq: 1.0 against
    3e-5). A duplicate is now only a pair whose Gram distance is <= 0, as on the CPU."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 32, generator=g, dtype=torch.float64)
    z = z / z.norm(dim=1, keepdim=True)
    z = torch.cat([z, z + 1e-3 * torch.randn(50, 32, generator=g, dtype=torch.float64) / math.sqrt(32)])
    got, eager = _rows_vs_eager(z.float().to(DEVICE), code, tau=0.01)
    assert got <= 2 * eager + 1e-6, (got, eager)


@pytest.mark.parametrize("path,n", [("small", 5), ("rows", 200)])
@pytest.mark.parametrize("gap", [1e-7, 1e-9])
@pytest.mark.parametrize("code", [0, 1, 3])
def test_float64_near_duplicate_rows_keep_their_gradient(path, n, gap, code):
    """Float64 rows `gap` apart at unit norm, in a diagonal tile (rows 0, 1) and in an
    unmasked tile (rows 2, 150 at N = 200). The float64 tiles and the few-samples epilogue
    counted a pair with Gram distance <= 1e-12 (n_i + n_j) as a duplicate (gradient 0),
    and d^2 = n_i + n_j - 2 G_ij keeps no digit of a pair 1e-9 apart: a relative gradient
    error of ~1 where these pairs dominate. The tiles now take a close pair's d^2 from
    exact differences (as the C++ kernels do) and the float64 few-samples path every
    pair's: within 1e-6 of the float64 reference."""
    g = torch.Generator().manual_seed(n)
    z = torch.nn.functional.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)
    z[1] = z[0] + gap * torch.randn(16, generator=g, dtype=torch.float64)
    if n > 150:
        z[150] = z[2] + gap * torch.randn(16, generator=g, dtype=torch.float64)
    z = z.to(DEVICE)
    loss, grad = tdisp.dispersive_fused_triton(z, code, 0.5, 0.5, False, False, True, _path=path)
    ref, ref_g = _ref(z, code, margin=0.5)
    assert float(loss) == pytest.approx(float(ref), rel=1e-12, abs=1e-14)
    assert float((grad.cpu() - ref_g).norm() / ref_g.norm()) <= 1e-6


@pytest.mark.parametrize("code", [0, 1, 3])
def test_small_path_rows_with_a_common_offset(code):
    """Rows 1 ± 0.01 (features after a ReLU share a large common part): d² = n_i + n_j −
    2g_ij from float32 chunk products cancelled ~1e4 in size, and the gradient was 1e-4
    off where eager's is 6e-7 and the C++ kernel's 5e-8. The few-samples path now reads the
    rows as z_i − z_0 (the L2 family ignores a shift): within twice eager's error."""
    g = torch.Generator().manual_seed(0)
    z = (1.0 + 0.01 * torch.randn(8, 1024, generator=g, dtype=torch.float64)).float().to(DEVICE)
    loss, grad = tdisp.dispersive_fused_triton(z, code, 0.5, 1.0, False, False, True, _path="small")
    ref, ref_g = _ref(z, code)
    ze = z.detach().cpu().clone().requires_grad_(True)
    eager_dispersive_loss(ze, VARIANTS[code]).backward()
    got = float((grad.cpu().double() - ref_g).norm() / ref_g.norm())
    eager = float((ze.grad.double() - ref_g).norm() / ref_g.norm())
    assert got <= max(2 * eager, 2e-7), (got, eager)
    assert abs(float(loss) - float(ref)) <= 1e-7 * max(1.0, abs(float(ref)))


def test_small_path_huge_distances_accurate():
    """Few samples, big distances (d/tau ~ 1e4): the float64 Gram keeps the softmax, and so
    the gradient, accurate where a float32 Gram would not."""
    z = _z(6, 4096, seed=5, scale=math.sqrt(4096) * 2)  # unit-variance rows times 2
    _check(z, 1, "small", 1e-6)
    _check(z, 0, "small", 1e-6)


def test_no_grad_returns_empty_and_same_loss():
    z = _z(70, 24, seed=6)
    for path in ("rows", "small"):
        a, ga = tdisp.dispersive_fused_triton(z, 0, 0.5, 1.0, False, False, True, _path=path)
        b, gb = tdisp.dispersive_fused_triton(z, 0, 0.5, 1.0, False, False, False, _path=path)
        assert gb.numel() == 0 and float(a) == pytest.approx(float(b), rel=1e-6)


@pytest.mark.parametrize("code", range(4))
@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("lazy", [False, True])
def test_rows_path_column_splits_float64_exact(code, include, lazy):
    """Columns split over programs (grid axis 2, 128 columns each: 3 splits at N = 300) and
    merged in the epilogue, with and without the lazy rescale: the spec to ~1e-10. A
    wrong merge (a split's shift, a dropped split) or a missed diagonal pair in the
    masked/unmasked tile partition shows here at 1e-2 or worse."""
    z = _z(300, 21, torch.float64, seed=10 + code, scale=3.0)
    z[7] = z[200]  # a duplicate pair in different splits
    loss, grad = tdisp.dispersive_fused_triton(z, code, 0.37, 0.8, include, False, True, _path="rows",
                                               _splits=3, _lazy=lazy)
    ref, ref_g = _ref(z, code, tau=0.37, margin=0.8, include=include)
    assert abs(float(loss) - float(ref)) <= 1e-9 * max(1.0, abs(float(ref)))
    assert float((grad.double().cpu() - ref_g).abs().max()) <= 1e-9 * float(ref_g.abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,splits,cfg", [(161, 1, (64, 64)), (300, 3, (64, 64)), (161, 2, (32, 64)),
                                          (161, 2, (64, 32))])
@pytest.mark.parametrize("code,include", [(0, False), (0, True), (1, False), (1, True), (2, False), (2, True),
                                          (3, False), (3, True)])
def test_rows_path_one_loop_equals_segments(dtype, n, splits, cfg, code, include):
    """The Triton row kernel's ONE_LOOP form (one column loop, the masks in a run-time
    branch; ``_loop="one"``) computes what the four-segment form computes, to the bit: the
    same operations on the same values, only the masked tiles chosen at run time. Ragged N,
    column splits, row blocks that do not line up with the column tiles (the diagonal
    across two or three tiles), both diagonal options; a duplicate pair. And both against
    the float64 spec (the bar of the half-precision row tests). All four row variants."""
    z = _z(n, 40, dtype, seed=n + code, scale=2.0)
    z[5] = z[n - 3]
    c = {"BLOCK_M": cfg[0], "BLOCK_N": cfg[1], "num_warps": 4, "num_stages": 1}
    out = {}
    for loop in ("segments", "one"):
        out[loop] = tdisp.dispersive_fused_triton(z, code, 0.5, 1.0, include, False, True, _path="rows",
                                                  _splits=splits, _config=c, _loop=loop)
    assert torch.equal(out["one"][0], out["segments"][0])
    assert torch.equal(out["one"][1], out["segments"][1])
    ref, ref_g = _ref(z, code, include=include)
    loss, grad = out["one"]
    assert abs(float(loss) - float(ref)) <= 2e-2 * max(1.0, abs(float(ref)))
    assert float((grad.double().cpu() - ref_g).abs().max()) <= 2e-2 * float(ref_g.abs().max())


def test_rows_loop_choice(monkeypatch):
    """DISSEG_TRITON_LOOP / ``_loop`` pick the column loop ("segments" by default); any other
    name is an error naming the choices; the form applies to the InfoNCE variants and the
    hinge on the tensor-core layout without the lazy rescale."""
    assert tdisp._rows_loop_choice(None) == "segments"
    monkeypatch.setenv("DISSEG_TRITON_LOOP", "one")
    assert tdisp._rows_loop_choice(None) == "one"
    monkeypatch.setenv("DISSEG_TRITON_LOOP", "single")
    with pytest.raises(ValueError, match="DISSEG_TRITON_LOOP.*'single'"):
        tdisp._rows_loop_choice(None)
    assert all(tdisp._one_loop_applies(code, True, 0, False) for code in range(4))
    assert not tdisp._one_loop_applies(4, True, 0, False)  # covariance has no row kernel
    assert not tdisp._one_loop_applies(0, False, 0, False) and not tdisp._one_loop_applies(0, True, 5, False)
    assert not tdisp._one_loop_applies(0, True, 0, True)


@pytest.mark.parametrize("n,splits", [(65, 1), (300, 1), (300, 3), (540, 4), (1000, 3)])
@pytest.mark.parametrize("code,include", [(0, False), (0, True), (1, False), (1, True)])
def test_rows_path_sm90_schedule_float64_exact(monkeypatch, n, splits, code, include):
    """``kernel="sm90"``'s host side and schedule, on the CPU: ``tests/sm90_schedule.py``
    models the Gluon kernel's control flow (programs, split bounds, the prologue / loop /
    last-tile order, which tiles are masked) and stands in for its launch, in float64.
    Against the spec to 1e-9: a dropped or doubled tile, a diagonal pair in an unmasked
    tile, a wrong last-split bound or a bad one-tile-tail fold (N = 540 with 4 splits:
    256-column splits and a 28-column tail, folded into the previous split) is off by
    1e-3 or more. N = 65 is the smallest the kernel takes (two tiles, one of one column)."""
    from disseg_kernels.triton import dispersive_sm90
    from sm90_schedule import launch_model

    seen = []

    def launch(*args):
        seen.append(args[8])  # splits
        launch_model(*args)

    monkeypatch.setattr(dispersive_sm90, "eligible", lambda *a: None)
    monkeypatch.setattr(dispersive_sm90, "launch", launch)
    z = _z(n, 24, torch.float64, seed=20 + n, scale=3.0)
    z[n // 3] = z[n - 2]  # a duplicate pair, in different tiles
    loss, grad = tdisp.dispersive_fused_triton(z, code, 0.37, 1.0, include, False, True, _path="rows",
                                               _splits=splits, _kernel="sm90")
    assert seen, "the sm90 launch was not used"
    if (n, splits) == (540, 4):
        assert seen == [2]
    ref, ref_g = _ref(z, code, tau=0.37, include=include)
    assert abs(float(loss) - float(ref)) <= 1e-9 * max(1.0, abs(float(ref)))
    assert float((grad.double().cpu() - ref_g).abs().max()) <= 1e-9 * float(ref_g.abs().max())


def test_sm90_schedule_model_catches_a_one_tile_split():
    """The schedule model refuses what the kernel cannot run (a split of one column tile:
    its loop would run once and then take the same tile again as the last one) through
    the real launch's ``check_splits``: ``_rows_path``'s folding of a one-tile tail and its
    128-column split quantum are what keep such splits out."""
    from sm90_schedule import launch_model

    z = _z(64 + 128, 16, torch.float64)
    out, stats = torch.empty(2, 192, 16, dtype=torch.float64), torch.empty(2, 192, dtype=torch.float64)
    params = torch.tensor([1.0, 2.0, 1.0, 1e-12], dtype=torch.float64)
    with pytest.raises(ValueError, match="two or more column tiles"):
        launch_model(z, z.square().sum(1), out, stats, stats.clone(), 192, 16, 128, 2, params, 0, False)
    # an inner split of one tile (col_chunk = 64; _rows_path's quantum of 128 keeps it out)
    with pytest.raises(ValueError, match="two or more column tiles.*col_chunk=64"):
        launch_model(z, z.square().sum(1), out, stats, stats.clone(), 192, 16, 64, 2, params, 0, False)


def test_sm90_kernel_choice_and_its_errors(monkeypatch):
    """The row kernel is chosen by ``_kernel`` or DISSEG_TRITON_ROWS_KERNEL ("triton" by
    default); a name outside the list, or "sm90" where it cannot run, is an error that
    says why (here: a CPU tensor, float32, hinge, no gradient, D = 8, N = 64)."""
    from disseg_kernels.triton import dispersive_sm90

    assert tdisp._rows_kernel_choice(None) == "triton"
    monkeypatch.setenv("DISSEG_TRITON_ROWS_KERNEL", "sm90")
    assert tdisp._rows_kernel_choice(None) == "sm90"
    monkeypatch.setenv("DISSEG_TRITON_ROWS_KERNEL", "wgmma")
    with pytest.raises(ValueError, match="DISSEG_TRITON_ROWS_KERNEL.*'wgmma'"):
        tdisp._rows_kernel_choice(None)
    monkeypatch.delenv("DISSEG_TRITON_ROWS_KERNEL")
    z = _z(100, 32)
    with pytest.raises(ValueError, match="sm90 row kernel cannot run"):
        tdisp.dispersive_fused_triton(z, 0, 0.5, 1.0, False, False, True, _path="rows", _kernel="sm90")
    if dispersive_sm90._IMPORT_ERROR is None:
        fake = torch.empty(100, 32, dtype=torch.bfloat16, device="meta")
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        for zz, code, need_grad, match in (
            (fake.float(), 0, True, "bfloat16"), (fake, 3, True, "infonce_l2sq only"),
            (fake, 0, False, "always computes the gradient"), (fake[:, :8], 0, True, "got D = 8"),
            (fake[:64], 0, True, "N > 64"),
        ):
            why = dispersive_sm90.eligible(_CudaLike(zz), code, need_grad)
            assert why is not None and match in why, why


class _CudaLike:
    """A meta tensor that reports a CUDA device (eligible() reads only attributes)."""

    def __init__(self, t):
        self._t = t
        self.device = torch.device("cuda")
        self.dtype = t.dtype
        self.shape = t.shape

    def is_contiguous(self):
        return self._t.is_contiguous()

    def data_ptr(self):
        return 0


@pytest.mark.parametrize("block_m,block_n", [(32, 64), (64, 32)])
def test_rows_path_tile_partition(block_m, block_n):
    """Row blocks that do not line up with the column tiles (32-row blocks over 64-wide
    tiles, and 64-row blocks over 32-wide tiles, where the diagonal spans three tiles):
    every diagonal pair lands in a masked tile, every tile is visited once."""
    z = _z(161, 13, torch.float64, seed=11, scale=2.0)
    cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 1}
    for code, include in ((0, False), (1, True)):
        loss, grad = tdisp.dispersive_fused_triton(z, code, 0.5, 1.0, include, False, True, _path="rows",
                                                   _splits=2, _config=cfg)
        ref, ref_g = _ref(z, code, include=include)
        assert abs(float(loss) - float(ref)) <= 1e-9 * max(1.0, abs(float(ref)))
        assert float((grad.double().cpu() - ref_g).abs().max()) <= 1e-9 * float(ref_g.abs().max())


def test_rows_path_lazy_rescale_wide_logit_range():
    """The lazy rescale keeps a row's shift until its maximum grows by 2^8: with
    clusters at very different scales (logits from about -1e4 to -1) the shifts grow
    several times within a row and p reaches up to 256 between rescales; float32 results
    match the non-lazy kernel's error against float64."""
    g = torch.Generator().manual_seed(12)
    z = torch.randn(200, 16, generator=g, dtype=torch.float64)
    z = z * torch.logspace(-2, 1.5, 200, dtype=torch.float64)[torch.randperm(200, generator=g)][:, None]
    z32 = z.float().to(DEVICE)
    ref, ref_g = _ref(z32, 0)
    errs = []
    for lazy in (False, True):
        loss, grad = tdisp.dispersive_fused_triton(z32, 0, 0.5, 1.0, False, False, True, _path="rows",
                                                   _splits=1, _lazy=lazy)
        assert abs(float(loss) - float(ref)) <= 1e-5 * max(1.0, abs(float(ref)))
        errs.append(float((grad.double().cpu() - ref_g).abs().max()) / float(ref_g.abs().max()))
    assert errs[1] <= 2 * errs[0] + 1e-6, errs


def test_split_count_choice(monkeypatch):
    """CPU tensors run one split; DISSEG_TRITON_SPLITS forces a count (clamped to the
    128-column chunks there are) and a bad value names the variable."""
    dev = torch.device("cpu")
    monkeypatch.delenv("DISSEG_TRITON_SPLITS", raising=False)
    assert tdisp._num_splits(16384, 256, 1, dev) == 1
    monkeypatch.setenv("DISSEG_TRITON_SPLITS", "4")
    assert tdisp._num_splits(16384, 256, 1, dev) == 4
    assert tdisp._num_splits(200, 256, 1, dev) == 2
    # the policy on an H200 (132 SMs): one program per SM, no split once the row blocks
    # fill the GPU (N = 16,384 at D = 128 measured 17% slower split in two), splits when few
    assert tdisp._splits_for(16384, 128, 1, 132) == 1
    assert tdisp._splits_for(65536, 128, 1, 132) == 1
    assert tdisp._splits_for(8192, 128, 1, 132) == 2
    assert tdisp._splits_for(2048, 1024, 1, 132) > 1
    monkeypatch.setenv("DISSEG_TRITON_SPLITS", "two")
    with pytest.raises(ValueError, match="DISSEG_TRITON_SPLITS"):
        tdisp._num_splits(16384, 256, 1, dev)


def test_tile_sweep_benchmark_runs(tmp_path):
    """benchmarks/bench_dispersive_tiles.py (the GPU tuning sweep) runs end to end on the
    interpreter, checks every configuration against the default launch and writes its
    table: a sweep that reported a wrong-but-fast configuration would mislead tuning."""
    from benchmarks import bench_dispersive_tiles

    rows = bench_dispersive_tiles.main(["--quick", "--device", DEVICE, "--out-dir", str(tmp_path)])
    assert len(rows) == 10 and all(r.get("ms", 0) > 0 for r in rows)
    assert not [r for r in rows if r.get("note")], [r["note"] for r in rows if r.get("note")]
    assert len(list(tmp_path.glob("dispersive_tiles_*.md"))) == 1


def test_autotuned_launch(monkeypatch):
    """The autotuned launch (the GPU default) passes the same arguments as the fixed one."""
    one = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    monkeypatch.setattr(tdisp, "_rows_configs", lambda d_pad, fma=False: one)
    monkeypatch.setattr(tdisp, "_TUNED", {})
    z = _z(70, 24, seed=7)
    a, ga = tdisp.dispersive_fused_triton(z, 2, 0.5, 1.0, False, False, True, _path="rows", _autotune=True)
    b, gb = tdisp.dispersive_fused_triton(z, 2, 0.5, 1.0, False, False, True, _path="rows", _autotune=False)
    assert float(a) == float(b) and torch.equal(ga, gb)


def test_row_kernel_parameters_are_copied_once(monkeypatch):
    """The row kernel's scalar parameters (scale, 1/τ, margin, duplicate threshold) reach the
    device once per distinct value set: a per-call torch.tensor(...).to(cuda) is a blocking
    copy, a stream sync on every loss call (the host then waits for the GPU to drain) and a
    failure under CUDA-graph capture. Protects: a second call with the same options creates
    no tensor from Python data, other options get their own entry, and values are right."""
    monkeypatch.setattr(tdisp, "_PARAMS_CACHE", {})
    z = _z(70, 24, seed=3)
    tdisp.dispersive_fused_triton(z, 0, 0.5, 1.0, False, False, True, _path="rows", _autotune=False)
    assert len(tdisp._PARAMS_CACHE) == 1
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real(*a, **k))
    loss, _ = tdisp.dispersive_fused_triton(z, 0, 0.5, 1.0, False, False, True, _path="rows", _autotune=False)
    assert made == [] and len(tdisp._PARAMS_CACHE) == 1
    assert float(loss) == pytest.approx(float(_ref(z, 0)[0]), rel=1e-5)
    monkeypatch.setattr(torch, "tensor", real)
    tdisp.dispersive_fused_triton(z, 0, 0.25, 1.0, False, False, True, _path="rows", _autotune=False)
    assert len(tdisp._PARAMS_CACHE) == 2
    (params,) = [t for k, t in tdisp._PARAMS_CACHE.items() if k[0][1] == 4.0]
    assert params.tolist()[:3] == [1.0, 4.0, 1.0]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(z=torch.zeros(4, 3, dtype=torch.int32)), "dtype"),
        (dict(z=torch.zeros(1, 3)), "N >= 2"),
        (dict(z=torch.zeros(4, 3).t()), "contiguous"),
        (dict(variant_code=7), "variant_code"),
        (dict(tau=0.0), "tau"),
        (dict(margin=-1.0), "margin"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(z=torch.zeros(4, 3), variant_code=0, tau=0.5, margin=1.0, include_diagonal=False,
                scale_by_dim=False, need_grad=True)
    args.update(kwargs)
    args["z"] = args["z"].to(DEVICE)
    with pytest.raises((ValueError, TypeError), match=match):
        tdisp.dispersive_fused_triton(**args)


def test_block_choice_covers_every_width():
    """Every D gets tensor-core-legal blocks (>= 16) and the split-D Gram chunking covers D."""
    for d in itertools.chain(range(1, 40), [63, 64, 65, 255, 256, 257, 1000, 262144]):
        d_pad = max(16, triton.next_power_of_2(d))
        assert d_pad >= d and d_pad >= 16
        assert tdisp._rows_configs(d_pad) and tdisp._rows_configs(d_pad, fma=True)
        for fma in (False, True):
            single, block_k, block_do = tdisp._layout(d_pad, fma)
            assert block_k >= 16 and block_do >= 16 and (not single or block_k == block_do == d_pad)


def test_default_blocks_compile_without_spills_for_sm90():
    """The fixed default blocks (DISSEG_TRITON_AUTOTUNE=0, and the autotuner's first
    choice) compile for sm_90 with no local-memory spills, for bf16 (tensor cores, D in
    one tile) and float32 (CUDA-core FMA dots, chunked D), at D = 64, 128, 256, 512.
    Protects against the failure found with this check: fp32 with all of D in one tile
    gave ptxas 32 registers and 8-23 KB of local memory per thread, and bf16 at D = 256
    spilled 312 B with the old 64x64/4-warp default. Compiled on the CPU with Triton's
    bundled ptxas (no GPU needed), in a process without TRITON_INTERPRET."""
    _sm90_compile_check("compile_check('defaults', ('bfloat16', 'float32'), ('segments',))", max_stack=8, expect=8)


def test_one_loop_form_compiles_without_serialised_wgmma_for_sm90():
    """The Triton row kernel's ONE_LOOP form (``_loop="one"``) at the default blocks, bf16,
    D = 64 and 128: no spills, and ptxas does not serialise its wgmmas, where the
    four-segment form's are (C7515: its possibly-empty segment loops set the accumulator's
    registers on paths where a wgmma may be in flight). D = 256 is left out: with Triton
    3.9 its one-loop form spills 120 B (3.6, the GPU image's, does not)."""
    _sm90_compile_check("[r for r in compile_check('defaults', ('bfloat16',), ('one',)) if r['D'] <= 128]",
                        max_stack=0, expect=2, serialised_ok=False)


def _sm90_compile_check(call: str, max_stack: int, expect: int, serialised_ok: bool = True) -> None:
    """Run ``benchmarks.bench_dispersive_tiles.<call>`` in a process without
    TRITON_INTERPRET (the interpreter has no compiler): every variant must compile with at
    most ``max_stack`` bytes of local memory per thread (and, unless ``serialised_ok``,
    with its wgmmas not serialised by ptxas), and ``expect`` variants must."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    code = (f"from benchmarks.bench_dispersive_tiles import compile_check, compile_check_small, "
            f"compile_check_row_stats; rows = {call}; "
            f"bad = [r for r in rows if 'error' in r or r['stack'] > {max_stack} "
            f"or ({not serialised_ok} and r['serialised'] != 'no')]; "
            "print('BAD', bad) if bad else print('CLEAN', len(rows))")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if "SKIP:" in r.stdout:
        pytest.skip(r.stdout.split("SKIP:", 1)[1].strip())
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"CLEAN {expect}" in r.stdout, r.stdout[-3000:]


def test_sm90_gluon_kernel_compiles_without_spills_or_serialised_wgmma():
    """The Gluon Hopper row kernel (dispersive_sm90) compiles for sm_90 at every padded
    width (16 ... 128), both variants and both diagonal options, with no local-memory
    spills and no ptxas note that its wgmmas are serialised. Protects the two schedule
    rules found with this check (docs/dispersive_gpu_floor.md): the weights' bfloat16
    operand is written only after the previous product is waited for (else C7513), and
    the column loop has no zero-trip path (else C7515); either makes ptxas wait for
    every wgmma, which undoes the kernel's overlap. (The Triton row kernel has C7515 at
    D <= 256: ``--compile-check defaults`` reports it.)"""
    _sm90_compile_check("__import__('benchmarks.bench_dispersive_tiles', fromlist=['x'])"
                        ".compile_check_sm90_gluon()", max_stack=0, expect=16, serialised_ok=False)


def test_small_path_kernels_compile_without_spills_for_sm90():
    """The few-samples path's kernels (split float64 Gram, the one-program float64 epilogue
    of each InfoNCE/hinge variant, the C @ Z pass) compile for sm_90 at N padded to 16, 32
    and 64 with no local-memory spills: float64 exp/log/sqrt lower there, and the 64 x 64
    programs use 8 warps (with 4, the epilogue spilled 40 B and C @ Z 448 B per thread)."""
    _sm90_compile_check("compile_check_small()", max_stack=0, expect=18)


def test_row_stats_kernel_compiles_without_spills_for_sm90():
    """The bank and distributed losses' row-statistics kernel (triton/dispersive_rows.py)
    compiles for sm_90 with no local-memory spills in float32 and at most 64 B per thread
    in float64 (8-48 B with its exact close-pair loop), every pair variant, with and
    without the gradient and the self pair. Its old blocks (64-wide feature chunks,
    128-wide output chunks, 4 warps) spilled 4.6-9.0 KB per thread in float32 and
    1.5-2.0 KB in float64."""
    _sm90_compile_check("compile_check_row_stats(('fp32',))", max_stack=0, expect=12)
    _sm90_compile_check("compile_check_row_stats(('fp64',))", max_stack=64, expect=12)


# --------------------------------------------------------------------------------------
# GPU only: sizes the interpreter cannot reach (both GPU backends)

GPU_BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(
        unavailable_reason("dispersive", b, torch.device("cuda")) is not None
        or not torch.cuda.is_available(),
        reason=str(unavailable_reason("dispersive", b, torch.device("cuda")) or "no CUDA device"),
    ), id=b)
    for b in ("triton", "cuda")
]


def _public_loss_and_grad(z, backend, **opts):
    from disseg_kernels import dispersive_loss

    z = z.detach().clone().requires_grad_(True)
    loss = dispersive_loss(z, backend=backend, **opts)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("d", [1, 64])
def test_gpu_n_squared_overflows_int32(backend, d):
    """N = 46,341 (N^2 > 2^31) on the GPU: two clusters of equal rows, closed-form loss and
    gradient (d = 1: exact differences; d = 64: the Gram/tensor-core path)."""
    n, a, tau = 46341, 0.9, 0.5
    z = torch.zeros(n, d, device="cuda")
    z[1::2, 0] = a
    n1 = n // 2
    n0 = n - n1
    loss, grad = _public_loss_and_grad(z, backend, variant="infonce_l2sq", tau=tau)
    e = math.exp(-a * a / tau)
    total = n0 * (n0 - 1) + n1 * (n1 - 1) + 2 * n0 * n1 * e
    # rel 1e-4: each row sums 46,340 float32 terms of two values only, so every addition
    # rounds the same way and the error grows linearly (the H200 gave 1.3e-5 on 2026-11-27,
    # for a float32 block sum of ~720 equal terms per lane); an overflowed int32 offset reads
    # wrong rows and is off by far more.
    assert float(loss) == pytest.approx(math.log(total / (n * (n - 1))), rel=1e-4)
    g0 = -(4 / tau) * n1 * (e / total) * (0 - a)
    g1 = -(4 / tau) * n0 * (e / total) * (a - 0)
    assert float(grad[0, 0]) == pytest.approx(g0, rel=1e-3)
    assert float(grad[1, 0]) == pytest.approx(g1, rel=1e-3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_l2sq"])
def test_gpu_few_samples_huge_d_accurate(backend, variant):
    """N = 8, D = 262,144 unit-variance rows (the model's own use): loss about -1447 for
    infonce_l2 at this scale) and a gradient within 1e-5 of the float64 reference (float64 Gram)."""
    z = torch.randn(8, 262144, generator=torch.Generator().manual_seed(0)).cuda()
    loss, grad = _public_loss_and_grad(z, backend, variant=variant)
    ref, ref_g = _ref(z, VARIANTS.index(variant))
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    rel = float((grad.double().cpu() - ref_g).norm() / ref_g.norm())
    assert rel < 1e-5, rel


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_many_samples_large(backend, dtype):
    """N = 4099, D = 200 (ragged row and column tiles) against the float64 reference."""
    z = _z(4099, 200, dtype, seed=8, scale=3.0).cuda()
    loss, grad = _public_loss_and_grad(z, backend, variant="infonce_l2")
    ref, ref_g = _ref(z, 0)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert float(loss) == pytest.approx(float(ref), rel=tol)
    assert float((grad.double().cpu() - ref_g).abs().max()) <= tol * float(ref_g.abs().max())


_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not _HOPPER, reason="the sm90 Gluon row kernel needs a Hopper GPU (sm_90)")
@pytest.mark.parametrize("n,d,splits", [(300, 128, None), (4099, 40, None), (5000, 64, 3), (540, 128, 4),
                                        (16384, 128, None)])
@pytest.mark.parametrize("code,include", [(0, False), (1, True)])
def test_gpu_sm90_rows_kernel_matches_reference_and_triton(n, d, splits, code, include):
    """The Gluon Hopper row kernel (``_kernel="sm90"``, bf16) against the float64 spec
    (N <= 5000; 2e-2 of the largest gradient, the bf16 bar of the row tests) and against
    the Triton row kernel on the same input (5e-3: both round the weights to bf16 once;
    only the fp32 summation order differs). Ragged last tiles (N = 300, 4099), D not a
    power of two (40), column splits with a folded one-tile tail (540 with 4 splits), and
    N = 16,384 (the Triton kernel only)."""
    z = _z(n, d, torch.bfloat16, seed=n + d, scale=3.0).cuda()
    z[n // 3] = z[n - 2]  # a duplicate pair
    kw = dict(_path="rows", _splits=splits)
    loss, grad = tdisp.dispersive_fused_triton(z, code, 0.5, 1.0, include, False, True, _kernel="sm90", **kw)
    assert torch.isfinite(grad).all()
    t_loss, t_grad = tdisp.dispersive_fused_triton(z, code, 0.5, 1.0, include, False, True, _kernel="triton", **kw)
    gmax = float(t_grad.float().abs().max())
    assert abs(float(loss) - float(t_loss)) <= 5e-3 * max(1.0, abs(float(t_loss)))
    assert float((grad.float() - t_grad.float()).abs().max()) <= 5e-3 * gmax
    if n <= 5000:
        ref, ref_g = _ref(z, code, include=include)
        assert abs(float(loss) - float(ref)) <= 2e-2 * max(1.0, abs(float(ref)))
        assert float((grad.double().cpu() - ref_g).abs().max()) <= 2e-2 * float(ref_g.abs().max())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n,d", [(4099, 128), (16384, 64), (3000, 256)])
@pytest.mark.parametrize("code,include", [(0, False), (1, True), (2, False), (3, True)])
def test_gpu_one_loop_form_matches_segments(n, d, code, include):
    """The Triton row kernel's one-loop form (``_loop="one"``: its wgmmas are not serialised
    at sm_90) against the four-segment form, compiled for the GPU at the autotuned blocks,
    bf16: the same operations on the same values, so equal up to fp32 contraction and
    summation order: the loss to 1e-5, the bf16 gradient to two units in its last place
    (the interpreter test asks for bit equality)."""
    z = _z(n, d, torch.bfloat16, seed=n + d + code, scale=3.0).cuda()
    z[n // 2] = z[7]
    seg = tdisp.dispersive_fused_triton(z, code, 0.5, 1.0, include, False, True, _path="rows", _loop="segments")
    one = tdisp.dispersive_fused_triton(z, code, 0.5, 1.0, include, False, True, _path="rows", _loop="one")
    assert abs(float(one[0]) - float(seg[0])) <= 1e-5 * max(1.0, abs(float(seg[0])))
    g1, g0 = one[1].float(), seg[1].float()
    assert bool(((g1 - g0).abs() <= 2.0**-7 * g0.abs() + 1e-6 * float(g0.abs().max())).all())
