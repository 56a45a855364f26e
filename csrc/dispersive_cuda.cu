// Dispersive loss, CUDA kernels: torch.ops.disseg.dispersive_fused for CUDA tensors.
// See shared/spec/dispersive.md; the schema is defined in csrc/dispersive.cpp.
//
// The same algorithm as the Triton kernels (disseg_kernels/triton/dispersive.py), written
// for correctness first with SIMT arithmetic (float accumulation, double for double):
//
// * many samples (N > 64): dispersive_rows_kernel. A block owns 32 rows and a chunk of
//   output columns and loops over 32-column tiles: the distance tile (exact differences
//   sum_k (z_ik - z_jk)^2 for the L2 family, a dot product for cosine), an online per-row
//   max and sum of exp(-d/tau) (one warp per row, shuffles), and the unnormalised gradient
//   rows acc_i += sum_j w_ij z_j with flash-style rescaling. Nothing N x N is stored; the
//   ATen epilogue turns the per-row (m_i, s_i) into the logsumexp and scales the rows.
// * few samples, huge D (N <= 64): gram_partial_kernel splits the reduction over D and
//   accumulates the N x N Gram matrix in double; the small N x N math runs in double with
//   ATen; rowmix_kernel forms grad = C Z, split over D.
// * covariance: GEMM-bound, ATen matmuls (N x N Gram when N <= D, D x D when D < N).
//
// Only ATen core / per-operator headers, <torch/library.h>, <cuda_runtime.h> and c10/cuda
// headers are included (not <torch/extension.h>, nor ATen/cuda/CUDAContext.h, which needs
// cuBLAS headers): the file compiles against a CPU build of torch, in a fraction of the time
// (tests/test_cuda_compile.py). Offsets are int64.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/diag.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/full.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

namespace disseg {
namespace {

constexpr int kInfoL2 = 0;
constexpr int kInfoL2sq = 1;
constexpr int kInfoCosine = 2;
constexpr int kHinge = 3;
constexpr int kCovariance = 4;
constexpr int64_t kSmallNMax = 64;
// D at or below which few samples also go through the row kernel (exact differences, and
// the cosine projection term by term) rather than the Gram-matrix path.
constexpr int64_t kDirectMaxD = 8;

constexpr int kTile = 32;     // rows and columns of a distance tile (one warp wide)
constexpr int kChunkK = 32;   // features per staged chunk of the distance tile
constexpr int kThreads = 256; // 8 warps; thread (ty, tx) of a 16 x 16 grid owns a 2 x 2 sub-tile

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load_acc(const scalar_t* p) {
  return static_cast<acc_t>(static_cast<at::opmath_type<scalar_t>>(*p));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// ---------------------------------------------------------------------------------------
// Many samples: row blocks with an online logsumexp
// ---------------------------------------------------------------------------------------

// out[i, dc] = a_i z_i - sum_j w_ij z_j for the block's rows and output columns, where
// w_ij is the gradient weight of pair (i, j) relative to exp(m_i) (InfoNCE) or absolute
// (hinge); m_out/s_out get the per-row max of -d/tau and sum of exp(-d/tau - m_i) (hinge:
// 0 and the row's sum of max(0, margin - d)^2).
template <typename scalar_t, typename acc_t, int VARIANT, int DC>
__global__ void __launch_bounds__(kThreads) dispersive_rows_kernel(
    const scalar_t* __restrict__ z, const acc_t* __restrict__ nrm, const acc_t* __restrict__ has_norm,
    acc_t* __restrict__ out, acc_t* __restrict__ m_out, acc_t* __restrict__ s_out, int64_t n, int64_t d,
    bool include_diagonal, bool need_grad, acc_t scale, acc_t inv_tau, acc_t margin) {
  __shared__ acc_t a_s[kChunkK][kTile + 1];  // a_s[k][i] = z[row0 + i, k0 + k]
  __shared__ acc_t b_s[kChunkK][kTile + 1];  // b_s[k][j] = z[col0 + j, k0 + k]
  __shared__ acc_t w_s[kTile][kTile + 1];    // exponent, then gradient weight
  __shared__ acc_t x_s[kTile][kTile + 1];    // 1/dist (l2), keep flag (l2sq), ghat (cosine), h^2 (hinge)
  __shared__ acc_t zj_s[kTile][DC];          // z[col0 + j, dc0 + c] (cosine: zhat)
  __shared__ acc_t row_s[kTile];             // per-row rescale factor, then a_i

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int lane = tid % 32, warp = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t dc0 = static_cast<int64_t>(blockIdx.y) * DC;
  constexpr int kPerThreadCols = DC / 16;

  acc_t m_run[4], s_run[4], r_run[4];  // rows warp * 4 + q, replicated over the warp's lanes
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    m_run[q] = neg_inf<acc_t>();
    s_run[q] = 0;
    r_run[q] = 0;
  }
  acc_t acc[2][kPerThreadCols];
  acc_t zhat_i[2][kPerThreadCols];  // cosine: the block's own rows, projected out term by term
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int64_t r = row0 + ty + 16 * a;
#pragma unroll
    for (int c = 0; c < kPerThreadCols; ++c) {
      acc[a][c] = 0;
      zhat_i[a][c] = 0;
      const int64_t dc = dc0 + tx + 16 * c;
      if (VARIANT == kInfoCosine && need_grad && r < n && dc < d && has_norm[r] > acc_t(0))
        zhat_i[a][c] = load_acc<acc_t>(z + r * d + dc) / nrm[r];
    }
  }

  for (int64_t col0 = 0; col0 < n; col0 += kTile) {
    // 1. The distance tile over all features.
    acc_t t[2][2] = {{0, 0}, {0, 0}};  // sum (a - b)^2, or sum a b for cosine
    for (int64_t k0 = 0; k0 < d; k0 += kChunkK) {
      for (int e = tid; e < kTile * kChunkK; e += kThreads) {
        const int i = e / kChunkK, k = e % kChunkK;
        const int64_t kk = k0 + k, r = row0 + i, c = col0 + i;
        acc_t av = (r < n && kk < d) ? load_acc<acc_t>(z + r * d + kk) : acc_t(0);
        acc_t bv = (c < n && kk < d) ? load_acc<acc_t>(z + c * d + kk) : acc_t(0);
        if (VARIANT == kInfoCosine) {  // zhat by division, as the reference computes it
          av = r < n ? av / nrm[r] : acc_t(0);
          bv = c < n ? bv / nrm[c] : acc_t(0);
        }
        a_s[k][i] = av;
        b_s[k][i] = bv;
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < kChunkK; ++k) {
        const acc_t a0 = a_s[k][ty], a1 = a_s[k][ty + 16];
        const acc_t b0 = b_s[k][tx], b1 = b_s[k][tx + 16];
        if (VARIANT == kInfoCosine) {
          t[0][0] += a0 * b0;
          t[0][1] += a0 * b1;
          t[1][0] += a1 * b0;
          t[1][1] += a1 * b1;
        } else {
          const acc_t e00 = a0 - b0, e01 = a0 - b1, e10 = a1 - b0, e11 = a1 - b1;
          t[0][0] += e00 * e00;
          t[0][1] += e01 * e01;
          t[1][0] += e10 * e10;
          t[1][1] += e11 * e11;
        }
      }
      __syncthreads();
    }

    // 2. Elementwise: exponent (or hinge weight) and the auxiliary value of each pair.
#pragma unroll
    for (int a = 0; a < 2; ++a) {
#pragma unroll
      for (int b = 0; b < 2; ++b) {
        const int i = ty + 16 * a, j = tx + 16 * b;
        const int64_t r = row0 + i, c = col0 + j;
        const bool valid = r < n && c < n && (include_diagonal || r != c);
        acc_t dist_term, aux;
        acc_t rs = 0;
        if (VARIANT == kInfoCosine) {
          const acc_t ghat = valid ? t[a][b] : acc_t(0);
          dist_term = scale * (acc_t(1) - ghat);
          aux = ghat;
        } else {
          const acc_t d2 = t[a][b];  // exact differences: 0 exactly for equal rows
          const bool dup = !(d2 > acc_t(0));
          const acc_t dist = sqrt(d2);
          rs = dup ? acc_t(0) : acc_t(1) / dist;
          dist_term = scale * (VARIANT == kInfoL2sq ? d2 : dist);
          aux = VARIANT == kInfoL2 ? rs : (dup ? acc_t(0) : acc_t(1));
        }
        if (VARIANT == kHinge) {
          const acc_t h = valid ? max(margin - dist_term, acc_t(0)) : acc_t(0);
          w_s[i][j] = acc_t(-2) * scale * h * rs;
          x_s[i][j] = h * h;
        } else {
          w_s[i][j] = valid ? -dist_term * inv_tau : neg_inf<acc_t>();
          x_s[i][j] = aux;
        }
      }
    }
    __syncthreads();

    // 3. Row statistics, one warp per row, lane = column: online max and sum, weights.
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = warp * 4 + q;
      const acc_t e = w_s[i][lane], x = x_s[i][lane];
      acc_t w, alpha;
      if (VARIANT == kHinge) {
        w = e;
        alpha = 1;
        s_run[q] += warp_sum(x);
        r_run[q] += warp_sum(w);
      } else {
        const acc_t m_new = max(m_run[q], warp_max(e));
        const acc_t m_use = m_new == neg_inf<acc_t>() ? acc_t(0) : m_new;
        alpha = exp(m_run[q] - m_use);
        const acc_t p = exp(e - m_use);
        s_run[q] = s_run[q] * alpha + warp_sum(p);
        m_run[q] = m_new;
        if (VARIANT == kInfoCosine) {
          w = p;  // the projection uses ghat = x_s per pair in step 4
        } else {
          w = p * x;
          r_run[q] = r_run[q] * alpha + warp_sum(w);
        }
      }
      w_s[i][lane] = w;
      if (lane == 0) row_s[i] = alpha;
    }
    __syncthreads();

    // 4. acc = acc * alpha + W Z_J over the block's output columns.
    if (need_grad) {
      for (int e = tid; e < kTile * DC; e += kThreads) {
        const int j = e / DC, c = e % DC;
        const int64_t cj = col0 + j, dc = dc0 + c;
        acc_t v = (cj < n && dc < d) ? load_acc<acc_t>(z + cj * d + dc) : acc_t(0);
        if (VARIANT == kInfoCosine && cj < n) v /= nrm[cj];
        zj_s[j][c] = v;
      }
      __syncthreads();
#pragma unroll
      for (int a = 0; a < 2; ++a) {
        const acc_t alpha = row_s[ty + 16 * a];
#pragma unroll
        for (int c = 0; c < kPerThreadCols; ++c) acc[a][c] *= alpha;
      }
#pragma unroll 4
      for (int j = 0; j < kTile; ++j) {
        const acc_t w0 = w_s[ty][j], w1 = w_s[ty + 16][j];
        if (VARIANT == kInfoCosine) {
          // sum_j p_ij (zhat_j - ghat_ij zhat_i): exactly 0 at D = 1, as in the reference
          const acc_t g0 = x_s[ty][j], g1 = x_s[ty + 16][j];
#pragma unroll
          for (int c = 0; c < kPerThreadCols; ++c) {
            const acc_t zv = zj_s[j][tx + 16 * c];
            acc[0][c] += w0 * (zv - g0 * zhat_i[0][c]);
            acc[1][c] += w1 * (zv - g1 * zhat_i[1][c]);
          }
        } else {
#pragma unroll
          for (int c = 0; c < kPerThreadCols; ++c) {
            const acc_t zv = zj_s[j][tx + 16 * c];
            acc[0][c] += w0 * zv;
            acc[1][c] += w1 * zv;
          }
        }
      }
    }
    __syncthreads();
  }

  // Per-row outputs: statistics once (first column chunk), then a_i z_i - acc_i.
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int i = warp * 4 + q;
    const int64_t r = row0 + i;
    if (lane == 0) {
      if (blockIdx.y == 0 && r < n) {
        m_out[r] = VARIANT == kHinge ? acc_t(0) : m_run[q];
        s_out[r] = s_run[q];
      }
      row_s[i] = VARIANT == kInfoCosine ? acc_t(0) : r_run[q];  // cosine: out = -acc = sum_j p_ij (ghat_ij zhat_i - zhat_j)
    }
  }
  __syncthreads();
  if (!need_grad) return;
#pragma unroll
  for (int a = 0; a < 2; ++a) {
    const int i = ty + 16 * a;
    const int64_t r = row0 + i;
    if (r >= n) continue;
    const acc_t a_i = row_s[i];
#pragma unroll
    for (int c = 0; c < kPerThreadCols; ++c) {
      const int64_t dc = dc0 + tx + 16 * c;
      if (dc < d) out[r * d + dc] = a_i * load_acc<acc_t>(z + r * d + dc) - acc[a][c];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Few samples, huge D: double Gram split over D, grad = C Z split over D
// ---------------------------------------------------------------------------------------

constexpr int kGramK = 32;
constexpr int kGramPerThread = (kSmallNMax * kSmallNMax + kThreads - 1) / kThreads;

// part[chunk, i, j] = sum over the chunk's features of z_ik z_jk, in double.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gram_partial_kernel(
    const scalar_t* __restrict__ z, double* __restrict__ part, int64_t n, int64_t d, int64_t chunk) {
  __shared__ double z_s[kSmallNMax][kGramK + 1];
  const int tid = threadIdx.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t stop = min(start + chunk, d);
  const int64_t nn = n * n;
  double g[kGramPerThread];
#pragma unroll
  for (int q = 0; q < kGramPerThread; ++q) g[q] = 0.0;
  for (int64_t k0 = start; k0 < stop; k0 += kGramK) {
    for (int e = tid; e < n * kGramK; e += kThreads) {
      const int i = e / kGramK, k = e % kGramK;
      const int64_t kk = k0 + k;
      z_s[i][k] = kk < stop ? load_acc<double>(z + i * d + kk) : 0.0;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kGramPerThread; ++q) {
      const int64_t p = tid + static_cast<int64_t>(q) * kThreads;
      if (p < nn) {
        const int i = static_cast<int>(p / n), j = static_cast<int>(p % n);
        double s = 0.0;
#pragma unroll 8
        for (int k = 0; k < kGramK; ++k) s += z_s[i][k] * z_s[j][k];
        g[q] += s;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < kGramPerThread; ++q) {
    const int64_t p = tid + static_cast<int64_t>(q) * kThreads;
    if (p < nn) part[static_cast<int64_t>(blockIdx.x) * nn + p] = g[q];
  }
}

// grad[:, c] = C @ z[:, c] for the block's columns, C (n x n, double) staged in shared memory.
// out_t: float for float16 z (saved_grad_type), scalar_t otherwise.
template <typename scalar_t, typename out_t>
__global__ void __launch_bounds__(kThreads) rowmix_kernel(
    const double* __restrict__ coef, const scalar_t* __restrict__ z, out_t* __restrict__ grad, int64_t n,
    int64_t d) {
  __shared__ double c_s[kSmallNMax * kSmallNMax];
  for (int e = threadIdx.x; e < n * n; e += kThreads) c_s[e] = coef[e];
  __syncthreads();
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= d) return;
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t j = 0; j < n; ++j) s += c_s[i * n + j] * load_acc<double>(z + j * d + col);
    grad[i * d + col] = static_cast<out_t>(static_cast<float>(s));
  }
}

template <>
__global__ void __launch_bounds__(kThreads) rowmix_kernel<double, double>(
    const double* __restrict__ coef, const double* __restrict__ z, double* __restrict__ grad, int64_t n,
    int64_t d) {
  __shared__ double c_s[kSmallNMax * kSmallNMax];
  for (int e = threadIdx.x; e < n * n; e += kThreads) c_s[e] = coef[e];
  __syncthreads();
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= d) return;
  for (int64_t i = 0; i < n; ++i) {
    double s = 0.0;
    for (int64_t j = 0; j < n; ++j) s += c_s[i * n + j] * z[j * d + col];
    grad[i * d + col] = s;
  }
}

// ---------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------

int64_t pair_count(int64_t n, bool include_diagonal) { return include_diagonal ? n * n : n * (n - 1); }

// The dtype of dL/dz: float32 for float16 z, whose loss-scale-1 gradient would flush to
// subnormals or 0 before GradScaler's scale reaches it (disseg_kernels.ops._autograd.saved_grad_dtype).
at::ScalarType saved_grad_type(at::ScalarType t) { return t == at::kHalf ? at::kFloat : t; }

// (loss, C) in double from the exact N x N Gram matrix, grad = C Z. Mirrors the Triton
// path's _small_coefficients. With ``gram_is_d2`` (the L2 family of float64 z) the matrix
// holds squared distances from exact differences, and a duplicate is d^2 <= 0.
std::tuple<at::Tensor, at::Tensor> small_coefficients(
    const at::Tensor& gram, int64_t variant, double tau, double margin, bool include_diagonal, double scale,
    bool gram_is_d2) {
  const int64_t n = gram.size(0);
  const auto eye = at::eye(n, gram.options().dtype(at::kBool));
  const auto pair = include_diagonal ? at::ones_like(eye) : eye.logical_not();
  const double pairs = static_cast<double>(pair_count(n, include_diagonal));
  const auto sq = gram.diagonal();
  auto laplacian = [](const at::Tensor& w) { return at::diag(w.sum(1)) - w; };

  at::Tensor d, dup, inv_dist, rinv, ghat, norm;
  if (variant == kInfoCosine) {
    norm = sq.clamp_min(0).sqrt();
    rinv = norm.clamp_min(1e-12).reciprocal();
    ghat = gram * rinv.unsqueeze(1) * rinv.unsqueeze(0);
    d = scale * (1.0 - ghat);
  } else {
    at::Tensor d2;
    if (gram_is_d2) {
      d2 = gram.clamp_min(0);
      dup = (d2 <= 0.0).logical_or(eye);
    } else {
      // double sums of products of float32 or half values: noise of ~1e-16 (n_i + n_j) hides
      // any pair this close anyway
      const auto nsum = sq.unsqueeze(1) + sq.unsqueeze(0);
      d2 = (nsum - 2.0 * gram).clamp_min(0);
      dup = (d2 <= 1e-12 * nsum).logical_or(eye);
    }
    d2 = d2.masked_fill(dup, 0.0);
    const auto dist = d2.sqrt();
    d = scale * (variant == kInfoL2sq ? d2 : dist);
    inv_dist = at::where(dup, at::zeros_like(dist), dist.masked_fill(dup, 1.0).reciprocal());
  }
  if (variant == kHinge) {
    const auto h = at::relu(margin - d) * pair;
    const auto loss = h.square().sum() / pairs;
    return {loss, (2.0 / pairs) * laplacian(-2.0 * scale * h * inv_dist)};
  }
  const auto e = (-d / tau).masked_fill(pair.logical_not(), -INFINITY);
  const auto lse = at::logsumexp(e.reshape({-1}), 0);
  const auto loss = lse - std::log(pairs);
  const auto p = (e - lse).exp();
  if (variant == kInfoL2sq) return {loss, (-4.0 * scale / tau) * laplacian(p.masked_fill(dup, 0.0))};
  if (variant == kInfoL2) return {loss, (-2.0 / tau) * laplacian(p * scale * inv_dist)};
  const double k = 2.0 * scale / tau;
  const auto a = k * p * rinv.unsqueeze(0);
  const auto q = k * (p * ghat).sum(1);
  const auto proj = at::where(norm > 1e-12, rinv, at::zeros_like(rinv));
  return {loss, rinv.unsqueeze(1) * a - at::diag(q * rinv * proj)};
}

std::tuple<at::Tensor, at::Tensor> small_path(
    const at::Tensor& z, int64_t variant, double tau, double margin, bool include_diagonal, double scale,
    bool need_grad) {
  const int64_t n = z.size(0), d = z.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  // float64: the L2 family's d^2 from exact differences. n_i + n_j - 2 G_ij keeps no digit of
  // rows 1e-9 apart, and a 1e-12 (n_i + n_j) duplicate threshold dropped the gradient of
  // rows within ~1e-6 of a norm (the C++ kernels' kExactD2 rule, Triton's _small_path).
  const bool exact = z.scalar_type() == at::kDouble && variant != kInfoCosine;
  at::Tensor gram;
  if (exact) {
    gram = at::cdist(z, z, 2.0, /*compute_mode: donot_use_mm_for_euclid_dist*/ 2).square();
  } else {
    // Enough chunks to fill the device several times over, each a multiple of kGramK.
    int64_t chunk = ((d + 1023) / 1024 + kGramK - 1) / kGramK * kGramK;
    chunk = std::max<int64_t>(chunk, kGramK);
    const int64_t n_chunks = (d + chunk - 1) / chunk;
    auto part = at::empty({n_chunks, n, n}, z.options().dtype(at::kDouble));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, z.scalar_type(), "dispersive_gram", [&] {
      gram_partial_kernel<scalar_t><<<static_cast<unsigned>(n_chunks), kThreads, 0, stream>>>(
          z.data_ptr<scalar_t>(), part.data_ptr<double>(), n, d, chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    gram = part.sum(0);
  }
  auto [loss, coef] = small_coefficients(gram, variant, tau, margin, include_diagonal, scale, exact);
  at::Tensor grad;
  if (need_grad) {
    coef = coef.contiguous();
    grad = at::empty_like(z, z.options().dtype(saved_grad_type(z.scalar_type())));
    const auto blocks = static_cast<unsigned>((d + kThreads - 1) / kThreads);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, z.scalar_type(), "dispersive_rowmix", [&] {
      using out_t = std::conditional_t<std::is_same<scalar_t, at::Half>::value, float, scalar_t>;
      rowmix_kernel<scalar_t, out_t><<<blocks, kThreads, 0, stream>>>(
          coef.data_ptr<double>(), z.data_ptr<scalar_t>(), grad.data_ptr<out_t>(), n, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {loss, grad};
}

template <typename scalar_t, typename acc_t, int VARIANT>
void launch_rows(const at::Tensor& z, const at::Tensor& nrm, const at::Tensor& has_norm, at::Tensor& out,
                 at::Tensor& m_out, at::Tensor& s_out, bool include_diagonal, bool need_grad, double scale,
                 double tau, double margin) {
  constexpr int DC = std::is_same<acc_t, double>::value ? 32 : 128;
  const int64_t n = z.size(0), d = z.size(1);
  const int64_t d_chunks = need_grad ? (d + DC - 1) / DC : 1;
  TORCH_CHECK(d_chunks <= 65535, "dispersive_fused (CUDA): D = ", d, " is too wide for the row kernel grid");
  const dim3 grid(static_cast<unsigned>((n + kTile - 1) / kTile), static_cast<unsigned>(d_chunks));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispersive_rows_kernel<scalar_t, acc_t, VARIANT, DC><<<grid, kThreads, 0, stream>>>(
      z.data_ptr<scalar_t>(), nrm.data_ptr<acc_t>(), has_norm.data_ptr<acc_t>(), out.data_ptr<acc_t>(),
      m_out.data_ptr<acc_t>(), s_out.data_ptr<acc_t>(), n, d, include_diagonal, need_grad,
      static_cast<acc_t>(scale), static_cast<acc_t>(1.0 / tau), static_cast<acc_t>(margin));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> rows_path(
    const at::Tensor& z, int64_t variant, double tau, double margin, bool include_diagonal, double scale,
    bool need_grad) {
  const int64_t n = z.size(0), d = z.size(1);
  const auto acc_type = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = z.options().dtype(acc_type);
  at::Tensor nrm, has_norm, rinv;
  if (variant == kInfoCosine) {
    const auto norm = at::linalg_vector_norm(z, 2, {1}, false, acc_type);
    nrm = norm.clamp_min(1e-12);
    rinv = nrm.reciprocal();
    has_norm = (norm > 1e-12).to(acc_type);
  } else {
    nrm = has_norm = at::empty({1}, opts);  // unused
  }
  auto m_out = at::empty({n}, opts);
  auto s_out = at::empty({n}, opts);
  auto out = need_grad ? at::empty({n, d}, opts) : at::empty({1}, opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, z.scalar_type(), "dispersive_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    switch (variant) {
      case kInfoL2:
        launch_rows<scalar_t, acc_t, kInfoL2>(z, nrm, has_norm, out, m_out, s_out, include_diagonal, need_grad, scale, tau, margin);
        break;
      case kInfoL2sq:
        launch_rows<scalar_t, acc_t, kInfoL2sq>(z, nrm, has_norm, out, m_out, s_out, include_diagonal, need_grad, scale, tau, margin);
        break;
      case kInfoCosine:
        launch_rows<scalar_t, acc_t, kInfoCosine>(z, nrm, has_norm, out, m_out, s_out, include_diagonal, need_grad, scale, tau, margin);
        break;
      default:
        launch_rows<scalar_t, acc_t, kHinge>(z, nrm, has_norm, out, m_out, s_out, include_diagonal, need_grad, scale, tau, margin);
    }
  });

  const double pairs = static_cast<double>(pair_count(n, include_diagonal));
  at::Tensor loss, coef;
  if (variant == kHinge) {
    loss = s_out.to(at::kDouble).sum() / pairs;
    coef = at::full({n}, 2.0 / pairs, opts);
  } else {
    const auto m64 = m_out.to(at::kDouble);
    const auto lse = at::logsumexp(m64 + s_out.to(at::kDouble).log(), 0);
    loss = lse - std::log(pairs);
    const double k = (variant == kInfoL2sq ? 4.0 : 2.0) * scale / tau;
    coef = (-k * (m64 - lse).exp()).to(acc_type);
    if (variant == kInfoCosine) coef = coef * rinv;
  }
  at::Tensor grad;
  if (need_grad) grad = out.mul_(coef.unsqueeze(1)).to(saved_grad_type(z.scalar_type()));
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> covariance(const at::Tensor& z, bool need_grad) {
  const int64_t n = z.size(0), d = z.size(1);
  // Few samples: memory-bound, so double costs nothing and keeps the cancelling terms exact.
  const bool wide = z.scalar_type() == at::kDouble || n <= kSmallNMax;
  auto zc = z.to(wide ? at::kDouble : at::kFloat);
  zc = zc - zc.mean(0, true);
  const auto col = zc.square().sum(0);
  const double denom = static_cast<double>(n - 1) * static_cast<double>(n - 1);
  at::Tensor frob, zzz;
  if (n <= d) {
    const auto gram = at::mm(zc, zc.t());  // N x N, never D x D at huge D
    frob = gram.square().sum();
    if (need_grad) zzz = at::mm(gram, zc);
  } else {
    const auto cov = at::mm(zc.t(), zc);  // D x D, smaller than N x N here
    frob = cov.square().sum();
    if (need_grad) zzz = at::mm(zc, cov);
  }
  const auto loss = (frob - col.square().sum()) / denom;
  at::Tensor grad;
  if (need_grad) grad = ((4.0 / denom) * (zzz - zc * col.unsqueeze(0))).to(saved_grad_type(z.scalar_type()));
  return {loss, grad};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dispersive_fused_cuda(
    const at::Tensor& z, int64_t variant, double tau, double margin, bool include_diagonal, bool scale_by_dim,
    bool need_grad) {
  TORCH_CHECK(z.is_cuda(), "dispersive_fused (CUDA): z must be a CUDA tensor, got device ", z.device());
  TORCH_CHECK(z.dim() == 2, "dispersive_fused: z must be 2-D (N, D), got shape ", z.sizes());
  TORCH_CHECK(z.is_contiguous(), "dispersive_fused: z must be contiguous, got strides ", z.strides());
  const auto dtype = z.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "dispersive_fused: z must be float32, float64, float16 or bfloat16, got dtype ", dtype);
  const int64_t n = z.size(0), d = z.size(1);
  TORCH_CHECK(n >= 2 && d >= 1, "dispersive_fused: z must have N >= 2 rows and D >= 1 columns, got shape ", z.sizes());
  TORCH_CHECK(variant >= 0 && variant <= 4, "dispersive_fused: variant must be 0..4, got ", variant);
  TORCH_CHECK(tau > 0, "dispersive_fused: tau must be > 0, got ", tau);
  TORCH_CHECK(margin > 0, "dispersive_fused: margin must be > 0, got ", margin);
  c10::cuda::CUDAGuard guard(z.device());

  const double scale = scale_by_dim ? 1.0 / static_cast<double>(d) : 1.0;
  at::Tensor loss, grad;
  if (variant == kCovariance) {
    std::tie(loss, grad) = covariance(z, need_grad);
  } else if (n <= kSmallNMax && d > kDirectMaxD) {
    std::tie(loss, grad) = small_path(z, variant, tau, margin, include_diagonal, scale, need_grad);
  } else {
    std::tie(loss, grad) = rows_path(z, variant, tau, margin, include_diagonal, scale, need_grad);
  }
  const auto loss_type = (dtype == at::kHalf || dtype == at::kBFloat16) ? at::kFloat : dtype;
  loss = loss.to(loss_type);
  if (!need_grad) grad = at::empty({0}, z.options());
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(disseg, CUDA, m) { m.impl("dispersive_fused", &dispersive_fused_cuda); }

}  // namespace disseg
