"""The ResNet encoder of both stages: the stem and stages 1-3 of a torchvision ResNet.

Features (input H × W, H and W divisible by 16):

=====  ======  ==============================  ======================  =================
name   stride  computed by                     ResNet-50 channels      ResNet-18/34
=====  ======  ==============================  ======================  =================
f1     2       conv1 → bn1 → relu               64                      64
f2     4       maxpool → layer1                 256                     64
f3     8       layer2                           512                     128
f4     16      layer3                           1024                    256
=====  ======  ==============================  ======================  =================

There is no layer4 and no fc. The state-dict keys are those of torchvision's
``resnet18/34/50`` (``conv1.weight``, ``bn1.running_mean``, ``layer1.0.conv1.weight``,
``layer2.0.downsample.0.weight``, ``layer2.0.downsample.1.bias``, …), so an ImageNet
checkpoint saved by torchvision loads from a local file with
:func:`load_torchvision_resnet`. Nothing is ever downloaded; torchvision is not needed.
The blocks are torchvision's "v1.5" ResNet (the stride of a bottleneck sits on its 3×3
convolution), initialised as torchvision initialises them.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

# depth name -> (block kind, blocks per stage for layer1..layer3)
ENCODERS: dict[str, tuple[str, tuple[int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6)),
    "resnet50": ("bottleneck", (3, 4, 6)),
}


def _conv3x3(in_c: int, out_c: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_c, out_c, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_c: int, out_c: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_c, out_c, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN, identity (or 1×1 conv-BN ``downsample``) shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_c: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(in_c, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (carries the stride) → 1×1 ×4 conv-BN, shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_c: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(in_c, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """ResNet stem + layer1..layer3; ``forward(x)`` returns ``(f1, f2, f3, f4)``.

    Args:
        name: ``"resnet50"`` (the paper's), ``"resnet34"`` or ``"resnet18"`` (CPU-sized).

    Attributes:
        channels: the channel counts of f1..f4.
    """

    def __init__(self, name: str = "resnet50"):
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f"encoder must be one of {tuple(ENCODERS)}, got {name!r}")
        self.name = name
        kind, blocks = ENCODERS[name]
        block = Bottleneck if kind == "bottleneck" else BasicBlock
        self._in_c = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, blocks[0], stride=1)
        self.layer2 = self._make_layer(block, 128, blocks[1], stride=2)
        self.layer3 = self._make_layer(block, 256, blocks[2], stride=2)
        self.channels = (64, 64 * block.expansion, 128 * block.expansion, 256 * block.expansion)
        del self._in_c
        self._init_weights()

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        out_c = planes * block.expansion
        if stride != 1 or self._in_c != out_c:
            downsample = nn.Sequential(_conv1x1(self._in_c, out_c, stride), nn.BatchNorm2d(out_c))
        layers = [block(self._in_c, planes, stride, downsample)]
        self._in_c = out_c
        layers += [block(out_c, planes) for _ in range(1, n)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # torchvision's initialisation (Kaiming normal, fan_out; BN weight 1, bias 0).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        f1 = self.relu(self.bn1(self.conv1(x)))
        f2 = self.layer1(self.maxpool(f1))
        f3 = self.layer2(f2)
        f4 = self.layer3(f3)
        return f1, f2, f3, f4


class LoadReport(NamedTuple):
    """What :func:`load_torchvision_resnet` did: the keys loaded and the file's other keys
    (a full torchvision checkpoint has ``layer4.*`` and ``fc.*``, which the encoder lacks)."""

    loaded: list[str]
    unused: list[str]


def _encoder_of(module: nn.Module) -> ResNetEncoder:
    if isinstance(module, ResNetEncoder):
        return module
    enc = getattr(module, "encoder", None)
    if isinstance(enc, ResNetEncoder):
        return enc
    raise TypeError(
        f"module must be a ResNetEncoder or a model with a ResNetEncoder `.encoder`, got {type(module).__name__}"
    )


def load_torchvision_resnet(module: nn.Module, path: str | os.PathLike) -> LoadReport:
    """Load a torchvision-format ResNet state dict from the local file ``path`` into
    ``module`` (a :class:`ResNetEncoder`, or a Stage I / Stage II model: its ``.encoder``).

    The file is read with ``torch.load(weights_only=True)``; it may be the state dict
    itself or a dict holding it under ``"state_dict"`` or ``"model"``. Strict about the
    keys the encoder uses: each must be in the file with the encoder's shape, else
    ``KeyError`` / ``ValueError`` listing them (``num_batches_tracked``, absent from
    torchvision's older checkpoints, is the one key that may be missing: it keeps its
    value). A key under the encoder's stem or stages (layer1-3) that the encoder lacks (a
    deeper ResNet's blocks) is a ``ValueError`` too. Every other key of the file (layer4,
    fc) is reported in ``LoadReport.unused``, not loaded. Nothing is downloaded.
    """
    encoder = _encoder_of(module)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path={path!r} is not a file (the ResNet checkpoint is read from a local file only)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise ValueError(f"path={path!r} cannot be read as a torch checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and wrapper not in encoder.state_dict():
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"path={path!r} does not hold a state dict (got {type(state).__name__})")
    own = encoder.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise KeyError(
            f"the checkpoint {path!r} lacks {len(missing)} key(s) the {encoder.name} encoder needs, "
            f"e.g. {missing[:5]} (is it a torchvision {encoder.name} state dict?)"
        )
    bad = [
        f"{k}: file {tuple(state[k].shape)} vs encoder {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise ValueError(f"the checkpoint {path!r} has shapes that do not fit the {encoder.name} encoder: {bad[:5]}")
    # Keys under the encoder's own parts (the stem, layer1-3) that it does not have: blocks of a
    # deeper network (a ResNet-34 file has 3/4/6 blocks where ResNet-18 has 2/2/2): its shapes
    # fit, but its weights belong to other blocks. (layer4 and fc are unused by design.)
    parts = {k.split(".", 1)[0] for k in own}
    foreign = sorted(k for k in state if k not in own and k.split(".", 1)[0] in parts)
    if foreign:
        raise ValueError(
            f"the checkpoint {path!r} has {len(foreign)} key(s) in the {encoder.name} encoder's stages that it "
            f"does not have, e.g. {foreign[:3]}: it is a deeper ResNet's state dict (use the encoder that "
            f"matches it: --encoder)"
        )
    loaded = [k for k in own if k in state]
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(state[k])
    unused = sorted(k for k in state if k not in own)
    return LoadReport(loaded=loaded, unused=unused)
