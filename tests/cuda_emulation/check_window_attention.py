"""csrc/window_attention_cuda.cu under the SIMT emulator against the C++ CPU kernels."""
import os, sys, time
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build import emulated  # noqa: E402
E, C = emulated("window_attention")
t0 = time.time()
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def run(B, Ch, H, W, heads, k, dt, cl=False, strided_logits=False, big=False):
    kk = k * k
    v = torch.randn(B, Ch, H, W, dtype=torch.float64)
    if cl:
        v = v.to(memory_format=torch.channels_last)
    if strided_logits:  # (B, heads, HW, kk, kk) view of a (B, HW, heads, kk, kk) buffer
        lg = torch.randn(B, H * W, heads, kk, kk, dtype=torch.float64).transpose(1, 2)
    else:
        lg = torch.randn(B, heads, H * W, kk, kk, dtype=torch.float64)
    if big:
        lg = lg * 40
    v, lg = v.to(dt), lg.to(dt)
    tol = TOL[dt]
    a, b = E.window_attention_forward(v, lg, k), C.window_attention_forward(v, lg, k)
    assert a.shape == b.shape and a.stride() == b.stride(), (a.stride(), b.stride())
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    gy = torch.randn(B, Ch, H, W, dtype=torch.float64).to(dt)
    for need_dv, need_dl in ((True, True), (True, False), (False, True)):
        ea = E.window_attention_backward(gy, v, lg, k, need_dv, need_dl)
        ca = C.window_attention_backward(gy, v, lg, k, need_dv, need_dl)
        for x, y, name in zip(ea, ca, ("dv", "dlogits")):
            assert x.shape == y.shape, (name, x.shape, y.shape)
            if x.numel():
                assert x.stride() == y.stride(), (name, x.stride(), y.stride())
                torch.testing.assert_close(x, y, atol=tol * 10, rtol=tol, msg=lambda m: f"{name} {dt} {(B, Ch, H, W, heads, k)}: {m}")


for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
    run(2, 8, 5, 7, 2, 3, dt)
    run(1, 6, 3, 4, 3, 5, dt, cl=True, strided_logits=True)
    run(1, 4, 2, 2, 1, 1, dt)
    run(1, 70, 3, 5, 2, 3, dt, strided_logits=True)   # head_dim 35: lanes own 2 channels, some 1
    run(1, 64, 4, 3, 1, 3, dt, cl=True)                # head_dim 64
    run(1, 3, 1, 6, 3, 3, dt)                          # one row, head_dim 1
    run(2, 8, 4, 4, 2, 3, dt, big=dt != torch.float16) # logits ×40: the softmax's max subtraction
    print(dt, "ok", round(time.time() - t0, 1), flush=True)
# an empty batch and a kernel_size the CUDA kernels refuse
print(E.window_attention_forward(torch.randn(0, 4, 3, 3), torch.randn(0, 2, 9, 9, 9), 3).shape)
try:
    E.window_attention_forward(torch.randn(1, 4, 3, 3), torch.randn(1, 2, 9, 49, 49), 7)
    raise SystemExit("kernel_size 7 was accepted")
except RuntimeError as e:
    assert "kernel_size 1, 3 or 5" in str(e), e
print("window_attention ok", round(time.time() - t0, 1))
