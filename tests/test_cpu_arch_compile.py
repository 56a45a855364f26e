"""Every csrc/*.cpp with a branch on the vector width (at::vec, cpu_lanes.h, intrinsics)
compiles for the CPUs this machine is not: AVX2 (x86-64-v3, most users' desktops and
AMD Zen 1-3 servers) and plain x86-64 (no -march).

Protects: the build uses -march=native (setup.py, DISSEG_CPU_ARCH), so on this AVX-512 host
only the AVX-512 branches of the kernels (`#ifdef __AVX512F__`, at::vec's widths, the
half-type float lanes of csrc/cpu_lanes.h) are ever compiled; an AVX2 or scalar branch that
does not compile would first fail at a user's `pip install`. A syntax-only compile (-fsyntax-only:
every template the file instantiates is checked, no code generated), about 8 s a file.
The kernels built for x86-64-v3 and for no -march passed the CPU tests on 2026-11-28
(README, build switches).
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import platform
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH_MARKERS = ("cpu_vec.h", "cpu_lanes.h", "__AVX", "immintrin")  # a branch on the target's vector width


def _has_arch_branches(path: str) -> bool:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return any(m in text for m in ARCH_MARKERS)


CPP_SOURCES = [s for s in sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))) if _has_arch_branches(s)]
ARCHES = ["x86-64-v3", "x86-64"]
CXX = shutil.which(os.environ.get("CXX", "c++"))

pytestmark = [
    pytest.mark.skipif(platform.machine() not in {"x86_64", "AMD64"}, reason="x86-64 -march values"),
    pytest.mark.skipif(CXX is None, reason="no C++ compiler (c++ / $CXX)"),
]


def _syntax_check(src: str, arch: str) -> subprocess.CompletedProcess:
    from torch.utils.cpp_extension import include_paths

    cmd = [CXX, "-fsyntax-only", "-std=c++17", "-fopenmp", "-O0", "-w", f"-march={arch}",
           "-DAT_PARALLEL_OPENMP=1", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
           "-D_GLIBCXX_USE_CXX11_ABI=1", src]
    cmd += [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not CPP_SOURCES, reason="no csrc/*.cpp sources")
def test_every_cpp_source_compiles_for_avx2_and_plain_x86_64():
    jobs = [(src, arch) for arch in ARCHES for src in CPP_SOURCES]
    with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        results = dict(zip(jobs, pool.map(lambda job: _syntax_check(*job), jobs)))
    failed = {f"{os.path.basename(s)} -march={a}": r for (s, a), r in results.items() if r.returncode != 0}
    report = "\n\n".join(f"== {name} ==\n{r.stderr[-4000:]}" for name, r in failed.items())
    assert not failed, f"compile failed: {sorted(failed)}\n{report}"
