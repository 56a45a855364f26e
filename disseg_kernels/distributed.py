"""Global-batch dispersion: the dispersive loss over every rank's samples, exactly.

Under ``torch.distributed`` each rank holds a slice Z_k (n_k × D) of the global batch
Z = cat_k Z_k (N × D). :func:`distributed_dispersive_loss` returns, on every rank, the
single-process loss L(Z) of ``shared/spec/dispersive.md``, and gives each rank's rows the
matching rows of ∂L/∂Z. Optionally, K detached bank rows B (``disseg_kernels.bank``) join
the batch as extra negative columns (``reference/dispersive_bank.py`` has the formula).

How: the per-row decomposition
------------------------------
Every variant is a sum over pairs, so it splits into per-row statistics that a rank can
accumulate for its own rows i over any set of columns j, one column tile at a time,
without an N×N buffer (:func:`_row_stats`). With ℓ_ij = −d_ij/τ, a column weight g_j
(2 for batch columns, because ∂L/∂z_i gets p_ij + p_ji = 2p_ij from the symmetric pair;
1 for bank columns, which get no gradient) and w_ij = ∂d_ij/∂z_i's scalar factor:

    m_i   = max_j ℓ_ij                          (running max, online as in FlashAttention)
    s_i   = Σ_j exp(ℓ_ij − m_i)
    acc_i = Σ_j g_j exp(ℓ_ij − m_i) w_ij (z_i − z_j)   w = 1/‖z_i − z_j‖ (l2, 0 where d = 0), 2 (l2sq)
            (cosine: Σ_j g_j exp(ℓ_ij − m_i) ẑ_j)

acc_i is computed as r_i·(z_i − c) − Σ_j (…)(z_j − c) with r_i = Σ_j g_j exp(…) w_ij and c
the mean of the row tile: distances are translation invariant, and the shift removes the
cancellation of r_i z_i − Σ_j (…) z_j when the rows share a large common offset.

Then LSE = logsumexp_i (m_i + log s_i) over the rows of ALL ranks (one all-reduce of a
max and one of a sum), L = LSE − log|P|, and row i's gradient is local:

    l2, l2sq:  ∂L/∂z_i = −(1/τ)(1/D)^[scale_by_dim] · exp(m_i − LSE) · acc_i
    cosine:    ∂L/∂z_i = (1/τ)(1/D)^[scale_by_dim] · exp(m_i − LSE) · (I − ẑ_iẑ_iᵀ) acc_i / ‖z_i‖
    hinge:     s_i = Σ_j h_ij², acc_i = Σ_j g_j h_ij (z_i − z_j)/‖z_i − z_j‖, h = max(0, ε − d);
               L = Σ_i s_i / |P|, ∂L/∂z_i = −(2/|P|)(1/D)^[scale_by_dim] acc_i
    covariance (Gram identity, Z̄ = Z − global column mean, K = Z̄Z̄ᵀ, c_a = Σ_i Z̄_ia²):
               s_i = Σ_j K_ij², acc_i = Σ_j K_ij z̄_j;
               L = (Σ_i s_i − Σ_a c_a²)/(N−1)², ∂L/∂z_i = 4/(N−1)² (acc_i − z̄_i ⊙ c)

The backward pass needs no communication: the gradient is computed in the forward pass
(as the fused kernels do) and only scaled by grad_output.

Communication (bytes sent per rank, b = bytes per element, W ranks, n = max rows per rank)
-----------------------------------------------------------------------------------------
- ``ring=False`` (all-gather): sizes (3 int64: n, D, dtype), one all-gather of z: (W−1)·n·D·b, and two
  scalar all-reduces. Peak memory N·D for the gathered z, plus O(rows × tile) per tile.
- ``ring=True`` (Inf-CL ring): W−1 steps; at each, a rank sends its current column block
  to rank+1 and receives the next from rank−1 (``batch_isend_irecv``) while it computes on
  the current one: the same (W−1)·n·D·b bytes, but never more than two blocks (2·n·D)
  resident, so the memory does not grow with W.
- covariance adds two all-reduces of D floats (column sums, column sums of squares), or,
  with ``covariance_mode="dxd"``, replaces the gather/ring by an all-reduce of the D×D
  matrix Z̄ᵀZ̄ (about 2·D²·b per rank: cheaper than the gather when 2D < N, impossible
  at D = 262,144). ``"auto"`` takes the D×D route when 2·D ≤ N.
- The all-gather-everything baseline (gather z with autograd, compute the whole loss on
  every rank, reduce-scatter the N×D gradient back) sends 2·(W−1)·n·D·b and computes
  N² pairs on every rank instead of n·N.

DDP scaling convention
----------------------
The returned value is L of the global batch on every rank, and each rank's z receives
exactly its rows of ∂L/∂Z. DistributedDataParallel *averages* parameter gradients over
the W ranks, which divides this term's parameter gradient by W. So, to train on
``task_loss + λ·L`` of the global batch, either backward ``λ·W·L`` (multiply by the world
size), or pass ``ddp_scale=True``: the value stays L (for logging) and the gradient
reaching z is multiplied by W, so that DDP's average restores ∂L/∂θ exactly.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _backend
from .ops.dispersive import VARIANT_CODES, _validate
from .ops._autograd import first_order_only, saved_grad_dtype, scale_saved_grad

_HALF = (torch.float16, torch.bfloat16)
_INFONCE = ("infonce_l2", "infonce_l2sq", "infonce_cosine")
COVARIANCE_MODES = ("auto", "gram", "dxd")

# --------------------------------------------------------------------------------------
# The row-block primitive


class RowStats(NamedTuple):
    """Per-row statistics of rows i against a set of columns (see the module docstring).

    m (n,): running max of ℓ_ij (−inf where no column was seen; 0 for hinge/covariance);
    s (n,): Σ exp(ℓ − m) (InfoNCE), Σ h² (hinge) or Σ K² (covariance);
    acc (n, D): the weighted sum of differences z_i − z_j (l2, l2sq, hinge) or of columns
        (cosine: ẑ_j, covariance: z̄_j); empty (n, 0) when need_grad is False.
    """

    m: torch.Tensor
    s: torch.Tensor
    acc: torch.Tensor


def _empty_stats(n: int, dim: int, variant: str, dtype, device, need_grad: bool) -> RowStats:
    m0 = float("-inf") if variant in _INFONCE else 0.0
    return RowStats(
        torch.full((n,), m0, dtype=dtype, device=device),
        torch.zeros(n, dtype=dtype, device=device),
        torch.zeros(n, dim if need_grad else 0, dtype=dtype, device=device),
    )


def _merge(a: RowStats, b: RowStats, variant: str) -> RowStats:
    """Online combination of two column sets' statistics for the same rows."""
    if variant not in _INFONCE:
        return RowStats(a.m, a.s + b.s, a.acc + b.acc)
    m = torch.maximum(a.m, b.m)
    safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    ca = torch.where(torch.isinf(a.m), torch.zeros_like(m), torch.exp(a.m - safe))
    cb = torch.where(torch.isinf(b.m), torch.zeros_like(m), torch.exp(b.m - safe))
    return RowStats(m, a.s * ca + b.s * cb, a.acc * ca[:, None] + b.acc * cb[:, None])


def _row_stats(
    z_rows: torch.Tensor,
    z_cols: torch.Tensor,
    variant: str,
    tau: float,
    margin: float,
    scale_by_dim: bool,
    include_diagonal: bool,
    self_offset: int | None,
    grad_weight: float,
    need_grad: bool,
    tile: int = 1024,
    backend: str = "auto",
) -> RowStats:
    """Statistics of rows ``z_rows`` (n, D) against columns ``z_cols`` (m, D), tiled.

    The narrow interface the fused kernels implement (one call each): the C++
    ``torch.ops.disseg.dispersive_row_stats`` (``backend="cpu"``, csrc/dispersive_rows.h)
    and ``triton/dispersive_rows.py`` (``"triton"``); ``"reference"`` is the PyTorch tiles
    below (:func:`_row_stats_reference`); ``"auto"`` picks through ``_backend.resolve``
    (family ``dispersive_rows``). ``covariance`` has no fused row statistics: it always
    runs the PyTorch tiles, whatever ``backend`` says. The contract:

    - inputs are *prepared*, in the compute dtype (float32 for half inputs): raw z for the
      L2 family and hinge, ẑ = z / max(‖z‖, 1e-12) for ``infonce_cosine``, z̄ = z − global
      column mean for ``covariance``;
    - ``self_offset``: column ``i + self_offset`` is row i itself (its pair is dropped when
      ``include_diagonal`` is False; ignored by covariance); None when the two sets are
      disjoint;
    - ``grad_weight`` multiplies acc: 2 for batch columns, 1 for bank columns;
    - ``scale_by_dim`` divides d by D = z_rows.shape[1];
    - memory O(rows × tile): row tiles × column tiles, an online max per row (``tile``
      sizes the reference's tiles; the fused kernels choose their own).

    Returns a :class:`RowStats`; acc is unscaled by 1/τ, 1/D, exp(m − LSE).
    """
    chosen = "reference" if variant == "covariance" else _backend.resolve("dispersive_rows", backend, z_rows.device)
    if chosen == "reference":
        return _row_stats_reference(z_rows, z_cols, variant, tau, margin, scale_by_dim, include_diagonal,
                                    self_offset, grad_weight, need_grad, tile)
    args = (VARIANT_CODES[variant], float(tau), float(margin), bool(scale_by_dim), bool(include_diagonal),
            None if self_offset is None else int(self_offset), float(grad_weight), bool(need_grad))
    if chosen == "cpu":
        m, s, acc = torch.ops.disseg.dispersive_row_stats(z_rows.contiguous(), z_cols.contiguous(), *args)
    else:  # triton
        from .triton.dispersive_rows import dispersive_row_stats_triton

        m, s, acc = dispersive_row_stats_triton(z_rows, z_cols, *args)
    return RowStats(m, s, acc)


if _backend.extension_error() is None and hasattr(torch.ops.disseg, "dispersive_row_stats"):

    @torch.library.register_fake("disseg::dispersive_row_stats")
    def _row_stats_fake(rows, cols, variant, tau, margin, scale_by_dim, include_diagonal, self_offset, grad_weight,
                        need_grad):
        n, dim = rows.shape
        return rows.new_empty(n), rows.new_empty(n), rows.new_empty((n, dim if need_grad else 0))


def _row_stats_reference(z_rows, z_cols, variant, tau, margin, scale_by_dim, include_diagonal, self_offset,
                         grad_weight, need_grad, tile=1024) -> RowStats:
    """The PyTorch tiles of :func:`_row_stats` (its reference path)."""
    n, dim = z_rows.shape
    shift = variant not in ("infonce_cosine", "covariance")
    out = []
    for r0 in range(0, n, tile):
        rows = z_rows[r0 : r0 + tile]
        nr = rows.shape[0]
        if shift:  # translation invariance: work on z − c, c = the row tile's mean
            c = rows.mean(0)
            rows = rows - c
        st = _empty_stats(nr, dim, variant, z_rows.dtype, z_rows.device, need_grad)
        for c0 in range(0, z_cols.shape[0], tile):
            cols = z_cols[c0 : c0 + tile]
            if shift:
                cols = cols - c
            st = _merge(st, _tile_stats(rows, cols, r0, c0, variant, tau, margin, scale_by_dim,
                                        include_diagonal, self_offset, grad_weight, need_grad), variant)
        out.append(st)
    if not out:
        return _empty_stats(0, dim, variant, z_rows.dtype, z_rows.device, need_grad)
    return RowStats(*(torch.cat(parts) for parts in zip(*out)))


def _tile_stats(rows, cols, r0, c0, variant, tau, margin, scale_by_dim, include_diagonal, self_offset,
                grad_weight, need_grad) -> RowStats:
    nr, dim = rows.shape
    nc = cols.shape[0]
    self_mask = None
    if self_offset is not None and variant != "covariance":
        ri = torch.arange(r0, r0 + nr, device=rows.device)[:, None] + self_offset
        cj = torch.arange(c0, c0 + nc, device=rows.device)[None, :]
        self_mask = ri == cj
    zero = rows.new_zeros(())

    if variant == "covariance":
        k = rows @ cols.T
        s = k.square().sum(1)
        acc = (k * grad_weight) @ cols if need_grad else rows.new_zeros(nr, 0)
        return RowStats(rows.new_zeros(nr), s, acc)

    if variant == "infonce_cosine":
        dist_ = None
        d = 1.0 - rows @ cols.T
    else:
        # exact differences (as the reference): no Gram cancellation, d = 0 for duplicates
        dist_ = torch.cdist(rows, cols, compute_mode="donot_use_mm_for_euclid_dist")
        d = dist_.square() if variant == "infonce_l2sq" else dist_
    if scale_by_dim:
        d = d / dim
    drop = self_mask if (self_mask is not None and not include_diagonal) else None

    if variant == "hinge":
        h = torch.relu(margin - d)
        if drop is not None:
            h = torch.where(drop, zero, h)
        s = h.square().sum(1)
        if not need_grad:
            return RowStats(rows.new_zeros(nr), s, rows.new_zeros(nr, 0))
        w = torch.where(dist_ > 0, h / dist_, zero) * grad_weight
        return RowStats(rows.new_zeros(nr), s, w.sum(1)[:, None] * rows - w @ cols)

    logits = -d / tau
    if drop is not None:
        logits = logits.masked_fill(drop, float("-inf"))
    m = logits.max(dim=1).values if nc else rows.new_full((nr,), float("-inf"))
    safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(logits - safe[:, None])
    s = e.sum(1)
    if not need_grad:
        return RowStats(m, s, rows.new_zeros(nr, 0))
    if variant == "infonce_cosine":
        return RowStats(m, s, (e * grad_weight) @ cols)
    if variant == "infonce_l2":
        ew = e * torch.where(dist_ > 0, 1.0 / dist_, zero) * grad_weight
    else:  # infonce_l2sq: ∂‖z_i − z_j‖²/∂z_i = 2(z_i − z_j); a duplicate (d = 0) adds 0, and
        # leaving it out of ew spares r·z_i − Σ ew z_j its cancellation (the included self pair)
        ew = torch.where(dist_ > 0, e * (2.0 * grad_weight), zero)
    return RowStats(m, s, ew.sum(1)[:, None] * rows - ew @ cols)


# --------------------------------------------------------------------------------------
# Communication, with a byte counter for the benchmarks


class CommCounter:
    """Bytes this rank sends, per operation, as a ring implementation of each collective
    sends them: all-gather (W−1)·chunk, all-reduce 2(W−1)/W·size, P2P the tensor."""

    def __init__(self):
        self.bytes: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, op: str, nbytes: float):
        self.bytes[op] = self.bytes.get(op, 0.0) + nbytes
        self.calls[op] = self.calls.get(op, 0) + 1

    @property
    def total(self) -> float:
        return sum(self.bytes.values())


_COUNTERS: list[CommCounter] = []


@contextmanager
def count_communication():
    """``with count_communication() as c:`` records the bytes this rank sends in ``c``."""
    c = CommCounter()
    _COUNTERS.append(c)
    try:
        yield c
    finally:
        _COUNTERS.remove(c)


def _count(op: str, nbytes: float):
    for c in _COUNTERS:
        c.add(op, nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Comm:
    """The collectives the loss needs over ``group``; a no-op world of one without it."""

    def __init__(self, group):
        self.active = dist.is_available() and dist.is_initialized()
        if group is not None and not self.active:
            raise ValueError(f"group={group!r} was given but torch.distributed is not initialised")
        self.group = group
        self.world = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if self.active else 0
        if self.active:
            g = group if group is not None else dist.group.WORLD
            self.global_ranks = dist.get_process_group_ranks(g)

    def all_gather_shapes(self, n: int, dim: int, device, dtype: torch.dtype) -> list[int]:
        """Every rank's row count; a ValueError on every rank where D or the dtype differ
        (gloo/NCCL would otherwise abort the process on the mismatched all-gather)."""
        if self.world == 1:
            return [n]
        mine = torch.tensor([n, dim, _dtype_code(dtype)], dtype=torch.int64, device=device)
        outs = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(outs, mine, group=self.group)
        _count("all_gather(sizes)", (self.world - 1) * _nbytes(mine))
        dims = [int(o[1]) for o in outs]
        if any(d != dim for d in dims):
            raise ValueError(
                f"z must have the same number of features on every rank; got D = {dims} "
                f"(this rank: z of {n} rows × {dim} features)"
            )
        codes = [int(o[2]) for o in outs]
        if any(c != _dtype_code(dtype) for c in codes):
            dtypes = [_DTYPES[c] if 0 <= c < len(_DTYPES) else f"code {c}" for c in codes]
            raise ValueError(
                f"z must have the same dtype on every rank; got {[str(d).replace('torch.', '') for d in dtypes]} "
                f"(rank by rank; this rank: {dtype})"
            )
        return [int(o[0]) for o in outs]

    def all_gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """cat of every rank's rows; all_gather needs equal shapes, so pad to max(sizes)."""
        if self.world == 1:
            return x
        nmax = max(sizes)
        padded = x.new_zeros((nmax, x.shape[1]))
        padded[: x.shape[0]] = x
        outs = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(outs, padded, group=self.group)
        _count("all_gather(z)", (self.world - 1) * _nbytes(padded))
        return torch.cat([o[:k] for o, k in zip(outs, sizes)])

    def all_reduce(self, t: torch.Tensor, op=None, name: str = "all_reduce") -> torch.Tensor:
        if self.world == 1:
            return t
        t = t.contiguous()
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.group)
        _count(name, 2 * (self.world - 1) / self.world * _nbytes(t))
        return t

    def ring(self, x: torch.Tensor, sizes: list[int]):
        """Yield (source rank, its rows) for every rank, own first, passing blocks to
        rank+1 while the caller computes on the current one: two blocks resident."""
        if self.world == 1:
            yield 0, x
            return
        nmax = max(sizes)
        cur = x.new_zeros((nmax, x.shape[1]))
        cur[: x.shape[0]] = x
        nxt = torch.empty_like(cur)
        dst = self.global_ranks[(self.rank + 1) % self.world]
        src = self.global_ranks[(self.rank - 1) % self.world]
        for step in range(self.world):
            owner = (self.rank - step) % self.world
            reqs = []
            if step < self.world - 1:
                ops = [
                    dist.P2POp(dist.isend, cur, dst, group=self.group),
                    dist.P2POp(dist.irecv, nxt, src, group=self.group),
                ]
                reqs = dist.batch_isend_irecv(ops)
                _count("ring(z)", _nbytes(cur))
            yield owner, cur[: sizes[owner]]
            for req in reqs:
                req.wait()
            cur, nxt = nxt, cur


# --------------------------------------------------------------------------------------
# The global loss


# Every floating dtype of this torch, in a fixed order (the ranks run the same torch): the
# dtype check of the shape all-gather sends an index into it.
_DTYPES = tuple(sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype) and d.is_floating_point},
                       key=str))


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _check_finite(z: torch.Tensor, bank_rows: torch.Tensor | None, comm: _Comm) -> None:
    """check_finite=True: a ValueError when z or the bank's rows (earlier batches' z) hold
    NaN or inf, agreed by every rank (one all-reduce), so that all raise together instead of
    leaving the others waiting in a collective."""
    ok = torch.stack([torch.isfinite(z).all(),
                      torch.isfinite(bank_rows).all() if bank_rows is not None else z.new_ones((), dtype=torch.bool)])
    ok = comm.all_reduce(ok.to(torch.float32), op=dist.ReduceOp.MIN if comm.active else None,
                         name="all_reduce(check)").tolist()
    where = " on at least one rank" if comm.active else ""
    for name, fine in zip(("z", "the bank"), ok):
        if not fine:
            raise ValueError(f"{name} holds a non-finite value (NaN or inf){where}; check_finite=True rejects it")


def _compute_dtype(dtype):
    return torch.float32 if dtype in _HALF else dtype


def _num_pairs(n: int, k: int, include_diagonal: bool) -> int:
    return (n * n if include_diagonal else n * (n - 1)) + n * k


def _global_loss_and_grad(
    z: torch.Tensor,
    bank: torch.Tensor | None,
    comm: _Comm,
    variant: str,
    tau: float,
    margin: float,
    include_diagonal: bool,
    scale_by_dim: bool,
    ring: bool,
    covariance_mode: str,
    need_grad: bool,
    tile: int,
    backend: str = "auto",
):
    """(L of the global batch [+ bank], ∂L/∂z for this rank's rows) of flat z (n, D)."""
    n, dim = z.shape
    cdt = _compute_dtype(z.dtype)
    sizes = comm.all_gather_shapes(n, dim, z.device, z.dtype)
    n_total = sum(sizes)
    k = 0 if bank is None else bank.shape[0]
    zc = z.to(cdt)
    zero_grad = torch.zeros_like(z) if need_grad else None
    if n_total < 2 and k == 0:
        return torch.zeros((), dtype=cdt, device=z.device), zero_grad

    if variant == "covariance":
        return _covariance(z, zc, sizes, comm, ring, covariance_mode, need_grad, tile)

    if variant == "infonce_cosine":
        def prep(t):
            t = t.to(cdt)
            return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    else:
        def prep(t):
            return t.to(cdt)

    rows = prep(z)
    opts = dict(variant=variant, tau=tau, margin=margin, scale_by_dim=scale_by_dim,
                include_diagonal=include_diagonal, need_grad=need_grad, tile=tile, backend=backend)
    stats = None

    def add(st):  # the first column set's statistics are taken as they are
        return st if stats is None else _merge(stats, st, variant)

    if ring:
        for owner, block in comm.ring(z, sizes):
            off = 0 if owner == comm.rank else None
            stats = add(_row_stats(rows, prep(block), self_offset=off, grad_weight=2.0, **opts))
    else:
        allz = prep(comm.all_gather_rows(z, sizes))
        start = sum(sizes[: comm.rank])
        stats = add(_row_stats(rows, allz, self_offset=start, grad_weight=2.0, **opts))
    if k:
        stats = add(_row_stats(rows, prep(bank), self_offset=None, grad_weight=1.0, **opts))

    npairs = _num_pairs(n_total, k, include_diagonal)
    if npairs == 0:  # no row anywhere (n_total counts every rank: all return here, no collective skipped)
        return z.new_zeros((), dtype=cdt), (torch.zeros_like(z) if need_grad else None)
    inv_d = 1.0 / dim if scale_by_dim else 1.0
    if variant == "hinge":
        total = comm.all_reduce(stats.s.sum().reshape(1), name="all_reduce(stats)")[0]
        loss = total / npairs
        grad = None
        if need_grad:
            grad = -(2.0 / npairs) * inv_d * stats.acc
        return loss, grad

    # InfoNCE: global logsumexp of the per-row (m_i + log s_i)
    lse_rows = stats.m + torch.log(stats.s)  # −inf for a row with no pair
    local_max = lse_rows.max() if n else torch.tensor(float("-inf"), dtype=cdt, device=z.device)
    gmax = comm.all_reduce(local_max.reshape(1).clone(), op=dist.ReduceOp.MAX if comm.active else None,
                           name="all_reduce(stats)")[0]
    local_sum = torch.exp(lse_rows - gmax).sum()
    gsum = comm.all_reduce(local_sum.reshape(1), name="all_reduce(stats)")[0]
    lse = gmax + torch.log(gsum)
    loss = lse - math.log(npairs)
    if not need_grad:
        return loss, None
    coef = torch.exp(stats.m - lse)  # exp(−inf) = 0 for a row with no pair
    coef = torch.where(torch.isinf(stats.m), torch.zeros_like(coef), coef)
    if variant == "infonce_cosine":
        norm = zc.norm(dim=1, keepdim=True)
        proj = stats.acc - rows * (rows * stats.acc).sum(1, keepdim=True)
        grad = torch.where(norm > 1e-12, proj / norm.clamp_min(1e-12), stats.acc / 1e-12)
        grad = (inv_d / tau) * coef[:, None] * grad
    else:
        grad = -(inv_d / tau) * coef[:, None] * stats.acc
    return loss, grad


def _covariance(z, zc, sizes, comm, ring, covariance_mode, need_grad, tile):
    n, dim = zc.shape
    n_total = sum(sizes)
    colsum = comm.all_reduce(zc.sum(0), name="all_reduce(colsum)")
    zbar = zc - colsum / n_total
    colsq = comm.all_reduce(zbar.square().sum(0), name="all_reduce(colsq)")
    denom = (n_total - 1) ** 2
    mode = covariance_mode
    if mode == "auto":
        mode = "dxd" if 2 * dim <= n_total else "gram"
    if mode == "dxd":
        # D×D route: all-reduce the centred Z̄ᵀZ̄; the gradient row is z̄_i (G − diag G).
        g = comm.all_reduce(zbar.T @ zbar, name="all_reduce(DxD)")
        loss = (g.square().sum() - g.diagonal().square().sum()) / denom
        if not need_grad:
            return loss, None
        g_off = g - torch.diag_embed(g.diagonal())
        return loss, 4.0 / denom * (zbar @ g_off)

    mean = colsum / n_total
    opts = dict(variant="covariance", tau=1.0, margin=1.0, scale_by_dim=False, include_diagonal=True,
                self_offset=None, grad_weight=1.0, need_grad=need_grad, tile=tile)
    stats = _empty_stats(n, dim, "covariance", zc.dtype, z.device, need_grad)
    if ring:
        for _owner, block in comm.ring(z, sizes):
            stats = _merge(stats, _row_stats(zbar, block.to(zc.dtype) - mean, **opts), "covariance")
    else:
        allz = comm.all_gather_rows(z, sizes).to(zc.dtype) - mean
        stats = _row_stats(zbar, allz, **opts)
    total = comm.all_reduce(stats.s.sum().reshape(1), name="all_reduce(stats)")[0]
    loss = (total - colsq.square().sum()) / denom
    if not need_grad:
        return loss, None
    return loss, 4.0 / denom * (stats.acc - zbar * colsq)


class _GlobalDispersive(torch.autograd.Function):
    """Forward computes (loss, this rank's gradient); backward only scales it, so the
    backward pass has no collective (no deadlock if ranks differ in what they backward)."""

    @staticmethod
    def forward(ctx, z, bank, comm, opts, grad_scale, need_grad):
        # The loss computes in z's dtype (float32 for half z), whatever autocast region
        # the caller is in: its matmuls must not drop to bf16/fp16 behind its back.
        with torch.autocast(device_type=z.device.type, enabled=False):
            loss, grad = _global_loss_and_grad(z.detach(), bank, comm, need_grad=need_grad, **opts)
        if grad is not None:  # computed in float32 for half z; saved as the fused kernels save it
            grad = grad.to(saved_grad_dtype(z.dtype))
        ctx.grad_scale, ctx.z_dtype = grad_scale, z.dtype
        # the loss too: under create_graph it anchors the no-double-backward error to z
        ctx.save_for_backward(grad if grad is not None else z.new_empty(0), loss)
        return loss

    @staticmethod
    @first_order_only("the bank / distributed dispersive loss")
    def backward(ctx, grad_loss):
        grad = ctx.saved_tensors[0]
        return scale_saved_grad(grad, grad_loss * ctx.grad_scale, ctx.z_dtype), None, None, None, None, None


def _flat(z: torch.Tensor) -> torch.Tensor:
    """(N, *) → (N, D); explicit D, so that N = 0 (a rank with no rows) reshapes too."""
    return z.reshape(z.shape[0], math.prod(z.shape[1:]))


def _check_bank(bank, dim, z):
    if bank is None:
        return None
    if not isinstance(bank, torch.Tensor):
        rows = getattr(bank, "negatives", None)
        if rows is None:
            raise TypeError(f"bank must be a tensor of rows or a NegativeBank, got {type(bank).__name__}")
        bank = rows()
    bank = _flat(bank.detach())
    if bank.shape[1] != dim:
        raise ValueError(
            f"bank rows must have D = {dim} features like z (z of shape {tuple(z.shape)}), "
            f"got bank of shape {tuple(bank.shape)}"
        )
    if bank.device != z.device:
        raise ValueError(f"bank is on {bank.device} and z on {z.device}; they must share a device")
    return bank


def _resolve_backend(backend, device) -> str:
    """The backend of the row statistics (``_backend.resolve``, family ``dispersive_rows``);
    resolved before any collective, so that an unavailable one raises on every rank."""
    return _backend.resolve("dispersive_rows", backend, device)


def _check_common(variant, ring, covariance_mode, tile, bank):
    if not isinstance(ring, bool):
        raise TypeError(f"ring must be a bool, got {ring!r}")
    if covariance_mode not in COVARIANCE_MODES:
        raise ValueError(f"covariance_mode must be one of {COVARIANCE_MODES}, got {covariance_mode!r}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
    if bank is not None and variant == "covariance":
        raise ValueError(
            "variant='covariance' is not a loss over pairs, so a bank of negatives has no "
            "meaning for it; use an InfoNCE variant or hinge with bank=..."
        )


def distributed_dispersive_loss(
    z: torch.Tensor,
    group=None,
    variant: str = "infonce_l2",
    tau: float = 0.5,
    margin: float = 1.0,
    diagonal: str = "exclude",
    scale_by_dim: bool = False,
    ring: bool = False,
    bank: torch.Tensor | None = None,
    ddp_scale: bool = False,
    covariance_mode: str = "auto",
    tile: int = 1024,
    check_finite: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispersive loss of the global batch: the rows of every rank of ``group``.

    Every rank of ``group`` must call it (it runs collectives), with the same options and
    the same bank; an argument error raised on one rank only (a bad option) leaves the
    others waiting in a collective, so build the options identically. The value, identical on
    every rank, equals the single-process ``dispersive_loss(torch.cat(all ranks' z))``;
    ``z`` receives exactly its rows of the single-process gradient (times W with
    ``ddp_scale``). Without an initialised process group it is the single-process loss.

    Args:
        z: (n_k, *) this rank's rows; n_k may differ between ranks, and may be 1 or 0.
            D (the flattened feature size) must be equal on all ranks.
        group: the process group (None: the default group, if initialised).
        variant, tau, margin, diagonal, scale_by_dim: as in ``dispersive_loss``.
        ring: False: all-gather z (N·D memory per rank); True: pass column blocks round
            a ring with P2P (two blocks resident). Same bytes, same result.
        bank: optional (K, *) negatives (a tensor, or a ``NegativeBank``), detached, the
            SAME on every rank (fill it with ``NegativeBank.enqueue_global``): extra
            columns j for every global row i, counted once in P (see
            ``reference/dispersive_bank.py``). Not allowed with ``covariance``.
        ddp_scale: multiply the gradient (not the value) by the world size W, to cancel
            DistributedDataParallel's averaging over ranks.
        covariance_mode: ``"gram"`` (gather/ring, any D), ``"dxd"`` (all-reduce D×D)
            or ``"auto"`` (D×D when 2·D ≤ N).
        tile: rows/columns per tile of the reference row statistics (the fused kernels
            choose their own).
        check_finite: reject NaN/inf in z and in the bank's rows (on any rank).
        backend: of the row statistics: ``"auto"`` (the fused kernel of z's device:
            C++ on CPU, Triton on CUDA), ``"cpu"``, ``"triton"`` or ``"reference"``
            (PyTorch tiles). An unavailable one raises ``BackendUnavailable``.
            ``covariance`` always uses the PyTorch tiles.

    Returns:
        0-d tensor (z's dtype; float32 for half inputs).
    """
    _validate(z, variant, tau, margin, diagonal, scale_by_dim, False)
    _check_common(variant, ring, covariance_mode, tile, bank)
    chosen = _resolve_backend(backend, z.device)
    comm = _Comm(group)
    flat = _flat(z)
    bank_rows = _check_bank(bank, flat.shape[1], z)
    if check_finite:
        _check_finite(z, bank_rows, comm)
    opts = dict(variant=variant, tau=float(tau), margin=float(margin), include_diagonal=diagonal == "include",
                scale_by_dim=scale_by_dim, ring=ring, covariance_mode=covariance_mode, tile=tile, backend=chosen)
    grad_scale = float(comm.world) if ddp_scale else 1.0
    need_grad = torch.is_grad_enabled() and z.requires_grad
    return _GlobalDispersive.apply(flat, bank_rows, comm, opts, grad_scale, need_grad)


class DistributedDispersiveLoss(torch.nn.Module):
    """Module form of :func:`distributed_dispersive_loss`; ``forward(z, bank=None)``."""

    def __init__(
        self,
        variant: str = "infonce_l2",
        tau: float = 0.5,
        margin: float = 1.0,
        diagonal: str = "exclude",
        scale_by_dim: bool = False,
        group=None,
        ring: bool = False,
        ddp_scale: bool = False,
        covariance_mode: str = "auto",
        tile: int = 1024,
        backend: str = "auto",
    ):
        super().__init__()
        _validate(torch.zeros(2, 1), variant, tau, margin, diagonal, scale_by_dim, False)
        _check_common(variant, ring, covariance_mode, tile, None)
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        self.backend = backend
        self.variant, self.tau, self.margin = variant, float(tau), float(margin)
        self.diagonal, self.scale_by_dim, self.group = diagonal, scale_by_dim, group
        self.ring, self.ddp_scale, self.covariance_mode, self.tile = ring, ddp_scale, covariance_mode, tile

    def forward(self, z: torch.Tensor, bank=None) -> torch.Tensor:
        return distributed_dispersive_loss(
            z, self.group, self.variant, self.tau, self.margin, self.diagonal, self.scale_by_dim,
            ring=self.ring, bank=bank, ddp_scale=self.ddp_scale, covariance_mode=self.covariance_mode,
            tile=self.tile, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, tau={self.tau}, margin={self.margin}, diagonal={self.diagonal!r}, "
            f"scale_by_dim={self.scale_by_dim}, ring={self.ring}, ddp_scale={self.ddp_scale}, "
            f"covariance_mode={self.covariance_mode!r}, tile={self.tile}, "
            f"group={'default' if self.group is None else 'custom'}, backend={self.backend!r}"
        )


__all__ = ["distributed_dispersive_loss", "DistributedDispersiveLoss", "count_communication"]
