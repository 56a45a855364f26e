"""Data-parallel training (``--ddp``), synchronised BatchNorm and the memory bank in the trainer.

What these tests protect:
- the distributed sampler: each global batch is cut into contiguous per-rank slices whose
  concatenation is the one-process batch of ``batch_size · world``; a last global batch
  smaller than the world is dropped for training and kept (some ranks empty) for validation;
- ``GlobalBatchNorm2d`` on 2 gloo ranks equals ``BatchNorm2d`` on the whole batch: output,
  input gradient, summed parameter gradients, running statistics;
- two training steps of the real ``Trainer`` on 2 processes (batch 2 each, ``--sync-bn``,
  dispersive loss global over the ranks, a memory bank filled after step 1) equal one
  process with batch 4: the loss values and every parameter gradient, for Stage I (two
  views per step) and Stage II;
- the command line under torchrun: only rank 0 writes, and ``--resume`` of a DDP run
  with a bank continues bit for bit like an uninterrupted run; the bank is checkpointed;
  a step where each process holds a single sample runs;
- one process with ``--disp-bank``: the bank changes the loss from the second step on,
  never the first, and holds the newest K rows.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models import data as D
from models.config import TrainConfig, UserError
from models.ddp import GlobalBatchNorm2d, convert_sync_batchnorm
from models.synthetic import generate
from models.trainer import Trainer, load_checkpoint
from test_trainer import _cfg  # the trainer tests' small configuration

REPO = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp") / "data"
    generate(str(root), n_train=8, n_val=3, n_test=0, size=48, seed=0)
    return str(root)


# ------------------------------------------------------------------------------ sampler


def test_sampler_slices_are_the_one_process_batches():
    one = D.EpochBatchSampler(11, 4, seed=3, shuffle=True, drop_last=False)
    one.set_epoch(2)
    shards = []
    for r in range(2):
        s = D.EpochBatchSampler(11, 2, seed=3, shuffle=True, drop_last=False, rank=r, world=2)
        s.set_epoch(2)
        shards.append([[i for i, _ in b] for b in s])
    want = [[i for i, _ in b] for b in one]
    assert [a + b for a, b in zip(*shards)] == want  # last batch of 3: sizes 2 and 1
    assert [len(b) for b in shards[1]] == [2, 2, 1]
    # 9 samples, 4 ranks of 2: the last global batch has 1 sample < 4 ranks
    train = [D.EpochBatchSampler(9, 2, rank=r, world=4) for r in range(4)]
    assert all(s.num_batches() == len(s) == 1 for s in train)
    val = [D.EpochBatchSampler(9, 2, shuffle=False, rank=r, world=4, skip_empty=True) for r in range(4)]
    assert [len(s) for s in val] == [2, 1, 1, 1]
    assert sorted(i for s in val for b in s for i, _ in b) == list(range(9))
    with pytest.raises(ValueError, match="rank"):
        D.EpochBatchSampler(9, 2, rank=2, world=2)


def test_config_rejects_ddp_only_flags_and_bad_bank():
    with pytest.raises(UserError, match="--sync-bn=True: only applies with --ddp"):
        TrainConfig(sync_bn=True).validate()
    with pytest.raises(UserError, match="--disp-bank=-1"):
        TrainConfig(disp_bank=-1).validate()
    with pytest.raises(UserError, match="covariance"):
        TrainConfig(disp_bank=4, disp_variant="covariance").validate()


# ------------------------------------------------------------------------------ spawned workers


def _init(rank, world, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _bn_worker(rank, world, port, outdir):
    _init(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = torch.load(os.path.join(outdir, "x.pt"))
        bn = torch.load(os.path.join(outdir, "bn.pt"), weights_only=False)
        bn = convert_sync_batchnorm(bn, torch.device("cpu"))
        assert isinstance(bn, GlobalBatchNorm2d)
        mine = x.chunk(world)[rank].clone().requires_grad_(True)
        y = bn(mine)
        r = torch.load(os.path.join(outdir, "r.pt")).chunk(world)[rank]
        (y * r).sum().backward()
        torch.save({"y": y.detach(), "dx": mine.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                    "rm": bn.running_mean, "rv": bn.running_var},
                   os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_equals_batchnorm_on_the_whole_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 3, 4, generator=g) * 3 + 2
    r = torch.randn(6, 5, 3, 4, generator=g)
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-1, 1, generator=g)
    torch.save(x, tmp_path / "x.pt")
    torch.save(r, tmp_path / "r.pt")
    torch.save(bn, tmp_path / "bn.pt")
    mp.spawn(_bn_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    xr = x.clone().requires_grad_(True)
    y = bn(xr)
    (y * r).sum().backward()
    parts = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([p["dx"] for p in parts]), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[0]["dw"] + parts[1]["dw"], bn.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts[0]["db"] + parts[1]["db"], bn.bias.grad, rtol=1e-5, atol=1e-5)
    for p in parts:
        torch.testing.assert_close(p["rm"], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p["rv"], bn.running_var, rtol=1e-5, atol=1e-6)


def _two_steps(trainer):
    """Two train_step calls on the first two batches; (losses, grads after each step)."""
    trainer.sampler.set_epoch(0)
    losses, grads = [], []
    for step, (x, y, idx) in enumerate(trainer._loader(trainer.train_ds, trainer.sampler)):
        if step == 2:
            break
        loss, _ = trainer.train_step(x, y, idx)
        losses.append(loss)
        grads.append({n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    return losses, grads


def _trainer_worker(rank, world, port, cfg_json, outdir):
    _init(rank, world, port)
    t = Trainer(TrainConfig(**json.loads(cfg_json)), log=lambda s: None)
    try:
        t.setup()
        losses, grads = _two_steps(t)
        bank = None if t.bank is None else t.bank.negatives().clone()
        torch.save({"losses": losses, "grads": grads, "bank": bank}, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        t.close()


@pytest.mark.parametrize("stage", [1, 2])
def test_two_ddp_steps_match_one_process_with_the_doubled_batch(tiny_data, tmp_path, stage):
    """2 processes × batch 2 (sync BN, global dispersive loss, a bank of 3 rows filled after
    step 1) against 1 process × batch 4: same loss values, same gradients at both steps."""
    # lr 1e-6: Adam's first step moves every weight by about ±lr whatever its gradient's
    # size, so the sign of round-off-sized gradients would otherwise decide step 2's weights
    common = dict(stage=stage, disp_bank=3, disp_tau=0.7, lr=1e-6, lr_encoder=1e-6)
    ddp = _cfg(tiny_data, tmp_path / "ddp", batch_size=2, ddp=True, sync_bn=True, **common)
    mp.spawn(_trainer_worker, args=(2, _free_port(), json.dumps(ddp.to_dict()), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "rank0.pt")
    other = torch.load(tmp_path / "rank1.pt")

    ref = Trainer(_cfg(tiny_data, tmp_path / "one", **common), log=lambda s: None)
    ref.setup()
    losses, grads = _two_steps(ref)

    assert got["losses"] == pytest.approx(losses, rel=1e-5, abs=1e-5)
    assert other["losses"] == got["losses"]  # every rank holds the global loss
    assert len(got["grads"]) == 2 and set(got["grads"][1]) == set(grads[1])
    # Both steps 1e-3: round-off (sync BN's sums, the all-reduce) can move a max-pooling's
    # argmax between near-equal values (the gates), even at step 1 from the same weights:
    # Stage II's dconv1 branch-1 conv gradient moves by 4e-4 to 8e-4 (relative) when the
    # single-process batch is perturbed by 1e-7. A missing global sum is a 1e-1-sized error.
    for step, rtol in ((0, 1e-3), (1, 1e-3)):
        for name, g in grads[step].items():
            d = got["grads"][step][name]
            err = (d - g).norm().item()
            assert err <= rtol * g.norm().item() + 1e-6, (step, name, err, g.norm().item())
            assert torch.equal(d, other["grads"][step][name]), name  # DDP averaged them
    torch.testing.assert_close(got["bank"], ref.bank.negatives(), rtol=1e-4, atol=1e-5)
    assert torch.equal(got["bank"], other["bank"])


# ------------------------------------------------------------------------------ the command line


def _torchrun(args, port, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "models.cli", "train", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_resume_with_bank_is_identical_and_only_rank0_writes(tiny_data, tmp_path):
    # 8 images, 3 per process, last batch kept: steps of 3 + 3 and of 1 + 1 samples (a
    # process with a single sample)
    flags = ["--ddp", "--data", tiny_data, "--encoder", "resnet18", "--size", "32", "--batch-size", "3",
             "--no-drop-last",
             "--threads", "1", "--no-progress", "--deterministic", "--disp-bank", "3", "--dropout-size", "4",
             "--lr", "1e-3", "--lr-encoder", "1e-3"]
    a, b = tmp_path / "a", tmp_path / "b"
    p = _torchrun([*flags, "--out", str(a), "--epochs", "1"], _free_port())
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count('"epochs_run": 1') == 1  # one summary: rank 0's
    p = _torchrun(["--out", str(a), "--resume", "--epochs", "2", "--ddp"], _free_port())
    assert p.returncode == 0, p.stderr[-3000:]
    p = _torchrun([*flags, "--out", str(b), "--epochs", "2"], _free_port())
    assert p.returncode == 0, p.stderr[-3000:]

    ca, cb = load_checkpoint(str(a / "last.pt")), load_checkpoint(str(b / "last.pt"))
    assert ca["world"] == 2 and ca["global_step"] == cb["global_step"] == 4
    for k, v in cb["model"].items():
        assert torch.equal(ca["model"][k], v), k
    assert torch.equal(ca["bank"]["rows"], cb["bank"]["rows"]) and int(ca["bank"]["count"]) == 3
    assert [r["train_loss"] for r in ca["history"]] == [r["train_loss"] for r in cb["history"]]
    assert len((a / "metrics.csv").read_text().splitlines()) == 3  # header + 2 epochs, one writer
    assert sorted(f for f in os.listdir(a) if f.startswith(".")) == []  # no stray temporaries


def test_resume_with_another_process_count_is_refused(tiny_data, tmp_path, monkeypatch, capsys):
    """A checkpoint of 2 processes, resumed by 1 (a process group of one, in this process)."""
    from models.cli import main

    out = tmp_path / "w2"
    cfg = _cfg(tiny_data, out, ddp=True, batch_size=2)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.save({"format": "disseg-checkpoint", "config": cfg.to_dict(), "world": 2}, out / "last.pt")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    assert main(["train", "--out", str(out), "--resume", "--threads", "1"]) == 2
    assert "trained by 2 process(es); resume it with the same number (now 1)" in capsys.readouterr().err
    assert not dist.is_initialized()  # the trainer left the group it joined


def test_bank_changes_the_loss_from_the_second_step(tiny_data, tmp_path):
    """One process: with a bank, step 1 (empty bank) has the plain loss, step 2 does not;
    after two steps of 4 rows the bank of 5 holds the newest 5 rows."""
    plain = Trainer(_cfg(tiny_data, tmp_path / "p", stage=2), log=lambda s: None)
    plain.setup()
    banked = Trainer(_cfg(tiny_data, tmp_path / "k", stage=2, disp_bank=5), log=lambda s: None)
    banked.setup()
    lp, _ = _two_steps(plain)
    lk, _ = _two_steps(banked)
    assert lk[0] == pytest.approx(lp[0], rel=1e-6)
    assert abs(lk[1] - lp[1]) > 1e-4
    assert len(banked.bank) == 5 and int(banked.bank.ptr) == 3  # 8 rows written into 5 slots
    assert banked.bank.dim == 1024  # ResNet-18 f4 (stride 16) at 32x32: 256 x 2 x 2


def test_ddp_without_torchrun_says_how_to_launch(tiny_data, tmp_path, capsys, monkeypatch):
    from models.cli import main

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert main(["train", "--ddp", "--data", tiny_data, "--out", str(tmp_path / "x"), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "torchrun" in err and "RANK" in err and "Traceback" not in err
