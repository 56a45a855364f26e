// The gates' small programs as kernels: the channel gate's MLP on pooled (B, C) statistics
// and the spatial gate's 2→1 k×k convolution on [mean, max] (B, H·W) maps, forward and
// backward. Shared by the CPU kernels (csrc/gates.cpp) and the CUDA kernels
// (csrc/gates_cuda.cu): the argument checks, and the per-element formulas as functions
// both compilers build (DISSEG_HD), so that the two backends compute the same expressions.
// (The spatial convolution's sums run per pixel on CUDA and per row of taps on the CPU.)
// They replace ~10 small PyTorch ops each (F.linear, cat, sigmoid, cuDNN's 2-channel conv
// and its transposes) with one to three launches; the Triton backend has the same four
// programs (disseg_kernels/triton/gates.py: channel_mlp_*, spatial_gate_*).
//
// Every tensor is dense and of the accumulation type (float32, or float64 for float64 x);
// the names follow disseg_kernels/ops/gates.py:
//   channel MLP   H = W1·(a·G0) + b1 (and the max row m·G0 when paired), T = act(H)
//                 (TeLU: h·tanh(e^min(h, 20)), else ReLU), g = σ(W2·(T_a + T_m) + 2·b2),
//                 gate = G0·g;
//   spatial gate  s = σ(bias + Σ_{ch,i,j} w[ch, i, j]·M[ch, y+i−k/2, x+j−k/2]) with
//                 M = [mean, max]·S0, zero outside the map; gate = S0·s.
// Header-only, ATen core headers only (gates_cuda.cu compiles against a CPU build of torch
// in tests/test_cuda_compile.py).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>

#if defined(__CUDACC__)
#define DISSEG_HD __host__ __device__ __forceinline__
#else
#define DISSEG_HD inline
#endif

namespace disseg {
namespace small {

// ---- argument checks ------------------------------------------------------------------

inline at::ScalarType acc_of(const at::Tensor& t) { return t.scalar_type(); }

// t must be a dense tensor of `n` elements, of dtype `acc`, on `dev`.
inline void check_small(const at::Tensor& t, int64_t n, at::ScalarType acc, const at::Device& dev, const char* op,
                        const char* what) {
  TORCH_CHECK(t.defined(), op, ": ", what, " must be a tensor");
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", what, " must be ", acc, " (the accumulation type), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == dev, op, ": ", what, " must be on ", dev, ", got ", t.device());
  TORCH_CHECK(t.numel() == n, op, ": ", what, " must have ", n, " elements, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous, got strides ", t.strides());
}

inline void check_opt(const std::optional<at::Tensor>& t, int64_t n, at::ScalarType acc, const at::Device& dev,
                      const char* op, const char* what) {
  if (t.has_value() && t->defined()) check_small(*t, n, acc, dev, op, what);
}

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

struct MlpDims {
  int64_t B, C, HID;
  bool pair;  // the max row m is present: rows [a; m], 2B of them
};

// a (B, C); m like a or absent; G0 like a or absent; w1 (HID, C); w2 (C, HID); b1 (HID) and
// b2 (C) both present or both absent.
inline MlpDims mlp_dims(const at::Tensor& a, const std::optional<at::Tensor>& m, const std::optional<at::Tensor>& G0,
                        const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                        const std::optional<at::Tensor>& b2, const char* op) {
  TORCH_CHECK(a.dim() == 2, op, ": a must be (B, C), got ", a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op,
              ": a must be float32 or float64 (the accumulation type), got ", a.scalar_type());
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == a.size(1), op, ": w1 must be (HID, C = ", a.size(1), "), got ",
              w1.sizes());
  MlpDims d{a.size(0), a.size(1), w1.size(0), has(m)};
  const auto acc = a.scalar_type();
  const auto dev = a.device();
  check_small(a, d.B * d.C, acc, dev, op, "a");
  check_opt(m, d.B * d.C, acc, dev, op, "m");
  check_opt(G0, d.B * d.C, acc, dev, op, "G0");
  check_small(w1, d.HID * d.C, acc, dev, op, "w1");
  TORCH_CHECK(w2.dim() == 2 && w2.size(0) == d.C && w2.size(1) == d.HID, op, ": w2 must be (C, HID) = (", d.C, ", ",
              d.HID, "), got ", w2.sizes());
  check_small(w2, d.C * d.HID, acc, dev, op, "w2");
  TORCH_CHECK(has(b1) == has(b2), op, ": b1 and b2 must be both given or both absent");
  check_opt(b1, d.HID, acc, dev, op, "b1");
  check_opt(b2, d.C, acc, dev, op, "b2");
  return d;
}

struct SpatialDims {
  int64_t B, P, H, W, K;
};

// mean, mx (B, P = H·W); w (1, 2, K, K) with K odd; width W divides P.
inline SpatialDims spatial_dims(const at::Tensor& mean, const at::Tensor& mx, const at::Tensor& w, int64_t width,
                                const char* op) {
  TORCH_CHECK(mean.dim() == 2, op, ": mean must be (B, H·W), got ", mean.sizes());
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble, op,
              ": mean must be float32 or float64 (the accumulation type), got ", mean.scalar_type());
  const int64_t B = mean.size(0), P = mean.size(1);
  TORCH_CHECK(width >= 1 && P % width == 0, op, ": width must be ≥ 1 and divide H·W = ", P, ", got ", width);
  TORCH_CHECK(w.dim() == 4 && w.size(0) == 1 && w.size(1) == 2 && w.size(2) == w.size(3) && w.size(2) % 2 == 1, op,
              ": w must be (1, 2, K, K) with K odd, got ", w.sizes());
  const auto acc = mean.scalar_type();
  const auto dev = mean.device();
  check_small(mean, B * P, acc, dev, op, "mean");
  check_small(mx, B * P, acc, dev, op, "mx");
  check_small(w, w.numel(), acc, dev, op, "w");
  return SpatialDims{B, P, P / width, width, w.size(2)};
}

// ---- per-element formulas ---------------------------------------------------------------

template <typename T>
DISSEG_HD T sigmoid(T z) {
  return T(1) / (T(1) + std::exp(-z));
}

// The MLP's activation: (act(h), u, th) with u = e^min(h, 20), th = tanh(u) for TeLU (th is
// exactly 1 from h = 20 on, where the true derivative is 1 too); ReLU keeps u = th = 0.
template <typename T>
DISSEG_HD T mlp_act(T h, bool telu, T& u, T& th) {
  if (telu) {
    u = std::exp(h < T(20) ? h : T(20));
    th = std::tanh(u);
    return h * th;
  }
  u = th = T(0);
  return h > T(0) ? h : T(0);
}

template <typename T>
DISSEG_HD T mlp_act_grad(T dt, T h, T u, T th, bool telu) {
  if (telu) return dt * (th + h * u * (T(1) - th * th));
  return h > T(0) ? dt : T(0);
}

}  // namespace small
}  // namespace disseg
