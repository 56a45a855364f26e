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
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>

#if defined(__CUDACC__)
#define DISSEG_HD __host__ __device__ __forceinline__
#else
#define DISSEG_HD inline
#endif

namespace disseg {
namespace small {

// ---- argument checks ------------------------------------------------------------------

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

// The MLP backward's inputs beyond mlp_dims's: dgate and g (B, C); H, T and, for TeLU, U
// and TH (rows, HID).
inline MlpDims mlp_bwd_dims(const at::Tensor& dgate, const at::Tensor& a, const std::optional<at::Tensor>& m,
                            const std::optional<at::Tensor>& G0, const at::Tensor& H, const at::Tensor& T,
                            const std::optional<at::Tensor>& U, const std::optional<at::Tensor>& TH, const at::Tensor& g,
                            const at::Tensor& w1, const at::Tensor& w2, bool telu, const char* op) {
  const MlpDims d = mlp_dims(a, m, G0, w1, std::nullopt, w2, std::nullopt, op);
  const int64_t rows = d.pair ? 2 * d.B : d.B;
  const auto acc = a.scalar_type();
  const auto dev = a.device();
  check_small(dgate, d.B * d.C, acc, dev, op, "dgate");
  check_small(g, d.B * d.C, acc, dev, op, "g");
  check_small(H, rows * d.HID, acc, dev, op, "H");
  check_small(T, rows * d.HID, acc, dev, op, "T");
  TORCH_CHECK(!telu || (has(U) && has(TH)), op, ": telu=True needs U and TH");
  if (telu) {
    check_small(*U, rows * d.HID, acc, dev, op, "U");
    check_small(*TH, rows * d.HID, acc, dev, op, "TH");
  }
  return d;
}

// An output the op does not produce (an absent input's gradient, ReLU's U and TH).
inline at::Tensor none_like(const at::Tensor& t) { return at::empty({0}, t.options()); }

inline at::Tensor alloc(at::IntArrayRef shape, const at::Tensor& like, bool zero) {
  return zero ? at::zeros(shape, like.options()) : at::empty(shape, like.options());
}

struct MlpOut {
  at::Tensor H, T, U, TH, g, gate;
};

inline MlpOut mlp_outputs(const at::Tensor& a, const MlpDims& d, bool telu, bool has_g0) {
  const int64_t rows = d.pair ? 2 * d.B : d.B;
  auto o = a.options();
  return MlpOut{at::empty({rows, d.HID}, o), at::empty({rows, d.HID}, o),
                telu ? at::empty({rows, d.HID}, o) : none_like(a), telu ? at::empty({rows, d.HID}, o) : none_like(a),
                at::empty({d.B, d.C}, o), has_g0 ? at::empty({d.B, d.C}, o) : none_like(a)};
}

// The MLP backward's outputs; the weights' gradients zeroed when the kernel adds into them.
struct MlpGrads {
  at::Tensor da, dm, dG0, dw1, db1, dw2, db2;
};

inline MlpGrads mlp_grads(const at::Tensor& a, const MlpDims& d, bool has_g0, bool biases, bool zero_weights) {
  auto o = a.options();
  return MlpGrads{at::empty({d.B, d.C}, o),
                  d.pair ? at::empty({d.B, d.C}, o) : none_like(a),
                  has_g0 ? at::empty({d.B, d.C}, o) : none_like(a),
                  alloc({d.HID, d.C}, a, zero_weights),
                  biases ? alloc({d.HID}, a, zero_weights) : none_like(a),
                  alloc({d.C, d.HID}, a, zero_weights),
                  biases ? alloc({d.C}, a, zero_weights) : none_like(a)};
}

// The spatial gate forward's optional inputs S0 (B, P) and bias (1), with spatial_dims.
inline SpatialDims spatial_fwd_dims(const at::Tensor& mean, const at::Tensor& mx, const std::optional<at::Tensor>& S0,
                                    const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t width,
                                    const char* op) {
  const SpatialDims d = spatial_dims(mean, mx, w, width, op);
  check_opt(S0, d.B * d.P, mean.scalar_type(), mean.device(), op, "S0");
  check_opt(bias, 1, mean.scalar_type(), mean.device(), op, "bias");
  return d;
}

// The spatial gate backward's inputs dgate, s and S0 (B, P), with spatial_dims.
inline SpatialDims spatial_bwd_dims(const at::Tensor& dgate, const std::optional<at::Tensor>& S0, const at::Tensor& s,
                                    const at::Tensor& mean, const at::Tensor& mx, const at::Tensor& w, int64_t width,
                                    const char* op) {
  const SpatialDims d = spatial_dims(mean, mx, w, width, op);
  const auto acc = mean.scalar_type();
  check_small(dgate, d.B * d.P, acc, mean.device(), op, "dgate");
  check_small(s, d.B * d.P, acc, mean.device(), op, "s");
  check_opt(S0, d.B * d.P, acc, mean.device(), op, "S0");
  return d;
}

// The spatial gate's (B, P) outputs: forward (s, gate), backward (dmean, dmax, dS0); gate
// and dS0 are empty without S0.
struct SpatialFwdOut {
  at::Tensor s, gate;
};
struct SpatialBwdOut {
  at::Tensor dmean, dmax, dS0;
};

inline SpatialFwdOut spatial_fwd_outputs(const at::Tensor& mean, const SpatialDims& d, bool has_s0) {
  auto o = mean.options();
  return {at::empty({d.B, d.P}, o), has_s0 ? at::empty({d.B, d.P}, o) : none_like(mean)};
}

inline SpatialBwdOut spatial_bwd_outputs(const at::Tensor& mean, const SpatialDims& d, bool has_s0) {
  auto o = mean.options();
  return {at::empty({d.B, d.P}, o), at::empty({d.B, d.P}, o), has_s0 ? at::empty({d.B, d.P}, o) : none_like(mean)};
}

// The weight and bias gradients from the per-image or per-block partial sums part
// (rows, 2·K² + 1), summed in row order: dw shaped like w, db (1) or empty.
inline std::pair<at::Tensor, at::Tensor> spatial_weight_grads(const at::Tensor& part, const at::Tensor& w,
                                                              bool has_bias) {
  const int64_t taps = w.numel();
  auto sums = part.sum(0);
  return {sums.narrow(0, 0, taps).reshape(w.sizes()).contiguous(),
          has_bias ? sums.narrow(0, taps, 1).contiguous() : none_like(part)};
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
  return h < T(0) ? T(0) : h;  // a NaN stays NaN, as torch.relu
}

template <typename T>
DISSEG_HD T mlp_act_grad(T dt, T h, T u, T th, bool telu) {
  if (telu) return dt * (th + h * u * (T(1) - th * th));
  return h <= T(0) ? T(0) : dt;  // as torch.relu's backward (a NaN h passes dt)
}

}  // namespace small
}  // namespace disseg
