"""Evaluation as the paper reports it (spec/trainer.md, "Evaluation and inference").

Per image, threshold 0.5 on the sigmoid: IoU, Dice, recall, precision, F2, accuracy and
HD95 (pixels), at the training resolution (default: the image and mask resized to the
checkpoint's ``size``) or at the native resolution (``native=True``: the logits are
resized bilinearly to the mask's own size). Writes ``OUT/per_case.csv`` (one row per
image) and ``OUT/summary.json`` (means: mIoU, mDSC, Rec., Prec. and the others; NaN
cases skipped, see :mod:`models.metrics` for the empty-mask policy; a mean with no case
written as null).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import data as D
from .config import TrainConfig, UserError, valid_size
from .metrics import METRICS, PAPER_NAMES, image_metrics, scored_counts, summarize
from .trainer import (atomic_write_text, build_model_from_config, check_output_dir, csv_text, json_text,
                      load_checkpoint, make_output_dir, resolve_device)


def check_inference_options(size: Optional[int], threshold: float) -> None:
    """``--size`` (None: the training size) and ``--threshold`` of evaluate and predict,
    checked before a model is loaded: the messages name the flag and its value."""
    if size is not None and not valid_size(size):
        raise UserError(f"--size={size!r}: must be a positive multiple of 16 (omit it for the training size)")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold={threshold!r}: must lie in [0, 1] (a probability)")


def load_model(checkpoint: str, device: torch.device, fused: Optional[bool] = None):
    """(model in eval mode, its TrainConfig) from a trainer checkpoint."""
    ck = load_checkpoint(checkpoint)
    if not ck.get("config"):
        raise UserError(f"{checkpoint}: a bare state dict; evaluation needs a checkpoint written by "
                        "`disseg train` (it records the stage, encoder and size)")
    cfg = TrainConfig(**{k: v for k, v in ck["config"].items() if k in TrainConfig.__dataclass_fields__})
    if fused is not None:
        cfg.fused = fused
    model = build_model_from_config(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise UserError(f"{checkpoint}: weights do not fit the model they name ({e})") from None
    return model.to(device).eval(), cfg


@torch.no_grad()
def predict_logits(model, image: torch.Tensor, cfg: TrainConfig, device: torch.device,
                   size: Optional[int] = None, amp: str = "none") -> torch.Tensor:
    """(3, H, W) image in [0, 1] at any size -> (1, 1, s, s) logits at the model's input size s."""
    from .trainer import autocast_context

    s = size or cfg.size
    x = D.resize_image(image, s)[None].to(device)
    with autocast_context(device, amp):
        return model(D.normalize(x, cfg.normalize)).mask.float()


def evaluate(checkpoint: str, data: str, split: str = "val", out: Optional[str] = None,
             native: bool = False, empty_policy: str = "nan", threshold: float = 0.5,
             device: str = "auto", size: Optional[int] = None, amp: str = "none",
             log: Callable[[str], None] = print) -> dict:
    check_inference_options(size, threshold)
    dev = resolve_device(device)
    if out:
        check_output_dir(out)
    samples = D.load_split(data, split)
    model, cfg = load_model(checkpoint, dev)
    s = size or cfg.size
    rows = []
    for smp in samples:
        try:
            img_np, mask_np = D.load_image(smp.image), D.load_mask(smp.mask)
        except D.DataError as e:
            raise D.DataError(f"{smp.source}: {e}") from None
        logits = predict_logits(model, torch.from_numpy(img_np), cfg, dev, s, amp)
        if native:
            H, W = mask_np.shape
            logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
            gt = torch.from_numpy(mask_np)
        else:
            gt = D.resize_mask(mask_np, s)[0] > 0.5
        pred = torch.sigmoid(logits[0, 0].cpu()) > threshold
        row = {"name": smp.name, **image_metrics(pred, gt, empty_policy),
               "gt_pixels": int(gt.sum()), "pred_pixels": int(pred.sum())}
        rows.append(row)
    summary = summarize(rows)
    summary["n_scored"] = scored_counts(rows)
    summary.update({"checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(data), "split": split,
                    "resolution": "native" if native else f"{s}x{s}", "empty_policy": empty_policy,
                    "threshold": threshold, "stage": cfg.stage, "encoder": cfg.encoder})
    if out:
        make_output_dir(out)
        fields = ["name", *METRICS, "gt_pixels", "pred_pixels"]
        atomic_write_text(os.path.join(out, "per_case.csv"), csv_text(rows, fields))
        atomic_write_text(os.path.join(out, "summary.json"), json_text(summary))
    log(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    def f(v):
        return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    text = (f"{s.get('split', '')} ({s['n_images']} images, {s.get('resolution', '')}): "
            f"mIoU {f(s['mIoU'])}  mDSC {f(s['mDSC'])}  Rec. {f(s['Rec.'])}  Prec. {f(s['Prec.'])}  "
            f"F2 {f(s.get('mean_f2'))}  Acc. {f(s.get('mean_accuracy'))}  HD95 {f(s.get('mean_hd95'))} px")
    # a mean over fewer images than the split is said so: e.g. precision is undefined for
    # an empty prediction, so a model that misses targets is averaged over fewer images
    fewer = {m: k for m, k in (s.get("n_scored") or {}).items() if k < s["n_images"]}
    if fewer:
        text += "; means over fewer images (the rest undefined: an empty mask or prediction): " + ", ".join(
            f"{_SHORT.get(m, m)} {k}" for m, k in fewer.items())
    return text


_SHORT = {**PAPER_NAMES, "f2": "F2", "accuracy": "Acc.", "hd95": "HD95"}  # the summary line's names
