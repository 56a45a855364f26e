"""Does Triton's warp specialisation lower on a given GPU arch? Compiled ahead of time, no GPU.

    python benchmarks/gpu/triton_ws_probe.py 90    # Hopper (H100/H200)
    python benchmarks/gpu/triton_ws_probe.py 100   # Blackwell

Compiles a flash-attention-like loop (a Gram tile, an online softmax, a second product:
the shape of the dispersive row kernel's column loop) with pointer loads and with TMA
tensor descriptors, each with ``tl.range(..., warp_specialize=False/True)``, and prints
whether the TTGIR holds ``ttg.warp_specialize`` partitions. With Triton 3.9.0 on
2026-11-27 (docs/dispersive_gpu_floor.md, "What to try"): sm_90 never (the cubin is the
same with and without the flag); sm_100 with descriptors only. Run without TRITON_INTERPRET.
"""
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend


@triton.jit
def _probe(Q, K, V, O, N, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, WS: tl.constexpr,
           DESC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    dd = tl.arange(0, D)
    if DESC:
        qd = tl.make_tensor_descriptor(Q, shape=[N, D], strides=[D, 1], block_shape=[BM, D])
        kd = tl.make_tensor_descriptor(K, shape=[N, D], strides=[D, 1], block_shape=[BN, D])
        vd = tl.make_tensor_descriptor(V, shape=[N, D], strides=[D, 1], block_shape=[BN, D])
        q = qd.load([pid * BM, 0])
    else:
        q = tl.load(Q + rows[:, None] * D + dd[None, :])
    m = tl.full((BM,), float("-inf"), tl.float32)
    s_sum = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, D), tl.float32)
    for start in tl.range(0, N, BN, warp_specialize=WS):
        if DESC:
            k = kd.load([start, 0])
            v = vd.load([start, 0])
        else:
            cols = start + tl.arange(0, BN)
            k = tl.load(K + cols[:, None] * D + dd[None, :])
            v = tl.load(V + cols[:, None] * D + dd[None, :])
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        s_sum = s_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v)
        m = m_new
    tl.store(O + rows[:, None] * D + dd[None, :], acc / s_sum[:, None])


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    sig = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "O": "*fp32", "N": "i32"}
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
    print(f"triton {triton.__version__}, sm_{arch}")
    for desc in (False, True):
        for ws in (False, True):
            consts = {"D": 128, "BM": 128, "BN": 64, "WS": ws, "DESC": desc}
            opts = make_backend(target).parse_options({"num_warps": 8, "num_stages": 2})
            src = ASTSource(fn=_probe, signature=dict(sig, **{k: "constexpr" for k in consts}), constexprs=consts,
                            attrs=attrs)
            k = triton.compile(src, target=target, options=opts.__dict__)
            ttgir = k.asm["ttgir"]
            print(f"loads={'descriptor' if desc else 'pointer':10} warp_specialize={ws!s:5} -> "
                  f"specialised={'ttg.warp_specialize' in ttgir}, cubin {len(k.asm['cubin'])} bytes")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
