"""Attention gates (channel, spatial, CBAM, ELAT, the CBAT chain): modules and fused ops.

Each module holds its parameters under the same names in both modes; ``fused=False`` runs
the eager formula of ``reference.gates``, ``fused=True`` the fused path (see
``_fused_gates`` below), chosen per device by ``_backend.resolve("gates", ...)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _backend
from ..reference import gates as ref


from .telu import TeLU


def _check_x(x: torch.Tensor, channels: int | None, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name}: x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: x must be a floating-point tensor, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: x has {x.shape[1]} channels, the module was built for channels={channels}")


def _check_backend(backend):
    if backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")


def _hidden(channels: int, ratio: int, name: str) -> int:
    if channels < 1:
        raise ValueError(f"channels must be ≥ 1, got {channels}")
    if ratio < 1:
        raise ValueError(f"{name} must be ≥ 1, got {ratio}")
    # max(1, ·): a module with fewer channels than the ratio keeps one hidden unit
    # (the authors' C // r would be an empty layer); identical for the model's C ≥ 64.
    return max(1, channels // ratio)


# ---------------------------------------------------------------------------------------
# The fused engine.
#
# A module's fused path is a *program*: small PyTorch code (MLPs, 2→1 convs, sigmoids) on
# statistics of the gated map y = x · G[b, c] · S[b, p] (p = h·W + w), ending in the
# output gates (G, S) with out = x · G · S. The statistics come from one read pass over x
# each (``pool_hw``: mean/max over p of x · S; ``pool_c``: mean/max over c of x · G;
# ``stencil``: ELAT's 7×7 C→1 logit); a gate that multiplies a pooled map from outside is
# applied to the small statistic instead (max(g·y) = g·max(y) for g = σ(·) ≥ 0), so no
# gated map is ever materialised.
#
# ``disseg::gates_fwd`` runs the program with the real kernels and returns out plus the
# small statistics (and arg-max indices); autograd saves x, the parameters and those.
# ``disseg::gates_bwd`` re-runs the program on the saved statistics under autograd (tiny
# tensors), with each statistic's dependence on the earlier gates supplied by a proxy
# whose backward is one pass over x (``gates_reduce``); then writes dx in one pass
# (``gates_grad_x``: grad·G·S plus one rank-1 term per statistic) and scatters the few
# arg-max terms. Backward therefore reads x once per statistic plus once with grad, and
# writes dx once.
# ---------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _CpuKernels:
    @staticmethod
    def pool_hw(x, S):
        return torch.ops.disseg.gates_pool_hw(x, S)

    @staticmethod
    def pool_c(x, G):
        return torch.ops.disseg.gates_pool_c(x, G)

    @staticmethod
    def apply(x, G, S):
        return torch.ops.disseg.gates_apply(x, G, S)

    @staticmethod
    def reduce(x, R, G, S):
        return torch.ops.disseg.gates_reduce(x, R, G, S)

    @staticmethod
    def grad_x(grad, x, G, S, L, Rk):
        return torch.ops.disseg.gates_grad_x(grad, x, G, S, L, Rk)


def _kernels(backend: str):
    if backend == "cpu":
        return _CpuKernels
    if backend == "triton":
        from ..triton import gates as triton_gates

        return triton_gates
    raise ValueError(f"no fused gate kernels for backend {backend!r}")


def _telu_small(t):
    # TeLU on the tiny hidden activations, differentiable and finite for every x:
    # tanh(e^{min(x, 20)}) is exactly 1 from x = 20 on, where the true derivative is 1 too.
    return t * torch.tanh(torch.exp(t.clamp(max=20.0)))


def _pair_sum(t):
    """mlp(avg) + mlp(max) from one MLP call on the stacked [avg; max] (2B, C) rows."""
    half = t.shape[0] // 2
    return t[:half] + t[half:]


def _spatial_gate(mean, mx, weight, bias, shape):
    b, _, h, w = shape
    k = weight.shape[-1]
    m = torch.stack([mean, mx], dim=1).view(b, 2, h, w)
    return torch.sigmoid(F.conv2d(m, weight, bias, padding=k // 2)).reshape(b, h * w)


def _ca_stage(ops, p, shape, G0, S0):
    """ChannelAttention on x·G0·S0: returns the gates after it."""
    w1, w2 = p[0].flatten(1), p[1].flatten(1)
    a, m = ops.pool_hw(S0)
    am = torch.cat([a, m]) if G0 is None else (torch.stack([a, m]) * G0).flatten(0, 1)
    g = torch.sigmoid(_pair_sum(F.linear(F.relu(F.linear(am, w1)), w2)))
    return (g if G0 is None else G0 * g), S0


def _sa_stage(ops, p, shape, G0, S0, bias=None):
    mean, mx = ops.pool_c(G0)
    if S0 is not None:
        mean, mx = S0 * mean, S0 * mx
    s = _spatial_gate(mean, mx, p[0], bias, shape)
    return G0, (s if S0 is None else S0 * s)


def _cbam_stage(ops, p, shape, G0, S0):
    w0, b0, w2, b2, cw, cb = p
    a, m = ops.pool_hw(S0)
    am = torch.cat([a, m]) if G0 is None else (torch.stack([a, m]) * G0).flatten(0, 1)
    g = torch.sigmoid(_pair_sum(F.linear(_telu_small(F.linear(am, w0, b0)), w2, b2)))
    G = g if G0 is None else G0 * g
    return _sa_stage(ops, [cw], shape, G, S0, bias=cb)


def _elat_program(ops, p, shape):
    w0, w2 = p[0], p[1]
    a, _ = ops.pool_hw(None)
    g = torch.sigmoid(F.linear(_telu_small(F.linear(a, w0)), w2))
    w7, bias = ref.elat_composite_stencil(p[2:5], p[5:8], p[8], p[9])
    s = torch.sigmoid(ops.stencil(w7) + bias)
    return g, s


def _cbat_program(ops, p, shape):
    G, S = _ca_stage(ops, p[0:2], shape, None, None)
    G, S = _sa_stage(ops, p[2:3], shape, G, S)
    return _cbam_stage(ops, p[3:9], shape, G, S)


_PROGRAMS = {
    "ca": lambda ops, p, shape: _ca_stage(ops, p, shape, None, None),
    "sa": lambda ops, p, shape: _sa_stage(ops, p, shape, None, None),
    "cbam": lambda ops, p, shape: _cbam_stage(ops, p, shape, None, None),
    "elat": _elat_program,
    "cbat": _cbat_program,
}


def _flat_p(x):
    return x.flatten(2)  # (B, C, P): a view for contiguous and channels_last x


class _RunOps:
    """Forward mode: real kernels; records the statistics for backward."""

    def __init__(self, k, x):
        self.k, self.x, self.saved = k, x, []

    def pool_hw(self, S):
        mean, mx, idx = self.k.pool_hw(self.x, S)
        self.saved += [mean, mx, idx]
        return mean, mx

    def pool_c(self, G):
        mean, mx, idx = self.k.pool_c(self.x, G)
        self.saved += [mean, mx, idx]
        return mean, mx

    def stencil(self, w7):
        x = self.x
        logit = F.conv2d(x, w7.to(x.dtype), None, padding=3).reshape(x.shape[0], -1).to(_acc(x.dtype))
        self.saved.append(logit)
        return logit


class _FakeOps(_RunOps):
    """Shapes only (register_fake)."""

    def pool_hw(self, S):
        b, c = self.x.shape[:2]
        acc = _acc(self.x.dtype)
        out = [self.x.new_empty((b, c), dtype=acc), self.x.new_empty((b, c), dtype=acc), self.x.new_empty((b, c), dtype=torch.long)]
        self.saved += out
        return out[0], out[1]

    def pool_c(self, G):
        b, _, h, w = self.x.shape
        acc = _acc(self.x.dtype)
        out = [self.x.new_empty((b, h * w), dtype=acc), self.x.new_empty((b, h * w), dtype=acc), self.x.new_empty((b, h * w), dtype=torch.long)]
        self.saved += out
        return out[0], out[1]

    def stencil(self, w7):
        b, _, h, w = self.x.shape
        out = self.x.new_empty((b, h * w), dtype=_acc(self.x.dtype))
        self.saved.append(out)
        return out


class _PoolHWProxy(torch.autograd.Function):
    """mean/max over p of x·S as a function of S (x fixed): backward is one pass over x."""

    @staticmethod
    def forward(ctx, S, mean, mx, x, idx, k):
        ctx.x, ctx.idx, ctx.k = x, idx, k
        return mean.clone(), mx.clone()

    @staticmethod
    def backward(ctx, dmean, dmx):
        x, idx = ctx.x, ctx.idx
        p = x.shape[2] * x.shape[3]
        _, dS = ctx.k.reduce(x, None, (dmean / p).contiguous(), None)
        x_at = _flat_p(x).gather(2, idx.unsqueeze(2)).squeeze(2).to(dS.dtype)
        dS = dS.scatter_add(1, idx, dmx * x_at)
        return dS, dmean, dmx, None, None, None


class _PoolCProxy(torch.autograd.Function):
    """mean/max over c of x·G as a function of G (x fixed)."""

    @staticmethod
    def forward(ctx, G, mean, mx, x, idx, k):
        ctx.x, ctx.idx, ctx.k = x, idx, k
        return mean.clone(), mx.clone()

    @staticmethod
    def backward(ctx, dmean, dmx):
        x, idx = ctx.x, ctx.idx
        dG, _ = ctx.k.reduce(x, None, None, (dmean / x.shape[1]).contiguous())
        x_at = _flat_p(x).gather(1, idx.unsqueeze(1)).squeeze(1).to(dG.dtype)
        dG = dG.scatter_add(1, idx, dmx * x_at)
        return dG, dmean, dmx, None, None, None


class _StencilProxy(torch.autograd.Function):
    """ELAT's logit conv(x, w7) as a function of w7 (x fixed)."""

    @staticmethod
    def forward(ctx, w7, logit, x):
        ctx.x, ctx.w_shape = x, w7.shape
        return logit.clone()

    @staticmethod
    def backward(ctx, dlogit):
        x = ctx.x
        b, _, h, w = x.shape
        dw = torch.nn.grad.conv2d_weight(x, ctx.w_shape, dlogit.view(b, 1, h, w).to(x.dtype), padding=3)
        return dw.to(dlogit.dtype), dlogit, None


class _ProxyOps:
    """Backward mode: the saved statistics as autograd leaves, tied to the gates by proxies."""

    def __init__(self, k, x, saved):
        self.k, self.x, self.saved, self.pos = k, x, list(saved), 0
        self.leaves, self.stages = [], []

    def _take(self, n):
        out = self.saved[self.pos : self.pos + n]
        self.pos += n
        return out

    def _pool(self, kind, gate, proxy):
        mean, mx, idx = self._take(3)
        mean_l, mx_l = mean.detach().requires_grad_(), mx.detach().requires_grad_()
        self.leaves += [mean_l, mx_l]
        self.stages.append((kind, None if gate is None else gate.detach(), idx))
        if gate is not None and gate.requires_grad:
            return proxy.apply(gate, mean_l, mx_l, self.x, idx, self.k)
        return mean_l, mx_l

    def pool_hw(self, S):
        return self._pool("hw", S, _PoolHWProxy)

    def pool_c(self, G):
        return self._pool("c", G, _PoolCProxy)

    def stencil(self, w7):
        (logit,) = self._take(1)
        leaf = logit.detach().requires_grad_()
        self.leaves.append(leaf)
        self.stages.append(("stencil", w7.detach(), None))
        return _StencilProxy.apply(w7, leaf, self.x)


class _AutogradInsideOp:
    """Re-enable autograd inside a custom op's implementation.

    A custom op's kernel runs below the Autograd dispatch keys (they are in the
    thread-local exclude set), so tensors made there never require grad. ``gates_bwd``
    differentiates the tiny gate programs (MLPs and 2→1 convs on (B, C) / (B, H·W)
    statistics) with autograd, so it lifts that exclusion for its own body only.
    """

    _KEYS = ("AutogradOther", "AutogradCPU", "AutogradCUDA", "AutogradNestedTensor", "ADInplaceOrView")

    def __enter__(self):
        exclude = torch._C._dispatch_tls_local_exclude_set()
        for name in self._KEYS:
            key = getattr(torch._C.DispatchKey, name, None)
            if key is not None:
                exclude = exclude.remove(key)
        self._guard = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)
        self._grad = torch.enable_grad()
        self._guard.__enter__()
        self._grad.__enter__()
        return self

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self._guard.__exit__(*exc)
        return False


def _match_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t in x's strides (a copy only when an upstream op handed back another layout)."""
    if t.stride() == x.stride():
        return t
    fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()) else torch.contiguous_format
    t = t.contiguous(memory_format=fmt)
    if t.stride() != x.stride():
        t = torch.empty_like(x).copy_(t)
    return t


@torch.library.custom_op("disseg::gates_fwd", mutates_args=())
def _gates_fwd(x: torch.Tensor, params: list[torch.Tensor], program: str, backend: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """out = x·G·S of the named gate program, and the statistics its backward needs."""
    k = _kernels(backend)
    # The gate programs (small MLPs, 2→1 convs) compute in float32 under autocast too: the
    # kernels take float32 gates, and the statistics are accumulated in float32 anyway.
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        acc = _acc(x.dtype)
        pf = [p if p.dtype == acc else p.to(acc) for p in params]
        ops = _RunOps(k, x)
        G, S = _PROGRAMS[program](ops, pf, tuple(x.shape))
        out = k.apply(x, None if G is None else G.contiguous(), None if S is None else S.contiguous())
    return out, ops.saved


@_gates_fwd.register_fake
def _(x, params, program, backend):
    pf = [p.to(_acc(x.dtype)) for p in params]
    ops = _FakeOps(None, x)
    _PROGRAMS[program](ops, pf, tuple(x.shape))
    return torch.empty_like(x), ops.saved


def _fresh_grads(params, grads, inputs=()):
    """The parameter gradients in the parameters' dtypes, each its own storage (a custom
    op's outputs may not alias one another): copied only where autograd handed back a
    view of another gradient or a dtype differs."""
    out, seen = [], {t.untyped_storage().data_ptr() for t in inputs}
    for p, g in zip(params, grads):
        if g is None:
            g = torch.zeros_like(p)
        elif g.dtype != p.dtype or g.untyped_storage().data_ptr() in seen:
            g = g.to(p.dtype, copy=True)
        seen.add(g.untyped_storage().data_ptr())
        out.append(g)
    return out


@torch.library.custom_op("disseg::gates_bwd", mutates_args=())
def _gates_bwd(
    grad: torch.Tensor, x: torch.Tensor, params: list[torch.Tensor], saved: list[torch.Tensor], program: str, backend: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(dx, [dparams]) of :func:`_gates_fwd` for the incoming gradient ``grad``."""
    k = _kernels(backend)
    acc = _acc(x.dtype)
    b, c, h, w = x.shape
    grad = _match_layout(grad, x)
    with _AutogradInsideOp(), torch.autocast(x.device.type, enabled=False):
        pf = [p.detach().to(acc).requires_grad_() for p in params]
        ops = _ProxyOps(k, x, saved)
        G, S = _PROGRAMS[program](ops, pf, (b, c, h, w))
        Gd = None if G is None else G.detach().contiguous()
        Sd = None if S is None else S.detach().contiguous()
        U, V = k.reduce(x, grad, Gd, Sd)
        loss = None
        if G is not None:
            loss = (U * G).sum()
        if S is not None:
            loss = (V * S).sum() if loss is None else loss + (V * S).sum()
        inputs = pf + ops.leaves
        if loss is not None and loss.requires_grad:
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        else:
            grads = [None] * len(inputs)
    dparams = _fresh_grads(params, grads[: len(params)], (x, grad))
    leaf_grads = list(grads[len(params) :])

    # dx = grad·G·S + one rank-1 term per pooled statistic + its arg-max scatter.
    Ls, Rs, scatters, stencil_terms = [], [], [], []
    pos = 0
    for kind, gate, idx in ops.stages:
        if kind == "stencil":
            dlogit = leaf_grads[pos]
            pos += 1
            if dlogit is not None:
                stencil_terms.append((gate, dlogit))
            continue
        dmean, dmx = leaf_grads[pos], leaf_grads[pos + 1]
        pos += 2
        if kind == "hw":  # statistics over p of x·S_k
            Rk = gate if gate is not None else x.new_ones((b, h * w), dtype=acc)
            if dmean is not None:
                Ls.append(dmean / (h * w))
                Rs.append(Rk)
            if dmx is not None:
                scatters.append((2, idx, dmx * Rk.gather(1, idx)))
        else:  # statistics over c of x·G_k
            Lk = gate if gate is not None else x.new_ones((b, c), dtype=acc)
            if dmean is not None:
                Ls.append(Lk)
                Rs.append(dmean / c)
            if dmx is not None:
                scatters.append((1, idx, dmx * Lk.gather(1, idx)))
    L = torch.stack(Ls) if Ls else x.new_zeros((0, b, c), dtype=acc)
    R = torch.stack(Rs) if Rs else x.new_zeros((0, b, h * w), dtype=acc)
    dx = k.grad_x(grad, x, Gd, Sd, L.contiguous(), R.contiguous())
    flat = _flat_p(dx)
    for dim, idx, val in scatters:
        flat.scatter_add_(dim, idx.unsqueeze(dim), val.to(dx.dtype).unsqueeze(dim))
    for w7, dlogit in stencil_terms:
        dx += torch.nn.grad.conv2d_input(x.shape, w7.to(x.dtype), dlogit.view(b, 1, h, w).to(x.dtype), padding=3)
    return dx, dparams


@_gates_bwd.register_fake
def _(grad, x, params, saved, program, backend):
    return torch.empty_like(x), [torch.empty_like(p) for p in params]


def _gates_setup_context(ctx, inputs, output):
    x, params, program, backend = inputs
    _, saved = output
    ctx.program, ctx.backend, ctx.n_params = program, backend, len(params)
    # The statistics are outputs only so that backward can have them; their (always
    # absent) gradients must not be materialised as zero tensors (12 for the CBAT chain).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, *params, *saved)


def _gates_backward(ctx, grad_out, _grad_saved):
    x, *rest = ctx.saved_tensors
    if grad_out is None:
        return None, [None] * ctx.n_params, None, None
    params, saved = rest[: ctx.n_params], rest[ctx.n_params :]
    dx, dparams = _gates_bwd(grad_out, x, list(params), list(saved), ctx.program, ctx.backend)
    return dx, list(dparams), None, None


_gates_fwd.register_autograd(_gates_backward, setup_context=_gates_setup_context)


def _layout_ok(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _fused_gates(program: str, x: torch.Tensor, params: list[torch.Tensor], backend: str) -> torch.Tensor:
    """The fused path of a gate module: resolve the backend, run ``disseg::gates_fwd``."""
    chosen = _backend.resolve("gates", backend, x.device.type)
    if chosen == "reference":
        return _REFERENCE_PROGRAMS[program](x, params)
    if not _layout_ok(x):
        # Neither NCHW nor channels_last (e.g. a sliced view): the kernels need one of the
        # two, so this one input is copied.
        x = x.contiguous()
    out, _ = _gates_fwd(x, list(params), program, chosen)
    return out


class ChannelAttention(torch.nn.Module):
    """out = x · σ(MLP(avg_HW x) + MLP(max_HW x)), MLP = fc1 (1×1 conv C→C/r) → ReLU → fc2."""

    def __init__(self, channels: int, ratio: int = 16, fused: bool = True, backend: str = "auto"):
        super().__init__()
        _check_backend(backend)
        hidden = _hidden(channels, ratio, "ratio")
        self.channels, self.fused, self.backend = channels, bool(fused), backend
        self.fc1 = torch.nn.Conv2d(channels, hidden, 1, bias=False)
        self.relu = torch.nn.ReLU()
        self.fc2 = torch.nn.Conv2d(hidden, channels, 1, bias=False)

    def _params(self):
        return [self.fc1.weight, self.fc2.weight]

    def forward(self, x):
        _check_x(x, self.channels, "ChannelAttention")
        if not self.fused:
            return ref.channel_attention_reference(x, *self._params())
        return _fused_gates("ca", x, self._params(), self.backend)


class SpatialAttention(torch.nn.Module):
    """out = x · σ(conv_k([mean_C x, max_C x])), a 2→1 k×k conv without bias."""

    def __init__(self, kernel_size: int = 7, fused: bool = True, backend: str = "auto"):
        super().__init__()
        _check_backend(backend)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and ≥ 1, got {kernel_size}")
        self.fused, self.backend = bool(fused), backend
        self.conv = torch.nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def _params(self):
        return [self.conv.weight]

    def forward(self, x):
        _check_x(x, None, "SpatialAttention")
        if not self.fused:
            return ref.spatial_attention_reference(x, *self._params())
        return _fused_gates("sa", x, self._params(), self.backend)


class CBAM(torch.nn.Module):
    """Channel gate (Linear → TeLU → Linear, biases, on avg and max) then a spatial gate
    (k×k 2→1 conv with bias) on the channel-gated map: out = x · g[b, c] · s[b, h, w]."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, fused: bool = True, backend: str = "auto"):
        super().__init__()
        _check_backend(backend)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and ≥ 1, got {kernel_size}")
        hidden = _hidden(channels, reduction, "reduction")
        self.channels, self.fused, self.backend = channels, bool(fused), backend
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(channels, hidden), TeLU(fused=fused, backend=backend), torch.nn.Linear(hidden, channels)
        )
        self.conv = torch.nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=True)

    def _params(self):
        return [self.mlp[0].weight, self.mlp[0].bias, self.mlp[2].weight, self.mlp[2].bias, self.conv.weight, self.conv.bias]

    def forward(self, x):
        _check_x(x, self.channels, "CBAM")
        if not self.fused:
            return ref.cbam_reference(x, *self._params())
        return _fused_gates("cbam", x, self._params(), self.backend)


class ELAT(torch.nn.Module):
    """The encoder attention of Med-DisSeg Stage I.

    g = σ(mlp(avg_HW x)), mlp = Linear(C, C/r) → TeLU → Linear(C/r, C), no biases;
    s = σ(fuse([dconv1(x), dconv2(x), dconv3(x)])), dconvd = 3×3 C→1 conv with dilation
    = padding = d and a bias, fuse = 1×1 3→1 conv with a bias; out = x · g · s.
    Fused: the three dilated convs and the fuse are one 7×7 C→1 stencil.
    """

    def __init__(self, channels: int, reduction: int = 8, fused: bool = True, backend: str = "auto"):
        super().__init__()
        _check_backend(backend)
        hidden = _hidden(channels, reduction, "reduction")
        self.channels, self.fused, self.backend = channels, bool(fused), backend
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(channels, hidden, bias=False),
            TeLU(fused=fused, backend=backend),
            torch.nn.Linear(hidden, channels, bias=False),
        )
        self.dconv1 = torch.nn.Conv2d(channels, 1, 3, padding=1, dilation=1, bias=True)
        self.dconv2 = torch.nn.Conv2d(channels, 1, 3, padding=2, dilation=2, bias=True)
        self.dconv3 = torch.nn.Conv2d(channels, 1, 3, padding=3, dilation=3, bias=True)
        self.fuse = torch.nn.Conv2d(3, 1, 1, bias=True)

    def _params(self):
        return [
            self.mlp[0].weight,
            self.mlp[2].weight,
            self.dconv1.weight,
            self.dconv2.weight,
            self.dconv3.weight,
            self.dconv1.bias,
            self.dconv2.bias,
            self.dconv3.bias,
            self.fuse.weight,
            self.fuse.bias,
        ]

    def forward(self, x):
        _check_x(x, self.channels, "ELAT")
        p = self._params()
        if not self.fused:
            return ref.elat_reference(x, p[0], p[1], p[2:5], p[5:8], p[8], p[9])
        return _fused_gates("elat", x, p, self.backend)


class CBATGates(torch.nn.Module):
    """The CBAT decoder block's gate chain: ``ca`` (ChannelAttention) → ``sa``
    (SpatialAttention) → ``cbam`` (CBAM). Fused: one op over the chain that reads x once
    per statistic, writes the output once and saves x and the small gates for backward."""

    def __init__(
        self,
        channels: int,
        ca_ratio: int = 16,
        cbam_reduction: int = 16,
        kernel_size: int = 7,
        fused: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        _check_backend(backend)
        self.channels, self.fused, self.backend = channels, bool(fused), backend
        self.ca = ChannelAttention(channels, ca_ratio, fused=fused, backend=backend)
        self.sa = SpatialAttention(kernel_size, fused=fused, backend=backend)
        self.cbam = CBAM(channels, cbam_reduction, kernel_size, fused=fused, backend=backend)

    def _params(self):
        return self.ca._params() + self.sa._params() + self.cbam._params()

    def forward(self, x):
        _check_x(x, self.channels, "CBATGates")
        if not self.fused:
            return self.cbam(self.sa(self.ca(x)))
        return _fused_gates("cbat", x, self._params(), self.backend)


_REFERENCE_PROGRAMS = {
    "ca": lambda x, p: ref.channel_attention_reference(x, *p),
    "sa": lambda x, p: ref.spatial_attention_reference(x, *p),
    "cbam": lambda x, p: ref.cbam_reference(x, *p),
    "elat": lambda x, p: ref.elat_reference(x, p[0], p[1], p[2:5], p[5:8], p[8], p[9]),
    "cbat": lambda x, p: ref.cbat_gates_reference(x, p[0:2], p[2:3], p[3:9]),
}
