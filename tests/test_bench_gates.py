"""benchmarks/bench_gates.py's per-kernel table (--kernels), on the CPU: the profiler's
kernels arrive here as a name -> [ms, launches] dict, as the GPU run would fill it.
Protects: the slowest kernel first, its share of the op's floor computed from the minimum
bytes at the copy bandwidth, and the markdown file the GPU script brings back."""

import argparse

import pytest

from benchmarks import bench_gates as bg


def test_kernel_table_orders_and_scales(tmp_path, capsys):
    floor_bytes, gbps = 436e6, 4260.0  # CBAT 8x64x128x128: 13 maps; the H200's measured copy rate
    floor_ms = floor_bytes / (gbps * 1e9) * 1e3
    rows = bg._kernel_table("cbat", "8x64x128x128", "fused",
                            {"_pool_hw_kernel": [0.020, 2.0], "_grad_x_kernel": [0.060, 1.0]}, floor_bytes, gbps)
    assert [r["kernel"] for r in rows] == ["_grad_x_kernel", "_pool_hw_kernel"]
    assert rows[0]["x_floor"] == pytest.approx(0.060 / floor_ms)
    assert rows[1]["launches"] == 2.0
    assert "_grad_x_kernel" in capsys.readouterr().out
    args = argparse.Namespace(out=str(tmp_path), dtype="float32", channels_last=False, tag="")
    bg._write_kernels(rows, args, "cuda", "2026-11-27", "NVIDIA H200")
    text = (tmp_path / "gates_kernels_cuda_2026-11-27.md").read_text()
    assert "| cbat | 8x64x128x128 | fused | `_grad_x_kernel` | 0.0600 | 1 | " in text


def test_launch_cost_needs_a_gpu():
    """bench_host_overhead --launch-cost times real launches: on the CPU it says so and stops
    before it stubs anything."""
    from benchmarks import bench_host_overhead as bho

    with pytest.raises(SystemExit, match="--launch-cost: needs --device cuda"):
        bho.main(["--launch-cost"])


def test_count_launches_counts_the_compiled_path():
    """--count-launches (no GPU): the device operations one fused fwd and bwd issue on the
    Triton path, counted in a process without TRITON_INTERPRET (under the interpreter it
    refuses: it found no compiled-mode kernels to stub and counted 0 Triton launches, as
    it silently did before 2026-11-27). ELAT: the forward's one pass over x (H·W pool and
    stencil), the pool's combine, the channel MLP and the apply; CBAT: 37 at C = 64."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_gates", "--count-launches", "--ops", "elat,cbat",
                        "--sizes", "elat:8x64x64x64,cbat:8x64x64x64"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "elat  8x64x64x64: fwd 4 Triton + 12 ATen, bwd 5 Triton + 18 ATen, total 39" in r.stdout, r.stdout
    assert "cbat  8x64x64x64: fwd 13 Triton + 0 ATen, bwd 13 Triton + 11 ATen, total 37" in r.stdout, r.stdout
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_gates", "--count-launches", "--ops", "elat"], cwd=root,
                       env={**env, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--count-launches: unset TRITON_INTERPRET" in r.stderr
