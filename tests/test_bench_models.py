"""benchmarks/bench_models.py's captured-step modes (*_graph), on the CPU.

A CUDA graph cannot be captured here, so the captured step runs through
``models.step_graph.StepGraph``'s emulation (what ``disseg train --cuda-graph`` uses; its
own tests are tests/test_step_graph.py): what is tested is the benchmark's control flow,
which the GPU run has no time to debug (capture once, one replay and one eager Adam step
per timed step, the row's figures, and a failed capture reported in its row while the
other modes go on). The capture itself runs on a GPU (benchmarks/gpu/run_all.sh).
"""

from __future__ import annotations

import math

import pytest

from benchmarks import bench_models as bm
from models.step_graph import StepGraph


def _case(mode):
    return bm._Case(1, mode, "resnet18", 2, 32, "cpu", "none", False, "default")


def test_graph_mode_captures_once_and_replays_per_step():
    case = _case("plain_graph")
    steps = []
    real = case.opt.step
    case.opt.step = lambda *a, **k: steps.append(1) or real(*a, **k)
    before = [p.detach().clone() for p in case.model.parameters()]
    for i in range(4):
        case.timed_step(i, record=i >= 1)
    assert isinstance(case.graph, StepGraph) and case.graph.replays == 4
    assert len(steps) == 4 and len(case.step) == 3  # Adam eager, once per replayed step
    assert any(not p.equal(b) for p, b in zip(case.model.parameters(), before))  # it trains
    row = case.row(profile=5)
    assert row["error"] == "" and math.isfinite(row["step_ms"]) and math.isnan(row["fwd_ms"])
    assert row["profile"] == []  # no profiler pass over a replay


def test_failed_capture_is_reported_and_the_run_goes_on(monkeypatch):
    case = _case("fused_graph")

    def broken(self, *inputs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(StepGraph, "capture", broken)
    for i in range(3):
        case.timed_step(i, record=i >= 1)
    row = case.row(profile=0)
    assert "capture failed" in row["error"] and "not permitted" in row["error"]
    assert math.isnan(row["step_ms"])


def test_cuda_only_modes_need_a_gpu():
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bm.main(["--modes", "plain,fused_graph"])
    with pytest.raises(SystemExit, match="needs --device cuda"):
        bm.main(["--modes", "fused_cuda"])


def test_host_breakdown_areas():
    """--host-profile's table: cProfile's self times per step, by where the code lives, the
    host's waits for the device apart from the C calls that issue work."""
    stats = {
        ("~", 0, "<built-in method torch._C._cuda_synchronize>"): (1, 2, 0.040, 0.040, {}),
        ("~", 0, "<method 'item' of 'torch._C.TensorBase' objects>"): (2, 2, 0.002, 0.002, {}),
        ("~", 0, "<method 'items' of 'dict' objects>"): (8, 8, 0.001, 0.001, {}),
        ("~", 0, "<built-in method torch.conv2d>"): (40, 40, 0.010, 0.010, {}),
        ("/work/main/disseg_kernels/ops/telu.py", 16, "telu"): (20, 20, 0.004, 0.030, {}),
        ("/x/site-packages/triton/runtime/jit.py", 1167, "__call__"): (20, 20, 0.006, 0.020, {}),
        ("/work/main/models/blocks.py", 84, "forward"): (10, 10, 0.001, 0.050, {}),
    }
    h = bm.host_breakdown(stats, 2, free_ms=30.0, profiled_ms=40.0, top=3)
    a = h["areas"]
    assert a["wait for device (synchronize, item, copies to host)"] == pytest.approx(21.0)  # (40 + 2) ms / 2 steps
    assert a["C calls (ATen ops, launches)"] == pytest.approx(5.5)  # conv2d and dict.items, not a wait
    assert a["disseg_kernels (ops, glue, references)"] == pytest.approx(2.0)
    assert a["triton"] == pytest.approx(3.0) and a["models"] == pytest.approx(0.5)
    assert list(a)[0].startswith("wait")  # largest first
    assert [f["name"] for f in h["top"]][:2] == ["<built-in method torch._C._cuda_synchronize>",
                                                  "<built-in method torch.conv2d>"]
    assert h["top"][2]["name"] == "triton/runtime/jit.py:1167(__call__)" and h["top"][2]["calls"] == 10


def test_host_profile_rows_and_file(tmp_path):
    """--host-profile on the CPU, in this process: each case's row gets its free-running step
    time and areas, the graph modes none; the markdown lists both cases."""
    rows = bm.run_group(2, ["plain", "fused"], encoder="resnet18", batch=1, size=32, warmup=0, steps=1,
                        device="cpu", host_profile=1)
    for r in rows:
        h = r["host"]
        assert h["free_ms"] > 0 and h["profiled_ms"] > 0 and h["top"]
        assert sum(h["areas"].values()) == pytest.approx(h["profiled_ms"], rel=0.5)  # self times cover the step
    md = tmp_path / "models_cpu_x.md"
    path = bm.write_host_profile(rows, {"machine": "m", "date": "d", "torch": "t", "config": "c", "command": "x"}, md)
    text = path.read_text()
    assert "## stage 2, plain: free-running" in text and "## stage 2, fused: free-running" in text
