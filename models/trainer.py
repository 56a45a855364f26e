"""The two-stage trainer (spec/trainer.md, "Training").

One :class:`Trainer` runs one stage into one run folder::

    OUT/config.json     the resolved config          OUT/env.json   versions, git hash, argv
    OUT/metrics.csv     one row per epoch            OUT/metrics.json  the same rows
    OUT/curves.png      training curves (matplotlib; skipped with a notice if absent)
    OUT/best.pt         best validation mIoU         OUT/last.pt    the latest state
    OUT/transfer.json   Stage II: the keys copied from the Stage I checkpoint and the rest

Checkpoints are written atomically (temporary file, fsync, ``os.replace``): a crash while
writing leaves the previous file intact. ``last.pt`` holds everything a resume needs: the
model, optimizer, scheduler and grad-scaler states, the position (epoch and batch within
it), the best metric and early-stopping counter, the epoch's running sums, the history,
and the torch / CUDA / numpy / Python RNG states. The data order and every augmentation
draw from generators seeded by (seed, epoch, step or sample), so a run killed at any
moment and resumed with ``--resume`` redoes exactly the steps it lost: in
``--deterministic`` mode it ends with bitwise the same weights as an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np
import torch

from . import data as D
from .config import TrainConfig, UserError
from .losses import dice_bce, stage1_loss, stage2_loss
from .metrics import batch_metrics, nanmean, summarize

CHECKPOINT_FORMAT = "disseg-checkpoint"
CHECKPOINT_VERSION = 1
# Fields a --resume may change; every other one must equal the interrupted run's.
RESUMABLE_CHANGES = {"resume", "epochs", "workers", "threads", "progress", "save_every_steps",
                     "early_stop_patience", "device", "out", "data", "init", "pretrained"}


# ------------------------------------------------------------------------------------------
# files

def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that ``path`` is either the old file or the new one."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)


def save_checkpoint(obj: dict, path: str) -> None:
    """``torch.save`` to memory, then :func:`atomic_write_bytes`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str) -> None:
    """Temporary files of writes killed midway (never the real files)."""
    if not os.path.isdir(folder):
        return
    for fn in os.listdir(folder):
        if fn.startswith(".") and ".tmp" in fn:
            try:
                os.remove(os.path.join(folder, fn))
            except OSError:
                pass


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by the trainer, or a bare state dict (wrapped); UserError if unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is the file's fault
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"format": "state_dict", "model": obj, "config": None}
    raise UserError(f"{path}: not a disseg checkpoint or a state dict")


# ------------------------------------------------------------------------------------------
# environment

def git_hash() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    import PIL

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": str(torch.__version__), "numpy": np.__version__, "pillow": PIL.__version__,
           "git": git_hash(), "argv": sys.argv, "cpu_threads": torch.get_num_threads(),
           "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import disseg_kernels

        env["disseg_kernels"] = disseg_kernels.__version__
    except Exception as e:  # noqa: BLE001
        env["disseg_kernels"] = f"unavailable ({e})"
    return env


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda: no CUDA device is available to this torch "
                        f"({torch.__version__}); use --device cpu")
    return torch.device(name)


def set_determinism(cfg: TrainConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def rng_state() -> dict:
    """Every global RNG state, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------
# model

def build_model_from_config(cfg: TrainConfig):
    from . import DispersiveConfig, build_model

    disp = DispersiveConfig(enabled=cfg.dispersive, variant=cfg.disp_variant, tau=cfg.disp_tau,
                            weight=cfg.disp_weight, feature=cfg.disp_feature,
                            granularity=cfg.disp_granularity, backend=cfg.disp_backend)
    return build_model(cfg.stage, encoder=cfg.encoder, fused=cfg.fused, dispersive=disp)


def encoder_and_rest(model) -> tuple[list, list]:
    if hasattr(model, "param_groups"):
        groups = model.param_groups()
        enc = groups["encoder"]
        rest = [p for k, v in groups.items() if k != "encoder" for p in v]
        return enc, rest
    enc_ids = {id(p) for p in model.encoder.parameters()}
    return list(model.encoder.parameters()), [p for p in model.parameters() if id(p) not in enc_ids]


def autocast_context(device: torch.device, amp: str):
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------
# plotting

def plot_curves(rows: list[dict], path: str) -> bool:
    """Loss and validation metrics per epoch to a PNG; False (with a notice) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("notice: matplotlib is not installed; skipping the curves plot", file=sys.stderr)
        return False
    if not rows:
        return False
    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(ep, [r["train_loss"] for r in rows], label="train loss")
    a.plot(ep, [r["val_loss"] for r in rows], label="val loss (mask DiceBCE)")
    a.set_xlabel("epoch")
    a.legend()
    a.set_title("loss")
    for key, lab in (("val_mIoU", "val mIoU"), ("val_mDSC", "val mDSC"), ("train_dice", "train Dice")):
        b.plot(ep, [r[key] for r in rows], label=lab)
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.legend()
    b.set_title("metrics")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


# ------------------------------------------------------------------------------------------
# the trainer

class Trainer:
    """Train one stage as configured. ``run()`` returns the final summary dict."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print,
                 step_hook: Optional[Callable[["Trainer"], None]] = None):
        self.cfg, self.log, self.step_hook = cfg, log, step_hook
        self.out = cfg.out
        self.last_path = os.path.join(self.out, "last.pt")
        self.best_path = os.path.join(self.out, "best.pt")

    # ---------------------------------------------------------------- set-up
    def _prepare_data(self):
        cfg = self.cfg
        if cfg.data is None:
            from .synthetic import ensure_synthetic

            root = os.path.join(self.out, "data")
            if ensure_synthetic(root, cfg.synth_train, cfg.synth_val, cfg.synth_test, cfg.synth_size,
                                cfg.synth_seed):
                self.log(f"generated the synthetic dataset in {root}")
            self.data_root = root
        else:
            self.data_root = cfg.data
        splits = D.check_dataset(self.data_root, ("train", "val"))
        self.train_samples, self.val_samples = splits["train"], splits["val"]

    def _check_resume(self, saved: dict) -> None:
        diffs = [f"--{k.replace('_', '-')}: run has {saved.get(k)!r}, now {v!r}"
                 for k, v in self.cfg.to_dict().items()
                 if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]
        if diffs:
            raise UserError(f"{self.last_path}: cannot resume with a different configuration: "
                            + "; ".join(diffs))

    def setup(self) -> None:
        cfg = self.cfg
        self.device = resolve_device(cfg.device)
        if cfg.amp == "fp16" and self.device.type == "cpu":
            pass  # autocast fp16 on CPU is supported by torch >= 2.3; GradScaler too.
        if cfg.stage == 2 and cfg.init is None and not cfg.resume:
            self.log("notice: Stage II without --init: the encoder starts from "
                     + ("--pretrained" if cfg.pretrained else "random weights"))
        ckpt = None
        if cfg.resume:
            if not os.path.isfile(self.last_path):
                raise UserError(f"--resume: {self.last_path} not found (nothing to resume in --out={self.out!r})")
            ckpt = load_checkpoint(self.last_path)
            self._check_resume(ckpt.get("config") or {})
        elif os.path.exists(self.last_path) or os.path.exists(self.best_path):
            raise UserError(f"--out={self.out!r} already holds a run (last.pt/best.pt); pass --resume "
                            "to continue it or choose another --out")
        init_ckpt = load_checkpoint(cfg.init) if (cfg.init and ckpt is None) else None
        if cfg.pretrained and not os.path.isfile(cfg.pretrained):
            raise UserError(f"--pretrained={cfg.pretrained!r}: no such file")
        self._prepare_data()  # validates every file before anything is written
        os.makedirs(self.out, exist_ok=True)
        remove_stale_temporaries(self.out)

        set_determinism(cfg)
        seed_everything(cfg.seed)
        self.model = build_model_from_config(cfg).to(self.device)
        if cfg.pretrained and ckpt is None:
            from . import load_torchvision_resnet

            try:
                rep = load_torchvision_resnet(self.model, cfg.pretrained)
            except (KeyError, ValueError, RuntimeError) as e:
                raise UserError(f"--pretrained={cfg.pretrained!r}: {e}") from None
            self.log(f"loaded {len(rep.loaded)} encoder tensors from {cfg.pretrained} "
                     f"({len(rep.unused)} unused keys)")
        if init_ckpt is not None:
            self._init_from_stage1(init_ckpt)
        enc, rest = encoder_and_rest(self.model)
        self.optimizer = torch.optim.Adam(
            [{"params": enc, "lr": cfg.lr_encoder, "name": "encoder"},
             {"params": rest, "lr": cfg.lr, "name": "rest"}], weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.aug = D.AugConfig.from_config(cfg)
        self.photo = D.PhotometricConfig.from_config(cfg)
        self.train_ds = D.SegDataset(self.train_samples, cfg.size, self.aug, cfg.seed)
        self.val_ds = D.SegDataset(self.val_samples, cfg.size, None, cfg.seed)
        self.sampler = D.EpochBatchSampler(len(self.train_ds), cfg.batch_size, cfg.seed, True, cfg.drop_last)
        self.val_sampler = D.EpochBatchSampler(len(self.val_ds), cfg.batch_size, cfg.seed, False, False)

        # position and bookkeeping
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.best_metric, self.best_epoch, self.bad_epochs = -math.inf, -1, 0
        self.running = self._fresh_running()
        self.history: list[dict] = []
        if ckpt is not None:
            self._restore(ckpt)
            self.log(f"resumed {self.last_path}: epoch {self.epoch + 1}, batch {self.batch}, "
                     f"step {self.global_step}")
        else:
            atomic_write_text(os.path.join(self.out, "config.json"), json.dumps(cfg.to_dict(), indent=1) + "\n")
        atomic_write_text(os.path.join(self.out, "env.json"), json.dumps(environment(), indent=1) + "\n")

    def _init_from_stage1(self, ckpt: dict) -> None:
        from . import transfer_stage1_to_stage2

        src_cfg = ckpt.get("config") or {}
        if src_cfg.get("stage", 1) != 1:
            raise UserError(f"--init={self.cfg.init!r}: a Stage {src_cfg.get('stage')} checkpoint; "
                            "Stage II starts from a Stage I checkpoint")
        if src_cfg.get("encoder", self.cfg.encoder) != self.cfg.encoder:
            raise UserError(f"--init={self.cfg.init!r}: its encoder is {src_cfg.get('encoder')!r}, "
                            f"this run's --encoder is {self.cfg.encoder!r}")
        try:
            rep = transfer_stage1_to_stage2(ckpt["model"], self.model)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise UserError(f"--init={self.cfg.init!r}: cannot copy it into Stage II ({e})") from None
        report = {"init": os.path.abspath(self.cfg.init), "copied": list(rep.copied), "left": list(rep.left)}
        os.makedirs(self.out, exist_ok=True)
        atomic_write_text(os.path.join(self.out, "transfer.json"), json.dumps(report, indent=1) + "\n")
        self.log(f"Stage II init from {self.cfg.init}: {len(rep.copied)} keys copied, "
                 f"{len(rep.left)} left at their initial values (list in transfer.json)")

    def _fresh_running(self) -> dict:
        return {"loss": 0.0, "n": 0, "dice": [], "parts": {}}

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": self.cfg.to_dict(),
                "stage": self.cfg.stage, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "batch": self.batch,
                "global_step": self.global_step, "best_metric": self.best_metric,
                "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                "running": self.running, "history": self.history, "rng": rng_state(),
                "versions": {"torch": str(torch.__version__)}}

    def _restore(self, ck: dict) -> None:
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.batch, self.global_step = ck["epoch"], ck["batch"], ck["global_step"]
        self.best_metric, self.best_epoch, self.bad_epochs = ck["best_metric"], ck["best_epoch"], ck["bad_epochs"]
        self.running, self.history = ck["running"], ck["history"]
        set_rng_state(ck["rng"])

    def save_last(self) -> None:
        save_checkpoint(self.state(), self.last_path)

    # ---------------------------------------------------------------- steps
    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor, step_seed: int):
        cfg = self.cfg
        with autocast_context(self.device, cfg.amp):
            out = self.model(D.normalize(x, cfg.normalize))
            if cfg.stage == 1:
                g = torch.Generator().manual_seed(step_seed)
                xs = D.strong_photometric(x, self.photo, g)
                out_aug = self.model(D.normalize(xs, cfg.normalize))
        if cfg.stage == 1:
            loss, parts = stage1_loss(out, out_aug, y, cfg.disp_weight)
        else:
            loss, parts = stage2_loss(out, y, cfg.disp_weight)
        return out, loss, parts

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[float]]:
        cfg = self.cfg
        self.model.train()
        step_seed = D.mix_seed(cfg.seed, self.epoch, self.batch, 0x57A6E1)
        out, loss, parts = self._forward_loss(x, y, step_seed)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)} at epoch {self.epoch + 1}, "
                                     f"batch {self.batch}: parts {({k: float(v) for k, v in parts.items()})}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        rows = batch_metrics(out.mask, y, cfg.threshold, cfg.empty_policy, with_hd95=False)
        dice = [r["dice"] for r in rows]
        n = x.shape[0]
        self.running["loss"] += float(loss.detach()) * n
        self.running["n"] += n
        self.running["dice"].extend(dice)
        for k, v in parts.items():
            self.running["parts"][k] = self.running["parts"].get(k, 0.0) + float(v) * n
        return float(loss.detach()), dice

    @torch.no_grad()
    def validate(self, with_hd95: bool = False) -> dict:
        cfg = self.cfg
        self.model.eval()
        loader = self._loader(self.val_ds, self.val_sampler)
        total, n, rows = 0.0, 0, []
        for x, y, _ in loader:
            x, y = x.to(self.device), y.to(self.device)
            with autocast_context(self.device, cfg.amp):
                out = self.model(D.normalize(x, cfg.normalize))
            total += float(dice_bce(out.mask, y)) * x.shape[0]
            n += x.shape[0]
            rows.extend(batch_metrics(out.mask, y, cfg.threshold, cfg.empty_policy, with_hd95))
        s = summarize(rows)
        s["loss"] = total / max(n, 1)
        return s

    def _loader(self, ds, sampler):
        # A private generator: DataLoader would otherwise draw its worker base seed from the
        # global RNG, and a resumed run would draw one more time than the original.
        g = torch.Generator().manual_seed(D.mix_seed(self.cfg.seed, sampler.epoch, 0xD1))
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=self.cfg.workers,
                                           collate_fn=D.collate, generator=g,
                                           persistent_workers=False)

    # ---------------------------------------------------------------- the loop
    def _write_logs(self) -> None:
        rows = self.history
        if not rows:
            return
        keys = list(rows[0].keys())
        for r in rows[1:]:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(os.path.join(self.out, "metrics.csv"), buf.getvalue())
        atomic_write_text(os.path.join(self.out, "metrics.json"), json.dumps(rows, indent=1) + "\n")
        if not getattr(self, "_plot_off", False):
            if not plot_curves(rows, os.path.join(self.out, "curves.png")):
                self._plot_off = True

    def run(self) -> dict:
        cfg = self.cfg
        if not hasattr(self, "model"):
            self.setup()
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is a dependency
            tqdm = None
        t_start = time.time()
        stopped_early = False
        while self.epoch < cfg.epochs:
            epoch_t0, epoch_c0 = time.time(), time.process_time()
            self.sampler.set_epoch(self.epoch, self.batch)
            loader = self._loader(self.train_ds, self.sampler)
            nb = self.sampler.num_batches()
            bar = None
            if cfg.progress and tqdm is not None:
                bar = tqdm(total=nb, initial=self.batch, desc=f"stage {cfg.stage} epoch {self.epoch + 1}/{cfg.epochs}",
                           leave=False, dynamic_ncols=True, file=sys.stderr)
            for x, y, _ in loader:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                loss, dice = self.train_step(x, y)
                self.batch += 1
                self.global_step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{self.running['loss'] / max(self.running['n'], 1):.4f}",
                                    dice=f"{nanmean(self.running['dice']):.3f}")
                if self.step_hook is not None:
                    self.step_hook(self)
                if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0 and self.batch < nb:
                    self.save_last()
            if bar is not None:
                bar.close()
            val = self.validate()
            self.scheduler.step(val["loss"])
            run = self.running
            row = {"epoch": self.epoch + 1, "step": self.global_step,
                   "train_loss": run["loss"] / max(run["n"], 1), "train_dice": nanmean(run["dice"]),
                   **{f"train_{k}": v / max(run["n"], 1) for k, v in run["parts"].items()},
                   "val_loss": val["loss"], "val_mIoU": val["mIoU"], "val_mDSC": val["mDSC"],
                   "val_recall": val["Rec."], "val_precision": val["Prec."], "val_f2": val["mean_f2"],
                   "val_accuracy": val["mean_accuracy"],
                   "lr_encoder": self.optimizer.param_groups[0]["lr"], "lr": self.optimizer.param_groups[1]["lr"],
                   "epoch_seconds": round(time.time() - epoch_t0, 3),
                   "epoch_cpu_seconds": round(time.process_time() - epoch_c0, 3)}
            self.history.append(row)
            metric = val["mIoU"] if not math.isnan(val["mIoU"]) else -math.inf
            improved = metric > self.best_metric
            if improved:
                self.best_metric, self.best_epoch, self.bad_epochs = metric, self.epoch + 1, 0
            else:
                self.bad_epochs += 1
            self.epoch += 1
            self.batch = 0
            self.running = self._fresh_running()
            if improved:
                save_checkpoint(self.state(), self.best_path)
            self.save_last()
            self._write_logs()
            self.log(f"stage {cfg.stage} epoch {row['epoch']}/{cfg.epochs}: train loss {row['train_loss']:.4f} "
                     f"dice {row['train_dice']:.3f} | val loss {row['val_loss']:.4f} mIoU {row['val_mIoU']:.4f} "
                     f"mDSC {row['val_mDSC']:.4f}{' *' if improved else ''} ({row['epoch_seconds']:.1f}s, "
                     f"cpu {row['epoch_cpu_seconds']:.1f}s)")
            if self.bad_epochs >= cfg.early_stop_patience > 0:
                self.log(f"early stop: no better validation mIoU for {self.bad_epochs} epochs")
                stopped_early = True
                break
        summary = {"stage": cfg.stage, "epochs_run": self.epoch, "steps": self.global_step,
                   "best_epoch": self.best_epoch, "best_val_mIoU": self.best_metric,
                   "best_val_mDSC": next((r["val_mDSC"] for r in self.history if r["epoch"] == self.best_epoch), math.nan),
                   "stopped_early": stopped_early, "seconds": round(time.time() - t_start, 1),
                   "best": self.best_path, "last": self.last_path}
        atomic_write_text(os.path.join(self.out, "summary.json"), json.dumps(summary, indent=1) + "\n")
        return summary


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    return Trainer(cfg, log).run()
