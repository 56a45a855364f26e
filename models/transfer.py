"""Stage I → Stage II weight transfer."""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
from torch import nn


class TransferReport(NamedTuple):
    """Keys (Stage II names) copied from Stage I; Stage II keys left as they were; Stage I
    keys not used (Stage I's head)."""

    copied: list[str]
    left: list[str]
    unused: list[str]


# What torch.compile (OptimizedModule) and DistributedDataParallel put before a module's keys.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def _unwrapped(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the prefixes of torch.compile and DDP wrappers removed (repeatedly,
    where every key carries the same one)."""
    state = dict(state)
    while state:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def transfer_stage1_to_stage2(stage1: nn.Module | Mapping[str, torch.Tensor], stage2: nn.Module) -> TransferReport:
    """Copy Stage I's encoder (parameters and BatchNorm buffers) into Stage II, in place.

    This is what the authors' Stage II training does with a Stage I checkpoint (it keeps
    the ``layer*`` entries). Only ``encoder.*`` keys are candidates: Stage I's head has
    no counterpart in Stage II. ``stage1`` may be a module or its state dict; either
    model may be wrapped by ``torch.compile`` or DDP (the report names keys without the
    wrappers' prefixes). Every candidate must exist in Stage II with the same shape (else
    ``ValueError``: the two were built with different encoders), and ``stage1`` must be a
    Stage I (a source with keys other than ``encoder.*`` and ``head.*`` is refused).
    """
    src = stage1.state_dict() if isinstance(stage1, nn.Module) else stage1
    if not isinstance(src, Mapping):
        raise TypeError(f"stage1 must be a module or a state dict, got {type(stage1).__name__}")
    if not isinstance(stage2, nn.Module):
        raise TypeError(f"stage2 must be the Stage II module (its weights are copied into in place), "
                        f"got {type(stage2).__name__}")
    src = _unwrapped(src)
    dst = _unwrapped(stage2.state_dict())  # the same tensors: copy_ writes into stage2
    wanted = [k for k in src if k.startswith("encoder.")]
    if not wanted:
        raise ValueError("stage1 has no 'encoder.*' keys: is it a MedDisSegStage1 (or its state dict)?")
    foreign = [k for k in src if not k.startswith(("encoder.", "head."))]
    if foreign:
        raise ValueError(f"stage1 is not a Stage I model: it has {len(foreign)} keys outside 'encoder.*' and "
                         f"'head.*' (first: {foreign[:3]}); a Stage II checkpoint is resumed, not transferred")
    missing = [k for k in wanted if k not in dst]
    missing += [k for k in dst if k.startswith("encoder.") and k not in src]
    bad = [f"{k}: {tuple(src[k].shape)} vs {tuple(dst[k].shape)}" for k in wanted if k in dst and src[k].shape != dst[k].shape]
    if missing or bad:
        raise ValueError(
            f"stage1's encoder does not fit stage2's (different encoder depths?): "
            f"keys in one encoder only {missing[:5]}, shape mismatches {bad[:5]}"
        )
    with torch.no_grad():
        for k in wanted:
            dst[k].copy_(src[k])
    copied = set(wanted)
    return TransferReport(
        copied=wanted,
        left=[k for k in dst if k not in copied],
        unused=[k for k in src if k not in copied],
    )
