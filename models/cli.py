"""The ``disseg`` command: train, evaluate, predict, make-splits, demo.

    disseg train --stage 1 --data ROOT --out runs/s1 [--encoder resnet18 --size 256 ...]
    disseg train --stage 2 --data ROOT --init runs/s1/best.pt --out runs/s2
    disseg train --out runs/s1 --resume          # continue an interrupted run
    disseg evaluate --checkpoint runs/s2/best.pt --data ROOT --split test --out runs/s2/eval
    disseg predict --checkpoint runs/s2/best.pt --input new_images/ --out predictions/
    disseg make-splits ROOT --seed 0 --val 0.1 --test 0.1
    disseg demo                                   # the whole pipeline on the embedded dataset

Bad inputs (a missing file, a faulty dataset, an impossible flag) print one message and
exit with status 2; no traceback is shown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from typing import Optional, Sequence

from .config import TrainConfig, UserError, add_config_arguments, resolve_config


def _cmd_train(args: argparse.Namespace) -> int:
    from .trainer import Trainer, json_text

    cfg = resolve_config(args)
    if cfg.resume:
        saved = os.path.join(cfg.out, "config.json")
        if os.path.isfile(saved):
            try:
                with open(saved, encoding="utf-8") as fh:
                    base = json.load(fh)
            except (OSError, ValueError) as e:
                raise UserError(f"{saved}: cannot read the run's config ({e})") from None
            cfg = resolve_config(args, base=base)
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
        if trainer.dist.main:
            print(json_text(summary), end="")
    finally:
        trainer.close()
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .trainer import load_checkpoint

    data = args.data
    if data is None:
        cfg = load_checkpoint(args.checkpoint).get("config") or {}
        data = cfg.get("data") or os.path.join(cfg.get("out", "."), "data")
        print(f"--data not given: using the checkpoint's dataset {data}")
    out = args.out
    if out is None:  # the files are the result (trainer.md): next to the checkpoint unless told
        out = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)),
                           f"eval_{args.split}" + ("_native" if args.native else ""))
    evaluate(args.checkpoint, data, args.split, out, args.native, args.empty_policy, args.threshold,
             args.device, args.size, args.amp)
    print(f"per_case.csv and summary.json written in {out}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict

    predict(args.checkpoint, args.input, args.out, args.threshold, args.device, args.size, args.masks)
    return 0


def _cmd_make_splits(args: argparse.Namespace) -> int:
    from .data import make_splits

    parts = make_splits(args.root, args.seed, args.val, args.test, args.force)
    print(", ".join(f"{k}: {len(v)}" for k, v in parts.items()) + f" (seed {args.seed}) written in {args.root}")
    return 0


# ------------------------------------------------------------------------------------------
# demo

# CPU-sized: ResNet-18, 48x48 inputs, 160 training images, 10 + 8 epochs (20 steps each).
# Sized for about 5-9 minutes on a 2-core machine (4.9-6.2 min measured quiet; Stage II's
# step costs about twice Stage I's); the spec's full-size settings are the `disseg train` defaults.
DEMO_DEFAULTS = dict(encoder="resnet18", size=48, batch_size=8, synth_train=160, synth_val=40,
                     synth_size=96, epochs1=10, epochs2=8, lr=1e-3, lr_encoder=1e-3, dropout_size=8,
                     plateau_patience=3, plateau_factor=0.5)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_summary
    from .predict import predict
    from .synthetic import ensure_synthetic
    from .trainer import Trainer, atomic_write_text, json_text, make_output_dir

    t0, c0 = time.time(), time.process_time()
    out = args.out
    make_output_dir(out)
    for sub in ("stage1", "stage2", "eval", "overlays"):  # the demo's own outputs only
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    data = os.path.join(out, "data")
    t = time.time()
    made = ensure_synthetic(data, args.synth_train, args.synth_val, 0, args.synth_size, args.seed)
    print(f"[demo] synthetic dataset {'generated' if made else 'reused'} in {data} "
          f"({args.synth_train} train / {args.synth_val} val, {args.synth_size}px) {time.time() - t:.1f}s")
    common = dict(data=data, encoder=args.encoder, size=args.size, batch_size=args.batch_size, seed=args.seed,
                  device=args.device, threads=args.threads, progress=args.progress, fused=args.fused,
                  lr=args.lr, lr_encoder=args.lr_encoder, dropout_size=args.dropout_size,
                  early_stop_patience=0, plateau_patience=args.plateau_patience,
                  plateau_factor=args.plateau_factor)
    summaries = {}
    for stage, epochs in ((1, args.epochs1), (2, args.epochs2)):
        if epochs <= 0:
            continue
        cfg = TrainConfig(stage=stage, out=os.path.join(out, f"stage{stage}"), epochs=epochs,
                          init=os.path.join(out, "stage1", "best.pt") if stage == 2 and args.epochs1 > 0 else None,
                          **common).validate()
        print(f"[demo] Stage {'I' if stage == 1 else 'II'}: {cfg.encoder}, {cfg.size}x{cfg.size}, "
              f"batch {cfg.batch_size}, {epochs} epochs -> {cfg.out}")
        summaries[stage] = Trainer(cfg).run()
    final_stage = 2 if args.epochs2 > 0 else 1
    ckpt = os.path.join(out, f"stage{final_stage}", "best.pt")
    print("[demo] evaluation of the final model on the validation split:")
    ev = evaluate(ckpt, data, "val", os.path.join(out, "eval"), device=args.device, log=lambda s: None)
    print("       " + format_summary(ev))
    predict(ckpt, os.path.join(data, "images"), os.path.join(out, "overlays"), device=args.device,
            mask_dir=os.path.join(data, "masks"),
            names=[ln.strip() for ln in open(os.path.join(data, "val.txt"), encoding="utf-8") if ln.strip()],
            log=lambda s: None)
    total, cpu = time.time() - t0, time.process_time() - c0
    result = {"val_mDSC": ev["mDSC"], "val_mIoU": ev["mIoU"], "val_recall": ev["Rec."],
              "val_precision": ev["Prec."], "val_hd95": ev["mean_hd95"], "seconds": round(total, 1), "cpu_seconds": round(cpu, 1),
              "stages": summaries, "checkpoint": ckpt, "out": os.path.abspath(out)}
    atomic_write_text(os.path.join(out, "demo_summary.json"), json_text(result))
    for st, sm in summaries.items():
        print(f"[demo] Stage {'I' if st == 1 else 'II'}: best validation Dice {sm['best_val_mDSC']:.4f} "
              f"(epoch {sm['best_epoch']}, {sm['seconds']:.0f}s)")
    print(f"[demo] done in {total / 60:.1f} min (process CPU {cpu / 60:.1f} min): validation Dice {ev['mDSC']:.4f}, mIoU {ev['mIoU']:.4f}")
    print(f"[demo] files: {out}/stage1, {out}/stage2 (checkpoints, metrics.csv/json, curves.png), "
          f"{out}/eval (per_case.csv, summary.json), {out}/overlays (masks/, overlays/)")
    return 0 if not math.isnan(ev["mDSC"]) else 1


# ------------------------------------------------------------------------------------------
# parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disseg", description="Med-DisSeg: train, evaluate and run the "
                                "two-stage segmentation model.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train Stage I or Stage II", description="Train one stage. Every "
                       "hyperparameter is a flag; --config JSON sets several at once.")
    add_config_arguments(t)
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("evaluate", help="per-image metrics of a checkpoint on a split")
    e.add_argument("--checkpoint", required=True, help="a checkpoint written by `disseg train`")
    e.add_argument("--data", default=None, help="dataset ROOT (default: the checkpoint's)")
    e.add_argument("--split", default="val", help="split file name without .txt (default: val)")
    e.add_argument("--out", default=None, help="folder for per_case.csv and summary.json "
                   "(default: eval_SPLIT[_native] next to the checkpoint)")
    e.add_argument("--native", action="store_true", help="evaluate at each image's native size")
    e.add_argument("--size", type=int, default=None, help="evaluation input size (default: the training size)")
    e.add_argument("--empty-policy", choices=["nan", "one"], default="nan",
                   help="both prediction and mask empty: nan (skip the case) or one (score 1)")
    e.add_argument("--threshold", type=float, default=0.5)
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    e.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    e.set_defaults(func=_cmd_evaluate)

    r = sub.add_parser("predict", help="masks and overlays for a folder of images")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--input", required=True, help="an image or a folder of images")
    r.add_argument("--out", required=True, help="output folder (masks/, overlays/)")
    r.add_argument("--masks", default=None, help="optional folder of ground-truth masks (outlined in red)")
    r.add_argument("--size", type=int, default=None)
    r.add_argument("--threshold", type=float, default=0.5)
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    r.set_defaults(func=_cmd_predict)

    m = sub.add_parser("make-splits", help="write reproducible train/val/test split files")
    m.add_argument("root", help="dataset ROOT holding images/ and masks/")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--val", type=float, default=0.1, help="validation fraction (default 0.1)")
    m.add_argument("--test", type=float, default=0.1, help="test fraction (default 0.1)")
    m.add_argument("--force", action="store_true", help="overwrite existing split files")
    m.set_defaults(func=_cmd_make_splits)

    d = sub.add_parser("demo", help="the whole pipeline on the embedded synthetic dataset",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Generate the synthetic dataset, train Stage I then Stage II (CPU-sized), "
                       "evaluate the final model on the validation split, write overlays and curves, print "
                       "the summary.")
    d.add_argument("--out", default="runs/demo", help="output folder (data/, stage1/, stage2/, eval/, overlays/)")
    d.add_argument("--encoder", default=DEMO_DEFAULTS["encoder"], choices=["resnet18", "resnet34", "resnet50"],
                   help="encoder of both stages")
    demo_help = {"size": "training and evaluation input size", "batch_size": "batch size",
                 "synth_train": "synthetic training images", "synth_val": "synthetic validation images",
                 "synth_size": "side of the generated images", "epochs1": "Stage I epochs", "epochs2": "Stage II epochs"}
    for k in ("size", "batch_size", "synth_train", "synth_val", "synth_size", "epochs1", "epochs2"):
        d.add_argument("--" + k.replace("_", "-"), type=int, default=DEMO_DEFAULTS[k], help=demo_help[k])
    d.add_argument("--plateau-patience", type=int, default=DEMO_DEFAULTS["plateau_patience"],
                   help="epochs without improvement before the learning rate drops")
    for k, what in (("lr", "Adam learning rate"), ("lr_encoder", "Adam learning rate of the encoder"),
                    ("plateau_factor", "learning-rate factor on a plateau")):
        d.add_argument("--" + k.replace("_", "-"), type=float, default=DEMO_DEFAULTS[k], help=what)
    d.add_argument("--dropout-size", type=int, default=DEMO_DEFAULTS["dropout_size"],
                   help="side of the augmentation's dropped squares")
    d.add_argument("--seed", type=int, default=0, help="seed of the data, the weights and the augmentation")
    d.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    d.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    d.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="the fused kernels (--no-fused: plain PyTorch)")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the command's usage, not the top level's (`disseg: error: unrecognized arguments`)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"disseg {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except FloatingPointError as e:
        print(f"disseg {args.command}: training diverged: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"disseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
