"""The dispersive loss: public API, the ``disseg::dispersive`` custom op and its autograd.

The loss is a scalar, so every fused kernel returns the loss and dL/dz together from one
call (the gradient is computed while the tiles are hot, never from an N×N buffer); the
backward pass only scales that gradient by grad_output. The custom op is registered with
``torch.library`` (schema, fake implementation, autograd), so ``torch.compile`` sees one
opaque node and ``opcheck`` passes.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _backend
from ..reference.dispersive import DIAGONALS, VARIANTS, dispersive_loss_reference, zero_loss
from ._autograd import error_on_differentiation, saved_grad_dtype, scale_saved_grad

# The integer codes the compiled kernels use for the variants (csrc/dispersive.cpp,
# csrc/dispersive_cuda.cu and triton/dispersive.py share them).
VARIANT_CODES = {name: code for code, name in enumerate(VARIANTS)}

_HALF = (torch.float16, torch.bfloat16)
_DTYPES = (torch.float64, torch.float32) + _HALF


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


# The reference path's peak, in N×N matrices of at least float32 (the distances, the
# off-diagonal copy, the scaled logits, and the backward's gradient of them: measured 4-6
# at N = 4096). A lower bound: a call needing more than the device's whole memory is refused.
_REFERENCE_NN_MATRICES = 4


def _device_memory_bytes(device: torch.device) -> int | None:
    """Physical memory of a CPU (Linux) or a CUDA device, None where unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            import os

            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return None


def check_reference_fits(z: torch.Tensor, variant: str) -> None:
    """MemoryError, before any allocation, when the reference's N×N matrices cannot fit the
    device's memory at all (at N = 131,072 they need 275 GB): the alternative is the
    operating system's OOM killer ending the process with no message."""
    n = z.shape[0]
    if torch.compiler.is_compiling() or n < 2:  # under torch.compile: not checked (eager is)
        return
    itemsize = max(4, z.element_size())
    need = _REFERENCE_NN_MATRICES * n * n * itemsize
    have = _device_memory_bytes(z.device)
    if have is not None and need > have:
        raise MemoryError(
            f"dispersive_loss(backend='reference', variant={variant!r}) builds N×N matrices: N = {n} needs at "
            f"least {need / 1e9:.3g} GB ({_REFERENCE_NN_MATRICES}·N² values of {itemsize} bytes), more than "
            f"this {z.device.type} device's {have / 1e9:.3g} GB; the fused backends (backend='auto') never "
            f"build an N×N buffer"
        )


def _run_kernel(backend, z, variant, tau, margin, include_diagonal, scale_by_dim, need_grad):
    code = VARIANT_CODES[variant]
    if backend in ("cpu", "cuda"):
        return torch.ops.disseg.dispersive_fused(
            z, code, tau, margin, include_diagonal, scale_by_dim, need_grad
        )
    if backend == "triton":
        from ..triton.dispersive import dispersive_fused_triton

        return dispersive_fused_triton(z, code, tau, margin, include_diagonal, scale_by_dim, need_grad)
    raise ValueError(f"no fused kernel for backend {backend!r}")


@torch.library.custom_op("disseg::dispersive", mutates_args=())
def _dispersive_op(
    z: torch.Tensor,
    variant: str,
    tau: float,
    margin: float,
    include_diagonal: bool,
    scale_by_dim: bool,
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, dL/dz) of a contiguous (N, D) z; dL/dz (float32 for float16 z:
    ``saved_grad_dtype``) is empty when ``need_grad`` is False."""
    loss, grad = _run_kernel(backend, z, variant, tau, margin, include_diagonal, scale_by_dim, need_grad)
    return loss, grad


@_dispersive_op.register_fake
def _(z, variant, tau, margin, include_diagonal, scale_by_dim, need_grad, backend):
    loss = z.new_empty((), dtype=_loss_dtype(z.dtype))
    grad = torch.empty_like(z, dtype=saved_grad_dtype(z.dtype)) if need_grad else z.new_empty((0,))
    return loss, grad


def _setup_context(ctx, inputs, output):
    # the loss (0-d) too: under create_graph it anchors the no-double-backward error to z
    ctx.save_for_backward(output[1], output[0])
    ctx.z_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(output[1])  # dL/dz is a value here, not a graph
    ctx.set_materialize_grads(False)  # no N x D zeros for that output's (absent) gradient


def _backward(ctx, grad_loss, _grad_of_grad):
    if grad_loss is None:
        return (None,) * 8
    grad, loss = ctx.saved_tensors
    if grad.numel() == 0:
        raise RuntimeError(
            "dispersive_loss was computed without its gradient (z did not require grad "
            "or grad mode was off) and cannot be differentiated"
        )
    dz = scale_saved_grad(grad, grad_loss, ctx.z_dtype)
    if torch.is_grad_enabled():  # create_graph=True: a second derivative through dz would be 0, not d²L
        dz = error_on_differentiation(dz, "dispersive_loss", anchors=(loss,))
    return (dz, None, None, None, None, None, None, None)


_dispersive_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(z, variant, tau, margin, diagonal, scale_by_dim, check_finite):
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() < 2:
        raise ValueError(f"z must have shape (N, *) with at least 2 dimensions, got shape {tuple(z.shape)}")
    if z.dtype not in _DTYPES:
        raise TypeError(f"z must be a float64, float32, bfloat16 or float16 tensor, got dtype {z.dtype}"
                        + (" (cast float8 to bfloat16 first)" if z.dtype.is_floating_point else ""))
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    for name, value in (("tau", tau), ("margin", margin)):
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a Python or NumPy number, got a tensor (pass float({name}))")
        # 0 < value < inf (NaN fails it too), not math.isfinite: that breaks torch.compile
        # on a symbolic float (a τ that changes between calls)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if diagonal not in DIAGONALS:
        raise ValueError(f"diagonal must be one of {DIAGONALS}, got {diagonal!r}")
    for name, flag in (("scale_by_dim", scale_by_dim), ("check_finite", check_finite)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if scale_by_dim and math.prod(z.shape[1:]) == 0:
        raise ValueError(f"scale_by_dim=True divides every distance by D, and z of shape {tuple(z.shape)} has D = 0")
    if check_finite and not torch.isfinite(z).all():
        raise ValueError("z holds a non-finite value (NaN or inf); check_finite=True rejects it")


def dispersive_loss(
    z: torch.Tensor,
    variant: str = "infonce_l2",
    tau: float = 0.5,
    margin: float = 1.0,
    diagonal: str = "exclude",
    scale_by_dim: bool = False,
    backend: str = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """Dispersive loss of the rows of ``z`` (``shared/spec/dispersive.md``).

    Args:
        z: (N, *) hidden representations, flattened to Z ∈ R^{N×D}; float64, float32,
            bfloat16 or float16 (half types accumulate in float32); any strides.
        variant: ``"infonce_l2"`` (d = ‖z_i − z_j‖), ``"infonce_l2sq"`` (d = ‖z_i − z_j‖²),
            ``"infonce_cosine"`` (d = 1 − ẑ_i·ẑ_j), ``"hinge"`` (mean of max(0, ε − d)²)
            or ``"covariance"`` (Σ_{a≠b} C_ab² of the row-centred covariance, from the
            N×N Gram matrix, never the D×D one).
        tau: temperature τ > 0 of the InfoNCE variants: L = log mean_P exp(−d/τ),
            computed as a logsumexp.
        margin: ε > 0 of the hinge variant.
        diagonal: ``"exclude"`` (pairs i ≠ j, Med-DisSeg) or ``"include"`` (all N²).
        scale_by_dim: divide every distance by D.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.
        check_finite: reject NaN/inf in z (a device sync; off by default).

    Returns:
        A 0-d tensor: z's dtype, float32 for half inputs. N < 2 gives 0 with a zero
        gradient.
    """
    _validate(z, variant, tau, margin, diagonal, scale_by_dim, check_finite)
    chosen = _backend.resolve("dispersive", backend, z.device)
    if chosen == "reference":
        check_reference_fits(z, variant)
        return dispersive_loss_reference(z, variant, float(tau), float(margin), diagonal, scale_by_dim)
    n = z.shape[0]
    flat = z.reshape(n, math.prod(z.shape[1:]))  # explicit D: N = 0 reshapes too
    if n < 2:
        return zero_loss(flat).to(_loss_dtype(z.dtype))
    if flat.shape[1] == 0:
        # D = 0: every pair has the same distance (0; 1 for cosine), so the loss of any N is
        # that of two rows: the reference's (-1/τ for cosine, ε² for the hinge, 0 else)
        return dispersive_loss_reference(flat[:2], variant, float(tau), float(margin), diagonal, scale_by_dim)
    need_grad = torch.is_grad_enabled() and z.requires_grad
    loss, _ = _dispersive_op(
        flat.contiguous(),
        variant,
        float(tau),
        float(margin),
        diagonal == "include",
        scale_by_dim,
        need_grad,
        chosen,
    )
    return loss


class DispersiveLoss(torch.nn.Module):
    """Module form of :func:`dispersive_loss`, with the same options."""

    def __init__(
        self,
        variant: str = "infonce_l2",
        tau: float = 0.5,
        margin: float = 1.0,
        diagonal: str = "exclude",
        scale_by_dim: bool = False,
        backend: str = "auto",
        check_finite: bool = False,
    ):
        super().__init__()
        # Validate once here, with a dummy input, so a bad option fails at construction.
        _validate(torch.zeros(2, 1), variant, tau, margin, diagonal, scale_by_dim, check_finite)
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        self.variant, self.tau, self.margin = variant, float(tau), float(margin)
        self.diagonal, self.scale_by_dim, self.backend = diagonal, scale_by_dim, backend
        self.check_finite = check_finite

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return dispersive_loss(z, self.variant, self.tau, self.margin, self.diagonal, self.scale_by_dim, self.backend,
                               self.check_finite)

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant!r}, tau={self.tau}, margin={self.margin}, "
            f"diagonal={self.diagonal!r}, scale_by_dim={self.scale_by_dim}, backend={self.backend!r}"
            + (", check_finite=True" if self.check_finite else "")
        )
