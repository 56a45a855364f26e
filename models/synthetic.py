"""The embedded default dataset: polyp-like synthetic images, generated from a seed.

Each image is a textured, pinkish "mucosa" background (smooth multi-scale noise, a
vignette, a few darker folds and specular highlights) with zero or one target: an
irregular blob (a radius modulated by a few random harmonics), from small to large, whose
colour differs only slightly from the background, with its own texture and a blurred edge.
About one image in ten has no target. The mask is the blob before blurring.

Generation is deterministic: image ``i`` draws from ``numpy.random.default_rng([seed, i])``
only, so the same (seed, size, counts) always write the same PNG files. The files are
written in the layout of :mod:`models.data` (``images/``, ``masks/``, ``train.txt``,
``val.txt`` and, if requested, ``test.txt``), with ``synthetic.json`` recording the
parameters; :func:`ensure_synthetic` reuses a folder whose ``synthetic.json`` matches.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data import write_text_atomic

VERSION = 3


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-D float array (reflected border), via torch in float64."""
    if sigma <= 0:
        return a
    k = max(3, int(2 * round(3 * sigma) + 1))
    x = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    w = w / w.sum()
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))[None, None]
    pad_h, pad_w = min(k // 2, t.shape[-2] - 1), min(k // 2, t.shape[-1] - 1)
    t = F.pad(t, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    wh = w[k // 2 - pad_h: k // 2 + pad_h + 1].view(1, 1, -1, 1)
    ww = w[k // 2 - pad_w: k // 2 + pad_w + 1].view(1, 1, 1, -1)
    t = F.conv2d(F.conv2d(t, wh / wh.sum()), ww / ww.sum())
    return t[0, 0].numpy()


def _noise(rng: np.random.Generator, size: int, scales=(2.0, 5.0, 12.0), weights=(0.5, 0.3, 0.2)) -> np.ndarray:
    """Smooth multi-scale noise (Gaussian-filtered white noise, periodic), zero mean, unit spread."""
    f = np.fft.fftfreq(size)
    f2 = f[:, None] ** 2 + f[None, :] ** 2
    out = np.zeros((size, size))
    for s, w in zip(scales, weights):
        sigma = s * size / 128
        spec = np.fft.fft2(rng.standard_normal((size, size))) * np.exp(-2 * (np.pi * sigma) ** 2 * f2)
        n = np.fft.ifft2(spec).real
        out += w * n / (n.std() + 1e-9)
    return out / (out.std() + 1e-9)


def make_sample(seed: int, index: int, size: int = 128, empty_rate: float = 0.1):
    """One (image uint8 (S, S, 3), mask uint8 (S, S) in {0, 255}) pair."""
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size

    # Background: pink-red mucosa, textured, vignetted, with a couple of dark folds.
    base = np.array([0.78, 0.45, 0.40]) + rng.uniform(-0.06, 0.06, 3)
    tex = _noise(rng, size)
    shade = 1.0 - 0.35 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * rng.uniform(0.8, 1.6)
    lum = shade * (1.0 + 0.10 * tex)
    for _ in range(rng.integers(1, 4)):  # folds: dark smooth curves
        a, b, c = rng.uniform(-1, 1, 3)
        d = np.abs(a * (xx - 0.5) + b * (yy - 0.5) + 0.6 * c * (xx - 0.5) ** 2 - 0.2 * c)
        lum = lum - 0.12 * np.exp(-(d / rng.uniform(0.01, 0.03)) ** 2)

    mask = np.zeros((size, size), dtype=bool)
    target = rng.uniform() >= empty_rate
    if target:
        r0 = rng.uniform(0.10, 0.30)  # small to large
        cx, cy = rng.uniform(r0 * 0.6 + 0.05, 1 - r0 * 0.6 - 0.05, 2)
        theta = np.arctan2(yy - cy, xx - cx)
        dist = np.hypot(xx - cx, yy - cy)
        radius = np.full_like(theta, r0)
        for k in range(2, 6):
            radius += r0 * rng.uniform(0.0, 0.14) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        mask = dist < radius
        soft = _blur(mask.astype(np.float64), rng.uniform(0.8, 2.0) * size / 128)
        # Low contrast: slightly brighter and paler, with its own finer texture.
        contrast = rng.uniform(0.16, 0.28)
        own_tex = _noise(rng, size, scales=(1.0, 3.0), weights=(0.6, 0.4))
        lum = lum + soft * (contrast + 0.05 * own_tex)
        tint = np.array([0.02, 0.08, 0.06]) * rng.uniform(0.7, 1.5)
    else:
        soft = np.zeros((size, size))
        tint = np.zeros(3)

    img = base[None, None, :] * lum[..., None] + soft[..., None] * tint[None, None, :]
    for _ in range(rng.integers(0, 4)):  # specular highlights, anywhere
        hx, hy = rng.uniform(0.05, 0.95, 2)
        hr = rng.uniform(0.005, 0.02)
        img += 0.5 * np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * hr ** 2))[..., None]
    img += rng.normal(0.0, 0.015, img.shape)  # sensor noise
    img = np.clip(img, 0.0, 1.0)
    return (img * 255 + 0.5).astype(np.uint8), (mask.astype(np.uint8) * 255)


def generate(root: str, n_train: int = 160, n_val: int = 40, n_test: int = 0, size: int = 128,
             seed: int = 0, empty_rate: float = 0.1) -> dict:
    """Write the dataset into ``root`` (created; existing images/ and masks/ are replaced)."""
    params = {"version": VERSION, "n_train": n_train, "n_val": n_val, "n_test": n_test,
              "size": size, "seed": seed, "empty_rate": empty_rate}
    os.makedirs(root, exist_ok=True)
    marker = os.path.join(root, "synthetic.json")
    if os.path.exists(marker):
        os.remove(marker)  # a half-regenerated folder must not look complete
    for sub in ("images", "masks"):
        shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
        os.makedirs(os.path.join(root, sub))
    names = {"train": [], "val": [], "test": []}
    counts = (("train", n_train), ("val", n_val), ("test", n_test))
    index = 0
    for split, n in counts:
        for _ in range(n):
            name = f"synth_{index:05d}"
            img, msk = make_sample(seed, index, size, empty_rate)
            Image.fromarray(img, "RGB").save(os.path.join(root, "images", name + ".png"))
            Image.fromarray(msk, "L").save(os.path.join(root, "masks", name + ".png"))
            names[split].append(name)
            index += 1
    for split, lst in names.items():
        path = os.path.join(root, f"{split}.txt")
        if lst:
            write_text_atomic(path, "".join(n + "\n" for n in lst))
        elif os.path.exists(path):
            os.remove(path)
    write_text_atomic(marker, json.dumps(params, indent=1) + "\n")
    return params


def ensure_synthetic(root: str, n_train: int = 160, n_val: int = 40, n_test: int = 0,
                     size: int = 128, seed: int = 0, empty_rate: float = 0.1) -> bool:
    """Generate the dataset unless ``root`` already holds exactly this one; True if generated."""
    want = {"version": VERSION, "n_train": n_train, "n_val": n_val, "n_test": n_test,
            "size": size, "seed": seed, "empty_rate": empty_rate}
    marker = os.path.join(root, "synthetic.json")
    try:
        with open(marker, encoding="utf-8") as fh:
            if json.load(fh) == want:
                return False
    except (OSError, ValueError):
        pass
    generate(root, n_train, n_val, n_test, size, seed, empty_rate)
    return True
