"""Data layout, validation, binarisation, augmentations, sampler, splits and the synthetic set.
Protects: every faulty dataset is refused before training with the file and the line; the
image formats users have load; masks binarise robustly; augmentations keep image and mask
aligned and are reproducible from (seed, epoch, index); resumed epochs see the batches they
had not seen; the embedded dataset is deterministic."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import data as D
from models.synthetic import ensure_synthetic, generate, make_sample

NUCLEI = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nuclei-dsb2018"


def _write_set(root, names=("a", "b", "c"), img_ext=".jpg", mask_ext=".png", size=(20, 16)):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / "images" / (n + img_ext))
        m = np.zeros((size[1], size[0]), np.uint8)
        m[4:10, 5:12] = 255
        Image.fromarray(m).save(root / "masks" / (n + mask_ext))
    return root


def _split(root, split, lines):
    (root / f"{split}.txt").write_text("".join(x + "\n" for x in lines))


def test_names_with_and_without_extension_mixed_extensions(tmp_path):
    root = _write_set(tmp_path)
    _split(root, "train", ["a", "b.jpg", "", "c"])
    s = D.load_split(str(root), "train")
    assert [x.name for x in s] == ["a", "b", "c"]
    assert s[1].image.endswith("b.jpg") and s[1].mask.endswith("b.png")
    assert s[2].source.endswith("train.txt:4")


@pytest.mark.parametrize("fault,expect", [
    ("missing_mask", "train.txt:2: no mask for 'b'"),
    ("missing_image", "train.txt:3: no image for 'zzz'"),
    ("size_mismatch", "train.txt:1: size mismatch"),
    ("unreadable", "train.txt:2: "),
    ("empty_split", "train.txt: the split file is empty"),
    ("duplicate", "train.txt:3: 'a.jpg' is listed twice (first on line 1)"),
    ("no_split", "train.txt: split file not found (`disseg make-splits "),
    ("ambiguous", "train.txt:1: image for 'a' is ambiguous"),
])
def test_validation_names_file_and_line(tmp_path, fault, expect):
    root = _write_set(tmp_path)
    lines = ["a", "b", "c"]
    if fault == "missing_mask":
        os.remove(root / "masks" / "b.png")
    elif fault == "missing_image":
        lines = ["a", "b", "zzz"]
    elif fault == "size_mismatch":
        Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "masks" / "a.png")
    elif fault == "unreadable":
        (root / "images" / "b.jpg").write_bytes(b"not an image at all")
    elif fault == "empty_split":
        lines = ["", "  "]
    elif fault == "duplicate":
        lines = ["a.jpg", "b", "a.jpg"]
    elif fault == "ambiguous":
        Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(root / "images" / "a.png")
    if fault != "no_split":
        _split(root, "train", lines)
    with pytest.raises(D.DataError) as e:
        D.check_dataset(str(root), ("train",))
    assert expect in str(e.value)
    if fault == "unreadable":
        assert "b.jpg" in str(e.value)


def test_truncated_image_is_unreadable(tmp_path):
    root = _write_set(tmp_path, names=("a",), img_ext=".png")
    p = root / "images" / "a.png"
    p.write_bytes(p.read_bytes()[:60])
    _split(root, "val", ["a"])
    with pytest.raises(D.DataError, match=r"val.txt:1: .*a.png: unreadable"):
        D.check_dataset(str(root), ("val",))


def test_image_modes_load(tmp_path):
    """RGB, RGBA, gray, palette and 16-bit images all give (H, W, 3) float in [0, 1]."""
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    cases = {
        "rgb.png": Image.fromarray(rgb),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full((6, 7), 128, np.uint8)]), "RGBA"),
        "gray.png": Image.fromarray(rgb[..., 0]),
        "pal.png": Image.fromarray(rgb).convert("P"),
        "g16.png": Image.fromarray((np.arange(42).reshape(6, 7) * 1000).astype(np.uint16)),
        "g16.tif": Image.fromarray((np.arange(42).reshape(6, 7) * 1000).astype(np.uint16)),
    }
    for fn, img in cases.items():
        img.save(tmp_path / fn)
        a = D.load_image(str(tmp_path / fn))
        assert a.shape == (6, 7, 3) and a.dtype == np.float32, fn
        assert 0.0 <= a.min() and a.max() <= 1.0, fn
    np.testing.assert_allclose(D.load_image(str(tmp_path / "rgba.png")), rgb / 255.0, atol=1e-6)
    g16 = D.load_image(str(tmp_path / "g16.png"))
    assert g16[0, 0, 0] == 0.0 and g16[-1, -1, 0] == pytest.approx(1.0)  # stretched [0, max]


def test_mask_binarisation():
    """8-bit 0/255 masks with JPEG-like ringing use > 127; label images use > 0."""
    m = np.zeros((10, 10), np.uint8)
    m[2:6, 2:6] = 255
    noisy = m.copy()
    noisy[6, 2:6] = 40  # ringing below an edge
    noisy[2, 2] = 200
    got = D.binarize_mask(Image.fromarray(noisy))
    assert got.sum() == 16 and not got[6].any()
    labels = np.zeros((10, 10), np.uint8)  # GlaS-style instance labels 1..3
    labels[0:2, 0:2], labels[5:7, 5:7], labels[8:10, 0:3] = 1, 2, 3
    assert D.binarize_mask(Image.fromarray(labels)).sum() == 4 + 4 + 6
    many = (np.arange(100).reshape(10, 10) % 150).astype(np.uint8)  # labels crossing 127
    many[0, :] = 0
    assert D.binarize_mask(Image.fromarray(many)).sum() == (many > 0).sum()
    l16 = np.zeros((4, 4), np.uint16)
    l16[1, 1], l16[2, 2] = 1, 700
    assert D.binarize_mask(Image.fromarray(l16)).sum() == 2
    pal = Image.fromarray(labels).convert("P")
    assert D.binarize_mask(pal).sum() == 14
    rgb = Image.fromarray(np.dstack([m, m, m]))
    assert D.binarize_mask(rgb).sum() == 16


def test_mask_binarisation_of_user_formats():
    """Masks as users' tools save them (found by a user-acceptance pass, 2026-11-28): small
    objects in a JPEG mask (ringing pixels outnumber the objects: the old rule took them as
    labels and grew each disc 2.5x), a two-colour palette that lists white first (the old
    rule took index > 0: inverted), red on black (luminance 76: lost under > 127), a shape in
    the alpha channel only, and 8-bit instance labels past 127 (read with > 0)."""
    import io

    yy, xx = np.mgrid[:128, :128]
    rng = np.random.default_rng(0)
    for quality in (50, 75, 95):
        m = np.zeros((128, 128), bool)
        for _ in range(6):
            cy, cx = rng.uniform(10, 118, 2)
            m |= (yy - cy) ** 2 + (xx - cx) ** 2 < 9
        buf = io.BytesIO()
        Image.fromarray((m * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
        got = D.binarize_mask(Image.open(buf))
        iou = (got & m).sum() / (got | m).sum()
        assert iou > 0.8, (quality, iou)
    m = np.zeros((20, 30), bool)
    m[5:12, 8:20] = True
    white_first = Image.fromarray((m * 255).astype(np.uint8)).convert("RGB").quantize(2)
    assert white_first.getpalette()[:3] == [255, 255, 255]  # the case: index 0 is the foreground colour
    assert np.array_equal(D.binarize_mask(white_first), m)
    red = np.zeros((20, 30, 3), np.uint8)
    red[m] = (255, 0, 0)
    assert np.array_equal(D.binarize_mask(Image.fromarray(red)), m)
    alpha = np.zeros((20, 30, 4), np.uint8)
    alpha[..., 3] = m * 255
    assert np.array_equal(D.binarize_mask(Image.fromarray(alpha, "RGBA")), m)
    labels = np.zeros((40, 40), np.uint8)
    labels.reshape(-1)[:1600:6] = np.arange(1, 268)[:len(labels.reshape(-1)[:1600:6])] % 256  # labels 1..255
    assert np.array_equal(D.binarize_mask(Image.fromarray(labels)), labels > 0)


def test_exif_orientation_is_applied(tmp_path):
    """A camera JPEG stored sideways (EXIF Orientation 6) loads upright, so the mask drawn on
    the upright view fits (cv2.imread's behaviour); both go through the same opener."""
    raw = np.zeros((20, 30, 3), np.uint8)
    raw[:, :5] = 255  # a bright band on the stored image's left
    img = Image.fromarray(raw)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "cam.jpg", exif=exif.tobytes(), quality=95)
    a = D.load_image(str(tmp_path / "cam.jpg"))
    assert a.shape == (30, 20, 3)  # upright: the stored width is the height
    assert a[:5, :, 0].mean() > 0.9 and a[-5:, :, 0].mean() < 0.1  # the left band is now on top
    assert D.image_size(str(tmp_path / "cam.jpg")) == (20, 30)


def test_dataset_resizes_and_keeps_binary(tmp_path):
    root = _write_set(tmp_path, size=(40, 30))
    _split(root, "train", ["a", "b"])
    ds = D.SegDataset(D.load_split(str(root), "train"), 32)
    img, msk, i = ds[1]
    assert img.shape == (3, 32, 32) and msk.shape == (1, 32, 32) and i == 1
    assert set(msk.unique().tolist()) <= {0.0, 1.0}


def _aligned_pair(size=32):
    m = torch.zeros(1, size, size)
    m[0, 5:14, 8:25] = 1
    return m.expand(3, -1, -1).clone(), m.clone()


def test_augment_pair_alignment_and_reproducibility():
    img, msk = _aligned_pair()
    always = D.AugConfig(rotate_p=1.0, hflip_p=1.0, vflip_p=1.0, dropout_p=0.0)
    for s in range(5):
        a_img, a_msk = D.augment_pair(img, msk, always, torch.Generator().manual_seed(s))
        # Geometric transforms move the image and the mask together.
        assert ((a_img[0] > 0.5).float() - a_msk[0]).abs().mean() < 0.02
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    cfg = D.AugConfig()
    for _ in range(3):
        x1, y1 = D.augment_pair(img, msk, cfg, g1)
        x2, y2 = D.augment_pair(img, msk, cfg, g2)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_flips_exact_and_dropout_image_only():
    img = torch.arange(3 * 8 * 8, dtype=torch.float32).view(3, 8, 8) / 192
    msk = (torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    h = D.AugConfig(rotate_p=0, hflip_p=1, vflip_p=0, dropout_p=0)
    x, y = D.augment_pair(img, msk, h, torch.Generator().manual_seed(0))
    assert torch.equal(x, img.flip(-1)) and torch.equal(y, msk.flip(-1))
    drop = D.AugConfig(rotate_p=0, hflip_p=0, vflip_p=0, dropout_p=1, dropout_holes=10, dropout_size=3)
    x, y = D.augment_pair(img + 0.1, msk, drop, torch.Generator().manual_seed(3))
    holes = (x == 0).all(0)
    assert holes.any() and torch.equal(y, msk)  # the target is unchanged
    assert holes.sum() <= 10 * 9


def test_strong_photometric():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = D.PhotometricConfig()
    a = D.strong_photometric(x, cfg, torch.Generator().manual_seed(1))
    b = D.strong_photometric(x, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
    gray = D.strong_photometric(x, D.PhotometricConfig(gray_p=1.0), torch.Generator().manual_seed(2))
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    # The (1, 7) kernel blurs vertically only: an image constant along columns is untouched.
    cols = torch.rand(1, 3, 1, 16).expand(1, 3, 16, 16).contiguous()
    blur_only = D.PhotometricConfig(jitter_brightness=0, jitter_contrast=0, jitter_saturation=0, jitter_hue=0, gray_p=0)
    out = D.strong_photometric(cols, blur_only, torch.Generator().manual_seed(3))
    assert torch.allclose(out, cols, atol=1e-6)
    rows = cols.transpose(-1, -2).contiguous()
    assert not torch.allclose(D.strong_photometric(rows, blur_only, torch.Generator().manual_seed(3)), rows, atol=1e-3)


def test_hsv_round_trip():
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(D.hsv_to_rgb(D.rgb_to_hsv(x)), x, atol=1e-5)


def test_sampler_resume_mid_epoch_and_epoch_orders():
    s = D.EpochBatchSampler(11, 3, seed=5, shuffle=True, drop_last=True)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 3 and sorted(i for b in full for i, _ in b) != list(range(11))  # last dropped
    s.set_epoch(2, start_batch=1)
    assert list(s) == full[1:] and len(s) == 2
    s.set_epoch(3)
    assert list(s) != full
    s2 = D.EpochBatchSampler(11, 3, seed=5, shuffle=True, drop_last=True)
    s2.set_epoch(2)
    assert list(s2) == full


def test_sampler_smallest_batch_is_what_the_epoch_yields():
    """smallest_batch() (the trainer's size-16 guard reads it) equals the fewest samples any
    process gets in a step, with and without drop_last, on one process and several."""
    for n, bs, drop, world in ((12, 4, True, 1), (13, 4, True, 1), (13, 4, False, 1), (9, 4, False, 1),
                               (1, 8, True, 1), (0, 4, False, 1), (11, 2, False, 2), (13, 2, False, 2),
                               (9, 2, False, 2), (17, 3, False, 4)):
        sizes = [len(D.EpochBatchSampler(n, bs, drop_last=drop, rank=r, world=world).shard(b))
                 for r in range(world)
                 for b in D.EpochBatchSampler(n, bs, drop_last=drop, rank=r, world=world).batches()]
        s = D.EpochBatchSampler(n, bs, drop_last=drop, world=world)
        assert s.smallest_batch() == min(sizes, default=0), (n, bs, drop, world)


def test_dataset_augmentation_depends_on_epoch_and_index_only(tmp_path):
    root = _write_set(tmp_path)
    _split(root, "train", ["a", "b", "c"])
    samples = D.load_split(str(root), "train")
    cfg = D.AugConfig(rotate_p=1, dropout_p=1)
    d1, d2 = D.SegDataset(samples, 16, cfg, seed=1), D.SegDataset(samples, 16, cfg, seed=1)
    assert torch.equal(d1[(2, 4)][0], d2[(2, 4)][0])
    assert not torch.equal(d1[(2, 4)][0], d1[(2, 5)][0])
    d1[(0, 4)]  # loading another sample first changes nothing
    assert torch.equal(d1[(2, 4)][0], d2[(2, 4)][0])


def test_make_splits_reproducible(tmp_path):
    root = _write_set(tmp_path, names=[f"n{i:02d}" for i in range(20)])
    p1 = D.make_splits(str(root), seed=3, val=0.2, test=0.1)
    assert len(p1["val"]) == 4 and len(p1["test"]) == 2 and len(p1["train"]) == 14
    assert not set(p1["val"]) & set(p1["train"])
    with pytest.raises(D.UserError, match="already exists"):
        D.make_splits(str(root), seed=3)
    p2 = D.make_splits(str(root), seed=3, val=0.2, test=0.1, force=True)
    assert p1 == p2
    assert D.load_split(str(root), "val")[0].name == p1["val"][0]
    # --test 0 with --force: the old test.txt goes (its names are now in train.txt)
    p3 = D.make_splits(str(root), seed=3, val=0.2, test=0.0, force=True)
    assert not p3["test"] and not (root / "test.txt").exists()


def test_glas_and_isic_mask_names_as_downloaded(tmp_path):
    """GlaS names a mask train_1_anno.bmp and ISIC ISIC_0000000_segmentation.png: both
    stopped with "no mask for 'train_1'" (a user had to rename every file). They are now
    found through their suffix; a mask named exactly as its image still wins."""
    for style, img_name, mask_name in (("glas", "train_{}.bmp", "train_{}_anno.bmp"),
                                      ("isic", "ISIC_000000{}.jpg", "ISIC_000000{}_segmentation.png")):
        root = tmp_path / style
        _write_set(root, names=[])
        for i in range(3):
            Image.fromarray(np.full((16, 20, 3), 40 * i, np.uint8)).save(root / "images" / img_name.format(i))
            m = np.zeros((16, 20), np.uint8)
            m[2:4 + 3 * i, 3:9] = 255
            Image.fromarray(m).save(root / "masks" / mask_name.format(i))
        parts = D.make_splits(str(root), seed=0, val=0.3, test=0.0)
        samples = D.load_split(str(root), "train") + D.load_split(str(root), "val")
        assert sorted(s.name for s in samples) == sorted(parts["train"] + parts["val"])
        for smp in samples:
            assert os.path.basename(smp.mask) == mask_name.format(smp.name[-1]), smp
    root = tmp_path / "both"
    _write_set(root, names=["a"])
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(root / "masks" / "a_anno.png")
    (root / "train.txt").write_text("a\n")
    assert os.path.basename(D.load_split(str(root), "train")[0].mask) == "a.png"
    # two download names for one image, and a GlaS folder copied whole into images/: refused
    root = tmp_path / "twice"
    _write_set(root, names=["a"])
    os.remove(root / "masks" / "a.png")
    for suffix in ("_anno", "_Segmentation"):
        Image.fromarray(np.zeros((16, 20), np.uint8)).save(root / "masks" / f"a{suffix}.png")
    (root / "train.txt").write_text("a\n")
    with pytest.raises(D.DataError, match=r"train.txt:1: the mask of 'a' is ambiguous: a_anno.png, a_Segmentation.png"):
        D.load_split(str(root), "train")
    root = tmp_path / "mixed"
    _write_set(root, names=["t1", "t2"])
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(root / "images" / "t1_anno.png")
    with pytest.raises(D.DataError, match=r"1 file\(s\) named as the mask of another image, e.g. 't1_anno'"):
        D.make_splits(str(root), val=0.3, test=0.0)


def test_make_splits_never_writes_an_empty_validation_split(tmp_path):
    """make-splits wrote an empty val.txt (--val 0, or 0.1 of 3 images rounding to none),
    which train then refused. --val 0 is now refused up front, and a requested val or test
    fraction gets at least one image."""
    root = _write_set(tmp_path, names=["a", "b", "c"])
    with pytest.raises(D.UserError, match=r"--val=0.0 leaves val.txt empty"):
        D.make_splits(str(root), val=0.0, test=0.0)
    parts = D.make_splits(str(root), seed=0, val=0.1, test=0.1)
    assert (len(parts["val"]), len(parts["test"]), len(parts["train"])) == (1, 1, 1)
    assert len(D.load_split(str(root), "val")) == 1
    with pytest.raises(D.UserError, match="too few images"):
        D.make_splits(str(_write_set(tmp_path / "two", names=["a", "b"])), val=0.1, test=0.1)


def test_make_splits_refuses_what_train_would(tmp_path):
    """A name with two image files (or two masks) is refused by make-splits, as the split
    it would write is refused by train ("ambiguous")."""
    root = _write_set(tmp_path, names=["a", "b", "c"])
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(root / "images" / "b.png")
    with pytest.raises(D.DataError, match=r"images: 1 name\(s\) with more than one file, e\.g\. b\.jpg, b\.png"):
        D.make_splits(str(root))


def test_split_file_with_byte_order_mark(tmp_path):
    """A split file saved by a Windows editor (UTF-8 with BOM) reads its first name."""
    root = _write_set(tmp_path)
    (root / "train.txt").write_bytes("\ufeffa\nb\n".encode("utf-8"))
    assert [s.name for s in D.load_split(str(root), "train")] == ["a", "b"]


def test_synthetic_deterministic_and_varied(tmp_path):
    a, b = make_sample(0, 5, 64), make_sample(0, 5, 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(make_sample(1, 5, 64)[0], a[0])
    fractions = [make_sample(0, i, 48)[1].mean() / 255 for i in range(40)]
    assert min(fractions) == 0.0  # some images have no target
    assert max(fractions) > 0.12 and min(f for f in fractions if f > 0) < 0.05  # small to large
    root = tmp_path / "syn"
    generate(str(root), 6, 3, 2, 48, seed=0)
    assert len(D.load_split(str(root), "train")) == 6 and len(D.load_split(str(root), "test")) == 2
    first = (root / "images" / "synth_00001.png").read_bytes()
    assert ensure_synthetic(str(root), 6, 3, 2, 48, 0) is False  # reused
    assert ensure_synthetic(str(root), 6, 3, 2, 48, 1) is True  # another seed: regenerated
    assert (root / "images" / "synth_00001.png").read_bytes() != first


@pytest.mark.skipif(not NUCLEI.is_dir(), reason=f"real-data fixture {NUCLEI} absent")
def test_nuclei_fixture_loads():
    splits = D.check_dataset(str(NUCLEI), ("train", "val"))
    assert len(splits["train"]) == 12 and len(splits["val"]) == 4
    img, msk, _ = D.SegDataset(splits["val"], 128)[0]
    assert img.shape == (3, 128, 128) and 0.05 < msk.mean() < 0.5


def test_make_splits_writes_names_ending_in_whitespace_so_they_load(tmp_path):
    """'a b .png' was written as 'a b ' and read back stripped as 'a b' (no such image):
    make-splits succeeded and train refused its split. Such a name is now written with its
    extension; one that starts with whitespace is refused before anything is written."""
    root = _write_set(tmp_path, names=["a", "b", "c", "d b "])
    parts = D.make_splits(str(root), seed=0, val=0.25, test=0.25)
    loaded = sorted(s.name for sp in ("train", "val", "test") for s in D.load_split(str(root), sp))
    assert len(loaded) == 4 and sorted(parts["train"] + parts["val"] + parts["test"]) == ["a", "b", "c", "d b "]
    assert any(line.startswith("d b .") for sp in ("train", "val", "test")
               for line in (root / f"{sp}.txt").read_text().splitlines())
    lead = _write_set(tmp_path / "lead", names=["a", "b", " c"])
    with pytest.raises(D.DataError, match=r"' c\.\w+': a name that starts with whitespace"):
        D.make_splits(str(lead), val=0.3, test=0.0)
    assert not (tmp_path / "lead" / "train.txt").exists()
