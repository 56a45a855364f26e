"""Every csrc/*.cu compiles with nvcc, wherever nvcc exists (GPU or not).

Protects: a CUDA source that does not compile would otherwise only fail on a GPU machine,
at `pip install` time. Here torch may be a CPU build: its headers lack the generated
c10/cuda/impl/cuda_cmake_macros.h, so the test writes a stub for it in a temporary include
directory, and compiles each file to an object (-c, one arch, no linking). Sources must
therefore include only ATen / <torch/library.h>, <cuda_runtime.h> and c10/cuda headers
(c10/cuda/CUDAStream.h, c10/cuda/CUDAGuard.h), not ATen/cuda/CUDAContext.h (it needs the
cuBLAS headers, absent on a machine without the CUDA math libraries).
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
ARCH = os.environ.get("DISSEG_TEST_CUDA_ARCH", "90")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = os.path.join(home, "bin", "nvcc")
    return candidate if os.access(candidate, os.X_OK) else None


NVCC = _nvcc()

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")


@pytest.fixture(scope="module")
def include_flags(tmp_path_factory):
    from torch.utils.cpp_extension import include_paths

    stub_root = tmp_path_factory.mktemp("cuda_stub_include")
    torch_inc = include_paths()[0]
    generated = os.path.join(torch_inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not os.path.exists(generated):  # CPU build of torch: stub the generated header
        stub = stub_root / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n// stub for compile checks\n")
    flags = [f"-I{stub_root}"]
    flags += [f"-I{p}" for p in include_paths()]
    flags += [f"-I{sysconfig.get_paths()['include']}"]
    return flags


def _compile(src: str, flags: list[str], out_dir: str) -> subprocess.CompletedProcess:
    obj = os.path.join(out_dir, os.path.basename(src) + ".o")
    cmd = [
        NVCC, "-c", src, "-o", obj,
        "-std=c++17", f"-gencode=arch=compute_{ARCH},code=sm_{ARCH}",
        "-O0", "--expt-relaxed-constexpr", "-DDISSEG_WITH_CUDA=1",
        "-D_GLIBCXX_USE_CXX11_ABI=1", "-DTORCH_EXTENSION_NAME=_C",
        "-Xcompiler", "-fPIC", "-w",
    ] + flags
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # ~35 s on a quiet machine; minutes on a loaded 2-core one


@pytest.mark.skipif(not CU_SOURCES, reason="no csrc/*.cu sources")
def test_every_cu_source_compiles(include_flags, tmp_path):
    """nvcc -c of every csrc/*.cu (in parallel, one arch) succeeds."""
    workers = max(1, min(len(CU_SOURCES), (os.cpu_count() or 1)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = dict(zip(CU_SOURCES, pool.map(lambda s: _compile(s, include_flags, str(tmp_path)), CU_SOURCES)))
    failed = {os.path.basename(s): r for s, r in results.items() if r.returncode != 0}
    report = "\n\n".join(f"== {name} ==\n{r.stderr[-4000:]}" for name, r in failed.items())
    assert not failed, f"nvcc failed on {sorted(failed)}:\n{report}"


if __name__ == "__main__":  # python tests/test_cuda_compile.py: run the check alone
    sys.exit(pytest.main([__file__, "-q"]))


def test_sources_compile_to_distinct_objects():
    """setup.py hands csrc/*.cpp and csrc/*.cu to one torch extension, whose ninja build names
    each object after its source's stem: csrc/gates.cpp and csrc/gates.cu would both be
    gates.o, and ninja refuses the build ("multiple rules generate .../gates.o"). That is
    how the extension failed to build on the H200 on 2026-11-27 while this CPU-only build
    (no .cu files) passed. Protects: every family's CUDA file is csrc/<family>_cuda.cu,
    beside csrc/<family>.cpp, and no two sources share a stem."""
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))) + CU_SOURCES
    stems = [os.path.splitext(os.path.basename(p))[0] for p in sources]
    assert len(stems) == len(set(stems)), sorted(s for s in stems if stems.count(s) > 1)
    for cu in CU_SOURCES:
        name = os.path.basename(cu)
        assert name.endswith("_cuda.cu"), f"{name}: name CUDA sources csrc/<family>_cuda.cu"
        family = name[: -len("_cuda.cu")]
        assert os.path.exists(os.path.join(ROOT, "csrc", family + ".cpp")), f"{name}: no csrc/{family}.cpp"
