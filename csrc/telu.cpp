// TeLU, C++ CPU kernels: y = x · tanh(eˣ) and its derivative. See shared/spec/attention.md.
//
// One read and one write forward; backward reads x and the incoming gradient and writes
// once. float, bfloat16 and float16 run 16 (AVX-512) or 8 (AVX2 + FMA) lanes at a time in
// float with SLEEF's vector exp (the one ATen's own kernels use, exported by libtorch_cpu)
// where the compiler targets AVX2; half lanes are widened on load and rounded to nearest
// even on store (cpu_lanes.h). The scalar tail and double use std::exp. With u = eˣ and
// e = e^{−2u}:
//   tanh(u)     = (1 − e) / (1 + e)              (a series for u < 0.05: no cancellation)
//   1 − tanh²u  = 4e / (1 + e)²
// eˣ is taken of min(x, 20) (e^{−2u} is 0 beyond it in every dtype), and the exp of an
// argument below −80 is taken as exactly 0 (no denormals: they are ~50× slower), so the derivative's x·u·(1 − tanh²u) is 0,
// never inf · 0: both are finite for every finite x and tend to x and 1.
#include "cpu_lanes.h"  // first: it sets ATen's vector width

#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
extern "C" __m512 Sleef_expf16_u10(__m512);
#define DISSEG_TELU_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
extern "C" __m256 Sleef_expf8_u10(__m256);
#define DISSEG_TELU_AVX2 1
#endif

namespace disseg {
namespace {

inline double exp_any(double x) { return std::exp(x); }
inline float exp_any(float x) { return std::exp(x); }

// tanh(u) for u ≥ 0, given e = e^{−2u}.
template <typename T>
inline T tanh_pos(T u, T e) {
  const T u2 = u * u;
  const T series = u * (T(1) + u2 * (T(-1.0 / 3.0) + u2 * (T(2.0 / 15.0) + u2 * T(-17.0 / 315.0))));
  return u < T(0.05) ? series : (T(1) - e) / (T(1) + e);
}

// e^a for a ≥ −80, else exactly 0: below that every use rounds the term away, and a
// denormal result (from a ≈ −87 in float) would cost a microcode assist per lane.
// (double keeps its range: −745, where its exp underflows anyway.)
template <typename T>
inline T exp_or_zero(T a) {
  return a < T(std::is_same<T, double>::value ? -745 : -80) ? T(0) : exp_any(a);
}

template <typename T>
inline T telu_fwd_one(T x) {
  const T u = exp_or_zero(x < T(20) ? x : T(20));
  const T e = exp_or_zero(T(-2) * u);
  return x * tanh_pos(u, e);
}

template <typename T>
inline T telu_bwd_one(T x) {
  const T u = exp_or_zero(x < T(20) ? x : T(20));
  const T e = exp_or_zero(T(-2) * u);
  const T d = T(1) + e;
  return tanh_pos(u, e) + x * (T(4) * (u * e)) / (d * d);  // 4·(u·e) first: 4·x overflows past 8.5e37
}

#ifdef DISSEG_TELU_AVX512
// 16 lanes: e^a for a ≥ −80 else 0; r = 1/(1 + e) (one division serves both passes).
inline __m512 exp16_or_zero(__m512 a) {
  const __m512 lo = _mm512_set1_ps(-80.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(a, lo, _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(keep, Sleef_expf16_u10(_mm512_max_ps(a, lo)));
}

inline void telu_core16(__m512 x, __m512& u, __m512& e, __m512& r, __m512& t) {
  const __m512 one = _mm512_set1_ps(1.0f);
  u = exp16_or_zero(_mm512_min_ps(x, _mm512_set1_ps(20.0f)));
  e = exp16_or_zero(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u));
  r = _mm512_div_ps(one, _mm512_add_ps(one, e));
  const __m512 us = _mm512_min_ps(u, _mm512_set1_ps(0.05f));
  const __m512 u2 = _mm512_mul_ps(us, us);
  __m512 poly = _mm512_fmadd_ps(u2, _mm512_set1_ps(-17.0f / 315.0f), _mm512_set1_ps(2.0f / 15.0f));
  poly = _mm512_fmadd_ps(u2, poly, _mm512_set1_ps(-1.0f / 3.0f));
  poly = _mm512_fmadd_ps(u2, poly, one);
  const __m512 series = _mm512_mul_ps(us, poly);
  const __m512 ratio = _mm512_mul_ps(_mm512_sub_ps(one, e), r);
  t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(u, _mm512_set1_ps(0.05f), _CMP_LT_OQ), ratio, series);
}

inline __m512 telu_fwd16(__m512 x) {
  __m512 u, e, r, t;
  telu_core16(x, u, e, r, t);
  return _mm512_mul_ps(x, t);
}

inline __m512 telu_bwd16(__m512 x) {
  __m512 u, e, r, t;
  telu_core16(x, u, e, r, t);
  const __m512 q = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(u, e), r), r);  // u·e/(1+e)²
  return _mm512_fmadd_ps(x, _mm512_mul_ps(_mm512_set1_ps(4.0f), q), t);  // not 4·x: it overflows past 8.5e37
}
#endif

#ifdef DISSEG_TELU_AVX2
// e^a for a ≥ −80, else 0 (as exp_or_zero: no denormal ever reaches SLEEF's exp).
inline __m256 exp8_or_zero(__m256 a) {
  const __m256 lo = _mm256_set1_ps(-80.0f);
  const __m256 keep = _mm256_cmp_ps(a, lo, _CMP_GE_OQ);
  return _mm256_and_ps(keep, Sleef_expf8_u10(_mm256_max_ps(a, lo)));
}

// u = e^{min(x, 20)}, e = e^{−2u}, t = tanh(u).
inline void telu_core8(__m256 x, __m256& u, __m256& e, __m256& t) {
  const __m256 one = _mm256_set1_ps(1.0f);
  u = exp8_or_zero(_mm256_min_ps(x, _mm256_set1_ps(20.0f)));
  e = exp8_or_zero(_mm256_mul_ps(_mm256_set1_ps(-2.0f), u));
  const __m256 us = _mm256_min_ps(u, _mm256_set1_ps(0.05f));
  const __m256 u2 = _mm256_mul_ps(us, us);
  __m256 poly = _mm256_fmadd_ps(u2, _mm256_set1_ps(-17.0f / 315.0f), _mm256_set1_ps(2.0f / 15.0f));
  poly = _mm256_fmadd_ps(u2, poly, _mm256_set1_ps(-1.0f / 3.0f));
  poly = _mm256_fmadd_ps(u2, poly, one);
  const __m256 series = _mm256_mul_ps(us, poly);
  const __m256 ratio = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
  t = _mm256_blendv_ps(ratio, series, _mm256_cmp_ps(u, _mm256_set1_ps(0.05f), _CMP_LT_OQ));
}

inline __m256 telu_fwd8(__m256 x) {
  __m256 u, e, t;
  telu_core8(x, u, e, t);
  return _mm256_mul_ps(x, t);
}

inline __m256 telu_bwd8(__m256 x) {
  __m256 u, e, t;
  telu_core8(x, u, e, t);
  const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.0f), e);
  const __m256 q = _mm256_div_ps(_mm256_mul_ps(u, e), _mm256_mul_ps(d, d));
  return _mm256_fmadd_ps(x, _mm256_mul_ps(_mm256_set1_ps(4.0f), q), t);  // not 4·x: it overflows past 8.5e37
}
#endif

// The vector part of [i, hi): returns where the scalar tail starts.
template <typename T>
int64_t telu_fwd_lanes(const T* xp, T* yp, int64_t i, int64_t hi) {
#ifdef DISSEG_TELU_AVX512
  if constexpr (lanes::has_lanes<T> && lanes::kWidth == 16)
    for (; i + 16 <= hi; i += 16) lanes::store_float(yp + i, lanes::fvec(telu_fwd16(lanes::load_float(xp + i))));
#elif defined(DISSEG_TELU_AVX2)
  if constexpr (lanes::has_lanes<T> && lanes::kWidth == 8)
    for (; i + 8 <= hi; i += 8) lanes::store_float(yp + i, lanes::fvec(telu_fwd8(lanes::load_float(xp + i))));
#endif
  return i;
}

template <typename T>
int64_t telu_bwd_lanes(const T* gp, const T* xp, T* dp, int64_t i, int64_t hi) {
#ifdef DISSEG_TELU_AVX512
  if constexpr (lanes::has_lanes<T> && lanes::kWidth == 16)
    for (; i + 16 <= hi; i += 16)
      lanes::store_float(dp + i, lanes::fvec(_mm512_mul_ps(lanes::load_float(gp + i), telu_bwd16(lanes::load_float(xp + i)))));
#elif defined(DISSEG_TELU_AVX2)
  if constexpr (lanes::has_lanes<T> && lanes::kWidth == 8)
    for (; i + 8 <= hi; i += 8)
      lanes::store_float(dp + i, lanes::fvec(_mm256_mul_ps(lanes::load_float(gp + i), telu_bwd8(lanes::load_float(xp + i)))));
#endif
  return i;
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
      int64_t i = lo;
      i = telu_fwd_lanes(xp, yp, i, hi);
      for (; i < hi; ++i) yp[i] = scalar_t(telu_fwd_one<acc_t>(acc_t(xp[i])));
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
      int64_t i = lo;
      i = telu_bwd_lanes(gp, xp, dp, i, hi);
      for (; i < hi; ++i) dp[i] = scalar_t(acc_t(gp[i]) * telu_bwd_one<acc_t>(acc_t(xp[i])));
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
