"""The gate modules end to end on the CUDA kernels: every torch.ops.disseg.gates_* call of
the C++/CUDA engine (disseg_kernels/ops/gates.py, _CompiledKernels) is routed to the
emulated csrc/gates_cuda.cu ops, and each module's output and gradients (x and every
parameter) are compared with its plain-PyTorch formula (fused=False) in float64, in both
layouts. This checks the engine's calls into the CUDA ops (arguments, shapes, the order of
the small programs' outputs), which the per-op checks in check_gates.py do not."""
import os, sys, time
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build import emulated  # noqa: E402

E, C = emulated("gates")
import disseg_kernels as dk  # noqa: E402

OPS = sorted({n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
              if n.startswith("disseg_emu::gates_")})
assert len(OPS) >= 12, OPS  # pools, apply, reduce, grad_x, the small programs, the stencil
for name in OPS:  # the engine now calls the emulated CUDA code for CPU tensors
    setattr(torch.ops.disseg, name, getattr(E, name))
print("routed", OPS)

t0 = time.time()
torch.manual_seed(0)
MODULES = {
    "ca": lambda c, **kw: dk.ChannelAttention(c, ratio=4, **kw),
    "sa": lambda c, **kw: dk.SpatialAttention(**kw),
    "cbam": lambda c, **kw: dk.CBAM(c, reduction=4, **kw),
    "elat": lambda c, **kw: dk.ELAT(c, reduction=4, **kw),
    "cbat": lambda c, **kw: dk.CBATGates(c, **kw),
}
for name, make in MODULES.items():
    for shape in [(2, 8, 9, 11), (1, 5, 12, 7)]:
        for cl in (False, True):
            fused = make(shape[1], backend="cpu").double()
            plain = make(shape[1], fused=False).double()
            plain.load_state_dict(fused.state_dict())
            x = torch.randn(shape, dtype=torch.float64)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            g = torch.randn(shape, dtype=torch.float64)
            outs = []
            for m in (fused, plain):
                xx = x.clone().requires_grad_()
                y = m(xx)
                y.backward(g)
                outs.append((y.detach(), xx.grad, [p.grad for p in m.parameters()]))
            (yf, dxf, dpf), (yp, dxp, dpp) = outs
            tag = f"{name} {shape} channels_last={cl}"
            torch.testing.assert_close(yf, yp, atol=1e-10, rtol=1e-9, msg=lambda m: f"{tag} out: {m}")
            torch.testing.assert_close(dxf, dxp, atol=1e-10, rtol=1e-9, msg=lambda m: f"{tag} dx: {m}")
            for (pn, _), a, b in zip(fused.named_parameters(), dpf, dpp):
                torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=lambda m: f"{tag} d{pn}: {m}")
    print(name, "ok", round(time.time() - t0, 1), flush=True)
print("gates engine ok", round(time.time() - t0, 1))
