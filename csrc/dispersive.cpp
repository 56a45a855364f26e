// Dispersive loss, C++ CPU kernels. See shared/spec/dispersive.md.
#include <torch/extension.h>

namespace disseg {

std::tuple<at::Tensor, at::Tensor> dispersive_fused_cpu(
    const at::Tensor& z, int64_t variant, double tau, double margin, bool include_diagonal,
    bool scale_by_dim, bool need_grad) {
  TORCH_CHECK(false, "dispersive_fused_cpu: not implemented yet");
}

TORCH_LIBRARY_FRAGMENT(disseg, m) {
  m.def(
      "dispersive_fused(Tensor z, int variant, float tau, float margin, bool include_diagonal, "
      "bool scale_by_dim, bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(disseg, CPU, m) { m.impl("dispersive_fused", &dispersive_fused_cpu); }

}  // namespace disseg
