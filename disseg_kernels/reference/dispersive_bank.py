"""The dispersive loss with a memory bank of negatives, in plain PyTorch: the spec's
exact extension, line by line.

Definition (extends ``shared/spec/dispersive.md``)
--------------------------------------------------
Batch rows Z ∈ R^{N×D} (with gradient) and bank rows B ∈ R^{K×D} (detached: constants,
no gradient), both flattened to the same D. The pairs are

    P = P_batch ∪ P_bank,
    P_batch = {(i, j) : i, j ∈ batch, i ≠ j}   (diagonal="exclude"; all N² with "include")
    P_bank  = {(i, b) : i ∈ batch, b ∈ bank}   (each once: the bank is never a row i)

so |P| = N(N−1) + N·K (or N² + N·K). The distance d is that of the variant (the same
d_ij of the spec for (i, j), with z_j replaced by b for a bank pair; ``scale_by_dim``
divides by D), and

    InfoNCE variants: L = log( (1/|P|) Σ_{(i,j)∈P} exp(−d_ij/τ) )     (a logsumexp)
    hinge:            L = (1/|P|) Σ_{(i,j)∈P} max(0, ε − d_ij)²

K = 0 is the spec's loss. |P| = 0 (N < 2 and K = 0) gives 0 with a zero gradient; N = 1
with K > 0 has the N·K bank pairs and a non-zero loss. The gradient of a batch row is the
exact derivative: a batch pair (i, j) contributes through both z_i and z_j (the factor 2
of the spec's p_ij + p_ji), a bank pair only through z_i:

    ∂L/∂z_i = −(1/τ) [ Σ_{j∈batch} 2 p_ij ∂d_ij/∂z_i + Σ_{b∈bank} p_ib ∂d_ib/∂z_i ]

with p the softmax weights over P. ``covariance`` is not a loss over pairs and has no bank
extension (ValueError). This file builds the N×N and N×K distance matrices: for tests and
small inputs only; ``disseg_kernels.bank.dispersive_loss_with_bank`` is the tiled form.
"""

from __future__ import annotations

import math

import torch

from .dispersive import _flatten, pairwise_distance


def cross_distance(z: torch.Tensor, bank: torch.Tensor, variant: str, scale_by_dim: bool) -> torch.Tensor:
    """d(z_i, b_k) of the variant, (N, K); exact differences for the L2 family."""
    dim = z.shape[1]
    if variant in ("infonce_l2", "hinge"):
        d = torch.cdist(z, bank, compute_mode="donot_use_mm_for_euclid_dist")
    elif variant == "infonce_l2sq":
        d = torch.cdist(z, bank, compute_mode="donot_use_mm_for_euclid_dist").square()
    elif variant == "infonce_cosine":
        zhat = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        bhat = bank / bank.norm(dim=1, keepdim=True).clamp_min(1e-12)
        d = 1.0 - zhat @ bhat.T
    else:
        raise ValueError(f"variant {variant!r} has no pairwise distance (a bank needs a pairwise variant)")
    return d / dim if scale_by_dim else d


def dispersive_loss_bank_reference(
    z: torch.Tensor,
    bank: torch.Tensor,
    variant: str = "infonce_l2",
    tau: float = 0.5,
    margin: float = 1.0,
    diagonal: str = "exclude",
    scale_by_dim: bool = False,
) -> torch.Tensor:
    """L of the module docstring for z (N, *) and bank (K, *); 0-d (float32 for half z)."""
    if variant == "covariance":
        raise ValueError("variant='covariance' is not a loss over pairs and has no bank extension")
    z = _flatten(z)
    bank = _flatten(bank.detach()).to(z.dtype)
    n, k = z.shape[0], bank.shape[0]
    if bank.shape[1] != z.shape[1]:
        raise ValueError(f"bank must have D = {z.shape[1]} features, got shape {tuple(bank.shape)}")
    if (n < 2 and k == 0) or n == 0:
        return z.sum() * 0.0

    d = pairwise_distance(z, variant, scale_by_dim)
    if diagonal == "exclude":
        d = d[~torch.eye(n, dtype=torch.bool, device=z.device)]
    else:
        d = d.reshape(-1)
    d = torch.cat([d, cross_distance(z, bank, variant, scale_by_dim).reshape(-1)])  # the |P| pairs
    if variant == "hinge":
        return torch.relu(margin - d).square().mean()
    return torch.logsumexp(-d / tau, dim=0) - math.log(d.numel())
