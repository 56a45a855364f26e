"""Attention gates (channel, spatial, CBAM, ELAT, the CBAT chain): modules and fused ops.

Each module holds its parameters under the same names in both modes; ``fused=False`` runs
the eager formula of ``reference.gates``, ``fused=True`` the fused path (see
``_fused_gates`` below), chosen per device by ``_backend.resolve("gates", ...)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from ..reference import gates as ref
from .telu import TeLU


def _check_x(x: torch.Tensor, channels: int | None, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name}: x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: x must be a floating-point tensor, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: x has {x.shape[1]} channels, the module was built for channels={channels}")


def _check_backend(backend):
    if backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")


def _hidden(channels: int, ratio: int, name: str) -> int:
    if channels < 1:
        raise ValueError(f"channels must be ≥ 1, got {channels}")
    if ratio < 1:
        raise ValueError(f"{name} must be ≥ 1, got {ratio}")
    # max(1, ·): a module with fewer channels than the ratio keeps one hidden unit
    # (the authors' C // r would be an empty layer); identical for the model's C ≥ 64.
    return max(1, channels // ratio)


def _fused_gates(program: str, x: torch.Tensor, params: list[torch.Tensor], backend: str) -> torch.Tensor:
    """The fused path of a gate module (replaced by the custom op once it lands)."""
    return _REFERENCE_PROGRAMS[program](x, params)


class ChannelAttention(torch.nn.Module):
    """out = x · σ(MLP(avg_HW x) + MLP(max_HW x)), MLP = fc1 (1×1 conv C→C/r) → ReLU → fc2."""

    def __init__(self, channels: int, ratio: int = 16, fused: bool = True, backend: str = "auto"):
        super().__init__()
        _check_backend(backend)
        hidden = _hidden(channels, ratio, "ratio")
        self.channels, self.fused, self.backend = channels, bool(fused), backend
        self.fc1 = torch.nn.Conv2d(channels, hidden, 1, bias=False)
        self.relu = torch.nn.ReLU()
        self.fc2 = torch.nn.Conv2d(hidden, channels, 1, bias=False)

    def _params(self):
        return [self.fc1.weight, self.fc2.weight]

    def forward(self, x):
        _check_x(x, self.channels, "ChannelAttention")
        if not self.fused:
            return ref.channel_attention_reference(x, *self._params())
        return _fused_gates("ca", x, self._params(), self.backend)


class SpatialAttention(torch.nn.Module):
    """out = x · σ(conv_k([mean_C x, max_C x])), a 2→1 k×k conv without bias."""

    def __init__(self, kernel_size: int = 7, fused: bool = True, backend: str = "auto"):
        super().__init__()
        _check_backend(backend)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and ≥ 1, got {kernel_size}")
        self.fused, self.backend = bool(fused), backend
        self.conv = torch.nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def _params(self):
        return [self.conv.weight]

    def forward(self, x):
        _check_x(x, None, "SpatialAttention")
        if not self.fused:
            return ref.spatial_attention_reference(x, *self._params())
        return _fused_gates("sa", x, self._params(), self.backend)


class CBAM(torch.nn.Module):
    """Channel gate (Linear → TeLU → Linear, biases, on avg and max) then a spatial gate
    (k×k 2→1 conv with bias) on the channel-gated map: out = x · g[b, c] · s[b, h, w]."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, fused: bool = True, backend: str = "auto"):
        super().__init__()
        _check_backend(backend)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and ≥ 1, got {kernel_size}")
        hidden = _hidden(channels, reduction, "reduction")
        self.channels, self.fused, self.backend = channels, bool(fused), backend
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(channels, hidden), TeLU(fused=fused, backend=backend), torch.nn.Linear(hidden, channels)
        )
        self.conv = torch.nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=True)

    def _params(self):
        return [self.mlp[0].weight, self.mlp[0].bias, self.mlp[2].weight, self.mlp[2].bias, self.conv.weight, self.conv.bias]

    def forward(self, x):
        _check_x(x, self.channels, "CBAM")
        if not self.fused:
            return ref.cbam_reference(x, *self._params())
        return _fused_gates("cbam", x, self._params(), self.backend)


class ELAT(torch.nn.Module):
    """The encoder attention of Med-DisSeg Stage I.

    g = σ(mlp(avg_HW x)), mlp = Linear(C, C/r) → TeLU → Linear(C/r, C), no biases;
    s = σ(fuse([dconv1(x), dconv2(x), dconv3(x)])), dconvd = 3×3 C→1 conv with dilation
    = padding = d and a bias, fuse = 1×1 3→1 conv with a bias; out = x · g · s.
    Fused: the three dilated convs and the fuse are one 7×7 C→1 stencil.
    """

    def __init__(self, channels: int, reduction: int = 8, fused: bool = True, backend: str = "auto"):
        super().__init__()
        _check_backend(backend)
        hidden = _hidden(channels, reduction, "reduction")
        self.channels, self.fused, self.backend = channels, bool(fused), backend
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(channels, hidden, bias=False),
            TeLU(fused=fused, backend=backend),
            torch.nn.Linear(hidden, channels, bias=False),
        )
        self.dconv1 = torch.nn.Conv2d(channels, 1, 3, padding=1, dilation=1, bias=True)
        self.dconv2 = torch.nn.Conv2d(channels, 1, 3, padding=2, dilation=2, bias=True)
        self.dconv3 = torch.nn.Conv2d(channels, 1, 3, padding=3, dilation=3, bias=True)
        self.fuse = torch.nn.Conv2d(3, 1, 1, bias=True)

    def _params(self):
        return [
            self.mlp[0].weight,
            self.mlp[2].weight,
            self.dconv1.weight,
            self.dconv2.weight,
            self.dconv3.weight,
            self.dconv1.bias,
            self.dconv2.bias,
            self.dconv3.bias,
            self.fuse.weight,
            self.fuse.bias,
        ]

    def forward(self, x):
        _check_x(x, self.channels, "ELAT")
        p = self._params()
        if not self.fused:
            return ref.elat_reference(x, p[0], p[1], p[2:5], p[5:8], p[8], p[9])
        return _fused_gates("elat", x, p, self.backend)


class CBATGates(torch.nn.Module):
    """The CBAT decoder block's gate chain: ``ca`` (ChannelAttention) → ``sa``
    (SpatialAttention) → ``cbam`` (CBAM). Fused: one op over the chain that reads x once
    per statistic, writes the output once and saves x and the small gates for backward."""

    def __init__(
        self,
        channels: int,
        ca_ratio: int = 16,
        cbam_reduction: int = 16,
        kernel_size: int = 7,
        fused: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        _check_backend(backend)
        self.channels, self.fused, self.backend = channels, bool(fused), backend
        self.ca = ChannelAttention(channels, ca_ratio, fused=fused, backend=backend)
        self.sa = SpatialAttention(kernel_size, fused=fused, backend=backend)
        self.cbam = CBAM(channels, cbam_reduction, kernel_size, fused=fused, backend=backend)

    def _params(self):
        return self.ca._params() + self.sa._params() + self.cbam._params()

    def forward(self, x):
        _check_x(x, self.channels, "CBATGates")
        if not self.fused:
            return self.cbam(self.sa(self.ca(x)))
        return _fused_gates("cbat", x, self._params(), self.backend)


_REFERENCE_PROGRAMS = {
    "ca": lambda x, p: ref.channel_attention_reference(x, *p),
    "sa": lambda x, p: ref.spatial_attention_reference(x, *p),
    "cbam": lambda x, p: ref.cbam_reference(x, *p),
    "elat": lambda x, p: ref.elat_reference(x, p[0], p[1], p[2:5], p[5:8], p[8], p[9]),
    "cbat": lambda x, p: ref.cbat_gates_reference(x, p[0:2], p[2:3], p[3:9]),
}
