"""Trainer, losses, checkpoints, resume, evaluation and inference at tiny sizes.
Protects: the spec's loss formulas (DiceBCE over the batch, λ as configured, β and the
complementary term); both stages train and leave their files; a run SIGKILLed mid-epoch and
resumed ends with bitwise the same weights as an uninterrupted one (deterministic mode);
a checkpoint write interrupted midway leaves the previous file intact."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import SegOutput
from models.config import TrainConfig
from models.evaluate import evaluate
from models.losses import consistency, dice_bce, stage1_loss, stage2_loss
from models.predict import predict
from models.trainer import Trainer, json_text, load_checkpoint, make_adam, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _cfg(data, out, **kw):
    base = dict(data=data, out=str(out), encoder="resnet18", size=32, batch_size=4, epochs=1,
                threads=1, progress=False, seed=0, lr=1e-3, lr_encoder=1e-3, dropout_size=4)
    base.update(kw)
    return TrainConfig(**base).validate()


# ------------------------------------------------------------------------------ losses

def test_dice_bce_over_whole_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 5, 6, generator=g)
    y = (torch.rand(3, 1, 5, 6, generator=g) > 0.5).float()
    p = 1 / (1 + torch.exp(-x.double()))
    bce = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    dice = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    assert float(dice_bce(x, y)) == pytest.approx(float(bce + dice), rel=1e-5)


def test_stage1_loss_formula_and_lambda():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    y = (torch.rand(2, 1, 4, 4, generator=g) > 0.5).float()
    d1, d2 = torch.tensor(-3.0), torch.tensor(-5.0)
    out, out2 = SegOutput(mask=a, disp_loss=d1), SegOutput(mask=b, disp_loss=d2)
    cons = (F.binary_cross_entropy(torch.sigmoid(a), (torch.sigmoid(b) > 0.5).float())
            + F.binary_cross_entropy(torch.sigmoid(b), (torch.sigmoid(a) > 0.5).float()))
    assert float(consistency(a, b)) == pytest.approx(float(cons), rel=1e-5)
    for lam in (0.0, 0.2, 0.6):
        total, _ = stage1_loss(out, out2, y, lam)
        want = dice_bce(a, y) + dice_bce(b, y) + cons + lam * (d1 + d2)
        assert float(total) == pytest.approx(float(want), rel=1e-5)


def test_stage2_loss_formula():
    g = torch.Generator().manual_seed(2)
    m, fg, bg, uc = (torch.randn(2, 1, 6, 5, generator=g) for _ in range(4))
    y = (torch.rand(2, 1, 6, 5, generator=g) > 0.5).float()
    out = SegOutput(mask=m, fg=fg, bg=bg, uncertainty=uc, disp_loss=torch.tensor(-2.0))
    pf, pb, pu = torch.sigmoid(fg), torch.sigmoid(bg), torch.sigmoid(uc)
    b1 = 1 / math.tanh(float(pf.sum()) / 30)
    b2 = 1 / math.tanh(float(pb.sum()) / 30)
    e = torch.exp(torch.stack([pf, pb, pu]))
    qf, qb, qu = e / e.sum(0)
    comp = ((qf * qb).sum() + (qf * qu).sum() + (qb * qu).sum()) / (2 * 6 * 5)
    want = dice_bce(m, y) + b1 * dice_bce(fg, y) + b2 * dice_bce(bg, 1 - y) + comp + 0.2 * (-2.0)
    total, parts = stage2_loss(out, y, 0.2)
    assert float(total) == pytest.approx(float(want), rel=1e-5)
    assert float(parts["beta_fg"]) == pytest.approx(b1, rel=1e-5)


# ------------------------------------------------------------------------------ training

def test_two_stages_evaluate_predict(tiny_data, tmp_path):
    s1 = Trainer(_cfg(tiny_data, tmp_path / "s1", stage=1), log=lambda s: None).run()
    for fn in ("config.json", "env.json", "metrics.csv", "metrics.json", "curves.png", "best.pt", "last.pt",
               "summary.json"):
        assert (tmp_path / "s1" / fn).is_file(), fn
    env = json.loads((tmp_path / "s1" / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["git"]
    rows = json.loads((tmp_path / "s1" / "metrics.json").read_text())
    assert len(rows) == 1 and {"train_loss", "val_loss", "val_mIoU", "val_mDSC"} <= set(rows[0])
    assert s1["steps"] == 3
    cfg2 = _cfg(tiny_data, tmp_path / "s2", stage=2, init=str(tmp_path / "s1" / "best.pt"))
    Trainer(cfg2, log=lambda s: None).run()
    transfer = json.loads((tmp_path / "s2" / "transfer.json").read_text())
    assert any(k.startswith("encoder.") for k in transfer["copied"]) and transfer["left"]
    s1_enc = load_checkpoint(str(tmp_path / "s1" / "best.pt"))["model"]
    ck2 = load_checkpoint(str(tmp_path / "s2" / "best.pt"))
    assert ck2["config"]["stage"] == 2 and ck2["model"].keys() != s1_enc.keys()

    ev = evaluate(str(tmp_path / "s2" / "best.pt"), tiny_data, "val", str(tmp_path / "ev"), log=lambda s: None)
    assert ev["n_images"] == 4 and (tmp_path / "ev" / "per_case.csv").is_file()
    assert 0.0 <= ev["mean_accuracy"] <= 1.0
    native = evaluate(str(tmp_path / "s2" / "best.pt"), tiny_data, "val", None, native=True, log=lambda s: None)
    assert native["resolution"] == "native"
    names = predict(str(tmp_path / "s1" / "best.pt"), os.path.join(tiny_data, "images"), str(tmp_path / "pred"),
                    names=["synth_00012"], mask_dir=os.path.join(tiny_data, "masks"), log=lambda s: None)
    assert names == ["synth_00012"]
    from PIL import Image

    assert Image.open(tmp_path / "pred" / "masks" / "synth_00012.png").size == (48, 48)  # native size
    assert (tmp_path / "pred" / "overlays" / "synth_00012.png").is_file()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_step_matches_float32(tiny_data, tmp_path, fused, amp):
    """--amp bf16/fp16 (CPU autocast): the first step's loss is the float32 one within the
    dtype's rounding (1e-2 relative), the parameters are finite, and with fp16 the
    GradScaler is on: it skips the steps whose scaled gradients overflow, halving its
    scale, and then steps (within 8 steps here)."""
    ref = Trainer(_cfg(tiny_data, tmp_path / "f32", fused=fused), log=lambda s: None)
    ref.setup()
    x, y, idx = next(iter(ref._loader(ref.train_ds, ref.sampler)))
    want, _ = ref.train_step(x, y, idx)
    t = Trainer(_cfg(tiny_data, tmp_path / "amp", amp=amp, fused=fused), log=lambda s: None)
    t.setup()
    assert t.scaler.is_enabled() == (amp == "fp16")
    loss, _ = t.train_step(x, y, idx)
    assert loss == pytest.approx(want, rel=1e-2)
    for step in range(8):
        before = [p.detach().clone() for p in t.model.parameters()]
        t.train_step(x, y, idx)
        if any(not torch.equal(a, p) for a, p in zip(before, t.model.parameters())):
            break
    else:
        pytest.fail(f"--amp {amp}: no optimizer step in 9 steps (scale {t.scaler.get_scale()})")
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_defaults_are_the_specs():
    """spec/trainer.md's training recipe and model.md's dispersive defaults, as the
    defaults a plain `disseg train` runs with (every test builds its own config, so
    nothing else would notice one drifting)."""
    c = TrainConfig()
    assert (c.lr, c.lr_encoder, c.batch_size, c.size) == (1e-4, 1e-4, 8, 256)
    assert (c.plateau_patience, c.early_stop_patience) == (30, 100)
    assert (c.rotate_deg, c.rotate_p, c.hflip_p, c.vflip_p) == (35.0, 0.3, 0.3, 0.3)
    assert (c.dropout_p, c.dropout_holes, c.dropout_size) == (0.3, 10, 32)
    assert (c.jitter_brightness, c.jitter_contrast, c.jitter_saturation, c.jitter_hue, c.gray_p) == (
        0.3, 0.3, 0.3, 0.1, 0.5)
    assert (c.blur_kx, c.blur_ky, c.blur_sigma_min, c.blur_sigma_max) == (1, 7, 0.1, 3.0)
    assert (c.disp_weight, c.disp_tau, c.disp_variant, c.disp_feature, c.disp_granularity) == (
        0.2, 0.5, "infonce_l2", "f4", "sample")
    assert c.threshold == 0.5 and c.encoder == "resnet50"


def test_adam_groups_and_plateau_on_validation_loss(tiny_data, tmp_path, monkeypatch):
    """Adam with the encoder and the rest as separate groups (their own lr), and
    ReduceLROnPlateau stepped with each epoch's validation loss: with patience 0 and the
    validation loss held at 1.0, the second epoch cuts both rates tenfold."""
    t = Trainer(_cfg(tiny_data, tmp_path / "pl", epochs=2, plateau_patience=0, lr=2e-6, lr_encoder=1e-6),
                log=lambda s: None)
    t.setup()
    enc = {id(p) for p in t.model.encoder.parameters()}
    groups = t.optimizer.param_groups
    assert len(groups) == 2 and {id(p) for p in groups[0]["params"]} == enc
    assert not enc & {id(p) for p in groups[1]["params"]}
    seen = []
    step = type(t.scheduler).step

    def recording_step(self, metric, *args, **kwargs):
        seen.append(float(metric))
        return step(self, metric, *args, **kwargs)

    monkeypatch.setattr(type(t.scheduler), "step", recording_step)
    validate = t.validate
    monkeypatch.setattr(t, "validate", lambda *a, **k: dict(validate(*a, **k), loss=1.0))
    t.run()
    assert seen == [r["val_loss"] for r in t.history] == [1.0, 1.0]
    assert [r["lr_encoder"] for r in t.history] == pytest.approx([1e-6, 1e-7])
    assert [r["lr"] for r in t.history] == pytest.approx([2e-6, 2e-7])


def test_grad_clip_and_early_stop(tiny_data, tmp_path, capsys):
    """Early stop ends the run; resuming it with the same patience trains nothing and says
    so (it used to train one more epoch before looking at the counter again), and a larger
    patience trains on."""
    from models.cli import main

    out = tmp_path / "es"
    s = Trainer(_cfg(tiny_data, out, epochs=5, early_stop_patience=1, grad_clip=0.5,
                     lr=1e-9, lr_encoder=1e-9), log=lambda s: None).run()
    assert s["stopped_early"] and s["epochs_run"] < 5
    capsys.readouterr()
    # a kill after last.pt and before the logs: the resume that has nothing to train
    # rewrites them from the checkpoint's history
    logged = (out / "metrics.csv").read_text()
    (out / "metrics.csv").unlink()
    (out / "metrics.json").unlink()
    assert main(["train", "--out", str(out), "--resume", "--threads", "1"]) == 0
    assert "nothing to train: the run stopped early" in capsys.readouterr().out
    assert (out / "metrics.csv").read_text() == logged
    assert len(json.loads((out / "metrics.json").read_text())) == s["epochs_run"]
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == s["epochs_run"]
    assert json.loads((out / "summary.json").read_text()) == s
    assert main(["train", "--out", str(out), "--resume", "--threads", "1", "--early-stop-patience", "3"]) == 0
    assert load_checkpoint(str(out / "last.pt"))["epoch"] > s["epochs_run"]


def test_size_16_refuses_a_training_step_of_one_image(tiny_data, tmp_path):
    """At --size 16 a step of one image leaves one value per channel at stride 16, and
    BatchNorm raised mid-run. Config refuses --batch-size 1; a last batch of one (12 images
    in batches of 11 with --no-drop-last) is now refused at set-up, before any training."""
    from models.config import UserError

    with pytest.raises(UserError, match="--size 16: a training step of one image.*--no-drop-last"):
        Trainer(_cfg(tiny_data, tmp_path / "a", size=16, batch_size=11, drop_last=False),
                log=lambda s: None).setup()
    assert not any((tmp_path / "a").glob("*.pt"))
    # what it guards against: the step itself fails on a batch of one, mid-run
    t = Trainer(_cfg(tiny_data, tmp_path / "b", size=16, batch_size=11), log=lambda s: None)
    t.setup()  # drop_last leaves one batch of 11
    x, y = torch.rand(1, 3, 16, 16), torch.ones(1, 1, 16, 16)
    with pytest.raises(ValueError, match="leaves one value per channel at stride 16"):
        t.train_step(x, y, torch.tensor([0]), None)


def test_metric_files_write_a_missing_value_one_way():
    """metrics.csv wrote NaN as "nan" where per_case.csv wrote an empty field (and JSON
    null): a spreadsheet read one as text and the other as blank. Both CSVs now leave it
    empty, as they do a key a row lacks."""
    from models.trainer import csv_text

    text = csv_text([{"a": 1.5, "b": math.nan}, {"a": 2}], ["a", "b"])
    assert text.splitlines() == ["a,b", "1.5,", "2,"]
    assert json.loads(json_text({"b": math.nan, "c": [math.inf]})) == {"b": None, "c": [None]}


_KILLER = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[3])
from models.config import TrainConfig
from models.trainer import Trainer
cfg = TrainConfig(**json.loads(sys.argv[1]))
kill_at = int(sys.argv[2])
def hook(t):
    if t.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
Trainer(cfg, log=lambda s: None, step_hook=hook).run()
"""


def test_resume_after_sigkill_is_identical(tiny_data, tmp_path):
    """SIGKILL at step 5 (epoch 2, mid-epoch; last.pt holds step 4), resume with the CLI:
    the final weights equal an uninterrupted run's bit for bit."""
    from models.cli import main

    kw = dict(stage=1, epochs=2, deterministic=True, save_every_steps=1)
    killed = _cfg(tiny_data, tmp_path / "killed", **kw)
    proc = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(killed.to_dict()), "5", str(REPO)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ck = load_checkpoint(str(tmp_path / "killed" / "last.pt"))
    assert (ck["epoch"], ck["batch"], ck["global_step"]) == (1, 1, 4)
    assert main(["train", "--out", str(tmp_path / "killed"), "--resume", "--threads", "1"]) == 0

    ref = Trainer(_cfg(tiny_data, tmp_path / "ref", **kw), log=lambda s: None)
    ref.run()
    a = load_checkpoint(str(tmp_path / "killed" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "ref" / "last.pt"))
    assert a["global_step"] == b["global_step"] == 6
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
    assert [r["val_loss"] for r in a["history"]] == [r["val_loss"] for r in b["history"]]
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]


class _Stop(Exception):
    pass


def test_stage2_fp16_resume_mid_epoch_is_identical(tiny_data, tmp_path):
    """Stage II under fp16 autocast (GradScaler on), stopped at step 3 (the last of the
    epoch; last.pt holds step 2, mid-epoch) and resumed: the weights, Adam's moments and the scaler's state
    equal an uninterrupted run's bit for bit. The SIGKILL test covers Stage I without a
    scaler."""
    # size 16, one epoch: fp16 autocast is ~4x slower than float32 on the CPU (~35 s of CPU here)
    kw = dict(stage=2, epochs=1, batch_size=4, size=16, deterministic=True, save_every_steps=1, amp="fp16")

    def stop_at_3(t):
        if t.global_step == 3:
            raise _Stop

    with pytest.raises(_Stop):
        Trainer(_cfg(tiny_data, tmp_path / "cut", **kw), log=lambda s: None, step_hook=stop_at_3).run()
    ck = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert (ck["epoch"], ck["batch"], ck["global_step"]) == (0, 2, 2)
    Trainer(_cfg(tiny_data, tmp_path / "cut", resume=True, **kw), log=lambda s: None).run()
    Trainer(_cfg(tiny_data, tmp_path / "ref", **kw), log=lambda s: None).run()
    a = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "ref" / "last.pt"))
    assert a["global_step"] == b["global_step"] == 3
    assert a["scaler"] == b["scaler"] and b["scaler"]["scale"] > 0
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


def test_resume_that_extends_epochs_is_what_the_next_resume_continues(tiny_data, tmp_path, capsys):
    """A run extended with `--resume --epochs N` and then interrupted went on, at the next
    plain `--resume`, with the FIRST run's epochs (config.json, which the CLI resumes from,
    was written by fresh runs only): it trained nothing, said nothing and exited 0. Now
    every start writes config.json, and a resume with nothing left says so."""
    from models.cli import main

    out = tmp_path / "ext"
    cfg = _cfg(tiny_data, out, stage=1, epochs=1)
    Trainer(cfg, log=lambda s: None).run()
    assert main(["train", "--out", str(out), "--resume", "--epochs", "2", "--threads", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "nothing to train: the run has done its 2 epoch(s)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["seconds"] > 0.5  # the finished run's, kept
    # a kill after the last last.pt and before summary.json: the resume that has nothing
    # to train writes this run's summary, not the one an earlier, shorter run left
    stale = dict(summary, epochs_run=1, steps=3, seconds=0.0)
    (out / "summary.json").write_text(json.dumps(stale))
    assert main(["train", "--out", str(out), "--resume", "--threads", "1"]) == 0
    rewritten = json.loads((out / "summary.json").read_text())
    assert (rewritten["epochs_run"], rewritten["steps"]) == (2, summary["steps"])
    # the saved config stays a template for a fresh run (it said resume: true)
    assert json.loads((out / "config.json").read_text())["resume"] is False
    assert main(["train", "--config", str(out / "config.json"), "--out", str(tmp_path / "again"), "--epochs", "1",
                 "--threads", "1"]) == 0


def test_dispersive_options_a_variant_ignores_are_announced(tiny_data, tmp_path):
    """--disp-tau with the hinge or covariance variant, and --disp-margin with any but the
    hinge, were dropped without a word; each is now a warning (defaults say nothing)."""
    said = []
    for i, (variant, extra) in enumerate((("hinge", dict(disp_tau=0.1)), ("infonce_l2", dict(disp_margin=5.0)),
                                          ("hinge", dict(disp_margin=5.0)), ("covariance", {}))):
        lines = []
        Trainer(_cfg(tiny_data, tmp_path / f"w{i}", disp_variant=variant, **extra), log=lines.append).setup()
        said.append([ln for ln in lines if "has no effect" in ln])
    assert said[0] == ["warning: --disp-tau 0.1 has no effect on --disp-variant hinge "
                       "(the temperature of the infonce variants)"]
    assert said[1] == ["warning: --disp-margin 5 has no effect on --disp-variant infonce_l2 (the hinge's margin)"]
    assert said[2] == said[3] == []


def test_an_image_in_both_train_and_val_is_announced(tiny_data, tmp_path):
    """An image listed in train.txt and val.txt trained without a word, so the validation
    scores were not held out. The run still goes on (a smoke test may want it), with a
    warning naming how many and one of them; disjoint splits say nothing."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    val_first = (root / "val.txt").read_text().split()[0]
    with open(root / "train.txt", "a") as fh:
        fh.write(val_first + "\n")
    logs = []
    Trainer(_cfg(str(root), tmp_path / "leak", stage=1), log=logs.append).setup()
    said = [m for m in logs if "in both train.txt and val.txt" in m]
    assert len(said) == 1 and said[0].startswith("warning: 1 image(s)") and val_first in said[0], logs
    logs.clear()
    Trainer(_cfg(tiny_data, tmp_path / "clean", stage=1), log=logs.append).setup()
    assert not [m for m in logs if "train.txt and val.txt" in m]


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    """An exception midway through the write (here: in fsync, after the bytes went to the
    temporary file) leaves the old checkpoint loadable and no temporary behind."""
    from models import trainer as T

    path = str(tmp_path / "last.pt")
    save_checkpoint({"format": T.CHECKPOINT_FORMAT, "v": torch.arange(5)}, path)

    def boom(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr(T.os, "fsync", boom)
    with pytest.raises(OSError, match="disk on fire"):
        save_checkpoint({"format": T.CHECKPOINT_FORMAT, "v": torch.zeros(10**5)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["v"], torch.arange(5))
    assert os.listdir(tmp_path) == ["last.pt"]


_WRITE_KILLED = r"""
import os, signal, sys, torch
sys.path.insert(0, sys.argv[2])
from models import trainer as T
real_write = None
class Half:
    def __init__(self, f): self.f = f
def kill_in_fsync(fd):
    os.kill(os.getpid(), signal.SIGKILL)
T.os.fsync = kill_in_fsync
T.save_checkpoint({"format": T.CHECKPOINT_FORMAT, "v": torch.zeros(10**6)}, sys.argv[1])
"""


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path):
    from models import trainer as T

    path = str(tmp_path / "best.pt")
    save_checkpoint({"format": T.CHECKPOINT_FORMAT, "v": torch.arange(3)}, path)
    proc = subprocess.run([sys.executable, "-c", _WRITE_KILLED, path, str(REPO)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert torch.equal(load_checkpoint(path)["v"], torch.arange(3))
    leftovers = [f for f in os.listdir(tmp_path) if f != "best.pt"]
    assert leftovers and all(".tmp" in f for f in leftovers)  # the half-written temporary
    T.remove_stale_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == ["best.pt"]


def test_plot_skipped_without_matplotlib(monkeypatch, capsys, tmp_path):
    import builtins

    from models.trainer import plot_curves

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert plot_curves([{"epoch": 1}], str(tmp_path / "c.png")) is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err


def test_channels_last_step_matches_contiguous(tiny_data, tmp_path):
    """--channels-last: the model's convolution weights and the batches are NHWC, and the
    first two Stage II steps (fused ops included) give the contiguous run's losses within
    float32 rounding (the layouts only reorder the convolutions' sums)."""
    losses = {}
    for cl in (False, True):
        t = Trainer(_cfg(tiny_data, tmp_path / f"cl{cl}", stage=2, channels_last=cl), log=lambda s: None)
        t.setup()
        convs = [m.weight for m in t.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
        assert all(w.is_contiguous(memory_format=torch.channels_last) == cl for w in convs)
        x, y, idx = next(iter(t._loader(t.train_ds, t.sampler)))
        losses[cl] = [t.train_step(x, y, idx)[0] for _ in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_compile_trains_the_same_and_saves_plain_keys(tiny_data, tmp_path, monkeypatch):
    """--compile MODE: the training network is torch.compile(model, mode=MODE); the first
    step's loss equals the eager one, and the checkpoint holds the plain module's keys (no
    `_orig_mod.` prefix), so it loads without --compile. Compiled with the aot_eager
    backend here (inductor's C++ build takes minutes on this CPU): what is tested is the
    trainer's wiring, torch.compile itself is torch's."""
    modes = []
    real = torch.compile

    def compile_aot_eager(model, mode=None, **kw):
        modes.append(mode)
        return real(model, backend="aot_eager", **kw)

    ref = Trainer(_cfg(tiny_data, tmp_path / "eager"), log=lambda s: None)
    ref.setup()
    x, y, idx = next(iter(ref._loader(ref.train_ds, ref.sampler)))
    want, _ = ref.train_step(x, y, idx)
    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    t = Trainer(_cfg(tiny_data, tmp_path / "compiled", compile="max-autotune"), log=lambda s: None)
    t.setup()
    assert modes == ["max-autotune"] and t.net is not t.model
    got, _ = t.train_step(x, y, idx)
    assert got == pytest.approx(want, rel=1e-5)
    t.save_last()
    saved = load_checkpoint(str(tmp_path / "compiled" / "last.pt"))["model"]
    assert list(saved) == list(ref.model.state_dict())


def test_deterministic_plain_on_cuda_is_refused_up_front(tiny_data, tmp_path, monkeypatch):
    """--deterministic --no-fused on CUDA stops in setup with a message naming both flags
    (the plain model's F.interpolate backward has no deterministic CUDA kernel: torch would
    stop at the first backward pass, after the data were loaded); the device is faked, the
    check runs before anything touches it."""
    from models import trainer as tr
    from models.config import UserError

    monkeypatch.setattr(tr, "resolve_device", lambda name: torch.device("cuda"))
    t = Trainer(_cfg(tiny_data, tmp_path / "det", deterministic=True, fused=False), log=lambda s: None)
    with pytest.raises(UserError, match="--deterministic with --no-fused on CUDA"):
        t.setup()


_FAULTS_SCRIPT = """
import resource, sys, torch
from models.trainer import keep_freed_memory
if sys.argv[1] == "cache":
    print(keep_freed_memory(), file=sys.stderr)
faults = []
for step in range(9):  # a training loop's pattern: the same tensors allocated, filled, freed
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.ones(2**24), torch.ones(2**22)  # 64 MiB and 16 MiB
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    del x, y
print(*faults[3:])  # after three steps of warm-up
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_cpu_malloc_cache_reuses_freed_pages():
    """--cpu-malloc cache (the default on CPU): over six identical "steps" after three of
    warm-up (a 64 MiB and a 16 MiB tensor allocated, filled, freed) the tensors mostly
    reuse pages already mapped; with glibc's defaults the 64 MiB block is mmapped afresh
    each step and its 16,384 pages fault every time. (With the cache a step now and then
    still faults one block in, when a small allocation of the interpreter took its place:
    the bound is on the total.)"""
    faults = {}
    for mode in ("system", "cache"):
        proc = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True,
                              cwd=REPO, check=True)
        faults[mode] = [int(v) for v in proc.stdout.split()]
        if mode == "cache" and "kept for reuse" not in proc.stderr:
            pytest.skip(f"not glibc here: {proc.stderr.strip()[-200:]}")
    assert min(faults["system"]) >= 16000, faults
    assert sum(faults["cache"]) <= sum(faults["system"]) / 4, faults


def test_make_adam_fused_takes_the_default_steps(monkeypatch):
    """The trainer's Adam runs torch's fused kernel where there is one (CPU float32 here) and
    takes the same steps as the default implementation (two groups, weight decay, three
    steps); where torch has no fused kernel it falls back instead of failing."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    b = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    b.load_state_dict(a.state_dict())
    start = [p.detach().clone() for p in a.parameters()]

    def groups(m):
        return [{"params": list(m[0].parameters()), "lr": 1e-2}, {"params": list(m[1].parameters()), "lr": 3e-3}]

    oa = make_adam(groups(a), weight_decay=1e-3)
    ob = torch.optim.Adam(groups(b), weight_decay=1e-3)
    assert oa.defaults["fused"] is True and not ob.defaults["fused"]
    for _ in range(3):
        x = torch.randn(4, 7)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for p, q, p0 in zip(a.parameters(), b.parameters(), start):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert (p - p0).abs().min() > 1e-4  # every weight moved: the steps were taken

    real_adam = torch.optim.Adam

    def adam_without_fused(params, fused=None, **kw):  # a torch with no fused kernel for these
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real_adam(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", adam_without_fused)
    o = make_adam((p for p in a.parameters()), lr=1e-3)  # a generator, as model.parameters()
    assert not o.defaults["fused"] and len(o.param_groups[0]["params"]) == 4


def test_worker_processes_change_no_batch(tiny_data, tmp_path, monkeypatch):
    """--workers only moves loading and augmentation to other processes: the batches (images
    after augmentation, masks, indices) are bitwise those of the main process. And -1
    (the default) resolves to none on the CPU and, on CUDA, to the spare cores of this
    process's share, at most 8."""
    batches = []
    for workers in (0, 2):
        t = Trainer(_cfg(tiny_data, tmp_path / f"w{workers}", workers=workers, device="cpu"), log=lambda s: None)
        t.setup()
        t.sampler.set_epoch(1, 0)  # an epoch > 0: its augmentation draws differ from epoch 0's
        batches.append(list(t._loader(t.train_ds, t.sampler)))
    assert len(batches[0]) == len(batches[1]) > 0
    for (x0, y0, i0), (x1, y1, i1, *_strong) in zip(*batches):  # Stage I: the workers also draw the strong copy
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(i0, i1)

    t = Trainer(_cfg(tiny_data, tmp_path / "auto", device="cpu"), log=lambda s: None)
    t.setup()
    assert t.cfg.workers == -1 and t._workers() == 0
    t.device = torch.device("cuda")  # only _workers() reads it here
    for cores, world, want in ((16, 1, 8), (4, 1, 3), (16, 2, 7), (1, 1, 0)):
        monkeypatch.setattr("os.cpu_count", lambda c=cores: c)
        t.dist.world = world
        assert t._workers() == want, (cores, world)


def test_stage1_strong_copy_drawn_by_the_workers_is_the_same(tiny_data, tmp_path):
    """With loader workers, Stage I's strong copy is drawn in the workers, ahead of the step
    (the dataset returns it with the batch); without, by the step. Each sample's copy comes
    from its own (seed, epoch, index) generator, so an epoch trains to bitwise the same
    weights and losses either way."""
    runs = []
    for workers in (0, 2):
        t = Trainer(_cfg(tiny_data, tmp_path / f"s1w{workers}", stage=1, workers=workers, device="cpu"),
                    log=lambda s: None)
        t.setup()
        assert (t.train_ds.strong is not None) == (workers > 0)
        t.run()
        # 3 steps of 4 images: the throughput of steps 2-3 (the first compiles), logged per epoch
        assert 0 < t.history[-1]["train_images_per_s"] < float("inf")
        runs.append((t.history[-1]["train_loss"], {k: v.clone() for k, v in t.model.state_dict().items()}))
    (l0, w0), (l1, w1) = runs
    assert l0 == l1
    assert all(torch.equal(v, w1[k]) for k, v in w0.items())


def test_hinge_margin_reaches_the_loss_and_a_dead_hinge_is_announced(tiny_data, tmp_path):
    """--disp-margin / --disp-scale-by-dim reach dispersive_loss (the model and the bank
    path): with the default ε = 1 the f4 rows are tens apart, the hinge is exactly 0 and
    the run says so once; with ε above the distances the term is positive and silent.
    (Before, the model had no margin at all: a hinge run regularised nothing, silently.)"""
    from models import DispersiveConfig, MedDisSegStage1
    from disseg_kernels import dispersive_loss

    torch.manual_seed(0)
    cfg = DispersiveConfig(variant="hinge", margin=1e4, scale_by_dim=False)
    m = MedDisSegStage1("resnet18", dispersive=cfg).train()
    x = torch.randn(3, 3, 32, 32)
    out = m(x)
    z = m.encoder(x)[3].reshape(3, -1)
    torch.testing.assert_close(out.disp_loss, dispersive_loss(z, variant="hinge", margin=1e4))
    assert out.disp_loss > 0
    scaled = MedDisSegStage1("resnet18", dispersive=DispersiveConfig(variant="hinge", scale_by_dim=True))
    scaled.load_state_dict(m.state_dict())
    torch.testing.assert_close(scaled.train()(x).disp_loss, dispersive_loss(z, variant="hinge", scale_by_dim=True))
    with pytest.raises(ValueError, match="margin must be a finite number > 0, got -1"):
        DispersiveConfig(variant="hinge", margin=-1)

    for margin, bank, said in ((1.0, 0, True), (1e6, 8, False)):
        lines = []
        t = Trainer(_cfg(tiny_data, tmp_path / f"h{margin:g}", stage=1, disp_variant="hinge",
                         disp_margin=margin, disp_bank=bank), log=lines.append)
        t.run()
        disp = [r["train_disp"] for r in t.history]
        warned = [s for s in lines if "hinge dispersive loss was exactly 0" in s]
        assert (disp == [0.0]) == said and len(warned) == int(said), (disp, warned)
        if said:
            assert "--disp-margin=1" in warned[0]
    with pytest.raises(Exception, match="--disp-margin=0.0: must be > 0"):
        _cfg(tiny_data, tmp_path / "bad", disp_margin=0.0)


@pytest.mark.parametrize("fast_fp16", [False, True])
def test_fp16_autocast_on_a_cpu_without_fp16_convolutions_is_announced(tiny_data, tmp_path, monkeypatch, fast_fp16):
    """--amp fp16 on a CPU whose oneDNN has no float16 convolution (this host's AVX-512
    without AVX512-FP16): torch runs them in slow_conv2d, ~30x slower than --amp bf16 for a
    Stage II step, with nothing said. The set-up now says so and names bf16; a CPU with
    fast fp16 convolutions, or --amp bf16, hears nothing."""
    import models.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_cpu_has_fast_fp16_conv", lambda: fast_fp16)
    for amp in ("fp16", "bf16"):
        logs = []
        Trainer(_cfg(tiny_data, tmp_path / f"{amp}_{fast_fp16}", stage=1, amp=amp), log=logs.append).setup()
        said = [m for m in logs if "--amp fp16 on this CPU" in m]
        assert len(said) == (1 if amp == "fp16" and not fast_fp16 else 0), logs
        if said:
            assert "--amp bf16" in said[0]
    assert isinstance(trainer_module._cpu_has_fast_fp16_conv(), bool)
