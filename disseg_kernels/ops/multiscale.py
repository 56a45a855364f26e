"""Multi-scale upsample-and-concatenate: public API and the ``disseg::multiscale_concat`` op.

Each input is read once and written once, bilinearly upsampled (align_corners=True) by its
integer factor straight into its channel slice of the output; the backward pass
accumulates the output gradient's slices into the small inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _backend
from ..reference.multiscale import multiscale_concat_reference


def _validate(tensors, scales):
    if not isinstance(tensors, (list, tuple)) or len(tensors) == 0:
        raise ValueError(f"tensors must be a non-empty list of (B, C, H, W) tensors, got {type(tensors).__name__}")
    if len(scales) != len(tensors):
        raise ValueError(f"scales must have one entry per tensor ({len(tensors)}), got {list(scales)}")
    out_hw = None
    for i, (t, s) in enumerate(zip(tensors, scales)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"tensors[{i}] must be a 4-d (B, C, H, W) tensor, got {getattr(t, 'shape', t)}")
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"scales[{i}] must be an integer ≥ 1, got {s!r}")
        hw = (t.shape[2] * s, t.shape[3] * s)
        if out_hw is None:
            out_hw = hw
        elif hw != out_hw:
            raise ValueError(
                f"tensors[{i}] upsampled by {s} is {hw[0]}×{hw[1]}, but tensors[0] gives {out_hw[0]}×{out_hw[1]}"
            )
        if t.shape[0] != tensors[0].shape[0] or t.dtype != tensors[0].dtype or t.device != tensors[0].device:
            raise ValueError(f"tensors[{i}] differs from tensors[0] in batch size, dtype or device")


def multiscale_concat(tensors: Sequence[torch.Tensor], scales: Sequence[int], backend: str = "auto") -> torch.Tensor:
    """cat([up_{scales[i]}(tensors[i])], dim=1), bilinear with align_corners=True.

    Args:
        tensors: (B, Cᵢ, Hᵢ, Wᵢ) tensors with Hᵢ·sᵢ and Wᵢ·sᵢ equal for all i.
        scales: integer factors sᵢ ≥ 1 (1 = as is).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
    Returns:
        (B, ΣCᵢ, H, W).
    """
    tensors = list(tensors)
    scales = [int(s) if not isinstance(s, bool) and isinstance(s, int) else s for s in scales]
    _validate(tensors, scales)
    chosen = _backend.resolve("multiscale", backend, tensors[0].device)
    if chosen == "reference":
        return multiscale_concat_reference(tensors, scales)
    return _multiscale_fused(tensors, scales, chosen)


def _multiscale_fused(tensors, scales, backend):  # replaced once the fused op lands
    return multiscale_concat_reference(tensors, scales)
