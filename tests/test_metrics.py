"""Metrics against an independent computation written out here by hand (plain Python loops
over pixels, numpy's percentile), never the project's code checked against itself.
Protects: the confusion-count formulas, HD95's boundary/percentile definition (MONAI's /
medpy's), the empty-mask policy, one-pixel masks."""

import math

import numpy as np
import pytest
import torch

from models.metrics import batch_metrics, hd95, image_metrics, summarize


def _hand(pred, gt):
    """Confusion counts and the six ratios by loops; None where 0/0."""
    H, W = len(pred), len(pred[0])
    tp = fp = fn = tn = 0
    for i in range(H):
        for j in range(W):
            p, g = pred[i][j], gt[i][j]
            tp += p and g
            fp += p and not g
            fn += (not p) and g
            tn += (not p) and (not g)

    def r(a, b):
        return a / b if b else None

    return {"iou": r(tp, tp + fp + fn), "dice": r(2 * tp, 2 * tp + fp + fn), "recall": r(tp, tp + fn),
            "precision": r(tp, tp + fp), "f2": r(5 * tp, 5 * tp + 4 * fn + fp), "accuracy": (tp + tn) / (H * W)}


def _hand_boundary(m):
    H, W = len(m), len(m[0])
    pts = []
    for i in range(H):
        for j in range(W):
            if not m[i][j]:
                continue
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                a, b = i + di, j + dj
                if not (0 <= a < H and 0 <= b < W) or not m[a][b]:
                    pts.append((i, j))
                    break
    return pts


def _hand_hd95(pred, gt):
    bp, bg = _hand_boundary(pred), _hand_boundary(gt)
    if not bp or not bg:
        return None

    def directed(a, b):
        return [min(math.hypot(p[0] - q[0], p[1] - q[1]) for q in b) for p in a]

    return max(np.percentile(directed(bp, bg), 95), np.percentile(directed(bg, bp), 95))


def _blob(H, W, cy, cx, r):
    return [[(i - cy) ** 2 + (j - cx) ** 2 <= r * r for j in range(W)] for i in range(H)]


def _t(m):
    return torch.tensor(m, dtype=torch.bool)


CASES = {
    "overlap": (_blob(20, 24, 9, 10, 5), _blob(20, 24, 11, 13, 6)),
    "disjoint": (_blob(20, 20, 4, 4, 2), _blob(20, 20, 15, 14, 3)),
    "random": ((np.random.default_rng(1).random((17, 19)) > 0.6).tolist(),
               (np.random.default_rng(2).random((17, 19)) > 0.5).tolist()),
    "one_pixel_both": ([[i == 3 and j == 4 for j in range(8)] for i in range(8)],
                       [[i == 5 and j == 1 for j in range(8)] for i in range(8)]),
    "one_pixel_same": ([[i == 2 and j == 2 for j in range(6)] for i in range(6)],
                       [[i == 2 and j == 2 for j in range(6)] for i in range(6)]),
    "one_pixel_vs_blob": ([[i == 10 and j == 10 for j in range(20)] for i in range(20)], _blob(20, 20, 10, 10, 4)),
    "touching_border": ([[j < 3 for j in range(10)] for i in range(10)], [[j < 5 for j in range(10)] for i in range(10)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_metrics_match_hand_computation(name):
    pred, gt = CASES[name]
    want = _hand(pred, gt)
    got = image_metrics(_t(pred), _t(gt), "nan")
    for k, v in want.items():
        if v is None:
            assert math.isnan(got[k]), (k, got[k])
        else:
            assert got[k] == pytest.approx(v, abs=1e-12), k
    want_hd = _hand_hd95(pred, gt)
    assert got["hd95"] == pytest.approx(want_hd, abs=1e-9)


def test_one_pixel_values():
    """Two single pixels 2 rows and 3 columns apart: HD95 is their distance, Dice 0."""
    pred, gt = CASES["one_pixel_both"]
    got = image_metrics(_t(pred), _t(gt))
    assert got["hd95"] == pytest.approx(math.hypot(2, 3))
    assert got["dice"] == 0.0 and got["iou"] == 0.0
    same = image_metrics(*map(_t, CASES["one_pixel_same"]))
    assert same["dice"] == 1.0 and same["hd95"] == 0.0 and same["accuracy"] == 1.0


def test_empty_policy_both_empty():
    z = torch.zeros(8, 9, dtype=torch.bool)
    nan = image_metrics(z, z, "nan")
    for k in ("iou", "dice", "recall", "precision", "f2", "hd95"):
        assert math.isnan(nan[k]), k
    assert nan["accuracy"] == 1.0
    one = image_metrics(z, z, "one")
    assert all(one[k] == 1.0 for k in ("iou", "dice", "recall", "precision", "f2", "accuracy"))
    assert one["hd95"] == 0.0


@pytest.mark.parametrize("policy", ["nan", "one"])
def test_one_side_empty(policy):
    """Only one mask empty: the case is a failure under either policy."""
    z = torch.zeros(10, 10, dtype=torch.bool)
    m = _t(_blob(10, 10, 5, 5, 2))
    fp_only = image_metrics(m, z, policy)  # predicted something where there is nothing
    assert fp_only["iou"] == 0 and fp_only["dice"] == 0 and fp_only["precision"] == 0 and fp_only["f2"] == 0
    # HD95 is the worst value, the image diagonal: NaN let the mean skip every miss
    assert math.isnan(fp_only["recall"]) and fp_only["hd95"] == pytest.approx(math.hypot(10, 10))
    assert fp_only["accuracy"] == pytest.approx(_hand([[bool(v) for v in r] for r in m.tolist()],
                                                      [[False] * 10] * 10)["accuracy"])
    missed = image_metrics(z, m, policy)
    assert missed["recall"] == 0 and math.isnan(missed["precision"]) and missed["dice"] == 0
    assert missed["hd95"] == pytest.approx(math.hypot(10, 10))
    assert math.isnan(image_metrics(z, m, policy, with_hd95=False)["hd95"])


def test_a_blank_model_is_not_rewarded():
    """A model that predicts nothing: its mean HD95 is the worst value, not 0 px (the one
    both-empty image was all the mean used to cover), and the summary says over how many
    images precision is averaged (1 of 3: an empty prediction has no precision)."""
    from models.evaluate import format_summary
    from models.metrics import scored_counts

    z = torch.zeros(10, 10, dtype=torch.bool)
    gts = [_t(_blob(10, 10, 5, 5, 2)), _t(_blob(10, 10, 4, 6, 3)), z]
    rows = [image_metrics(z, g, "one") for g in gts]
    s = summarize(rows)
    assert s["mean_hd95"] == pytest.approx(2 * math.hypot(10, 10) / 3)
    assert s["Prec."] == 1.0 and s["Rec."] == pytest.approx(1 / 3)
    s["n_scored"] = scored_counts(rows)
    assert s["n_scored"]["precision"] == 1 and s["n_scored"]["hd95"] == 3 and s["n_scored"]["iou"] == 3
    assert "means over fewer images" in format_summary(s) and "Prec. 1" in format_summary(s)


def test_batch_metrics_threshold_and_summary():
    """Logits > 0 is probability > 0.5; the summary's means skip NaN cases."""
    gt = torch.zeros(3, 1, 6, 6)
    gt[0, 0, 1:4, 1:4] = 1
    logits = torch.full((3, 1, 6, 6), -5.0)
    logits[0, 0, 1:4, 1:3] = 5.0  # 6 of 9 pixels
    rows = batch_metrics(logits, gt, with_hd95=False)
    assert rows[0]["dice"] == pytest.approx(2 * 6 / (2 * 6 + 3))
    assert math.isnan(rows[1]["dice"])  # both empty, policy nan
    s = summarize(rows)
    assert s["mDSC"] == pytest.approx(rows[0]["dice"])
    assert s["n_images"] == 3
    rows_one = batch_metrics(logits, gt, empty_policy="one", with_hd95=False)
    assert summarize(rows_one)["mDSC"] == pytest.approx((rows[0]["dice"] + 2) / 3)


def test_hd95_large_masks_chunked():
    """Boundaries longer than one distance chunk give the same value as the hand loop."""
    a, b = _blob(64, 64, 30, 30, 25), _blob(64, 64, 34, 31, 22)
    assert hd95(_t(a), _t(b)) == pytest.approx(_hand_hd95(a, b), abs=1e-9)


@pytest.mark.parametrize("shape, density", [((37, 53), 0.02), ((53, 37), 0.3), ((64, 64), 0.002), ((5, 90), 0.05),
                                            ((1, 21000), 0.001), ((200, 3), 0.1)])
def test_distance_transform_equals_pairwise_distances(shape, density):
    """HD95's distance transform (the path for large, speckled masks) returns exactly the
    pairwise distances to the nearest mask pixel: random masks with empty rows and columns,
    tall and wide shapes (the row windows), queries on mask pixels (distance 0), and a
    21,000-pixel-wide mask whose squared distances need 64-bit integers."""
    from models.metrics import _nearest_distances, _nearest_distances_to_mask

    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) < density
    mask[shape[0] // 2, shape[1] // 3] = True  # never empty
    queries = (torch.rand(shape, generator=g) < 0.2).nonzero()
    want = _nearest_distances(queries.to(torch.float64), mask.nonzero().to(torch.float64))
    got = _nearest_distances_to_mask(queries, mask, chunk=7)  # small chunks: many row windows
    assert torch.equal(got, want)


def test_hd95_of_a_speckled_prediction_at_native_size():
    """A 2 %-speckled prediction at 600 × 800 (~40,000 boundary pixels against ~1,500):
    HD95 through the distance transform equals the pairwise computation."""
    from models import metrics as M

    yy, xx = torch.meshgrid(torch.arange(600), torch.arange(800), indexing="ij")
    gt = ((yy - 290) ** 2 / 200 ** 2 + (xx - 400) ** 2 / 280 ** 2) < 1
    g = torch.Generator().manual_seed(0)
    pred = ((((yy - 300) ** 2 / 190 ** 2 + (xx - 395) ** 2 / 275 ** 2) < 1)
            ^ (torch.rand(600, 800, generator=g) < 0.02))
    pb, gb = M.boundary(pred), M.boundary(gt)
    assert int(pb.sum()) * int(gb.sum()) > 16 * pred.numel()  # hd95 takes the transform
    pairwise = max(torch.quantile(M._nearest_distances(pb.nonzero().double(), gb.nonzero().double()), 0.95),
                   torch.quantile(M._nearest_distances(gb.nonzero().double(), pb.nonzero().double()), 0.95))
    assert hd95(pred, gt) == float(pairwise)


def test_bench_metrics_runs_and_agrees(tmp_path):
    """benchmarks/bench_metrics.py: both HD95 methods on a clean and a speckled case (it
    raises if they disagree), the table written."""
    from benchmarks import bench_metrics

    rows = bench_metrics.main(["--sizes", "120x90", "--noise", "0,0.2", "--repeats", "1", "--out", str(tmp_path)])
    assert [r["noise"] for r in rows] == [0.0, 0.2]
    assert rows[1]["pred_boundary"] > 10 * rows[0]["pred_boundary"]
    assert all(r["pairwise_s"] > 0 and not r["pairwise_estimated"] for r in rows)
    assert "| 120x90 | 0.2 / 0.0 |" in next(tmp_path.glob("metrics_cpu_*.md")).read_text()


def test_metric_inputs_are_checked():
    """A probability map or logits given to image_metrics used to be read by bool() (every
    non-zero value foreground: a perfect prediction at 0.9 / 0.1 scored Dice 0.4); a 1×W
    mask lost its height in squeeze(); batch_metrics with (B, H, W) masks named an internal
    slice. Now: 0/1 values only, leading size-1 dimensions only, shapes named."""
    gt = torch.zeros(4, 4)
    gt[1:3, 1:3] = 1
    with pytest.raises(ValueError, match=r"pred must be binary \(bool or 0/1\), got the value 0.1"):
        image_metrics(gt * 0.8 + 0.1, gt)
    for dtype in (torch.uint8, torch.int32, torch.uint16):
        with pytest.raises(ValueError, match="gt must be binary .* got the value 255"):
            image_metrics(gt.bool(), (gt * 255).to(dtype))
    assert image_metrics(gt[None, None], gt.to(torch.uint8), with_hd95=False)["dice"] == 1.0
    row = torch.tensor([[0, 1, 1]])
    assert image_metrics(row, row, with_hd95=False)["iou"] == 1.0  # 1×W stays (1, W)
    # an image array's trailing channel, as PIL / NumPy give a mask read as (H, W, 1)
    assert image_metrics(gt[:, :, None], gt[None], with_hd95=False)["dice"] == 1.0
    with pytest.raises(ValueError, match=r"gt must be an \(H, W\) mask .* got shape \(4, 4, 3\)"):
        image_metrics(gt, gt[:, :, None].expand(4, 4, 3))
    with pytest.raises(ValueError, match=r"pred must be an \(H, W\) mask .* got shape \(2, 4, 4\)"):
        image_metrics(torch.zeros(2, 4, 4), gt)
    with pytest.raises(ValueError, match=r"logits and masks must both be \(B, 1, H, W\), got logits "
                                         r"\(2, 1, 4, 4\) and masks \(2, 4, 4\)"):
        batch_metrics(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))
