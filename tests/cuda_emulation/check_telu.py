import os, sys
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build import emulated  # noqa: E402
E, C = emulated("telu")
for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for n in (0, 1, 7, 33, 1000, 4099):
        x = (torch.rand(n) * 40 - 20).to(dtype)
        for xx in (x, x[1:] if n > 1 else x):
            g = torch.randn_like(xx)
            a, b = E.telu_fwd(xx), C.telu_fwd(xx)
            assert torch.equal(a, b) or torch.allclose(a.double(), b.double(), rtol=2e-6, atol=1e-6), (dtype, n, (a-b).abs().max())
            a, b = E.telu_bwd(g, xx), C.telu_bwd(g, xx)
            assert torch.allclose(a.double(), b.double(), rtol=2e-6, atol=1e-6), (dtype, n, (a-b).abs().max())
x = torch.randn(2, 5, 7, 9).to(memory_format=torch.channels_last)
y = E.telu_fwd(x); assert y.stride() == x.stride() and torch.allclose(y, C.telu_fwd(x))
ext = torch.tensor([-1e4, -100., -20., 0., 20., 89., 100., 1e4, float('inf'), float('nan')])
for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    e = ext.to(dt)
    print(dt, E.telu_fwd(e).tolist(), E.telu_bwd(torch.ones_like(e), e).tolist())
    assert torch.equal(E.telu_fwd(e).isnan(), C.telu_fwd(e).isnan())
    m = ~C.telu_fwd(e).isnan()
    assert torch.equal(E.telu_fwd(e)[m], C.telu_fwd(e)[m]), (E.telu_fwd(e), C.telu_fwd(e))
print("telu ok")
