"""Inference on a folder of images (or one image): native-size PNG masks and overlays.

``OUT/masks/NAME.png``: the binary mask (0 / 255) at the image's own size (logits resized
bilinearly from the model's input size, then thresholded). ``OUT/overlays/NAME.png``: the
image with the prediction tinted green and its outline in yellow; when a ground-truth
mask is given (``mask_dir``) its outline is drawn in red.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import data as D
from .config import UserError
from .evaluate import check_inference_options, load_model, predict_logits
from .metrics import boundary
from .trainer import atomic_write_bytes, check_output_dir, make_output_dir, resolve_device


def overlay(image: np.ndarray, pred: np.ndarray, gt: Optional[np.ndarray] = None) -> np.ndarray:
    """(H, W, 3) float image in [0, 1], (H, W) bool masks -> (H, W, 3) uint8 overlay."""
    out = image.copy()
    out[pred] = 0.6 * out[pred] + 0.4 * np.array([0.1, 0.9, 0.2])
    out[boundary(torch.from_numpy(pred)).numpy()] = (1.0, 0.9, 0.1)
    if gt is not None:
        out[boundary(torch.from_numpy(gt)).numpy()] = (0.95, 0.1, 0.1)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def _png_bytes(a: np.ndarray, mode: str) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, format="PNG")
    return buf.getvalue()


def list_images(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"--input={path!r}: no such file or folder")
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if not f.startswith(".") and os.path.splitext(f)[1].lower() in D.IMAGE_EXTS)
    if not files:
        raise UserError(f"--input={path!r}: no images ({', '.join(D.IMAGE_EXTS)}) in the folder")
    return files


def predict(checkpoint: str, inputs: str, out: str, threshold: float = 0.5, device: str = "auto",
            size: Optional[int] = None, mask_dir: Optional[str] = None, names: Optional[list[str]] = None,
            log: Callable[[str], None] = print) -> list[str]:
    check_inference_options(size, threshold)
    dev = resolve_device(device)
    check_output_dir(out)
    if mask_dir is not None and not os.path.isdir(mask_dir):  # before the model is loaded
        raise UserError(f"--masks={mask_dir!r}: no such folder")
    files = list_images(inputs)
    if names is not None:
        wanted = set(names)
        files = [f for f in files if os.path.splitext(os.path.basename(f))[0] in wanted]
    by_stem: dict[str, list[str]] = {}
    for f in files:
        by_stem.setdefault(os.path.splitext(os.path.basename(f))[0], []).append(os.path.basename(f))
    clash = [group for group in by_stem.values() if len(group) > 1]
    if clash:  # their masks would be written to one file
        raise UserError(f"--input={inputs!r}: {len(clash)} name(s) with more than one image, e.g. "
                        f"{', '.join(clash[0])} (outputs are named NAME.png: keep one image per name)")
    model, cfg = load_model(checkpoint, dev)
    gt_index = D._index_folder(mask_dir) if mask_dir else {}
    make_output_dir(os.path.join(out, "masks"))
    make_output_dir(os.path.join(out, "overlays"))
    written, no_outline = [], []
    for path in files:
        img = D.load_image(path)
        H, W = img.shape[:2]
        logits = predict_logits(model, torch.from_numpy(img), cfg, dev, size)
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        pred = (torch.sigmoid(logits[0, 0]).cpu() > threshold).numpy()
        stem = os.path.splitext(os.path.basename(path))[0]
        gt = None
        if mask_dir:
            key = D.mask_key(gt_index, stem)
            if key is None:
                no_outline.append(f"{stem} (no mask)")
            elif len(gt_index[key]) > 1:
                no_outline.append(f"{stem} (several masks: {', '.join(sorted(gt_index[key]))})")
            else:
                gt = D.load_mask(os.path.join(mask_dir, gt_index[key][0]))
                if gt.shape != pred.shape:
                    no_outline.append(f"{stem} (mask {gt_index[key][0]} is {gt.shape[1]}x{gt.shape[0]}, "
                                      f"the image {W}x{H})")
                    gt = None
        atomic_write_bytes(os.path.join(out, "masks", stem + ".png"), _png_bytes(pred.astype(np.uint8) * 255, "L"))
        atomic_write_bytes(os.path.join(out, "overlays", stem + ".png"), _png_bytes(overlay(img, pred, gt), "RGB"))
        written.append(stem)
    log(f"wrote {len(written)} masks to {os.path.join(out, 'masks')} and overlays to {os.path.join(out, 'overlays')}")
    if no_outline:
        shown = "; ".join(no_outline[:10]) + (f"; and {len(no_outline) - 10} more" if len(no_outline) > 10 else "")
        log(f"warning: --masks={mask_dir!r}: {len(no_outline)} of {len(written)} overlays have no ground-truth "
            f"outline: {shown}")
    return written
