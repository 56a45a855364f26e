"""Shared test set-up.

Without a GPU, Triton kernels run under the interpreter on CPU tensors: the variable must
be set before triton is first imported, so it is set here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """The trainer sets process-wide switches (thread count, --deterministic's
    use_deterministic_algorithms and cuDNN flags). Every test gets them back as they were:
    on an H200 on 2026-11-27 a trainer test left deterministic mode on, and eight gate tests
    after it failed in adaptive_max_pool2d's backward, which has no deterministic CUDA kernel."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn
    flags = (cudnn.benchmark, cudnn.deterministic)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)
    cudnn.benchmark, cudnn.deterministic = flags


def pytest_configure(config):
    # The Triton interpreter evaluates both sides of tl.where with numpy, so a kernel that
    # selects away rsqrt(0) or inf - inf (never used: the other side is taken) makes numpy
    # warn. On a GPU these lanes are equally discarded; the warnings carry no information.
    for message in ("invalid value encountered", "divide by zero encountered", "overflow encountered"):
        config.addinivalue_line("filterwarnings", f"ignore:{message}:RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True, scope="session")
def _system_malloc_in_this_process():
    """The trainer's --cpu-malloc cache changes glibc's malloc for the whole process, for
    good; the tests that run the trainer in this process must not leave the rest of the
    suite (gigabyte-sized dispersive tests among them) on it. Its effect is tested in a
    subprocess (test_trainer.py::test_cpu_malloc_cache_reuses_freed_pages)."""
    from models import trainer

    real = trainer.keep_freed_memory
    trainer.keep_freed_memory = lambda: "freed-memory cache not applied inside the test process"
    yield
    trainer.keep_freed_memory = real


@pytest.fixture
def _no_tf32(monkeypatch):
    """Convolutions and matmuls in true float32 on a GPU: with TF32 (cuDNN's default) their
    10-bit products would set the error of a float32 parity test, not the code under test."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The embedded synthetic dataset, small (12 training and 4 validation images of 48²),
    made once per test module, for the trainer's tests (test_ddp.py keeps its own)."""
    from models.synthetic import generate

    root = tmp_path_factory.mktemp("tiny") / "data"
    generate(str(root), n_train=12, n_val=4, n_test=0, size=48, seed=0)
    return str(root)
