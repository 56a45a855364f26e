"""csrc/dispersive_cuda.cu under the SIMT emulator against the C++ CPU kernels (both paths:
the row kernel for N > 64 or D <= 8, the double Gram + row mix for few samples)."""
import itertools, os, sys, time
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build import emulated  # noqa: E402
E, C = emulated("dispersive")
t0 = time.time()
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}
NAMES = ["infonce_l2", "infonce_l2sq", "infonce_cosine", "hinge", "covariance"]


def run(z, variant, tau=0.5, margin=1.0, diag=False, scale=False, need_grad=True, gtol=None):
    le, ge = E.dispersive_fused(z, variant, tau, margin, diag, scale, need_grad)
    lc, gc = C.dispersive_fused(z, variant, tau, margin, diag, scale, need_grad)
    tol = TOL[z.dtype]
    what = f"{NAMES[variant]} {z.dtype} {tuple(z.shape)} tau={tau} diag={diag} scale={scale}"
    assert le.dtype == lc.dtype, (what, le.dtype, lc.dtype)
    torch.testing.assert_close(le, lc, atol=tol, rtol=tol, msg=lambda m: f"loss {what}: {m}")
    assert ge.shape == gc.shape and ge.dtype == gc.dtype, (what, ge.shape, gc.shape)
    if need_grad:
        # relative to the gradient's scale (its entries range over orders of magnitude)
        ref = gc.double().abs().max().item() or 1.0
        err = (ge.double() - gc.double()).abs().max().item() / ref
        if gtol is None:
            gtol = tol if z.dtype in (torch.float64, torch.float32) else 2e-2
        assert err <= gtol, f"grad {what}: max error {err:.2e} of max |grad| {ref:.2e}"


g = torch.Generator().manual_seed(0)
for dt in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
    for n, d in ((2, 1), (3, 7), (37, 211), (65, 9), (100, 8), (8, 1000), (64, 33), (300, 37)):
        z = torch.randn(n, d, generator=g, dtype=torch.float64).to(dt)
        for variant in range(5):
            run(z, variant)
    print(dt, "shapes ok", round(time.time() - t0, 1), flush=True)
# options: diagonal, scale_by_dim, tau, margin, no gradient
z = torch.randn(70, 19, generator=g)
for variant, diag, scale in itertools.product(range(4), (False, True), (False, True)):
    run(z, variant, tau=0.2, margin=3.0, diag=diag, scale=scale)
    run(z[:9].contiguous(), variant, tau=0.2, margin=3.0, diag=diag, scale=scale)
for variant in range(5):
    run(z, variant, need_grad=False)
print("options ok", round(time.time() - t0, 1), flush=True)
# duplicate rows and a zero row (cosine), row kernel and Gram path
for n, d in ((70, 5), (70, 40), (6, 40)):
    z = torch.randn(n, d, generator=g)
    z[1] = z[0]
    z[3] = 0
    for variant in range(4):
        run(z, variant)
# float64 rows 1e-9 apart at unit norm, both paths: exact distances (the few-samples path
# took d^2 = n_i + n_j - 2 G_ij and counted d^2 <= 1e-12 (n_i + n_j) as a duplicate: error
# ~1). The gradient C Z of the few-samples path sums weights ~1/gap = 1e9 that cancel, so
# it is ~2e-8 off the C++ kernel's sum of w_ij (z_i - z_j) (Triton's C Z too).
for n in (5, 100):
    z = torch.nn.functional.normalize(torch.randn(n, 16, generator=g, dtype=torch.float64), dim=1)
    z[1] = z[0] + 1e-9 * torch.randn(16, generator=g, dtype=torch.float64)
    for variant in (0, 1, 3):
        run(z, variant, margin=0.5, gtol=1e-6)
# huge distances: the model's own regime, scaled down (every exp underflows but the max)
z = torch.randn(8, 4096, generator=g) * 30
for variant in (0, 1, 2):
    run(z, variant, tau=0.1)
z = torch.randn(96, 64, generator=g) * 30
for variant in (0, 1, 2):
    run(z, variant, tau=0.1)
print("edge cases ok", round(time.time() - t0, 1), flush=True)
# the column-chunk grid: D > 128 splits the gradient's columns over blockIdx.y
z = torch.randn(66, 300, generator=g)
for variant in range(4):
    run(z, variant)
print("dispersive ok", round(time.time() - t0, 1))
