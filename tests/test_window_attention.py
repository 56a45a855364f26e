"""Contrast-driven window attention (shared/spec/cdfa.md): the fused op against the
unfold / softmax / matmul / fold reference, and the CDFA block in both modes."""

from __future__ import annotations

import pytest
import torch

import disseg_kernels as dk
from disseg_kernels import _backend
from disseg_kernels.ops.window_attention import _window_attention_grad_op, _window_attention_op
from disseg_kernels.reference.window_attention import window_attention_direct, window_attention_reference


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

FUSED = [b for b in ("cpu", "triton", "cuda") if b in _backend.FAMILIES["window_attention"]]


def _fused_or_skip(backend: str, device: str = "cpu") -> None:
    reason = _backend.unavailable_reason("window_attention", backend, torch.device(device))
    if reason:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def _inputs(B, C, H, W, heads, k=3, dtype=torch.float32, device="cpu", layout="linear"):
    """v and logits as the CDFA block makes them: v a channels-last view of a Linear's
    (B, H, W, C) output, logits the permuted view of a (B, H·W, heads, k⁴) output."""
    kk = k * k
    if layout == "linear":
        v = torch.randn(B, H, W, C, dtype=dtype, device=device).permute(0, 3, 1, 2)
        logits = torch.randn(B, H * W, heads, kk, kk, dtype=dtype, device=device).permute(0, 2, 1, 3, 4)
    else:
        v = torch.randn(B, C, H, W, dtype=dtype, device=device)
        logits = torch.randn(B, heads, H * W, kk, kk, dtype=dtype, device=device)
    return v.detach().requires_grad_(), (2 * logits).detach().requires_grad_()


def _fwd_bwd(fn, v, logits, grad):
    y = fn(v, logits)
    dv, dl = torch.autograd.grad(y, (v, logits), grad)
    return y, dv, dl


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("k", [1, 3, 5])
def test_reference_equals_gather_formula(k):
    """The unfold/fold reference computes the spec's gather formula (slot and tap order,
    window centres clipped to the image), checked against a second independent reading."""
    v, logits = _inputs(2, 6, 5, 7, 3, k=k, dtype=torch.float64, layout="contiguous")
    torch.testing.assert_close(window_attention_reference(v, logits, k), window_attention_direct(v, logits, k))


# ----------------------------------------------------------------------------- fused op


@pytest.mark.parametrize("backend", ["cpu"])
def test_gradcheck_float64(backend):
    """The fused backward (recomputed softmax, offset dots, transposed gather) is the exact
    derivative of the fused forward, in float64, including image borders."""
    _fused_or_skip(backend)
    v, logits = _inputs(1, 4, 3, 4, 2, dtype=torch.float64)
    fn = lambda a, b: dk.window_attention(a, b, 3, backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v, logits), fast_mode=True)
    v, logits = _inputs(1, 2, 2, 2, 1, dtype=torch.float64)
    assert torch.autograd.gradcheck(fn, (v, logits))


@pytest.mark.parametrize("backend", FUSED)
def test_float64_matches_reference(backend):
    """Values and both gradients equal the reference to float64 rounding (k = 3 and 5)."""
    _fused_or_skip(backend)
    cases = [(3, (2, 6, 5, 7, 3)), (5, (1, 4, 4, 3, 2))]
    for k, shape in cases[:1] if backend == "triton" else cases:  # the interpreter is slow
        v, logits = _inputs(*shape, k=k, dtype=torch.float64)
        grad = torch.randn(v.shape, dtype=torch.float64)
        got = _fwd_bwd(lambda a, b: dk.window_attention(a, b, k, backend), v, logits, grad)
        want = _fwd_bwd(lambda a, b: window_attention_reference(a, b, k), v, logits, grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


CPU_SHAPES = [  # (B, C, H, W, heads): odd H, W, C and head counts, 1-pixel images, head_dim 1
    (2, 6, 5, 7, 3),
    (1, 15, 9, 4, 5),
    (3, 8, 1, 6, 2),
    (1, 7, 6, 1, 7),
    (2, 33, 3, 5, 1),
    (1, 12, 11, 13, 4),
]


@pytest.mark.parametrize("shape", CPU_SHAPES)
@pytest.mark.parametrize("layout", ["linear", "contiguous"])
def test_cpu_float32_parity(shape, layout):
    """float32 values and gradients within rounding of the reference, on odd sizes and
    head counts, for the block's strided views and for contiguous inputs."""
    _fused_or_skip("cpu")
    v, logits = _inputs(*shape, layout=layout)
    grad = torch.randn(v.shape)
    got = _fwd_bwd(lambda a, b: dk.window_attention(a, b, 3, "cpu"), v, logits, grad)
    want = _fwd_bwd(lambda a, b: window_attention_reference(a, b, 3), v, logits, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", [(2, 6, 5, 7, 3), (1, 9, 3, 1, 3)])
def test_triton_float32_parity(shape):
    """The Triton kernels (under the interpreter without a GPU) on odd sizes, strided views."""
    _fused_or_skip("triton")
    v, logits = _inputs(*shape)
    grad = torch.randn(v.shape)
    got = _fwd_bwd(lambda a, b: dk.window_attention(a, b, 3, "triton"), v, logits, grad)
    want = _fwd_bwd(lambda a, b: window_attention_reference(a, b, 3), v, logits, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("algo", [0, 1])
@pytest.mark.parametrize("k, shape, block_p", [(3, (1, 6, 5, 7, 3), 16), (3, (1, 5, 1, 9, 5), 8), (5, (1, 4, 4, 3, 2), 16)])
def test_triton_algorithms_float64(algo, k, shape, block_p):
    """Both Triton gather algorithms (ALGO 0 "taps": a (pixels, taps, channels) tile per slot;
    ALGO 1 "offsets": row log-sum-exps, then one weight per offset o_t − o_s) give the
    reference's values and gradients to float64 rounding: k = 3 and 5, 1-pixel-high
    images, odd head counts, pixel blocks that split the image unevenly."""
    _fused_or_skip("triton")
    import disseg_kernels.triton.window_attention as tri

    v, logits = _inputs(*shape, k=k, dtype=torch.float64)
    grad = torch.randn(v.shape, dtype=torch.float64)
    old = tri.FORCE_ALGO, tri.FORCE_BLOCK_P
    tri.FORCE_ALGO, tri.FORCE_BLOCK_P = algo, block_p
    try:
        got = _fwd_bwd(lambda a, b: dk.window_attention(a, b, k, "triton"), v, logits, grad)
    finally:
        tri.FORCE_ALGO, tri.FORCE_BLOCK_P = old
    want = _fwd_bwd(lambda a, b: window_attention_reference(a, b, k), v, logits, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_eager_function_equals_custom_op():
    """Eager calls run through an autograd.Function (no custom-op dispatch overhead); it gives
    exactly the custom op's values and gradients, for both and for partial gradients."""
    _fused_or_skip("cpu")
    v, logits = _inputs(2, 6, 5, 7, 3)
    grad = torch.randn(v.shape)
    for rv, rl in ((True, True), (True, False), (False, True)):
        a, b = v.detach().requires_grad_(rv), logits.detach().requires_grad_(rl)
        leaves = [x for x in (a, b) if x.requires_grad]
        y1 = dk.window_attention(a, b, 3, "cpu")
        g1 = torch.autograd.grad(y1, leaves, grad)
        y2 = _window_attention_op(a, b, 3, "cpu")
        g2 = torch.autograd.grad(y2, leaves, grad)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
        for x1, x2 in zip(g1, g2):
            torch.testing.assert_close(x1, x2, rtol=0, atol=0)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_within_twice_eager_error(backend, dtype):
    """bf16 and fp16: the fused op's error against a float64 truth is at most twice eager's
    own in that dtype (plus one bf16 ulp of slack for near-zero values)."""
    _fused_or_skip(backend)
    v, logits = _inputs(2, 8, 5, 6, 2, dtype=dtype)
    grad = torch.randn(v.shape, dtype=dtype)
    truth = _fwd_bwd(
        lambda a, b: window_attention_reference(a, b, 3),
        v.detach().double().requires_grad_(),
        logits.detach().double().requires_grad_(),
        grad.double(),
    )
    eager = _fwd_bwd(lambda a, b: window_attention_reference(a, b, 3), v, logits, grad)
    fused = _fwd_bwd(lambda a, b: dk.window_attention(a, b, 3, backend), v, logits, grad)
    for name, f, e, t in zip(("y", "dv", "dlogits"), fused, eager, truth):
        assert f.dtype == dtype
        err_f = (f.double() - t).abs().max().item()
        err_e = (e.double() - t).abs().max().item()
        assert err_f <= 2 * err_e + 1e-2 * t.abs().max().item(), (name, err_f, err_e)


def test_partial_gradients_and_no_grad():
    """Only v or only logits requiring grad, and inference under no_grad, all match."""
    _fused_or_skip("cpu")
    v, logits = _inputs(1, 6, 4, 5, 2)
    grad = torch.randn(v.shape)
    (dv,) = torch.autograd.grad(dk.window_attention(v, logits.detach(), 3, "cpu"), v, grad)
    (dv_ref,) = torch.autograd.grad(window_attention_reference(v, logits.detach()), v, grad)
    torch.testing.assert_close(dv, dv_ref, rtol=2e-5, atol=2e-5)
    (dl,) = torch.autograd.grad(dk.window_attention(v.detach(), logits, 3, "cpu"), logits, grad)
    (dl_ref,) = torch.autograd.grad(window_attention_reference(v.detach(), logits), logits, grad)
    torch.testing.assert_close(dl, dl_ref, rtol=2e-5, atol=2e-5)
    with torch.no_grad():
        torch.testing.assert_close(dk.window_attention(v, logits, 3, "cpu"), window_attention_reference(v, logits))


def test_opcheck():
    """Schema, fake (meta) layouts, autograd registration and AOT dispatch of both ops."""
    _fused_or_skip("cpu")
    v, logits = _inputs(2, 6, 3, 5, 3)
    torch.library.opcheck(_window_attention_op, (v, logits, 3, "cpu"))
    grad = torch.randn(v.shape).contiguous(memory_format=torch.channels_last)
    for need_dv, need_dl in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(_window_attention_grad_op, (grad, v.detach(), logits.detach(), 3, need_dv, need_dl, "cpu"))


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the op and its backward with no graph break
    (aot_eager: the check is on tracing, not on code generation)."""
    _fused_or_skip("cpu")
    v, logits = _inputs(1, 6, 4, 5, 2)

    def step(a, b):
        return (dk.window_attention(a * 2.0, b, 3, "cpu") ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(v, logits)
    got = torch.autograd.grad(out, (v, logits))
    want = torch.autograd.grad(step(v, logits), (v, logits))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_input_validation():
    """Errors name the argument and its value; a named backend that cannot run says why."""
    v, logits = _inputs(1, 6, 4, 5, 2)
    with pytest.raises(ValueError, match="kernel_size"):
        dk.window_attention(v, logits, 4)
    with pytest.raises(ValueError, match="logits must have shape"):
        dk.window_attention(v, logits[:, :, :-1])
    with pytest.raises(ValueError, match="heads"):
        dk.window_attention(v[:, :5], torch.randn(1, 2, 20, 9, 9))
    with pytest.raises(TypeError, match="logits must be a floating-point tensor, got dtype torch.int64"):
        dk.window_attention(v, logits.long())
    with pytest.raises(ValueError, match="backend"):
        dk.window_attention(v, logits, 3, "fast")
    with pytest.raises(_backend.BackendUnavailable, match="cuda"):
        dk.window_attention(v, logits, 3, "cuda")


@requires_cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_parity(backend):
    """GPU kernels: float32 values and gradients against the reference on odd sizes."""
    _fused_or_skip(backend, "cuda")
    for shape in ((2, 6, 5, 7, 3), (2, 128, 16, 16, 4), (1, 15, 9, 4, 5)):
        v, logits = _inputs(*shape, device="cuda")
        grad = torch.randn(v.shape, device="cuda")
        got = _fwd_bwd(lambda a, b: dk.window_attention(a, b, 3, backend), v, logits, grad)
        want = _fwd_bwd(lambda a, b: window_attention_reference(a, b, 3), v, logits, grad)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@requires_cuda
@pytest.mark.parametrize("algo", [0, 1])
def test_gpu_triton_algorithms(algo):
    """Both compiled Triton gather algorithms on the GPU: float32 at the model's head_dim
    (odd sizes too), and bf16 at the model's shape within twice eager bf16's error."""
    _fused_or_skip("triton", "cuda")
    import disseg_kernels.triton.window_attention as tri

    old = tri.FORCE_ALGO, tri.FORCE_BLOCK_P
    tri.FORCE_ALGO, tri.FORCE_BLOCK_P = algo, (16 if algo == 0 else None)
    try:
        for shape in ((2, 128, 16, 16, 4), (1, 15, 9, 4, 5), (1, 128, 33, 7, 4)):
            v, logits = _inputs(*shape, device="cuda")
            grad = torch.randn(v.shape, device="cuda")
            got = _fwd_bwd(lambda a, b: dk.window_attention(a, b, 3, "triton"), v, logits, grad)
            want = _fwd_bwd(lambda a, b: window_attention_reference(a, b, 3), v, logits, grad)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        v, logits = _inputs(2, 128, 16, 16, 4, dtype=torch.bfloat16, device="cuda")
        grad = torch.randn(v.shape, dtype=torch.bfloat16, device="cuda")
        truth = _fwd_bwd(
            lambda a, b: window_attention_reference(a, b, 3),
            v.detach().double().requires_grad_(),
            logits.detach().double().requires_grad_(),
            grad.double(),
        )
        eager = _fwd_bwd(lambda a, b: window_attention_reference(a, b, 3), v, logits, grad)
        fused = _fwd_bwd(lambda a, b: dk.window_attention(a, b, 3, "triton"), v, logits, grad)
    finally:
        tri.FORCE_ALGO, tri.FORCE_BLOCK_P = old
    for name, f, e, t in zip(("y", "dv", "dlogits"), fused, eager, truth):
        err_f = (f.double() - t).abs().max().item()
        err_e = (e.double() - t).abs().max().item()
        assert err_f <= 2 * err_e + 1e-2 * t.abs().max().item(), (name, err_f, err_e)


# ----------------------------------------------------------------------------- the block


@pytest.mark.parametrize("in_c, expected", [(128, 707_464), (256, 854_920)])
def test_cdfa_parameter_count(in_c, expected):
    """spec/model.md: cdfa4 (128 → 128) has 707,464 parameters, cdfa3…1 (256 → 128) 854,920;
    both modes hold the same parameter names and shapes."""
    fused = dk.ContrastDrivenFeatureAggregation(in_c, 128, 4, fused=True)
    plain = dk.ContrastDrivenFeatureAggregation(in_c, 128, 4, fused=False)
    assert sum(p.numel() for p in fused.parameters()) == expected
    assert {k: v.shape for k, v in fused.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_cdfa_fused_equals_reference_module(backend):
    """Same weights: the fused block's output and every parameter/input gradient equal the
    eager block's (train mode, BatchNorm batch statistics, odd H and W)."""
    if backend != "reference":
        _fused_or_skip(backend)
    torch.manual_seed(1)
    fused = dk.ContrastDrivenFeatureAggregation(12, 8, 2, fused=True, backend=backend).double()
    plain = dk.ContrastDrivenFeatureAggregation(12, 8, 2, fused=False).double()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 12, 5, 7, dtype=torch.float64, requires_grad=True)
    fg = torch.randn(2, 8, 5, 7, dtype=torch.float64, requires_grad=True)
    bg = torch.randn(2, 8, 5, 7, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    outs = []
    for m in (fused, plain):
        y = m(x, fg, bg)
        grads = torch.autograd.grad(y, [x, fg, bg, *m.parameters()], grad)
        outs.append((y, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-10, atol=1e-10)
    for g, w in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_cdfa_options():
    """Unsupported fused options fail at construction, naming the value; fused=False keeps
    the authors' general stride and attention dropout."""
    with pytest.raises(ValueError, match="stride=2"):
        dk.ContrastDrivenFeatureAggregation(8, 8, 2, stride=2)
    with pytest.raises(ValueError, match="attn_drop=0.1"):
        dk.ContrastDrivenFeatureAggregation(8, 8, 2, attn_drop=0.1)
    with pytest.raises(ValueError, match="num_heads=3"):
        dk.ContrastDrivenFeatureAggregation(8, 8, 3)
    m = dk.ContrastDrivenFeatureAggregation(8, 8, 2, attn_drop=0.1, fused=False)
    assert m(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4), torch.randn(1, 8, 4, 4)).shape == (1, 8, 4, 4)
