// TeLU, C++ CPU kernels: y = x · tanh(eˣ) and its derivative. See shared/spec/attention.md.
//
// One read and one write forward; backward reads x and the incoming gradient and writes
// once. The float path uses a polynomial exp (Cephes coefficients, ≈1 ulp) written so
// that the compiler vectorises the loop (AVX-512 / AVX2 with -march=native); double uses
// std::exp. With u = eˣ and e = e^{−2u}:
//   tanh(u)     = (1 − e) / (1 + e)              (a series for u < 0.05: no cancellation)
//   1 − tanh²u  = 4e / (1 + e)²
// eˣ is taken of min(x, 20) (e^{−2u} is 0 beyond it in every dtype), and the exp of a
// very negative argument returns exactly 0, so the derivative's x·u·(1 − tanh²u) is 0,
// never inf · 0: both are finite for every finite x and tend to x and 1.
#include <torch/extension.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>

namespace disseg {
namespace {

inline float exp_f32(float x) {
  const bool under = x < -87.0f;
  x = std::fmin(std::fmax(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  const float y = std::fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return under ? 0.0f : y * scale;
}

inline double exp_any(double x) { return std::exp(x); }
inline float exp_any(float x) { return exp_f32(x); }

// tanh(u) for u ≥ 0, given e = e^{−2u}.
template <typename T>
inline T tanh_pos(T u, T e) {
  const T u2 = u * u;
  const T series = u * (T(1) + u2 * (T(-1.0 / 3.0) + u2 * (T(2.0 / 15.0) + u2 * T(-17.0 / 315.0))));
  return u < T(0.05) ? series : (T(1) - e) / (T(1) + e);
}

template <typename T>
inline T telu_fwd_one(T x) {
  const T u = exp_any(std::fmin(x, T(20)));
  const T e = exp_any(T(-2) * u);
  return x * tanh_pos(u, e);
}

template <typename T>
inline T telu_bwd_one(T x) {
  const T u = exp_any(std::fmin(x, T(20)));
  const T e = exp_any(T(-2) * u);
  const T d = T(1) + e;
  return tanh_pos(u, e) + T(4) * x * (u * e) / (d * d);
}

// Elementwise over a tensor that is dense in some layout (contiguous, channels_last or
// any permutation with no gaps): the same linear order for input and output, no copy.
bool dense(const at::Tensor& t) { return t.is_non_overlapping_and_dense(); }

}  // namespace

at::Tensor telu_fwd_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "telu_fwd: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(dense(x), "telu_fwd: x must be dense (contiguous, channels_last, ...), got strides ", x.strides());
  auto y = at::empty_like(x);
  TORCH_CHECK(y.strides() == x.strides(), "telu_fwd: could not allocate the output in x's layout");
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "telu_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t lo, int64_t hi) {
      _Pragma("omp simd")
      for (int64_t i = lo; i < hi; ++i) yp[i] = scalar_t(telu_fwd_one<acc_t>(acc_t(xp[i])));
    });
  });
  return y;
}

at::Tensor telu_bwd_cpu(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "telu_bwd: x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(dense(x), "telu_bwd: x must be dense, got strides ", x.strides());
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.strides() == x.strides() && grad.scalar_type() == x.scalar_type(),
              "telu_bwd: grad must match x in shape, strides and dtype; got ", grad.sizes(), " ", grad.strides(), " ",
              grad.scalar_type());
  auto dx = at::empty_like(x);
  TORCH_CHECK(dx.strides() == x.strides(), "telu_bwd: could not allocate dx in x's layout");
  const int64_t n = x.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "telu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t lo, int64_t hi) {
      _Pragma("omp simd")
      for (int64_t i = lo; i < hi; ++i) dp[i] = scalar_t(acc_t(gp[i]) * telu_bwd_one<acc_t>(acc_t(xp[i])));
    });
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(disseg, m) {
  m.def("telu_fwd(Tensor x) -> Tensor");
  m.def("telu_bwd(Tensor grad, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(disseg, CPU, m) {
  m.impl("telu_fwd", &telu_fwd_cpu);
  m.impl("telu_bwd", &telu_bwd_cpu);
}

}  // namespace disseg
