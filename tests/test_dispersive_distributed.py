"""Global-batch dispersion under torch.distributed, and the negatives bank.

What these tests protect:
- ``distributed_dispersive_loss`` on 2 and 3 gloo ranks (spawned here, loopback; the 2
  ranks are a ``group=`` subgroup, global ranks 1 and 2):
  the value equals the single-process reference on torch.cat of all ranks' z, and each
  rank's gradient equals its rows of the single-process gradient (float64, 1e-10), for
  every variant, both communication modes (all-gather, ring), both covariance routes,
  diagonal="include" + scale_by_dim, uneven batch sizes, a rank with one sample and a
  rank with none; ``ddp_scale`` multiplies only the gradient, by W;
- a bank shared by the ranks (filled with ``enqueue_global``) gives the bank formula of
  the global batch; two SGD steps with DDP's gradient averaging (``ddp_scale`` cancels
  it; a bank filled after step 1) equal one process on the whole batch;
- the bank formula itself: ``dispersive_loss_bank_reference`` equals the definition
  written as loops over the pairs of a concatenation, the tiled ``dispersive_loss_with_bank``
  equals it (value and gradient), the bank gets no gradient, K = 0 is the spec's loss;
- ``NegativeBank``: FIFO with wrap-around, partial fill, state_dict round trip.

One spawn of 3 processes runs every case (process start-up dominates): the 3-rank cases
on the default group, the 2-rank ones on a subgroup of global ranks 1 and 2; the parent
computes the references and asserts, one test per case.
"""

import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from disseg_kernels import NegativeBank, dispersive_loss, dispersive_loss_with_bank, distributed_dispersive_loss
from disseg_kernels.reference import VARIANTS, dispersive_loss_reference
from disseg_kernels.reference.dispersive_bank import dispersive_loss_bank_reference

D = 6
SIZES = {2: [5, 3], 3: [4, 1, 6]}  # uneven; world 3 has a rank with a single sample
EMPTY_RANK_SIZES = {2: [3, 0], 3: [3, 0, 2]}
OPTS = dict(tau=0.4, margin=1.7)
BANK_K = 7


def _global_z(n, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=g, dtype=torch.float64) * 0.7
    if n > 4:
        z[4] = z[0]  # a duplicate row across ranks (d = 0: subgradient 0)
    return z


def _bank_rows(seed=99):
    return torch.randn(BANK_K, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cases(world):
    """(key, sizes, seed, kwargs) of every distributed case."""
    cases = []
    for variant in VARIANTS:
        for ring in (False, True):
            cov_modes = ("gram", "dxd") if variant == "covariance" else ("auto",)
            for cm in cov_modes:
                base = dict(variant=variant, ring=ring, covariance_mode=cm, **OPTS)
                tag = f"{variant}-{'ring' if ring else 'gather'}-{cm}"
                cases.append((f"{tag}-uneven", SIZES[world], 1, base))
                cases.append((f"{tag}-incl-scaled", SIZES[world], 2, dict(base, diagonal="include", scale_by_dim=True)))
                cases.append((f"{tag}-empty-rank", EMPTY_RANK_SIZES[world], 3, base))
    return cases


def _bank_cases():
    out = []
    for variant in ("infonce_l2", "infonce_l2sq", "infonce_cosine", "hinge"):
        for ring in (False, True):
            out.append((f"bank-{variant}-{'ring' if ring else 'gather'}", dict(variant=variant, ring=ring, **OPTS)))
    return out


def _slice(z, sizes, rank):
    start = sum(sizes[:rank])
    return z[start : start + sizes[rank]]


SUBGROUP = [1, 2]  # the 2-rank cases run on this subgroup of the 3 processes


def _worker(rank, nprocs, port, outdir):
    """One spawn of 3 processes: the 3-rank cases on the default group, then the 2-rank
    cases on the subgroup of global ranks 1, 2 (group ranks 0, 1: exercises ``group=``
    and the group-to-global rank mapping of the ring)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nprocs)
    try:
        torch.set_num_threads(1)
        sub = dist.new_group(SUBGROUP)  # every process must call new_group
        out = {3: _run_cases(rank, 3, None)}
        if rank in SUBGROUP:
            out[2] = _run_cases(SUBGROUP.index(rank), 2, sub)
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_cases(rank, world, group):
    """Every distributed case for this rank (its rank within ``group``)."""
    results = {}
    for key, sizes, seed, kw in _cases(world):
        z = _slice(_global_z(sum(sizes), seed), sizes, rank).clone().requires_grad_(True)
        loss = distributed_dispersive_loss(z, group=group, **kw)
        loss.backward()
        results[key] = (loss.detach(), z.grad)

    # float32 and bf16 inputs (bf16 travels as bf16, accumulates in float32)
    for dtype in (torch.float32, torch.bfloat16):
        for ring in (False, True):
            z = _slice(_global_z(sum(SIZES[world]), 5), SIZES[world], rank).to(dtype).requires_grad_(True)
            loss = distributed_dispersive_loss(z, group=group, variant="infonce_l2", ring=ring, **OPTS)
            loss.backward()
            results[f"{dtype}-{ring}"] = (loss.detach(), z.grad)

    # ddp_scale: same value, gradient × W
    z = _slice(_global_z(sum(SIZES[world]), 1), SIZES[world], rank).clone().requires_grad_(True)
    loss = distributed_dispersive_loss(z, group=group, variant="infonce_l2", ddp_scale=True, **OPTS)
    loss.backward()
    results["ddp_scale"] = (loss.detach(), z.grad)

    # a bank shared by all ranks, filled by enqueue_global (rank order)
    bank = NegativeBank(D, BANK_K + 3, dtype=torch.float64)
    bank.enqueue_global(_slice(_bank_rows(), [3, 4] + [0] * (world - 2), rank), group=group)
    results["bank_rows"] = (bank.negatives().clone(), torch.zeros(0))
    for key, kw in _bank_cases():
        z = _slice(_global_z(sum(SIZES[world]), 4), SIZES[world], rank).clone().requires_grad_(True)
        loss = distributed_dispersive_loss(z, group=group, bank=bank, **kw)
        loss.backward()
        results[key] = (loss.detach(), z.grad)

    results["ddp_params"] = (_ddp_two_steps(rank, world, group), torch.zeros(0))

    # check_finite: a NaN on the last rank only; every rank raises (none is left waiting)
    z = _slice(_global_z(sum(SIZES[world]), 1), SIZES[world], rank).clone()
    if rank == world - 1:
        z[0, 0] = float("nan")
    try:
        distributed_dispersive_loss(z, group=group, check_finite=True)
        results["check_finite"] = "no error"
    except ValueError as exc:
        results["check_finite"] = str(exc)

    # a dtype that differs on the last rank: every rank raises, naming the dtypes (gloo
    # aborted the process on the mismatched all-gather of z)
    z = _slice(_global_z(sum(SIZES[world]), 1), SIZES[world], rank).clone()
    if rank == world - 1:
        z = z.float()
    try:
        distributed_dispersive_loss(z, group=group)
        results["dtype_mismatch"] = "no error"
    except ValueError as exc:
        results["dtype_mismatch"] = str(exc)
    return results


def _tiny_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, D), torch.nn.Tanh(), torch.nn.Linear(D, D)).double()


@torch.no_grad()
def _sgd_step(model, lr=0.1):
    """Plain SGD (torch.optim's first step imports torch._dynamo: seconds per process)."""
    for p in model.parameters():
        p -= lr * p.grad
        p.grad = None


def _ddp_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, D, generator=g, dtype=torch.float64)


def _ddp_two_steps(rank, world, group):
    """Two SGD steps with DDP's gradient averaging on rank slices of an 8-sample batch, bank
    filled after step 1. The averaging is done as DDP does it (all-reduce SUM / W of every
    parameter gradient after backward) without DDP itself, whose constructor imports
    torch._dynamo (~4-8 s per process here)."""
    model = _tiny_model()
    bank = NegativeBank(D, 16, dtype=torch.float64)
    sizes = [8 // world + (1 if r < 8 % world else 0) for r in range(world)]
    for step in range(2):
        x, y = (_slice(t, sizes, rank) for t in _ddp_batch(step))
        out = model(x)
        # the task loss is a local mean: DDP averages it over ranks, which is the global
        # mean after weighting rank k by n_k·W/N (1 for equal slices)
        task = torch.nn.functional.mse_loss(out, y) * (len(x) * world / 8)
        loss = task + 0.3 * distributed_dispersive_loss(out, group=group, bank=bank, ddp_scale=True, **OPTS)
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad, group=group)
            p.grad /= world
        _sgd_step(model)
        bank.enqueue_global(out, group=group)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned_all():
    with tempfile.TemporaryDirectory() as outdir:
        mp.spawn(_worker, args=(3, _free_port(), outdir), nprocs=3, join=True)
        return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(3)]


@pytest.fixture(params=[2, 3], ids=["world2", "world3"])
def spawned(request, spawned_all):
    """(world, per-rank results in group-rank order) of the 2-rank subgroup or all 3."""
    world = request.param
    ranks = SUBGROUP if world == 2 else range(3)
    return world, [spawned_all[r][world] for r in ranks]


def _ref(z, variant, bank=None, ring=None, covariance_mode=None, **opts):
    z = z.clone().requires_grad_(True)
    if bank is None:
        loss = dispersive_loss_reference(z, variant=variant, **opts)
    else:
        loss = dispersive_loss_bank_reference(z, bank, variant=variant, **opts)
    (g,) = torch.autograd.grad(loss, z)
    return loss.detach(), g


def _assert_matches(per_rank, key, ref_loss, ref_grad, grad_factor=1.0):
    for rank, res in enumerate(per_rank):
        loss, _ = res[key]
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-10, abs=1e-12), (key, rank)
    grad = torch.cat([res[key][1] for res in per_rank])
    assert grad.shape == ref_grad.shape
    assert torch.allclose(grad, grad_factor * ref_grad, rtol=1e-9, atol=1e-12), (key, (grad - ref_grad).abs().max())


CASE_KEYS = [key for key, *_ in _cases(3)]


@pytest.mark.parametrize("key", CASE_KEYS)
def test_global_loss_and_rank_gradients_equal_single_process(spawned, key):
    """Every variant × mode × case: value on every rank and the concatenated per-rank
    gradients equal the single-process reference on the concatenated batch."""
    world, per_rank = spawned
    key_, sizes, seed, kw = next(c for c in _cases(world) if c[0] == key)
    ref_loss, ref_grad = _ref(_global_z(sum(sizes), seed), **kw)
    _assert_matches(per_rank, key, ref_loss, ref_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("ring", [False, True], ids=["gather", "ring"])
def test_low_precision_inputs(spawned, dtype, ring):
    """float32 and bf16 z: loss in float32, gradient in z's dtype, close to the float64
    reference of the same rounded input (bf16: within its rounding of the gradient)."""
    world, per_rank = spawned
    z = _global_z(sum(SIZES[world]), 5).to(dtype)
    ref_loss, ref_grad = _ref(z.double(), "infonce_l2", **OPTS)
    grad = torch.cat([res[f"{dtype}-{ring}"][1] for res in per_rank])
    assert grad.dtype == dtype
    for res in per_rank:
        assert res[f"{dtype}-{ring}"][0].dtype == torch.float32
        assert float(res[f"{dtype}-{ring}"][0]) == pytest.approx(float(ref_loss), rel=1e-6)
    tol = (1e-5 if dtype == torch.float32 else 1e-2) * float(ref_grad.abs().max())
    assert float((grad.double() - ref_grad).abs().max()) <= tol


def test_check_finite_raises_on_every_rank(spawned):
    """A NaN on one rank makes every rank raise (agreed by an all-reduce), not hang."""
    _, per_rank = spawned
    for res in per_rank:
        assert "non-finite" in res["check_finite"] and "at least one rank" in res["check_finite"]


def test_dtype_mismatch_raises_on_every_rank(spawned):
    world, per_rank = spawned
    want = str(["float64"] * (world - 1) + ["float32"])
    for res in per_rank:
        assert f"z must have the same dtype on every rank; got {want}" in res["dtype_mismatch"]


def test_ddp_scale_multiplies_only_the_gradient(spawned):
    world, per_rank = spawned
    ref_loss, ref_grad = _ref(_global_z(sum(SIZES[world]), 1), "infonce_l2", **OPTS)
    _assert_matches(per_rank, "ddp_scale", ref_loss, ref_grad, grad_factor=world)


@pytest.mark.parametrize("key", [k for k, _ in _bank_cases()])
def test_distributed_with_shared_bank(spawned, key):
    """The bank (filled by enqueue_global, same on every rank) adds N·K pairs of the
    global batch; value and gradients equal the bank reference."""
    world, per_rank = spawned
    expected_bank = _bank_rows()
    for res in per_rank:
        assert torch.equal(res["bank_rows"][0], expected_bank)
    kw = dict(next(k for n, k in _bank_cases() if n == key))
    kw.pop("ring")
    ref_loss, ref_grad = _ref(_global_z(sum(SIZES[world]), 4), bank=expected_bank, **kw)
    _assert_matches(per_rank, key, ref_loss, ref_grad)


def test_ddp_two_steps_match_one_process_doubled_batch(spawned):
    """DDP's gradient averaging + ddp_scale=True + a bank filled after step 1: the
    parameters after two SGD steps equal one process trained on the whole batch."""
    world, per_rank = spawned
    model = _tiny_model()
    bank = NegativeBank(D, 16, dtype=torch.float64)
    for step in range(2):
        x, y = _ddp_batch(step)
        out = model(x)
        loss = torch.nn.functional.mse_loss(out, y) + 0.3 * dispersive_loss_with_bank(out, bank, **OPTS)
        loss.backward()
        _sgd_step(model)
        bank.enqueue(out)
    expect = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for res in per_rank:
        assert torch.allclose(res["ddp_params"][0], expect, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------------------
# Single process: the bank formula, the tiled bank loss, NegativeBank


def _loop_bank_loss(z, bank, variant, tau, margin, diagonal, scale_by_dim):
    """The bank definition as loops over the pairs of cat(z, bank), float64."""
    allrows = torch.cat([z, bank]).tolist()
    n, k, dim = z.shape[0], bank.shape[0], z.shape[1]
    pairs = [(i, j) for i in range(n) for j in range(n) if diagonal == "include" or i != j]
    pairs += [(i, n + b) for i in range(n) for b in range(k)]
    ds = []
    for i, j in pairs:
        a, b = allrows[i], allrows[j]
        if variant == "infonce_cosine":
            na = max(math.sqrt(sum(x * x for x in a)), 1e-12)
            nb = max(math.sqrt(sum(x * x for x in b)), 1e-12)
            d = 1 - sum(x * y for x, y in zip(a, b)) / (na * nb)
        else:
            d = math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))
            if variant == "infonce_l2sq":
                d = d * d
        ds.append(d / dim if scale_by_dim else d)
    if variant == "hinge":
        return sum(max(0.0, margin - d) ** 2 for d in ds) / len(ds)
    return math.log(sum(math.exp(-d / tau) for d in ds) / len(ds))


PAIR_VARIANTS = [v for v in VARIANTS if v != "covariance"]


@pytest.mark.parametrize("variant", PAIR_VARIANTS)
@pytest.mark.parametrize("diagonal,scale_by_dim", [("exclude", False), ("include", True)])
def test_bank_reference_is_the_formula_and_tiled_matches(variant, diagonal, scale_by_dim):
    """reference == loops over the pairs of the concatenation; the tiled bank loss (tile
    smaller than N and K) == reference in value and gradient; the bank gets no gradient."""
    z = torch.randn(7, 5, dtype=torch.float64) * 0.8
    bank = torch.randn(9, 5, dtype=torch.float64).requires_grad_(True)
    opts = dict(variant=variant, tau=0.3, margin=1.5, diagonal=diagonal, scale_by_dim=scale_by_dim)
    ref = dispersive_loss_bank_reference(z, bank, **opts)
    assert float(ref) == pytest.approx(_loop_bank_loss(z, bank.detach(), **opts), rel=1e-10, abs=1e-12)

    zr = z.clone().requires_grad_(True)
    (g_ref, g_bank) = torch.autograd.grad(dispersive_loss_bank_reference(zr, bank, **opts), [zr, bank],
                                          allow_unused=True)
    assert g_bank is None  # detached: no gradient flows into the bank
    zt = z.clone().requires_grad_(True)
    got = dispersive_loss_with_bank(zt, bank, tile=4, **opts)
    got.backward()
    got = got.detach()
    assert bank.grad is None
    assert float(got) == pytest.approx(float(ref), rel=1e-10, abs=1e-12)
    assert torch.allclose(zt.grad, g_ref, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("variant", PAIR_VARIANTS)
def test_bank_edge_cases(variant):
    """K = 0 is the spec's loss; N = 1 with K > 0 has only bank pairs (non-zero, finite)."""
    z = torch.randn(6, 3, 2, dtype=torch.float64)
    empty = torch.zeros(0, 6, dtype=torch.float64)
    a = dispersive_loss_with_bank(z, empty, variant=variant)
    assert float(a) == pytest.approx(float(dispersive_loss(z, variant=variant, backend="reference")), rel=1e-12)
    one = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    bank = torch.randn(4, 6, dtype=torch.float64)
    loss = dispersive_loss_with_bank(one, bank, variant=variant)
    loss.backward()
    ref, ref_g = _ref(one.detach(), variant, bank=bank)
    assert float(loss.detach()) == pytest.approx(float(ref), rel=1e-10)
    assert torch.allclose(one.grad, ref_g, rtol=1e-9, atol=1e-13)


def test_bank_float32_and_bf16_storage():
    """float32 z with a bf16-stored bank: the loss reads the bank in float32."""
    z = torch.randn(20, 16)
    bank = NegativeBank(16, 32, dtype=torch.bfloat16)
    bank.enqueue(torch.randn(12, 16))
    got = dispersive_loss_with_bank(z, bank)
    ref = dispersive_loss_bank_reference(z.double(), bank.negatives().double())
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(ref), rel=1e-5)


def test_negative_bank_fifo():
    """Partial fill uses only valid rows; wrap-around overwrites the oldest; an enqueue
    larger than the bank keeps the newest rows; state_dict restores pointer and count."""
    bank = NegativeBank(2, 5, dtype=torch.float64)
    rows = torch.arange(20, dtype=torch.float64).reshape(10, 2)
    assert len(bank) == 0 and bank.negatives().shape == (0, 2)
    bank.enqueue(rows[:3])
    assert torch.equal(bank.negatives(), rows[:3])
    bank.enqueue(rows[3:7])  # wraps: slots 3, 4, 0, 1
    assert len(bank) == 5
    assert sorted(bank.negatives()[:, 0].tolist()) == sorted(rows[2:7, 0].tolist())
    other = NegativeBank(2, 5, dtype=torch.float64)
    other.load_state_dict(bank.state_dict())
    bank.enqueue(rows[7:8])
    other.enqueue(rows[7:8])
    assert torch.equal(bank.rows, other.rows) and int(bank.ptr) == int(other.ptr) == 3
    bank.enqueue(rows)  # 10 rows into 5 slots: the newest 5 remain
    assert sorted(bank.negatives()[:, 0].tolist()) == sorted(rows[5:, 0].tolist())
    with pytest.raises(ValueError, match="dim"):
        bank.enqueue(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="size"):
        NegativeBank(2, 0)


def test_errors_name_the_argument():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="covariance"):
        dispersive_loss_with_bank(z, torch.randn(2, 3), variant="covariance")
    with pytest.raises(ValueError, match="bank rows must have D = 3"):
        dispersive_loss_with_bank(z, torch.randn(2, 4))
    with pytest.raises(ValueError, match="covariance_mode"):
        distributed_dispersive_loss(z, covariance_mode="fast")
    with pytest.raises(ValueError, match="tau"):
        distributed_dispersive_loss(z, tau=0)
    with pytest.raises(ValueError, match="group"):
        distributed_dispersive_loss(z, group=object())


@pytest.mark.parametrize("variant", ["infonce_l2", "infonce_l2sq", "hinge"])
def test_float32_with_large_common_offset(variant):
    """Rows that share a large offset (mean 1000, spread 0.3): the row-tile shift keeps the
    float32 gradient at float32 accuracy (no r·z_i − Σ w z_j cancellation)."""
    z = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 0.3 + 1000.0
    opts = dict(variant=variant, margin=2.0)
    _, ref_g = _ref(z.double(), **opts)
    a = z.clone().requires_grad_(True)
    distributed_dispersive_loss(a, **opts).backward()
    assert float((a.grad.double() - ref_g).abs().max()) <= 1e-5 * float(ref_g.abs().max())


def test_autocast_does_not_lower_the_precision():
    """Inside an autocast region (AMP training) the loss still computes in z's dtype."""
    z = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    bank = torch.randn(10, 24, generator=torch.Generator().manual_seed(2))
    plain = dispersive_loss_with_bank(z, bank, variant="infonce_cosine")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = dispersive_loss_with_bank(z, bank, variant="infonce_cosine")
        amp2 = distributed_dispersive_loss(z, variant="infonce_cosine")
    assert amp.dtype == torch.float32
    assert float(amp) == pytest.approx(float(plain), rel=1e-6)
    assert float(amp2) == pytest.approx(float(distributed_dispersive_loss(z, variant="infonce_cosine")), rel=1e-6)


def test_module_matches_function():
    """DistributedDispersiveLoss(...)(z, bank) == distributed_dispersive_loss(z, ..., bank=bank)."""
    from disseg_kernels import DistributedDispersiveLoss

    z = torch.randn(12, 7, dtype=torch.float64)
    bank = NegativeBank(7, 5, dtype=torch.float64)
    bank.enqueue(torch.randn(3, 7, dtype=torch.float64))
    mod = DistributedDispersiveLoss(variant="hinge", margin=3.0, ring=True, ddp_scale=True)
    assert "hinge" in repr(mod) and "ring=True" in repr(mod)
    got = mod(z, bank=bank)
    want = distributed_dispersive_loss(z, variant="hinge", margin=3.0, bank=bank.negatives())
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    assert float(got) == pytest.approx(float(dispersive_loss_bank_reference(z, bank.negatives(), "hinge", margin=3.0)),
                                       rel=1e-12)
    with pytest.raises(ValueError, match="tau"):
        DistributedDispersiveLoss(tau=-1.0)


def test_single_process_without_group_is_dispersive_loss():
    """No process group: the distributed loss is the ordinary loss (both modes)."""
    z = torch.randn(9, 4, dtype=torch.float64)
    for ring in (False, True):
        a = distributed_dispersive_loss(z, variant="infonce_cosine", ring=ring)
        b = dispersive_loss_reference(z, variant="infonce_cosine")
        assert float(a) == pytest.approx(float(b), rel=1e-12)


# --------------------------------------------------------------------------------------
# The row-statistics primitive: the contract a fused kernel implements


def _brute_row_stats(rows, cols, variant, tau, margin, self_offset, include_diagonal, grad_weight):
    """The per-row quantities of _row_stats from full (n, m) matrices, float64."""
    n, m = rows.shape[0], cols.shape[0]
    if variant == "infonce_cosine":
        dist_ = None
        d = 1.0 - rows @ cols.T
    else:
        dist_ = torch.cdist(rows, cols, compute_mode="donot_use_mm_for_euclid_dist")
        d = dist_.square() if variant == "infonce_l2sq" else dist_
    keep = torch.ones(n, m, dtype=torch.bool)
    if self_offset is not None and not include_diagonal:
        i = torch.arange(n)
        keep[i, i + self_offset] = False
    if variant == "hinge":
        h = torch.relu(margin - d) * keep
        w = torch.where(dist_ > 0, h / dist_, 0.0) * grad_weight
        return None, h.square().sum(1), _diff_sum(w, rows, cols)
    logits = (-d / tau).masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(logits, dim=1)
    p = torch.exp(logits - lse[:, None])  # row softmax: e / s
    if variant == "infonce_cosine":
        return lse, None, (p * grad_weight) @ cols
    if variant == "infonce_l2":
        w = p * torch.where(dist_ > 0, 1.0 / dist_, 0.0) * grad_weight
    else:
        w = p * 2.0 * grad_weight
    return lse, None, _diff_sum(w, rows, cols)


def _diff_sum(w, rows, cols):
    """Σ_j w_ij (z_i − z_j), pair by pair."""
    return (w[:, :, None] * (rows[:, None, :] - cols[None, :, :])).sum(1)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("variant", PAIR_VARIANTS)
@pytest.mark.parametrize("self_offset,include_diagonal", [(None, False), (3, False), (3, True)])
def test_row_stats_contract(variant, self_offset, include_diagonal, backend):
    """_row_stats (the interface a kernel implements) against full matrices: m + log s is
    the row logsumexp and acc/s the softmax-weighted sum of (z_i − z_j)·w (cosine: of ẑ_j);
    for hinge s and acc are the plain sums; and the result does not depend on the tile size or on splitting
    the columns into blocks merged online (how the ring calls it). Both the PyTorch tiles
    (reference) and the fused kernel (auto: C++ here); tests/test_dispersive_rows.py has the rest."""
    from disseg_kernels.distributed import _merge, _row_stats

    g = torch.Generator().manual_seed(3)
    rows = torch.randn(7, 5, generator=g, dtype=torch.float64)
    cols = torch.randn(13, 5, generator=g, dtype=torch.float64)
    if self_offset is not None:
        cols[self_offset : self_offset + 7] = rows  # rows are columns 3..9
    cols[12] = rows[0]  # a duplicate that is not the row itself (d = 0, weight 0 for l2)
    if variant == "infonce_cosine":
        rows = rows / rows.norm(dim=1, keepdim=True)
        cols = cols / cols.norm(dim=1, keepdim=True)
    args = dict(variant=variant, tau=0.6, margin=2.0, scale_by_dim=False, include_diagonal=include_diagonal,
                grad_weight=2.0, need_grad=True)
    lse, s_ref, acc_ref = _brute_row_stats(rows, cols, variant, 0.6, 2.0, self_offset, include_diagonal, 2.0)
    for tile in (1, 4, 1024):
        st = _row_stats(rows, cols, self_offset=self_offset, tile=tile, backend=backend, **args)
        # the same columns in two blocks, merged (the ring's way)
        a = _row_stats(rows, cols[:5], self_offset=self_offset, tile=tile, backend=backend, **args)
        b = _row_stats(rows, cols[5:], self_offset=None if self_offset is None else self_offset - 5, tile=tile,
                       backend=backend, **args)
        for stats in (st, _merge(a, b, variant)):
            if variant == "hinge":
                assert torch.allclose(stats.s, s_ref, rtol=1e-12, atol=1e-14)
                assert torch.allclose(stats.acc, acc_ref, rtol=1e-12, atol=1e-13)
            else:
                assert torch.allclose(stats.m + stats.s.log(), lse, rtol=1e-12, atol=1e-12)
                assert torch.allclose(stats.acc / stats.s[:, None], acc_ref, rtol=1e-12, atol=1e-14)


def test_bank_check_finite_looks_at_the_bank_too():
    """check_finite=True rejected a NaN in z only; a NaN bank row (an earlier batch's z)
    gave a NaN loss silently. Without check_finite it still runs (and is NaN)."""
    z = torch.randn(4, 3)
    bank = torch.randn(5, 3)
    bank[2, 1] = float("nan")
    with pytest.raises(ValueError, match="the bank holds a non-finite value"):
        dispersive_loss_with_bank(z, bank, check_finite=True)
    assert dispersive_loss_with_bank(z, bank).isnan()
    assert dispersive_loss_with_bank(z, bank[:2], check_finite=True).isfinite()


def test_distributed_check_finite_looks_at_the_bank_too():
    """The same rule in the distributed loss (one process, no group)."""
    z = torch.randn(4, 3)
    bank = torch.randn(5, 3)
    bank[0, 0] = float("inf")
    with pytest.raises(ValueError, match="the bank holds a non-finite value"):
        distributed_dispersive_loss(z, bank=bank, check_finite=True)
    assert distributed_dispersive_loss(z, bank=bank[1:], check_finite=True).isfinite()


def test_dtype_codes_name_every_floating_dtype():
    """The cross-rank dtype check sends an index per dtype: every floating dtype of this
    torch has its own (an earlier table of four sent one shared code for the rest, so two
    ranks agreeing on float8 were told they differ)."""
    from disseg_kernels.distributed import _DTYPES, _dtype_code

    floats = {d for d in vars(torch).values() if isinstance(d, torch.dtype) and d.is_floating_point}
    assert set(_DTYPES) == floats
    assert sorted(_dtype_code(d) for d in floats) == list(range(len(floats)))
    assert _dtype_code(torch.float8_e4m3fn) != _dtype_code(torch.float8_e5m2)
    assert _dtype_code(torch.int64) == -1
