"""Backend choice for every op family, in one place.

Backends:
    "reference"  plain PyTorch (``disseg_kernels.reference``), any device, float64-capable
    "cpu"        the C++ kernels of ``csrc/*.cpp`` (``disseg_kernels._C``), CPU tensors
    "cuda"       the CUDA kernels of ``csrc/*.cu``, CUDA tensors
    "triton"     the Triton kernels of ``disseg_kernels/triton``, CUDA tensors, or CPU
                 tensors under ``TRITON_INTERPRET=1`` (how they are tested without a GPU)
    "auto"       the fastest backend available for the tensor's device

A requested backend that cannot run raises ``BackendUnavailable`` naming it and saying
why; only ``"auto"`` chooses, and it never chooses silently among failing options: it
falls back to the reference only when no fused backend exists for the device.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")

# Which backends each op family implements. An op family appears under one name in
# every folder: csrc/<name>.cpp, csrc/<name>_cuda.cu, disseg_kernels/triton/<name>.py,
# disseg_kernels/reference/<name>.py, tests/test_<name>.py, benchmarks/bench_<name>.py.
FAMILIES: dict[str, frozenset[str]] = {
    "dispersive": frozenset({"reference", "cpu", "cuda", "triton"}),
    "dispersive_rows": frozenset({"reference", "cpu", "triton"}),  # row statistics (distributed.py, bank.py)
    "window_attention": frozenset({"reference", "cpu", "cuda", "triton"}),
    "telu": frozenset({"reference", "cpu", "cuda", "triton"}),
    "gates": frozenset({"reference", "cpu", "cuda", "triton"}),
    "multiscale": frozenset({"reference", "cpu", "cuda", "triton"}),
}

# The C++ operator that proves a family's compiled kernels are present in _C.
_CPP_OPS: dict[str, str] = {
    "dispersive": "dispersive_fused",
    "dispersive_rows": "dispersive_row_stats",
    "window_attention": "window_attention_forward",
    "telu": "telu_fwd",
    "gates": "gates_pool_hw",
    "multiscale": "multiscale_fwd",
}

# Eager calls of the fused ops go through a torch.autograd.Function (1.3-1.8x less Python per
# forward+backward than a torch.library custom op with autograd); torch.compile traces the registered
# custom ops. DISSEG_EAGER_CUSTOM_OPS=1 sends eager calls through the custom ops as well (to
# compare the two, or to debug the ops' registrations). Read once, at import.
_EAGER_CUSTOM_OPS = os.environ.get("DISSEG_EAGER_CUSTOM_OPS", "0") == "1"


def use_custom_op() -> bool:
    """True where a fused op must be called as its registered custom op: under
    torch.compile (one opaque node, no graph break), or always with DISSEG_EAGER_CUSTOM_OPS=1."""
    return _EAGER_CUSTOM_OPS or torch.compiler.is_compiling()


# Preference order of "auto": per device type, then per (device type, family) where a
# family's measurements say otherwise. On CUDA the families whose ops a model calls many
# times per step at small sizes (TeLU, the gates, the multi-scale concat) put their CUDA
# kernels first: they launch from C++, a few µs of host time per call against Triton's
# Python launcher (H200, 2026-11-27: 13 against 19 µs per launch, 16.6 against 35.2 µs per
# no-grad TeLU call), and the fused Stage II step is host-bound. That day, free-running
# training steps (ResNet-50, batch 8, 256x256): plain 222 ms, fused Triton first 215 ms,
# fused with every family's CUDA kernels first 140 ms; these families' CUDA parity tests
# passed there. Window attention and the dispersive loss stay Triton first: a few calls per
# step, and their Triton kernels take less device time (WA backward 3.5 vs 6.6 ms).
# DISSEG_AUTO_ORDER_CUDA="cuda,triton" (read at import) or ``auto_order("cuda", ...)``
# overrides both for every family of that device type.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}
_FAMILY_AUTO_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    ("cuda", "telu"): ("cuda", "triton"),
    ("cuda", "gates"): ("cuda", "triton"),
    ("cuda", "multiscale"): ("cuda", "triton"),
}
# Inside ``captured_auto_order()``: code recorded once into a CUDA graph and replayed, where
# the host's cost is paid only at capture and the device time decides. There the Triton
# kernels are first for every family (H200, 2026-11-27: the captured Stage II step 79 ms
# Triton first against 86 ms CUDA first; CBAT 8x64x128x128 kernels 0.32 against 1.15 ms).
_CAPTURED_AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cuda")}
_AUTO_OVERRIDE: dict[str, tuple[str, ...]] = {}
_CAPTURED = [0]  # depth of captured_auto_order() blocks


def _parse_order(text: str, source: str) -> tuple[str, ...]:
    order = tuple(b.strip() for b in text.split(",") if b.strip())
    bad = [b for b in order if b not in BACKENDS[1:]]
    if bad or not order:
        raise ValueError(f"{source} must list backends among {BACKENDS[1:]}, got {text!r}")
    return order


if os.environ.get("DISSEG_AUTO_ORDER_CUDA"):
    _AUTO_OVERRIDE["cuda"] = _parse_order(os.environ["DISSEG_AUTO_ORDER_CUDA"], "DISSEG_AUTO_ORDER_CUDA")


def auto_order_for(family: str, device_type: str) -> tuple[str, ...]:
    """The backends "auto" tries, in order, for ``family`` on ``device_type``."""
    return (_AUTO_OVERRIDE.get(device_type)
            or (_CAPTURED_AUTO_ORDER.get(device_type) if _CAPTURED[0] else None)
            or _FAMILY_AUTO_ORDER.get((device_type, family))
            or _AUTO_ORDER.get(device_type, ()))


@contextlib.contextmanager
def captured_auto_order():
    """Within the block, ``backend="auto"`` chooses for code that is captured into a CUDA
    graph and replayed (its warm-up and its capture both belong inside): by device time
    alone, since the replay has no host cost per launch (``_CAPTURED_AUTO_ORDER``). An
    explicit order (``auto_order``, DISSEG_AUTO_ORDER_CUDA) still wins."""
    _CAPTURED[0] += 1
    try:
        yield
    finally:
        _CAPTURED[0] -= 1


@contextlib.contextmanager
def auto_order(device_type: str, order):
    """Within the block, ``backend="auto"`` on ``device_type`` tries ``order`` (backend
    names, first available wins; the reference when none is) for every family. Restored on
    exit."""
    if device_type not in _AUTO_ORDER:
        raise ValueError(f"device_type must be one of {tuple(_AUTO_ORDER)}, got {device_type!r}")
    new = _parse_order(",".join(order) if not isinstance(order, str) else order, "order")
    old = _AUTO_OVERRIDE.get(device_type)
    _AUTO_OVERRIDE[device_type] = new
    try:
        yield
    finally:
        if old is None:
            _AUTO_OVERRIDE.pop(device_type, None)
        else:
            _AUTO_OVERRIDE[device_type] = old


class BackendUnavailable(RuntimeError):
    """A backend was requested by name and cannot run; the message says why."""


def _load_extension() -> str | None:
    """None when the compiled library ``disseg_kernels/_C*.so`` loads, else why it does not.

    The library holds only torch operators (``TORCH_LIBRARY_FRAGMENT(disseg, ...)`` in each
    csrc file) and no Python module: it is loaded with ``torch.ops.load_library``, so it
    builds without Python's headers (images without python3-dev) and does not depend on
    the Python version it was built with.
    """
    try:
        spec = importlib.util.find_spec("disseg_kernels._C")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        return (
            "the C++ extension disseg_kernels._C is not built; "
            "build it with `pip install --no-build-isolation -e .`"
        )
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, RuntimeError) as exc:  # built against another torch, or a broken build
        return (
            f"the C++ extension {spec.origin} does not load ({exc}); rebuild it with "
            "`pip install --no-build-isolation -e .`"
        )
    return None


def _probe_cpp_kernel(family: str, dispatch_key: str) -> str | None:
    if _EXTENSION_ERROR:
        return _EXTENSION_ERROR
    op = _CPP_OPS.get(family)
    if op is None or not hasattr(torch.ops.disseg, op):
        return f"the extension has no compiled kernel for '{family}'"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"disseg::{op}", dispatch_key):
        if dispatch_key == "CUDA":
            return (
                "the extension was built without its CUDA kernels (no nvcc or no CUDA "
                "build of torch at build time, or DISSEG_SKIP_CUDA_BUILD was set)"
            )
        return f"the extension has no {dispatch_key} kernel for '{family}'"
    return None


# Probed once, at import: resolve() then only reads these tables, so torch.compile traces
# it as plain Python (no dispatcher queries, no graph break).
_EXTENSION_ERROR = _load_extension()
_CPP_ERRORS = {(fam, key): _probe_cpp_kernel(fam, key) for fam in FAMILIES for key in ("CPU", "CUDA")}
_TRITON_ERROR = None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def extension_error() -> str | None:
    """None when ``disseg_kernels._C`` loaded, else why it did not."""
    return _EXTENSION_ERROR


def _cpp_kernel_error(family: str, dispatch_key: str) -> str | None:
    return _CPP_ERRORS[(family, dispatch_key)]


def triton_interpret() -> bool:
    # Read per call (only CPU tensors ask): Triton binds the mode when it decorates a kernel,
    # and a benchmark may set the variable after this module is imported but before our
    # Triton modules (and their kernels) are.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_import_error() -> str | None:
    return _TRITON_ERROR


def unavailable_reason(family: str, backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run ``family`` on ``device``, else the reason it cannot."""
    implemented = FAMILIES[family]
    if backend not in implemented:
        return f"'{family}' has no {backend} implementation (it has: {', '.join(sorted(implemented))})"
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors and the input is on {device}"
        return _cpp_kernel_error(family, "CPU")
    if backend == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors and the input is on {device}"
        return _cpp_kernel_error(family, "CUDA")
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return None
        return (
            f"Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), "
            f"and the input is on {device}"
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# Kernels that compute in float32 whatever their input: a float64 input goes elsewhere.
FLOAT32_ONLY = {("telu", "triton"), ("gates", "triton"), ("multiscale", "triton")}


def resolve(family: str, backend: str, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend that will run ``family`` on ``device`` (never "auto"), for inputs of
    ``dtype`` when given ("auto" passes over a float32-only kernel for float64 inputs).

    Raises ``ValueError`` for an unknown name and ``BackendUnavailable`` for a named
    backend that cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    device = torch.device(device)
    float64 = dtype == torch.float64
    if backend != "auto":
        reason = unavailable_reason(family, backend, device)
        if reason is None and float64 and (family, backend) in FLOAT32_ONLY:
            reason = "its kernels compute in float32; float64 inputs run on 'cpu', 'cuda' or 'reference'"
        if reason:
            raise BackendUnavailable(f"backend={backend!r} cannot run '{family}': {reason}")
        return backend
    for candidate in auto_order_for(family, device.type):
        if float64 and (family, candidate) in FLOAT32_ONLY:
            continue
        if candidate in FAMILIES[family] and unavailable_reason(family, candidate, device) is None:
            return candidate
    return "reference"


def available_backends(family: str, device: torch.device | str) -> list[str]:
    """Every backend (auto excluded) that can run ``family`` on ``device``; none for a CUDA
    device on a machine without one (``resolve`` need not ask: a CUDA tensor proves one)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    return [b for b in BACKENDS[1:] if b in FAMILIES[family] and unavailable_reason(family, b, device) is None]
