"""Build disseg-kernels: the C++ CPU kernels always, the CUDA kernels when possible.

Install (torch must already be installed; the build imports it):

    pip install torch==2.13.0            # or your CUDA build of torch
    pip install ninja                    # parallel compiles (else one file at a time)
    pip install --no-build-isolation -e .

Build switches (environment variables, in the manner of flash-attention's setup.py):

    DISSEG_SKIP_CUDA_BUILD=TRUE   never build the CUDA kernels, even with nvcc and CUDA torch
    DISSEG_FORCE_CUDA_BUILD=TRUE  build the CUDA kernels even if torch.cuda.is_available()
                                  is False (a CUDA torch on a machine without a GPU)
    DISSEG_CUDA_ARCHS="80;90"     compute capabilities to compile for (default "80;90")
    MAX_JOBS=N                    parallel compile jobs (default: bounded by cores and by
                                  memory, about 3 GB per job for the CUDA files)
    DISSEG_DEBUG=1                -O0 -g instead of -O3
    DISSEG_CPU_ARCH=native        x86-64: the C++ kernels' -march (default native: the
                                  build machine's vector width, e.g. AVX-512). A build
                                  that runs on other CPUs too: x86-64-v3 (AVX2 + FMA),
                                  x86-64-v4 (AVX-512), or none (no -march: SSE2 only)
"""

import glob
import os
import platform
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import (
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
    is_ninja_available,
)

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "TRUE", "YES", "ON"}


def _bounded_max_jobs() -> str:
    """Parallel compile jobs: at most the cores, and about one job per 3 GB of memory."""
    if "MAX_JOBS" in os.environ:
        return os.environ["MAX_JOBS"]
    cores = os.cpu_count() or 1
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        by_memory = max(1, int(pages / (3 * 1024**3)))
    except (ValueError, OSError, AttributeError):
        by_memory = cores
    return str(max(1, min(cores, by_memory)))


os.environ["MAX_JOBS"] = _bounded_max_jobs()

debug = _flag("DISSEG_DEBUG")
cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
cxx_flags += ["-std=c++17", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"]
cpu_arch = os.environ.get("DISSEG_CPU_ARCH", "native").strip() or "native"
if not all(ch.isalnum() or ch in "-_." for ch in cpu_arch):
    sys.exit(f"setup.py: DISSEG_CPU_ARCH must be a -march value such as native, x86-64-v3 or none; got {cpu_arch!r}")
if platform.machine() in {"x86_64", "AMD64"}:
    # Let the compiler vectorise the fused loops for the CPU it is built on (AVX-512
    # where present) or the one named; at::vec::Vectorized picks its width from these flags.
    cxx_flags += ["-ffp-contract=fast"] + ([] if cpu_arch == "none" else [f"-march={cpu_arch}"])
link_flags = ["-fopenmp"]

cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))

want_cuda = not _flag("DISSEG_SKIP_CUDA_BUILD") and bool(cuda_sources)
have_cuda = CUDA_HOME is not None and torch.version.cuda is not None
build_cuda = want_cuda and have_cuda and (torch.cuda.is_available() or _flag("DISSEG_FORCE_CUDA_BUILD"))

if not build_cuda:
    # Say why: pip shows it with -v, `python setup.py build_ext` always; at run time the
    # "cuda" backend's error says the extension was built without it.
    if not cuda_sources:
        why = "no csrc/*.cu"
    elif not want_cuda:
        why = "DISSEG_SKIP_CUDA_BUILD is set"
    elif torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU build"
    elif CUDA_HOME is None:
        why = "no CUDA toolkit (nvcc) found: set CUDA_HOME"
    else:
        why = "no GPU visible (DISSEG_FORCE_CUDA_BUILD=TRUE builds them anyway)"
    print(f"disseg-kernels: building the C++ CPU kernels only; CUDA kernels skipped: {why}", file=sys.stderr)
if not is_ninja_available():
    print("disseg-kernels: ninja not found: the extension compiles one file at a time and MAX_JOBS has no "
          "effect (pip install ninja)", file=sys.stderr)

if build_cuda:
    archs = os.environ.get("DISSEG_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    gencode = []
    for arch in filter(None, (a.strip() for a in archs)):
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    nvcc_flags = (["-O0", "-g", "-G"] if debug else ["-O3"]) + [
        "-std=c++17",
        "--use_fast_math",
        "--expt-relaxed-constexpr",
        "-lineinfo",
        "-DDISSEG_WITH_CUDA=1",
    ] + gencode
    ext = CUDAExtension(
        name="disseg_kernels._C",
        sources=cpp_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags + ["-DDISSEG_WITH_CUDA=1"], "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension(
        name="disseg_kernels._C",
        sources=cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

setup(
    name="disseg-kernels",
    version="0.1.0",
    description="Fused Triton, CUDA and C++ kernels for Med-DisSeg, with the model and trainer",
    packages=find_packages(include=["disseg_kernels", "disseg_kernels.*", "models", "models.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is not listed on purpose: an unpinned torch requirement makes pip download
        # a multi-GB CUDA build. Install the torch you want first (see the README).
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton"],
        "plot": ["matplotlib"],
        "test": ["pytest", "pytest-benchmark", "matplotlib"],
    },
    entry_points={"console_scripts": ["disseg=models.cli:main"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
