"""What both stages share: the dispersive configuration, the output type, input checks,
the encoder and the dispersive loss of the configured feature."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import torch
from torch import nn

from disseg_kernels import BACKENDS, dispersive_loss

from .encoder import ResNetEncoder

FEATURES = ("f1", "f2", "f3", "f4")
GRANULARITIES = ("sample", "pixel")


@dataclasses.dataclass(frozen=True)
class DispersiveConfig:
    """The dispersive regularizer of one model (``shared/spec/dispersive.md``).

    Attributes:
        enabled: compute the loss (``SegOutput.disp_loss`` is None when False).
        variant, tau, margin, scale_by_dim: passed to ``disseg_kernels.dispersive_loss``
            (τ is read by the InfoNCE variants only, the margin ε by ``"hinge"`` only).
            With the hinge, ε must exceed the features' pairwise distances, or the term is
            exactly 0: at the paper's f4 and sample granularity they are in the tens to
            thousands (``scale_by_dim=True`` divides them by D).
        weight: λ. The model never applies it: the trainer multiplies ``disp_loss`` by it
            (the authors' Stage II passes 0.6 to the model and applies 0.2 in the
            training loop; here the configured value is the one applied).
        feature: which encoder feature (``"f1"``…``"f4"``; the paper's is f4).
        granularity: ``"sample"``: one row per sample (N = B, D = C·H·W, the paper's);
            ``"pixel"``: one row per pixel (N = B·H·W, D = C).
        backend: the dispersive backend of a ``fused=True`` model; a ``fused=False``
            model uses ``"reference"`` and refuses any other named backend.
    """

    enabled: bool = True
    variant: str = "infonce_l2"
    tau: float = 0.5
    margin: float = 1.0
    scale_by_dim: bool = False
    weight: float = 0.2
    feature: str = "f4"
    granularity: str = "sample"
    backend: str = "auto"

    def __post_init__(self):
        if not isinstance(self.enabled, bool):
            raise TypeError(f"enabled must be a bool, got {self.enabled!r}")
        if self.feature not in FEATURES:
            raise ValueError(f"feature must be one of {FEATURES}, got {self.feature!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weight must be a finite number ≥ 0, got {w!r}")
        # variant, tau, margin and scale_by_dim are checked by the loss itself (one message,
        # one place).
        dispersive_loss(torch.zeros(2, 1), **self.loss_options(), backend="reference")

    def loss_options(self) -> dict:
        """The options of ``disseg_kernels.dispersive_loss`` (and of its bank and
        distributed forms) that this configuration sets."""
        return dict(variant=self.variant, tau=self.tau, margin=self.margin, scale_by_dim=self.scale_by_dim)


class SegOutput(NamedTuple):
    """A forward pass's result. Every mask is (B, 1, H, W) **logits** (apply a sigmoid
    for probabilities; the losses use the with-logits forms).

    Attributes:
        mask: the main mask.
        fg, bg, uncertainty: the auxiliary head's masks (Stage II), None for Stage I.
        disp_loss: the unweighted dispersive loss (0-d float tensor; 0 for a batch of
            one sample at granularity "sample"), None when the regularizer is disabled.
    """

    mask: torch.Tensor
    fg: Optional[torch.Tensor] = None
    bg: Optional[torch.Tensor] = None
    uncertainty: Optional[torch.Tensor] = None
    disp_loss: Optional[torch.Tensor] = None


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (meta): off
        return False


def check_input(x: torch.Tensor, training: bool = False, param_dtype: torch.dtype | None = None) -> None:
    """Raise ValueError unless x is (B, 3, H, W) with B ≥ 1 and H, W positive multiples of
    16; in training mode BatchNorm also needs more than one value per channel at stride 16
    (B · H/16 · W/16 > 1). With ``param_dtype`` (the model's), a floating x of another dtype
    is a TypeError unless autocast is on for x's device (which casts for the convolutions)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"x must have shape (B, 3, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    if b < 1 or h < 16 or w < 16 or h % 16 or w % 16:
        raise ValueError(
            f"x must have shape (B, 3, H, W) with B ≥ 1 and H, W positive multiples of 16 "
            f"(the encoder's stride), got shape {tuple(x.shape)}"
        )
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if param_dtype is not None and x.dtype != param_dtype and not _autocast_on(x.device.type):
        raise TypeError(
            f"x has dtype {x.dtype} but the model's parameters are {param_dtype}: convert one "
            f"(x.to({param_dtype}) or model.to({x.dtype})), or run under torch.autocast"
        )
    if training and b * (h // 16) * (w // 16) == 1:
        raise ValueError(
            f"x of shape {tuple(x.shape)} leaves one value per channel at stride 16, which "
            f"BatchNorm cannot normalise in training mode: use B > 1 or H, W > 16 (or eval())"
        )


class MedDisSegBase(nn.Module):
    """The encoder and the dispersive loss, shared by Stage I and Stage II."""

    def __init__(self, encoder: str, fused: bool, dispersive: DispersiveConfig | None):
        super().__init__()
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {fused!r}")
        if dispersive is None:
            dispersive = DispersiveConfig()
        if not isinstance(dispersive, DispersiveConfig):
            raise TypeError(f"dispersive must be a DispersiveConfig, got {type(dispersive).__name__}")
        if not fused and dispersive.backend not in ("auto", "reference"):
            raise ValueError(
                f"fused=False runs the plain PyTorch path, which conflicts with "
                f"dispersive.backend={dispersive.backend!r}; use 'auto' or 'reference'"
            )
        self.fused = fused
        self.dispersive = dispersive
        self.encoder = ResNetEncoder(encoder)
        self._dispersive_fn = None

    def set_dispersive_fn(self, fn) -> None:
        """Compute the training-mode dispersive loss as ``fn(z)`` instead of
        ``disseg_kernels.dispersive_loss(z, **loss_options(), backend)``; None restores that.

        z is the (N, D) matrix of the configured feature and granularity. The trainer uses
        it for the global-batch loss under DDP and for the memory bank of negatives
        (``--disp-bank``); ``fn`` must apply the configured options (``loss_options()``) itself. In eval
        mode the model keeps the local loss, so that evaluation never runs collectives.
        """
        if fn is not None and not callable(fn):
            raise TypeError(f"fn must be callable or None, got {type(fn).__name__}")
        self._dispersive_fn = fn

    def check_input(self, x: torch.Tensor) -> None:
        """:func:`check_input` with this model's mode and parameter dtype."""
        check_input(x, self.training, self.encoder.conv1.weight.dtype)

    @property
    def dispersive_backend(self) -> str:
        return self.dispersive.backend if self.fused else "reference"

    def dispersive_term(self, feats: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """The unweighted dispersive loss of the configured feature, or None when disabled."""
        cfg = self.dispersive
        if not cfg.enabled:
            return None
        f = feats[FEATURES.index(cfg.feature)]
        if cfg.granularity == "sample":
            # reshape, not view: a channels_last feature is not viewable as (B, C·H·W)
            # (the authors' ``x4.view(B, -1)`` fails there). Rows keep the (C, H, W) order.
            z = f.reshape(f.shape[0], -1)
        else:
            z = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        if self.training and self._dispersive_fn is not None:
            return self._dispersive_fn(z)
        try:
            return dispersive_loss(z, **cfg.loss_options(), backend=self.dispersive_backend)
        except MemoryError as exc:
            if self.fused:
                raise
            raise MemoryError(f"fused=False computes the dispersive loss in plain PyTorch ({exc}); at "
                              f"granularity {cfg.granularity!r} of {cfg.feature} use fused=True") from None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"encoder": [...], "head": [...]}``: the authors train the encoder with a
        smaller learning rate than the rest."""
        enc = {id(p) for p in self.encoder.parameters()}
        return {
            "encoder": list(self.encoder.parameters()),
            "head": [p for p in self.parameters() if id(p) not in enc],
        }
