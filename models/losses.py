"""The paper's losses, on logits (spec/trainer.md, "Losses").

- ``dice_bce(logits, y)`` = BCE + (1 - (2 Σ p·y + 1) / (Σ p + Σ y + 1)), p = σ(logits),
  both terms over the whole batch (one Dice for the batch, as the authors compute it).
- Stage I: L = DiceBCE(p, y) + DiceBCE(p', y) + Cons(p, p') + λ·(disp + disp'),
  Cons(p, p') = BCE(p, 1[p' > .5]) + BCE(p', 1[p > .5]).
- Stage II: L = L_mask + β₁·L_fg + β₂·L_bg + L_comp + λ·disp, L_fg = DiceBCE(fg, y),
  L_bg = DiceBCE(bg, 1 - y), β = 1 / tanh(Σ σ(pred) / (H·W)) for fg and bg, L_comp the
  pairwise products of softmax([σ(fg), σ(bg), σ(uc)]) summed and divided by B·H·W.

Differences from the authors' code, on purpose:
- Inputs are logits and the with-logits BCE is used, so autocast (bf16 / fp16) works; all
  loss arithmetic runs in float32 whatever the autocast dtype.
- The authors' Stage II heads already end in a sigmoid and their DiceBCE applies another
  one (σ(σ(x))): here σ is applied exactly once.
- β's denominator tanh(·) is clamped below at ``beta_eps`` (1e-6; the authors add 1e-15,
  which lets β reach 1e15 when a map collapses to zero).
- The softmax of L_comp is taken over the sigmoid probabilities, as the authors do (their
  predictions are probabilities).
- λ is applied here, by the trainer, exactly as configured (the model returns the
  unweighted dispersive loss).

Data-parallel training: every function takes ``total``, which sums a tensor of batch sums
over the ranks (``models.ddp.Dist.sum``, an autograd-aware all-reduce; the identity in one
process). Every batch-wide reduction goes through it, one call per term, so each rank
computes the loss of the global batch and DDP's gradient average gives its exact gradient
(see ``models/ddp.py``).

No function here reads a value back to the host or copies one from it (a CUDA stream
synchronisation each): on a GPU the loss is issued behind the forward without waiting for
it (``tests/test_sync_free.py``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

Total = Callable[[torch.Tensor], torch.Tensor]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


def _count(t: torch.Tensor) -> torch.Tensor:
    # new_full fills on t's device: torch.tensor(..., device=cuda) would copy from the host
    # and synchronise the stream, stalling the step until the forward has run
    return t.new_full((), float(t.numel()), dtype=torch.float32)


def dice_bce(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0,
             total: Total = _local) -> torch.Tensor:
    """BCE-with-logits (mean) + soft Dice loss over the whole batch; float32 result."""
    x, y = logits.float(), target.float()
    p = torch.sigmoid(x)
    s = total(torch.stack([F.binary_cross_entropy_with_logits(x, y, reduction="sum"),
                           (p * y).sum(), p.sum(), y.sum(), _count(x)]))
    bce, inter, sp, sy, n = s.unbind()
    return bce / n + 1.0 - (2.0 * inter + smooth) / (sp + sy + smooth)


def consistency(logits_a: torch.Tensor, logits_b: torch.Tensor, total: Total = _local) -> torch.Tensor:
    """BCE(p_a, 1[p_b > .5]) + BCE(p_b, 1[p_a > .5]); σ(x) > .5 exactly when x > 0."""
    a, b = logits_a.float(), logits_b.float()
    ta, tb = (a.detach() > 0).float(), (b.detach() > 0).float()
    s = total(torch.stack([F.binary_cross_entropy_with_logits(a, tb, reduction="sum"),
                           F.binary_cross_entropy_with_logits(b, ta, reduction="sum"), _count(a)]))
    return (s[0] + s[1]) / s[2]


def _disp(d: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The dispersive term in float32 on ``like``'s device (0 when disabled: made there,
    not copied from the host)."""
    return d.float().to(like.device) if d is not None else like.new_zeros((), dtype=torch.float32)


def stage1_loss(out, out_aug, y: torch.Tensor, disp_weight: float,
                total: Total = _local) -> tuple[torch.Tensor, dict]:
    """Stage I loss of a batch and its strong copy; returns (total, float parts for logging)."""
    l_main = dice_bce(out.mask, y, total=total)
    l_aug = dice_bce(out_aug.mask, y, total=total)
    l_cons = consistency(out.mask, out_aug.mask, total=total)
    disp = _disp(out.disp_loss, l_main) + _disp(out_aug.disp_loss, l_main)
    loss = l_main + l_aug + l_cons + disp_weight * disp
    parts = {"mask": l_main.detach(), "mask_aug": l_aug.detach(), "cons": l_cons.detach(),
             "disp": disp.detach()}
    return loss, parts


def complementary(fg: torch.Tensor, bg: torch.Tensor, uc: torch.Tensor, total: Total = _local) -> torch.Tensor:
    """Σ (q_fg q_bg + q_fg q_uc + q_bg q_uc) / (B·H·W), q = softmax over [σ(fg), σ(bg), σ(uc)]."""
    probs = torch.softmax(torch.stack([torch.sigmoid(t.float()) for t in (fg, bg, uc)], dim=1), dim=1)
    q_fg, q_bg, q_uc = probs.unbind(1)
    B, H, W = fg.shape[0], fg.shape[-2], fg.shape[-1]
    s = total(torch.stack([(q_fg * q_bg).sum() + (q_fg * q_uc).sum() + (q_bg * q_uc).sum(),
                           probs.new_full((), float(B * H * W))]))
    return s[0] / s[1]


def balance_weight(logits: torch.Tensor, eps: float = 1e-6, total: Total = _local) -> torch.Tensor:
    """β = 1 / tanh(Σ σ(logits) / (H·W)), the tanh clamped at ``eps``."""
    p = torch.sigmoid(logits.float())
    return 1.0 / torch.tanh(total(p.sum()) / (p.shape[-2] * p.shape[-1])).clamp_min(eps)


def stage2_loss(out, y: torch.Tensor, disp_weight: float, beta_eps: float = 1e-6,
                total: Total = _local) -> tuple[torch.Tensor, dict]:
    """Stage II loss; returns (total, float parts for logging)."""
    if out.uncertainty is None:
        raise ValueError("stage2_loss: the model output has no uncertainty map (a Stage I model?)")
    l_mask = dice_bce(out.mask, y, total=total)
    l_fg = dice_bce(out.fg, y, total=total)
    l_bg = dice_bce(out.bg, 1.0 - y, total=total)
    b1, b2 = balance_weight(out.fg, beta_eps, total), balance_weight(out.bg, beta_eps, total)
    l_comp = complementary(out.fg, out.bg, out.uncertainty, total)
    disp = _disp(out.disp_loss, l_mask)
    loss = l_mask + b1 * l_fg + b2 * l_bg + l_comp + disp_weight * disp
    parts = {"mask": l_mask.detach(), "fg": l_fg.detach(), "bg": l_bg.detach(),
             "beta_fg": b1.detach(), "beta_bg": b2.detach(), "comp": l_comp.detach(),
             "disp": disp.detach()}
    return loss, parts
