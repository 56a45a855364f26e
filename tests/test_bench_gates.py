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
