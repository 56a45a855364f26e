"""The Med-DisSeg network (``shared/spec/model.md``) on the ``disseg_kernels`` ops.

``MedDisSegStage1`` and ``MedDisSegStage2`` return a :class:`SegOutput` of **logits**
and the unweighted dispersive loss; ``build_model(stage, ...)`` builds either;
``transfer_stage1_to_stage2`` carries the encoder over; ``load_torchvision_resnet``
loads an ImageNet ResNet checkpoint from a local file.

Deliberate differences from the authors' code (xiaoquan-1/Med-DisSeg on ConDSeg), each
documented where it is made:

- every head returns logits, not sigmoid probabilities (``models.blocks``): the authors'
  ``sigmoid`` + ``binary_cross_entropy`` cannot run under autocast;
- the dispersive loss is ``disseg_kernels.dispersive_loss`` (logsumexp, no ``+1e-8``
  that flattens the loss to a constant at the model's scale), of a configurable feature
  and granularity, returned unweighted: the configured λ is the one the trainer applies
  (the authors' Stage II passes 0.6 to the model and applies 0.2) (``models.base``);
- the feature is flattened with ``reshape``, so channels_last works (the authors'
  ``view`` fails there) (``models.base``);
- any H, W divisible by 16 (the authors' ``H``, ``W`` arguments are unused), with a clear
  error otherwise;
- TeLU has finite gradients where the authors' ``x * tanh(exp(x))`` gives NaN, fused
  (the finite derivative) and plain (eˣ of min(x, 10): the same values);
- ``fused=True`` routes the listed ops (``FUSED_OPS``) through the fused kernels;
  ``fused=False`` is the plain PyTorch path; the two agree within float32 rounding.
"""

from __future__ import annotations

from .base import DispersiveConfig, SegOutput
from .encoder import ENCODERS, LoadReport, ResNetEncoder, load_torchvision_resnet
from .stage1 import MedDisSegStage1
from .stage2 import MedDisSegStage2
from .transfer import TransferReport, transfer_stage1_to_stage2

# Where the model uses which disseg_kernels op family: the ONE list of them. With
# fused=True every entry is called in its fused form (modules get fused=True, functional
# ops backend="auto" — the dispersive loss: DispersiveConfig.backend); with fused=False in
# its plain PyTorch form (fused=False / backend="reference"). Whether a fused kernel
# exists for a device is each op's business (disseg_kernels._backend), not the model's:
# until one lands, the op itself runs its reference path.
FUSED_OPS: dict[str, tuple[str, ...]] = {
    "telu": (
        "disseg_kernels.TeLU: the activation of every CBT (conv-BN-TeLU), both stages",
    ),
    "gates": (
        "disseg_kernels.ELAT: Stage I head, one per feature (4)",
        "disseg_kernels.ChannelAttention: each branch of dconv1..4 (16)",
        "disseg_kernels.SpatialAttention: end of dconv1..4 (4)",
        "disseg_kernels.CBATGates: the ca -> sa -> CBAM chain of the 3 decoder blocks",
    ),
    "multiscale": (
        "disseg_kernels.multiscale_concat: CDFA inputs cat(d_k, up2(cdfa_{k+1})) (3)",
        "disseg_kernels.multiscale_concat: decoder blocks cat(up2(x), skip) (3)",
        "disseg_kernels.multiscale_concat: output block cat(x1, up2(x2), up4(x3)) (1)",
        "disseg_kernels.multiscale_concat: every other bilinear upsample, as a concatenation of one "
        "input (Stage I head x2..x16 (4); Stage II guide preprocessing, auxiliary branches, output block)",
    ),
    "window_attention": (
        "disseg_kernels.ContrastDrivenFeatureAggregation: cdfa4..cdfa1 (Stage II)",
    ),
    "dispersive": (
        "disseg_kernels.dispersive_loss: the configured feature (f4 by default), both stages",
    ),
}

_STAGES = {1: MedDisSegStage1, 2: MedDisSegStage2}


def build_model(stage: int, **kwargs) -> MedDisSegStage1 | MedDisSegStage2:
    """``MedDisSegStage1(**kwargs)`` for stage 1, ``MedDisSegStage2(**kwargs)`` for stage 2."""
    if stage not in _STAGES:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    return _STAGES[stage](**kwargs)


__all__ = [
    "DispersiveConfig",
    "ENCODERS",
    "FUSED_OPS",
    "LoadReport",
    "MedDisSegStage1",
    "MedDisSegStage2",
    "ResNetEncoder",
    "SegOutput",
    "TransferReport",
    "build_model",
    "load_torchvision_resnet",
    "transfer_stage1_to_stage2",
]
