// multiscale_fwd(tensors, scales): the argument checks and the output geometry, shared by
// the CPU kernels (csrc/multiscale.cpp) and the CUDA kernels (csrc/multiscale_cuda.cu).
// Each caller checks that tensors[0] is on its own device type; this checks the rest.
// Header-only, ATen core headers only (multiscale_cuda.cu compiles against a CPU build of
// torch in tests/test_cuda_compile.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace disseg {

struct MultiscaleOut {
  int64_t B, C, H, W;   // the concatenated output (B, C = Σ Cᵢ, H, W)
  bool channels_last;   // tensors[0] is channels_last (and not also contiguous): so is the output
};

inline MultiscaleOut multiscale_out(at::TensorList tensors, at::IntArrayRef scales) {
  TORCH_CHECK(!tensors.empty(), "multiscale_fwd: tensors must not be empty");
  TORCH_CHECK(scales.size() == tensors.size(), "multiscale_fwd: scales must have one entry per tensor, got ",
              scales.size(), " for ", tensors.size());
  const auto& t0 = tensors[0];
  TORCH_CHECK(t0.dim() == 4, "multiscale_fwd: tensors[0] must be 4-d (B, C, H, W), got ", t0.sizes());
  MultiscaleOut o{t0.size(0), 0, t0.size(2) * scales[0], t0.size(3) * scales[0],
                  t0.is_contiguous(at::MemoryFormat::ChannelsLast) && !t0.is_contiguous()};
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.dim() == 4 && t.device() == t0.device() && t.scalar_type() == t0.scalar_type() &&
                    t.size(0) == o.B,
                "multiscale_fwd: tensors[", i, "] must be a 4-d tensor with tensors[0]'s device ", t0.device(),
                ", batch size ", o.B, " and dtype ", t0.scalar_type(), "; got ", t.sizes(), " ", t.scalar_type(),
                " on ", t.device());
    TORCH_CHECK(scales[i] >= 1 && t.size(2) * scales[i] == o.H && t.size(3) * scales[i] == o.W,
                "multiscale_fwd: tensors[", i, "] upsampled by ", scales[i], " is not ", o.H, "x", o.W);
    o.C += t.size(1);
  }
  return o;
}

}  // namespace disseg
