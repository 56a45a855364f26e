"""Build csrc/<family>_cuda.cu as CPU code under simt.h, registered as torch.ops.disseg_emu.*"""
import os, re, sys
import torch
from torch.utils.cpp_extension import load

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))


def _split_top(s):
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{<" and ch != "<":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur); cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def transform(src, defs):
    src = re.sub(r"#include <c10/cuda/[^>]*>\n", "", src)
    src = src.replace("#include <cuda_runtime.h>\n", '#include "simt.h"\n')
    src = src.replace(".is_cuda()", ".is_cpu()")
    # dynamic shared memory: one buffer per block, sized by the launch's third argument
    src = re.sub(r"extern __shared__ (\w[\w ]*?) (\w+)\[\];", r"\1* \2 = reinterpret_cast<\1*>(emu::t_ctx->smem.data());", src)
    out, pos = [], 0
    pat = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<")
    while True:
        m = pat.search(src, pos)
        if not m:
            out.append(src[pos:]); break
        out.append(src[pos:m.start()])
        end = src.index(">>>", m.end())
        cfg = _split_top(src[m.end():end])
        i = end + 3
        assert src[i] == "("
        depth, j = 0, i
        while True:
            if src[j] == "(":
                depth += 1
            elif src[j] == ")":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        args = src[i + 1:j]
        smem = cfg[2] if len(cfg) > 2 else "0"
        out.append(f"emu::launch(dim3({cfg[0]}), dim3({cfg[1]}), size_t({smem}), [&] {{ {m.group(1)}({args}); }})")
        pos = j + 1
    src = "".join(out)
    src = src.replace("TORCH_LIBRARY_IMPL(disseg, CUDA, m)", "TORCH_LIBRARY_IMPL(disseg_emu, CPU, m)")
    src += "\nTORCH_LIBRARY_FRAGMENT(disseg_emu, m) {\n" + "\n".join(defs) + "\n}\n"
    return src


FAMILIES = ("telu", "gates", "multiscale", "window_attention", "dispersive")


def build(families=FAMILIES):
    srcs = []
    gen = os.path.join(HERE, "build", "gen"); os.makedirs(gen, exist_ok=True)
    for fam in families:
        cu = open(os.path.join(ROOT, "csrc", fam + "_cuda.cu")).read()
        cpp = open(os.path.join(ROOT, "csrc", fam + ".cpp")).read()
        defs = re.findall(r'm\.def\(\s*(?:"[^"]*"\s*)+\);', cpp)
        path = os.path.join(gen, fam + "_emu.cpp")
        new = transform(cu, defs)
        if not os.path.exists(path) or open(path).read() != new:
            open(path, "w").write(new)
        srcs.append(path)
    bd = os.path.join(HERE, "build"); os.makedirs(bd, exist_ok=True)
    load("disseg_emu", srcs, extra_cflags=["-O1", f"-I{HERE}", f"-I{os.path.join(ROOT, 'csrc')}", "-w"], extra_ldflags=["-pthread"],
         build_directory=bd, is_python_module=False, verbose=False)


def emulated(family):
    """(torch.ops.disseg_emu, torch.ops.disseg) for a check script: csrc/<family>_cuda.cu built
    for the emulator, and the C++ CPU kernels it is compared with loaded."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import disseg_kernels  # noqa: F401  (registers torch.ops.disseg.*)

    build([family])
    return torch.ops.disseg_emu, torch.ops.disseg


if __name__ == "__main__":
    build(sys.argv[1:] or FAMILIES)
    print("built", [n for n in dir(torch.ops.disseg_emu)])
