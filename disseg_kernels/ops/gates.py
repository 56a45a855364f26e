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
from ._args import as_int
from ._autograd import first_order_only
from .telu import TeLU


def _check_x(x: torch.Tensor, channels: int | None, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name}: x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name}: x must be a floating-point tensor, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: x has {x.shape[1]} channels, the module was built for channels={channels}")
    if x.shape[2] * x.shape[3] == 0 and x.shape[1] > 0:  # a batch of 0 too: the pools refuse it
        raise ValueError(f"{name}: x has no pixels (H·W = 0, shape {tuple(x.shape)}): the max pools over H·W are undefined")
    if x.shape[1] == 0:
        raise ValueError(f"{name}: x has no channels (C = 0, shape {tuple(x.shape)}): the mean and max over C are undefined")


def _check_backend(backend):
    if backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")


def _hidden(channels: int, ratio: int, name: str) -> int:
    channels, ratio = as_int(channels), as_int(ratio)
    for arg, value in (("channels", channels), (name, ratio)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{arg} must be an int, got {value!r}")
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
# A module's fused path is a *program*: small math (the channel MLPs, the spatial gate's
# 2→1 convolution, sigmoids; one kernel each on every backend, ``channel_mlp_*`` and
# ``spatial_gate_*``; their PyTorch formulas below serve the fake-tensor pass) on
# statistics of the gated map y = x · G[b, c] · S[b, p] (p = h·W + w), ending in the
# output gates (G, S) with out = x · G · S. The statistics come from one read pass over x
# each (``pool_hw``: mean/max over p of x · S; ``pool_c``: mean/max over c of x · G;
# ``stencil``: ELAT's 7×7 C→1 logit); a gate that multiplies a pooled map from outside is
# applied to the small statistic instead (max(g·y) = g·max(y) for g = σ(·) ≥ 0), so no
# gated map is ever materialised.
#
# ``disseg::gates_fwd`` runs the program with the real kernels and returns out plus the
# small statistics (and arg-max indices); autograd saves x, the parameters and those.
# ``disseg::gates_bwd`` recomputes the program's small tensors from the saved statistics
# and runs its stages backwards by hand (``_STAGE_BWD``; no autograd graph, so every op is
# one launch on the GPU, where this host work dominates at the model's shapes): one pass
# over (x, grad) gives dG, dS (``reduce``); each statistic taken under an earlier gate
# carries its gradient to that gate with one pass over x (``_Backward.hw_stat`` /
# ``c_stat``); then dx is written in one pass (``grad_x``: grad·G·S plus one rank-1 term
# per statistic and each max's share at its arg-max). Backward therefore reads x once per
# gated statistic plus once with grad, and writes dx once.
# ---------------------------------------------------------------------------------------


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _CompiledKernels:
    """The C++ ops (csrc/gates.cpp on CPU tensors, csrc/gates_cuda.cu on CUDA tensors: one
    schema, dispatched on the device) with the small gather/scatter work in torch."""

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
    def reduce(x, R, G, S, g_arg=None, s_arg=None, need=(True, True)):
        """As triton.gates.reduce: the arg-max terms are added in the same op (csrc/gates_terms.h)."""
        gi, gv = g_arg if g_arg is not None else (None, None)
        si, sv = s_arg if s_arg is not None else (None, None)
        U, V = torch.ops.disseg.gates_reduce(x, R, G, S, gi, gv, si, sv)  # the op makes the small tensors dense
        return (U if need[0] else None), (V if need[1] else None)

    @staticmethod
    def grad_x_terms(grad, x, G, S, terms, stencil=None, elat_taps=False):
        """As triton.gates.grad_x_terms: grad·G·S, the statistics' rank-1 parts, their
        arg-max terms (csrc/gates_terms.h) and ELAT's stencil term in one op (one pass on
        CUDA; the CPU adds the stencil's term in a second pass)."""
        L, R, idx, d, kinds = [], [], [], [], []
        for kind, Lk, Rk, ik, dk in terms:
            L.append(Lk)
            R.append(Rk)
            idx.append(ik if dk is not None else None)
            d.append(dk)
            kinds.append(_TERM_KINDS[kind])
        w7, dlogit = stencil if stencil is not None else (None, None)
        return torch.ops.disseg.gates_grad_x(grad, x, G, S, L, R, idx, d, kinds, w7, dlogit, bool(elat_taps))

    # The gates' small programs (csrc/gates_small.h), with the Triton functions' signatures
    # (triton.gates.channel_mlp_fwd / _bwd, spatial_gate_fwd / _bwd). An absent output
    # comes back from the op as an empty tensor and is None here.

    @staticmethod
    def channel_mlp_fwd(a, m, G0, w1, b1, w2, b2, telu, pair):
        H, T, U, TH, g, gate = torch.ops.disseg.gates_channel_mlp_fwd(
            a, m if pair else None, _dense(G0), w1.contiguous(), b1, w2.contiguous(), b2, bool(telu))
        return H, T, ((U, TH) if telu else None), g, (gate if G0 is not None else g)

    @staticmethod
    def channel_mlp_bwd(dgate, a, m, G0, H, T, parts, g, w1, w2, telu, pair, biases, scale_a=1.0):
        U, TH = parts if telu else (None, None)
        da, dm, dG0, dw1, db1, dw2, db2 = torch.ops.disseg.gates_channel_mlp_bwd(
            dgate.contiguous(), a, m if pair else None, _dense(G0), H, T, U, TH, g, w1.contiguous(), w2.contiguous(),
            bool(telu), bool(biases), float(scale_a))
        return (da, dm if pair else None, dG0 if G0 is not None else None, dw1, db1 if biases else None, dw2,
                db2 if biases else None)

    @staticmethod
    def spatial_gate_fwd(mean, mx, S0, cw, cb, width):
        s, gate = torch.ops.disseg.gates_spatial_fwd(mean, mx, _dense(S0), cw.contiguous(), cb, width)
        return s, (gate if S0 is not None else s)

    @staticmethod
    def spatial_gate_bwd(dgate, S0, s, mean, mx, cw, has_bias, width, scale_mean=1.0):
        dmean, dmax, dS0, dcw, dcb = torch.ops.disseg.gates_spatial_bwd(
            dgate.contiguous(), _dense(S0), s, mean, mx, cw.contiguous(), bool(has_bias), width, float(scale_mean))
        return dmean, dmax, (dS0 if S0 is not None else None), dcw, (dcb if has_bias else None)

    @staticmethod
    def pool_hw_stencil(x, w7, elat_taps=False):
        """(mean, max, first arg-max) over p of x and ELAT's 7×7 C→1 logit, (B, H·W) in the
        accumulation type: one read of x on CUDA (the stencil kernel pools the tiles it
        stages), two passes on the CPU (cuDNN took 1.04 ms of ELAT's 3.7 ms at
        8×64×256×256 on the H200 for this one-output-channel convolution). ``elat_taps``:
        w7 is ELAT's composite stencil and only its 25 taps are read (csrc/gates_terms.h)."""
        return torch.ops.disseg.gates_pool_hw_stencil(x, w7, bool(elat_taps))

    @staticmethod
    def stencil_grad_weight(x, dlogit, w7, elat_taps=False):
        """The gradient of the 7×7 stencil's weight from dlogit (B, H·W), accumulation type
        (with ``elat_taps`` only ELAT's 25 taps are computed, the others are 0)."""
        return torch.ops.disseg.gates_stencil_grad_weight(x, dlogit.contiguous(), w7.shape[-1], bool(elat_taps))


def _dense(t):
    return t.contiguous() if t is not None else None


_TERM_KINDS = {"hw": 0, "c": 1}  # csrc/gates_terms.h: a statistic over p, over c


def _kernels(backend: str):
    if backend in ("cpu", "cuda"):  # csrc/gates.cpp, csrc/gates_cuda.cu: the same ops, dispatched on the device
        return _CompiledKernels
    if backend == "triton":
        from ..triton import gates as triton_gates

        return triton_gates
    raise ValueError(f"no fused gate kernels for backend {backend!r}")


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def _telu_parts(h):
    """TeLU on the tiny hidden activations and what its derivative reuses. Finite for every
    h: tanh(e^{min(h, 20)}) is exactly 1 from h = 20 on, where the true derivative is 1 too."""
    u = torch.exp(h.clamp(max=20.0))
    th = torch.tanh(u)
    return h * th, (u, th)


def _pair_sum(t):
    """mlp(avg) + mlp(max) from one MLP call on the stacked [avg; max] (2B, C) rows."""
    half = t.shape[0] // 2
    return t[:half] + t[half:]


def _mlp_fwd(A, w_in, b_in, w_out, b_out, act, pair):
    H = F.linear(A, w_in, b_in)
    if act == "relu":
        T, parts = F.relu(H), None
    else:
        T, parts = _telu_parts(H)
    Z = F.linear(T, w_out, b_out)
    return (_pair_sum(Z) if pair else Z), (A, H, T, parts)


class _Backward:
    """Collects dx's terms while the stages run backwards, and the passes over x that carry
    a statistic's gradient to the gate it was taken under (one ``reduce`` each).

    A statistic over p of x·S0 (mean ``a``, max ``m`` at arg-max idx) contributes
    dx[b, c, p] += da[b, c]/P · S0[b, p] and dx[b, c, idx] += dm · S0[b, idx], and
    dS0[b, p] += Σ_c x · da/P plus dm · x[b, c, idx] at p = idx. A statistic over c of
    x·G0 is the transpose of that.
    """

    def __init__(self, k, x, acc):
        self.k, self.x, self.acc = k, x, acc
        b, c, h, w = x.shape
        self.b, self.c, self.p = b, c, h * w
        self.terms, self.stencil = [], None

    def hw_stat(self, S0, idx, da, dm):
        """Gradient (da, dm) of mean/max over p of x·S0, da already divided by P (the small
        programs' kernels scale it); returns dS0 (None when S0 is)."""
        self.terms.append(("hw", da, S0, idx, dm))
        if S0 is None:
            return None
        arg = None if dm is None else (idx, dm)
        return self.k.reduce(self.x, None, da, None, g_arg=arg, need=(False, True))[1]

    def c_stat(self, G0, idx, dmean, dm):
        """Gradient (dmean, dm) of mean/max over c of x·G0, dmean already divided by C;
        returns dG0 (None when G0 is)."""
        self.terms.append(("c", G0, dmean, idx, dm))
        if G0 is None:
            return None
        return self.k.reduce(self.x, None, None, dmean, s_arg=(idx, dm), need=(True, False))[0]

    def dx(self, grad, G, S):
        """dx = grad·G·S + every statistic's term + ELAT's stencil term, in one pass."""
        return self.k.grad_x_terms(grad, self.x, G, S, self.terms, stencil=self.stencil,
                                   elat_taps=self.stencil is not None)


# Each stage: fwd(src, p, shape, G0, S0) -> (G, S, rec); bwd(bw, rec, p, dG, dS) ->
# (dG0, dS0, [dp]). G0/S0 are the gates of the stages before (None: none); out = x·G·S.


def _channel_fwd(src, mlp, act, G0, S0):
    a, m, idx = src.pool_hw(S0)
    telu = act == "telu"
    if src.replaying:  # backward: the MLP's intermediates were kept by the forward
        H, T, g, *rest = src.load((5 if telu else 3) + (G0 is not None))
        G = rest.pop() if G0 is not None else g
        parts = tuple(rest) or None
    elif src.fused_small:  # one launch
        H, T, parts, g, G = src.k.channel_mlp_fwd(a, m, G0, *mlp, telu, True)
        src.keep([H, T, g, *(parts or ()), *([G] if G0 is not None else [])])
    else:
        A = torch.cat([a, m])
        if G0 is not None:
            A = (A.view(2, *a.shape) * G0).flatten(0, 1)
        z, (_, H, T, parts) = _mlp_fwd(A, *mlp, act, pair=True)
        g = torch.sigmoid(z)
        G = g if G0 is None else G0 * g
        src.keep([H, T, g, *(parts or ()), *([G] if G0 is not None else [])])
    return G, S0, (a, m, idx, H, T, parts, g, G0, S0)


def _channel_bwd(bw, rec, w_in, w_out, act, biases, dG, dS):
    a, m, idx, H, T, parts, g, G0, S0 = rec
    da, dm, dG0, dw_in, db_in, dw_out, db_out = bw.k.channel_mlp_bwd(  # two launches
        dG, a, m, G0, H, T, parts, g, w_in, w_out, act == "telu", True, biases, scale_a=1.0 / bw.p)
    return dG0, _add(dS, bw.hw_stat(S0, idx, da, dm)), (dw_in, db_in, dw_out, db_out)


def _spatial_fwd(src, cw, cb, shape, G0, S0):
    b, _, h, w = shape
    mean, mx, idx = src.pool_c(G0)
    if src.replaying and src.keep_spatial:
        (s,) = src.load(1)
        S = s if S0 is None else S0 * s
    elif src.fused_spatial:  # one launch (C++, CUDA, Triton)
        s, S = src.k.spatial_gate_fwd(mean, mx, S0, cw, cb, w)
    else:
        M = torch.stack([mean, mx], dim=1)
        M = (M if S0 is None else M * S0.unsqueeze(1)).view(b, 2, h, w)
        s = torch.sigmoid(F.conv2d(M, cw, cb, padding=cw.shape[-1] // 2)).view(b, h * w)
        S = s if S0 is None else S0 * s
    if src.keep_spatial and not src.replaying:
        src.keep([s])
    return G0, S, (mean, mx, s, idx, G0, S0, w)


def _spatial_bwd(bw, rec, cw, has_bias, dG, dS):
    mean, mx, s, idx, G0, S0, width = rec
    dmean, dm, dS0, dcw, dcb = bw.k.spatial_gate_bwd(  # two launches and a sum
        dS, S0, s, mean, mx, cw, has_bias, width, scale_mean=1.0 / bw.c)
    return _add(dG, bw.c_stat(G0, idx, dmean, dm)), dS0, (dcw, dcb)


def _ca_fwd(src, p, shape, G0, S0):
    return _channel_fwd(src, (p[0].flatten(1), None, p[1].flatten(1), None), "relu", G0, S0)


def _ca_bwd(bw, rec, p, dG, dS):
    dG0, dS0, (dw1, _, dw2, _) = _channel_bwd(bw, rec, p[0].flatten(1), p[1].flatten(1), "relu", False, dG, dS)
    return dG0, dS0, [dw1, dw2]


def _sa_fwd(src, p, shape, G0, S0):
    return _spatial_fwd(src, p[0], None, shape, G0, S0)


def _sa_bwd(bw, rec, p, dG, dS):
    dG0, dS0, (dcw, _) = _spatial_bwd(bw, rec, p[0], False, dG, dS)
    return dG0, dS0, [dcw]


def _cbam_fwd(src, p, shape, G0, S0):
    w0, b0, w2, b2, cw, cb = p
    G, S, rec_c = _channel_fwd(src, (w0, b0, w2, b2), "telu", G0, S0)
    G, S, rec_s = _spatial_fwd(src, cw, cb, shape, G, S)
    return G, S, (rec_c, rec_s)


def _cbam_bwd(bw, rec, p, dG, dS):
    w0, b0, w2, b2, cw, cb = p
    rec_c, rec_s = rec
    dG, dS, (dcw, dcb) = _spatial_bwd(bw, rec_s, cw, True, dG, dS)
    dG0, dS0, (dw0, db0, dw2, db2) = _channel_bwd(bw, rec_c, w0, w2, "telu", True, dG, dS)
    return dG0, dS0, [dw0, db0, dw2, db2, dcw, dcb]


def _elat_fwd(src, p, shape, G0, S0):
    if src.replaying:
        a, _, idx = src.pool_hw(None)
        H, T, u, th, g, s, w7 = src.load(7)
        return g, s, (a, H, T, (u, th), g, s, w7, idx)
    w7, bias = _elat_stencil(p[2:5], p[5:8], p[8], p[9])
    a, _, idx, logit = src.pool_hw_stencil(w7)  # one read of x where the backend fuses them
    if src.fused_small:  # one launch
        H, T, parts, g, _ = src.k.channel_mlp_fwd(a, None, None, p[0], None, p[1], None, True, False)
    else:
        z, (_, H, T, parts) = _mlp_fwd(a, p[0], None, p[1], None, "telu", pair=False)
        g = torch.sigmoid(z)
    s = torch.sigmoid(logit + bias)
    src.keep([H, T, *parts, g, s, w7])
    return g, s, (a, H, T, parts, g, s, w7, idx)


def _elat_stencil(dconv_w, dconv_b, fuse_w, fuse_b):
    """``reference.gates.elat_composite_stencil`` in fewer launches: w7 (1, C, 7, 7), bias (1,).
    The taps of dilation d sit at rows/cols 3−d, 3, 3+d, scaled by the fuse weight of that
    branch (the centre is shared); bias = Σ_d b_d·fw_d + fuse_bias."""
    fw = fuse_w.reshape(3)
    w7 = dconv_w[0].new_zeros(1, dconv_w[0].shape[1], 7, 7)
    for i, d in enumerate((1, 2, 3)):
        w7[:, :, 3 - d : 4 + d : d, 3 - d : 4 + d : d].add_(dconv_w[i] * fw[i])  # a view: no setitem copy
    return w7, torch.addmv(fuse_b, torch.cat(dconv_b).view(1, 3), fw)


def _elat_bwd(bw, rec, p, dG, dS):
    a, H, T, parts, g, s, w7, idx = rec
    x = bw.x
    dA, _, _, dw0, _, dw2, _ = bw.k.channel_mlp_bwd(  # two launches
        dG, a, None, None, H, T, parts, g, p[0], p[1], True, False, False, scale_a=1.0 / bw.p)
    bw.hw_stat(None, idx, dA, None)
    dlogit = torch.ops.aten.sigmoid_backward(dS, s)
    dbias = dlogit.sum()
    dw7 = bw.k.stencil_grad_weight(x, dlogit, w7, elat_taps=True)
    bw.stencil = (w7, dlogit)  # its input gradient is added in the dx pass
    # The composite stencil's taps of dilation d sit at rows/cols 3−d, 3, 3+d, scaled by
    # the fuse weight of that branch; its bias is Σ_d b_d·fw_d + fuse_bias.
    fw = p[8].reshape(3)
    taps = [dw7[:, :, 3 - d : 4 + d : d, 3 - d : 4 + d : d] for d in (1, 2, 3)]
    dconv_w = [taps[i] * fw[i] for i in range(3)]
    dconv_b = [(dbias * fw[i]).reshape(1) for i in range(3)]
    # dfw_d = Σ taps_d·W_d + dbias·b_d
    dfw = torch.addcmul(torch.einsum("dkcij,dkcij->d", torch.stack(taps), torch.stack(list(p[2:5]))), dbias, torch.cat(p[5:8]))
    return None, None, [dw0, dw2, *dconv_w, *dconv_b, dfw.view(1, 3, 1, 1), dbias.reshape(1)]


_STAGE_FWD = {"ca": _ca_fwd, "sa": _sa_fwd, "cbam": _cbam_fwd, "elat": _elat_fwd}
_STAGE_BWD = {"ca": _ca_bwd, "sa": _sa_bwd, "cbam": _cbam_bwd, "elat": _elat_bwd}
# program -> its stages as (kind, first param, end param)
_PROGRAMS = {
    "ca": [("ca", 0, 2)],
    "sa": [("sa", 0, 1)],
    "cbam": [("cbam", 0, 6)],
    "elat": [("elat", 0, 10)],
    "cbat": [("ca", 0, 2), ("sa", 2, 3), ("cbam", 3, 9)],
}


def _run_program(src, program, pf, shape):
    """The program's forward on the statistics ``src`` provides: (G, S, tape)."""
    G = S = None
    tape = []
    for kind, lo, hi in _PROGRAMS[program]:
        G, S, rec = _STAGE_FWD[kind](src, pf[lo:hi], shape, G, S)
        tape.append((kind, lo, hi, rec))
    return G, S, tape


class _RunOps:
    """Forward: the real kernels; keeps the statistics and the stages' small intermediates
    (``keep``) for backward, in the order the program produces them."""

    replaying = False

    def __init__(self, k, x):
        self.k, self.x, self.saved = k, x, []
        # Every backend runs the small math (channel MLP, spatial gate) as fused kernels.
        # Triton keeps the spatial gates for backward (two (B, H·W) maps; its arg-max
        # indices are int32 there, so the chain still saves under 1.2× x); C++ and CUDA
        # recompute them (one launch each in backward).
        self.fused_small = hasattr(k, "channel_mlp_fwd")
        self.fused_spatial = hasattr(k, "spatial_gate_fwd")
        self.keep_spatial = getattr(k, "KEEP_SPATIAL_GATES", False)

    def keep(self, tensors):
        self.saved += tensors
        return tensors

    def pool_hw(self, S):
        out = self.k.pool_hw(self.x, S)
        self.saved += out
        return out

    def pool_c(self, G):
        out = self.k.pool_c(self.x, G)
        self.saved += out
        return out

    def pool_hw_stencil(self, w7):
        """pool_hw(None) (saved as it saves) and ELAT's logit; in one read of x on the GPU
        backends (Triton, CUDA), two passes on the CPU."""
        mean, mx, idx, logit = self.k.pool_hw_stencil(self.x, w7, elat_taps=True)
        self.saved += [mean, mx, idx]
        return mean, mx, idx, logit


class _FakeOps(_RunOps):
    """Shapes only (register_fake): the torch small math, the backend's saved set."""

    def __init__(self, backend, x):
        self.k, self.x, self.saved = None, x, []
        self.fused_small = self.fused_spatial = False
        self.keep_spatial = backend == "triton"
        self.idx_dtype = torch.int32 if backend == "triton" else torch.long

    def _stat(self, n):
        b = self.x.shape[0]
        acc = _acc(self.x.dtype)
        out = [self.x.new_empty((b, n), dtype=acc), self.x.new_empty((b, n), dtype=acc), self.x.new_empty((b, n), dtype=self.idx_dtype)]
        self.saved += out
        return out

    def pool_hw(self, S):
        return self._stat(self.x.shape[1])

    def pool_c(self, G):
        return self._stat(self.x.shape[2] * self.x.shape[3])

    def pool_hw_stencil(self, w7):
        b, _, h, w = self.x.shape
        return (*self.pool_hw(None), self.x.new_empty((b, h * w), dtype=_acc(self.x.dtype)))


class _Replay:
    """Backward: the saved statistics and intermediates, in the order the forward produced
    them (so backward recomputes only a few cheap cats and products)."""

    replaying = True
    fused_small = False  # nothing is computed forward again but the gates the C++ path drops

    def __init__(self, saved, k):
        self.saved, self.pos, self.k = saved, 0, k
        self.keep_spatial = getattr(k, "KEEP_SPATIAL_GATES", False)
        self.fused_spatial = hasattr(k, "spatial_gate_fwd")

    def _take(self, n):
        out = self.saved[self.pos : self.pos + n]
        self.pos += n
        return out

    def load(self, n):
        return self._take(n)

    def pool_hw(self, S):
        return self._take(3)

    def pool_c(self, G):
        return self._take(3)


def _match_layout(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t in x's strides (a copy only when an upstream op handed back another layout)."""
    if t.stride() == x.stride():
        return t
    fmt = torch.channels_last if (x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()) else torch.contiguous_format
    t = t.contiguous(memory_format=fmt)
    if t.stride() != x.stride():
        t = torch.empty_like(x).copy_(t)
    return t


def _gates_forward(x, params, program, backend):
    """(out, saved): out = x·G·S of the named gate program, and the statistics and small
    intermediates its backward needs (the body of ``disseg::gates_fwd`` and of the eager
    path)."""
    k = _kernels(backend)
    # The gate programs (small MLPs, 2→1 convs) compute in float32 under autocast too: the
    # kernels take float32 gates, and the statistics are accumulated in float32 anyway.
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        acc = _acc(x.dtype)
        pf = [p if p.dtype == acc else p.to(acc) for p in params]
        ops = _RunOps(k, x)
        G, S, _ = _run_program(ops, program, pf, tuple(x.shape))
        out = k.apply(x, G, S)
    return out, ops.saved


@torch.library.custom_op("disseg::gates_fwd", mutates_args=())
def _gates_fwd(x: torch.Tensor, params: list[torch.Tensor], program: str, backend: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """out = x·G·S of the named gate program, and the statistics its backward needs."""
    return _gates_forward(x, params, program, backend)


@_gates_fwd.register_fake
def _(x, params, program, backend):
    acc = _acc(x.dtype)
    ops = _FakeOps(backend, x)
    _run_program(ops, program, [p.to(acc) for p in params], tuple(x.shape))
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


def _gates_backward_grads(grad, x, params, saved, program, backend):
    """(dx, [dparams]) of :func:`_gates_forward` for the incoming gradient ``grad``; a
    parameter's gradient is None where the program has none, and may be a view of
    another tensor (the body of ``disseg::gates_bwd`` and of the eager path)."""
    k = _kernels(backend)
    acc = _acc(x.dtype)
    grad = _match_layout(grad, x)
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        pf = [p if p.dtype == acc else p.to(acc) for p in params]
        # Recompute the program's small tensors from the saved statistics, then run its
        # stages backwards by hand (no autograd graph: every op here is one launch).
        G, S, tape = _run_program(_Replay(saved, k), program, pf, tuple(x.shape))
        dG, dS = k.reduce(x, grad, G, S, need=(G is not None, S is not None))  # Σ_p grad·x·S, Σ_c grad·x·G
        bw = _Backward(k, x, acc)
        grads = [None] * len(params)
        for kind, lo, hi, rec in reversed(tape):
            dG, dS, gp = _STAGE_BWD[kind](bw, rec, pf[lo:hi], dG, dS)
            grads[lo:hi] = gp
        dx = bw.dx(grad, G, S)
    return dx, [None if g is None else g.reshape(p.shape) for p, g in zip(params, grads)]


@torch.library.custom_op("disseg::gates_bwd", mutates_args=())
def _gates_bwd(
    grad: torch.Tensor, x: torch.Tensor, params: list[torch.Tensor], saved: list[torch.Tensor], program: str, backend: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(dx, [dparams]) of :func:`_gates_fwd` for the incoming gradient ``grad``."""
    dx, grads = _gates_backward_grads(grad, x, params, saved, program, backend)
    return dx, _fresh_grads(params, grads, (x, grad))


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


class _GatesEager(torch.autograd.Function):
    """The same forward and backward as ``disseg::gates_fwd`` / ``gates_bwd``, for eager
    mode only: a custom-op call with a list of parameters and of saved statistics costs
    ~0.25 ms more Python (pytree flattening, dispatcher round trips) per forward+backward
    of the CBAT chain (1.02 against 0.76 ms, benchmarks/bench_host_overhead.py), more
    than its GPU work at the model's shapes. torch.compile traces
    the custom ops (``_fused_gates`` picks by ``_backend.use_custom_op()``)."""

    @staticmethod
    def forward(ctx, x, program, backend, *params):
        out, saved = _gates_forward(x, params, program, backend)
        ctx.program, ctx.backend, ctx.n_params = program, backend, len(params)
        ctx.save_for_backward(x, *params, *saved)
        return out

    @staticmethod
    @first_order_only("the gate ops")
    def backward(ctx, grad_out):
        x, *rest = ctx.saved_tensors
        params, saved = rest[: ctx.n_params], rest[ctx.n_params :]
        dx, grads = _gates_backward_grads(grad_out, x, params, saved, ctx.program, ctx.backend)
        grads = [g if g is None or g.dtype == p.dtype else g.to(p.dtype) for p, g in zip(params, grads)]
        return (dx, None, None, *grads)


def _layout_ok(x: torch.Tensor) -> bool:
    return x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)


def _fused_gates(program: str, x: torch.Tensor, params: list[torch.Tensor], backend: str) -> torch.Tensor:
    """The fused path of a gate module: resolve the backend, run ``disseg::gates_fwd``."""
    chosen = _backend.resolve("gates", backend, x.device.type, x.dtype)
    if chosen == "reference" or x.numel() == 0:  # an empty batch: nothing for a kernel to do
        return _REFERENCE_PROGRAMS[program](x, params)
    if not _layout_ok(x):
        # Neither NCHW nor channels_last (e.g. a sliced view): the kernels need one of the
        # two, so this one input is copied.
        x = x.contiguous()
    if _backend.use_custom_op():
        out, _ = _gates_fwd(x, list(params), program, chosen)
        return out
    if not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))):
        return _gates_forward(x, params, program, chosen)[0]
    return _GatesEager.apply(x, program, chosen, *params)


class _GateModule(torch.nn.Module):
    """What every gate module's repr shows besides its parameters: its channels (where it
    has them), fused and backend."""

    def extra_repr(self) -> str:
        channels = f"channels={self.channels}, " if hasattr(self, "channels") else ""
        return f"{channels}fused={self.fused}, backend={self.backend!r}"


class ChannelAttention(_GateModule):
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


class SpatialAttention(_GateModule):
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


class CBAM(_GateModule):
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


class ELAT(_GateModule):
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


class CBATGates(_GateModule):
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
