"""The building blocks of Med-DisSeg's two stages (``shared/spec/model.md``).

Every block takes ``fused``: it is passed to each ``disseg_kernels`` module the block
builds (TeLU, the attention gates, the multi-scale concatenation) and picks the backend of
the functional ops (``"auto"`` when fused, ``"reference"`` otherwise). The parameters are
the same in both modes, so one state dict serves both. ``models.FUSED_OPS`` lists where
the model uses which fused op.

Deliberate differences from the authors' code (xiaoquan-1/Med-DisSeg, on ConDSeg):

- The heads (:class:`AuxiliaryHead`, :class:`OutputBlock`, :class:`StageOneHead`) return
  **logits**; the authors end them in a sigmoid, which forces ``binary_cross_entropy``,
  an op autocast refuses to run in reduced precision (no mixed-precision training). The
  losses use the with-logits forms; ``torch.sigmoid(logits)`` is the authors' output.
- Upsampling is bilinear with align_corners=True, as the authors' ``nn.Upsample``
  layers: ``F.interpolate`` in the plain model; in the fused one
  ``disseg_kernels.multiscale_concat``, which writes each input straight into its slice
  of a concatenation, and alone (one input) is the upsample itself: on this CPU 1.4-3.5×
  faster forward+backward than ``F.interpolate``, and its backward is a gather on CUDA
  and Triton, so deterministic, where ATen's CUDA ``upsample_bilinear2d_backward``
  accumulates with atomics (``torch.use_deterministic_algorithms`` rejects it).
- TeLU is ``disseg_kernels.TeLU``: both its fused and its plain form return the finite
  limit where the authors' ``x * tanh(exp(x))`` gives NaN gradients (x ≳ 89 in float32,
  ≳ 11 in float16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from disseg_kernels import (
    CBATGates,
    ChannelAttention,
    ELAT,
    SpatialAttention,
    TeLU,
    multiscale_concat,
)


def op_backend(fused: bool) -> str:
    """The ``backend`` argument of the functional ``disseg_kernels`` ops for ``fused``."""
    return "auto" if fused else "reference"


def upsample(x: torch.Tensor, scale: int, backend: str = "reference") -> torch.Tensor:
    """Bilinear upsampling by an integer factor, align_corners=True (the authors'
    nn.Upsample): ``F.interpolate`` for ``backend="reference"``, else the one-input
    ``disseg_kernels.multiscale_concat``."""
    if scale == 1:
        return x
    if backend == "reference":
        return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=True)
    return multiscale_concat([x], [scale], backend=backend)


class CBT(nn.Module):
    """Conv (no bias) → BatchNorm → TeLU: Med-DisSeg's CBR with ReLU replaced by TeLU.

    ``act=False`` leaves out the TeLU (conv → BN). ``padding`` defaults to "same"
    (``dilation · (kernel_size // 2)``).
    """

    def __init__(
        self,
        in_c: int,
        out_c: int,
        kernel_size: int = 3,
        padding: int | None = None,
        dilation: int = 1,
        act: bool = True,
        fused: bool = True,
    ):
        super().__init__()
        if padding is None:
            padding = dilation * (kernel_size // 2)
        self.conv = nn.Conv2d(in_c, out_c, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_c)
        self.act = TeLU(fused=fused) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DilatedConvEnhancement(nn.Module):
    """The feature enhancement module (the authors' ``dilated_conv``), ``dconv1…4``.

    Four branches on x, each CBT → channel attention (ratio 16): a 1×1 and 3×3 at
    dilation 6, 12, 18; their concatenation fused by a 3×3 conv-BN; plus a 1×1 conv-BN
    residual of x; ReLU; spatial attention (k = 7). Out: ``out_c`` channels, x's size.
    """

    def __init__(self, in_c: int, out_c: int = 128, dilations: tuple[int, ...] = (6, 12, 18), fused: bool = True):
        super().__init__()
        kernels = [(1, 1)] + [(3, d) for d in dilations]
        self.branches = nn.ModuleList(
            nn.Sequential(CBT(in_c, out_c, k, dilation=d, fused=fused), ChannelAttention(out_c, ratio=16, fused=fused))
            for k, d in kernels
        )
        self.fuse = CBT(out_c * len(kernels), out_c, 3, act=False, fused=fused)
        self.residual = CBT(in_c, out_c, 1, act=False, fused=fused)
        self.sa = SpatialAttention(kernel_size=7, fused=fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fuse(torch.cat([b(x) for b in self.branches], dim=1))
        # In place on the fresh sum (as the authors' ReLU(inplace=True)): one map less.
        y = (y + self.residual(x)).relu_()
        return self.sa(y)


class DecoupleLayer(nn.Module):
    """Foreground / background / uncertainty features of f4: three branches
    CBT 3×3 (in→512) → CBT 3×3 (512→out) → CBT 1×1 (out→out). Returns (fg, bg, uc)."""

    def __init__(self, in_c: int = 1024, out_c: int = 128, mid_c: int = 512, fused: bool = True):
        super().__init__()

        def branch() -> nn.Sequential:
            return nn.Sequential(
                CBT(in_c, mid_c, 3, fused=fused), CBT(mid_c, out_c, 3, fused=fused), CBT(out_c, out_c, 1, fused=fused)
            )

        self.fg = branch()
        self.bg = branch()
        self.uc = branch()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.fg(x), self.bg(x), self.uc(x)


class GuidePreprocess(nn.Module):
    """A guide map for one CDFA (the authors' ``CDFAPreprocess``): CBT 3×3, then
    log2(up_scale) times (×2 bilinear upsample → CBT 3×3)."""

    def __init__(self, in_c: int = 128, out_c: int = 128, up_scale: int = 1, fused: bool = True):
        super().__init__()
        steps = int(math.log2(up_scale))
        if up_scale < 1 or 2**steps != up_scale:
            raise ValueError(f"up_scale must be a power of 2 ≥ 1, got {up_scale!r}")
        self.backend = op_backend(fused)
        self.c1 = CBT(in_c, out_c, 3, fused=fused)
        self.ups = nn.ModuleList(CBT(out_c, out_c, 3, fused=fused) for _ in range(steps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        for conv in self.ups:
            x = conv(upsample(x, 2, self.backend))
        return x


class _AuxBranch(nn.Module):
    """CBT 3×3 to 256, then (×2 up → CBT 3×3) to 256, 128, 64, 64, then a 1×1 conv to one
    channel with a bias: 16× the input size, logits."""

    widths = (256, 256, 128, 64, 64)

    def __init__(self, in_c: int, fused: bool = True):
        super().__init__()
        chans = (in_c,) + self.widths
        self.backend = op_backend(fused)
        self.convs = nn.ModuleList(CBT(a, b, 3, fused=fused) for a, b in zip(chans[:-1], chans[1:]))
        self.out = nn.Conv2d(chans[-1], 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(upsample(x, 2, self.backend) if i > 0 else x)
        return self.out(x)


class AuxiliaryHead(nn.Module):
    """The fg, bg and uncertainty masks at full size from the decoupled features.

    Returns **logits** (the authors' branches end in a sigmoid; see the module docstring).
    """

    def __init__(self, in_c: int = 128, fused: bool = True):
        super().__init__()
        self.fg = _AuxBranch(in_c, fused)
        self.bg = _AuxBranch(in_c, fused)
        self.uc = _AuxBranch(in_c, fused)

    def forward(self, fg, bg, uc) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.fg(fg), self.bg(bg), self.uc(uc)


class CBATDecoderBlock(nn.Module):
    """The CBAT decoder block (the authors' ``decoder_block``).

    cat(up_scale(x), skip) → CBT 1×1 to out_c = s1; s2 = ReLU(c2(s1) + s1);
    s3 = ReLU(c3(s2) + s2 + s1); y = ReLU(c4(s3) + s3 + s2 + s1) (c2, c3 3×3 and c4 1×1
    conv-BN without activation); then the gate chain channel attention → spatial
    attention → CBAM (``disseg_kernels.CBATGates``).
    """

    def __init__(self, in_c: int = 128, out_c: int = 128, scale: int = 2, fused: bool = True):
        super().__init__()
        self.scale = scale
        self.backend = op_backend(fused)
        self.c1 = CBT(in_c + out_c, out_c, 1, fused=fused)
        self.c2 = CBT(out_c, out_c, 3, act=False, fused=fused)
        self.c3 = CBT(out_c, out_c, 3, act=False, fused=fused)
        self.c4 = CBT(out_c, out_c, 1, act=False, fused=fused)
        self.gates = CBATGates(out_c, fused=fused)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        s1 = self.c1(multiscale_concat([x, skip], [self.scale, 1], backend=self.backend))
        # ReLU in place on each fresh sum (as the authors' ReLU(inplace=True)).
        s2 = (self.c2(s1) + s1).relu_()
        s3 = (self.c3(s2) + s2 + s1).relu_()
        y = (self.c4(s3) + s3 + s2 + s1).relu_()
        return self.gates(y)


class OutputBlock(nn.Module):
    """The final mask from the three decoder outputs (1/2, 1/4, 1/8 of the input size).

    cat(x1, up2(x2), up4(x3)) → CBT 3×3 (3·in_c → in_c) → ×2 up → CBT 3×3 (→128) →
    CBT 1×1 (→64) → 1×1 conv with bias (→ out_c). Returns **logits** (the authors end in a
    sigmoid; see the module docstring).
    """

    def __init__(self, in_c: int = 128, out_c: int = 1, fused: bool = True):
        super().__init__()
        self.backend = op_backend(fused)
        self.fuse = CBT(in_c * 3, in_c, 3, fused=fused)
        self.c1 = CBT(in_c, 128, 3, fused=fused)
        self.c2 = CBT(128, 64, 1, fused=fused)
        self.out = nn.Conv2d(64, out_c, kernel_size=1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        x = self.fuse(multiscale_concat([x1, x2, x3], [1, 2, 4], backend=self.backend))
        x = self.c2(self.c1(upsample(x, 2, self.backend)))
        return self.out(x)


class StageOneHead(nn.Module):
    """Stage I's head (the authors' ``adjust``): each of f1…f4 upsampled to the input size
    (×2, ×4, ×8, ×16), CBT 1×1 to 64 channels, ELAT (reduction 8); the four concatenated
    (256 channels) and fused by a 1×1 conv without bias to one mask. Returns **logits**.

    ``conv_first=True`` (default) runs each 1×1 convolution *before* the upsampling and
    the BatchNorm and TeLU after it: conv1×1(up(f)) = up(conv1×1(f)) exactly (both are
    linear, the bilinear weights are the same for every channel and the conv has no
    bias), and the BatchNorm and TeLU still see the same full-resolution 64-channel map,
    so the function is the paper's, up to float rounding (tested against
    ``conv_first=False``, the literal order). It saves the full-resolution copies of f2…f4
    (256, 512, 1024 channels at ResNet-50) that the literal order keeps for the conv's
    backward, and up to 256× of the 1×1 conv's work (f4). What would change the function
    is moving the BatchNorm (its batch statistics) or the TeLU before the upsampling;
    this module never does.
    """

    scales = (2, 4, 8, 16)

    def __init__(
        self,
        in_channels: tuple[int, int, int, int],
        mid_c: int = 64,
        out_c: int = 1,
        fused: bool = True,
        conv_first: bool = True,
    ):
        super().__init__()
        self.conv_first = conv_first
        self.backend = op_backend(fused)
        self.convs = nn.ModuleList(CBT(c, mid_c, 1, fused=fused) for c in in_channels)
        self.elats = nn.ModuleList(ELAT(mid_c, reduction=8, fused=fused) for _ in in_channels)
        self.fuse = nn.Conv2d(mid_c * len(in_channels), out_c, kernel_size=1, bias=False)

    def _branch(self, f: torch.Tensor, scale: int, cbt: CBT) -> torch.Tensor:
        if self.conv_first:
            return cbt.act(cbt.bn(upsample(cbt.conv(f), scale, self.backend)))
        return cbt(upsample(f, scale, self.backend))

    def forward(self, feats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        ys = [elat(self._branch(f, s, cbt)) for f, s, cbt, elat in zip(feats, self.scales, self.convs, self.elats)]
        return self.fuse(torch.cat(ys, dim=1))
