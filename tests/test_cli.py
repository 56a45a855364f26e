"""The `disseg` command at tiny sizes: every subcommand runs; each bad input gives its
message and a non-zero exit without a traceback and leaves the run folder untouched;
--config JSON and flags combine; the real nuclei fixture goes end to end through the
loader, trainer and evaluator (skipped if the fixture is absent)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.cli import main
from models.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
NUCLEI = REPO / ".." / "shared" / "data" / "nuclei-dsb2018"
TINY = ["--encoder", "resnet18", "--size", "32", "--batch-size", "4", "--threads", "1", "--no-progress",
        "--lr", "1e-3", "--lr-encoder", "1e-3", "--dropout-size", "4"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny synthetic dataset and a one-epoch Stage I run trained through the CLI."""
    base = tmp_path_factory.mktemp("cli")
    data = base / "data"
    generate(str(data), n_train=8, n_val=4, n_test=2, size=48, seed=0)
    out = base / "s1"
    assert main(["train", "--stage", "1", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY]) == 0
    return data, out


def _run_bad(argv, capsys, code=2):
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc == code, (rc, cap.err)
    assert "Traceback" not in cap.err and "Traceback" not in cap.out
    return cap.err


def _dataset(tmp_path, n=4):
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), 25 * i, np.uint8)).save(root / "images" / f"im{i}.jpg")
        m = np.zeros((32, 32), np.uint8)
        m[8:20, 8:20] = 255
        Image.fromarray(m).save(root / "masks" / f"im{i}.png")
    (root / "train.txt").write_text("im0\nim1\nim2\n")
    (root / "val.txt").write_text("im3\n")
    return root


BAD_DATA = {
    "missing_mask": (lambda r: os.remove(r / "masks" / "im1.png"), "train.txt:2: no mask for 'im1'"),
    "size_mismatch": (lambda r: Image.fromarray(np.zeros((9, 9), np.uint8)).save(r / "masks" / "im2.png"),
                      "train.txt:3: size mismatch"),
    "unreadable": (lambda r: (r / "images" / "im3.jpg").write_bytes(b"\x00garbage"), "val.txt:1:"),
    "empty_split": (lambda r: (r / "val.txt").write_text("\n"), "val.txt: the split file is empty"),
    "duplicate": (lambda r: (r / "train.txt").write_text("im0\nim1\nim0.jpg\n"),
                  "train.txt:3: 'im0.jpg' is listed twice (first on line 1)"),
    "no_images_dir": (lambda r: os.rename(r / "images", r / "imgs"), "images: folder not found"),
}


@pytest.mark.parametrize("fault", list(BAD_DATA))
def test_bad_dataset_message_exit_and_untouched_out(tmp_path, capsys, fault):
    root = _dataset(tmp_path)
    breaker, expect = BAD_DATA[fault]
    breaker(root)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    err = _run_bad(["train", "--data", str(root), "--out", str(out), *TINY], capsys)
    assert expect in err
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_bad_flags_and_files(tmp_path, capsys, trained):
    data, s1 = trained
    cases = [
        (["train", "--size", "30", "--out", str(tmp_path / "a")], "--size=30: must be a positive multiple of 16"),
        (["train", "--stage", "1", "--init", "x.pt", "--out", str(tmp_path / "a")], "--init='x.pt': only Stage II"),
        (["train", "--stage", "2", "--data", str(data), "--init", str(tmp_path / "nope.pt"), "--out",
          str(tmp_path / "a"), *TINY], "nope.pt: checkpoint not found"),
        (["train", "--out", str(tmp_path / "empty"), "--resume"], "--resume: "),
        (["train", "--data", str(data), "--out", str(s1), *TINY], "already holds a run"),
        (["train", "--config", str(tmp_path / "none.json")], "no such file"),
        (["train", "--rotate-p", "1.5", "--out", str(tmp_path / "a")], "--rotate-p=1.5: must lie in [0, 1]"),
        (["train", "--pretrained", str(tmp_path / "r18.pth"), "--data", str(data), "--out", str(tmp_path / "a")],
         "r18.pth'"),
        (["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(data)], "checkpoint not found"),
        # a run folder for its checkpoint: say which file (user-acceptance pass, 2026-11-28)
        (["evaluate", "--checkpoint", str(s1), "--data", str(data)],
         f"a folder, not a checkpoint file (it holds best.pt and last.pt: pass {s1 / 'best.pt'})"),
        (["evaluate", "--checkpoint", str(s1 / "config.json"), "--data", str(data)],
         "config.json: not a readable checkpoint (UnpicklingError: Weights only load failed)"),
        (["evaluate", "--checkpoint", str(s1 / "best.pt"), "--data", str(tmp_path / "nodata")],
         "dataset folder not found"),
        (["predict", "--checkpoint", str(s1 / "best.pt"), "--input", str(tmp_path), "--out", str(tmp_path / "p")],
         "no images"),
        (["make-splits", str(tmp_path / "nothing")], "folder not found"),
    ]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"lr": 0.1,, }')
    cases.append((["train", "--config", str(bad_json)], "not valid JSON, line 1"))
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"learning_rate": 0.1}')
    cases.append((["train", "--config", str(unknown)], "unknown key 'learning_rate'"))
    # the user-acceptance pass of 2026-11-28 (later session): each was a traceback (exit 1)
    # raised by the model or the loss after the data check, or silently meant "off"
    ck = str(s1 / "best.pt")
    cases += [
        (["train", "--disp-tau", "inf", "--out", str(tmp_path / "a")], "--disp-tau=inf: must be a finite number"),
        (["train", "--grad-clip", "nan", "--out", str(tmp_path / "a")], "--grad-clip=nan: must be a finite number"),
        (["train", "--grad-clip=-inf", "--out", str(tmp_path / "a")], "--grad-clip=-inf: must be a finite"),
        (["train", "--weight-decay", "-1", "--out", str(tmp_path / "a")], "--weight-decay=-1.0: must be >= 0"),
        (["train", "--size", "16", "--batch-size", "1", "--out", str(tmp_path / "a")], "--batch-size=1: a 16x16"),
        (["evaluate", "--checkpoint", ck, "--data", str(data), "--size", "-16"], "--size=-16: must be a positive"),
        (["evaluate", "--checkpoint", ck, "--data", str(data), "--threshold", "2"], "--threshold=2.0: must lie in"),
        (["predict", "--checkpoint", ck, "--input", str(tmp_path), "--out", str(tmp_path / "p"), "--size", "50"],
         "--size=50: must be a positive multiple of 16"),
        (["predict", "--checkpoint", ck, "--input", str(tmp_path), "--out", str(tmp_path / "p"), "--threshold",
          "1.5"], "--threshold=1.5"),
    ]
    for name, text, expect in (("null.json", '{"lr": null}', "--lr=None: must be given"),
                               ("nan.json", '{"disp_weight": NaN}', "--disp-weight=nan: must be a finite number")):
        (tmp_path / name).write_text(text)
        cases.append((["train", "--config", str(tmp_path / name), "--out", str(tmp_path / "a")], expect))
    garbage_ckpt = tmp_path / "garbage.pt"
    garbage_ckpt.write_bytes(b"definitely not a checkpoint")
    cases.append((["evaluate", "--checkpoint", str(garbage_ckpt), "--data", str(data)], "not a readable checkpoint"))
    before = sorted(os.listdir(s1))
    for argv, expect in cases:
        err = _run_bad(argv, capsys)
        assert expect in err, (argv, err)
    assert sorted(os.listdir(s1)) == before


def test_refused_init_leaves_no_out_folder(tmp_path, capsys, trained):
    """An --init of another encoder was refused after --out had been created (an empty run
    folder left behind); it is now checked first."""
    data, s1 = trained
    tiny34 = [a if a != "resnet18" else "resnet34" for a in TINY]
    out = tmp_path / "s2"
    err = _run_bad(["train", "--stage", "2", "--data", str(data), "--init", str(s1 / "best.pt"), "--out", str(out),
                    *tiny34], capsys)
    assert "its encoder is 'resnet18', this run's --encoder is 'resnet34'" in err
    assert not out.exists()


def test_config_choices_agree_with_the_library():
    """The CLI spells out the feature names and backends (to read its flags without torch)."""
    import disseg_kernels
    from models import base
    from models.config import DISP_BACKENDS, DISP_FEATURES

    assert DISP_FEATURES == base.FEATURES and DISP_BACKENDS == disseg_kernels.BACKENDS


def test_unusable_out_folders_are_named(tmp_path, capsys, trained):
    """An --out that cannot be a folder (a file in the way, or under a file) stops train,
    evaluate and predict with one line naming it, before any work (a raw FileExistsError /
    NotADirectoryError traceback before, found by the user-acceptance pass of 2026-11-28)."""
    data, s1 = trained
    afile = tmp_path / "afile"
    afile.write_text("x")
    ck = str(s1 / "best.pt")
    for out, expect in ((afile, "is a file, not a folder"), (afile / "sub", "afile is a file, not a folder")):
        for argv in (["train", "--data", str(data), "--out", str(out), "--epochs", "1", *TINY],
                     ["evaluate", "--checkpoint", ck, "--data", str(data), "--out", str(out)],
                     ["predict", "--checkpoint", ck, "--input", str(data / "images"), "--out", str(out)]):
            err = _run_bad(argv, capsys)
            assert f"--out='{out}'" in err and expect in err, (argv, err)
    assert afile.read_text() == "x"


def test_run_paths_are_stored_absolute(tmp_path, trained, monkeypatch, capsys):
    """A run started with relative --data / --out saves absolute paths, so `evaluate` without
    --data (the checkpoint's dataset) and the summary's paths work from another directory."""
    data, _ = trained
    monkeypatch.chdir(data.parent)
    assert main(["train", "--stage", "1", "--data", data.name, "--out", "rel_run", "--epochs", "1", *TINY]) == 0
    cfg = json.loads((data.parent / "rel_run" / "config.json").read_text())
    assert cfg["data"] == str(data) and cfg["out"] == str(data.parent / "rel_run")
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "--checkpoint", str(data.parent / "rel_run" / "best.pt"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"using the checkpoint's dataset {data}" in printed
    # without --out the files still exist (they were not written at all before 2026-11-28)
    default = data.parent / "rel_run" / "eval_val"
    assert f"written in {default}" in printed
    assert (default / "per_case.csv").is_file() and json.loads((default / "summary.json").read_text())["n_images"] > 0


def test_predict_refuses_two_images_with_one_name(tmp_path, capsys, trained):
    """case1.jpg and case1.png would both write masks/case1.png: refused, naming both."""
    _, s1 = trained
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(src / "case1.jpg")
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(src / "case1.png")
    err = _run_bad(["predict", "--checkpoint", str(s1 / "best.pt"), "--input", str(src), "--out", str(tmp_path / "p")],
                   capsys)
    assert "case1.jpg, case1.png" in err and not (tmp_path / "p" / "masks").exists()
    # --masks that is not a folder: one message and status 2 (was a FileNotFoundError
    # traceback after the model had loaded)
    os.remove(src / "case1.png")
    for bad in (tmp_path / "nope", src / "case1.jpg"):
        err = _run_bad(["predict", "--checkpoint", str(s1 / "best.pt"), "--input", str(src), "--out",
                        str(tmp_path / "p"), "--masks", str(bad)], capsys)
        assert f"--masks={str(bad)!r}: no such folder" in err


def test_predict_names_the_images_its_masks_cannot_outline(tmp_path, capsys, trained):
    """predict --masks: an image without a mask, or with a mask of another size, gets no
    ground-truth outline, and the run says which (it said nothing: found by a
    user-acceptance pass, 2026-11-28)."""
    _, s1 = trained
    src, masks = tmp_path / "in", tmp_path / "gt"
    src.mkdir()
    masks.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(src / f"{name}.png")
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(masks / "a.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(masks / "b.png")
    assert main(["predict", "--checkpoint", str(s1 / "best.pt"), "--input", str(src), "--out", str(tmp_path / "p"),
                 "--masks", str(masks)]) == 0
    out = capsys.readouterr().out
    assert "2 of 3 overlays have no ground-truth outline" in out
    assert "b (mask b.png is 48x40, the image 48x48)" in out and "c (no mask)" in out and "a (" not in out


def test_plain_pixel_dispersive_that_cannot_fit_is_refused_before_out(tmp_path, capsys, trained):
    """--no-fused at pixel granularity of f1, 512x512, batch 8: N = 524,288 pixel rows, whose
    N x N matrices cannot fit any machine. One line, status 2, no --out. It was a 35-line
    MemoryError traceback at the first step, after config.json was written (found by a
    user-acceptance pass, 2026-11-28)."""
    data, _ = trained
    out = tmp_path / "run"
    err = _run_bad(["train", "--stage", "1", "--data", str(data), "--out", str(out), "--encoder", "resnet18",
                    "--size", "512", "--batch-size", "8", "--no-fused", "--disp-granularity", "pixel",
                    "--disp-feature", "f1"], capsys)
    assert "--no-fused with --disp-granularity pixel at f1" in err and "N = 524288" in err
    assert "leave out --no-fused" in err and not out.exists()


def test_best_checkpoint_exists_when_validation_cannot_score(tmp_path, capsys):
    """Every validation mask empty (mIoU NaN under --empty-policy nan): best.pt is still
    written (the first epoch, with a warning), and summary.json / metrics.json are strict
    JSON (null, not NaN or -Infinity)."""
    root = _dataset(tmp_path)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / "im3.png")  # the val split
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(out), "--epochs", "2", "--threshold", "1.0", *TINY]) == 0
    log = capsys.readouterr()
    assert "validation mIoU is NaN" in log.out + log.err
    assert (out / "best.pt").is_file()
    text = (out / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    summary = json.loads(text)
    assert summary["best_epoch"] == 1 and summary["best_val_mIoU"] is None
    assert "NaN" not in (out / "metrics.json").read_text()


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--stage", "3"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    # unknown dispersive feature / backend: argparse's choices now (they were tracebacks
    # from the model, after the data check)
    for flag, value in (("--disp-feature", "f9"), ("--disp-backend", "bogus")):
        with pytest.raises(SystemExit) as e:
            main(["train", flag, value])
        assert e.value.code == 2
        assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err
    # an unknown flag: the command's usage and name (it was the top-level usage and
    # "disseg: error"; user-acceptance pass, 2026-11-28)
    for argv, usage in ((["train", "--val-split", "0.2"], "usage: disseg train"),
                        (["make-splits", "x", "--bogus"], "usage: disseg make-splits")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and usage in err
        assert f"disseg {argv[0]}: error: unrecognized arguments: {' '.join(argv[-2 if argv[0] == 'train' else -1:])}" in err


def test_config_json_and_flag_override(tmp_path, trained):
    data, _ = trained
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"disp_weight": 0.6, "batch_size": 2, "hflip_p": 0.0}))
    out = tmp_path / "r"
    rc = main(["train", "--config", str(cfg_file), "--data", str(data), "--out", str(out), "--epochs", "1",
               *TINY])  # TINY says --batch-size 4: the typed flag wins
    assert rc == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["disp_weight"] == 0.6 and saved["hflip_p"] == 0.0 and saved["batch_size"] == 4


def test_evaluate_predict_make_splits(tmp_path, trained, capsys):
    data, s1 = trained
    assert main(["evaluate", "--checkpoint", str(s1 / "best.pt"), "--data", str(data), "--split", "test",
                 "--out", str(tmp_path / "ev"), "--native", "--empty-policy", "one"]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["n_images"] == 2 and summary["empty_policy"] == "one" and summary["resolution"] == "native"
    assert {"mIoU", "mDSC", "Rec.", "Prec."} <= set(summary)
    lines = (tmp_path / "ev" / "per_case.csv").read_text().splitlines()
    assert lines[0].startswith("name,iou,dice,recall,precision,f2,accuracy,hd95") and len(lines) == 3
    assert main(["predict", "--checkpoint", str(s1 / "best.pt"), "--input", str(data / "images"),
                 "--out", str(tmp_path / "pr")]) == 0
    assert len(os.listdir(tmp_path / "pr" / "masks")) == 14
    ds = _dataset(tmp_path, n=10)
    for f in ("train.txt", "val.txt"):
        os.remove(ds / f)
    assert main(["make-splits", str(ds), "--seed", "1", "--val", "0.2", "--test", "0.2"]) == 0
    assert len((ds / "val.txt").read_text().split()) == 2 and len((ds / "train.txt").read_text().split()) == 6


def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--size", "32", "--synth-train", "8", "--synth-val", "4",
               "--synth-size", "32", "--epochs1", "1", "--epochs2", "1", "--batch-size", "4", "--threads", "1",
               "--no-progress"])
    assert rc == 0
    for p in ("stage1/best.pt", "stage1/curves.png", "stage2/best.pt", "stage2/metrics.csv", "stage2/transfer.json",
              "eval/per_case.csv", "eval/summary.json", "demo_summary.json"):
        assert (out / p).is_file(), p
    assert len(os.listdir(out / "overlays" / "overlays")) == 4
    assert "validation Dice" in capsys.readouterr().out


def test_console_script_entry_point():
    """`python -m models.cli` (what the `disseg` script runs) prints help and exits 0."""
    r = subprocess.run([sys.executable, "-m", "models.cli", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0 and "make-splits" in r.stdout


@pytest.mark.skipif(not NUCLEI.is_dir(), reason=f"real-data fixture {NUCLEI} absent")
def test_nuclei_end_to_end_smoke(tmp_path):
    """Real microscopy through the real loader, trainer and evaluator (1 epoch; the accuracy
    run is scripts/nuclei.sh)."""
    out = tmp_path / "nuc"
    assert main(["train", "--stage", "1", "--data", str(NUCLEI), "--out", str(out), "--epochs", "1",
                 "--encoder", "resnet18", "--size", "64", "--batch-size", "4", "--threads", "1", "--no-progress"]) == 0
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(NUCLEI), "--out",
                 str(out / "ev"), "--native"]) == 0
    s = json.loads((out / "ev" / "summary.json").read_text())
    assert s["n_images"] == 4 and s["resolution"] == "native"
