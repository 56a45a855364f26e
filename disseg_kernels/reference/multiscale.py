"""Multi-scale upsample-and-concatenate in plain PyTorch (``shared/spec/attention.md``).

cat([up_{s₁}(x₁), up_{s₂}(x₂), …], dim=1), up_s = bilinear interpolation with
align_corners=True to (s·H, s·W); s = 1 leaves the tensor as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def multiscale_concat_reference(tensors: Sequence[torch.Tensor], scales: Sequence[int]) -> torch.Tensor:
    """Concatenate ``tensors[i]`` upsampled by the integer ``scales[i]`` along dim 1."""
    parts = []
    for t, s in zip(tensors, scales):
        if s == 1:
            parts.append(t)
        else:
            parts.append(F.interpolate(t, scale_factor=s, mode="bilinear", align_corners=True))
    return torch.cat(parts, dim=1)
