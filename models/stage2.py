"""Stage II of Med-DisSeg ("MedDisSeg2"): the ConDSeg body with Med-DisSeg's changes."""

from __future__ import annotations

import torch
from torch import nn

from disseg_kernels import ContrastDrivenFeatureAggregation, multiscale_concat

from .base import DispersiveConfig, MedDisSegBase, SegOutput
from .blocks import (
    AuxiliaryHead,
    CBATDecoderBlock,
    DecoupleLayer,
    DilatedConvEnhancement,
    GuidePreprocess,
    OutputBlock,
    op_backend,
)

# Guide-map scales: CDFA k works at 1/2^k of the input; the guide maps come from the
# decoupled f4 (1/16), upsampled by 1, 2, 4, 8.
_GUIDE_UP = {4: 1, 3: 2, 2: 4, 1: 8}


class MedDisSegStage2(MedDisSegBase):
    """Encoder → feature enhancement (dconv1…4) → decouple layer (fg / bg / uncertainty
    on f4) → auxiliary head; guide maps → CDFA 4, 3, 2, 1 (coarse to fine, each on
    cat(d_k, up2(CDFA_{k+1}))) → three CBAT decoder blocks → output block.

    Parameters at ResNet-50: 45,559,635 (per module: ``shared/spec/model.md``).

    Args:
        encoder: ``"resnet50"`` (the paper's), ``"resnet34"`` or ``"resnet18"``.
        fused: route TeLU, the gates, the multi-scale concatenations, CDFA and the
            dispersive loss through the fused ``disseg_kernels`` ops (True) or the plain
            PyTorch path (False); same parameters, same function (``models.FUSED_OPS``).
        dispersive: the regularizer's configuration (default: enabled, f4, per sample).

    ``forward(x)``: x (B, 3, H, W), H and W multiples of 16 → :class:`SegOutput`:
    ``mask``, ``fg``, ``bg``, ``uncertainty``, all (B, 1, H, W) **logits** (the authors
    end every head in a sigmoid), and ``disp_loss`` (unweighted) or None.
    """

    def __init__(self, encoder: str = "resnet50", fused: bool = True, dispersive: DispersiveConfig | None = None):
        super().__init__(encoder, fused, dispersive)
        c = 128
        ch = self.encoder.channels
        self.backend = op_backend(fused)
        self.dconv1 = DilatedConvEnhancement(ch[0], c, fused=fused)
        self.dconv2 = DilatedConvEnhancement(ch[1], c, fused=fused)
        self.dconv3 = DilatedConvEnhancement(ch[2], c, fused=fused)
        self.dconv4 = DilatedConvEnhancement(ch[3], c, fused=fused)
        self.decouple = DecoupleLayer(ch[3], c, fused=fused)
        self.guide_fg = nn.ModuleDict({f"s{k}": GuidePreprocess(c, c, up, fused=fused) for k, up in _GUIDE_UP.items()})
        self.guide_bg = nn.ModuleDict({f"s{k}": GuidePreprocess(c, c, up, fused=fused) for k, up in _GUIDE_UP.items()})
        self.aux_head = AuxiliaryHead(c, fused=fused)
        self.cdfa4 = ContrastDrivenFeatureAggregation(c, c, num_heads=4, fused=fused)
        self.cdfa3 = ContrastDrivenFeatureAggregation(2 * c, c, num_heads=4, fused=fused)
        self.cdfa2 = ContrastDrivenFeatureAggregation(2 * c, c, num_heads=4, fused=fused)
        self.cdfa1 = ContrastDrivenFeatureAggregation(2 * c, c, num_heads=4, fused=fused)
        self.decoder_small = CBATDecoderBlock(c, c, scale=2, fused=fused)
        self.decoder_middle = CBATDecoderBlock(c, c, scale=2, fused=fused)
        self.decoder_large = CBATDecoderBlock(c, c, scale=2, fused=fused)
        self.output_block = OutputBlock(c, 1, fused=fused)

    def forward(self, x: torch.Tensor) -> SegOutput:
        self.check_input(x)
        feats = self.encoder(x)
        disp = self.dispersive_term(feats)
        d1, d2, d3, d4 = (m(f) for m, f in zip((self.dconv1, self.dconv2, self.dconv3, self.dconv4), feats))

        f_fg, f_bg, f_uc = self.decouple(feats[3])
        mask_fg, mask_bg, mask_uc = self.aux_head(f_fg, f_bg, f_uc)
        g_fg = {k: m(f_fg) for k, m in self.guide_fg.items()}
        g_bg = {k: m(f_bg) for k, m in self.guide_bg.items()}

        c4 = self.cdfa4(d4, g_fg["s4"], g_bg["s4"])
        c3 = self.cdfa3(multiscale_concat([d3, c4], [1, 2], backend=self.backend), g_fg["s3"], g_bg["s3"])
        c2 = self.cdfa2(multiscale_concat([d2, c3], [1, 2], backend=self.backend), g_fg["s2"], g_bg["s2"])
        c1 = self.cdfa1(multiscale_concat([d1, c2], [1, 2], backend=self.backend), g_fg["s1"], g_bg["s1"])

        small = self.decoder_small(c2, c1)  # 1/2
        middle = self.decoder_middle(c3, c2)  # 1/4
        large = self.decoder_large(c4, c3)  # 1/8
        mask = self.output_block(small, middle, large)
        return SegOutput(mask=mask, fg=mask_fg, bg=mask_bg, uncertainty=mask_uc, disp_loss=disp)
