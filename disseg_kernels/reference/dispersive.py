"""The dispersive loss, in plain PyTorch, line by line against ``shared/spec/dispersive.md``.

This is the executable form of the spec: every fused backend is tested against it, and
its gradients come from autograd (float64-capable, double-backward included). It builds
N×N matrices, so it is meant for tests and small inputs, not for N = 65,536.

``eager_dispersive_loss`` is the other thing in this file: the authors' formulation
(cdist → mask → exp → mean → log, optionally with their ``+ 1e-8``), which the benchmarks
time as "eager" and the tests use to show why the stable loss is needed.
"""

from __future__ import annotations

import math

import torch

VARIANTS = ("infonce_l2", "infonce_l2sq", "infonce_cosine", "hinge", "covariance")
DIAGONALS = ("exclude", "include")


def _flatten(z: torch.Tensor) -> torch.Tensor:
    """(N, *) → (N, D); half types are read as they are and computed in float32."""
    z = z.reshape(z.shape[0], math.prod(z.shape[1:]))  # explicit D: N = 0 reshapes too
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    return z


def zero_loss(z: torch.Tensor) -> torch.Tensor:
    """0 with a zero gradient, still attached to z's graph (so backward() runs), even when z
    holds NaN or inf (``z.sum() * 0`` would be NaN there): the spec's N < 2 case."""
    return torch.where(torch.zeros((), dtype=torch.bool, device=z.device), z.sum(), 0.0)


def pairwise_distance(z: torch.Tensor, variant: str, scale_by_dim: bool) -> torch.Tensor:
    """d_ij of the spec's "Distances" section, (N, N)."""
    n, dim = z.shape
    if variant in ("infonce_l2", "hinge"):
        # Exact differences (no Gram-matrix cancellation); cdist's backward gives the
        # subgradient 0 where d_ij = 0 (duplicate rows).
        d = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist")
    elif variant == "infonce_l2sq":
        d = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").square()
    elif variant == "infonce_cosine":
        zhat = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = 1.0 - zhat @ zhat.T
    else:
        raise ValueError(f"variant {variant!r} has no pairwise distance")
    if scale_by_dim:
        d = d / dim
    return d


def dispersive_loss_reference(
    z: torch.Tensor,
    variant: str = "infonce_l2",
    tau: float = 0.5,
    margin: float = 1.0,
    diagonal: str = "exclude",
    scale_by_dim: bool = False,
) -> torch.Tensor:
    """L of the spec for z of shape (N, *); a 0-d tensor (float32 for half inputs)."""
    z = _flatten(z)
    n = z.shape[0]
    if n < 2:
        return zero_loss(z)

    if variant == "covariance":
        zc = z - z.mean(dim=0, keepdim=True)
        gram = zc @ zc.T  # N×N; never the D×D covariance
        col_sq = zc.square().sum(dim=0)  # Σ_i Z̄_ia², (D,)
        return (gram.square().sum() - col_sq.square().sum()) / (n - 1) ** 2

    d = pairwise_distance(z, variant, scale_by_dim)
    if diagonal == "exclude":
        # the N(N-1) off-diagonal pairs: in the row-major N×N matrix the diagonal entries
        # are N+1 apart, so dropping the last entry and cutting rows of N+1 puts exactly
        # one diagonal entry first in each row. (A boolean mask would select the same
        # entries, with a data-dependent shape that torch.compile(fullgraph=True) rejects.)
        d = d.reshape(-1)[:-1].reshape(n - 1, n + 1)[:, 1:].reshape(-1)
    else:
        d = d.reshape(-1)  # all N² pairs
    if variant == "hinge":
        return torch.relu(margin - d).square().mean()
    # log((1/|P|) Σ exp(-d/τ)) as a max-subtracted logsumexp, never log(mean(exp)).
    return torch.logsumexp(-d / tau, dim=0) - math.log(d.numel())


def eager_dispersive_loss(
    z: torch.Tensor,
    variant: str = "infonce_l2",
    tau: float = 0.5,
    margin: float = 1.0,
    diagonal: str = "exclude",
    scale_by_dim: bool = False,
    authors_eps: bool = False,
    fixed_shape_mask: bool = False,
) -> torch.Tensor:
    """The loss as the authors' code writes it: eager PyTorch in z's own dtype, via autograd.

    cdist (its default, Gram-matrix mode) → mask → exp → mean → log; the covariance from the
    D×D matrix. This is "eager" in the benchmarks and the yardstick of every error bound
    ("no worse than twice eager PyTorch's own error in that dtype"). With ``authors_eps``
    it is their ``log(mean(exp(-d/τ)) + 1e-8)``, which underflows to the constant
    log(1e-8) = -18.42 with a zero gradient once every d/τ is above ~104.

    The excluded diagonal is a boolean index (``d[~eye]``: a copy of the N(N-1) pairs, the
    eager the issue's targets and its 2.2 GB at (8192, 256) refer to). Its shape depends on
    the data, so torch.compile splits the graph there (at aten.nonzero) and fuses nothing
    across it. ``fixed_shape_mask=True`` writes the same sum with ``torch.where`` over the
    N x N terms instead: one graph, which is what the benchmarks' torch.compile baseline
    compiles (the strongest compile of this formula, not a crippled one).
    """
    z = z.reshape(z.shape[0], -1)
    n, dim = z.shape
    if variant == "covariance":
        zc = z - z.mean(dim=0, keepdim=True)
        cov = zc.T @ zc / (n - 1)  # D×D: what the 275 GB figure is about
        return (cov.square().sum() - cov.diagonal().square().sum())
    if variant == "infonce_cosine":
        zn = torch.nn.functional.normalize(z, dim=1)
        d = 1.0 - zn @ zn.T
    elif z.dtype in (torch.float16, torch.bfloat16) and z.device.type == "cpu":
        # cdist has no CPU half kernel; this is what its Gram-matrix mode computes.
        sq = z.square().sum(dim=1)
        d2 = (sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)).clamp_min(0)
        d = d2 if variant == "infonce_l2sq" else d2.clamp_min(torch.finfo(z.dtype).tiny).sqrt()
    else:
        d = torch.cdist(z, z)
        if variant == "infonce_l2sq":
            d = d.square()
    if scale_by_dim:
        d = d / dim
    off = ~torch.eye(n, dtype=torch.bool, device=z.device) if diagonal == "exclude" else None
    if off is not None and not fixed_shape_mask:
        d = d[off]
    terms = torch.relu(margin - d).square() if variant == "hinge" else torch.exp(-d / tau)
    if off is not None and fixed_shape_mask:
        e = torch.where(off, terms, 0.0).sum() / (n * (n - 1))
    else:
        e = terms.mean()
    if variant == "hinge":
        return e
    return torch.log(e + 1e-8) if authors_eps else torch.log(e)
