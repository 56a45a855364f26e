import os, sys, time
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build import emulated  # noqa: E402
E, C = emulated("multiscale")
t0 = time.time()
def run(shapes, scales, dt, cl, mixed=False):
    ts = [torch.randn(s).to(dt) for s in shapes]
    if cl: ts = [t.to(memory_format=torch.channels_last) for t in ts]
    if mixed: ts[1] = ts[1].contiguous() if cl else ts[1].to(memory_format=torch.channels_last)
    a, b = E.multiscale_fwd(ts, scales), C.multiscale_fwd(ts, scales)
    tol = 1e-12 if dt == torch.float64 else (1e-5 if dt == torch.float32 else 1e-2)
    assert a.stride() == b.stride(), (a.stride(), b.stride())
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    g = torch.randn_like(b)
    for gg in (g, g.contiguous(), g.to(memory_format=torch.channels_last)):
        c0 = 0
        for t, s in zip(ts, scales):
            e = E.multiscale_bwd(gg, c0, t.shape[1], t.shape[2], t.shape[3], t)
            c = C.multiscale_bwd(gg, c0, t.shape[1], t.shape[2], t.shape[3], t)
            assert e.stride() == c.stride() and e.dtype == c.dtype, (e.stride(), c.stride())
            torch.testing.assert_close(e, c, atol=tol * 10, rtol=tol)
            c0 += t.shape[1]
for dt in (torch.float32, torch.float64, torch.bfloat16):
    for cl in (False, True):
        run([(2, 3, 24, 16), (2, 5, 12, 8), (2, 1, 6, 4), (2, 2, 3, 2)], [1, 2, 4, 8], dt, cl)
        run([(1, 2, 5, 7), (1, 33, 15, 21)], [3, 1], dt, cl, mixed=True)
        run([(1, 4, 16, 16), (1, 33, 1, 1), (1, 3, 2, 2)], [1, 16, 8], dt, cl, mixed=True)
    print(dt, "ok", round(time.time() - t0, 1), flush=True)
# like of another dtype
g = torch.randn(1, 4, 8, 8)
like = torch.empty(1, 4, 4, 4, dtype=torch.float64)
torch.testing.assert_close(E.multiscale_bwd(g, 0, 4, 4, 4, like), C.multiscale_bwd(g, 0, 4, 4, 4, like), atol=1e-6, rtol=1e-6)
# downsampling-shaped bwd call (general align_corners) and empty
torch.testing.assert_close(E.multiscale_bwd(g, 1, 2, 11, 5, g), C.multiscale_bwd(g, 1, 2, 11, 5, g))
print(E.multiscale_bwd(g, 0, 0, 4, 4, g).shape)
print("multiscale ok", round(time.time() - t0, 1))
