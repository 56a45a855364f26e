"""The attention-calibration ops (spec/attention.md): TeLU, the gate modules and the
multi-scale concat. Fused backends (C++ CPU, Triton under the interpreter) are checked
against the plain-PyTorch reference path of the same module with the same weights."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import disseg_kernels as dk
from disseg_kernels import _backend
from disseg_kernels.reference.multiscale import multiscale_concat_reference
from disseg_kernels.reference.telu import telu_eager, telu_grad_reference, telu_reference


def _fused_backends(family):
    return [b for b in ("cpu", "triton") if _backend.unavailable_reason(family, b, torch.device("cpu")) is None]


GATE_BACKENDS = _fused_backends("gates")
requires_cpu_ext = pytest.mark.skipif(
    "cpu" not in GATE_BACKENDS, reason=f"C++ gate kernels unavailable: {_backend.unavailable_reason('gates', 'cpu', torch.device('cpu'))}"
)

MODULES = {
    "ca": lambda c, **kw: dk.ChannelAttention(c, **kw),
    "sa": lambda c, **kw: dk.SpatialAttention(**kw),
    "cbam": lambda c, **kw: dk.CBAM(c, **kw),
    "elat": lambda c, **kw: dk.ELAT(c, **kw),
    "cbat": lambda c, **kw: dk.CBATGates(c, **kw),
}


def _set_fused(module, fused):
    for m in module.modules():
        if hasattr(m, "fused"):
            m.fused = fused
    return module


def _run(module, x, grad_out):
    x = x.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(grad_out)
    return y.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


def _compare(module, x, grad_out, atol, rtol):
    y, gx, gp = _run(_set_fused(module, True), x, grad_out)
    yr, gxr, gpr = _run(_set_fused(module, False), x, grad_out)
    torch.testing.assert_close(y, yr, atol=atol, rtol=rtol)
    torch.testing.assert_close(gx, gxr, atol=atol, rtol=rtol)
    for (name, _), a, b in zip(module.named_parameters(), gp, gpr):
        torch.testing.assert_close(a, b, atol=atol * 10, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return y


@pytest.mark.parametrize("backend", GATE_BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 17, 9, 6), (1, 129, 4, 11)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gate_modules_match_reference(backend, name, shape, channels_last):
    """Values and all gradients (x and every parameter) of the fused path equal the eager
    formula on odd shapes, in both memory layouts; the output keeps x's layout."""
    if backend == "triton" and (shape[1] == 129 or (channels_last and name not in ("ca", "cbat"))):
        pytest.skip("interpreter time: covered by the C++ backend and the other Triton cases")
    torch.manual_seed(1)
    module = MODULES[name](shape[1], backend=backend)
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    go = torch.randn(shape)
    y = _compare(module, x, go, atol=2e-5, rtol=1e-4)
    assert y.stride() == x.stride()


@requires_cpu_ext
@pytest.mark.parametrize("name", list(MODULES))
def test_gate_gradcheck_float64(name):
    """float64 gradcheck of the fused C++ path w.r.t. x and every parameter."""
    torch.manual_seed(2)
    module = MODULES[name](5, backend="cpu").double()
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64, requires_grad=True)
    params = list(module.parameters())

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(module, dict(zip([n for n, _ in module.named_parameters()], ps))):
            return module(x)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


@requires_cpu_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["ca", "cbam", "cbat", "elat"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gate_half_within_eager_error(name, dtype, channels_last):
    """bf16/fp16: the fused error against float32 is at most 2× eager's own (plus a floor),
    in both layouts (float16 rows are widened in float lanes before the pools and the
    backward's reductions: rows of 17 channels and of 80 pixels)."""
    torch.manual_seed(3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, go = (torch.randn(2, 17, 8, 10).to(memory_format=fmt) for _ in range(2))
    _check_half_within_eager_error(name, dtype, "cpu", x, go)


def _check_half_within_eager_error(name, dtype, backend, x32, go32):
    """The fused module in ``dtype`` is at most 2× eager's own error (plus 1e-3) against
    the float32 eager module with the same weights, for the output and dx."""
    module = MODULES[name](17, backend=backend).to(x32.device)
    ref_y, ref_gx, _ = _run(_set_fused(module, False), x32, go32)
    half = MODULES[name](17, backend=backend).to(x32.device, dtype)
    half.load_state_dict({k: v.to(dtype) for k, v in module.state_dict().items()})
    eager_y, eager_gx, eager_gp = _run(_set_fused(half, False), x32.to(dtype), go32.to(dtype))
    fused_y, fused_gx, fused_gp = _run(_set_fused(half, True), x32.to(dtype), go32.to(dtype))
    assert fused_y.dtype == dtype and fused_gx.dtype == dtype
    for fused, eager, ref in ((fused_y, eager_y, ref_y), (fused_gx, eager_gx, ref_gx)):
        e_fused = (fused.float() - ref).abs().max().item()
        e_eager = (eager.float() - ref).abs().max().item()
        assert e_fused <= 2 * e_eager + 1e-3, (e_fused, e_eager)
    # parameter gradients, relative to their largest entry: a bias gradient is one sum, and
    # eager's can land within a fraction of an ulp by luck, so the floor is 4 ulps (over 8
    # seeds the fused CBAM conv.bias in fp16 averaged 3.7e-4 against eager's 1.3e-3)
    _, _, ref_gp = _run(_set_fused(module, False), x32, go32)
    floor = 4 * torch.finfo(dtype).eps
    for (pname, _), fused, eager, ref in zip(half.named_parameters(), fused_gp, eager_gp, ref_gp):
        scale = ref.abs().max().item() or 1.0
        e_fused = (fused.float() - ref).abs().max().item() / scale
        e_eager = (eager.float() - ref).abs().max().item() / scale
        assert e_fused <= 2 * e_eager + floor, (pname, e_fused, e_eager)


@requires_cpu_ext
def test_cbat_saves_only_x_and_small_tensors():
    """Saved-for-backward of the fused CBAT chain: x plus (B, C)/(B, H·W) tensors and the
    weights — under 1.2× the input size (eager keeps several full maps)."""
    torch.manual_seed(4)
    module = dk.CBATGates(64, backend="cpu")
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    saved = sum(seen.values()) - param_bytes
    assert saved <= 1.2 * x.numel() * x.element_size(), saved / (x.numel() * x.element_size())
    y.sum().backward()


@pytest.mark.parametrize("backend", GATE_BACKENDS)
def test_gate_ops_opcheck(backend):
    """torch.library.opcheck of disseg::gates_fwd and disseg::gates_bwd (schema, fake
    tensors, autograd registration, AOT dispatch)."""
    from disseg_kernels.ops import gates as g

    torch.manual_seed(5)
    for name in ("elat", "cbat") if backend != "triton" else ("cbat",):  # cbat covers ca, sa, cbam
        module = MODULES[name](6, backend=backend)
        x = torch.randn(2, 6, 5, 4, requires_grad=True)
        params = [p.detach().requires_grad_() for p in module._params()]
        torch.library.opcheck(g._gates_fwd, (x, params, name, backend))
        out, saved = g._gates_fwd(x.detach(), [p.detach() for p in params], name, backend)
        torch.library.opcheck(g._gates_bwd, (torch.randn_like(out), x.detach(), [p.detach() for p in params], saved, name, backend))


@requires_cpu_ext
def test_gates_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the fused CBAT chain, ELAT, TeLU and the
    multi-scale concat without a graph break, with the same values and gradients."""
    torch.manual_seed(6)
    chain = dk.CBATGates(8, backend="cpu")
    elat = dk.ELAT(8, backend="cpu")

    def f(x, a, b):
        y = chain(x) + elat(x)
        return dk.telu(dk.multiscale_concat([y, a, b], [1, 2, 4], backend="cpu"), backend="cpu")

    x = torch.randn(2, 8, 8, 12, requires_grad=True)
    a = torch.randn(2, 3, 4, 6, requires_grad=True)
    b = torch.randn(2, 2, 2, 3, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(x, a, b)
    ye = f(x, a, b)
    torch.testing.assert_close(y, ye)
    g = torch.autograd.grad(y.sum(), (x, a, b))
    ge = torch.autograd.grad(ye.sum(), (x, a, b))
    for u, v in zip(g, ge):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("backend", GATE_BACKENDS)
def test_eager_functions_equal_custom_ops(backend):
    """Eager calls of TeLU, the gates and the multi-scale concat run through an
    autograd.Function (no custom-op dispatch: ~0.25 ms of Python less per CBAT fwd+bwd);
    it gives exactly the custom ops' values and gradients, also for partial gradients."""
    from disseg_kernels.ops import gates as og
    from disseg_kernels.ops import multiscale as om
    from disseg_kernels.ops import telu as ot

    torch.manual_seed(8)
    x = torch.randn(2, 6, 5, 4)
    for name in ("cbat", "elat"):
        module = MODULES[name](6, backend=backend)
        params = module._params()
        for need_x in (True, False):
            xx = x.clone().requires_grad_(need_x)
            leaves = ([xx] if need_x else []) + params
            y1 = module(xx)
            g1 = torch.autograd.grad(y1, leaves, torch.ones_like(y1))
            y2, _ = og._gates_fwd(xx, params, name, backend)
            g2 = torch.autograd.grad(y2, leaves, torch.ones_like(y2))
            torch.testing.assert_close(y1, y2, rtol=0, atol=0)
            for a, b in zip(g1, g2):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    xx = x.clone().requires_grad_()
    y1, y2 = dk.telu(xx, backend=backend), ot._telu_op(xx, backend)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(y1.sum(), xx)[0], torch.autograd.grad(y2.sum(), xx)[0], rtol=0, atol=0)
    ts = [torch.randn(2, 3, 8, 12), torch.randn(2, 2, 4, 6, requires_grad=True), torch.randn(2, 1, 2, 3, requires_grad=True)]
    y1 = dk.multiscale_concat(ts, [1, 2, 4], backend=backend)
    y2 = om._multiscale_op(ts, [1, 2, 4], backend)
    grad = torch.randn_like(y1)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(y1, ts[1:], grad), torch.autograd.grad(y2, ts[1:], grad)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@requires_cpu_ext
def test_eager_custom_ops_switch(monkeypatch):
    """Eager calls skip the custom-op dispatch by default; DISSEG_EAGER_CUSTOM_OPS=1
    (``_backend._EAGER_CUSTOM_OPS``) sends them through ``disseg::gates_fwd``,
    ``disseg::telu`` and ``disseg::multiscale_concat``, with the same values."""
    from torch.profiler import ProfilerActivity, profile

    from disseg_kernels import _backend as be

    torch.manual_seed(10)
    chain = dk.CBATGates(4, backend="cpu")
    x = torch.randn(2, 4, 4, 6, requires_grad=True)
    a = torch.randn(2, 2, 2, 3, requires_grad=True)

    def run():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            y = dk.telu(dk.multiscale_concat([chain(x), a], [1, 2], backend="cpu"), backend="cpu")
        return y, {e.name for e in prof.events()}

    y_fn, names_fn = run()
    monkeypatch.setattr(be, "_EAGER_CUSTOM_OPS", True)
    y_op, names_op = run()
    wrappers = {"disseg::gates_fwd", "disseg::telu", "disseg::multiscale_concat"}
    assert not wrappers & names_fn, sorted(wrappers & names_fn)
    assert wrappers <= names_op, sorted(wrappers - names_op)
    torch.testing.assert_close(y_fn, y_op, rtol=0, atol=0)


@requires_cpu_ext
def test_compile_traces_the_custom_ops():
    """Under torch.compile the fused modules go through the registered custom ops (one
    opaque node each, no graph break), not through the eager autograd.Functions."""
    torch.manual_seed(9)
    chain = dk.CBATGates(8, backend="cpu")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(x, a):
        return dk.telu(dk.multiscale_concat([chain(x), a], [1, 2], backend="cpu"), backend="cpu")

    torch.compile(f, fullgraph=True, backend=backend)(torch.randn(2, 8, 4, 6, requires_grad=True), torch.randn(2, 3, 2, 3))
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    for op in ("disseg.gates_fwd.default", "disseg.multiscale_concat.default", "disseg.telu.default"):
        assert op in targets, (op, sorted(targets))


def test_gate_modules_same_state_dict_both_modes():
    """One state_dict serves fused and plain modules; the API's parameter names."""
    a, b = dk.CBATGates(32, fused=True), dk.CBATGates(32, fused=False)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {
        "ca.fc1.weight", "ca.fc2.weight", "sa.conv.weight", "cbam.mlp.0.weight", "cbam.mlp.0.bias",
        "cbam.mlp.2.weight", "cbam.mlp.2.bias", "cbam.conv.weight", "cbam.conv.bias",
    }
    assert a.ca.fc1.weight.shape == (2, 32, 1, 1) and a.sa.conv.weight.shape == (1, 2, 7, 7)
    e = dk.ELAT(16)
    assert e.mlp[0].weight.shape == (2, 16) and e.mlp[0].bias is None and e.fuse.weight.shape == (1, 3, 1, 1)


def test_gate_errors_name_the_argument():
    with pytest.raises(ValueError, match="channels=8"):
        dk.ChannelAttention(8)(torch.randn(1, 4, 3, 3))
    with pytest.raises(dk.BackendUnavailable, match="cuda"):
        dk.CBAM(4, backend="cuda")(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="kernel_size"):
        dk.SpatialAttention(kernel_size=4)


# ----------------------------------------------------------------------------- TeLU
TELU_BACKENDS = _fused_backends("telu")
EXTREME = [-100.0, -20.0, 0.0, 20.0, 89.0, 100.0, 1e4]


@pytest.mark.parametrize("backend", TELU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_telu_extremes_finite_with_right_limit(backend, dtype):
    """telu and its gradient are finite at x ∈ {−100, −20, 0, 20, 89, 100, 1e4} in every
    dtype: telu → x and d/dx → 1 for large x, → 0 for very negative x (eager gives NaN)."""
    x = torch.tensor(EXTREME, dtype=dtype, requires_grad=True)
    y = dk.telu(x, backend=backend)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    exact = telu_reference(torch.tensor(EXTREME, dtype=torch.float64))
    torch.testing.assert_close(y.double(), exact.to(dtype).double(), atol=1e-6, rtol=1e-2)
    torch.testing.assert_close(g.double(), telu_grad_reference(torch.tensor(EXTREME, dtype=torch.float64)), atol=1e-6, rtol=1e-2)
    assert g[-4:].eq(1).all() and y[-4:].eq(x[-4:]).all()


@pytest.mark.parametrize("backend", TELU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_telu_finite_up_to_the_dtype_max(backend, dtype):
    """The gradient stays finite up to the dtype's largest value (4·x overflowed past 8.5e37
    in float32 and made inf·0 = NaN: found by a user-acceptance pass, 2026-11-28), as does
    the finite reference derivative; float64 keeps its tiny values (telu(−100) = −3.7e−42,
    not the float floor's 0)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton TeLU computes in float32 and refuses float64")
    big = torch.finfo(dtype).max
    x = torch.tensor([big, big / 3, -big, 50.0], dtype=dtype, requires_grad=True)
    y = dk.telu(x, backend=backend)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(g).all(), (y, g)
    assert g[[0, 1, 3]].eq(1).all() and g[2] == 0 and y[[0, 1, 3]].eq(x[[0, 1, 3]]).all()
    assert torch.isfinite(telu_grad_reference(x.detach())).all()
    if dtype == torch.float64:
        tiny = dk.telu(torch.tensor([-100.0], dtype=torch.float64), backend=backend)
        torch.testing.assert_close(tiny, telu_reference(torch.tensor([-100.0], dtype=torch.float64)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_plain_telu_values_are_eager_and_its_gradient_is_finite(dtype):
    """The plain path (TeLU(fused=False), the gates' plain MLPs, the plain Med-DisSeg) gives
    the authors' formula's values bit for bit, its gradient bit for bit where that is
    finite, and 1 where eager autograd gives NaN (x past ~11 in float16, ~89 in float32).
    It used the authors' formula itself: a plain model under fp16 autocast with a head
    pre-activation past 11 got NaN parameter gradients (found by an audit, 2026-11-28)."""
    x = torch.linspace(-120.0, 120.0, 24001, dtype=torch.float64).to(dtype)
    x = torch.cat([x, torch.tensor([torch.finfo(dtype).max, float("inf"), float("-inf"), float("nan")], dtype=dtype)])
    finite_x = x[:-3].clone().requires_grad_()
    eager_x = x[:-3].clone().requires_grad_()
    y = dk.TeLU(fused=False)(finite_x)
    (g,) = torch.autograd.grad(y.sum(), finite_x)
    ye = telu_eager(eager_x)
    (ge,) = torch.autograd.grad(ye.sum(), eager_x)
    assert torch.equal(y, ye)
    ok = ge.isfinite()
    if dtype != torch.float64:
        assert not ok.all()  # eager's NaN is really reached here
    assert g.isfinite().all() and torch.equal(g[ok], ge[ok]) and g[~ok].eq(1).all()
    assert torch.equal(telu_reference(x).isnan(), telu_eager(x).isnan())  # -inf·0 and NaN stay NaN


@pytest.mark.parametrize("backend", TELU_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_telu_matches_reference(backend, channels_last):
    """Values and gradients equal the eager formula in float32 on a range that avoids its
    NaN (|x| ≤ 12), on an odd shape, in both layouts (output keeps the layout)."""
    torch.manual_seed(7)
    x = (torch.rand(3, 5, 7, 9) * 24 - 12)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    go = torch.randn(3, 5, 7, 9)
    y = dk.telu(x, backend=backend)
    (g,) = torch.autograd.grad(y, x, go)
    yr = telu_reference(x)
    (gr,) = torch.autograd.grad(yr, x, go)
    torch.testing.assert_close(y, yr, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g, gr, atol=1e-6, rtol=1e-5)
    assert y.stride() == x.stride() and g.stride() == x.stride()


@pytest.mark.skipif("cpu" not in TELU_BACKENDS, reason="C++ TeLU kernels unavailable")
def test_telu_gradcheck_and_opcheck():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True) * 3
    x = x.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: dk.telu(t, backend="cpu"), (x,))
    from disseg_kernels.ops import telu as t

    torch.library.opcheck(t._telu_op, (torch.randn(3, 4, requires_grad=True), "cpu"))
    torch.library.opcheck(t._telu_backward_op, (torch.randn(3, 4), torch.randn(3, 4), "cpu"))


@pytest.mark.skipif("cpu" not in TELU_BACKENDS, reason="C++ TeLU kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_telu_half_within_eager_error(dtype):
    x = torch.randn(4096) * 4
    ref = telu_reference(x.double())
    eager = telu_reference(x.to(dtype))
    fused = dk.telu(x.to(dtype), backend="cpu")
    assert (fused.double() - ref).abs().max() <= 2 * (eager.double() - ref).abs().max() + 1e-6


@pytest.mark.skipif("cpu" not in TELU_BACKENDS, reason="C++ TeLU kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_telu_half_is_the_float_kernel_rounded_once(dtype):
    """Every one of the 65,536 bfloat16 / float16 values (NaN, ±inf and subnormals
    included, plus a tail past the vector width): the C++ TeLU of a half tensor and its
    gradient are the float kernel's results rounded once to nearest even, bit for bit. Half
    inputs run the float vector lanes (widen on load, round on store); they ran a scalar
    std::exp loop, 10× slower than float (bf16 autocast Stage II: a quarter of the step)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = torch.cat([bits.view(dtype), bits[:7].view(dtype)])
    go = torch.randn(x.shape).to(dtype)
    xg = x.clone().requires_grad_()
    y = dk.telu(xg, backend="cpu")
    (g,) = torch.autograd.grad(y, xg, go)
    xf = x.float().requires_grad_()
    yf = dk.telu(xf, backend="cpu")
    (gf,) = torch.autograd.grad(yf, xf, go.float())
    for got, want in ((y.detach(), yf.detach().to(dtype)), (g, gf.to(dtype))):
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    assert y.isfinite().sum() == x.isfinite().sum()


# ----------------------------------------------------------------------- multi-scale
MS_BACKENDS = _fused_backends("multiscale")


@pytest.mark.parametrize("backend", MS_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_multiscale_matches_reference(backend, channels_last):
    """Values and input gradients equal cat(F.interpolate(..., align_corners=True)) for
    factors 1, 2, 4, 8 on odd sizes; the output takes the first input's layout."""
    torch.manual_seed(8)
    shapes = [(2, 3, 24, 16), (2, 5, 12, 8), (2, 1, 6, 4), (2, 2, 3, 2)]
    ts = [torch.randn(s) for s in shapes]
    if channels_last:
        ts = [t.to(memory_format=torch.channels_last) for t in ts]
    ts = [t.requires_grad_() for t in ts]
    scales = [1, 2, 4, 8]
    y = dk.multiscale_concat(ts, scales, backend=backend)
    go = torch.randn_like(y)
    g = torch.autograd.grad(y, ts, go)
    yr = multiscale_concat_reference(ts, scales)
    gr = torch.autograd.grad(yr, ts, go)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("backend", MS_BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_multiscale_one_row_inputs_and_gradient_layout(backend, channels_last):
    """Inputs one pixel high, or a single pixel (every output row, or pixel, takes the same
    taps: the backward's candidate range is the whole output), at a factor larger than the
    input: gradients equal the reference's and come back in each input's layout and dtype."""
    torch.manual_seed(9)
    for hw, scales in (((4, 12), (1, 3), (2, 6)), [1, 4, 2]), (((4, 4), (1, 1), (2, 2)), [1, 4, 2]):
        ts = [torch.randn(2, c, h, w) for c, (h, w) in zip((3, 2, 1), hw)]
        _multiscale_grads_match_reference(ts, scales, backend, channels_last)


@pytest.mark.parametrize("backend", MS_BACKENDS)
@pytest.mark.parametrize("first_channels_last", [False, True])
def test_multiscale_mixed_layouts(backend, first_channels_last):
    """Inputs of both layouts in one call, with channel counts that are not block multiples
    (33, 1, 7): the output takes the first input's layout, each input's gradient its own,
    and values and gradients equal the reference's. (The Triton kernels switch between
    plane blocks and channel-fast blocks by the layout of what they write.)"""
    torch.manual_seed(11)
    shapes, scales = [(2, 33, 10, 6), (2, 1, 5, 3), (2, 7, 5, 3)], [1, 2, 2]
    cl = [first_channels_last, not first_channels_last, not first_channels_last]
    fmt = lambda c: torch.channels_last if c else torch.contiguous_format  # noqa: E731
    ts = [torch.randn(s).to(memory_format=fmt(c)).requires_grad_() for s, c in zip(shapes, cl)]
    y = dk.multiscale_concat(ts, scales, backend=backend)
    yr = multiscale_concat_reference(ts, scales)
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=fmt(first_channels_last))
    go = torch.randn_like(y)
    g = torch.autograd.grad(y, ts, go)
    gr = torch.autograd.grad(yr, ts, go)
    for c, a, b in zip(cl, g, gr):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert a.is_contiguous(memory_format=fmt(c))


@pytest.mark.parametrize("backend", MS_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_multiscale_half_within_eager_error(backend, dtype, channels_last):
    """bf16/fp16 (float32 arithmetic inside, one rounding at the write): output and input
    gradients at most 2× eager's own error against float32 (plus a floor), both layouts."""
    torch.manual_seed(12)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shapes, scales = [(2, 5, 12, 8), (2, 17, 6, 4), (2, 3, 3, 2)], [1, 2, 4]
    t32 = [torch.randn(s).to(memory_format=fmt) * 4 for s in shapes]
    go32 = torch.randn(2, 25, 12, 8).to(memory_format=fmt)

    def run(fn, dt):
        ts = [t.to(dt).requires_grad_() for t in t32]
        y = fn(ts)
        g = torch.autograd.grad(y, ts, go32.to(dt))
        return y, g

    ref_y, ref_g = run(lambda ts: multiscale_concat_reference(ts, scales), torch.float32)
    eager_y, eager_g = run(lambda ts: multiscale_concat_reference(ts, scales), dtype)
    fused_y, fused_g = run(lambda ts: dk.multiscale_concat(ts, scales, backend=backend), dtype)
    assert fused_y.dtype == dtype and all(g.dtype == dtype for g in fused_g)
    for fused, eager, ref in zip((fused_y, *fused_g), (eager_y, *eager_g), (ref_y, *ref_g)):
        e_fused = (fused.float() - ref).abs().max().item()
        e_eager = (eager.float() - ref).abs().max().item()
        assert e_fused <= 2 * e_eager + 1e-3, (e_fused, e_eager)



@pytest.mark.skipif("cpu" not in MS_BACKENDS, reason="C++ multiscale kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_multiscale_half_is_the_float_kernel_rounded_once(dtype, channels_last):
    """The C++ multi-scale concat of half inputs, and its input gradients, are the float
    kernel's results on the widened inputs rounded once to nearest: within half a unit in
    the last place of the half result, plus float's own rounding error (bounded by the same
    op on |inputs|: fused multiply-adds may differ between the float and half builds of a
    loop, and an output that cancels is far smaller than its taps). Truncating breaks it. The
    rows (W = 40 in NCHW, C = 37 / 19 / 5 in channels_last) span full float lanes and a
    scalar tail: half types run the float lanes of csrc/cpu_lanes.h (widen on load, round
    on store), where scalar half conversions kept them 2-5x slower than float."""
    torch.manual_seed(13)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    shapes, scales = [(2, 37, 24, 40), (2, 19, 12, 20), (2, 5, 6, 10)], [1, 2, 4]
    ts = [(torch.randn(s) * 4).to(dtype).to(memory_format=fmt) for s in shapes]
    go = torch.randn(2, 61, 24, 40).to(dtype).to(memory_format=fmt)

    def run(inputs, grad):
        inputs = [t.detach().requires_grad_() for t in inputs]
        y = dk.multiscale_concat(inputs, scales, backend="cpu")
        return (y, *torch.autograd.grad(y, inputs, grad))

    half = run(ts, go)
    wide = run([t.float() for t in ts], go.float())
    magnitude = run([t.float().abs() for t in ts], go.float().abs())
    fi = torch.finfo(dtype)
    for got, want, mag in zip(half, wide, magnitude):
        assert got.dtype == dtype and got.stride() == want.stride()
        ulp = fi.eps * torch.exp2(torch.floor(torch.log2(got.float().abs().clamp_min(fi.smallest_normal))))
        err = (got.float() - want).abs()
        assert (err <= 0.5 * ulp + 2.0**-21 * mag).all(), (err / ulp).max()
        assert (got == want.to(dtype)).float().mean() > 0.99
@pytest.mark.skipif("triton" not in MS_BACKENDS, reason="Triton multiscale kernels unavailable")
@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_multiscale_triton_backward_paths(monkeypatch, separable, channels_last):
    """The Triton backward's two paths, forced by its size threshold: the one-pass 2-D gather
    (small gradients: one launch) and the separable W-then-H passes through a float32 buffer
    (large ones: the 2-D gather was compute-bound on the H200). Both equal the reference's
    gradients for factors 1, 2, 4, 8, one-row and one-pixel inputs, in each input's layout."""
    from disseg_kernels.triton import multiscale as tm

    monkeypatch.setattr(tm, "SEPARABLE_MIN_ELEMENTS", 0 if separable else 1 << 62)
    torch.manual_seed(13)
    ts = [torch.randn(s) for s in [(2, 3, 24, 16), (2, 5, 12, 8), (2, 1, 6, 4), (2, 2, 3, 2)]]
    _multiscale_grads_match_reference(ts, [1, 2, 4, 8], "triton", channels_last)
    ts = [torch.randn(2, c, h, w) for c, (h, w) in zip((3, 2, 1), ((4, 12), (1, 3), (2, 6)))]
    _multiscale_grads_match_reference(ts, [1, 4, 2], "triton", channels_last)
    ts = [torch.randn(2, c, h, w) for c, (h, w) in zip((3, 2, 1), ((4, 4), (1, 1), (2, 2)))]
    _multiscale_grads_match_reference(ts, [1, 4, 2], "triton", channels_last)


def _multiscale_grads_match_reference(ts, scales, backend, channels_last):
    if channels_last:
        ts = [t.to(memory_format=torch.channels_last) for t in ts]
    ts = [t.requires_grad_() for t in ts]
    y = dk.multiscale_concat(ts, scales, backend=backend)
    go = torch.randn_like(y)
    g = torch.autograd.grad(y, ts, go)
    gr = torch.autograd.grad(multiscale_concat_reference(ts, scales), ts, go)
    for t, a, b in zip(ts, g, gr):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert a.dtype == t.dtype
        assert a.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.skipif("cpu" not in MS_BACKENDS, reason="C++ multiscale kernels unavailable")
def test_multiscale_gradcheck_and_opcheck():
    from disseg_kernels.ops import multiscale as m

    ts = [torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True), torch.randn(1, 3, 3, 2, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda a, b: dk.multiscale_concat([a, b], [1, 2], backend="cpu"), ts)
    ts32 = [t.detach().float().requires_grad_() for t in ts]
    torch.library.opcheck(m._multiscale_op, (ts32, [1, 2], "cpu"))


def test_multiscale_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"tensors\[1\]"):
        dk.multiscale_concat([torch.randn(1, 2, 8, 8), torch.randn(1, 2, 3, 3)], [1, 2])
    with pytest.raises(ValueError, match=r"scales\[0\]"):
        dk.multiscale_concat([torch.randn(1, 2, 8, 8)], [0])


# ------------------------------------------------------------ Triton kernels, directly
TRITON_GATES = "triton" in GATE_BACKENDS


def _x_layout(shape, channels_last, dtype=torch.float32, seed=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.skipif(not TRITON_GATES, reason="Triton gate kernels unavailable")
@pytest.mark.parametrize("tiles,target,channels_last", [((2, 4), 64, False), ((4, 2), 1000, True), ((2, 4), 64, True),
                                                        (None, None, False)])
def test_triton_gate_kernels_split_paths(monkeypatch, channels_last, tiles, target):
    """Each Triton entry point against its torch formula with tiles and split counts
    forced (the GPU splits reductions over H·W or C into partials combined by a second
    launch): odd sizes that are not multiples of the tiles, both layouts, every split
    path (one split, many, a last partial chunk), and the first arg-max on ties."""
    from disseg_kernels.triton import gates as tg

    monkeypatch.setattr(tg, "FORCE_TILES", tiles)
    monkeypatch.setattr(tg, "FORCE_TARGET_PROGRAMS", target)
    b, c, h, w = 2, 7, 3, 5
    p = h * w
    x = _x_layout((b, c, h, w), channels_last)
    xr = (torch.randint(-2, 3, (b, c, h, w)).float())  # many ties of the maximum
    if channels_last:
        xr = xr.to(memory_format=torch.channels_last)
    G = torch.rand(b, c) + 0.1
    S = torch.rand(b, p) + 0.1
    for xx in (x, xr):
        flat = xx.reshape(b, c, p)
        mean, mx, idx = tg.pool_hw(xx, S)
        y = flat * S[:, None, :]
        torch.testing.assert_close(mean, y.mean(2))
        torch.testing.assert_close(mx, y.amax(2))
        first = (y == y.amax(2, keepdim=True)).float().argmax(2)  # first maximum
        assert torch.equal(idx.long(), first)
        mean, mx, idx = tg.pool_c(xx, G)
        y = flat * G[:, :, None]
        torch.testing.assert_close(mean, y.mean(1))
        torch.testing.assert_close(mx, y.amax(1))
        assert torch.equal(idx.long(), (y == y.amax(1, keepdim=True)).float().argmax(1))
    _check_reduce_apply_grad_x(tg, x, G, S, channels_last)


def _check_reduce_apply_grad_x(k, x, G, S, channels_last):
    """A kernel set's reduce, apply, grad_x and grad_x_terms against their torch formulas,
    arg-max terms included (a max pool's gradient carried to the gate it was taken under,
    and each max's share of dx at its arg-max). ``k``: triton.gates or the engine's
    _CompiledKernels (csrc/gates.cpp on CPU tensors)."""
    tg = k
    b, c, h, w = x.shape
    p = h * w
    acc = G.dtype
    S = S.reshape(b, p)
    R = _x_layout((b, c, h, w), channels_last, seed=12).to(x.dtype)
    U, V = tg.reduce(x, R, G, S)
    t = (x * R).reshape(b, c, p)
    torch.testing.assert_close(U, (t * S[:, None, :]).sum(2))
    torch.testing.assert_close(V, (t * G[:, :, None]).sum(1))
    U, V = tg.reduce(x, None, None, None)
    torch.testing.assert_close(U, x.reshape(b, c, p).sum(2))
    torch.testing.assert_close(V, x.reshape(b, c, p).sum(1))
    # arg-max terms (a max pool's gradient carried to the gate it was taken under)
    gi, gv = torch.randint(0, p, (b, c)), torch.randn(b, c, dtype=acc)
    si, sv = torch.randint(0, c, (b, p)), torch.randn(b, p, dtype=acc)
    U, V = tg.reduce(x, R, G, S, g_arg=(gi, gv), s_arg=(si, sv))
    Gw = G[:, :, None] + gv[:, :, None] * (torch.arange(p)[None, None, :] == gi[:, :, None])
    Sw = S[:, None, :] + sv[:, None, :] * (torch.arange(c)[None, :, None] == si[:, None, :])
    torch.testing.assert_close(U, (t * Sw).sum(2))
    torch.testing.assert_close(V, (t * Gw).sum(1))
    U, V = tg.reduce(x, None, G, None, g_arg=(gi, gv), need=(False, True))
    assert U is None
    torch.testing.assert_close(V, (x.reshape(b, c, p) * Gw).sum(1))
    out = tg.apply(x, G, S)
    assert out.stride() == x.stride()
    torch.testing.assert_close(out, x * G[:, :, None, None] * S.view(b, 1, h, w))
    L, Rk = torch.randn(2, b, c, dtype=acc), torch.randn(2, b, p, dtype=acc)
    if hasattr(k, "grad_x"):  # Triton's stacked-factor entry point
        dx = k.grad_x(R, x, G, S, L, Rk)
    else:
        dx = k.grad_x_terms(R, x, G, S, [("hw", L[i], Rk[i], None, None) for i in range(2)])
    assert dx.stride() == x.stride()
    want = R * G[:, :, None, None] * S.view(b, 1, h, w) + torch.einsum("kbc,kbp->bcp", L, Rk).view(b, c, h, w)
    torch.testing.assert_close(dx, want)
    # every kind of statistic term, arg-max included (what the chain's backward passes)
    ihw, dhw = torch.randint(0, p, (b, c)), torch.randn(b, c, dtype=acc)
    ic, dc = torch.randint(0, c, (b, p)), torch.randn(b, p, dtype=acc)
    terms = [("hw", L[0], S, ihw, dhw), ("c", G, Rk[1], ic, dc), ("hw", L[1], None, ihw, None), ("c", None, Rk[0], ic, dc)]
    dx = tg.grad_x_terms(R, x, None, S, terms)
    want = (R * S.view(b, 1, h, w)).reshape(b, c, p).clone()
    for kind, Lk, Rt, idx, d in terms:
        Lf = Lk if Lk is not None else torch.ones(b, c, dtype=acc)
        Rf = Rt if Rt is not None else torch.ones(b, p, dtype=acc)
        want += Lf[:, :, None] * Rf[:, None, :]
        if d is not None and kind == "hw":
            want.scatter_add_(2, idx.unsqueeze(2), (d * Rf.gather(1, idx)).unsqueeze(2))
        elif d is not None:
            want.scatter_add_(1, idx.unsqueeze(1), (d * Lf.gather(1, idx)).unsqueeze(1))
    assert dx.stride() == x.stride()
    torch.testing.assert_close(dx.reshape(b, c, p), want)




@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_reduce_and_grad_x_ops_match_formulas(channels_last, dtype):
    """csrc/gates.cpp's gates_reduce (with its arg-max pairs) and gates_grad_x (with its
    statistic terms: rank-1 parts and each max's share at its arg-max, csrc/gates_terms.h)
    through the engine's _CompiledKernels, against the torch formulas the Triton entry
    points are held to; odd sizes, both layouts; shapes where P and C are multiples of 4
    too (the CUDA map kernel's packed path reads the same arguments)."""
    from disseg_kernels.ops.gates import _CompiledKernels

    for shape in [(2, 7, 3, 5), (2, 8, 4, 6)]:
        b, c, h, w = shape
        x = _x_layout(shape, channels_last).to(dtype)
        G = torch.rand(b, c, dtype=dtype) + 0.1
        S = torch.rand(b, h * w, dtype=dtype) + 0.1
        _check_reduce_apply_grad_x(_CompiledKernels, x, G, S, channels_last)


def test_compiled_reduce_and_grad_x_name_bad_arguments():
    """The term lists and arg-max pairs: mismatched lengths, an index without its values,
    a wrong kind, a wrong size or dtype each name the argument."""
    E = torch.ops.disseg
    x = torch.randn(2, 3, 4, 5)
    L, R = torch.randn(2, 3), torch.randn(2, 20)
    i_hw, d_hw = torch.zeros(2, 3, dtype=torch.long), torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="one length"):
        E.gates_grad_x(None, x, None, None, [L], [R, R], [None], [None], [0])
    with pytest.raises(RuntimeError, match=r"idx\[0\] and d\[0\] must be both given"):
        E.gates_grad_x(None, x, None, None, [L], [R], [i_hw], [None], [0])
    with pytest.raises(RuntimeError, match=r"kinds\[0\] must be 0"):
        E.gates_grad_x(None, x, None, None, [L], [R], [None], [None], [2])
    with pytest.raises(RuntimeError, match=r"d\[0\] must have 40 elements"):
        E.gates_grad_x(None, x, None, None, [L], [R], [torch.zeros(2, 20, dtype=torch.long)], [d_hw], [1])  # over c: (B, P)
    with pytest.raises(RuntimeError, match=r"idx\[0\] must be Long"):
        E.gates_grad_x(None, x, None, None, [L], [R], [i_hw.int()], [d_hw], [0])
    with pytest.raises(RuntimeError, match="at most 4 terms"):
        E.gates_grad_x(None, x, None, None, [L] * 5, [R] * 5, [None] * 5, [None] * 5, [0] * 5)
    with pytest.raises(RuntimeError, match="g_idx and g_val must be both given"):
        E.gates_reduce(x, None, None, None, i_hw, None, None, None)
    with pytest.raises(RuntimeError, match="s_val must have 40 elements"):
        E.gates_reduce(x, None, None, None, None, None, torch.zeros(2, 20, dtype=torch.long), d_hw)


@pytest.mark.skipif(not TRITON_GATES, reason="Triton gate kernels unavailable")
@pytest.mark.parametrize("name", ["cbat", "elat"])
def test_triton_gates_forced_splits_match_reference(monkeypatch, name):
    """The whole fused chain / ELAT on the Triton path with every reduction split (as on
    the GPU at the model's shapes), channels_last, odd sizes: values and gradients."""
    from disseg_kernels.triton import gates as tg

    monkeypatch.setattr(tg, "FORCE_TILES", (4, 8))
    monkeypatch.setattr(tg, "FORCE_TARGET_PROGRAMS", 100)
    torch.manual_seed(13)
    module = MODULES[name](9, backend="triton")
    x = torch.randn(2, 9, 5, 7).to(memory_format=torch.channels_last)
    _compare(module, x, torch.randn(2, 9, 5, 7), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not TRITON_GATES, reason="Triton gate kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,channels_last", [("cbat", False), ("cbat", True), ("elat", True)])
def test_triton_gates_half_within_eager_error(dtype, name, channels_last):
    """bf16/fp16 on the Triton path (the GPU's training dtype): the fused chain's and
    ELAT's output and dx are within twice eager's own error against float32 (plus a
    small floor)."""
    torch.manual_seed(14)
    half = MODULES[name](17, backend="triton").to(dtype)
    # The float32 reference sees the same rounded input and weights: a max pool whose two
    # largest values round to a tie would otherwise move its gradient in eager and fused
    # alike, and the comparison would measure that coin flip rather than the arithmetic.
    x32 = _x_layout((2, 17, 6, 5), channels_last, seed=15).to(dtype).float()
    go32 = torch.randn(2, 17, 6, 5).to(dtype).float()
    module = MODULES[name](17, backend="triton")
    module.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    ref_y, ref_gx, _ = _run(_set_fused(module, False), x32, go32)
    eager_y, eager_gx, _ = _run(_set_fused(half, False), x32.to(dtype), go32.to(dtype))
    fused_y, fused_gx, _ = _run(_set_fused(half, True), x32.to(dtype), go32.to(dtype))
    assert fused_y.dtype == dtype and fused_gx.dtype == dtype and fused_y.stride() == x32.stride()
    for fused, eager, ref in ((fused_y, eager_y, ref_y), (fused_gx, eager_gx, ref_gx)):
        e_fused = (fused.float() - ref).abs().max().item()
        e_eager = (eager.float() - ref).abs().max().item()
        assert e_fused <= 2 * e_eager + 1e-3, (e_fused, e_eager)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@requires_cuda
@pytest.mark.parametrize("name", ["cbat", "elat", "ca"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_gates_cuda_match_reference(monkeypatch, name, channels_last):
    """On the GPU (grid and split counts from the real SM count, compiled kernels): values
    and gradients equal the eager formula on an odd shape and a model-like one, both layouts."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the 7×7 convs, both paths
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    for shape in [(2, 17, 9, 6), (4, 64, 48, 40)]:
        torch.manual_seed(16)
        module = MODULES[name](shape[1], backend="triton").cuda()
        x = torch.randn(shape, device="cuda")
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y = _compare(module, x, torch.randn(shape, device="cuda"), atol=5e-5, rtol=1e-4)
        assert y.stride() == x.stride()


@pytest.mark.skipif(not TRITON_GATES, reason="Triton gate kernels unavailable")
@pytest.mark.parametrize("channels_last", [False, True])
def test_triton_grad_x_stencil_term(channels_last):
    """grad_x's folded 7×7 stencil term equals the transposed convolution (ELAT's logit
    gradient) on H ≠ W with borders inside the 3-wide halo: dense 7×7 weights, and ELAT's
    composite stencil with only its 25 taps visited."""
    from disseg_kernels.reference.gates import elat_composite_stencil
    from disseg_kernels.triton import gates as tg

    torch.manual_seed(17)
    b, c, h, w = 2, 5, 4, 9
    x = _x_layout((b, c, h, w), channels_last, seed=18)
    grad = _x_layout((b, c, h, w), channels_last, seed=19)
    dl = torch.randn(b, h * w)
    L, R = torch.zeros(0, b, c), torch.zeros(0, b, h * w)
    dense = torch.randn(1, c, 7, 7)
    composite, _ = elat_composite_stencil([torch.randn(1, c, 3, 3) for _ in range(3)], [torch.randn(1) for _ in range(3)],
                                          torch.randn(1, 3, 1, 1), torch.randn(1))
    for w7, taps in ((dense, False), (composite, True)):
        dx = tg.grad_x(grad, x, None, None, L, R, stencil=(w7, dl), elat_taps=taps)
        want = grad + torch.nn.grad.conv2d_input(x.shape, w7, dl.view(b, 1, h, w), padding=3)
        assert dx.stride() == x.stride()
        torch.testing.assert_close(dx, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not TRITON_GATES, reason="Triton gate kernels unavailable")
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
def test_triton_stencil_kernels_match_convolution(layout, monkeypatch):
    """The Triton ELAT logit (a 7×7 C→1 convolution, padding 3) and its weight gradient
    against conv2d and convolution_backward in float64: dense 7×7 weights (49 taps), and
    ELAT's composite stencil with only its 25 taps visited; H ≠ W with borders inside the
    3-wide halo; the default blocks, and blocks of 16 where C = 20 spans two channel blocks
    and the weight gradient's pixel blocks are split over several programs (their partial
    sums added in order). And ELAT's fused forward read: the H·W pool taken in the same
    pass equals pool_hw's (max and first arg-max exactly, across blocks)."""
    from disseg_kernels.reference.gates import elat_composite_stencil
    from disseg_kernels.triton import gates as tg

    b, c, h, w = 2, 20, 5, 9
    if layout == "channel_slice":  # a channel slice of a wider map: sB != C·H·W
        x = _x_layout((b, c + 3, h, w), False, seed=31)[:, 2:2 + c]
    else:
        x = _x_layout((b, c, h, w), layout == "channels_last", seed=31)
    dl = torch.randn(b, h * w)
    dense = torch.randn(1, c, 7, 7)
    composite, _ = elat_composite_stencil([torch.randn(1, c, 3, 3) for _ in range(3)], [torch.randn(1) for _ in range(3)],
                                          torch.randn(1, 3, 1, 1), torch.randn(1))
    on_grid = composite != 0
    xd = x.double()
    for forced in (False, True):
        with monkeypatch.context() as m:
            if forced:
                m.setattr(tg, "FORCE_TILES", (16, 16))  # tl.dot's smallest blocks
                m.setattr(tg, "FORCE_TARGET_PROGRAMS", 6)
            for w7, taps in ((dense, False), (composite, True)):
                logit = F.conv2d(xd, w7.double(), padding=3).reshape(b, -1)
                _, dw, _ = torch.ops.aten.convolution_backward(dl.double().view(b, 1, h, w), xd, w7.double(), None,
                                                               [1, 1], [3, 3], [1, 1], False, [0, 0], 1,
                                                               [False, True, False])
                if taps:
                    dw = torch.where(on_grid, dw, 0.0)  # the taps not visited come back as 0
                got = tg.stencil(x, w7, elat_taps=taps)
                assert got.dtype == torch.float32 and got.shape == (b, h * w)
                torch.testing.assert_close(got.double(), logit, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(tg.stencil_grad_weight(x, dl, w7, elat_taps=taps).double(), dw,
                                           atol=1e-4, rtol=1e-5)
            # ELAT's forward pass: the H·W pool in the stencil's read of x, its blocks merged
            # in order (ties: the first arg-max; the max of a channel repeated in two blocks)
            xt = x.clone()
            xt[:, :, h - 1, w - 1] = xt[:, :, 0, 1] = 9.0
            for xi in (x, xt):
                mean, mx, idx, logit = tg.pool_hw_stencil(xi, composite, elat_taps=True)
                want_mean, want_mx, want_idx = tg.pool_hw(xi, None)
                torch.testing.assert_close(mean, want_mean, atol=1e-6, rtol=1e-6)
                assert torch.equal(mx, want_mx) and torch.equal(idx, want_idx) and idx.dtype == want_idx.dtype
                torch.testing.assert_close(logit, tg.stencil(xi, composite, elat_taps=True), atol=1e-6, rtol=1e-6)
                # x: maxima all over the map (several blocks); xt: ties, the first position wins
                assert (idx == 1).all() if xi is xt else len(set(idx.flatten().tolist())) > 4
    with pytest.raises(ValueError, match=r"w7 must be \(1, 20, 7, 7\)"):
        tg.stencil(x, dense[:, :5])
    with pytest.raises(ValueError, match=r"dlogit must be \(2, 45\)"):
        tg.stencil_grad_weight(x, dl[:, :44], dense)


@pytest.mark.skipif(not TRITON_GATES, reason="Triton gate kernels unavailable")
@pytest.mark.parametrize("telu,pair,bias,gated", [(True, True, True, True), (False, True, False, False),
                                                  (True, False, False, False), (False, True, False, True)])
def test_triton_channel_mlp_kernels(telu, pair, bias, gated):
    """The channel gate's MLP kernels (one launch forward, two backward) against autograd
    through the same formula: CBAM's (TeLU, biases, under an earlier gate), the channel
    attention's (ReLU), ELAT's (one row set); C not a multiple of the blocks, hidden 1–8."""
    from disseg_kernels.ops.gates import _pair_sum
    from disseg_kernels.triton import gates as tg

    torch.manual_seed(20)
    b, c, hid = 3, 37, (5 if pair else 1)
    a, m = torch.randn(b, c), torch.randn(b, c)
    G0 = torch.rand(b, c) if gated else None
    w1, w2 = torch.randn(hid, c), torch.randn(c, hid)
    b1, b2 = (torch.randn(hid), torch.randn(c)) if bias else (None, None)
    H, T, parts, g, gate = tg.channel_mlp_fwd(a, m if pair else None, G0, w1, b1, w2, b2, telu, pair)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (a, m, G0, w1, w2, b1, b2)]
    la, lm, lG0, lw1, lw2, lb1, lb2 = leaves
    A = torch.cat([la, lm]) if pair else la
    if gated:
        A = A * (lG0.repeat(2, 1) if pair else lG0)
    Hr = torch.nn.functional.linear(A, lw1, lb1)
    Tr = telu_reference(Hr) if telu else torch.relu(Hr)
    Z = torch.nn.functional.linear(Tr, lw2, lb2)
    gr = torch.sigmoid(_pair_sum(Z) if pair else Z)
    gate_r = lG0 * gr if gated else gr
    for got, want in ((H, Hr), (T, Tr), (g, gr), (gate, gate_r)):
        torch.testing.assert_close(got, want)
    dgate = torch.randn(b, c)
    used = [t for t in leaves if t is not None]
    grads = dict(zip(map(id, used), torch.autograd.grad(gate_r, used, dgate, allow_unused=True)))
    da, dm, dG0, dw1, db1, dw2, db2 = tg.channel_mlp_bwd(dgate, a, m if pair else None, G0, H, T, parts, g, w1, w2,
                                                          telu, pair, bias)
    for got, leaf in ((da, la), (dm, lm if pair else None), (dG0, lG0), (dw1, lw1), (dw2, lw2), (db1, lb1), (db2, lb2)):
        if leaf is not None:
            torch.testing.assert_close(got, grads[id(leaf)])


@pytest.mark.skipif(not TRITON_GATES, reason="Triton gate kernels unavailable")
def test_cbat_triton_saves_under_1p2x_input():
    """Saved-for-backward of the fused chain on the Triton path (it also keeps the spatial
    gates and stores int32 arg-max indices): x plus small tensors, under 1.2× the input."""
    torch.manual_seed(4)
    module = dk.CBATGates(64, backend="triton")
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    saved = sum(seen.values()) - param_bytes
    assert saved <= 1.2 * x.numel() * x.element_size(), saved / (x.numel() * x.element_size())
    y.sum().backward()


@pytest.mark.skipif(not TRITON_GATES, reason="Triton gate kernels unavailable")
def test_triton_gate_kernels_compile_for_sm90():
    """The Triton kernel variants the fused CBAT chain and ELAT launch (float32, NCHW and
    channels_last, split and unsplit reductions) compile for sm_90 here, on the CPU: the
    interpreter accepts code the GPU compiler rejects, and a GPU session has no time to
    find that out. Runs `bench_gates --compile-check --quick` in a process without
    TRITON_INTERPRET (the full set: without --quick)."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_gates", "--compile-check", "--quick"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)
    if "SKIP:" in r.stdout:
        pytest.skip(r.stdout.split("SKIP:", 1)[1].strip())
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "failures: 0" in r.stdout, r.stdout[-4000:]


@pytest.mark.skipif(not TRITON_GATES, reason="Triton gate kernels unavailable")
@pytest.mark.parametrize("hw,k,gated,bias", [((5, 7), 7, True, True), ((9, 4), 7, False, False), ((3, 3), 3, True, False),
                                             ((13, 11), 7, True, True), ((10, 9), 3, False, True)])
def test_triton_spatial_gate_kernels(hw, k, gated, bias, monkeypatch):
    """The spatial gate's conv kernels (one launch forward, two backward) against autograd
    through conv2d on [mean, max]·S0: H ≠ W, maps smaller than the kernel, with and without
    an earlier spatial gate and a bias; the larger maps in several blocks of 16 positions
    (the weight gradient's per-block partials summed)."""
    from disseg_kernels.triton import gates as tg

    monkeypatch.setattr(tg, "SPATIAL_LOGIT_BLOCK", 16)

    torch.manual_seed(21)
    (h, w), b = hw, 2
    p = h * w
    mean, mx = torch.randn(b, p), torch.randn(b, p)
    S0 = torch.rand(b, p) if gated else None
    cw, cb = torch.randn(1, 2, k, k), (torch.randn(1) if bias else None)
    s, gate = tg.spatial_gate_fwd(mean, mx, S0, cw, cb, w)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (mean, mx, S0, cw, cb)]
    lm, lx, lS0, lw, lb = leaves
    M = torch.stack([lm, lx], 1) * (lS0.unsqueeze(1) if gated else 1.0)
    s_ref = torch.sigmoid(F.conv2d(M.view(b, 2, h, w), lw, lb, padding=k // 2)).view(b, p)
    gate_ref = lS0 * s_ref if gated else s_ref
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(gate, gate_ref)
    dgate = torch.randn(b, p)
    used = [t for t in leaves if t is not None]
    grads = dict(zip(map(id, used), torch.autograd.grad(gate_ref, used, dgate)))
    dmean, dmax, dS0, dcw, dcb = tg.spatial_gate_bwd(dgate, S0, s, mean, mx, cw, bias, w)
    for got, leaf in ((dmean, lm), (dmax, lx), (dS0, lS0), (dcw, lw), (dcb, lb)):
        if leaf is not None:
            torch.testing.assert_close(got, grads[id(leaf)])


# ------------------------------------------------ CUDA kernels (csrc/{gates,telu,multiscale}.cu)
def _cuda_kernels_missing(family):
    """Why backend="cuda" cannot run ``family`` here (None: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    return _backend.unavailable_reason(family, "cuda", torch.device("cuda"))


def requires_cuda_kernels(family):
    reason = _cuda_kernels_missing(family)
    return pytest.mark.skipif(reason is not None, reason=f"CUDA {family} kernels (csrc/{family}.cu) unavailable: {reason}")



@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda_kernels("gates"))])
@pytest.mark.parametrize("name", ["cbat", "elat"])
def test_compiled_gates_backward_is_bitwise_reproducible(device, name):
    """backend="cpu"/"cuda": two forward+backward passes on the same inputs give the same
    bits, with torch's deterministic mode off. Ties of the max pools are forced (x on a
    coarse grid), so several channels share an arg-max: the case where the earlier
    scatter_add_ of the arg-max terms accumulated through atomics on CUDA. The shape's
    reductions are split on a real GPU (partials merged in a fixed order)."""
    backend = "cuda" if device == "cuda" else "cpu"
    torch.manual_seed(41)
    module = MODULES[name](64, backend=backend).to(device)
    x = torch.randint(-2, 3, (4, 64, 40, 48)).float().to(device).requires_grad_(True)
    g = torch.randn(4, 64, 40, 48).to(device)
    runs = []
    for _ in range(2):
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(g)
        runs.append([x.grad.clone()] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@requires_cuda
@requires_cuda_kernels("gates")
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_gate_modules_match_reference(_no_tf32, name, channels_last):
    """backend="cuda": values and all gradients (x and every parameter) equal the eager
    formula on odd shapes (C = 3, 17, 129; H ≠ W; sizes off the 32-wide tiles) and a
    model-like one whose reductions are split on a real GPU, both layouts; out keeps x's layout."""
    for shape in [(2, 3, 5, 7), (2, 17, 9, 6), (1, 129, 4, 11), (4, 64, 48, 40)]:
        torch.manual_seed(31)
        module = MODULES[name](shape[1], backend="cuda").cuda()
        x = torch.randn(shape, device="cuda")
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y = _compare(module, x, torch.randn(shape, device="cuda"), atol=5e-5, rtol=1e-4)
        assert y.stride() == x.stride()


@requires_cuda
@requires_cuda_kernels("gates")
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "channel_slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_gate_kernels_match_cpu_kernels(layout, dtype):
    """Each CUDA op against the C++ CPU op on the same data: pools (with ties, so the first
    arg-max must agree exactly), apply, reduce (with R, both gates and the arg-max pairs),
    grad_x (no terms, one rank-1 term, the chain's four statistics with their arg-max
    terms; grad absent). Shapes chosen so that every grid path runs on a real GPU: few
    rows with long reductions (split, combined by a second launch), many short rows, and
    planes whose unit-stride length is and is not a multiple of 4 (the map kernel's packed
    and unpacked paths)."""
    E = torch.ops.disseg
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # Sums of up to ~5000 terms in another order: absolute tolerance for the reduce sums.
    atol, rtol = {torch.float64: (1e-9, 1e-10), torch.float32: (2e-3, 1e-5), torch.bfloat16: (2e-2, 1e-2)}[dtype]
    for b, c, h, w in [(2, 3, 64, 72), (2, 1024, 8, 8), (3, 17, 9, 6), (1, 300, 1, 37), (2, 1, 1, 1)]:
        g = torch.Generator().manual_seed(b * c + h)
        base = torch.randint(-3, 4, (b, c + 2, h, w), generator=g).to(dtype)
        if layout == "channel_slice":
            x, xd = base[:, 1 : 1 + c], base.cuda()[:, 1 : 1 + c]  # a strided view on both devices
        else:
            x = base[:, :c].clone(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
            xd = x.cuda()  # dense: keeps the strides
        assert xd.stride() == x.stride()
        G = torch.rand(b, c, generator=g, dtype=acc) + 0.5
        S = torch.rand(b, h * w, generator=g, dtype=acc) + 0.5

        def both(op, *args):
            cpu = getattr(E, op)(*args)
            def to_dev(a):
                if a is x:
                    return xd
                if isinstance(a, list):
                    return [to_dev(t) for t in a]
                return a.cuda() if isinstance(a, torch.Tensor) else a

            dev = getattr(E, op)(*[to_dev(a) for a in args])
            cpu, dev = (cpu, dev) if isinstance(cpu, (tuple, list)) else ((cpu,), (dev,))
            for u, v in zip(cpu, dev):
                if u.dtype == torch.long:
                    assert torch.equal(u, v.cpu()), (op, (b, c, h, w))
                else:
                    torch.testing.assert_close(v.cpu(), u, atol=atol, rtol=rtol, msg=lambda m: f"{op} {(b, c, h, w)}: {m}")
            return dev

        for gate in (None, S):
            both("gates_pool_hw", x, gate)
        for gate in (None, G):
            both("gates_pool_c", x, gate)
        if layout == "channel_slice":
            continue  # apply, reduce and grad_x take the engine's dense x
        for gg, ss in ((None, None), (G, None), (None, S), (G, S)):
            assert both("gates_apply", x, gg, ss)[0].stride() == x.stride()
        R = torch.empty_like(x).copy_(torch.randn(x.shape, generator=g))  # x's strides, as the engine passes it
        p = h * w
        gi, gv = torch.randint(0, p, (b, c), generator=g), torch.randn(b, c, generator=g, dtype=acc)
        si, sv = torch.randint(0, c, (b, p), generator=g), torch.randn(b, p, generator=g, dtype=acc)
        for rr, gg, ss, pairs in ((None, None, None, ()), (R, G, S, ()), (R, None, S, (gi, gv, None, None)),
                                  (None, G, None, (None, None, si, sv)), (R, G, S, (gi, gv, si, sv))):
            both("gates_reduce", x, rr, gg, ss, *(pairs or (None,) * 4))
        L = torch.randn(3, b, c, generator=g, dtype=acc)
        Rk = torch.randn(3, b, p, generator=g, dtype=acc)
        # (kind, L, R, idx, d): the chain's four statistics; rank-1 terms only; none
        chain = [(0, L[0], S, gi, gv), (1, G, Rk[1], si, sv), (0, L[1], None, None, None), (1, None, Rk[0], si, sv)]
        rank1 = [(0, L[2], Rk[2], None, None)]
        for gr, gg, ss, ts in ((R, G, S, chain), (None, None, None, chain), (R, None, S, []), (R, G, None, rank1)):
            lists = [[t[i] for t in ts] for i in (1, 2, 3, 4, 0)]
            assert both("gates_grad_x", gr, x, gg, ss, *lists)[0].stride() == x.stride()


@requires_cuda
@requires_cuda_kernels("gates")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,channels_last", [("cbat", False), ("cbat", True), ("elat", False), ("elat", True)])
def test_cuda_gates_half_within_eager_error(_no_tf32, dtype, name, channels_last):
    """bf16/fp16 on backend="cuda": the error against float32 is at most 2× eager's own."""
    torch.manual_seed(32)
    shape = (2, 17, 12, 10)
    x32 = torch.randn(shape, device="cuda")
    if channels_last:
        x32 = x32.to(memory_format=torch.channels_last)
    _check_half_within_eager_error(name, dtype, "cuda", x32, torch.randn(shape, device="cuda"))


@requires_cuda
@requires_cuda_kernels("gates")
@pytest.mark.parametrize("name", ["cbat", "elat"])
def test_cuda_gates_gradcheck_float64_and_opcheck(name):
    """float64 gradcheck of backend="cuda" w.r.t. x and every parameter, and
    torch.library.opcheck of disseg::gates_fwd / gates_bwd on CUDA tensors."""
    from disseg_kernels.ops import gates as og

    torch.manual_seed(33)
    module = MODULES[name](5, backend="cuda").cuda().double()
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64, device="cuda", requires_grad=True)
    params = list(module.parameters())
    names = [n for n, _ in module.named_parameters()]

    def f(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(module, dict(zip(names, ps))):
            return module(x)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)
    m32 = MODULES[name](6, backend="cuda").cuda()
    x32 = torch.randn(2, 6, 5, 4, device="cuda", requires_grad=True)
    ps = [p.detach().requires_grad_() for p in m32._params()]
    torch.library.opcheck(og._gates_fwd, (x32, ps, name, "cuda"))
    out, saved = og._gates_fwd(x32.detach(), [p.detach() for p in ps], name, "cuda")
    torch.library.opcheck(og._gates_bwd, (torch.randn_like(out), x32.detach(), [p.detach() for p in ps], saved, name, "cuda"))


@requires_cuda
@requires_cuda_kernels("telu")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_telu_matches_reference(dtype):
    """backend="cuda": values and gradients against the eager formula (|x| ≤ 12, where it
    has no NaN) in both layouts, on sizes with a tail after the 16-byte vectors and on a
    misaligned view (the one-element path); extremes finite with the right limits."""
    torch.manual_seed(34)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for shape, cl in [((3, 5, 7, 9), False), ((3, 5, 7, 9), True), ((4099,), False)]:
        base = (torch.rand(shape, device="cuda", dtype=torch.float64) * 24 - 12).to(dtype)
        if cl:
            base = base.to(memory_format=torch.channels_last)
        views = [base] + ([base.view(-1)[1:]] if len(shape) == 1 else [])
        for x in views:
            x = x.detach().requires_grad_()
            go = torch.randn_like(x)
            y = dk.telu(x, backend="cuda")
            (g,) = torch.autograd.grad(y, x, go)
            xd = x.detach().double().requires_grad_()
            yr = telu_reference(xd)
            (gr,) = torch.autograd.grad(yr, xd, go.double())
            torch.testing.assert_close(y.double(), yr.to(dtype).double(), atol=tol, rtol=tol)
            torch.testing.assert_close(g.double(), gr, atol=tol, rtol=tol)
            assert y.stride() == x.stride() and g.stride() == x.stride()
    ext = torch.tensor(EXTREME, dtype=dtype, device="cuda", requires_grad=True)
    y = dk.telu(ext, backend="cuda")
    (g,) = torch.autograd.grad(y.sum(), ext)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    assert g[-4:].eq(1).all() and y[-4:].eq(ext[-4:]).all()


@requires_cuda
@requires_cuda_kernels("telu")
def test_cuda_telu_same_bits_as_cpu_kernel_and_opcheck():
    """The CUDA and C++ kernels share one formulation: float32 results agree to a few ulps
    (expf vs SLEEF), float64 to rounding; opcheck on CUDA tensors."""
    from disseg_kernels.ops import telu as t

    x = torch.randn(10007, dtype=torch.float64) * 6
    for dtype, tol in ((torch.float32, 2e-6), (torch.float64, 1e-13)):
        xc = x.to(dtype)
        torch.testing.assert_close(dk.telu(xc.cuda(), backend="cuda").cpu(), dk.telu(xc, backend="cpu"), atol=tol, rtol=tol)
    torch.library.opcheck(t._telu_op, (torch.randn(3, 4, device="cuda", requires_grad=True), "cuda"))
    torch.library.opcheck(t._telu_backward_op, (torch.randn(3, 4, device="cuda"), torch.randn(3, 4, device="cuda"), "cuda"))


@requires_cuda
@requires_cuda_kernels("multiscale")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_multiscale_matches_reference(dtype, channels_last):
    """backend="cuda": values and input gradients equal cat(F.interpolate(...,
    align_corners=True)) for factors 1, 2, 4, 8 and 16 on odd sizes (a 1×1 input too), both
    layouts; the output takes the first input's layout, each gradient its input's."""
    torch.manual_seed(35)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for shapes, scales in [([(2, 3, 24, 16), (2, 5, 12, 8), (2, 1, 6, 4), (2, 2, 3, 2)], [1, 2, 4, 8]),
                           ([(1, 33, 16, 16), (1, 3, 1, 1), (1, 7, 2, 2)], [1, 16, 8])]:
        ts = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
        if channels_last:
            ts = [t.to(memory_format=torch.channels_last) for t in ts]
        ts = [t.requires_grad_() for t in ts]
        y = dk.multiscale_concat(ts, scales, backend="cuda")
        go = torch.randn_like(y)
        g = torch.autograd.grad(y, ts, go)
        t64 = [t.detach().double().requires_grad_() for t in ts]
        yr = multiscale_concat_reference(t64, scales)
        gr = torch.autograd.grad(yr, t64, go.double())
        torch.testing.assert_close(y.double(), yr, atol=tol, rtol=tol)
        for a, b, t in zip(g, gr, ts):
            torch.testing.assert_close(a.double(), b, atol=tol * 10, rtol=tol)
            assert a.dtype == t.dtype and a.shape == t.shape
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@requires_cuda
@requires_cuda_kernels("multiscale")
def test_cuda_multiscale_gradcheck_and_opcheck():
    """float64 gradcheck of backend="cuda" and opcheck of disseg::multiscale_concat on CUDA."""
    from disseg_kernels.ops import multiscale as m

    ts = [torch.randn(1, 2, 6, 4, dtype=torch.float64, device="cuda", requires_grad=True),
          torch.randn(1, 3, 3, 2, dtype=torch.float64, device="cuda", requires_grad=True)]
    assert torch.autograd.gradcheck(lambda a, b: dk.multiscale_concat([a, b], [1, 2], backend="cuda"), ts)
    ts32 = [t.detach().float().requires_grad_() for t in ts]
    torch.library.opcheck(m._multiscale_op, (ts32, [1, 2], "cuda"))


@pytest.mark.skipif("cpu" not in GATE_BACKENDS, reason="C++ gate kernels unavailable")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_pool_ops_first_argmax(channels_last, dtype):
    """csrc/gates.cpp's pools over H·W and over C: mean, max and the *first* arg-max, on
    integer-valued maps full of ties, with H·W = 221 and C = 150 (the arg-max search runs
    in 64-wide chunks: the first maximum sits in a later chunk for some rows), with and
    without a gate; a row with a NaN answers NaN (PyTorch's max pools propagate NaN) at its
    first NaN (as torch.max; adaptive_max_pool2d gives the last), a row of -inf only -inf at index 0, in both pools and both layouts."""
    torch.manual_seed(13)
    b, c, h, w = 2, 150, 13, 17
    x = torch.randint(-3, 3, (b, c, h, w)).to(dtype)
    x[0, 5, :, :] = -3.0
    x[0, 5, 12, 16] = 2.0  # the only maximum, in the last chunk
    x[1, :, 0, 0] = x[1, :, 0, 0].clamp(max=0)  # pixel (1, 0, 0): its maximum later along C
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    flat = x.float().reshape(b, c, h * w)
    S = torch.rand(b, h * w) + 0.5
    G = torch.rand(b, c) + 0.5
    for gate_hw, gate_c in ((None, None), (S, G)):
        y = flat * (gate_hw[:, None, :] if gate_hw is not None else 1.0)
        mean, mx, idx = torch.ops.disseg.gates_pool_hw(x, gate_hw)
        torch.testing.assert_close(mean, y.mean(2), atol=1e-5, rtol=1e-5)
        assert torch.equal(mx, y.amax(2))
        assert torch.equal(idx, (y == y.amax(2, keepdim=True)).float().argmax(2))
        y = flat * (gate_c[:, :, None] if gate_c is not None else 1.0)
        mean, mx, idx = torch.ops.disseg.gates_pool_c(x, gate_c)
        torch.testing.assert_close(mean, y.mean(1), atol=1e-5, rtol=1e-5)
        assert torch.equal(mx, y.amax(1))
        assert torch.equal(idx, (y == y.amax(1, keepdim=True)).float().argmax(1))
    assert int(torch.ops.disseg.gates_pool_hw(x, None)[2][0, 5]) == h * w - 1
    xn = torch.full((1, 2, 9, 9), float("nan"), dtype=dtype)
    if channels_last:
        xn = xn.contiguous(memory_format=torch.channels_last)
    for op in (torch.ops.disseg.gates_pool_hw, torch.ops.disseg.gates_pool_c):
        _, mx, idx = op(xn, None)  # all NaN: NaN at index 0, as torch.max
        assert mx.isnan().all() and (idx == 0).all(), op
    # NaN with one -inf: still NaN, at the first NaN (the -inf is not above it)
    xn[0, 1, 4, 4] = float("-inf")
    xn[0, 0, 0, 0] = xn[0, 1, 0, 0] = float("-inf")
    _, mx, idx = torch.ops.disseg.gates_pool_hw(xn, None)
    assert idx.tolist() == [[1, 1]] and mx.isnan().all()
    _, mx, idx = torch.ops.disseg.gates_pool_c(xn, None)
    assert int(idx[0, 40]) == 0 and mx[0, 0] == float("-inf") and int(idx[0, 0]) == 0 and mx[0, 1:].isnan().all()
    # inf and -inf without a NaN: the sum is NaN, the max +inf at its first index
    xi = torch.zeros(1, 3, 4, 4, dtype=dtype)
    xi[0, :, 1, 1], xi[0, :, 2, 2], xi[0, :, 3, 0] = float("-inf"), float("inf"), float("inf")
    if channels_last:
        xi = xi.contiguous(memory_format=torch.channels_last)
    _, mx, idx = torch.ops.disseg.gates_pool_hw(xi, None)
    assert (mx == float("inf")).all() and (idx == 10).all()
    xc = torch.zeros(1, 3, 2, 2, dtype=dtype)
    xc[0, 0, 0, 1], xc[0, 1, 0, 1], xc[0, 2, 0, 1] = float("-inf"), float("inf"), float("inf")
    if channels_last:
        xc = xc.contiguous(memory_format=torch.channels_last)
    _, mx, idx = torch.ops.disseg.gates_pool_c(xc, None)
    assert mx[0, 1] == float("inf") and int(idx[0, 1]) == 1


@pytest.mark.skipif("cpu" not in GATE_BACKENDS, reason="C++ gate kernels unavailable")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_stencil_kernels_match_convolution(channels_last, dtype):
    """csrc/gates.cpp's ELAT stencil (K×K, C→1, zero padding K/2): the logit, the input
    gradient (gates_grad_x's stencil term, added to the map's value) and the weight
    gradient equal the float64 convolutions, at K = 7 and 3, odd sizes, one-pixel rows and
    columns, several row bands, both layouts (no copy: dx keeps x's)."""
    import torch.nn.functional as F

    torch.manual_seed(11)
    tol = 1e-2 if dtype == torch.bfloat16 else (1e-12 if dtype == torch.float64 else 1e-5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # (1, 3, 70, 5): the forward works in bands of 32 output rows, each reading R halo rows
    cases = (((2, 5, 9, 11), 7), ((3, 3, 1, 6), 3), ((2, 17, 6, 1), 7), ((1, 4, 3, 2), 7), ((1, 3, 70, 5), 7))
    for shape, k in cases:
        x = torch.randn(shape, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        w = torch.randn(1, shape[1], k, k, dtype=acc)
        g = torch.randn(shape[0], shape[2] * shape[3], dtype=acc)
        g4 = g.double().view(shape[0], 1, shape[2], shape[3])
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        base = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
        dx = torch.ops.disseg.gates_grad_x(base, base, None, None, [], [], [], [], [], w, g)
        got = (torch.ops.disseg.gates_stencil(x, w), dx.double() - base.double(),
               torch.ops.disseg.gates_stencil_grad_weight(x, g, k))
        want = (F.conv2d(x.double(), w.double(), padding=k // 2).reshape(shape[0], -1),
                torch.nn.grad.conv2d_input(shape, w.double(), g4, padding=k // 2),
                torch.nn.grad.conv2d_weight(x.double(), w.shape, g4, padding=k // 2))
        for name, a, b in zip(("logit", "dx", "dw"), got, want):
            err = ((a.double() - b).abs().max() / b.abs().max()).item()
            assert err < (0.05 if name == "dx" and dtype == torch.bfloat16 else tol), (shape, k, name, err)
        assert dx.stride() == base.stride()


@pytest.mark.skipif("cpu" not in GATE_BACKENDS, reason="C++ gate kernels unavailable")
def test_stencil_ops_with_elat_taps_read_only_elats_taps():
    """elat_taps on the stencil ops (the logit, alone and with the pool; gates_grad_x's
    stencil term; the weight gradient): only ELAT's 25 taps of w are read, so a dense w
    gives the result of w masked to them (the weight gradient is 0 off them). The CUDA
    kernels unroll exactly those taps; the CPU GEMMs take 25 rows instead of 49. The stencil
    term adds to the statistics' terms in the same call; bad stencil arguments are named."""
    import torch.nn.functional as F

    E = torch.ops.disseg
    g = torch.Generator().manual_seed(5)
    b, c, h, w = 2, 5, 9, 13
    x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    wt = torch.randn(1, c, 7, 7, generator=g, dtype=torch.float64)  # dense: 49 taps
    dl = torch.randn(b, h * w, generator=g, dtype=torch.float64)
    r = torch.arange(7) - 3
    mask = ((r[:, None] == 0) | (r[None, :] == 0) | (r[:, None].abs() == r[None, :].abs())).double()
    assert int(mask.sum()) == 25
    dl4 = dl.view(b, 1, h, w)
    L, Rk = torch.randn(b, c, generator=g, dtype=torch.float64), torch.randn(b, h * w, generator=g, dtype=torch.float64)
    term = L[:, :, None, None] * Rk.view(b, 1, h, w)
    for elat, taps in ((False, wt), (True, wt * mask)):
        got = E.gates_grad_x(None, x, None, None, [L], [Rk], [None], [None], [0], wt, dl, elat)
        want = term + torch.nn.grad.conv2d_input(x.shape, taps, dl4, padding=3)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(E.gates_grad_x(None, x, None, None, [], [], [], [], [], wt, dl, True),
                              E.gates_grad_x(None, x, None, None, [], [], [], [], [], wt, dl, False))
    for elat, taps in ((False, wt), (True, wt * mask)):
        logit = F.conv2d(x, taps, padding=3).reshape(b, h * w)
        torch.testing.assert_close(E.gates_stencil(x, wt, elat), logit, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(E.gates_pool_hw_stencil(x, wt, elat)[3], logit, atol=1e-12, rtol=1e-12)
        dw = torch.nn.grad.conv2d_weight(x, wt.shape, dl4, padding=3) * (mask if elat else 1)
        torch.testing.assert_close(E.gates_stencil_grad_weight(x, dl, 7, elat), dw, atol=1e-11, rtol=1e-12)
    with pytest.raises(RuntimeError, match="elat_taps needs a 7×7 w"):
        E.gates_stencil(x, wt[:, :, :5, :5].contiguous(), True)
    with pytest.raises(RuntimeError, match="elat_taps needs K = 7"):
        E.gates_stencil_grad_weight(x, dl, 5, True)
    with pytest.raises(RuntimeError, match="stencil_w and stencil_g must be both given"):
        E.gates_grad_x(None, x, None, None, [], [], [], [], [], wt, None)
    with pytest.raises(RuntimeError, match="elat_taps needs a 7×7 stencil_w"):
        E.gates_grad_x(None, x, None, None, [], [], [], [], [], wt[:, :, :5, :5].contiguous(), dl, True)
    with pytest.raises(RuntimeError, match="elat_taps needs a 7×7 stencil_w"):
        E.gates_grad_x(None, x, None, None, [], [], [], [], [], None, None, True)
    with pytest.raises(RuntimeError, match="g must be"):
        E.gates_grad_x(None, x, None, None, [], [], [], [], [], wt, dl[:, :-1].contiguous())


# ---------------------------------------------------------------------------------------
# The small programs as C++/CUDA ops (csrc/gates_small.h): the channel MLP and the
# spatial gate, against their torch formulas differentiated by autograd (float64).
# ---------------------------------------------------------------------------------------

_MLP_CASES = [  # B, C, HID, telu, pair, G0, biases
    (2, 17, 3, True, True, True, True),
    (3, 40, 8, False, True, False, False),
    (2, 33, 4, True, False, False, False),
    (1, 5, 1, True, True, True, True),
]
_SPATIAL_CASES = [  # B, H, W, S0, bias, k
    (2, 5, 7, True, True, 7),
    (3, 9, 4, False, False, 7),
    (1, 1, 1, True, False, 3),
    (1, 3, 20, False, True, 5),
]


def _mlp_inputs(case, device, dtype, seed):
    b, c, hid, telu, pair, g0, bias = case
    g = torch.Generator().manual_seed(seed)

    def r(*shape, pos=False):
        t = torch.rand(*shape, generator=g, dtype=dtype) + 0.1 if pos else torch.randn(*shape, generator=g, dtype=dtype)
        return t.to(device)

    return dict(a=r(b, c), m=r(b, c) if pair else None, G0=r(b, c, pos=True) if g0 else None, w1=r(hid, c),
                b1=r(hid) if bias else None, w2=r(c, hid), b2=r(c) if bias else None, telu=telu, dgate=r(b, c))


def _spatial_inputs(case, device, dtype, seed):
    b, h, w, s0, bias, k = case
    g = torch.Generator().manual_seed(seed)

    def r(*shape, pos=False):
        t = torch.rand(*shape, generator=g, dtype=dtype) + 0.1 if pos else torch.randn(*shape, generator=g, dtype=dtype)
        return t.to(device)

    return dict(mean=r(b, h * w), mx=r(b, h * w), S0=r(b, h * w, pos=True) if s0 else None, w=r(1, 2, k, k),
                bias=r(1) if bias else None, width=w, dgate=r(b, h * w))


def _mlp_ops(i, scale_a):
    E = torch.ops.disseg
    H, T, U, TH, g, gate = E.gates_channel_mlp_fwd(i["a"], i["m"], i["G0"], i["w1"], i["b1"], i["w2"], i["b2"], i["telu"])
    grads = E.gates_channel_mlp_bwd(i["dgate"], i["a"], i["m"], i["G0"], H, T, U if i["telu"] else None,
                                    TH if i["telu"] else None, g, i["w1"], i["w2"], i["telu"], i["b1"] is not None, scale_a)
    return (H, T, g, gate), grads


def _spatial_ops(i, scale_mean):
    E = torch.ops.disseg
    s, gate = E.gates_spatial_fwd(i["mean"], i["mx"], i["S0"], i["w"], i["bias"], i["width"])
    grads = E.gates_spatial_bwd(i["dgate"], i["S0"], s, i["mean"], i["mx"], i["w"], i["bias"] is not None, i["width"],
                                scale_mean)
    return (s, gate), grads


@requires_cpu_ext
@pytest.mark.parametrize("case", _MLP_CASES)
def test_channel_mlp_op_matches_autograd(case):
    """gates_channel_mlp_fwd/bwd (C++) against H = W1·(x·G0) + b1, act, g = σ(W2·ΣT + 2·b2),
    gate = G0·g differentiated by autograd in float64: every output and every gradient
    (da scaled by scale_a, an absent input's gradient an empty tensor)."""
    i = _mlp_inputs(case, "cpu", torch.float64, 7)
    (H, T, g, gate), (da, dm, dG0, dw1, db1, dw2, db2) = _mlp_ops(i, 0.3)
    leaves = {k: v.clone().requires_grad_() for k, v in i.items() if isinstance(v, torch.Tensor) and k != "dgate"}
    rows = [leaves["a"]] + ([leaves["m"]] if "m" in leaves else [])
    A = torch.stack(rows) * (leaves["G0"] if "G0" in leaves else 1.0)
    H_ref = A @ leaves["w1"].t() + (leaves["b1"] if "b1" in leaves else 0.0)
    T_ref = H_ref * torch.tanh(torch.exp(H_ref)) if i["telu"] else torch.relu(H_ref)
    Z = (T_ref @ leaves["w2"].t() + (leaves["b2"] if "b2" in leaves else 0.0)).sum(0)
    g_ref = torch.sigmoid(Z)
    gate_ref = g_ref * leaves["G0"] if "G0" in leaves else g_ref
    (gate_ref * i["dgate"]).sum().backward()
    close = lambda u, v: torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-10)  # noqa: E731
    close(H, H_ref.detach().flatten(0, 1))
    close(T, T_ref.detach().flatten(0, 1))
    close(g, g_ref.detach())
    close(gate if i["G0"] is not None else g, gate_ref.detach())
    close(da, leaves["a"].grad * 0.3)
    close(dw1, leaves["w1"].grad)
    close(dw2, leaves["w2"].grad)
    for name, got in (("m", dm), ("G0", dG0), ("b1", db1), ("b2", db2)):
        if name in leaves:
            close(got, leaves[name].grad)
        else:
            assert got.numel() == 0, name


@requires_cpu_ext
@pytest.mark.parametrize("case", _SPATIAL_CASES)
def test_spatial_gate_op_matches_autograd(case):
    """gates_spatial_fwd/bwd (C++) against s = σ(conv_k([mean, max]·S0) + bias), gate = S0·s
    differentiated by autograd in float64 (maps of 1×1 to 9×4, k = 3, 5, 7: taps that fall
    outside the map on every side)."""
    i = _spatial_inputs(case, "cpu", torch.float64, 8)
    (s, gate), (dmean, dmax, dS0, dw, db) = _spatial_ops(i, 0.25)
    b, p = i["mean"].shape
    h, w = p // i["width"], i["width"]
    leaves = {k: v.clone().requires_grad_() for k, v in i.items() if isinstance(v, torch.Tensor) and k != "dgate"}
    M = torch.stack([leaves["mean"], leaves["mx"]], 1) * (leaves["S0"].unsqueeze(1) if "S0" in leaves else 1.0)
    k = i["w"].shape[-1]
    s_ref = torch.sigmoid(F.conv2d(M.view(b, 2, h, w), leaves["w"], leaves.get("bias"), padding=k // 2)).view(b, p)
    gate_ref = s_ref * leaves["S0"] if "S0" in leaves else s_ref
    (gate_ref * i["dgate"]).sum().backward()
    close = lambda u, v: torch.testing.assert_close(u, v, atol=1e-12, rtol=1e-10)  # noqa: E731
    close(s, s_ref.detach())
    close(gate if i["S0"] is not None else s, gate_ref.detach())
    close(dmean, leaves["mean"].grad * 0.25)
    close(dmax, leaves["mx"].grad)
    close(dw, leaves["w"].grad)
    for name, got in (("S0", dS0), ("bias", db)):
        if name in leaves:
            close(got, leaves[name].grad)
        else:
            assert got.numel() == 0, name


@requires_cpu_ext
def test_small_program_ops_name_bad_arguments():
    """The ops' argument errors name the argument and its value."""
    E = torch.ops.disseg
    a = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match=r"w2 must be \(C, HID\)"):
        E.gates_channel_mlp_fwd(a, None, None, torch.randn(2, 8), None, torch.randn(2, 8), None, True)
    with pytest.raises(RuntimeError, match="b1 and b2 must be both given"):
        E.gates_channel_mlp_fwd(a, None, None, torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), None, True)
    with pytest.raises(RuntimeError, match="G0 must be Double"):
        E.gates_channel_mlp_fwd(a.double(), None, torch.rand(2, 8), torch.randn(2, 8).double(), None,
                                torch.randn(8, 2).double(), None, True)
    m = torch.randn(2, 12)
    with pytest.raises(RuntimeError, match="width must be ≥ 1 and divide H·W = 12, got 5"):
        E.gates_spatial_fwd(m, m, None, torch.randn(1, 2, 7, 7), None, 5)
    with pytest.raises(RuntimeError, match=r"w must be \(1, 2, K, K\) with K odd"):
        E.gates_spatial_fwd(m, m, None, torch.randn(1, 2, 4, 4), None, 4)
    with pytest.raises(RuntimeError, match="S0 must have 24 elements"):
        E.gates_spatial_fwd(m, m, torch.rand(2, 11), torch.randn(1, 2, 3, 3), None, 4)


@requires_cuda
@requires_cuda_kernels("gates")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_small_program_ops_match_cpu(dtype):
    """The CUDA channel-MLP and spatial-gate ops against the C++ ones on the same data (and
    larger shapes than the CPU tests: C = 1024 with HID = 64, a 128×128 map: many blocks
    of per-block weight-gradient partials)."""
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-4, rtol=1e-4)
    mlp = _MLP_CASES + [(8, 1024, 64, True, True, True, True), (8, 256, 16, False, True, False, False)]
    spatial = _SPATIAL_CASES + [(8, 128, 128, True, True, 7), (2, 64, 96, False, False, 7)]
    for cases, inputs, ops, scale in ((mlp, _mlp_inputs, _mlp_ops, 0.3), (spatial, _spatial_inputs, _spatial_ops, 0.25)):
        for n, case in enumerate(cases):
            cpu = ops(inputs(case, "cpu", dtype, n), scale)
            dev = ops(inputs(case, "cuda", dtype, n), scale)
            for u, v in zip([*cpu[0], *cpu[1]], [*dev[0], *dev[1]]):
                assert u.shape == v.shape, case
                torch.testing.assert_close(v.cpu(), u, **tol, msg=lambda m: f"{case}: {m}")


@requires_cuda
@requires_cuda_kernels("gates")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_stencil_ops_match_cpu(layout, dtype):
    """ELAT's K×K C→1 stencil on CUDA (csrc/gates_cuda.cu: staged tiles, zero taps skipped)
    against the C++ ops: the logit (alone, and with the H·W pool taken from the staged tiles,
    arg-max ties included), the input gradient in gates_grad_x's pass and the weight
    gradient; every tap on ELAT's composite (zero taps skipped) and, with elat_taps, on a
    dense w (the kernels' 25 compile-time taps against the CPU's 25-tap GEMMs); on maps that
    are not multiples of the 8×32 tile, K = 3 and 7, C = 70 and 260 (two weight or channel
    chunks of the dx kernel), and the model's 8×64×256×256 (many tile groups in the
    weight gradient)."""
    E = torch.ops.disseg
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = {torch.float64: dict(atol=1e-9, rtol=1e-9), torch.float32: dict(atol=1e-3, rtol=1e-4),
           torch.bfloat16: dict(atol=5e-2, rtol=1e-2)}[dtype]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for (b, c, h, w), k in [((2, 3, 5, 7), 7), ((1, 17, 9, 40), 7), ((2, 9, 12, 33), 3), ((1, 70, 9, 33), 7),
                            ((1, 260, 3, 5), 7), ((8, 64, 256, 256), 7)]:
        g = torch.Generator().manual_seed(b * c + h * w)
        x = torch.randn(b, c, h, w, generator=g).to(dtype).contiguous(memory_format=fmt)
        wt = torch.zeros(1, c, k, k, dtype=acc)
        for d in range(1, k // 2 + 1):  # ELAT's composite: taps of dilation d at rows/cols R−d, R, R+d
            r = k // 2
            wt[:, :, r - d : r + d + 1 : d, r - d : r + d + 1 : d] += torch.randn(1, c, 3, 3, generator=g, dtype=acc)
        dl = torch.randn(b, h * w, generator=g, dtype=acc)
        scale = max(1.0, (c * k * k) ** 0.5)  # sums of c·k² products: absolute tolerance grows with them
        xt = x.float().mul(2).round().to(dtype).contiguous(memory_format=fmt)  # arg-max ties: a coarse copy of x
        d0 = torch.randn(b, c, h, w, generator=g).to(dtype).contiguous(memory_format=fmt)
        G, S = torch.rand(b, c, generator=g, dtype=acc), torch.rand(b, h * w, generator=g, dtype=acc)
        big = scale * (h * w * b) ** 0.5
        # every tap (ELAT's composite: zeros skipped), and elat_taps on a dense w: the CUDA kernels
        # unroll ELAT's 25 taps, the CPU's GEMMs take the same 25
        dense = torch.randn(1, c, k, k, generator=g, dtype=acc)
        for elat, ww in ((False, wt), (True, dense)) if k == 7 else ((False, wt),):
            torch.testing.assert_close(E.gates_stencil(x.cuda(), ww.cuda(), elat).cpu(), E.gates_stencil(x, ww, elat),
                                       atol=tol["atol"] * scale, rtol=tol["rtol"])
            # the pool taken from the stencil's staged tiles
            fused = E.gates_pool_hw_stencil(xt.cuda(), ww.cuda(), elat)
            for u, v in zip(fused, (*E.gates_pool_hw(xt, None), E.gates_stencil(xt, ww, elat))):
                if v.dtype == torch.long:
                    assert torch.equal(u.cpu(), v)
                else:
                    torch.testing.assert_close(u.cpu(), v, atol=tol["atol"] * scale, rtol=tol["rtol"])
            torch.testing.assert_close(E.gates_stencil_grad_weight(x.cuda(), dl.cuda(), k, elat).cpu(),
                                       E.gates_stencil_grad_weight(x, dl, k, elat), atol=tol["atol"] * big,
                                       rtol=tol["rtol"])
            # the input gradient in the map's pass: grad·G·S plus the stencil term
            dd = E.gates_grad_x(d0.cuda(), x.cuda(), G.cuda(), S.cuda(), [], [], [], [], [], ww.cuda(), dl.cuda(), elat)
            dc = E.gates_grad_x(d0, x, G, S, [], [], [], [], [], ww, dl, elat)
            assert dd.stride() == d0.stride()
            torch.testing.assert_close(dd.cpu(), dc, atol=tol["atol"] * scale, rtol=tol["rtol"])


@pytest.mark.parametrize("backend", GATE_BACKENDS)
@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_nan_spreads_as_in_the_plain_module(backend, name, channels_last):
    """A NaN in x reaches the same outputs as through the plain formula. What this decides
    is the channel MLP's ReLU, which now keeps a NaN (as torch.relu does; it made it 0, so
    a NaN pixel spread less far with fused=True). The max pools' NaN rule cannot show here
    (the mean pools carry the NaN into the same gates): test_cpu_pools_take_the_first_nan
    and the Triton/CUDA pool tests check it."""
    _check_nan_spreads(MODULES[name](16, backend=backend), (7, 9), "cpu", channels_last, tol=1e-5)


def _check_nan_spreads(module, hw, device, channels_last, tol):
    """NaN at a few pixels (two at one pixel), -inf at one: the fused and plain outputs have
    the same NaNs and agree elsewhere."""
    torch.manual_seed(0)
    x = torch.randn(3, 16, *hw)
    x[0, 3, 2, 4] = float("nan")
    x[1, 5, 0, 0] = x[1, 6, 0, 0] = float("nan")
    x[2, 1, 3, 3] = float("-inf")  # -inf without NaN: no NaN from the pools either way
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = _set_fused(module, True)(x)
        yr = _set_fused(module, False)(x)
    assert y.isnan().any()
    assert torch.equal(y.isnan(), yr.isnan())
    finite = ~yr.isnan()
    torch.testing.assert_close(y[finite], yr[finite], atol=tol, rtol=tol)


def _check_pools_take_the_first_nan(pool_hw, pool_c, device, channels_last, dtype=torch.float32):
    """pool_hw / pool_c: a NaN is the max at its first index; a row of -inf only answers
    -inf at index 0; with or without a gate."""
    x = torch.randn(2, 4, 3, 5)
    x[0, 1, 1, 2] = x[0, 1, 2, 0] = float("nan")  # pool over H·W of (0, 1): first NaN at 7
    x[1, 2] = float("-inf")  # (1, 2) all -inf
    x[1, 0, 2, 4] = x[1, 3, 2, 4] = float("nan")  # pool over C of pixel 14 of sample 1: first NaN at c = 0
    x = x.to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for gate in (None, torch.rand(2, 15, device=device) + 0.5):
        _, mx, idx = pool_hw(x, gate)
        mx, idx = mx.cpu(), idx.cpu()
        assert mx[0, 1].isnan() and idx[0, 1] == 7
        assert mx[1, 2] == float("-inf") and idx[1, 2] == 0
        assert torch.equal(mx.isnan(), torch.tensor([[False, True, False, False], [True, False, False, True]]))
    _, mx, idx = pool_c(x, torch.rand(2, 4, device=device) + 0.5)
    mx, idx = mx.cpu(), idx.cpu()
    assert mx[1, 14].isnan() and idx[1, 14] == 0
    assert mx[0, 7].isnan() and idx[0, 7] == 1
    assert int(mx.isnan().sum()) == 3


@requires_cpu_ext
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_pools_take_the_first_nan(channels_last, dtype):
    """csrc/gates.cpp's gates_pool_hw / gates_pool_c (the NaN-skipping pools failed it);
    float16 rows are widened to float before the pools' lane loops."""
    _check_pools_take_the_first_nan(torch.ops.disseg.gates_pool_hw, torch.ops.disseg.gates_pool_c, "cpu",
                                    channels_last, dtype)


@pytest.mark.skipif(not TRITON_GATES, reason="Triton gate kernels unavailable")
@pytest.mark.parametrize("tiles,target,channels_last", [((2, 4), 64, False), ((4, 2), 1000, True), (None, None, False)])
def test_triton_pools_take_the_first_nan_through_splits(monkeypatch, channels_last, tiles, target):
    """The Triton pools with forced tiles and splits (partials merged by a second launch):
    a NaN is the max at its first index whichever piece holds it; -inf rows keep index 0;
    the H·W pool of ELAT's stencil read agrees with the plain pool."""
    from disseg_kernels.triton import gates as tg

    monkeypatch.setattr(tg, "FORCE_TILES", tiles)
    monkeypatch.setattr(tg, "FORCE_TARGET_PROGRAMS", target)
    b, c, h, w = 2, 7, 3, 5
    x = torch.randn(b, c, h, w)
    x[0, 2, 2, 1] = x[0, 2, 0, 3] = float("nan")  # H·W pool of (0, 2): first NaN at p = 3 (a later piece holds 11)
    x[1, 4] = float("-inf")
    x[1, 6, 1, 1] = x[1, 1, 1, 1] = x[1, 4, 1, 1] = float("nan")  # C pool of pixel 6 of sample 1: first NaN at c = 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _, mx, idx = tg.pool_hw(x, None)
    assert mx[0, 2].isnan() and int(idx[0, 2]) == 3
    assert int(mx.isnan().sum()) == 4  # (0, 2), (1, 1), (1, 4), (1, 6)
    assert mx[1, 4].isnan() and int(idx[1, 4]) == 6
    _, mx, idx = tg.pool_c(x, torch.rand(b, c) + 0.1)
    assert mx[1, 6].isnan() and int(idx[1, 6]) == 1
    assert mx[0, 11].isnan() and int(idx[0, 11]) == 2 and int(mx.isnan().sum()) == 3
    y = torch.randn(b, c, h, w)
    y[0, 1] = float("-inf")
    _, mx, idx = tg.pool_hw(y.to(memory_format=torch.channels_last) if channels_last else y, None)
    assert mx[0, 1] == float("-inf") and int(idx[0, 1]) == 0


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_nan_spreads_as_in_the_plain_module(_no_tf32, backend, name, channels_last):
    """test_nan_spreads_as_in_the_plain_module on CUDA tensors, for the CUDA and the Triton
    kernels (the channel MLP's ReLU; the pools' NaN rule: test_gpu_pools_take_the_first_nan)."""
    if _backend.unavailable_reason("gates", backend, torch.device("cuda")):
        pytest.skip(_backend.unavailable_reason("gates", backend, torch.device("cuda")))
    _check_nan_spreads(MODULES[name](16, backend=backend).cuda(), (40, 36), "cuda", channels_last, tol=1e-4)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_pools_take_the_first_nan(backend, channels_last):
    """The CUDA kernels' pools (take/merge order) and the Triton pools on CUDA tensors: the
    CPU test's cases (the emulator checks the CUDA order on the CPU too)."""
    if _backend.unavailable_reason("gates", backend, torch.device("cuda")):
        pytest.skip(_backend.unavailable_reason("gates", backend, torch.device("cuda")))
    if backend == "cuda":
        pools = (torch.ops.disseg.gates_pool_hw, torch.ops.disseg.gates_pool_c)
    else:
        from disseg_kernels.triton import gates as tg

        pools = (tg.pool_hw, tg.pool_c)
    _check_pools_take_the_first_nan(*pools, "cuda", channels_last)
