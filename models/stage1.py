"""Stage I of Med-DisSeg ("MedDisSeg1"): the encoder and a light multi-scale head."""

from __future__ import annotations

import torch

from .base import DispersiveConfig, MedDisSegBase, SegOutput
from .blocks import StageOneHead


class MedDisSegStage1(MedDisSegBase):
    """Encoder (ResNet stem + layer1..3) → :class:`~models.blocks.StageOneHead` → one mask.

    Parameters at ResNet-50: 8,673,884 (encoder 8,543,296, head 130,588).

    Args:
        encoder: ``"resnet50"`` (the paper's), ``"resnet34"`` or ``"resnet18"``.
        fused: route TeLU, ELAT and the dispersive loss through the fused
            ``disseg_kernels`` ops (True) or the plain PyTorch path (False); same
            parameters, same function (see ``models.FUSED_OPS``).
        dispersive: the regularizer's configuration (default: enabled, f4, per sample).
        conv_first: run each head branch's 1×1 conv before the upsampling (default; the
            same function, see :class:`~models.blocks.StageOneHead`); False: the literal
            order (upsample, then conv).

    ``forward(x)``: x (B, 3, H, W), H and W multiples of 16 → :class:`SegOutput` with
    ``mask`` (B, 1, H, W) **logits** (the authors end in a sigmoid), ``fg``, ``bg``,
    ``uncertainty`` None and ``disp_loss`` (unweighted) or None.
    """

    def __init__(
        self,
        encoder: str = "resnet50",
        fused: bool = True,
        dispersive: DispersiveConfig | None = None,
        conv_first: bool = True,
    ):
        if not isinstance(conv_first, bool):
            raise TypeError(f"conv_first must be a bool, got {conv_first!r}")
        super().__init__(encoder, fused, dispersive)
        self.head = StageOneHead(self.encoder.channels, fused=fused, conv_first=conv_first)

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.check_input(x)
        feats = self.encoder(x)
        disp = self.dispersive_term(feats)
        return SegOutput(mask=self.head(feats), disp_loss=disp)
