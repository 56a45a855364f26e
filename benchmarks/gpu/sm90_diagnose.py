"""Where the Gluon sm90 row kernel goes wrong, if it does (run on a Hopper GPU).

    python benchmarks/gpu/sm90_diagnose.py

The kernel (``disseg_kernels/triton/dispersive_sm90.py``) has never run on a GPU when this
is written. Its GPU test says pass or fail; this says where: for a few small shapes it
runs the real launch and, on the same inputs, ``tests/sm90_schedule.py``'s step-by-step
model of its schedule (float32, weights rounded to bf16 as the kernel does), and compares
the raw outputs per split and row: the row maximum m, the row sum s and the gradient
bracket. One line per shape and array: the largest relative difference and where it is
(split, row, row block of 64, column), and how many rows differ by more than 1e-3. A wrong
TMA coordinate shows as whole row blocks or column tiles off; a wrong barrier phase as
rows off from the fifth column tile on (four slots); a wrong weight layout as every row
off in the bracket but not in m and s.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from disseg_kernels.triton import dispersive as tdisp  # noqa: E402
from disseg_kernels.triton import dispersive_sm90  # noqa: E402
from sm90_schedule import launch_model  # noqa: E402

SHAPES = [  # (N, D, splits, variant, include_diagonal)
    (65, 16, 1, 0, False),  # two column tiles, the second of one column
    (300, 40, 1, 0, False),  # D not a power of two: TMA's zero-filled columns
    (600, 128, 1, 1, True),  # ten tiles: every slot reused twice (barrier phases)
    (540, 128, 4, 0, False),  # splits, one-tile tail folded
]


def compare(name: str, got: torch.Tensor, want: torch.Tensor, n: int) -> bool:
    got, want = got.float().cpu(), want.float().cpu()
    scale = want.abs().max().clamp_min(1e-30)
    diff = (got - want).abs() / scale
    if not torch.isfinite(got).all():
        bad = (~torch.isfinite(got)).nonzero()[0].tolist()
        print(f"  {name}: non-finite values, first at index {bad}")
        return False
    worst = int(diff.argmax())
    idx = list(torch.unravel_index(torch.tensor(worst), diff.shape))
    rows_bad = (diff.reshape(diff.shape[0], n, -1).amax(-1) > 1e-3).sum().item() if diff.dim() >= 2 else 0
    where = f"split {int(idx[0])}, row {int(idx[1])} (row block {int(idx[1]) // 64})"
    if len(idx) == 3:
        where += f", column {int(idx[2])}"
    ok = float(diff.max()) <= 1e-3
    print(f"  {name}: max rel diff {float(diff.max()):.2e} at {where}; rows off by > 1e-3: {rows_bad}"
          f" {'ok' if ok else 'WRONG'}")
    return ok


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    real_launch = dispersive_sm90.launch
    all_ok = True
    for n, d, splits, variant, include in SHAPES:
        g = torch.Generator().manual_seed(n + d)
        z = (torch.randn(n, d, generator=g) * 2.0 / d**0.5).to(torch.bfloat16).cuda()
        seen = {}

        def launch(zz, sqn, out, m_out, s_out, *rest):
            real_launch(zz, sqn, out, m_out, s_out, *rest)
            torch.cuda.synchronize()
            seen["got"] = (m_out.clone(), s_out.clone(), out.clone())
            mo, so, oo = torch.empty_like(m_out), torch.empty_like(s_out), torch.empty_like(out)
            launch_model(zz, sqn, oo, mo, so, *rest)
            seen["want"] = (mo, so, oo)

        dispersive_sm90.launch = launch
        try:
            tdisp.dispersive_fused_triton(z, variant, 0.5, 1.0, include, False, True, _path="rows", _splits=splits,
                                          _kernel="sm90")
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"N={n} D={d} splits={splits} variant={variant} include={include}: "
                  f"{type(exc).__name__}: {str(exc)[:300]}")
            all_ok = False
            continue
        finally:
            dispersive_sm90.launch = real_launch
        print(f"N={n} D={d} splits={splits} variant={variant} include={include}:")
        for name, got, want in zip(("row max m", "row sum s", "bracket"), seen["got"], seen["want"]):
            all_ok &= compare(name, got, want, n)
    print("sm90 diagnosis:", "all outputs match the model" if all_ok else "MISMATCH (see above)")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
