"""Data-parallel training on ``torch.distributed``: the process group, batch sums across
ranks, and a synchronised BatchNorm that also runs on CPU (gloo).

The trainer (``models/trainer.py``) uses this module when it is launched by ``torchrun``
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the
environment) with ``--ddp``::

    torchrun --nproc_per_node=4 -m models.cli train --ddp --stage 1 --data ROOT --out runs/s1

Conventions (what makes N processes of batch B train exactly like one process of batch
N·B, which ``tests/test_ddp.py`` checks):

- every batch-wide sum of the losses (the Dice sums, the BCE means, Stage II's β and
  L_comp) is an autograd-aware all-reduce (:func:`Dist.sum`), so every rank holds the
  value of the global batch's loss and its gradient is W times the rank's share;
  DistributedDataParallel's gradient average divides the W back out;
- the dispersive loss is ``disseg_kernels.distributed_dispersive_loss(..., ddp_scale=True)``:
  the negatives are every rank's rows, with the same convention;
- BatchNorm statistics are global with ``--sync-bn`` (``torch.nn.SyncBatchNorm`` on CUDA,
  :class:`GlobalBatchNorm2d` on CPU, where torch's refuses to run); without it each rank
  normalises with its own slice's statistics, DDP's usual behaviour.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import UserError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Dist:
    """This process's place in the job. ``Dist()`` is a job of one process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def active(self) -> bool:
        """A process group is initialised (even of one process)."""
        return self.backend is not None

    @property
    def main(self) -> bool:
        """The process that writes files (logs, checkpoints, plots)."""
        return self.rank == 0

    # -------------------------------------------------------------- collectives
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Σ over ranks of t, with a gradient (the backward is the same all-reduce).

        Used for the losses' batch sums: each rank gets the global value, and the
        gradient of a rank's inputs is W × their share of the global gradient, which
        DDP's average over W ranks turns into the exact global gradient."""
        if self.world == 1:
            return t
        return all_reduce_sum(t)

    def gather_objects(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_ranks x on every rank; the gradient of x is Σ_ranks of the gradients of y."""

    @staticmethod
    def forward(ctx, x):
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad):
        g = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Differentiable all-reduce (sum) over the default process group."""
    return _AllReduceSum.apply(t)


def init_distributed(device_name: str, timeout_s: float = 1800.0) -> tuple[Dist, torch.device]:
    """Join the job described by torchrun's environment variables.

    The backend is NCCL for CUDA and gloo for CPU; a CUDA process uses device LOCAL_RANK.
    Raises UserError (naming what is missing) when not launched by torchrun.
    """
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise UserError("--ddp: launch with torchrun (for example `torchrun --nproc_per_node=2 -m models.cli "
                        f"train --ddp ...`); the environment lacks {', '.join(missing)}")
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise UserError("--ddp: RANK, WORLD_SIZE and LOCAL_RANK must be integers, got "
                        + ", ".join(f"{k}={os.environ[k]!r}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))) from None
    want_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise UserError("--device=cuda: no CUDA device is available to this torch; use --device cpu")
        if local >= torch.cuda.device_count():
            raise UserError(f"--ddp: LOCAL_RANK={local} but this machine shows {torch.cuda.device_count()} "
                            "CUDA devices; start at most that many processes per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return Dist(rank=rank, world=world, local_rank=local, backend=backend), device


def shutdown(d: Dist) -> None:
    """Leave the process group, all ranks together: a rank that tore its group down while a
    peer still used it was seen to abort at exit (gloo, std::terminate)."""
    if d.active and dist.is_initialized():
        try:
            d.barrier()
        finally:
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------
# synchronised BatchNorm


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are those of the global batch.

    Same parameters, buffers and state_dict keys as BatchNorm2d. In training mode under a
    process group of more than one rank the mean and the (biased) variance are computed
    from sums all-reduced over the ranks, in two passes (mean first, then the centred
    squares, which avoids the E[x²] − E[x]² cancellation); the all-reduces carry the
    gradient, so backward is exact. The running statistics use the unbiased global
    variance, as BatchNorm2d does. Otherwise it is BatchNorm2d.

    torch.nn.SyncBatchNorm does the same with fused CUDA kernels but refuses CPU tensors;
    :func:`convert_sync_batchnorm` picks that one on CUDA and this one on CPU.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        if x.dim() != 4:
            raise ValueError(f"GlobalBatchNorm2d: expected a 4-d input, got shape {tuple(x.shape)}")
        xf = x.float()
        count = torch.tensor([x.shape[0] * x.shape[2] * x.shape[3]], dtype=torch.float32, device=x.device)
        s1 = all_reduce_sum(torch.cat([xf.sum((0, 2, 3)), count]))
        n = s1[-1]
        if float(n.detach()) < 2:
            raise ValueError(f"GlobalBatchNorm2d: {int(n)} value(s) per channel in the global batch; "
                             "training-mode BatchNorm needs more than one")
        mean = s1[:-1] / n
        xc = xf - mean[None, :, None, None]
        var = all_reduce_sum(xc.square().sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = xc * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight.float()[None, :, None, None] + self.bias.float()[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``model`` synchronised over the process group (in place where
    possible; returns the model): ``torch.nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm2d`
    on CPU. Parameters and buffers keep their values and state_dict keys."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def convert(m: nn.Module) -> nn.Module:
        if type(m) is nn.BatchNorm2d:
            g = GlobalBatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                  device=(m.weight.device if m.affine else None))
            g.load_state_dict(m.state_dict())
            g.train(m.training)
            return g
        for name, child in m.named_children():
            new = convert(child)
            if new is not child:
                setattr(m, name, new)
        return m

    return convert(model)

