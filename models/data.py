"""Data: the images/ masks/ split-file layout, its validation, and the augmentations.

Layout (Kvasir-SEG, Kvasir-Sessile, GlaS and ISIC users already have it)::

    ROOT/images/NAME.jpg|png|tif|bmp...
    ROOT/masks/NAME.png|jpg|...      same stem as the image, any extension
    ROOT/train.txt, ROOT/val.txt, optional ROOT/test.txt: one NAME a line, with or without
    its extension; blank lines are ignored.

Everything is checked before any training starts (:func:`validate_split`): a missing
split file, an empty split, a name listed twice, a missing image or mask, an ambiguous
name, an unreadable file, an image/mask size mismatch each raise :class:`DataError`
naming the file and the line.

Images and masks are turned upright by their EXIF orientation first (as cv2.imread does,
so a mask drawn on the upright view of a camera JPEG fits it). Images load as float RGB in
[0, 1]: RGB, RGBA (alpha dropped), grayscale, palette, and 16-bit / 32-bit images
(stretched from 0 to their maximum). Masks are binarised robustly (:func:`binarize_mask`):
- colour masks (RGB, palette: by the palette's colours, never its indices) count by their
  brightest channel, so red on black is foreground; a mask whose colours are uniform and
  whose shape is in its alpha channel uses the alpha;
- 8-bit levels: ``> 127`` (JPEG masks ring near 0 and 255, anti-aliased edges take every
  level), except label images read with ``> 0``: masks with no value above 127 (0/1 masks,
  GlaS's instance labels) and masks whose non-zero values spread evenly over the range
  (128 or more instance labels);
- 16-bit, 32-bit and float masks: ``> 0``.

Augmentations are written with torch and draw from a ``torch.Generator`` seeded by
(seed, epoch, sample index): a sample's augmentation does not depend on the worker that
loads it, on the order of loading, or on whether the run was resumed.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataError(UserError):
    """A problem in a dataset folder; the message names the file (and line)."""


@dataclass(frozen=True)
class Sample:
    name: str
    image: str
    mask: Optional[str]
    source: str = ""  # "split.txt:LINE" the sample came from


# ------------------------------------------------------------------------------------------
# reading files

def _open(path: str) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        if img.getexif().get(0x0112, 1) != 1:  # EXIF Orientation: upright, as displayed and as cv2.imread reads it
            img = ImageOps.exif_transpose(img)  # (only then: without a tag it would copy the image)
        return img
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def _to_array(img: Image.Image) -> np.ndarray:
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.uint16)  # copy into native byte order
    return np.asarray(img)


def load_image(path: str) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]."""
    img = _open(path)
    if img.mode in ("RGB", "L"):
        a = np.asarray(img, dtype=np.float32) / 255.0
    elif img.mode in ("RGBA", "LA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1", "RGBX", "RGBa"):
        a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    else:  # 16-bit and 32-bit integer or float images: stretch [0, max] to [0, 1]
        raw = _to_array(img).astype(np.float32)
        if raw.ndim == 3:
            raw = raw[..., :3]
        raw = raw - min(0.0, float(raw.min()))
        top = float(raw.max())
        a = raw / top if top > 0 else raw
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 4:
        a = a[..., :3]
    return np.ascontiguousarray(a, dtype=np.float32)


# An 8-bit mask with values above 127 is read as instance labels (> 0) when at least this
# share of its non-zero pixels lies in 64..191: 128+ labels fill the range about evenly,
# while JPEG ringing and anti-aliasing around 0/255 masks sit near 0 and 255 (a disc of
# radius 3 saved at JPEG quality 50-95 keeps it under 0.25).
_LABEL_MID_SHARE = 0.4


def _binarize_levels(a: np.ndarray) -> np.ndarray:
    """(H, W) uint8 levels -> bool; see the module docstring."""
    nonzero = a > 0
    high = a > 127
    if not high.any():  # 0/1 masks, up to 127 instance labels
        return nonzero
    mid = int(((a >= 64) & (a <= 191)).sum())
    if mid >= _LABEL_MID_SHARE * int(nonzero.sum()):
        return nonzero
    return high


def binarize_mask(img: Image.Image) -> np.ndarray:
    """(H, W) bool; see the module docstring for the rule."""
    if img.mode in ("P", "PA"):  # the palette's colours decide: an editor may put white first
        img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa", "La"):
        img = img.convert({"RGBa": "RGBA", "La": "LA"}.get(img.mode, "RGB"))
    if img.mode in ("RGB", "RGBA", "LA"):
        a = np.asarray(img)
        level = a[..., :3].max(axis=2) if img.mode != "LA" else a[..., 0]
        if img.mode != "RGB" and level.min() == level.max():
            level = a[..., -1]  # uniform colour: the shape is in the alpha channel
        return _binarize_levels(np.ascontiguousarray(level))
    a = _to_array(img)
    if a.ndim == 3:
        a = a.max(axis=2)
    if a.dtype == np.bool_:
        return a.copy()
    if a.dtype == np.uint8:
        return _binarize_levels(a)
    return a > 0


def load_mask(path: str) -> np.ndarray:
    return binarize_mask(_open(path))


def image_size(path: str) -> tuple[int, int]:
    """(W, H) of an image, reading the whole file (so truncated files are caught)."""
    return _open(path).size


# ------------------------------------------------------------------------------------------
# split files and validation

def _index_folder(folder: str) -> dict[str, list[str]]:
    """stem -> file names (and full name -> [name]) of the image files in a folder."""
    index: dict[str, list[str]] = {}
    for fn in sorted(os.listdir(folder)):
        if fn.startswith("."):
            continue
        stem, ext = os.path.splitext(fn)
        if ext.lower() not in IMAGE_EXTS:
            continue
        index.setdefault(stem, []).append(fn)
        index.setdefault(fn, []).append(fn)
    return index


def read_split(path: str) -> list[tuple[int, str]]:
    """(line number, name) pairs of a split file; raises DataError for the split file's faults."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: split file not found (`disseg make-splits {os.path.dirname(path) or '.'}` "
                        f"writes train.txt, val.txt and test.txt)")
    try:
        with open(path, encoding="utf-8-sig") as fh:  # -sig: a Windows editor's byte-order mark
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the split file ({e})") from None
    entries, seen = [], {}
    for no, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        key = os.path.splitext(name)[0] if os.path.splitext(name)[1].lower() in IMAGE_EXTS else name
        if key in seen:
            raise DataError(f"{path}:{no}: {name!r} is listed twice (first on line {seen[key]})")
        seen[key] = no
        entries.append((no, name))
    if not entries:
        raise DataError(f"{path}: the split file is empty")
    return entries


def _lookup(index: dict[str, list[str]], folder: str, name: str, where: str, what: str) -> str:
    hits = index.get(name)
    if not hits:
        stem = os.path.splitext(name)[0]
        hits = index.get(stem) if os.path.splitext(name)[1].lower() in IMAGE_EXTS else None
    if not hits:
        raise DataError(f"{where}: no {what} for {name!r} in {folder}")
    if len(hits) > 1:
        raise DataError(f"{where}: {what} for {name!r} is ambiguous in {folder}: {', '.join(hits)}")
    return os.path.join(folder, hits[0])


# The mask names of the original downloads, where the mask is not named as its image: GlaS
# (train_1.bmp, train_1_anno.bmp) and ISIC (ISIC_0000000.jpg, ISIC_0000000_segmentation.png;
# ISIC 2016: _Segmentation). A mask named exactly as its image always wins; these are looked
# up only when it is absent, and two of them for one image are refused as ambiguous.
MASK_SUFFIXES = ("_anno", "_segmentation", "_Segmentation")


def mask_key(masks: dict[str, list[str]], stem: str) -> Optional[str]:
    """The key of ``stem``'s mask in a masks folder's index: the stem itself, else the stem
    with one of MASK_SUFFIXES; None when there is none. DataError when two suffixed masks
    would both fit."""
    if masks.get(stem):
        return stem
    hits = [stem + suffix for suffix in MASK_SUFFIXES if masks.get(stem + suffix)]
    if len(hits) > 1:
        files = [fn for key in hits for fn in masks[key]]
        raise DataError(f"the mask of {stem!r} is ambiguous: {', '.join(files)} (keep one)")
    return hits[0] if hits else None


def _mask_names(stem: str) -> str:
    return ", ".join(repr(n) for n in (stem, *(stem + suffix for suffix in MASK_SUFFIXES)))


def split_samples(root: str, split: str, need_masks: bool = True) -> list[Sample]:
    """The samples a split file lists, with the paths resolved (files not opened yet)."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: dataset folder not found")
    images_dir, masks_dir = os.path.join(root, "images"), os.path.join(root, "masks")
    if not os.path.isdir(images_dir):
        raise DataError(f"{images_dir}: folder not found (expected ROOT/images/)")
    if need_masks and not os.path.isdir(masks_dir):
        raise DataError(f"{masks_dir}: folder not found (expected ROOT/masks/)")
    split_path = os.path.join(root, f"{split}.txt")
    entries = read_split(split_path)
    images = _index_folder(images_dir)
    masks = _index_folder(masks_dir) if os.path.isdir(masks_dir) else {}
    out = []
    for no, name in entries:
        where = f"{split_path}:{no}"
        img = _lookup(images, images_dir, name, where, "image")
        stem = os.path.splitext(os.path.basename(img))[0]
        msk = None
        if need_masks:
            try:
                key = mask_key(masks, stem)
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            if key is None:
                raise DataError(f"{where}: no mask for {stem!r} in {masks_dir} (looked for {_mask_names(stem)})")
            msk = _lookup(masks, masks_dir, key, where, "mask")
        out.append(Sample(stem, img, msk, where))
    return out


def validate_samples(samples: Sequence[Sample]) -> None:
    """Open every file (fully decoded): unreadable files and size mismatches raise DataError."""
    for s in samples:
        try:
            wi, hi = image_size(s.image)
        except DataError as e:
            raise DataError(f"{s.source}: {e}") from None
        if s.mask is None:
            continue
        try:
            wm, hm = image_size(s.mask)
        except DataError as e:
            raise DataError(f"{s.source}: {e}") from None
        if (wi, hi) != (wm, hm):
            raise DataError(f"{s.source}: size mismatch: image {s.image} is {wi}x{hi}, "
                            f"mask {s.mask} is {wm}x{hm}")


def load_split(root: str, split: str, validate: bool = True, need_masks: bool = True) -> list[Sample]:
    samples = split_samples(root, split, need_masks)
    if validate:
        validate_samples(samples)
    return samples


def check_dataset(root: str, splits: Sequence[str] = ("train", "val")) -> dict[str, list[Sample]]:
    """Validate the given splits of a dataset before anything is trained."""
    return {sp: load_split(root, sp) for sp in splits}


def make_splits(root: str, seed: int = 0, val: float = 0.1, test: float = 0.1,
                force: bool = False) -> dict[str, list[str]]:
    """Write reproducible train.txt / val.txt / test.txt from the images that have masks."""
    for name, frac in (("val", val), ("test", test)):
        if not 0.0 <= frac < 1.0:
            raise UserError(f"--{name}={frac!r}: must lie in [0, 1)")
    if val + test >= 1.0:
        raise UserError(f"--val={val!r} + --test={test!r} leave no training images")
    if val == 0.0:
        raise UserError("--val=0.0 leaves val.txt empty, and training needs a validation split (spec: "
                        "ROOT/val.txt); give a fraction > 0")
    images_dir, masks_dir = os.path.join(root, "images"), os.path.join(root, "masks")
    for d in (images_dir, masks_dir):
        if not os.path.isdir(d):
            raise DataError(f"{d}: folder not found")
    images, masks = _index_folder(images_dir), _index_folder(masks_dir)
    stems = sorted({os.path.splitext(fn)[0] for fns in images.values() for fn in fns})
    stem_set = set(stems)
    masks_as_images = [s for s in stems for suffix in MASK_SUFFIXES
                       if s.endswith(suffix) and s[:-len(suffix)] in stem_set]
    if masks_as_images:  # GlaS ships its images and _anno masks in one folder
        raise DataError(f"{images_dir}: {len(masks_as_images)} file(s) named as the mask of another image, e.g. "
                        f"{masks_as_images[0]!r}: move the masks to {masks_dir}")
    mask_keys = {s: mask_key(masks, s) for s in stems}
    missing = [s for s in stems if mask_keys[s] is None]
    if missing:
        raise DataError(f"{masks_dir}: no mask for {len(missing)} image(s), e.g. {missing[0]!r} "
                        f"(looked for {_mask_names(missing[0])})")
    for folder, index in ((images_dir, images), (masks_dir, masks)):  # what train would refuse
        keys = stem_set if index is images else set(mask_keys.values())
        twice = [fns for s, fns in index.items() if s in keys and len(fns) > 1]
        if twice:
            raise DataError(f"{folder}: {len(twice)} name(s) with more than one file, e.g. {', '.join(twice[0])} "
                            "(a split lists a name once: keep one file per name)")
    if not stems:
        raise DataError(f"{images_dir}: no images")
    targets = {sp: os.path.join(root, f"{sp}.txt") for sp in ("train", "val", "test")}
    if not force:
        for p in targets.values():
            if os.path.exists(p):
                raise UserError(f"{p}: already exists (pass --force to overwrite)")
    order = list(stems)
    random.Random(seed).shuffle(order)
    # a requested split gets at least one image (0.1 of 3 images rounds to none: an empty
    # val.txt, which train refuses)
    n_val = max(1, round(len(order) * val))
    n_test = max(1, round(len(order) * test)) if test > 0 else 0
    parts = {"val": sorted(order[:n_val]), "test": sorted(order[n_val:n_val + n_test]),
             "train": sorted(order[n_val + n_test:])}
    if not parts["train"]:
        raise UserError(f"{root}: too few images ({len(order)}) for the requested split")
    lines = {sp: [_split_line(images, n) for n in names] for sp, names in parts.items()}  # before any write
    for sp, names in lines.items():
        if sp == "test" and not names:
            if os.path.exists(targets[sp]):  # only with --force: an old test split would overlap train
                os.remove(targets[sp])
            continue
        write_text_atomic(targets[sp], "".join(n + "\n" for n in names))
    return parts


def _split_line(images: dict[str, list[str]], stem: str) -> str:
    """How a split file names an image: its stem, or its file name where the stem ends in
    whitespace (read_split strips every line, so 'a b ' would come back as 'a b')."""
    if stem == stem.strip():
        return stem
    name = images[stem][0]
    if name != name.strip():
        raise DataError(f"{name!r}: a name that starts with whitespace cannot be listed in a split file "
                        "(its lines are read stripped): rename the image and its mask")
    return name


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------
# resizing

def resize_image(a: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(H, W, 3) array or (3, H, W) tensor -> (3, size, size) float32 tensor."""
    t = torch.as_tensor(a, dtype=torch.float32)
    if t.ndim == 3 and t.shape[-1] == 3 and t.shape[0] != 3:
        t = t.permute(2, 0, 1)
    if tuple(t.shape[-2:]) == (size, size):
        return t.contiguous()
    return F.interpolate(t[None], size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp_(0, 1)


def resize_mask(m: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """(H, W) bool -> (1, size, size) float32 in {0, 1} (area-weighted, then >= 0.5)."""
    t = torch.as_tensor(np.asarray(m), dtype=torch.float32)
    if tuple(t.shape) == (size, size):
        return t[None]
    r = F.interpolate(t[None, None], size=(size, size), mode="bilinear", align_corners=False,
                      antialias=True)[0]
    return (r >= 0.5).float()


# ------------------------------------------------------------------------------------------
# geometric augmentation (image and mask together)

@dataclass
class AugConfig:
    rotate_deg: float = 35.0
    rotate_p: float = 0.3
    hflip_p: float = 0.3
    vflip_p: float = 0.3
    dropout_p: float = 0.3
    dropout_holes: int = 10
    dropout_size: int = 32

    @classmethod
    def from_config(cls, cfg) -> "AugConfig":
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


def _u(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def augment_pair(image: torch.Tensor, mask: torch.Tensor, aug: AugConfig,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation, flips and coarse dropout of one (3, H, W) image and its (1, H, W) mask.

    Rotation: uniform angle in +-rotate_deg, bilinear, reflected border (the mask is
    rotated the same way and re-thresholded at 0.5). Flips: horizontal and vertical, each
    with its own probability. Coarse dropout: 1..dropout_holes holes, each 1..dropout_size
    pixels high and wide, set to 0 in the image only (the target is still there).
    """
    image, mask = image.clone(), mask.clone()
    # Every draw happens whatever the outcome, so one sample's draws never shift another's.
    r_rot, angle = _u(g), (2 * _u(g) - 1) * aug.rotate_deg
    r_h, r_v, r_drop = _u(g), _u(g), _u(g)
    if r_rot < aug.rotate_p and angle != 0.0:
        a = math.radians(angle)
        theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
                             dtype=torch.float32)[None]
        grid = F.affine_grid(theta, (1, 1, *image.shape[-2:]), align_corners=False)
        image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection",
                              align_corners=False)[0]
        mask = (F.grid_sample(mask[None], grid, mode="bilinear", padding_mode="reflection",
                              align_corners=False)[0] >= 0.5).float()
    if r_h < aug.hflip_p:
        image, mask = image.flip(-1), mask.flip(-1)
    if r_v < aug.vflip_p:
        image, mask = image.flip(-2), mask.flip(-2)
    if r_drop < aug.dropout_p and aug.dropout_holes > 0 and aug.dropout_size > 0:
        H, W = image.shape[-2:]
        for _ in range(_randint(g, 1, aug.dropout_holes)):
            h = _randint(g, 1, min(aug.dropout_size, H))
            w = _randint(g, 1, min(aug.dropout_size, W))
            y, x = _randint(g, 0, H - h), _randint(g, 0, W - w)
            image[:, y:y + h, x:x + w] = 0.0
    return image.contiguous(), mask.contiguous()


# ------------------------------------------------------------------------------------------
# strong photometric augmentation (Stage I's second view)

@dataclass
class PhotometricConfig:
    jitter_brightness: float = 0.3
    jitter_contrast: float = 0.3
    jitter_saturation: float = 0.3
    jitter_hue: float = 0.1
    gray_p: float = 0.5
    blur_kx: int = 1
    blur_ky: int = 7
    blur_sigma_min: float = 0.1
    blur_sigma_max: float = 3.0

    @classmethod
    def from_config(cls, cfg) -> "PhotometricConfig":
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__})


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) -> (..., 1, H, W), ITU-R 601 luma."""
    return (0.299 * x[..., 0:1, :, :] + 0.587 * x[..., 1:2, :, :] + 0.114 * x[..., 2:3, :, :])


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    maxc, _ = x.max(-3)
    minc, _ = x.min(-3)
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    dz = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / dz, (maxc - g) / dz, (maxc - b) / dz
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, v), dim=-3)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(torch.int64) % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = torch.stack((v, q, p, p, t, v), -3).gather(-3, i.unsqueeze(-3)).squeeze(-3)
    g = torch.stack((t, v, v, q, p, p), -3).gather(-3, i.unsqueeze(-3)).squeeze(-3)
    b = torch.stack((p, p, t, v, v, q), -3).gather(-3, i.unsqueeze(-3)).squeeze(-3)
    return torch.stack((r, g, b), dim=-3)


def _gauss_kernel(k: int, sigma: float) -> torch.Tensor:
    x = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return (w / w.sum()).float()


def strong_photometric(x: torch.Tensor, cfg: PhotometricConfig, g) -> torch.Tensor:
    """Stage I's strongly augmented copy of a (B, 3, H, W) batch in [0, 1].

    ``g``: one ``torch.Generator`` for the whole batch (drawn in sample order), or a
    sequence of B generators, one per sample (the trainer's choice: each sample's draws
    then depend only on its own seed, not on its place in the batch or the process).

    Per sample: colour jitter (brightness, contrast, saturation factors uniform in
    [1 - j, 1 + j], hue shift uniform in +-hue, the four in a random order), then random
    grayscale, then a Gaussian blur of kernel (blur_kx wide, blur_ky high) with sigma uniform
    in [blur_sigma_min, blur_sigma_max], reflected border. (The authors' torchvision
    Compose draws one set of parameters for the whole batch; we draw them per sample, a
    stronger and more varied second view with the same distribution per image.)
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"x: expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
    dev, dtype = x.device, x.dtype
    out = x.detach().float().cpu().clone()
    B = out.shape[0]
    gens = [g] * B if isinstance(g, torch.Generator) else list(g)
    if len(gens) != B:
        raise ValueError(f"g: expected a torch.Generator or {B} generators (one per sample), got {len(gens)}")
    for i in range(B):
        img = out[i]
        g = gens[i]
        order = torch.randperm(4, generator=g).tolist()
        fb = 1 + (2 * _u(g) - 1) * cfg.jitter_brightness
        fc = 1 + (2 * _u(g) - 1) * cfg.jitter_contrast
        fs = 1 + (2 * _u(g) - 1) * cfg.jitter_saturation
        fh = (2 * _u(g) - 1) * cfg.jitter_hue
        for op in order:
            if op == 0 and cfg.jitter_brightness > 0:
                img = (img * fb).clamp(0, 1)
            elif op == 1 and cfg.jitter_contrast > 0:
                m = _gray(img).mean()
                img = (fc * img + (1 - fc) * m).clamp(0, 1)
            elif op == 2 and cfg.jitter_saturation > 0:
                img = (fs * img + (1 - fs) * _gray(img)).clamp(0, 1)
            elif op == 3 and cfg.jitter_hue > 0:
                hsv = rgb_to_hsv(img)
                hsv[0] = (hsv[0] + fh) % 1.0
                img = hsv_to_rgb(hsv).clamp(0, 1)
        if _u(g) < cfg.gray_p:
            img = _gray(img).expand(3, -1, -1).clone()
        sigma = cfg.blur_sigma_min + _u(g) * (cfg.blur_sigma_max - cfg.blur_sigma_min)
        img = gaussian_blur(img[None], cfg.blur_kx, cfg.blur_ky, sigma)[0]
        out[i] = img
    return out.to(device=dev, dtype=dtype)


def gaussian_blur(x: torch.Tensor, kx: int, ky: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), kernel kx wide and ky high, reflected border."""
    C = x.shape[1]
    if ky > 1:
        w = _gauss_kernel(ky, sigma).view(1, 1, ky, 1).repeat(C, 1, 1, 1)
        pad = min(ky // 2, x.shape[-2] - 1)
        x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), w[:, :, ky // 2 - pad: ky // 2 + pad + 1],
                     groups=C)
    if kx > 1:
        w = _gauss_kernel(kx, sigma).view(1, 1, 1, kx).repeat(C, 1, 1, 1)
        pad = min(kx // 2, x.shape[-1] - 1)
        x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), w[..., kx // 2 - pad: kx // 2 + pad + 1],
                     groups=C)
    return x


def normalize(x: torch.Tensor, how: str) -> torch.Tensor:
    """Model input from a [0, 1] batch: ImageNet mean/std, or as is."""
    if how == "none":
        return x
    if how != "imagenet":
        raise ValueError(f"normalize={how!r}: expected 'imagenet' or 'none'")
    mean, std = _mean_std(x.device, x.dtype)
    return (x - mean) / std


_MEAN_STD: dict = {}


def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) tensors on ``device``, made once per device and
    dtype: ``torch.tensor(..., device=cuda)`` copies from the host and synchronises the
    stream, which in a training step would wait for the work queued before it."""
    key = (device, dtype)
    if key not in _MEAN_STD:
        _MEAN_STD[key] = tuple(torch.tensor(v, dtype=dtype).view(1, 3, 1, 1).to(device)
                               for v in (IMAGENET_MEAN, IMAGENET_STD))
    return _MEAN_STD[key]


# ------------------------------------------------------------------------------------------
# dataset and sampler

def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64-style mixing), stable across runs and machines."""
    z = 0x243F6A8885A308D3
    for p in parts:
        z = (z ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 31
        z = z * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        z ^= z >> 27
    return z & 0x7FFFFFFFFFFFFFFF


STRONG_SALT = 0x57A6E1  # the strong copy's seed: mix_seed(seed, epoch, index, STRONG_SALT)


def strong_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of sample ``index``'s strong copy in ``epoch``: its draws depend on
    nothing else (not the batch, the process, nor where the copy is drawn)."""
    return torch.Generator().manual_seed(mix_seed(seed, epoch, index, STRONG_SALT))


class SegDataset(torch.utils.data.Dataset):
    """Images and masks of a split at ``size`` x ``size``.

    ``ds[i]`` or ``ds[(i, epoch)]`` -> (image (3, S, S) float in [0, 1], mask (1, S, S) float
    in {0, 1}, i). With ``aug`` set, the sample is augmented with a generator seeded by
    (seed, epoch, i). With ``strong`` set (Stage I), the tuple also holds the image's strong
    photometric copy (``strong_photometric`` with ``strong_generator(seed, epoch, i)``), so
    that DataLoader workers draw it ahead of the step. ``cache`` keeps the resized,
    un-augmented tensors in memory.
    """

    def __init__(self, samples: Sequence[Sample], size: int, aug: Optional[AugConfig] = None,
                 seed: int = 0, cache: bool = True, strong: Optional["PhotometricConfig"] = None):
        self.samples = list(samples)
        self.size, self.aug, self.seed, self.cache, self.strong = size, aug, seed, cache, strong
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i in self._cache:
            return self._cache[i]
        s = self.samples[i]
        try:
            img = resize_image(load_image(s.image), self.size)
            msk = resize_mask(load_mask(s.mask), self.size) if s.mask else torch.zeros(1, self.size, self.size)
        except DataError as e:
            raise DataError(f"{s.source}: {e}") from None
        if self.cache:
            self._cache[i] = (img, msk)
        return img, msk

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        img, msk = self._load(i)
        if self.aug is not None:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, i))
            img, msk = augment_pair(img, msk, self.aug, g)
        if self.strong is not None:
            strong = strong_photometric(img[None], self.strong, [strong_generator(self.seed, epoch, i)])[0]
            return img, msk, i, strong
        return img, msk, i


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (index, epoch) keys in an order fixed by (seed, epoch).

    ``set_epoch(epoch, start_batch)`` makes the sampler yield that epoch's batches from
    ``start_batch`` on: a run resumed mid-epoch sees exactly the batches it had not seen.

    Distributed (``world`` > 1, the trainer's distributed sampler): ``batch_size`` is per
    process; the epoch's order is cut into global batches of ``batch_size · world`` and
    process ``rank`` takes its contiguous slice of each (sizes differ by at most one in an
    incomplete last batch), so the ranks' slices, concatenated in rank order, are the
    batches one process of batch ``batch_size · world`` would see. A training sampler
    (``drop_last`` or not) drops a last global batch with fewer samples than processes,
    which would leave a process without data; ``skip_empty=True`` (evaluation) keeps it and
    gives the processes past its end nothing.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world: int = 1, skip_empty: bool = False):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must lie in [0, world), got rank={rank!r}, world={world!r}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world, self.skip_empty = rank, world, skip_empty
        self.global_batch = batch_size * world
        self.shuffle, self.drop_last = shuffle, drop_last and n > self.global_batch
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def batches(self) -> list[list[int]]:
        """The epoch's global batches (every process's samples)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0x5EED))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        gb = self.global_batch
        out = [order[k:k + gb] for k in range(0, self.n, gb)]
        if out and len(out[-1]) < gb and (self.drop_last or (len(out[-1]) < self.world and not self.skip_empty)):
            out.pop()
        return out

    def shard(self, batch: list[int]) -> list[int]:
        """This process's contiguous slice of a global batch."""
        q, r = divmod(len(batch), self.world)
        start = self.rank * q + min(self.rank, r)
        return batch[start:start + q + (1 if self.rank < r else 0)]

    def num_batches(self) -> int:
        """Global batches per epoch (steps every process takes)."""
        full, rest = divmod(self.n, self.global_batch)
        keep_rest = rest and not self.drop_last and (rest >= self.world or self.skip_empty)
        return full + (1 if keep_rest else 0)

    def smallest_batch(self) -> int:
        """The fewest samples any process gets in one step of an epoch (0: no step)."""
        full, rest = divmod(self.n, self.global_batch)
        if self.num_batches() > full:  # the incomplete last batch is kept
            return rest // self.world
        return self.batch_size if full else 0

    def __len__(self) -> int:
        return sum(1 for _ in self.__iter__())

    def __iter__(self) -> Iterator[list]:
        for b in self.batches()[self.start_batch:]:
            mine = self.shard(b)
            if mine:
                yield [(i, self.epoch) for i in mine]


def collate(batch):
    """(images, masks, indices), plus the strong copies when the dataset draws them."""
    imgs, masks, idx, *strong = zip(*batch)
    out = (torch.stack(imgs), torch.stack(masks), torch.tensor(idx, dtype=torch.int64))
    return out + (torch.stack(strong[0]),) if strong else out
