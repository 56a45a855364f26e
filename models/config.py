"""Training configuration: one dataclass, every hyperparameter a command-line flag.

Resolution order (later wins): the dataclass defaults, the JSON file given by
``--config``, then the flags actually typed on the command line. The resolved config is
saved in the run folder (``config.json``) and in every checkpoint, so a run can be
evaluated or resumed without retyping it.

Flags are generated from the fields: ``batch_size`` is ``--batch-size``; booleans have a
``--no-`` form (``--fused`` / ``--no-fused``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional


class UserError(Exception):
    """A problem with what the user gave us (a path, a flag, a data file).

    The command line prints the message and exits with status 2, without a traceback.
    """

    exit_code = 2


def _f(default, help, choices=None, group="training", path=False):
    """A config field; ``path``: a file or folder, stored absolute (:func:`resolve_config`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "path": path})


# models.base.FEATURES and disseg_kernels.BACKENDS, spelt out so that the CLI reads its
# flags without importing torch (tests/test_cli.py checks they agree)
DISP_FEATURES = ("f1", "f2", "f3", "f4")
DISP_BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


def valid_size(size) -> bool:
    """An input size the model takes: a positive multiple of 16 (the encoder's stride)."""
    return isinstance(size, int) and not isinstance(size, bool) and size > 0 and size % 16 == 0


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- what to train
    stage: int = _f(1, "1 = Stage I (MedDisSeg1), 2 = Stage II (MedDisSeg2)", [1, 2], "run")
    data: Optional[str] = _f(None, "dataset ROOT (images/, masks/, train.txt, val.txt); "
                             "omitted: the embedded synthetic dataset, generated into OUT/data", group="run", path=True)
    init: Optional[str] = _f(None, "Stage II: Stage I checkpoint to start from (encoder copied)", group="run",
                             path=True)
    out: str = _f("runs/disseg", "run folder (logs, config, checkpoints)", group="run", path=True)
    resume: bool = _f(False, "continue the run in OUT from OUT/last.pt", group="run")
    epochs: int = _f(300, "maximum number of epochs", group="run")

    # ---------------------------------------------------------------- model
    encoder: str = _f("resnet50", "encoder", ["resnet50", "resnet34", "resnet18"], "model")
    pretrained: Optional[str] = _f(None, "torchvision-format ResNet state dict (local file) "
                                   "for the encoder; nothing is downloaded", group="model", path=True)
    fused: bool = _f(True, "route TeLU, gates, CDFA and the dispersive loss through "
                     "disseg_kernels (--no-fused: plain PyTorch)", group="model")
    dispersive: bool = _f(True, "add the dispersive loss", group="model")
    disp_variant: str = _f("infonce_l2", "dispersive loss variant",
                           ["infonce_l2", "infonce_l2sq", "infonce_cosine", "hinge", "covariance"], "model")
    disp_tau: float = _f(0.5, "dispersive temperature tau (the infonce variants)", group="model")
    disp_margin: float = _f(1.0, "margin epsilon of the hinge variant: pairs closer than it are pushed apart. It "
                            "must exceed the features' distances or the loss is 0 (at f4, sample granularity "
                            "they are in the tens to thousands; see --disp-scale-by-dim)", group="model")
    disp_scale_by_dim: bool = _f(False, "divide every pairwise distance by D (the row length)", group="model")
    disp_weight: float = _f(0.2, "lambda: weight applied to the dispersive loss", group="model")
    disp_feature: str = _f("f4", "feature the dispersive loss is computed on", list(DISP_FEATURES), "model")
    disp_granularity: str = _f("sample", "sample: N=B, D=C*H*W (the paper's); pixel: N=B*H*W, D=C",
                               ["sample", "pixel"], "model")
    disp_backend: str = _f("auto", "dispersive loss backend", list(DISP_BACKENDS), "model")
    disp_bank: int = _f(0, "K: a FIFO memory bank of the K most recent embeddings (rows of z, "
                        "detached) used as extra negatives of the dispersive loss (0: off). It holds "
                        "K x D values: at the paper's granularity D = C*H*W of f4 (262,144 for "
                        "ResNet-50 at 256x256), K = 4096 is 4 GiB in float32, 2 GiB in bfloat16", group="model")
    disp_bank_dtype: str = _f("float32", "storage dtype of the memory bank (bfloat16 halves it)",
                              ["float32", "bfloat16"], "model")

    # ---------------------------------------------------------------- data parallel
    ddp: bool = _f(False, "DistributedDataParallel training; launch with torchrun "
                   "(torchrun --nproc_per_node=N -m models.cli train --ddp ...). --batch-size is per "
                   "process; the dispersive loss takes every process's rows as negatives",
                   group="data parallel")
    sync_bn: bool = _f(False, "with --ddp: BatchNorm statistics over the global batch "
                       "(SyncBatchNorm on CUDA, an equivalent all-reduce on CPU)", group="data parallel")
    disp_ring: bool = _f(False, "with --ddp: pass the other processes' rows round a ring "
                         "(two blocks resident) instead of an all-gather", group="data parallel")

    # ---------------------------------------------------------------- optimisation
    size: int = _f(256, "training (and default evaluation) input size, square, multiple of 16")
    batch_size: int = _f(8, "batch size")
    lr: float = _f(1e-4, "Adam learning rate of everything but the encoder")
    lr_encoder: float = _f(1e-4, "Adam learning rate of the encoder")
    weight_decay: float = _f(0.0, "Adam weight decay")
    plateau_patience: int = _f(30, "ReduceLROnPlateau patience (epochs, on validation loss)")
    plateau_factor: float = _f(0.1, "ReduceLROnPlateau factor")
    early_stop_patience: int = _f(100, "stop after this many epochs without a better validation mIoU")
    grad_clip: float = _f(0.0, "clip the gradient norm to this value (0: off)")
    drop_last: bool = _f(True, "drop the last incomplete training batch (when the split has more "
                         "than one batch)")

    # ---------------------------------------------------------------- augmentation
    rotate_deg: float = _f(35.0, "rotation range +-degrees", group="augmentation")
    rotate_p: float = _f(0.3, "rotation probability", group="augmentation")
    hflip_p: float = _f(0.3, "horizontal flip probability", group="augmentation")
    vflip_p: float = _f(0.3, "vertical flip probability", group="augmentation")
    dropout_p: float = _f(0.3, "coarse dropout probability", group="augmentation")
    dropout_holes: int = _f(10, "coarse dropout: at most this many holes", group="augmentation")
    dropout_size: int = _f(32, "coarse dropout: holes of at most this many pixels square "
                           "(at the training size)", group="augmentation")
    jitter_brightness: float = _f(0.3, "Stage I strong copy: brightness jitter", group="augmentation")
    jitter_contrast: float = _f(0.3, "Stage I strong copy: contrast jitter", group="augmentation")
    jitter_saturation: float = _f(0.3, "Stage I strong copy: saturation jitter", group="augmentation")
    jitter_hue: float = _f(0.1, "Stage I strong copy: hue jitter", group="augmentation")
    gray_p: float = _f(0.5, "Stage I strong copy: random grayscale probability", group="augmentation")
    blur_kx: int = _f(1, "Stage I strong copy: Gaussian blur kernel width (odd)", group="augmentation")
    blur_ky: int = _f(7, "Stage I strong copy: Gaussian blur kernel height (odd)", group="augmentation")
    blur_sigma_min: float = _f(0.1, "Stage I strong copy: blur sigma lower bound", group="augmentation")
    blur_sigma_max: float = _f(3.0, "Stage I strong copy: blur sigma upper bound", group="augmentation")
    normalize: str = _f("imagenet", "input normalisation after augmentation", ["imagenet", "none"],
                        "augmentation")

    # ---------------------------------------------------------------- machinery
    device: str = _f("auto", "device (auto: cuda if available)", ["auto", "cpu", "cuda"], "machinery")
    amp: str = _f("none", "autocast dtype", ["none", "bf16", "fp16"], "machinery")
    seed: int = _f(0, "seed of everything (data order, augmentation, initialisation)", group="machinery")
    deterministic: bool = _f(False, "deterministic algorithms (bitwise-reproducible runs and resumes; "
                             "on CUDA only with --fused)",
                             group="machinery")
    workers: int = _f(-1, "data-loading worker processes (-1: auto = none on the CPU, where the step needs "
                      "every core; on CUDA min(8, cores per process - 1), so that loading and augmentation "
                      "overlap the GPU's step; the batches are the same for any count)", group="machinery")
    threads: int = _f(0, "torch intra-op CPU threads (0: torch's default)", group="machinery")
    save_every_steps: int = _f(0, "also write last.pt every N training steps (0: end of epoch only)",
                               group="machinery")
    channels_last: bool = _f(False, "model and batches in channels_last (NHWC) memory format: the "
                             "faster convolution layout on tensor-core GPUs; every fused op reads it "
                             "without a copy", group="machinery")
    compile: str = _f("none", "torch.compile the training network with this mode (reduce-overhead: "
                      "also CUDA graphs on a GPU); validation and checkpoints use the plain module",
                      ["none", "default", "reduce-overhead", "max-autotune"], "machinery")
    cuda_graph: bool = _f(False, "capture the training step's forward, loss and backward once as a CUDA graph "
                          "and replay it every step (no per-operation host work; the optimizer step stays "
                          "eager). Needs a GPU; not with --ddp, --compile or --disp-bank. A batch of another "
                          "shape (the last one with --no-drop-last) runs eagerly", group="machinery")
    cpu_malloc: str = _f("cache", "CPU training: cache = glibc keeps freed memory for reuse (no page "
                         "faults on each step's fresh tensors; 10-40%% faster steps here, the resident set "
                         "stays at its peak), system = glibc's defaults", ["cache", "system"], "machinery")
    progress: bool = _f(True, "tqdm progress bar", group="machinery")
    empty_policy: str = _f("nan", "metrics when prediction and mask are both empty: nan (skip) "
                           "or one (score 1)", ["nan", "one"], "machinery")
    threshold: float = _f(0.5, "probability threshold of the metrics", group="machinery")

    # ---------------------------------------------------------------- embedded dataset
    synth_train: int = _f(160, "synthetic dataset: training images", group="synthetic")
    synth_val: int = _f(40, "synthetic dataset: validation images", group="synthetic")
    synth_test: int = _f(0, "synthetic dataset: test images", group="synthetic")
    synth_size: int = _f(128, "synthetic dataset: image size", group="synthetic")
    synth_seed: int = _f(0, "synthetic dataset: seed", group="synthetic")

    def validate(self) -> "TrainConfig":
        """Check values that argparse cannot; raise UserError naming the field and value."""
        def bad(name, why):
            raise UserError(f"--{name.replace('_', '-')}={getattr(self, name)!r}: {why}")

        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices:
                bad(f.name, f"must be one of {choices}")
            if value is None and "Optional" not in str(f.type):
                bad(f.name, "must be given (only the path options take null; a null in a run's "
                            "config.json stands for an inf or NaN JSON cannot hold: pass the flag)")
            # grad_clip inf is "no clipping" (torch's clip_grad_norm_ reads it so)
            if isinstance(value, float) and not math.isfinite(value) and not (f.name == "grad_clip" and value > 0):
                bad(f.name, "must be a finite number")
        if not valid_size(self.size):
            bad("size", "must be a positive multiple of 16")
        for name in ("batch_size", "epochs", "synth_size"):
            if getattr(self, name) <= 0:
                bad(name, "must be positive")
        if self.workers < -1:
            bad("workers", "must be >= 0, or -1 (auto)")
        for name in ("threads", "save_every_steps", "dropout_holes", "dropout_size",
                     "plateau_patience", "early_stop_patience", "synth_test"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        for name in ("synth_train", "synth_val"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("lr", "lr_encoder"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        for name in ("rotate_p", "hflip_p", "vflip_p", "dropout_p", "gray_p", "threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, "must lie in [0, 1]")
        if not 0.0 < self.plateau_factor < 1.0:
            bad("plateau_factor", "must lie in (0, 1)")
        if self.grad_clip < 0:
            bad("grad_clip", "must be >= 0 (0: off)")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0")
        if self.size == 16 and self.batch_size == 1:
            bad("batch_size", "a 16x16 input leaves one value per channel at stride 16, which BatchNorm "
                              "cannot normalise in training: use --batch-size >= 2 or --size >= 32")
        for name in ("blur_kx", "blur_ky"):
            if getattr(self, name) < 1 or getattr(self, name) % 2 == 0:
                bad(name, "must be a positive odd integer")
        if not 0 < self.blur_sigma_min <= self.blur_sigma_max:
            bad("blur_sigma_min", f"need 0 < blur_sigma_min <= blur_sigma_max ({self.blur_sigma_max})")
        if not 0 <= self.jitter_hue <= 0.5:
            bad("jitter_hue", "must lie in [0, 0.5]")
        for name in ("jitter_brightness", "jitter_contrast", "jitter_saturation", "disp_weight"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if not self.disp_tau > 0:
            bad("disp_tau", "must be > 0")
        if not self.disp_margin > 0:
            bad("disp_margin", "must be > 0")
        if self.disp_bank < 0:
            bad("disp_bank", "must be >= 0 (0: no bank)")
        if self.disp_bank and not self.dispersive:
            bad("disp_bank", "needs the dispersive loss (drop --no-dispersive)")
        if self.disp_bank and self.disp_variant == "covariance":
            bad("disp_bank", "the covariance variant is not a loss over pairs and takes no bank")
        for name in ("sync_bn", "disp_ring"):
            if getattr(self, name) and not self.ddp:
                bad(name, "only applies with --ddp")
        if self.stage == 1 and self.init is not None:
            bad("init", "only Stage II starts from a checkpoint (--stage 2)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------
# argparse from the dataclass

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_type(f: dataclasses.Field):
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if "bool" in t:
        return bool
    if "int" in t:
        return int
    if "float" in t:
        return float
    return str


def add_config_arguments(parser: argparse.ArgumentParser, cls=TrainConfig, skip=()) -> None:
    """One flag per field; defaults are suppressed so that only typed flags override."""
    parser.add_argument("--config", metavar="JSON", default=argparse.SUPPRESS,
                        help="JSON file of config values (flags typed here override it)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        g = f.metadata.get("group", "training")
        if g not in groups:
            groups[g] = parser.add_argument_group(g)
        kind = _parse_type(f)
        help_ = f"{f.metadata.get('help', '')} (default: {f.default})"
        if kind is bool:
            groups[g].add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_)
        else:
            choices = f.metadata.get("choices")
            groups[g].add_argument(_flag(f.name), dest=f.name, type=kind, default=argparse.SUPPRESS,
                                   choices=choices, metavar=None if choices else f.name.upper(), help=help_)


def load_json_config(path: str, cls=TrainConfig) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"--config={path!r}: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            values = json.load(fh)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config={path!r}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--config={path!r}: not valid JSON, line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(values, dict):
        raise UserError(f"--config={path!r}: must hold a JSON object of config values")
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in names:
            raise UserError(f"--config={path!r}: unknown key {key!r}")
        kind = _parse_type(names[key])
        ok = value is None or (isinstance(value, bool) if kind is bool else
                               isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
                               isinstance(value, int) and not isinstance(value, bool) if kind is int else
                               isinstance(value, str))
        if not ok:
            raise UserError(f"--config={path!r}: key {key!r} = {value!r} is not a {kind.__name__}")
        if kind is float and value is not None:
            values[key] = float(value)
    return values


def resolve_config(ns: argparse.Namespace, cls=TrainConfig, base: Optional[dict] = None) -> TrainConfig:
    """defaults <- base (e.g. a saved run's config) <- --config JSON <- typed flags."""
    values: dict[str, Any] = {}
    if base:
        known = {f.name for f in dataclasses.fields(cls)}
        values.update({k: v for k, v in base.items() if k in known})
    given = vars(ns)
    if "config" in given:
        values.update(load_json_config(given["config"], cls))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in given.items() if k in names})
    cfg = cls(**values).validate()  # its messages quote the paths as given
    # then the paths absolute, as the run's config.json keeps them: `evaluate` without --data
    # and `train --resume` work from any directory
    paths = {f.name: os.path.abspath(os.path.expanduser(getattr(cfg, f.name))) for f in dataclasses.fields(cls)
             if f.metadata.get("path") and isinstance(getattr(cfg, f.name), str)}
    return dataclasses.replace(cfg, **paths)
