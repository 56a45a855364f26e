"""benchmarks/bench_models.py's captured-step modes (*_graph), on the CPU.

A CUDA graph cannot be captured here, so torch.cuda's graph, stream and synchronize are
replaced by stand-ins that run eagerly: what is tested is the control flow around them,
which the GPU run has no time to debug (warm-up steps before the capture, capture once,
one replay per timed step, the row's figures, and a failed capture reported in its row
while the other modes go on). The capture itself runs on a GPU (benchmarks/gpu/run_all.sh).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from benchmarks import bench_models as bm


class _Graph:
    replays = 0

    def replay(self):
        type(self).replays += 1


class _Stream:
    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    events = []

    @contextlib.contextmanager
    def graph(g):
        events.append("capture")
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    _Graph.replays = 0
    return events


def _case(mode):
    return bm._Case(1, mode, "resnet18", 2, 32, "cpu", "none", False, "default")


def test_graph_mode_captures_once_and_replays_per_step(fake_cuda_graphs):
    case = _case("plain_graph")
    steps = []
    real = case.opt.step
    case.opt.step = lambda *a, **k: steps.append(1) or real(*a, **k)
    for i in range(4):
        case.timed_step(i, record=i >= 1)
    assert fake_cuda_graphs == ["capture"]
    assert len(steps) == 3 + 1  # three warm-up steps on the side stream, one in the capture
    assert _Graph.replays == 4 and len(case.step) == 3
    row = case.row(profile=5)
    assert row["error"] == "" and math.isfinite(row["step_ms"]) and math.isnan(row["fwd_ms"])
    assert row["profile"] == []  # no profiler pass over a replay


def test_failed_capture_is_reported_and_the_run_goes_on(fake_cuda_graphs, monkeypatch):
    case = _case("fused_graph")

    def broken(g):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph", broken)
    for i in range(3):
        case.timed_step(i, record=i >= 1)
    row = case.row(profile=0)
    assert "capture failed" in row["error"] and "not permitted" in row["error"]
    assert math.isnan(row["step_ms"]) and _Graph.replays == 0


def test_cuda_only_modes_need_a_gpu():
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bm.main(["--modes", "plain,fused_graph"])
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bm.main(["--modes", "fused_cuda"])
