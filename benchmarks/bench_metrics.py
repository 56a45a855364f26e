"""HD95 at native image sizes: pairwise boundary distances against the distance transform.

`disseg evaluate --native` scores predictions at the images' own size (ISIC images run to
several thousand pixels a side). A clean prediction has a few thousand boundary pixels; a
speckled one (an early checkpoint, a hard image) has 10^5-10^6, and the pairwise distances
between two boundaries grow as their product. ``models.metrics.hd95`` switches to an exact
separable distance transform there. This times both on an elliptical lesion mask and a
prediction near it, with speckle noise flipping a fraction of its pixels:

    python -m benchmarks.bench_metrics                      # 2000x1500 and 4000x3000
    python -m benchmarks.bench_metrics --sizes 2000x1500 --noise 0,0.02,0.1

The pairwise method is timed only where it needs at most ``--pairwise-max`` distances
(above that its time is estimated from its measured rate and marked so). Writes
benchmarks/results/metrics_<device>_<date>.csv and .md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import torch

from benchmarks._args import out_folder, positive_int
from models import metrics as M

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["size", "noise", "mask_noise", "pred_boundary", "gt_boundary", "pairwise_distances", "hd95", "auto_s", "pairwise_s",
          "pairwise_estimated", "x_pairwise"]


def masks(h: int, w: int, noise: float, mask_noise: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, mask): an elliptical lesion and a slightly shifted, resized prediction
    whose pixels flip with probability ``noise`` (the mask's with ``mask_noise``)."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    gt = ((yy - 0.47 * h) ** 2 / (h / 3) ** 2 + (xx - w / 2) ** 2 / (w / 2.9) ** 2) < 1
    pred = ((yy - 0.48 * h) ** 2 / (h / 3.1) ** 2 + (xx - w / 2) ** 2 / (w / 2.85) ** 2) < 1
    g = torch.Generator().manual_seed(seed)
    if noise > 0:
        pred = pred ^ (torch.rand(h, w, generator=g) < noise)
    if mask_noise > 0:
        gt = gt ^ (torch.rand(h, w, generator=g) < mask_noise)
    return pred, gt


def _pairwise_hd95(pred, gt) -> float:
    pb, gb = M.boundary(pred).nonzero().double(), M.boundary(gt).nonzero().double()
    return float(max(torch.quantile(M._nearest_distances(pb, gb), 0.95),
                     torch.quantile(M._nearest_distances(gb, pb), 0.95)))


def _best(fn, repeats: int) -> tuple[float, float]:
    value, best = None, float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return value, best


def run_case(h: int, w: int, noise: float, repeats: int, pairwise_max: float, rate: list,
             mask_noise: float = 0.0) -> dict:
    pred, gt = masks(h, w, noise, mask_noise)
    nb, mb = int(M.boundary(pred).sum()), int(M.boundary(gt).sum())
    pairs = 2.0 * nb * mb
    value, auto_s = _best(lambda: M.hd95(pred, gt), repeats)
    row = {"size": f"{w}x{h}", "noise": noise, "mask_noise": mask_noise, "pred_boundary": nb, "gt_boundary": mb, "pairwise_distances": pairs,
           "hd95": value, "auto_s": auto_s}
    if pairs <= pairwise_max:
        want, pw_s = _best(lambda: _pairwise_hd95(pred, gt), repeats)
        if want != value:
            raise RuntimeError(f"{w}x{h} noise {noise}: hd95 {value} differs from the pairwise {want}")
        rate.append(pairs / pw_s)
        row.update(pairwise_s=pw_s, pairwise_estimated=False)
    elif rate:
        row.update(pairwise_s=pairs / max(rate), pairwise_estimated=True)
    if row.get("pairwise_s"):
        row["x_pairwise"] = row["pairwise_s"] / auto_s
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="2000x1500,4000x3000", help="WxH, comma-separated")
    p.add_argument("--noise", default="0,0.02,0.1", help="speckle fractions, comma-separated")
    p.add_argument("--mask-noise", type=float, default=0.0,
                   help="speckle fraction of the mask too (a noisy label image: both boundaries long)")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--pairwise-max", type=float, default=2e9,
                   help="time the pairwise method only up to this many distances")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=out_folder, default=RESULTS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from benchmarks.bench_dispersive import _fmt, load_average, machine_name, write_csv

    sizes = []
    for s in args.sizes.split(","):
        try:
            w, h = (int(v) for v in s.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sizes: expected WxH, got {s!r}") from None
        sizes.append((h, w))
    noises = [float(v) for v in args.noise.split(",")]
    date, load = _dt.datetime.now(_dt.timezone.utc), load_average()
    rows, rate = [], []
    for h, w in sizes:
        for noise in noises:
            r = run_case(h, w, noise, args.repeats, args.pairwise_max, rate, args.mask_noise)
            rows.append(r)
            print(f"{r['size']:>10} noise {noise:<5} boundaries {r['pred_boundary']:>8} / {r['gt_boundary']:<7} "
                  f"hd95 {r['hd95']:9.3f}  {r['auto_s']:7.3f} s  pairwise {_fmt(r.get('pairwise_s'), '.3f')} s"
                  f"{' (estimated)' if r.get('pairwise_estimated') else ''}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"metrics_cpu_{date:%Y-%m-%d}{'_mask_noise' if args.mask_noise else ''}"
    write_csv(stem.with_suffix(".csv"), rows, FIELDS)
    lines = [
        "# HD95 at native sizes: the distance transform against pairwise boundary distances", "",
        f"- machine: {machine_name('cpu')}; torch {torch.__version__}; {torch.get_num_threads()} thread(s)",
        f"- date: {date:%Y-%m-%d %H:%M} UTC; load average at start: {load}",
        f"- command: `{' '.join(['python -m benchmarks.bench_metrics', *(sys.argv[1:] if argv is None else argv)])}`",
        f"- an elliptical lesion and a shifted prediction with speckle noise; seconds per HD95, fastest of "
        f"{args.repeats}; pairwise timed up to {args.pairwise_max:.0e} distances, above that estimated from its "
        "fastest measured rate (marked ~); both methods give the same value (checked where both ran)", "",
        "| W×H | noise (pred / mask) | boundary px (pred / mask) | pairwise distances | HD95 px | hd95() s | "
        "pairwise s | × |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        est = "~" if r.get("pairwise_estimated") else ""
        lines.append(f"| {r['size']} | {r['noise']} / {r['mask_noise']} | {r['pred_boundary']:,} / {r['gt_boundary']:,} | "
                     f"{r['pairwise_distances']:.2e} | {r['hd95']:.3f} | {r['auto_s']:.3f} | "
                     f"{est}{_fmt(r.get('pairwise_s'), '.3f')} | {est}{_fmt(r.get('x_pairwise'), '.1f')} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.csv')} and {stem.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
