"""A memory bank of negatives for the dispersive loss, in the manner of MoCo.

``NegativeBank`` is a fixed-size FIFO queue of K past embeddings (detached), written with
wrap-around; until it has been filled, only its valid rows are used. Its state (rows,
write pointer, fill count) lives in buffers, so it is saved in a checkpoint's state_dict
and a resumed run continues with the same negatives.

``dispersive_loss_with_bank`` is the spec's loss extended with the bank rows as extra
negative columns (formula: ``disseg_kernels/reference/dispersive_bank.py``). It never
builds the N×(N+K) matrix: the bank is a second column set of the same row-statistics
primitive as the batch (``disseg_kernels.distributed._row_stats``: the fused C++ or Triton
kernel, or the PyTorch tiles with ``backend="reference"``), with column weight 1 instead
of 2 because bank rows receive no gradient.

Typical use in a training step::

    bank = NegativeBank(dim=D, size=K, device=z.device)          # once; a model submodule
    loss = task + lam * dispersive_loss_with_bank(z, bank)       # or bank.negatives()
    loss.backward(); opt.step()
    bank.enqueue(z)                  # after the step; under DDP: bank.enqueue_global(z)

Under DDP use ``distributed_dispersive_loss(z, bank=bank, ...)`` and
``bank.enqueue_global(z)``, which gathers every rank's rows so that every rank holds the
same bank (the distributed loss requires it).
"""

from __future__ import annotations

import torch

from .distributed import (
    _Comm,
    _check_bank,
    _check_finite,
    _check_common,
    _flat,
    _GlobalDispersive,
    _resolve_backend,
    _validate,
)


class NegativeBank(torch.nn.Module):
    """FIFO queue of ``size`` detached rows of ``dim`` features.

    Args:
        dim: D, the flattened feature size of the embeddings (z.reshape(N, -1).shape[1]).
        size: K > 0, the number of rows kept.
        dtype: storage dtype (bfloat16 halves the memory of a large bank; the loss reads
            it in float32).
        device: storage device (the embeddings' device).
    """

    def __init__(self, dim: int, size: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.dim, self.size = dim, size
        self.register_buffer("rows", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64, device=device))

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor) -> None:
        """Append the rows of z (N, *) (detached); the oldest rows are overwritten."""
        flat = _flat(z.detach())
        if flat.shape[1] != self.dim:
            raise ValueError(f"z must have dim = {self.dim} features per row, got shape {tuple(z.shape)}")
        n = flat.shape[0]
        if n == 0:
            return
        if n > self.size:  # only the newest `size` rows survive
            skip = n - self.size
            flat = flat[skip:]
            self.ptr.add_(skip).remainder_(self.size)
            n = self.size
        idx = (self.ptr + torch.arange(n, device=self.rows.device)) % self.size
        self.rows[idx] = flat.to(self.rows.device, self.rows.dtype)
        self.ptr.add_(n).remainder_(self.size)
        self.count.add_(n).clamp_(max=self.size)

    @torch.no_grad()
    def enqueue_global(self, z: torch.Tensor, group=None) -> None:
        """Enqueue every rank's rows, in rank order, so all ranks keep the same bank.
        Every rank of ``group`` must call it; ranks may hold different numbers of rows.
        Without an initialised process group it is :meth:`enqueue`."""
        flat = _flat(z.detach())
        comm = _Comm(group)
        if comm.world == 1:
            self.enqueue(flat)
            return
        if flat.shape[1] != self.dim:
            raise ValueError(f"z must have dim = {self.dim} features per row, got shape {tuple(z.shape)}")
        sizes = comm.all_gather_shapes(flat.shape[0], flat.shape[1], flat.device, flat.dtype)
        self.enqueue(comm.all_gather_rows(flat.contiguous(), sizes))

    def negatives(self) -> torch.Tensor:
        """The valid rows (count × dim), detached; a view: read it before the next enqueue."""
        return self.rows[: int(self.count)].detach()

    def reset(self) -> None:
        self.rows.zero_()
        self.ptr.zero_()
        self.count.zero_()

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, dtype={self.rows.dtype}"


def dispersive_loss_with_bank(
    z: torch.Tensor,
    bank,
    variant: str = "infonce_l2",
    tau: float = 0.5,
    margin: float = 1.0,
    diagonal: str = "exclude",
    scale_by_dim: bool = False,
    tile: int = 1024,
    check_finite: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispersive loss of z (N, *) with the bank rows as extra negatives.

    L over P = {(i, j): i, j in the batch, i ≠ j (all with diagonal="include")}
             ∪ {(i, b): i in the batch, b in the bank}:
    InfoNCE: log((1/|P|) Σ_P exp(−d/τ)); hinge: (1/|P|) Σ_P max(0, ε − d)².
    |P| = N(N−1) + N·K (N² + N·K). The bank rows are detached and get no gradient; no
    N×(N+K) matrix is built. An empty bank gives ``dispersive_loss(z)``.

    Args:
        z: (N, *) embeddings, any float dtype (half accumulates in float32).
        bank: a ``NegativeBank`` (its valid rows) or a (K, *) tensor with the same D.
        variant, tau, margin, diagonal, scale_by_dim: as in ``dispersive_loss``;
            ``covariance`` is not a pair loss and is rejected.
        tile: rows/columns per tile of the reference row statistics.
        check_finite: reject NaN/inf in z and in the bank's rows (a device sync).
        backend: of the row statistics (``_row_stats``): ``"auto"`` (C++ on CPU, Triton
            on CUDA), ``"cpu"``, ``"triton"`` or ``"reference"`` (PyTorch tiles); an
            unavailable one raises ``BackendUnavailable``.

    Returns:
        0-d tensor (z's dtype; float32 for half inputs).
    """
    _validate(z, variant, tau, margin, diagonal, scale_by_dim, False)
    _check_common(variant, False, "auto", tile, bank)
    chosen = _resolve_backend(backend, z.device)
    flat = _flat(z)
    bank_rows = _check_bank(bank, flat.shape[1], z)
    if bank_rows is not None and bank_rows.shape[0] == 0:
        bank_rows = None
    if check_finite:
        _check_finite(z, bank_rows, _LOCAL)
    opts = dict(variant=variant, tau=float(tau), margin=float(margin), include_diagonal=diagonal == "include",
                scale_by_dim=scale_by_dim, ring=False, covariance_mode="auto", tile=tile, backend=chosen)
    need_grad = torch.is_grad_enabled() and z.requires_grad
    return _GlobalDispersive.apply(flat, bank_rows, _LOCAL, opts, 1.0, need_grad)


class _LocalComm(_Comm):
    """A world of one, whatever the process group: the bank loss is per-process."""

    def __init__(self):
        self.active, self.group, self.world, self.rank = False, None, 1, 0


_LOCAL = _LocalComm()

__all__ = ["NegativeBank", "dispersive_loss_with_bank"]
