"""The SIMT emulator's source rewrite (tests/cuda_emulation/build.py) still covers every
csrc/*.cu: each kernel launch becomes an ``emu::launch``, each ``extern __shared__``
array a per-block buffer, and every schema of the family's .cpp is re-registered.

Protects the harness that checks the CUDA kernels without a GPU (the check_*.py scripts,
1–4 minutes each, not run here): a new launch form or schema layout it cannot parse would
otherwise surface only when someone next runs them.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("disseg_cuda_emulation_build", os.path.join(ROOT, "tests", "cuda_emulation", "build.py"))
emu_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emu_build)

FAMILIES = sorted(os.path.basename(p)[: -len("_cuda.cu")] for p in glob.glob(os.path.join(ROOT, "csrc", "*_cuda.cu")))


def test_every_cu_family_has_an_emulator_check():
    assert set(FAMILIES) == set(emu_build.FAMILIES), (FAMILIES, emu_build.FAMILIES)
    for fam in FAMILIES:
        assert os.path.exists(os.path.join(ROOT, "tests", "cuda_emulation", f"check_{fam}.py")), fam


@pytest.mark.parametrize("family", FAMILIES)
def test_emulator_rewrite_covers_the_source(family):
    cu = open(os.path.join(ROOT, "csrc", family + "_cuda.cu")).read()
    cpp = open(os.path.join(ROOT, "csrc", family + ".cpp")).read()
    defs = re.findall(r'm\.def\(\s*(?:"[^"]*"\s*)+\);', cpp)
    n_schemas = len(re.findall(r"m\.def\(", cpp))
    assert len(defs) == n_schemas >= 1, f"{family}.cpp: {len(defs)} of {n_schemas} m.def schemas parsed"
    out = emu_build.transform(cu, defs)
    n_launches = len(re.findall(r"<<<", cu))
    assert "<<<" not in out and out.count("emu::launch(") == n_launches >= 1, family
    assert "extern __shared__" not in out, family
    assert "TORCH_LIBRARY_IMPL(disseg_emu, CPU, m)" in out and "TORCH_LIBRARY_IMPL(disseg, CUDA" not in out, family
    assert "#include <c10/cuda/" not in out and ".is_cuda()" not in out, family
