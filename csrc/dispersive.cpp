// Dispersive loss, C++ CPU kernels. See shared/spec/dispersive.md.
//
// One operator, disseg::dispersive_fused(z, variant, tau, margin, include_diagonal,
// scale_by_dim, need_grad) -> (loss, dL/dz), for a contiguous (N, D) z. The loss is a
// scalar, so the gradient is produced by the same call, never from an N x N buffer.
//
// Two regimes:
//  * few samples (N <= kSmallN; the model's use: N = 8..64, D up to 262,144+):
//    the N x N Gram matrix in float64, the reduction over D split across threads, with
//    one code path for every entry (so identical rows give d = 0 exactly); then the
//    N x N weights A in float64 and one more pass over Z for grad = A Z.
//  * many samples (N up to 65,536+, D = 32..1024): row blocks x column blocks, Gram
//    tiles by single-threaded BLAS, an online logsumexp with one reference maximum per
//    row block, only tiles J >= I (each used for row block I and, transposed, for row
//    block J), scheduled as the rounds of a round-robin tournament so that the tiles of
//    one round touch disjoint rows and run in parallel without atomics. Memory O(N D).
//
// Every L2-family gradient is grad_i = sum_j W_ij (z_i - z_j) = r_i z_i - (W Z)_i with
// W symmetric, so each row keeps r_i = sum_j W_ij and acc_i = (W Z)_i.

#include "cpu_vec.h"  // first: it sets CPU_CAPABILITY before any ATen header

#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

// The BLAS that torch links (MKL on x86 builds) exports the Fortran interface; weak, so
// a torch without it still loads and uses the at::addmm_ path instead.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // mkl_service.h's C API
}

namespace disseg {
namespace {

enum Variant : int64_t { kL2 = 0, kL2sq = 1, kCosine = 2, kHinge = 3, kCovariance = 4 };

constexpr int64_t kSmallN = 64;  // N <= kSmallN: float64 Gram, reduction split over D
constexpr double kNormEps = 1e-12;
// A float64 Gram distance d^2 = n_i + n_j - 2 G_ij below kExactD2 (n_i + n_j) is taken again
// from exact differences (exact_d2): the Gram form loses digits to cancellation there (rows
// 1e-9 apart at unit norm: all of them), and duplicate rows get d = 0 exactly.
constexpr double kExactD2 = 1e-3;

// sum_k (x_k - y_k)^2 in float64 (the difference of two float32 or half values is exact).
template <typename T>
double exact_d2(const T* x, const T* y, int64_t D) {
  double d2 = 0.0;
  for (int64_t k = 0; k < D; ++k) {
    const double t = static_cast<double>(x[k]) - static_cast<double>(y[k]);
    d2 += t * t;
  }
  return d2;
}
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

bool is_l2_family(int64_t v) { return v == kL2 || v == kL2sq || v == kHinge; }

// ---------------------------------------------------------------------------------------
// Row-major GEMM helpers (BLAS is column-major: a row-major C = A B is C^T = B^T A^T).
// ---------------------------------------------------------------------------------------

template <typename T>
at::Tensor blob(T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(p, {rows, cols}, {ld, 1}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
void blas(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc);

bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

template <>
void blas<float>(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  int mi = (int)m, ni = (int)n, ki = (int)k, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
  sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

template <>
void blas<double>(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
                  const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  int mi = (int)m, ni = (int)n, ki = (int)k, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
  dgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

template <typename T>
bool have_blas() {
#ifdef DISSEG_DISPERSIVE_NO_BLAS  // to test the at::addmm_ path
  return false;
#else
  return std::is_same<T, float>::value ? (sgemm_ != nullptr) : (dgemm_ != nullptr);
#endif
}

// C[m x n] = alpha * A[m x k] * B[n x k]^T + beta * C
template <typename T>
void gemm_nt(int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T beta,
             T* C, int64_t ldc) {
  if (have_blas<T>() && fits_int(k) && fits_int(lda) && fits_int(ldb) && fits_int(ldc)) {
    blas<T>('T', 'N', n, m, k, alpha, B, ldb, A, lda, beta, C, ldc);
  } else {
    blob(C, m, n, ldc).addmm_(blob(const_cast<T*>(A), m, k, lda), blob(const_cast<T*>(B), n, k, ldb).t(), beta, alpha);
  }
}

// C[m x n] = alpha * A[m x k] * B[k x n] + beta * C
template <typename T>
void gemm_nn(int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T beta,
             T* C, int64_t ldc) {
  if (have_blas<T>() && fits_int(n) && fits_int(lda) && fits_int(ldb) && fits_int(ldc)) {
    blas<T>('N', 'N', n, m, k, alpha, B, ldb, A, lda, beta, C, ldc);
  } else {
    blob(C, m, n, ldc).addmm_(blob(const_cast<T*>(A), m, k, lda), blob(const_cast<T*>(B), k, n, ldb), beta, alpha);
  }
}

// C[m x n] = alpha * A[k x m]^T * B[k x n] + beta * C
template <typename T>
void gemm_tn(int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda, const T* B, int64_t ldb, T beta,
             T* C, int64_t ldc) {
  if (have_blas<T>() && fits_int(n) && fits_int(lda) && fits_int(ldb) && fits_int(ldc)) {
    blas<T>('N', 'T', n, m, k, alpha, B, ldb, A, lda, beta, C, ldc);
  } else {
    blob(C, m, n, ldc).addmm_(blob(const_cast<T*>(A), k, m, lda).t(), blob(const_cast<T*>(B), k, n, ldb), beta, alpha);
  }
}

// Inside a parallel region, each BLAS call must use one thread (the tiles are the
// parallelism); MKL's thread-local setting makes that explicit, and it is restored after.
struct SingleThreadedBlas {
  int prev = -1;
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr && omp_in_parallel()) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (prev >= 0) MKL_Set_Num_Threads_Local(prev);
  }
};

template <typename T>
using Vec = at::vec::Vectorized<T>;

inline Vec<float> vexp(const Vec<float>& x) { return x.exp_u20(); }
inline Vec<double> vexp(const Vec<double>& x) { return x.exp(); }

template <typename T>
T reduce_add(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return a + b; }, v);
}
template <typename T>
T reduce_max(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return at::vec::maximum(a, b); }, v);
}

template <typename in_t, typename out_t>
inline void convert_row(const in_t* src, out_t* dst, int64_t n, out_t scale) {
  if (scale == out_t(1)) {
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<out_t>(src[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<out_t>(src[k]) * scale;
  }
}

// ---------------------------------------------------------------------------------------
// Regime 1: few samples, huge D. Everything N x N in float64.
// ---------------------------------------------------------------------------------------

// One code path for every Gram entry: identical rows give bit-identical G_ii, G_ij, G_jj.
inline double dot_f64(const double* a, const double* b, int64_t n) {
  using V = Vec<double>;
  constexpr int64_t W = V::size();
  V s0(0.0), s1(0.0), s2(0.0), s3(0.0);
  int64_t k = 0;
  for (; k + 4 * W <= n; k += 4 * W) {
    s0 = at::vec::fmadd(V::loadu(a + k), V::loadu(b + k), s0);
    s1 = at::vec::fmadd(V::loadu(a + k + W), V::loadu(b + k + W), s1);
    s2 = at::vec::fmadd(V::loadu(a + k + 2 * W), V::loadu(b + k + 2 * W), s2);
    s3 = at::vec::fmadd(V::loadu(a + k + 3 * W), V::loadu(b + k + 3 * W), s3);
  }
  for (; k + W <= n; k += W) s0 = at::vec::fmadd(V::loadu(a + k), V::loadu(b + k), s0);
  double s = reduce_add<double>((s0 + s1) + (s2 + s3));
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// Columns [c0, c0 + cw) of z as float64, N x cw row-major; centred per column for the
// covariance variant (each chunk holds every row of its columns).
template <typename in_t>
void load_chunk_f64(const in_t* z, int64_t N, int64_t D, int64_t c0, int64_t cw, bool centre, double* buf,
                    double* colmean) {
  for (int64_t i = 0; i < N; ++i) convert_row<in_t, double>(z + i * D + c0, buf + i * cw, cw, 1.0);
  if (!centre) return;
  std::fill(colmean, colmean + cw, 0.0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < cw; ++k) colmean[k] += buf[i * cw + k];
  for (int64_t k = 0; k < cw; ++k) colmean[k] /= (double)N;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < cw; ++k) buf[i * cw + k] -= colmean[k];
}

int64_t small_chunk_width(int64_t N, int64_t D) {
  // Keep the N x cw float64 chunk in L1/L2 (~64 KB).
  int64_t cw = (8192 / std::max<int64_t>(N, 1)) / 16 * 16;
  cw = std::max<int64_t>(64, std::min<int64_t>(2048, cw));
  return std::min(cw, D);
}

// Pass 2 of the few-samples regime for the L2 family and float inputs:
// grad_i = sum_j W_ij (z_i - z_j) in float32 (W from the float64 weights), read straight
// from z for float32 inputs (half inputs through a float32 chunk). The pairwise form gives
// exactly 0 for identical rows.
template <typename in_t>
at::Tensor small_n_pairwise_grad_f32(const at::Tensor& z, const std::vector<double>& Wd, int64_t cw,
                                     int64_t nchunks) {
  using VF = Vec<float>;
  constexpr int64_t WF = VF::size();
  constexpr int64_t KB = 4 * WF;
  const int64_t N = z.size(0), D = z.size(1);
  const in_t* zp = z.data_ptr<in_t>();
  std::vector<float> Wf(Wd.begin(), Wd.end());
  at::Tensor grad = at::empty_like(z);
  in_t* gp = grad.data_ptr<in_t>();
  constexpr bool direct = std::is_same<in_t, float>::value;
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(direct ? 0 : (size_t)N * cw);
    float outb[KB];
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t c0 = ch * cw, w = std::min(cw, D - c0);
      const float* base;
      int64_t ld;
      if (direct) {
        base = reinterpret_cast<const float*>(zp) + c0;
        ld = D;
      } else {
        for (int64_t i = 0; i < N; ++i) convert_row<in_t, float>(zp + i * D + c0, buf.data() + i * w, w, 1.0f);
        base = buf.data();
        ld = w;
      }
      for (int64_t k0 = 0; k0 < w; k0 += KB) {
        const int64_t kn = std::min(KB, w - k0);
        for (int64_t i = 0; i < N; ++i) {
          const float* zi = base + i * ld + k0;
          const float* Wi = Wf.data() + i * N;
          if (kn == KB) {
            const VF z0 = VF::loadu(zi), z1 = VF::loadu(zi + WF), z2 = VF::loadu(zi + 2 * WF),
                     z3 = VF::loadu(zi + 3 * WF);
            VF acc0(0.f), acc1(0.f), acc2(0.f), acc3(0.f);
            for (int64_t j = 0; j < N; ++j) {
              if (Wi[j] == 0.f) continue;
              const VF a(Wi[j]);
              const float* zj = base + j * ld + k0;
              acc0 = at::vec::fmadd(a, z0 - VF::loadu(zj), acc0);
              acc1 = at::vec::fmadd(a, z1 - VF::loadu(zj + WF), acc1);
              acc2 = at::vec::fmadd(a, z2 - VF::loadu(zj + 2 * WF), acc2);
              acc3 = at::vec::fmadd(a, z3 - VF::loadu(zj + 3 * WF), acc3);
            }
            acc0.store(outb);
            acc1.store(outb + WF);
            acc2.store(outb + 2 * WF);
            acc3.store(outb + 3 * WF);
          } else {
            for (int64_t kk = 0; kk < kn; ++kk) {
              float o = 0.f;
              for (int64_t j = 0; j < N; ++j) o += Wi[j] * (zi[kk] - base[j * ld + k0 + kk]);
              outb[kk] = o;
            }
          }
          in_t* dst = gp + i * D + c0 + k0;
          for (int64_t kk = 0; kk < kn; ++kk) dst[kk] = static_cast<in_t>(outb[kk]);
        }
      }
    }
  });
  return grad;
}

template <typename in_t>
std::tuple<double, at::Tensor> small_n_forward_backward(const at::Tensor& z, int64_t variant, double tau,
                                                         double margin, bool include_diagonal, bool scale_by_dim,
                                                         bool need_grad) {
  const int64_t N = z.size(0), D = z.size(1);
  const in_t* zp = z.data_ptr<in_t>();
  const bool cov = variant == kCovariance;
  const int64_t cw = small_chunk_width(N, D);
  const int64_t nchunks = (D + cw - 1) / cw;
  const int nthreads = at::get_num_threads();

  // Pass 1: Gram (centred for covariance) with per-thread float64 partials.
  std::vector<double> partial((size_t)nthreads * N * N, 0.0);
  std::vector<double> cov_partial(nthreads, 0.0);  // sum_a c_a^2, c_a = sum_i Zc_ia^2
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    const int tid = at::get_thread_num();
    double* G = partial.data() + (size_t)tid * N * N;
    std::vector<double> buf((size_t)N * cw), colmean(cw);
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t c0 = ch * cw, w = std::min(cw, D - c0);
      load_chunk_f64<in_t>(zp, N, D, c0, w, cov, buf.data(), colmean.data());
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = i; j < N; ++j) G[i * N + j] += dot_f64(buf.data() + i * w, buf.data() + j * w, w);
      if (cov) {
        double acc = 0.0;
        for (int64_t k = 0; k < w; ++k) {
          double c = 0.0;
          for (int64_t i = 0; i < N; ++i) c += buf[i * w + k] * buf[i * w + k];
          acc += c * c;
        }
        cov_partial[tid] += acc;
      }
    }
  });
  std::vector<double> G((size_t)N * N, 0.0);
  double sum_c2 = 0.0;
  for (int t = 0; t < nthreads; ++t) {
    const double* P = partial.data() + (size_t)t * N * N;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = i; j < N; ++j) G[i * N + j] += P[i * N + j];
    sum_c2 += cov_partial[t];
  }
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < i; ++j) G[i * N + j] = G[j * N + i];

  // The N x N weights: grad = A Z (for covariance: grad = k (Gc Zc - Zc diag(c))).
  const double s = scale_by_dim ? 1.0 / (double)D : 1.0;
  const double npairs = include_diagonal ? (double)N * N : (double)N * (N - 1);
  std::vector<double> A((size_t)N * N, 0.0);
  std::vector<double> cos_nrm(N), cos_inv(N), cos_proj(N);
  std::vector<char> cos_project(N);
  double loss = 0.0;
  double cov_k = 0.0;
  auto in_pairs = [&](int64_t i, int64_t j) { return include_diagonal || i != j; };

  if (cov) {
    double fro = 0.0;
    for (int64_t i = 0; i < N * N; ++i) fro += G[i] * G[i];
    const double nm1 = (double)(N - 1);
    loss = (fro - sum_c2) / (nm1 * nm1);
    cov_k = 4.0 / (nm1 * nm1);
  } else if (variant == kCosine) {
    // zhat = z / max(||z||, eps) by division, so that zhat = +-1 exactly at D = 1 (where
    // the true gradient is exactly 0 and the projection below must cancel exactly).
    for (int64_t i = 0; i < N; ++i) {
      const double nrm = std::sqrt(G[i * N + i]);
      cos_nrm[i] = std::max(nrm, kNormEps);
      cos_inv[i] = 1.0 / cos_nrm[i];
      cos_project[i] = nrm > kNormEps;
    }
    auto ghat = [&](int64_t i, int64_t j) { return G[i * N + j] / (cos_nrm[i] * cos_nrm[j]); };
    std::vector<double> E((size_t)N * N, kNegInf);
    double m = kNegInf;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j)
        if (in_pairs(i, j)) {
          E[i * N + j] = -s * (1.0 - ghat(i, j)) / tau;
          m = std::max(m, E[i * N + j]);
        }
    double tot = 0.0;
    for (int64_t i = 0; i < N * N; ++i) tot += std::exp(E[i] - m);
    const double lse = m + std::log(tot);
    loss = lse - std::log(npairs);
    // g_i = sum_j c_ij zhat_j (w.r.t. zhat_i); zhat_i . g_i = sum_j c_ij Ghat_ij.
    for (int64_t i = 0; i < N; ++i) {
      double proj = 0.0;
      for (int64_t j = 0; j < N; ++j) {
        const double c = (2.0 * s / tau) * std::exp(E[i * N + j] - lse);
        A[i * N + j] = c;
        proj += c * ghat(i, j);
      }
      cos_proj[i] = cos_project[i] ? proj : 0.0;
    }
  } else {
    // L2 family: W symmetric, A = diag(rowsum W) - W.
    std::vector<double> u((size_t)N * N, 0.0);  // ||z_i - z_j|| (0 on the diagonal)
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = i + 1; j < N; ++j) {
        const double nsum = G[i * N + i] + G[j * N + j];
        double d2 = std::max(nsum - 2.0 * G[i * N + j], 0.0);
        if (d2 < kExactD2 * nsum) d2 = exact_d2(zp + i * D, zp + j * D, D);  // near duplicates
        u[i * N + j] = u[j * N + i] = variant == kL2sq ? d2 : std::sqrt(d2);  // kL2sq: holds d2
      }
    std::vector<double> W((size_t)N * N, 0.0);
    if (variant == kHinge) {
      double tot = 0.0;
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) {
          if (!in_pairs(i, j)) continue;
          const double uij = u[i * N + j];
          const double h = std::max(margin - s * uij, 0.0);
          tot += h * h;
          W[i * N + j] = uij > 0.0 ? -(4.0 * s / npairs) * h / uij : 0.0;
        }
      loss = tot / npairs;
    } else {
      std::vector<double> E((size_t)N * N, kNegInf);
      double m = kNegInf;
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j)
          if (in_pairs(i, j)) {
            E[i * N + j] = -s * u[i * N + j] / tau;
            m = std::max(m, E[i * N + j]);
          }
      double tot = 0.0;
      for (int64_t i = 0; i < N * N; ++i) tot += std::exp(E[i] - m);
      const double lse = m + std::log(tot);
      loss = lse - std::log(npairs);
      for (int64_t i = 0; i < N; ++i)
        for (int64_t j = 0; j < N; ++j) {
          if (!in_pairs(i, j)) continue;
          const double p = std::exp(E[i * N + j] - lse);
          const double uij = u[i * N + j];
          if (variant == kL2sq)
            W[i * N + j] = -(4.0 * s / tau) * p;
          else
            W[i * N + j] = uij > 0.0 ? -(2.0 * s / tau) * p / uij : 0.0;
        }
    }
    A.swap(W);  // pass 2 forms sum_j W_ij (z_i - z_j): exactly 0 for identical rows
  }

  if (!need_grad) return {loss, at::empty({0}, z.options())};

  if (is_l2_family(variant) && !std::is_same<in_t, double>::value) {
    return {loss, small_n_pairwise_grad_f32<in_t>(z, A, cw, nchunks)};
  }

  // Pass 2, parallel over D: grad_i = sum_j W_ij (z_i - z_j) (L2 family), the projection
  // of C Zhat (cosine),
  // k (Gc Zc - Zc diag(c)) (covariance).
  const bool pairwise = is_l2_family(variant);
  at::Tensor grad = at::empty_like(z);
  in_t* gp = grad.data_ptr<in_t>();
  at::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> buf((size_t)N * cw), colmean(cw), csq(cw);
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t c0 = ch * cw, w = std::min(cw, D - c0);
      load_chunk_f64<in_t>(zp, N, D, c0, w, cov, buf.data(), colmean.data());
      if (variant == kCosine)  // the rows of Zhat
        for (int64_t i = 0; i < N; ++i)
          for (int64_t k = 0; k < w; ++k) buf[i * w + k] /= cos_nrm[i];
      if (cov) {
        std::fill(csq.begin(), csq.begin() + w, 0.0);
        for (int64_t i = 0; i < N; ++i)
          for (int64_t k = 0; k < w; ++k) csq[k] += buf[i * w + k] * buf[i * w + k];
      }
      // Column blocks of 4 vectors: the weights broadcast, the rows of the chunk from L1.
      using VD = Vec<double>;
      constexpr int64_t WD = VD::size();
      constexpr int64_t KB = 4 * WD;
      const double* M = cov ? G.data() : A.data();
      double outb[KB];
      for (int64_t k0 = 0; k0 < w; k0 += KB) {
        const int64_t kn = std::min(KB, w - k0);
        for (int64_t i = 0; i < N; ++i) {
          const double* zi = buf.data() + i * w + k0;
          const double* Mi = M + i * N;
          if (kn == KB) {
            VD acc0(0.0), acc1(0.0), acc2(0.0), acc3(0.0);
            if (pairwise) {
              const VD z0 = VD::loadu(zi), z1 = VD::loadu(zi + WD), z2 = VD::loadu(zi + 2 * WD),
                       z3 = VD::loadu(zi + 3 * WD);
              for (int64_t j = 0; j < N; ++j) {
                if (Mi[j] == 0.0) continue;
                const VD a(Mi[j]);
                const double* zj = buf.data() + j * w + k0;
                acc0 = at::vec::fmadd(a, z0 - VD::loadu(zj), acc0);
                acc1 = at::vec::fmadd(a, z1 - VD::loadu(zj + WD), acc1);
                acc2 = at::vec::fmadd(a, z2 - VD::loadu(zj + 2 * WD), acc2);
                acc3 = at::vec::fmadd(a, z3 - VD::loadu(zj + 3 * WD), acc3);
              }
            } else {
              for (int64_t j = 0; j < N; ++j) {
                const VD a(Mi[j]);
                const double* zj = buf.data() + j * w + k0;
                acc0 = at::vec::fmadd(a, VD::loadu(zj), acc0);
                acc1 = at::vec::fmadd(a, VD::loadu(zj + WD), acc1);
                acc2 = at::vec::fmadd(a, VD::loadu(zj + 2 * WD), acc2);
                acc3 = at::vec::fmadd(a, VD::loadu(zj + 3 * WD), acc3);
              }
            }
            acc0.store(outb);
            acc1.store(outb + WD);
            acc2.store(outb + 2 * WD);
            acc3.store(outb + 3 * WD);
          } else {
            for (int64_t kk = 0; kk < kn; ++kk) {
              double o = 0.0;
              for (int64_t j = 0; j < N; ++j) {
                const double zjk = buf[j * w + k0 + kk];
                o += Mi[j] * (pairwise ? zi[kk] - zjk : zjk);
              }
              outb[kk] = o;
            }
          }
          in_t* dst = gp + i * D + c0 + k0;
          if (cov) {
            for (int64_t kk = 0; kk < kn; ++kk)
              dst[kk] = static_cast<in_t>(cov_k * (outb[kk] - zi[kk] * csq[k0 + kk]));
          } else if (variant == kCosine) {  // dz_i = (g_i - (zhat_i . g_i) zhat_i) / ||z_i||
            for (int64_t kk = 0; kk < kn; ++kk)
              dst[kk] = static_cast<in_t>(cos_inv[i] * (outb[kk] - cos_proj[i] * zi[kk]));
          } else {
            for (int64_t kk = 0; kk < kn; ++kk) dst[kk] = static_cast<in_t>(outb[kk]);
          }
        }
      }
    }
  });
  return {loss, grad};
}

// ---------------------------------------------------------------------------------------
// Regime 2: many samples. Symmetric tiles, online logsumexp, no N x N buffer.
// ---------------------------------------------------------------------------------------

struct TileConfig {
  int64_t B;   // rows per block (the last block may be shorter)
  int64_t nb;  // number of blocks
};

// Rows per block: 256, or DISSEG_DISPERSIVE_BLOCK; a B x D block is bounded to ~8 MB at
// huge D (the symmetric tiles hold two per thread, the row statistics one).
int64_t block_rows(int64_t D, int64_t elem_bytes) {
  int64_t B = 256;
  if (const char* env = std::getenv("DISSEG_DISPERSIVE_BLOCK")) {
    const long v = std::strtol(env, nullptr, 10);
    TORCH_CHECK(v >= 16 && v <= 4096, "DISSEG_DISPERSIVE_BLOCK must be in [16, 4096], got ", env);
    B = v;
  }
  const int64_t cap = (8LL << 20) / std::max<int64_t>(D * elem_bytes, 1);
  return std::max<int64_t>(16, std::min(B, cap));
}

TileConfig choose_tiles(int64_t N, int64_t D, int64_t elem_bytes) {
  int64_t B = block_rows(D, elem_bytes);
  int64_t nb = (N + B - 1) / B;
  if (nb > 1) {
    // A multiple of 2T blocks gives every round a multiple of T disjoint pairs.
    const int64_t step = 2 * std::max<int64_t>(1, at::get_num_threads());
    nb = (nb + step - 1) / step * step;
    B = (N + nb - 1) / nb;
    nb = (N + B - 1) / B;
  }
  return {B, nb};
}

// Precision of the tiled regime (float inputs): the weights, exponentials and the two
// W Z products run in float32, but a distance from a float32 Gram tile,
// d2 = n_i + n_j - 2 G_ij, has an absolute error ~eps32 (n_i + n_j): relative to d2 that
// is large for close pairs (which dominate both the softmax and the hinge), and for the
// squared distance d2 / tau itself is exponentiated. So a tile's Gram and distances are
// recomputed in float64 (from the same float32 rows) when
//   * the variant is infonce_l2sq (always),
//   * the tile is diagonal (it gives the float64 norms n_i, the same GEMM code path as
//     the off-diagonal entries, so duplicate rows get d = 0 exactly),
//   * infonce_l2 / hinge, and some pair of the tile has d2 < (n_i + n_j) / 16.
// Well-separated tiles (random data at D >= 32: none of them) stay on float32 GEMMs.
template <typename in_t, typename acc_t>
struct ManySamples {
  static constexpr bool kAccF64 = std::is_same<acc_t, double>::value;

  const in_t* z;
  int64_t N, D, variant;
  double tau, margin;
  bool include_diagonal, need_grad;
  double s;  // 1/D with scale_by_dim, else 1
  TileConfig tc;
  int64_t ldS;

  acc_t* acc;                 // N x D: sum_j V_ij z_j (relative to the block reference)
  std::vector<acc_t> r;       // N: sum_j V_ij
  std::vector<acc_t> sqn;     // N (+ padding): ||z_i||^2 (rounded from sqn_d)
  std::vector<double> sqn_d;  // N (+ padding): ||z_i||^2 from the float64 diagonal tiles
  std::vector<acc_t> nrmc;    // N: max(||z_i||, eps) (cosine; zhat = z / nrmc, +-1 exactly at D = 1)
  std::vector<char> project;  // N: ||z_i|| > eps (cosine)
  std::vector<double> blkM;   // per block: the reference maximum of E = -d / tau
  std::vector<double> blkL;   // per block: sum over its rows of sum_j exp(E_ij - M)

  struct Workspace {
    std::vector<acc_t> S, rowsum, colsum, zi, zj;     // S: the Gram tile, then V in place
    std::vector<double> Sd, rowsum_d, colsum_d, zid, zjd;  // the float64 tile path
    std::vector<double> X;  // exact d2 of a float64 tile's near-duplicate pairs
  };
  std::vector<Workspace> ws;

  enum Status { kOk, kSkip, kNeedF64 };

  bool infonce() const { return variant == kL2 || variant == kL2sq || variant == kCosine; }
  bool needs_copy() const { return !std::is_same<in_t, acc_t>::value || variant == kCosine; }
  bool uses_f64_tiles() const { return kAccF64 || variant != kCosine; }
  int64_t row0(int64_t X) const { return X * tc.B; }
  int64_t rows(int64_t X) const { return std::min(tc.B, N - X * tc.B); }

  // Rows of block X as T, row-major with stride D (normalised rows for cosine).
  template <typename T>
  const T* load_rows(int64_t X, std::vector<T>& buf) const {
    const int64_t r0 = row0(X), n = rows(X);
    if (std::is_same<in_t, T>::value && variant != kCosine) return reinterpret_cast<const T*>(z + r0 * D);
    for (int64_t a = 0; a < n; ++a) {
      T* dst = buf.data() + a * D;
      convert_row<in_t, T>(z + (r0 + a) * D, dst, D, T(1));
      if (variant == kCosine) {
        const T nr = static_cast<T>(nrmc[r0 + a]);
        for (int64_t k = 0; k < D; ++k) dst[k] /= nr;
      }
    }
    return buf.data();
  }

  void rescale_block(int64_t X, double factor) {
    const int64_t r0 = row0(X), n = rows(X);
    const acc_t f = static_cast<acc_t>(factor);
    for (int64_t a = 0; a < n; ++a) {
      r[r0 + a] *= f;
      if (acc == nullptr) continue;
      acc_t* row = acc + (r0 + a) * D;
      for (int64_t k = 0; k < D; ++k) row[k] *= f;
    }
    blkL[X] *= factor;
  }

  // Raise block X's reference to at least t; returns exp(t - M_X), the factor that
  // brings a tile computed relative to t onto block X's reference.
  double align_block(int64_t X, double t) {
    if (t > blkM[X]) {
      if (blkM[X] != kNegInf) rescale_block(X, std::exp(blkM[X] - t));
      blkM[X] = t;
    }
    return std::exp(t - blkM[X]);
  }

  // The elementwise passes over one Gram tile S (bi x bj, stride ldS), in place: S becomes
  // V, the weights of the W Z products (InfoNCE: exp(E - t), divided by ||z_i - z_j|| for
  // infonce_l2; hinge: max(0, margin - d) / ||z_i - z_j||), with its row and column sums,
  // the tile's loss sum (sum of exp(E - t) or of hinge^2) and its maximum t of E = -d/tau.
  template <typename g_t>
  Status elementwise(bool diag, int64_t i0, int64_t j0, int64_t bi, int64_t bj, g_t* S, const g_t* sq,
                     g_t* rowsum, g_t* colsum, bool check_close, double& tile_sum, double& t,
                     const g_t* X = nullptr) const {
    using VG = Vec<g_t>;
    constexpr int64_t WG = VG::size();
    constexpr int full = (int)((1ULL << WG) - 1);
    const bool mask_diag = diag && !include_diagonal;
    const VG zero(g_t(0)), ninf(-std::numeric_limits<g_t>::infinity()), bjv((g_t)bj);
    const VG kappa(g_t(1.0 / 16.0)), hmargin((g_t)margin), vs((g_t)s);
    // Duplicate rows: d2 = n_i + n_j - 2 G_ij is exactly 0 only if the GEMM computes G_ij
    // and G_ii alike, which a BLAS need not do (MKL on an AMD EPYC gave them different
    // last bits; infonce_l2's weight p / ||z_i - z_j|| then blew up). No threshold is
    // needed: a float32 tile with a close pair goes to float64 (check_close), and a float64
    // tile takes its close pairs' d2 from exact differences (X, >= 0 where set; 0 for
    // duplicates). Until 2026-11-28 a float64 pair within 1e-12 (n_i + n_j) counted as a
    // duplicate, which took the gradient of every pair closer than ~1e-6 of its norm.
    const g_t* nj = sq + j0;
    if (!diag) std::fill(colsum, colsum + ldS, g_t(0));
    const g_t negc = static_cast<g_t>(-s / tau);
    VG vmax = ninf;
    tile_sum = 0.0;  // per-row partial sums in g_t, the tile's total in float64
    for (int64_t a = 0; a < bi; ++a) {
      g_t* srow = S + a * ldS;
      const VG ni(variant == kCosine ? g_t(0) : sq[i0 + a]);
      VG rs = zero, vloss = zero;
      for (int64_t b0 = 0; b0 < bj; b0 += WG) {
        const VG sv = VG::loadu(srow + b0);
        VG invalid = zero;  // all-ones lanes: outside the tile or an excluded diagonal pair
        const bool tail = b0 + WG > bj;
        const bool has_diag = mask_diag && a >= b0 && a < b0 + WG;
        if (tail || has_diag) {
          const VG idx = VG::arange(g_t(b0), g_t(1));
          if (tail) invalid = idx >= bjv;
          if (has_diag) invalid = invalid | (idx == VG((g_t)a));
        }
        VG u;  // ||z_i - z_j|| (l2, hinge), its square (l2sq), or 1 - cos (cosine)
        if (variant == kCosine) {
          u = VG(g_t(1)) - sv;
        } else {
          const VG nsum = ni + VG::loadu(nj + b0);
          VG d2 = at::vec::maximum(at::vec::fmadd(sv, VG(g_t(-2)), nsum), zero);
          if (X != nullptr) {
            const VG xv = VG::loadu(X + a * ldS + b0);
            d2 = VG::blendv(d2, xv, xv >= zero);
          }
          if (check_close) {
            VG close = d2 < nsum * kappa;
            if (tail || has_diag) close = VG::blendv(close, zero, invalid);
            if (close.zero_mask() != full) return kNeedF64;
          }
          u = variant == kL2sq ? d2 : d2.sqrt();
        }
        if (variant == kHinge) {
          VG h = at::vec::maximum(hmargin - u * vs, zero);
          if (tail || has_diag) h = VG::blendv(h, zero, invalid);
          const VG v = VG::blendv(h / u, zero, (u == zero) | invalid);
          vloss = at::vec::fmadd(h, h, vloss);
          v.store(srow + b0);
          rs = rs + v;
          if (!diag) (VG::loadu(colsum + b0) + v).store(colsum + b0);
        } else {
          VG e = u * VG(negc);
          if (tail || has_diag) e = VG::blendv(e, ninf, invalid);
          e.store(srow + b0);
          vmax = at::vec::maximum(vmax, e);
        }
      }
      if (variant == kHinge) {
        rowsum[a] = reduce_add<g_t>(rs);
        tile_sum += (double)reduce_add<g_t>(vloss);
      }
    }
    if (variant == kHinge) {
      t = 0.0;
      return tile_sum == 0.0 ? kSkip : kOk;  // no pair inside the margin: V = 0
    }
    t = (double)reduce_max<g_t>(vmax);
    if (t == kNegInf) return kSkip;  // a one-row diagonal tile with the diagonal excluded
    const VG tv((g_t)t), inv_negc(g_t(1) / negc);
    for (int64_t a = 0; a < bi; ++a) {
      g_t* srow = S + a * ldS;
      VG rs = zero, vloss = zero;
      for (int64_t b0 = 0; b0 < bj; b0 += WG) {
        const VG e = VG::loadu(srow + b0);
        const VG p = vexp(e - tv);
        vloss = vloss + p;
        VG v = p;
        if (variant == kL2) {
          const VG u = e * inv_negc;  // ||z_i - z_j||; +inf on invalid lanes (p = 0 there)
          v = VG::blendv(p / u, zero, u == zero);
        } else if (variant == kL2sq) {
          // A duplicate pair (d = 0) counts in the loss but its gradient, p (z_i - z_j),
          // is 0: leaving it out of V spares r_i z_i - (V Z)_i a large cancellation.
          v = VG::blendv(p, zero, e == zero);
        }
        v.store(srow + b0);
        rs = rs + v;
        if (!diag) (VG::loadu(colsum + b0) + v).store(colsum + b0);
      }
      rowsum[a] = reduce_add<g_t>(rs);
      tile_sum += (double)reduce_add<g_t>(vloss);
    }
    return kOk;
  }

  // The float64 tile's near-duplicate pairs (d2 < kExactD2 (n_i + n_j) by the Gram form):
  // their d2 from exact differences of the rows, in X (bi x ldS; -1 elsewhere). nullptr
  // when the tile has none, the usual case.
  const double* exact_close_pairs(bool diag, int64_t i0, int64_t j0, int64_t bi, int64_t bj, const double* Sd,
                                  const double* zid, const double* zjd, Workspace& w) const {
    double* X = nullptr;
    for (int64_t a = 0; a < bi; ++a)
      for (int64_t b = diag ? a + 1 : 0; b < bj; ++b) {  // a row with itself: d2 = 2 n_i - 2 n_i = 0 exactly
        const double nsum = sqn_d[i0 + a] + sqn_d[j0 + b];
        if (!(nsum - 2.0 * Sd[a * ldS + b] < kExactD2 * nsum)) continue;
        if (X == nullptr) {
          w.X.assign(tc.B * ldS, -1.0);
          X = w.X.data();
        }
        const double d2 = exact_d2(zid + a * D, zjd + b * D, D);
        X[a * ldS + b] = d2;
        if (diag) X[b * ldS + a] = d2;
      }
    return X;
  }

  void tile(int64_t I, int64_t J, Workspace& w) {
    const bool diag = I == J;
    const int64_t bi = rows(I), bj = rows(J), i0 = row0(I), j0 = row0(J);
    const acc_t* zi = load_rows<acc_t>(I, w.zi);
    const acc_t* zj = diag ? zi : load_rows<acc_t>(J, w.zj);
    acc_t* S = w.S.data();
    acc_t* rowsum = w.rowsum.data();
    acc_t* colsum = w.colsum.data();
    double tile_sum = 0.0, t = 0.0;
    bool f64 = kAccF64 || variant == kL2sq || (diag && variant != kCosine);
    Status st = kOk;
    if (!f64) {
      gemm_nt<acc_t>(bi, bj, D, acc_t(1), zi, D, zj, D, acc_t(0), S, ldS);
      st = elementwise<acc_t>(diag, i0, j0, bi, bj, S, sqn.data(), rowsum, colsum,
                              variant == kL2 || variant == kHinge, tile_sum, t);
      f64 = st == kNeedF64;
    }
    if (f64) {
      double* Sd = kAccF64 ? reinterpret_cast<double*>(S) : w.Sd.data();
      double* rsd = kAccF64 ? reinterpret_cast<double*>(rowsum) : w.rowsum_d.data();
      double* csd = kAccF64 ? reinterpret_cast<double*>(colsum) : w.colsum_d.data();
      const double* zid = kAccF64 ? reinterpret_cast<const double*>(zi) : load_rows<double>(I, w.zid);
      const double* zjd = diag ? zid : kAccF64 ? reinterpret_cast<const double*>(zj) : load_rows<double>(J, w.zjd);
      gemm_nt<double>(bi, bj, D, 1.0, zid, D, zjd, D, 0.0, Sd, ldS);
      if (diag && variant != kCosine) {
        for (int64_t a = 0; a < bi; ++a) {
          sqn_d[i0 + a] = Sd[a * ldS + a];
          sqn[i0 + a] = static_cast<acc_t>(Sd[a * ldS + a]);
        }
      }
      const double* X = variant == kCosine ? nullptr : exact_close_pairs(diag, i0, j0, bi, bj, Sd, zid, zjd, w);
      st = elementwise<double>(diag, i0, j0, bi, bj, Sd, sqn_d.data(), rsd, csd, false, tile_sum, t, X);
      if (st == kOk && !kAccF64) {
        for (int64_t a = 0; a < bi; ++a) {
          for (int64_t b = 0; b < bj; ++b) S[a * ldS + b] = static_cast<acc_t>(Sd[a * ldS + b]);
          rowsum[a] = static_cast<acc_t>(rsd[a]);
        }
        if (!diag)
          for (int64_t b = 0; b < bj; ++b) colsum[b] = static_cast<acc_t>(csd[b]);
      }
    }
    if (st == kSkip) return;

    // Row block I: acc_I += alpha_I V Z_J.
    const double alpha_i = infonce() ? align_block(I, t) : 1.0;
    if ((acc_t)alpha_i != acc_t(0)) {
      if (need_grad) gemm_nn<acc_t>(bi, D, bj, (acc_t)alpha_i, S, ldS, zj, D, acc_t(1), acc + i0 * D, D);
      for (int64_t a = 0; a < bi; ++a) r[i0 + a] += (acc_t)alpha_i * rowsum[a];
      blkL[I] += alpha_i * tile_sum;
    }
    if (diag) return;
    // Row block J: acc_J += alpha_J V^T Z_I.
    const double alpha_j = infonce() ? align_block(J, t) : 1.0;
    if ((acc_t)alpha_j != acc_t(0)) {
      if (need_grad) gemm_tn<acc_t>(bj, D, bi, (acc_t)alpha_j, S, ldS, zi, D, acc_t(1), acc + j0 * D, D);
      for (int64_t b = 0; b < bj; ++b) r[j0 + b] += (acc_t)alpha_j * colsum[b];
      blkL[J] += alpha_j * tile_sum;
    }
  }

  std::tuple<double, at::Tensor> run(const at::Tensor& zt, bool scale_by_dim) {
    tc = choose_tiles(N, D, uses_f64_tiles() ? sizeof(double) : sizeof(acc_t));
    ldS = (tc.B + 15) / 16 * 16;  // a multiple of every vector width
    s = scale_by_dim ? 1.0 / (double)D : 1.0;
    const int64_t nb = tc.nb;

    // acc lives in the gradient buffer when the dtypes agree (no extra N x D).
    at::Tensor grad, acc_t_buf;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    if (need_grad) {
      grad = at::empty_like(zt);
      if (std::is_same<in_t, acc_t>::value) {
        grad.zero_();
        acc = reinterpret_cast<acc_t*>(grad.data_ptr());
      } else {
        acc_t_buf = at::zeros({N, D}, zt.options().dtype(acc_dtype));
        acc = acc_t_buf.data_ptr<acc_t>();
      }
    } else {
      acc = nullptr;
    }
    r.assign(N, acc_t(0));
    sqn.assign(N + ldS, acc_t(0));
    sqn_d.assign(N + ldS, 0.0);
    blkM.assign(nb, infonce() ? kNegInf : 0.0);
    blkL.assign(nb, 0.0);
    if (variant == kCosine) {
      nrmc.assign(N, acc_t(1));
      project.assign(N, 0);
      at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          double ss = 0.0;
          const in_t* row = z + i * D;
          for (int64_t k = 0; k < D; ++k) {
            const double v = static_cast<double>(row[k]);
            ss += v * v;
          }
          nrmc[i] = static_cast<acc_t>(std::max(std::sqrt(ss), kNormEps));
          project[i] = std::sqrt(ss) > kNormEps;
        }
      });
    }
    ws.resize(std::max(1, at::get_num_threads()));
    for (auto& w : ws) {
      w.S.assign(tc.B * ldS, acc_t(0));
      w.rowsum.assign(ldS, acc_t(0));
      w.colsum.assign(ldS, acc_t(0));
      if (needs_copy()) {
        w.zi.assign(tc.B * D, acc_t(0));
        w.zj.assign(tc.B * D, acc_t(0));
      }
      if (!kAccF64 && uses_f64_tiles()) {
        w.Sd.assign(tc.B * ldS, 0.0);
        w.rowsum_d.assign(ldS, 0.0);
        w.colsum_d.assign(ldS, 0.0);
        w.zid.assign(tc.B * D, 0.0);
        w.zjd.assign(tc.B * D, 0.0);
      }
    }

    // The diagonal tiles first: they also give ||z_i||^2 = G_ii for every row, from the
    // same GEMM code path as the off-diagonal entries (duplicate rows give d = 0).
    at::parallel_for(0, nb, 1, [&](int64_t begin, int64_t end) {
      SingleThreadedBlas guard;
      for (int64_t X = begin; X < end; ++X) tile(X, X, ws[at::get_thread_num()]);
    });
    // Round-robin tournament (circle method): every round pairs all blocks disjointly.
    const int64_t m = nb % 2 == 0 ? nb : nb + 1;  // with a dummy block when odd
    std::vector<std::pair<int64_t, int64_t>> pairs;
    for (int64_t round = 0; round + 1 < m; ++round) {
      pairs.clear();
      for (int64_t k = 0; k < m / 2; ++k) {
        int64_t a, b;
        if (k == 0) {
          a = round;
          b = m - 1;
        } else {
          a = (round + k) % (m - 1);
          b = (round - k + (m - 1)) % (m - 1);
        }
        if (a >= nb || b >= nb) continue;
        pairs.emplace_back(std::min(a, b), std::max(a, b));
      }
      at::parallel_for(0, (int64_t)pairs.size(), 1, [&](int64_t begin, int64_t end) {
        SingleThreadedBlas guard;
        for (int64_t p = begin; p < end; ++p) tile(pairs[p].first, pairs[p].second, ws[at::get_thread_num()]);
      });
    }

    const double npairs = include_diagonal ? (double)N * N : (double)N * (N - 1);
    double loss;
    std::vector<double> row_coef(nb);  // grad_i = row_coef[X] * (...)
    if (infonce()) {
      double mg = kNegInf;
      for (int64_t X = 0; X < nb; ++X) mg = std::max(mg, blkM[X]);
      double tot = 0.0;
      for (int64_t X = 0; X < nb; ++X)
        if (blkM[X] != kNegInf) tot += std::exp(blkM[X] - mg) * blkL[X];
      const double lse = mg + std::log(tot);
      loss = lse - std::log(npairs);
      const double coef = variant == kL2sq ? -4.0 * s / tau : variant == kL2 ? -2.0 * s / tau : 2.0 * s / tau;
      for (int64_t X = 0; X < nb; ++X) row_coef[X] = blkM[X] == kNegInf ? 0.0 : coef * std::exp(blkM[X] - lse);
    } else {
      double tot = 0.0;
      for (int64_t X = 0; X < nb; ++X) tot += blkL[X];
      loss = tot / npairs;
      for (int64_t X = 0; X < nb; ++X) row_coef[X] = -4.0 * s / npairs;
    }
    if (!need_grad) return {loss, at::empty({0}, zt.options())};

    in_t* gp = grad.data_ptr<in_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> zrow(D);
      for (int64_t i = begin; i < end; ++i) {
        const acc_t c = (acc_t)row_coef[i / tc.B];
        const acc_t* ai = acc + i * D;
        convert_row<in_t, acc_t>(z + i * D, zrow.data(), D, acc_t(1));
        in_t* gi = gp + i * D;
        if (variant == kCosine) {
          // g = c acc (w.r.t. zhat_i); dz_i = (g - (zhat_i . g) zhat_i) / ||z_i||.
          const acc_t nr = nrmc[i];
          for (int64_t k = 0; k < D; ++k) zrow[k] /= nr;  // zhat_i
          double proj = 0.0;
          if (project[i])
            for (int64_t k = 0; k < D; ++k) proj += (double)zrow[k] * (double)ai[k];
          const acc_t pr = (acc_t)proj;
          for (int64_t k = 0; k < D; ++k) gi[k] = static_cast<in_t>(c * (ai[k] - pr * zrow[k]) / nr);
        } else {
          const acc_t ri = r[i];
          for (int64_t k = 0; k < D; ++k) gi[k] = static_cast<in_t>(c * (ri * zrow[k] - ai[k]));
        }
      }
    });
    return {loss, grad};
  }
};

// Covariance at N > kSmallN: GEMM-bound, through at::mm, with the smaller of the N x N
// and D x D matrices (||Zc Zc^T||_F = ||Zc^T Zc||_F, Zc Zc^T Zc = Zc (Zc^T Zc)).
std::tuple<double, at::Tensor> covariance_mm(const at::Tensor& z, bool need_grad, bool f64) {
  const int64_t N = z.size(0), D = z.size(1);
  const auto acc_dtype = f64 || z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor zc = z.to(acc_dtype);
  zc = zc - zc.mean(0, true);
  const double nm1 = (double)(N - 1);
  const double k = 4.0 / (nm1 * nm1);
  double loss;
  at::Tensor grad;
  if (D <= N) {
    at::Tensor C = at::mm(zc.t(), zc);  // D x D
    C.fill_diagonal_(0);                // sum_{a != b} C_ab^2, no cancellation
    loss = C.to(at::kDouble).square().sum().item<double>() / (nm1 * nm1);
    if (need_grad) grad = at::mm(zc, C).mul_(k);
  } else {
    at::Tensor G = at::mm(zc, zc.t());  // N x N
    at::Tensor c = zc.square().sum(0);
    loss = (G.to(at::kDouble).square().sum().item<double>() - c.to(at::kDouble).square().sum().item<double>()) /
           (nm1 * nm1);
    if (need_grad) grad = (at::mm(G, zc) - zc * c).mul_(k);
  }
  if (!need_grad) return {loss, at::empty({0}, z.options())};
  return {loss, grad.to(z.scalar_type())};
}

template <typename in_t, typename acc_t>
std::tuple<double, at::Tensor> run_many_samples(const at::Tensor& z, int64_t variant, double tau, double margin,
                                                bool include_diagonal, bool scale_by_dim, bool need_grad);

template <typename in_t>
std::tuple<double, at::Tensor> dispatch(const at::Tensor& z, int64_t variant, double tau, double margin,
                                        bool include_diagonal, bool scale_by_dim, bool need_grad) {
  const int64_t N = z.size(0);
  const int64_t D = z.size(1);
  // Covariance with D < N goes through the D x D matrix with its diagonal zeroed: no
  // cancellation, and exactly 0 at D = 1 (float64 when N is small).
  const bool cov_dd = variant == kCovariance && D < N;
  if (N <= kSmallN && !cov_dd)
    return small_n_forward_backward<in_t>(z, variant, tau, margin, include_diagonal, scale_by_dim, need_grad);
  if (variant == kCovariance) return covariance_mm(z, need_grad, N <= kSmallN);
  using acc_t = typename std::conditional<std::is_same<in_t, double>::value, double, float>::type;
  return run_many_samples<in_t, acc_t>(z, variant, tau, margin, include_diagonal, scale_by_dim, need_grad);
}

template <typename in_t, typename acc_t>
std::tuple<double, at::Tensor> run_many_samples(const at::Tensor& z, int64_t variant, double tau, double margin,
                                                bool include_diagonal, bool scale_by_dim, bool need_grad) {
  const int64_t N = z.size(0);
  ManySamples<in_t, acc_t> k;
  k.z = z.data_ptr<in_t>();
  k.N = N;
  k.D = z.size(1);
  k.variant = variant;
  k.tau = tau;
  k.margin = margin;
  k.include_diagonal = include_diagonal;
  k.need_grad = need_grad;
  return k.run(z, scale_by_dim);
}

// disseg::dispersive_row_stats: rows against a rectangular column set (the distributed
// loss and the memory bank), with this file's GEMM and vector helpers.
#include "dispersive_rows.h"

}  // namespace

// double -> float with IEEE overflow to ±inf (a plain cast of an out-of-range double is
// undefined behaviour in C++).
inline float clamp_to_float(double v) {
  if (v > static_cast<double>(std::numeric_limits<float>::max())) return std::numeric_limits<float>::infinity();
  if (v < -static_cast<double>(std::numeric_limits<float>::max())) return -std::numeric_limits<float>::infinity();
  return static_cast<float>(v);
}

std::tuple<at::Tensor, at::Tensor> dispersive_fused_cpu(const at::Tensor& z, int64_t variant, double tau,
                                                        double margin, bool include_diagonal, bool scale_by_dim,
                                                        bool need_grad) {
  TORCH_CHECK(z.device().is_cpu(), "dispersive_fused_cpu: z must be a CPU tensor, got device ", z.device());
  TORCH_CHECK(z.dim() == 2, "dispersive_fused_cpu: z must have shape (N, D), got ", z.sizes());
  TORCH_CHECK(z.is_contiguous(), "dispersive_fused_cpu: z must be contiguous, got strides ", z.strides());
  const auto dt = z.scalar_type();
  TORCH_CHECK(dt == at::kDouble || dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "dispersive_fused_cpu: z must be float64, float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(variant >= 0 && variant <= 4,
              "dispersive_fused_cpu: variant must be 0..4 (infonce_l2, infonce_l2sq, infonce_cosine, hinge, "
              "covariance), got ",
              variant);
  TORCH_CHECK(tau > 0 && std::isfinite(tau), "dispersive_fused_cpu: tau must be a finite number > 0, got ", tau);
  TORCH_CHECK(margin > 0 && std::isfinite(margin), "dispersive_fused_cpu: margin must be a finite number > 0, got ",
              margin);
  if (dt == at::kHalf && need_grad) {
    // dL/dz of float16 z comes back in float32 (disseg_kernels.ops._autograd.saved_grad_dtype):
    // it is taken at a loss scale of 1, where float16 flushes entries of ~1e-5 to subnormals
    // or 0 before GradScaler's 2**16 can reach them. The float32 kernels read the same
    // values (every float16 is a float32) and accumulate as the half ones do; the copy is
    // 2 bytes per element of z.
    return dispersive_fused_cpu(z.to(at::kFloat), variant, tau, margin, include_diagonal, scale_by_dim, need_grad);
  }
  const auto loss_dtype = dt == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t N = z.size(0), D = z.size(1);
  if (N < 2 || D == 0) {
    // L = 0 with a zero gradient (a last batch of one sample).
    return {at::zeros({}, z.options().dtype(loss_dtype)), need_grad ? at::zeros_like(z) : at::empty({0}, z.options())};
  }
  std::tuple<double, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "dispersive_fused_cpu", [&] {
    out = dispatch<scalar_t>(z, variant, tau, margin, include_diagonal, scale_by_dim, need_grad);
  });
  // The loss is accumulated in double; a float32 result past FLT_MAX is ±inf (as the other
  // backends give), not scalar_tensor's "cannot be converted without overflow" error.
  const double loss = std::get<0>(out);
  const double stored = loss_dtype == at::kFloat ? static_cast<double>(clamp_to_float(loss)) : loss;
  return {at::scalar_tensor(stored, z.options().dtype(loss_dtype)), std::get<1>(out)};
}

TORCH_LIBRARY_FRAGMENT(disseg, m) {
  m.def(
      "dispersive_fused(Tensor z, int variant, float tau, float margin, bool include_diagonal, "
      "bool scale_by_dim, bool need_grad) -> (Tensor, Tensor)");
  m.def(
      "dispersive_row_stats(Tensor rows, Tensor cols, int variant, float tau, float margin, bool scale_by_dim, "
      "bool include_diagonal, int? self_offset, float grad_weight, bool need_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(disseg, CPU, m) {
  m.impl("dispersive_fused", &dispersive_fused_cpu);
  m.impl("dispersive_row_stats", &dispersive_row_stats_cpu);
}

}  // namespace disseg
