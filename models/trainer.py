"""The two-stage trainer (spec/trainer.md, "Training").

One :class:`Trainer` runs one stage into one run folder::

    OUT/config.json     the resolved config          OUT/env.json   versions, git hash, argv
    OUT/metrics.csv     one row per epoch            OUT/metrics.json  the same rows
                        (val_loss: the main mask's DiceBCE, which ReduceLROnPlateau watches)
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

Data parallel (``--ddp`` under ``torchrun``, ``models/ddp.py``): each process trains on its
slice of every global batch (``--batch-size`` per process) in DistributedDataParallel; the
losses' batch sums and the dispersive loss's negatives span all processes, so N processes
train as one process with an N times larger batch (exactly so with ``--sync-bn``). Only
rank 0 writes files and logs; every rank reads ``last.pt`` on ``--resume`` (same number of
processes required). Validation is split over the processes and gathered.

Memory bank (``--disp-bank K``): a ``disseg_kernels.NegativeBank`` of the K most recent
rows of z (the main view's, after each optimizer step; under DDP every process's, so all
banks stay identical) whose rows are extra negatives of the dispersive loss. It is saved
in the checkpoints, so a resumed run keeps its negatives.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np
import torch

from . import data as D
from .config import TrainConfig, UserError
from .ddp import Dist, convert_sync_batchnorm, init_distributed, shutdown
from .losses import dice_bce, stage1_loss, stage2_loss
from .metrics import batch_metrics, nanmean, summarize

CHECKPOINT_FORMAT = "disseg-checkpoint"
CHECKPOINT_VERSION = 1  # version 1 files without "world"/"bank" load as world 1, no bank
# Fields a --resume may change; every other one must equal the interrupted run's.
RESUMABLE_CHANGES = {"resume", "epochs", "workers", "threads", "progress", "save_every_steps",
                     "early_stop_patience", "device", "out", "data", "init", "pretrained", "cuda_graph"}


def _cpu_has_fast_fp16_conv() -> bool:
    """Whether oneDNN runs float16 convolutions on this CPU (AVX512-FP16 / AMX-FP16);
    without it autocast's float16 convolutions fall back to ATen's slow_conv2d."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return True  # unknown: say nothing


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


def json_text(obj) -> str:
    """Strict JSON (NaN and infinities written as null, which any JSON reader takes)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=1, allow_nan=False) + "\n"


def csv_text(rows: list[dict], fieldnames: list[str]) -> str:
    """CSV of ``rows``, a missing value (NaN, or a key the row lacks) as an empty field,
    as ``json_text`` writes it null: one spelling of "no value" in every file we write."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fieldnames)
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    return buf.getvalue()


def check_output_dir(path: str, what: str = "--out") -> None:
    """A folder the user named can be made (or is one): else a UserError naming it, before any
    work is done."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{what}={path!r}: is a file, not a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{what}={path!r}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{what}={path!r}: {parent} is not writable")


def make_output_dir(path: str, what: str = "--out") -> None:
    check_output_dir(path, what)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what}={path!r}: cannot create the folder ({e.strerror or e})") from None


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
    if os.path.isdir(path):
        inside = [f for f in ("best.pt", "last.pt") if os.path.isfile(os.path.join(path, f))]
        raise UserError(f"{path}: a folder, not a checkpoint file"
                        + (f" (it holds {' and '.join(inside)}: pass {os.path.join(path, inside[0])})" if inside else ""))
    if not os.path.isfile(path):
        raise UserError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any decoding failure is the file's fault
        # the first sentence only: torch's advice on weights_only=False is not for a command-line user
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first})") from None
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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC = {"tried": False, "kept": False}  # for the whole process: mallopt cannot be undone


def freed_memory_kept() -> bool:
    """Whether :func:`keep_freed_memory` has switched this process's allocator."""
    return _MALLOC["kept"]


def make_adam(params, **kwargs) -> torch.optim.Adam:
    """Adam with torch's fused kernel where this torch has one for the parameters' device
    and dtype (CPU and CUDA float tensors): one pass over each parameter, its gradient and
    both moments instead of about ten per tensor. The Stage II step (45.6 M parameters) on
    the 2-core CPU: 37 ms against 111 ms for the default loop and 128 ms with foreach.
    Elsewhere the default implementation."""
    params = list(params)
    try:
        return torch.optim.Adam(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, **kwargs)


def keep_freed_memory() -> Optional[str]:
    """Make glibc's malloc keep the memory a process frees (no mmap for large blocks, no
    trimming of the heap) so that each training step's tensors reuse pages already
    mapped instead of faulting in fresh zeroed ones. What tcmalloc and jemalloc do by
    default; the resident set then stays at its peak until the process ends.

    On this 2-core CPU a ResNet-50 step at batch 4, 128×128 took 10-40 % less time
    (``python -m benchmarks.bench_models --malloc system`` against the default ``cache``).
    Returns what was done, or why nothing was (not Linux, not glibc, mallopt refused);
    None when an earlier call in this process already tried.
    """
    if _MALLOC["tried"]:
        return None
    _MALLOC["tried"] = True
    if not sys.platform.startswith("linux"):
        return f"system allocator kept ({sys.platform}: no glibc mallopt)"
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "system allocator kept (not glibc)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return f"system allocator kept (glibc {version} refused mallopt)"
    _MALLOC["kept"] = True
    return f"freed memory kept for reuse (glibc {version}: mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB)"


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
                            margin=cfg.disp_margin, scale_by_dim=cfg.disp_scale_by_dim, weight=cfg.disp_weight, feature=cfg.disp_feature,
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


def autocast_context(device: torch.device, amp: str, cache: bool = True):
    """Autocast to ``amp``'s dtype. ``cache=False`` inside a CUDA-graph capture: autocast's
    cache of casted weights would hand the graph tensors that the next step frees."""
    if amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


# ------------------------------------------------------------------------------------------
# plotting

def _rate_text(images_per_s: float) -> str:
    """The epoch line's training rate; it is timed from the epoch's second step on (the first
    pays for warm-up), so an epoch of one step has none."""
    if math.isnan(images_per_s):
        return "img/s n/a: timed from the epoch's second step"
    return f"{images_per_s:.1f} img/s"


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
    # the main mask's DiceBCE, train and val, on one axis (comparable); the training
    # objective (with λ·dispersive, often negative and far larger) on its own axis
    if "train_mask" in rows[0]:
        a.plot(ep, [r["train_mask"] for r in rows], label="train mask DiceBCE")
    a.plot(ep, [r["val_loss"] for r in rows], label="val mask DiceBCE")
    a.set_xlabel("epoch")
    a.set_ylabel("mask DiceBCE")
    total = a.twinx()
    total.plot(ep, [r["train_loss"] for r in rows], "k--", linewidth=0.8, label="train objective (right axis)")
    total.set_ylabel("training objective")
    lines = a.get_legend_handles_labels()
    extra = total.get_legend_handles_labels()
    a.legend(lines[0] + extra[0], lines[1] + extra[1], fontsize="small")
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


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory without a stream
    synchronisation (the caching host allocator keeps the pinned buffer until the copy is
    done)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class Trainer:
    """Train one stage as configured. ``run()`` returns the final summary dict."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print,
                 step_hook: Optional[Callable[["Trainer"], None]] = None):
        self.cfg, self.log, self.step_hook = cfg, log, step_hook
        self.out = cfg.out
        # Stage I's strong copy in a helper thread: decided at the first call (on CUDA), see _strong_copy
        self._aug_thread: Optional[bool] = None
        self._aug_pool = None
        # --cuda-graph: the captured step (made at the first training step), the names of the
        # loss parts it returns, and whether a batch of another shape was announced
        self._graph = None
        self._graph_parts: list[str] = []
        self._graph_mismatch_said = False
        self._hinge_zero_said = False  # the warning that a hinge dispersive term was 0 all epoch
        self.last_path = os.path.join(self.out, "last.pt")
        self.best_path = os.path.join(self.out, "best.pt")

    # ---------------------------------------------------------------- set-up
    def _prepare_data_main(self):
        """Rank 0: generate the embedded dataset when --data is omitted."""
        cfg = self.cfg
        if cfg.data is None:
            from .synthetic import ensure_synthetic

            root = os.path.join(self.out, "data")
            if ensure_synthetic(root, cfg.synth_train, cfg.synth_val, cfg.synth_test, cfg.synth_size,
                                cfg.synth_seed):
                self.log(f"generated the synthetic dataset in {root}")

    def _prepare_data(self):
        cfg = self.cfg
        self.data_root = os.path.join(self.out, "data") if cfg.data is None else cfg.data
        splits = D.check_dataset(self.data_root, ("train", "val"))
        self.train_samples, self.val_samples = splits["train"], splits["val"]
        both = sorted({s.image for s in self.train_samples} & {s.image for s in self.val_samples})
        if both and self.dist.main:  # allowed (a smoke test may want it), but never silently
            self.log(f"warning: {len(both)} image(s) are in both train.txt and val.txt, e.g. "
                     f"{os.path.basename(both[0])}: the validation scores are not held out")

    def _warn_unused_dispersive_options(self) -> None:
        """--disp-tau and --disp-margin each serve some variants only: one changed from its
        default for a variant that ignores it is said, never silently dropped."""
        cfg = self.cfg
        if not cfg.dispersive or not self.dist.main:
            return
        default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        if cfg.disp_variant in ("hinge", "covariance") and cfg.disp_tau != default["disp_tau"]:
            self.log(f"warning: --disp-tau {cfg.disp_tau:g} has no effect on --disp-variant {cfg.disp_variant} "
                     f"(the temperature of the infonce variants)")
        if cfg.disp_variant != "hinge" and cfg.disp_margin != default["disp_margin"]:
            self.log(f"warning: --disp-margin {cfg.disp_margin:g} has no effect on --disp-variant "
                     f"{cfg.disp_variant} (the hinge's margin)")

    def _check_resume(self, saved: dict) -> None:
        diffs = [f"--{k.replace('_', '-')}: run has {saved.get(k)!r}, now {v!r}"
                 for k, v in self.cfg.to_dict().items()
                 if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]
        if diffs:
            raise UserError(f"{self.last_path}: cannot resume with a different configuration: "
                            + "; ".join(diffs))

    def _main_only(self, fn):
        """Run ``fn`` on rank 0 only; a UserError there is raised on every rank (so that
        no process waits forever for one that stopped)."""
        err = None
        if self.dist.main:
            try:
                fn()
            except UserError as e:
                err = str(e)
        err = self.dist.broadcast_object(err)
        if err is not None:
            raise UserError(err)

    def setup(self) -> None:
        cfg = self.cfg
        self._owns_group = False
        if cfg.ddp:
            import torch.distributed as tdist

            had = tdist.is_available() and tdist.is_initialized()
            self.dist, self.device = init_distributed(cfg.device)
            self._owns_group = not had
        else:
            self.dist, self.device = Dist(), resolve_device(cfg.device)
        if not self.dist.main:
            self.log = lambda msg: None
        if cfg.cpu_malloc == "cache" and self.device.type == "cpu":
            said = keep_freed_memory()  # None after the first call (the demo's second stage)
            if said:
                self.log(said)
        if cfg.deterministic and not cfg.fused and self.device.type == "cuda":
            raise UserError("--deterministic with --no-fused on CUDA: the plain model's bilinear upsampling "
                            "backward (F.interpolate) has no deterministic CUDA kernel, so torch would stop at "
                            "the first backward pass; the fused model (--fused, the default) has none of those ops")
        if cfg.cuda_graph:
            self._check_cuda_graph()
        if self.dist.world > 1:
            self.log(f"data parallel: {self.dist.world} processes ({self.dist.backend}), batch "
                     f"{cfg.batch_size} per process = {cfg.batch_size * self.dist.world} per step"
                     + (", synchronised BatchNorm" if cfg.sync_bn else ""))
        if cfg.amp == "fp16" and self.device.type == "cpu" and not _cpu_has_fast_fp16_conv():
            self.log("notice: --amp fp16 on this CPU: oneDNN has no float16 convolution here, so torch runs "
                     "them in its slow reference kernel (about 30x slower than --amp bf16 for a ResNet-18 "
                     "Stage II step on a 2-core AVX-512 host); --amp bf16 is the CPU setting")
        if cfg.stage == 2 and cfg.init is None and not cfg.resume:
            self.log("notice: Stage II without --init: the encoder starts from "
                     + ("--pretrained" if cfg.pretrained else "random weights"))
        check_output_dir(self.out)
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
        if init_ckpt is not None:
            self._check_init(init_ckpt)  # before --out is created: a refused run leaves nothing
        if cfg.pretrained and not os.path.isfile(cfg.pretrained):
            raise UserError(f"--pretrained={cfg.pretrained!r}: no such file")
        self.dist.barrier()  # every rank has checked --out before rank 0 writes into it
        self._main_only(self._prepare_data_main)
        self._prepare_data()  # validates every file before anything is written
        # the samplers (and their refusals) before --out is made or a model built
        r, w = self.dist.rank, self.dist.world
        self.sampler = D.EpochBatchSampler(len(self.train_samples), cfg.batch_size, cfg.seed, True, cfg.drop_last,
                                           rank=r, world=w)
        if self.sampler.num_batches() == 0:
            raise UserError(f"{self.data_root}: {len(self.train_samples)} training image(s) cannot fill one "
                            f"step of {w} process(es)")
        n_train = len(self.train_samples)
        if cfg.size == 16 and self.sampler.smallest_batch() == 1:
            # config refuses --batch-size 1 at size 16; a last batch of one image does the same
            raise UserError(f"--size 16: a training step of one image leaves one value per channel at stride 16, "
                            f"which BatchNorm cannot normalise in training, and {n_train} training image(s) in "
                            f"batches of {cfg.batch_size}" + (f" over {w} processes" if w > 1 else "")
                            + " leave such a step: use --size >= 32"
                            + (", or leave out --no-drop-last" if n_train > cfg.batch_size * w else ""))
        self.val_sampler = D.EpochBatchSampler(len(self.val_samples), cfg.batch_size, cfg.seed, False, False,
                                               rank=r, world=w, skip_empty=True)
        self._warn_unused_dispersive_options()
        self._check_plain_dispersive_fits()  # before --out is made
        if self.dist.main:
            make_output_dir(self.out)
            remove_stale_temporaries(self.out)

        set_determinism(cfg)
        seed_everything(cfg.seed)
        self.model = build_model_from_config(cfg).to(self.device, memory_format=self._memory_format)
        if cfg.sync_bn:
            self.model = convert_sync_batchnorm(self.model, self.device)
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
        self.optimizer = make_adam(
            [{"params": enc, "lr": cfg.lr_encoder, "name": "encoder"},
             {"params": rest, "lr": cfg.lr, "name": "rest"}], weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.bank = None
        if cfg.disp_bank:
            self.bank = self._make_bank()
        self.net = self.model
        if cfg.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # With synchronised BatchNorm the running statistics agree on every rank, so
            # the per-forward buffer broadcast is skipped.
            import inspect

            sync_kw = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                       else "broadcast_buffers")  # renamed in torch 2.12
            self.net = DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           **{sync_kw: not cfg.sync_bn})
        if cfg.compile != "none":
            # after DDP, as torch recommends (DDP's bucketing splits the graph); the module,
            # its state_dict and the checkpoints stay the uncompiled ones
            self.net = torch.compile(self.net, mode=cfg.compile)
        self._disp_rows: list[torch.Tensor] = []
        if cfg.dispersive and (cfg.ddp or self.bank is not None):
            self.model.set_dispersive_fn(self._dispersive)
        self.aug = D.AugConfig.from_config(cfg)
        self.photo = D.PhotometricConfig.from_config(cfg)
        # Stage I's strong copy: drawn by the loader's workers, ahead of the step, when there
        # are workers; otherwise by the step itself (_strong_future). The same draws either way.
        strong = self.photo if cfg.stage == 1 and self._workers() > 0 else None
        self.train_ds = D.SegDataset(self.train_samples, cfg.size, self.aug, cfg.seed, strong=strong)
        self.val_ds = D.SegDataset(self.val_samples, cfg.size, None, cfg.seed)

        # position and bookkeeping
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.best_metric, self.best_epoch, self.bad_epochs = -math.inf, -1, 0
        self.running = self._fresh_running()
        self.history: list[dict] = []
        if ckpt is not None:
            self._restore(ckpt)
            self.log(f"resumed {self.last_path}: epoch {self.epoch + 1}, batch {self.batch}, "
                     f"step {self.global_step}")
        # config.json holds the settings the run goes on with: a resume that extends --epochs
        # (or changes another resumable field) rewrites it, so that the next plain --resume,
        # which reads it, does not fall back to the first run's settings
        if self.dist.main:  # resume=False: the file stays usable as a --config template
            atomic_write_text(os.path.join(self.out, "config.json"),
                              json_text(dataclasses.replace(cfg, resume=False).to_dict()))
            env = environment()
            env["world_size"] = self.dist.world
            atomic_write_text(os.path.join(self.out, "env.json"), json_text(env))

    def _disp_feature_shape(self) -> torch.Size:
        """(1, C, H, W) of the dispersive feature for one --size input: the encoder run on
        the meta device (shapes only: nothing computed or allocated)."""
        from .base import FEATURES
        from .encoder import ResNetEncoder

        cfg = self.cfg
        with torch.device("meta"):
            feats = ResNetEncoder(cfg.encoder)(torch.zeros(1, 3, cfg.size, cfg.size))
        return feats[FEATURES.index(cfg.disp_feature)].shape

    def _check_plain_dispersive_fits(self) -> None:
        """--no-fused at pixel granularity computes the dispersive loss in plain PyTorch, with
        N x N matrices (N = batch x H x W of the feature, over every process): refused here
        when they cannot fit the device, before --out is made. The model raised the same
        MemoryError at the first step, as a traceback, after config.json was written."""
        cfg = self.cfg
        if cfg.fused or not cfg.dispersive or cfg.disp_granularity != "pixel":
            return
        from disseg_kernels.ops.dispersive import check_reference_fits

        f = self._disp_feature_shape()
        n = cfg.batch_size * self.dist.world * f[2] * f[3]
        try:
            check_reference_fits(torch.zeros((), device=self.device).expand(n, f[1]), cfg.disp_variant)
        except MemoryError as e:
            raise UserError(f"--no-fused with --disp-granularity pixel at {cfg.disp_feature}, --size {cfg.size} and "
                            f"--batch-size {cfg.batch_size}: {e}; leave out --no-fused") from None

    # Tests run --cuda-graph's bookkeeping on the CPU (models.step_graph, emulate=True).
    _emulate_graph = False

    def _check_cuda_graph(self) -> None:
        cfg = self.cfg
        why = None
        if self.device.type != "cuda" and not self._emulate_graph:
            why = f"needs a CUDA device (the device is {self.device})"
        elif cfg.ddp:
            why = "not with --ddp (DDP all-reduces the gradients inside the backward, outside any graph)"
        elif cfg.compile != "none":
            why = f"not with --compile={cfg.compile} (torch.compile's reduce-overhead mode captures graphs itself)"
        elif cfg.disp_bank:
            why = "not with --disp-bank (the bank's filled rows change the loss's shapes from step to step)"
        if why:
            raise UserError(f"--cuda-graph: {why}")

    def _make_bank(self):
        """The memory bank, its D from the dispersive feature's shape."""
        from disseg_kernels import NegativeBank

        cfg = self.cfg
        f = self._disp_feature_shape()
        dim = f[1] * (f[2] * f[3] if cfg.disp_granularity == "sample" else 1)
        dtype = torch.bfloat16 if cfg.disp_bank_dtype == "bfloat16" else torch.float32
        gib = cfg.disp_bank * dim * (2 if dtype == torch.bfloat16 else 4) / 2**30
        self.log(f"memory bank: {cfg.disp_bank} rows x {dim} features ({cfg.disp_bank_dtype}), {gib:.3g} GiB")
        try:
            return NegativeBank(dim, cfg.disp_bank, dtype=dtype, device=self.device)
        except (RuntimeError, MemoryError) as e:
            raise UserError(f"--disp-bank={cfg.disp_bank}: cannot allocate {gib:.3g} GiB for the bank ({e})") from None

    def _dispersive(self, z: torch.Tensor) -> torch.Tensor:
        """The training-mode dispersive loss of z (N, D): global over the processes under
        DDP, with the bank's rows as extra negatives when there is a bank."""
        from disseg_kernels import dispersive_loss_with_bank, distributed_dispersive_loss

        cfg = self.cfg
        self._disp_rows.append(z.detach())
        backend = self.model.dispersive_backend  # "reference" for --no-fused
        options = self.model.dispersive.loss_options()
        if cfg.ddp:
            return distributed_dispersive_loss(z, **options, ring=cfg.disp_ring, bank=self.bank, ddp_scale=True,
                                               backend=backend)
        return dispersive_loss_with_bank(z, self.bank, **options, backend=backend)

    def _check_init(self, ckpt: dict) -> None:
        src_cfg = ckpt.get("config") or {}
        if src_cfg.get("stage", 1) != 1:
            raise UserError(f"--init={self.cfg.init!r}: a Stage {src_cfg.get('stage')} checkpoint; "
                            "Stage II starts from a Stage I checkpoint")
        if src_cfg.get("encoder", self.cfg.encoder) != self.cfg.encoder:
            raise UserError(f"--init={self.cfg.init!r}: its encoder is {src_cfg.get('encoder')!r}, "
                            f"this run's --encoder is {self.cfg.encoder!r}")

    def _init_from_stage1(self, ckpt: dict) -> None:
        from . import transfer_stage1_to_stage2

        try:
            rep = transfer_stage1_to_stage2(ckpt["model"], self.model)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise UserError(f"--init={self.cfg.init!r}: cannot copy it into Stage II ({e})") from None
        report = {"init": os.path.abspath(self.cfg.init), "copied": list(rep.copied), "left": list(rep.left)}
        make_output_dir(self.out)
        atomic_write_text(os.path.join(self.out, "transfer.json"), json_text(report))
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
                "world": self.dist.world, "bank": None if self.bank is None else self.bank.state_dict(),
                "versions": {"torch": str(torch.__version__)}}

    def _restore(self, ck: dict) -> None:
        world = ck.get("world", 1)
        if world != self.dist.world:
            raise UserError(f"{self.last_path}: the run was trained by {world} process(es); resume it with "
                            f"the same number (now {self.dist.world}), since the steps and batches depend on it")
        if self.bank is not None:
            if ck.get("bank") is None:
                raise UserError(f"{self.last_path}: holds no memory bank, but --disp-bank={self.cfg.disp_bank}")
            self.bank.load_state_dict(ck["bank"])
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        self.epoch, self.batch, self.global_step = ck["epoch"], ck["batch"], ck["global_step"]
        self.best_metric, self.best_epoch, self.bad_epochs = ck["best_metric"], ck["best_epoch"], ck["bad_epochs"]
        self.running, self.history = ck["running"], ck["history"]
        if not self.dist.main:  # rank 0 saved every rank's running sums, merged
            self.running = self._fresh_running()
        set_rng_state(ck["rng"])

    def _merge_running(self) -> dict:
        """Every rank's running sums of the epoch so far, merged (on every rank)."""
        parts = self.dist.gather_objects(self.running)
        if len(parts) == 1:
            return self.running
        out = self._fresh_running()
        for p in parts:
            out["loss"] += p["loss"]
            out["n"] += p["n"]
            out["dice"].extend(p["dice"])
            for k, v in p["parts"].items():
                out["parts"][k] = out["parts"].get(k, 0.0) + v
        return out

    def save_last(self) -> None:
        """Write last.pt (rank 0). Mid-epoch under DDP the ranks' running sums are merged
        into rank 0's first (the others restart theirs), so the checkpoint holds them all."""
        if self.dist.world > 1:
            merged = self._merge_running()
            self.running = merged if self.dist.main else self._fresh_running()
        if self.dist.main:
            save_checkpoint(self.state(), self.last_path)

    # ---------------------------------------------------------------- steps
    @property
    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.channels_last else torch.contiguous_format

    def _strong_future(self, x: torch.Tensor, idx: torch.Tensor) -> Future:
        """Stage I: the strong copy of the batch x, drawn on the host. Its input is read back
        before the first forward is issued (on a GPU that waits only for x's own upload, not
        for the forward). One generator per sample, seeded by (seed, epoch, sample): the same
        draws whatever the batch composition or the process that holds the sample."""
        gens = [D.strong_generator(self.cfg.seed, self.epoch, int(i)) for i in idx.tolist()]
        return self._strong_copy(x.detach().cpu(), gens)

    def _strong_source(self, x: torch.Tensor, idx: torch.Tensor, xs: Optional[torch.Tensor]):
        """Stage I's strong copy of x: the one the loader drew (xs), else drawn now."""
        return xs if xs is not None else self._strong_future(x, idx)

    def _strong_input(self, strong, like: torch.Tensor) -> torch.Tensor:
        """The strong copy (a Future of a host batch, or a batch the loader drew) on the
        device, without a synchronisation (pinned, non-blocking)."""
        xs = strong if isinstance(strong, torch.Tensor) else strong.result()
        return _to_device(xs, like.device).contiguous(memory_format=self._memory_format)

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, xs: Optional[torch.Tensor] = None):
        cfg = self.cfg
        x = x.contiguous(memory_format=self._memory_format)
        if cfg.compile == "reduce-overhead" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are free
        return self._net_loss(x, y, self._strong_source(x, idx, xs) if cfg.stage == 1 else None)

    def _net_loss(self, x: torch.Tensor, y: torch.Tensor, strong, cache: bool = True):
        """The network on x (Stage I: also on its strong copy: a Future of it, or a host or
        device tensor) and the stage's loss: (output, loss, parts)."""
        cfg = self.cfg
        with autocast_context(self.device, cfg.amp, cache):
            out = self.net(D.normalize(x, cfg.normalize))
            if cfg.stage == 1:
                xs = self._strong_input(strong, x)  # a device tensor passes through unchanged
                out_aug = self.net(D.normalize(xs, cfg.normalize))
        if cfg.stage == 1:
            loss, parts = stage1_loss(out, out_aug, y, cfg.disp_weight, total=self.dist.sum)
        else:
            loss, parts = stage2_loss(out, y, cfg.disp_weight, total=self.dist.sum)
        return out, loss, parts

    def _graph_body(self, x: torch.Tensor, y: torch.Tensor, *strong: torch.Tensor) -> tuple:
        """What --cuda-graph captures: forward, loss, backward. Returns (loss, mask logits,
        *loss parts), the tensors the eager rest of the step reads."""
        out, loss, parts = self._net_loss(x, y, strong[0] if strong else None, cache=False)
        self.scaler.scale(loss).backward()
        self._graph_parts = list(parts)
        return (loss, out.mask, *parts.values())

    def _graph_step(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, xs: Optional[torch.Tensor] = None):
        """--cuda-graph: (mask logits, loss, parts) of the step on (x, y) by a replay of
        the captured forward+backward (captured at the first call), or None when the batch
        differs in shape from the captured one (the caller then steps eagerly)."""
        from .step_graph import CaptureError, StepGraph

        cfg = self.cfg
        x = x.contiguous(memory_format=self._memory_format)
        signature = (x, y, x) if cfg.stage == 1 else (x, y)  # the strong copy is shaped as x
        if self._graph is not None and not self._graph.matches(*signature):
            if not self._graph_mismatch_said:
                self.log(f"--cuda-graph: a batch of shape {tuple(x.shape)} (captured: "
                         f"{tuple(self._graph.static_inputs[0].shape)}) runs eagerly")
                self._graph_mismatch_said = True
            return None
        inputs = (x, y, self._strong_input(self._strong_source(x, idx, xs), x)) if cfg.stage == 1 else (x, y)
        if self._graph is None:
            graph = StepGraph(self._graph_body, [p for p in self.model.parameters() if p.requires_grad],
                              [self.model], emulate=self._emulate_graph)
            try:
                graph.capture(*inputs)
            except CaptureError as exc:
                raise UserError(f"--cuda-graph: {exc}") from exc
            self._graph = graph
            self.log(f"--cuda-graph: captured the training step's forward and backward for batches of shape "
                     f"{tuple(x.shape)}")
        loss, mask, *parts = self._graph.replay(*inputs)
        return mask, loss, dict(zip(self._graph_parts, parts))

    def _strong_copy(self, x_host: torch.Tensor, gens: list) -> Future:
        """Stage I's strong copy of a host batch, as a future. On a GPU it is computed in a
        helper thread while this thread issues the first forward (torch's CPU ops release
        the GIL, so the two proceed together); on the CPU the forward needs the cores, so
        here, at once. Either way outside autocast (its state is per thread): the
        augmentation is float32 image processing, not part of the model."""
        if self._aug_thread is None:
            self._aug_thread = self.device.type == "cuda"
        if self._aug_thread:
            if self._aug_pool is None:
                self._aug_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disseg-strong-copy")
            return self._aug_pool.submit(D.strong_photometric, x_host, self.photo, gens)
        done: Future = Future()
        done.set_result(D.strong_photometric(x_host, self.photo, gens))
        return done

    def train_step(self, x: torch.Tensor, y: torch.Tensor, idx: Optional[torch.Tensor] = None,
                   xs: Optional[torch.Tensor] = None) -> tuple[float, list[float]]:
        """One optimizer step on the batch (x, y) of dataset indices ``idx`` (this process's
        slice of the global batch under DDP). Stage I: ``xs`` is the batch's strong copy when
        the loader drew it; otherwise the step draws it. Returns the loss (of the global
        batch) and the per-sample Dice of this slice."""
        cfg = self.cfg
        self.model.train()
        if idx is None:
            idx = torch.arange(x.shape[0])
        self._disp_rows.clear()
        graphed = self._graph_step(x, y, idx, xs) if cfg.cuda_graph else None
        if graphed is not None:
            mask, loss, parts = graphed
        else:
            out, loss, parts = self._forward_loss(x, y, idx, xs)
            mask = out.mask
            # with a captured step, the gradients are the graph's tensors: zeroed in place
            self.optimizer.zero_grad(set_to_none=self._graph is None)
            self.scaler.scale(loss).backward()
        # The finiteness check reads the loss on the host: a CUDA stream synchronisation. It
        # comes after the backward has been issued (the host queues the backward behind the
        # forward instead of waiting for the forward to finish) and before anything changes
        # the weights, so a non-finite loss still leaves the model as it was.
        values = torch.stack([loss.detach().float(), *(v.float() for v in parts.values())]).cpu()
        if not math.isfinite(values[0]):
            named = dict(zip(parts, values[1:].tolist()))
            raise FloatingPointError(f"non-finite training loss {float(values[0])} at epoch {self.epoch + 1}, "
                                     f"batch {self.batch}: parts {named}")
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.bank is not None and self._disp_rows:
            # the main view's rows (Stage I's strong copy is not enqueued); every rank's
            if cfg.ddp:
                self.bank.enqueue_global(self._disp_rows[0])
            else:
                self.bank.enqueue(self._disp_rows[0])
        self._disp_rows.clear()
        rows = batch_metrics(mask, y, cfg.threshold, cfg.empty_policy, with_hd95=False)
        dice = [r["dice"] for r in rows]
        n = x.shape[0]
        loss_value, *part_values = values.tolist()  # read back once, above: no further syncs
        self.running["loss"] += loss_value * n
        self.running["n"] += n
        self.running["dice"].extend(dice)
        for k, v in zip(parts, part_values):
            self.running["parts"][k] = self.running["parts"].get(k, 0.0) + v * n
        return loss_value, dice

    @torch.no_grad()
    def validate(self, with_hd95: bool = False) -> dict:
        """Metrics of the validation split (split over the processes under DDP, gathered:
        every rank returns the same summary)."""
        cfg = self.cfg
        if self.dist.world > 1 and not cfg.sync_bn:
            # each rank updated its own running statistics in the last step: evaluate (and
            # checkpoint) rank 0's everywhere
            import torch.distributed as tdist

            for b in self.model.buffers():
                tdist.broadcast(b, 0)
        self.model.eval()
        loader = self._loader(self.val_ds, self.val_sampler)
        total, n, rows = 0.0, 0, []
        for x, y, idx in loader:
            x, y = x.to(self.device).contiguous(memory_format=self._memory_format), y.to(self.device)
            with autocast_context(self.device, cfg.amp):
                out = self.model(D.normalize(x, cfg.normalize))
            total += float(dice_bce(out.mask, y)) * x.shape[0]
            n += x.shape[0]
            rows.extend((int(i), r) for i, r in zip(idx, batch_metrics(out.mask, y, cfg.threshold,
                                                                       cfg.empty_policy, with_hd95)))
        if self.dist.world > 1:
            parts = self.dist.gather_objects((total, n, rows))
            total, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
            rows = sorted((r for p in parts for r in p[2]), key=lambda t: t[0])
        s = summarize([r for _, r in rows])
        s["loss"] = total / max(n, 1)
        return s

    def _workers(self) -> int:
        """--workers, with -1 resolved: none on the CPU (the step's convolutions need every
        core), on CUDA one per spare core of this process's share, at most 8."""
        if self.cfg.workers >= 0:
            return self.cfg.workers
        if self.device.type != "cuda":
            return 0
        return max(0, min(8, (os.cpu_count() or 1) // max(self.dist.world, 1) - 1))

    def _loader(self, ds, sampler):
        # A private generator: DataLoader would otherwise draw its worker base seed from the
        # global RNG, and a resumed run would draw one more time than the original.
        g = torch.Generator().manual_seed(D.mix_seed(self.cfg.seed, sampler.epoch, 0xD1))
        # pinned batches on CUDA: the loop's non_blocking uploads are then truly asynchronous
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=self._workers(),
                                           collate_fn=D.collate, generator=g,
                                           persistent_workers=False, pin_memory=self.device.type == "cuda")

    # ---------------------------------------------------------------- the loop
    def _write_logs(self) -> None:
        rows = self.history
        if not rows:
            return
        keys = list(rows[0].keys())
        for r in rows[1:]:
            keys += [k for k in r if k not in keys]
        atomic_write_text(os.path.join(self.out, "metrics.csv"), csv_text(rows, keys))
        atomic_write_text(os.path.join(self.out, "metrics.json"), json_text(rows))
        if not getattr(self, "_plot_off", False):
            if not plot_curves(rows, os.path.join(self.out, "curves.png")):
                self._plot_off = True

    def _patience_spent(self) -> bool:
        """Early stopping's rule: --early-stop-patience epochs (0: never) without a better
        validation mIoU."""
        return self.bad_epochs >= self.cfg.early_stop_patience > 0

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
        # an early-stopped run resumed with the same patience has nothing left to train either:
        # the loop would otherwise run one more epoch before it looked at the counter again
        stopped = self._patience_spent()
        if self.epoch < cfg.epochs and stopped:
            self.log(f"nothing to train: the run stopped early after epoch {self.epoch} (no better validation "
                     f"mIoU for {self.bad_epochs} epochs, --early-stop-patience {cfg.early_stop_patience}); "
                     f"--resume --early-stop-patience N (N > {self.bad_epochs}, or 0: off) trains it further")
        elif self.epoch >= cfg.epochs:
            self.log(f"nothing to train: the run has done its {cfg.epochs} epoch(s); "
                     f"--resume --epochs N (N > {self.epoch}) trains it further")
        if self.epoch >= cfg.epochs or stopped:
            if self.dist.main:  # a kill between last.pt and the logs left them an epoch short
                self._write_logs()
            previous = os.path.join(self.out, "summary.json")
            if os.path.isfile(previous):  # the finished run's summary stands, if it is this state's
                with open(previous, encoding="utf-8") as fh:
                    summary = json.load(fh)
                if (summary.get("epochs_run"), summary.get("steps")) == (self.epoch, self.global_step):
                    return summary
            stopped_early = stopped
        while self.epoch < cfg.epochs and not stopped_early:
            epoch_t0, epoch_c0 = time.time(), time.process_time()
            self.sampler.set_epoch(self.epoch, self.batch)
            loader = self._loader(self.train_ds, self.sampler)
            nb = self.sampler.num_batches()
            bar = None
            if cfg.progress and tqdm is not None and self.dist.main:
                bar = tqdm(total=nb, initial=self.batch, desc=f"stage {cfg.stage} epoch {self.epoch + 1}/{cfg.epochs}",
                           leave=False, dynamic_ncols=True, file=sys.stderr)
            # throughput from the epoch's second step on: the first also compiles, autotunes
            # and (--cuda-graph) captures; each step reads its loss back, so the wall time is
            # the device's too
            steps, images, t_second = 0, 0, None
            for x, y, idx, *xs in loader:  # xs: Stage I's strong copy, when the workers draw it
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                loss, dice = self.train_step(x, y, idx, xs[0] if xs else None)
                steps += 1
                if steps == 1:
                    t_second = time.perf_counter()
                else:
                    images += x.shape[0] * self.dist.world
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
            loop_s = time.perf_counter() - t_second if t_second is not None else 0.0
            if bar is not None:
                bar.close()
            val = self.validate()
            self.scheduler.step(val["loss"])
            run = self._merge_running()
            row = {"epoch": self.epoch + 1, "step": self.global_step,
                   "train_loss": run["loss"] / max(run["n"], 1), "train_dice": nanmean(run["dice"]),
                   **{f"train_{k}": v / max(run["n"], 1) for k, v in run["parts"].items()},
                   "val_loss": val["loss"], "val_mIoU": val["mIoU"], "val_mDSC": val["mDSC"],
                   "val_recall": val["Rec."], "val_precision": val["Prec."], "val_f2": val["mean_f2"],
                   "val_accuracy": val["mean_accuracy"],
                   "lr_encoder": self.optimizer.param_groups[0]["lr"], "lr": self.optimizer.param_groups[1]["lr"],
                   "train_images_per_s": round(images / loop_s, 2) if images and loop_s > 0 else math.nan,
                   "epoch_seconds": round(time.time() - epoch_t0, 3),
                   "epoch_cpu_seconds": round(time.process_time() - epoch_c0, 3)}
            self.history.append(row)
            if (cfg.dispersive and cfg.disp_variant == "hinge" and cfg.disp_weight > 0
                    and row.get("train_disp") == 0.0 and not self._hinge_zero_said):
                self._hinge_zero_said = True
                self.log(f"warning: epoch {row['epoch']}: the hinge dispersive loss was exactly 0 on every batch: "
                         f"every pair of {cfg.disp_feature} rows lies further apart than --disp-margin="
                         f"{cfg.disp_margin:g}, so the term pushes nothing apart; raise --disp-margin or pass "
                         f"--disp-scale-by-dim")
            metric = val["mIoU"] if not math.isnan(val["mIoU"]) else -math.inf
            # the first epoch is the best until one scores higher, so best.pt always exists
            improved = metric > self.best_metric or self.best_epoch < 0
            if math.isnan(val["mIoU"]):
                self.log(f"warning: epoch {self.epoch + 1}: validation mIoU is NaN (no validation image could be "
                         f"scored: every mask empty under --empty-policy={cfg.empty_policy}?); best.pt stays "
                         + ("this epoch" if improved else f"epoch {self.best_epoch}") + " until an epoch scores")
            if improved:
                self.best_metric, self.best_epoch, self.bad_epochs = metric, self.epoch + 1, 0
            else:
                self.bad_epochs += 1
            self.epoch += 1
            self.batch = 0
            self.running = self._fresh_running()
            if improved and self.dist.main:
                save_checkpoint(self.state(), self.best_path)
            self.save_last()
            if self.dist.main:
                self._write_logs()
            self.log(f"stage {cfg.stage} epoch {row['epoch']}/{cfg.epochs}: train loss {row['train_loss']:.4f} "
                     f"dice {row['train_dice']:.3f} | val loss {row['val_loss']:.4f} mIoU {row['val_mIoU']:.4f} "
                     f"mDSC {row['val_mDSC']:.4f}{' *' if improved else ''} ({row['epoch_seconds']:.1f}s, "
                     f"cpu {row['epoch_cpu_seconds']:.1f}s, {_rate_text(row['train_images_per_s'])})")
            if self._patience_spent():
                self.log(f"early stop: no better validation mIoU for {self.bad_epochs} epochs")
                stopped_early = True
                break
        summary = {"stage": cfg.stage, "epochs_run": self.epoch, "steps": self.global_step,
                   "best_epoch": self.best_epoch, "best_val_mIoU": self.best_metric,
                   "best_val_mDSC": next((r["val_mDSC"] for r in self.history if r["epoch"] == self.best_epoch), math.nan),
                   "stopped_early": stopped_early, "seconds": round(time.time() - t_start, 1),
                   "best": self.best_path, "last": self.last_path}
        if self.dist.main:
            atomic_write_text(os.path.join(self.out, "summary.json"), json_text(summary))
        return summary

    def close(self) -> None:
        """Leave the process group this trainer joined (no-op otherwise)."""
        if getattr(self, "_owns_group", False):
            # drop the DDP reducer (it holds the process group) before leaving the group
            self.net = None
            if hasattr(self, "model"):
                self.model.set_dispersive_fn(None)
            shutdown(self.dist)
            self._owns_group = False


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    t = Trainer(cfg, log)
    try:
        return t.run()
    finally:
        t.close()
