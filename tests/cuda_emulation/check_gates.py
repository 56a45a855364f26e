import os, sys, time
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build import emulated  # noqa: E402
E, C = emulated("gates")

def acc(dt): return torch.float64 if dt == torch.float64 else torch.float32

def close(a, b, what):
    if a.dtype == torch.long:
        assert torch.equal(a, b), (what, (a != b).sum().item(), a.flatten()[:20], b.flatten()[:20])
    else:
        tol = 1e-12 if a.dtype == torch.float64 else 2e-5
        if a.dtype in (torch.float16, torch.bfloat16): tol = 1e-2
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")

def check(shape, cl, dt, ties=False, sms="4", K=2):
    os.environ["DISSEG_EMU_SMS"] = sms
    B, Cc, H, W = shape
    P = H * W
    if ties:
        x = torch.randint(-2, 3, shape).to(dt)
    else:
        x = torch.randn(shape).to(dt)
    if cl == "cl": x = x.to(memory_format=torch.channels_last)
    elif cl == "slice":
        x = torch.randn(B, Cc + 3, H, W).to(dt)[:, 2:2 + Cc]
    a = acc(dt)
    G = torch.rand(B, Cc, dtype=a) + 0.1
    S = torch.rand(B, H, W, dtype=a) + 0.1
    tag = f"{shape} {cl} {dt} ties={ties} sms={sms}"
    for gate in (None, S):
        for e, c, n in zip(E.gates_pool_hw(x, gate), C.gates_pool_hw(x, gate), "mean max idx".split()):
            close(e, c, f"pool_hw {n} gate={gate is not None} {tag}")
    for gate in (None, G):
        for e, c, n in zip(E.gates_pool_c(x, gate), C.gates_pool_c(x, gate), "mean max idx".split()):
            close(e, c, f"pool_c {n} gate={gate is not None} {tag}")
    if cl == "slice":
        return
    for g_, s_ in ((None, None), (G, None), (None, S), (G, S)):
        close(E.gates_apply(x, g_, s_), C.gates_apply(x, g_, s_), f"apply {g_ is not None} {s_ is not None} {tag}")
        assert E.gates_apply(x, g_, s_).stride() == x.stride()
    R = torch.randn(shape).to(dt)
    if cl == "cl": R = R.to(memory_format=torch.channels_last)
    gi, gv = torch.randint(-1, P + 1, (B, Cc)), torch.randn(B, Cc, dtype=a)  # -1 and P: out of range, add nothing
    si, sv = torch.randint(0, Cc, (B, P)), torch.randn(B, P, dtype=a)
    for r_, g_, s_, ga, sa in ((None, None, None, None, None), (R, G, S, None, None), (R, None, S, (gi, gv), None),
                               (None, G, None, None, (si, sv)), (R, G, S, (gi, gv), (si, sv))):
        args = (x, r_, g_, s_, *(ga or (None, None)), *(sa or (None, None)))
        for e, c, n in zip(E.gates_reduce(*args), C.gates_reduce(*args), "UV"):
            close(e, c, f"reduce {n} {r_ is not None} {g_ is not None} {s_ is not None} {ga is not None} {sa is not None} {tag}")
    L = torch.randn(K + 2, B, Cc, dtype=a); Rk = torch.randn(K + 2, B, P, dtype=a)
    ihw, dhw = torch.randint(0, P, (B, Cc)), torch.randn(B, Cc, dtype=a)
    ic, dc = torch.randint(-1, Cc, (B, P)), torch.randn(B, P, dtype=a)

    def off4(t):  # the same values 4 bytes past an aligned address: the map kernel's unpacked path
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        return buf[1:].view(t.shape).copy_(t)

    term_sets = {
        "none": [],
        "rank1": [(0, L[0], Rk[0], None, None), (1, None, Rk[1], None, None)],
        "chain": [(0, L[0], S.view(B, P), ihw, dhw), (1, G, Rk[1], ic, dc), (0, L[1], None, ihw, None), (1, None, Rk[0], ic, dc)],
        "maxes": [(0, None, None, ihw, dhw), (1, L[2], None, ic, dc)],
        "offset": [(0, off4(L[0]), off4(Rk[0]), off4(ihw), off4(dhw)), (1, G, off4(Rk[1]), off4(ic), off4(dc))],
    }
    for gr, g_, s_, ts in ((R, G, S, "chain"), (None, None, None, "chain"), (R, None, S, "none"), (R, G, None, "rank1"),
                           (None, None, None, "maxes"), (R, G, S, "offset")):
        terms = term_sets[ts]
        lists = [[t[1] for t in terms], [t[2] for t in terms], [t[3] if t[4] is not None else None for t in terms],
                 [t[4] for t in terms], [t[0] for t in terms]]
        e = E.gates_grad_x(gr, x, g_, s_, *lists); c = C.gates_grad_x(gr, x, g_, s_, *lists)
        close(e, c, f"grad_x {gr is not None} {ts} {tag}")
        assert e.stride() == x.stride()

t0 = time.time()
ONLY = os.environ.get("DISSEG_EMU_ONLY")  # one section: maps, small or stencil (mutation checks)
if ONLY in (None, "maps"):  # pools, apply, reduce, grad_x
    shapes = [(2, 3, 5, 7), (2, 17, 9, 6), (1, 129, 4, 11), (1, 2, 40, 36), (2, 300, 2, 3), (1, 1, 1, 1), (2, 5, 1, 1), (1, 1, 3, 4), (3, 40, 1, 37)]
    for shape in shapes:
        for cl in ("nchw", "cl", "slice"):
            check(shape, cl, torch.float32)
            check(shape, cl, torch.float32, ties=True, sms="64")
        print(shape, "ok", round(time.time() - t0, 1), flush=True)
    for dt in (torch.float64, torch.bfloat16, torch.float16):
        for cl in ("nchw", "cl"):
            check((2, 17, 9, 6), cl, dt)
            check((1, 2, 40, 36), cl, dt, ties=True, sms="64")
    print("dtypes ok", round(time.time() - t0, 1))
    # all -inf / NaN rows
    x = torch.full((1, 3, 2, 2), float("-inf"))
    for cl in (False, True):
        xx = x.to(memory_format=torch.channels_last) if cl else x
        for e, c in zip(E.gates_pool_hw(xx, None), C.gates_pool_hw(xx, None)): close(e, c, f"-inf hw {cl}")
        for e, c in zip(E.gates_pool_c(xx, None), C.gates_pool_c(xx, None)): close(e, c, f"-inf c {cl}")
    # NaN: the max at its first NaN, in both pools, every layout, split or not (SMS 1 and 64),
    # with -inf and NaN mixed and rows of NaN only; with and without gates
    for shape in [(2, 5, 7, 9), (1, 70, 3, 50), (2, 300, 2, 3)]:
        for sms in ("1", "64"):
            os.environ["DISSEG_EMU_SMS"] = sms
            torch.manual_seed(1)
            x = torch.randn(shape)
            x[torch.rand(shape) < 0.02] = float("nan")
            x[torch.rand(shape) < 0.02] = float("-inf")
            x[torch.rand(shape) < 0.01] = float("inf")  # inf − inf: a NaN sum without a NaN
            x[0, 1] = float("nan")
            x[-1, :, 0, 0] = float("nan")
            G = torch.rand(shape[0], shape[1]) + 0.1
            S = torch.rand(shape[0], shape[2], shape[3]) + 0.1
            for cl in (False, True):
                xx = x.contiguous(memory_format=torch.channels_last) if cl else x
                for name, gate in (("gates_pool_hw", S), ("gates_pool_c", G)):
                    for gg in (None, gate):
                        for e, c, n in zip(getattr(E, name)(xx, gg), getattr(C, name)(xx, gg), "mean max idx".split()):
                            if e.dtype == torch.long:
                                close(e, c, f"nan {name} {n} {shape} cl={cl} sms={sms}")
                            else:
                                torch.testing.assert_close(e, c, atol=2e-5, rtol=2e-5, equal_nan=True,
                                                           msg=lambda m: f"nan {name} {n} {shape} cl={cl} sms={sms}: {m}")
    print("nan ok", round(time.time() - t0, 1))
    # empty
    x = torch.randn(2, 0, 3, 3)
    print([t.shape for t in E.gates_pool_hw(x, None)], [t.shape for t in E.gates_reduce(x, None, None, None)],
          E.gates_grad_x(None, x, None, None, [], [], [], [], []).shape)

# The small programs: the channel MLP and the spatial gate, forward and backward.
def small_close(e, c, what, dt):
    for i, (u, v) in enumerate(zip(e, c)):
        assert u.shape == v.shape, (what, i, u.shape, v.shape)
        if u.numel():
            tol = 1e-12 if dt == torch.float64 else 2e-5
            torch.testing.assert_close(u, v, atol=tol, rtol=tol, msg=lambda m: f"{what} output {i}: {m}")

if ONLY in (None, "small"):
    for dt in (torch.float32, torch.float64):
        for B, Cc, hid, telu, pair, g0, bias in [(2, 17, 3, True, True, True, True), (3, 300, 8, False, True, False, False),
                                                 (2, 33, 4, True, False, False, False), (1, 5, 1, True, True, True, True),
                                                 (2, 129, 16, False, True, True, False)]:
            a, m = torch.randn(B, Cc, dtype=dt), torch.randn(B, Cc, dtype=dt)
            G0 = torch.rand(B, Cc, dtype=dt) if g0 else None
            w1, w2 = torch.randn(hid, Cc, dtype=dt), torch.randn(Cc, hid, dtype=dt)
            b1, b2 = (torch.randn(hid, dtype=dt), torch.randn(Cc, dtype=dt)) if bias else (None, None)
            args = (a, m if pair else None, G0, w1, b1, w2, b2, telu)
            tag = f"mlp {(B, Cc, hid, telu, pair, g0, bias)} {dt}"
            fe, fc = E.gates_channel_mlp_fwd(*args), C.gates_channel_mlp_fwd(*args)
            small_close(fe, fc, tag + " fwd", dt)
            H, T, U, TH, g, _ = fc
            dg = torch.randn(B, Cc, dtype=dt)
            bargs = (dg, a, m if pair else None, G0, H, T, U if telu else None, TH if telu else None, g, w1, w2, telu, bias, 0.3)
            small_close(E.gates_channel_mlp_bwd(*bargs), C.gates_channel_mlp_bwd(*bargs), tag + " bwd", dt)
        for B, h, w, s0, bias, k in [(2, 5, 7, True, True, 7), (3, 9, 4, False, False, 7), (1, 1, 1, True, False, 3),
                                     (2, 16, 17, True, True, 7), (1, 3, 20, False, True, 5), (3, 11, 13, True, False, 7)]:
            mean, mx = torch.randn(B, h * w, dtype=dt), torch.randn(B, h * w, dtype=dt)
            S0 = torch.rand(B, h * w, dtype=dt) if s0 else None
            cw = torch.randn(1, 2, k, k, dtype=dt)
            cb = torch.randn(1, dtype=dt) if bias else None
            tag = f"spatial {(B, h, w, s0, bias, k)} {dt}"
            fe, fc = E.gates_spatial_fwd(mean, mx, S0, cw, cb, w), C.gates_spatial_fwd(mean, mx, S0, cw, cb, w)
            small_close(fe, fc, tag + " fwd", dt)
            dg = torch.randn(B, h * w, dtype=dt)
            bargs = (dg, S0, fc[0], mean, mx, cw, bias, w, 0.25)
            small_close(E.gates_spatial_bwd(*bargs), C.gates_spatial_bwd(*bargs), tag + " bwd", dt)
        print("small programs ok", dt, round(time.time() - t0, 1), flush=True)

# ELAT's K×K C→1 stencil: the logit, its input gradient (in gates_grad_x's pass) and its weight gradient.
def elat_like(c, dt):
    w = torch.zeros(1, c, 7, 7, dtype=dt)
    for d in (1, 2, 3):
        w[:, :, 3 - d:4 + d:d, 3 - d:4 + d:d] += torch.randn(1, c, 3, 3, dtype=dt)
    return w

if ONLY in (None, "stencil"):
    for dt in (torch.float32, torch.float64, torch.bfloat16):
        a = acc(dt)
        for (B, Cc, H, W), K, layout in [((2, 3, 5, 7), 7, "nchw"), ((1, 17, 9, 40), 7, "cl"), ((2, 9, 12, 33), 3, "nchw"),
                                         ((1, 20, 17, 35), 7, "cl"), ((1, 1, 1, 1), 7, "nchw"), ((1, 5, 8, 32), 5, "cl"),
                                         ((1, 3, 70, 140), 7, "nchw"),  # 45 tiles: more pieces than a warp has lanes
                                         ((1, 70, 9, 33), 7, "nchw"), ((1, 260, 3, 5), 7, "cl")]:  # ELAT's dx: 2 chunks
            x = torch.randn(B, Cc, H, W).to(dt)
            if layout == "cl":
                x = x.contiguous(memory_format=torch.channels_last)
            w = elat_like(Cc, a) if K == 7 else torch.randn(1, Cc, K, K, dtype=a)
            g = torch.randn(B, H * W, dtype=a)
            tag = f"stencil {(B, Cc, H, W)} K={K} {layout} {dt}"
            tol = 1e-12 if dt == torch.float64 else (1e-2 if dt == torch.bfloat16 else 2e-5)
            tol *= max(1.0, (Cc * K * K) ** 0.5 / 10)  # sums of C·K² products: the rounding grows with them
            torch.testing.assert_close(E.gates_stencil(x, w), C.gates_stencil(x, w), atol=tol, rtol=tol, msg=lambda m: tag + m)
            xt = x.float().round().to(dt).contiguous(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
            for e, c, n in zip(E.gates_pool_hw_stencil(xt, w), C.gates_pool_hw_stencil(xt, w), "mean max idx logit".split()):
                close(e, c, f"pool_hw_stencil {n} {tag}") if n != "logit" else torch.testing.assert_close(
                    e, c, atol=tol, rtol=tol, msg=lambda m: tag + " fused logit " + m)
            torch.testing.assert_close(E.gates_stencil_grad_weight(x, g, K), C.gates_stencil_grad_weight(x, g, K), atol=tol * 10,
                                       rtol=tol, msg=lambda m: tag + " dw " + m)
            if K == 7:  # ELAT's 25 compile-time taps against the CPU's 25-tap GEMMs, with a dense w (49 taps)
                wd = torch.randn(1, Cc, 7, 7, dtype=a)
                torch.testing.assert_close(E.gates_stencil(x, wd, True), C.gates_stencil(x, wd, True), atol=tol, rtol=tol,
                                           msg=lambda m: tag + " elat logit " + m)
                for e, c, n in zip(E.gates_pool_hw_stencil(xt, wd, True), C.gates_pool_hw_stencil(xt, wd, True), "mean max idx logit".split()):
                    close(e, c, f"elat pool_hw_stencil {n} {tag}") if n != "logit" else torch.testing.assert_close(
                        e, c, atol=tol, rtol=tol, msg=lambda m: tag + " elat fused logit " + m)
                de, dc = E.gates_stencil_grad_weight(x, g, K, True), C.gates_stencil_grad_weight(x, g, K, True)
                torch.testing.assert_close(de, dc, atol=tol * 10, rtol=tol, msg=lambda m: tag + " elat dw " + m)
                assert int((dc[0, 0] != 0).sum()) <= 25
            # the input gradient in gates_grad_x's pass, on the map's value with a max term of each
            # kind; ELAT's 25 compile-time taps against the CPU's masked GEMM with a dense w
            d0 = torch.randn(B, Cc, H, W).to(dt)
            if layout == "cl":
                d0 = d0.contiguous(memory_format=torch.channels_last)
            G_, S_ = torch.rand(B, Cc, dtype=a), torch.rand(B, H * W, dtype=a)
            lists = [[torch.rand(B, Cc, dtype=a), None], [S_, torch.rand(B, H * W, dtype=a)],
                     [torch.randint(0, H * W, (B, Cc)), torch.randint(0, Cc, (B, H * W))],
                     [torch.randn(B, Cc, dtype=a), torch.randn(B, H * W, dtype=a)], [0, 1]]
            cases = [(w, False, d0, lists), (w, False, None, [[]] * 5)]
            if K == 7:
                cases += [(w, True, d0, lists), (torch.randn(1, Cc, 7, 7, dtype=a), True, None, [[]] * 5)]
            for ww, elat, gr, ls in cases:
                de = E.gates_grad_x(gr, d0, G_, S_, *ls, ww, g, elat)
                dc = C.gates_grad_x(gr, d0, G_, S_, *ls, ww, g, elat)
                assert de.stride() == d0.stride()
                torch.testing.assert_close(de, dc, atol=tol * 10, rtol=tol, msg=lambda m: f"{tag} dx elat={elat} {m}")
        print("stencil ok", dt, round(time.time() - t0, 1), flush=True)
print("gates ok", round(time.time() - t0, 1))
