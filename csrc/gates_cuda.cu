// Attention gates, CUDA kernels: torch.ops.disseg.gates_* for CUDA tensors. The schemas
// are defined in csrc/gates.cpp and the semantics are those of its CPU kernels (see there
// and disseg_kernels/ops/gates.py, the engine that calls them): statistics of
// y = x · G[b, c] · S[b, p] in the accumulation type (float for float/half/bfloat16, double
// for double), first arg-max indices as int64, a gate that is absent is 1.
//
// x (B, C, H, W) is NCHW-like (p = h·W + w has stride 1) or channels_last (c has stride 1),
// and is read in place as a plane (B, Lo, Li) whose inner axis i is the unit-stride one:
// (j, i) = (c, p) for NCHW, (p, c) for channels_last. A reduction then runs either along i
// (inner_stats_kernel: one warp per (b, j) row, lanes on consecutive i: coalesced) or
// along j (outer_stats_kernel, reduce_kernel: 32 consecutive i per warp, the block's 8
// warps striding over j, shared memory to merge them). The same two kernels serve the H·W
// pool and the C pool, in either layout.
//
// Grids (docs/gates_gpu.md): a reduction whose outputs give fewer than ~4 blocks per SM is
// split along the reduced axis (the split count comes from the shape and the SM count,
// never from data); each piece writes (sum, max, first arg-max) partials and a second
// launch combines them in piece order: deterministic, no atomics, the first arg-max kept
// on ties. The backward reduce writes per-block partials of U and V the same way.
//
// Only ATen core / per-operator headers, <torch/library.h>, <cuda_runtime.h> and c10/cuda
// headers are included, as in csrc/dispersive_cuda.cu (tests/test_cuda_compile.py compiles
// this file against a CPU build of torch). Offsets and indices are int64.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

#include "gates_small.h"
#include "gates_terms.h"

#ifndef DISSEG_CHECK_ALIGNED  // tests/cuda_emulation/simt.h checks it
#define DISSEG_CHECK_ALIGNED(p, bytes) ((void)0)
#endif

namespace disseg {
namespace {

constexpr int kWarp = 32;
constexpr int kRows = 8;  // warps per block; blocks are (32, 8) = 256 threads everywhere
constexpr int kThreads = kWarp * kRows;
constexpr int kUnroll = 4;  // loads in flight per thread in the reduction loops
constexpr int kVec = 4;     // elements per pack (one 16-byte float32 access) where the plane allows it
constexpr unsigned kFull = 0xffffffffu;
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();  // arg-max: no element taken yet
constexpr int64_t kBlocksPerSM = 4;                              // split target (as the Triton path)
constexpr int64_t kMaxGrid = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxGridY = 65535;
constexpr size_t kMaxSmem = 48 * 1024;  // dynamic shared memory without an opt-in

struct Geometry {
  int64_t B, C, P, sB, sC, sP;
  bool p_unit;  // NCHW-like: p has stride 1 (else the channel has stride 1)
};

// x as (B, Lo, Li): element (b, j, i) at b·sB + j·sO + i, the inner axis of stride 1.
struct Plane {
  int64_t B, Lo, Li, sB, sO;
};

Geometry geometry(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, ": x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.is_cuda(), name, ": x must be a CUDA tensor, got ", x.device());
  Geometry g{x.size(0), x.size(1), x.size(2) * x.size(3), x.stride(0), x.stride(1), x.stride(3), true};
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == x.size(3) * x.stride(3), name,
              ": x's H and W must be mergeable (contiguous or channels_last), got strides ", x.strides());
  if (g.P == 1 || g.sP == 1) {
    g.p_unit = true;
    if (g.P == 1) g.sP = 1;
  } else if (g.C == 1 || g.sC == 1) {
    g.p_unit = false;
    if (g.C == 1) g.sC = 1;
  } else {
    TORCH_CHECK(false, name, ": x must be contiguous or channels_last, got strides ", x.strides());
  }
  return g;
}

Plane plane(const Geometry& g) {
  return g.p_unit ? Plane{g.B, g.C, g.P, g.sB, g.sC} : Plane{g.B, g.P, g.C, g.sB, g.sP};
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// A small gate tensor: nullopt, or B·n elements of the accumulation type on x's device.
template <typename acc_t>
const acc_t* gate_ptr(const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t B, int64_t n,
                      at::ScalarType acc, const char* what, at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == x.device(), what, " must be on x's device ", x.device(), ", got ", t->device());
  TORCH_CHECK(t->numel() == B * n, what, " must have ", B * n, " elements (B·", n, "), got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == acc, what, " must be ", acc, ", got ", t->scalar_type());
  keep = t->contiguous();
  return keep.const_data_ptr<acc_t>();
}

int64_t sm_count(const at::Tensor& x) {
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, x.get_device()));
  return std::max(1, n);
}

// Pieces to cut a reduction of `len` elements into, so that `items` work units per piece
// reach `target` in all, each piece keeping at least `min_len` elements.
int64_t split_count(int64_t items, int64_t len, int64_t min_len, int64_t target) {
  if (items >= target || len < 2 * min_len) return 1;
  const int64_t want = (target + items - 1) / items;
  return std::max<int64_t>(1, std::min({want, len / min_len, kMaxGridY}));
}

bool aligned_to(const void* p, size_t bytes) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0; }

unsigned grid_1d(int64_t blocks, const char* name) {
  TORCH_CHECK(blocks <= kMaxGrid, name, ": ", blocks, " thread blocks exceed the grid limit");
  return static_cast<unsigned>(std::max<int64_t>(1, blocks));
}

__device__ __forceinline__ int flat_tid() { return threadIdx.y * kWarp + threadIdx.x; }

// N consecutive elements loaded or stored as one access (16 bytes for float, N = 4).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  DISSEG_CHECK_ALIGNED(p, sizeof(T) * N);
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  DISSEG_CHECK_ALIGNED(p, sizeof(T) * N);
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// (sum, max, first arg-max) running statistics, in the CPU's order: a NaN is above every
// number (as PyTorch's max pools have it) and the first NaN (smallest index) stays; otherwise the
// greater value, then the smaller index. An all −inf row keeps its first index.
template <typename T>
__device__ __forceinline__ bool ahead(T v, int64_t i, T best, int64_t arg) {
  const bool v_nan = v != v, b_nan = best != best;
  if (v_nan || b_nan) return v_nan && (!b_nan || i < arg);
  return v > best || (v == best && i < arg);
}

template <typename T>
__device__ __forceinline__ void take(T& sum, T& best, int64_t& arg, T v, int64_t i) {
  sum += v;
  if (ahead(v, i, best, arg)) {
    best = v;
    arg = i;
  }
}

template <typename T>
__device__ __forceinline__ void merge(T& sum, T& best, int64_t& arg, T s2, T b2, int64_t a2) {
  sum += s2;
  if (ahead(b2, a2, best, arg)) {
    best = b2;
    arg = a2;
  }
}

// Butterfly merge: every lane ends with the warp's statistics (the same bits in every lane).
template <typename T>
__device__ __forceinline__ void warp_merge(T& sum, T& best, int64_t& arg) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T s2 = __shfl_xor_sync(kFull, sum, o);
    const T b2 = __shfl_xor_sync(kFull, best, o);
    const int64_t a2 = static_cast<int64_t>(__shfl_xor_sync(kFull, static_cast<long long>(arg), o));
    merge(sum, best, arg, s2, b2, a2);
  }
}

template <typename T>
struct StatOut {
  T* mean;
  T* max;
  int64_t* idx;
  T* part_sum;  // (rows, splits) partials when splits > 1
  T* part_max;
  int64_t* part_idx;
  int64_t splits;
  T inv;  // 1 / (length of the reduced axis)
};

template <typename T>
__device__ __forceinline__ void store_stat(const StatOut<T>& o, int64_t r, int64_t k, T sum, T best, int64_t arg) {
  if (o.splits == 1) {
    o.mean[r] = sum * o.inv;
    o.max[r] = best;
    o.idx[r] = arg == kNone ? 0 : arg;
  } else {
    const int64_t q = r * o.splits + k;
    o.part_sum[q] = sum;
    o.part_max[q] = best;
    o.part_idx[q] = arg;
  }
}

// The (sum, max, arg-max) partials of `rows` rows split in `splits` pieces (none when 1).
struct StatParts {
  at::Tensor sum, max, idx;
};

StatParts stat_parts(int64_t rows, int64_t splits, const at::Tensor& x, at::ScalarType acc) {
  if (splits <= 1 || rows == 0) return {};
  return {at::empty({rows * splits}, x.options().dtype(acc)), at::empty({rows * splits}, x.options().dtype(acc)),
          at::empty({rows * splits}, x.options().dtype(at::kLong))};
}

// The kernels' view of a pool's outputs (mean over `len` elements) and its partials.
template <typename acc_t>
StatOut<acc_t> stat_out(at::Tensor& mean, at::Tensor& mx, at::Tensor& idx, StatParts& parts, int64_t splits,
                        int64_t len) {
  const bool split = parts.sum.defined();
  return StatOut<acc_t>{mean.data_ptr<acc_t>(),
                        mx.data_ptr<acc_t>(),
                        idx.data_ptr<int64_t>(),
                        split ? parts.sum.data_ptr<acc_t>() : nullptr,
                        split ? parts.max.data_ptr<acc_t>() : nullptr,
                        split ? parts.idx.data_ptr<int64_t>() : nullptr,
                        splits,
                        acc_t(1) / acc_t(len)};
}

// Statistics along the inner axis: warp (blockIdx.x·8 + threadIdx.y) owns row r = (b, j)
// and piece k of [0, Li); y = x[b, j, i] · gate[b, i]. Output row r = b·Lo + j. A lane
// reads packs of VEC consecutive i (VEC > 1: Li, the strides and the pointers are multiples
// of VEC; the pieces are cut at pack boundaries), kUnroll packs in flight.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) inner_stats_kernel(const scalar_t* __restrict__ x,
                                                               const acc_t* __restrict__ gate, Plane pl,
                                                               StatOut<acc_t> out) {
  const int lane = threadIdx.x;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y;
  if (w >= pl.B * pl.Lo * out.splits) return;  // a whole warp leaves together
  const int64_t r = w / out.splits, k = w - r * out.splits;
  const int64_t b = r / pl.Lo, j = r - b * pl.Lo;
  const int64_t packs = pl.Li / VEC;
  const int64_t lo = packs * k / out.splits * VEC, hi = packs * (k + 1) / out.splits * VEC;
  const scalar_t* xr = x + b * pl.sB + j * pl.sO;
  const acc_t* gr = gate ? gate + b * pl.Li : nullptr;
  acc_t sum = 0, best = neg_inf<acc_t>();
  int64_t arg = kNone;
  for (int64_t i0 = lo + lane * VEC; i0 < hi; i0 += kWarp * VEC * kUnroll) {
    Pack<scalar_t, VEC> v[kUnroll];
    Pack<acc_t, VEC> gv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * kWarp * VEC;
      if (i < hi) {
        v[u] = load_pack<VEC>(xr + i);
        if (gr) gv[u] = load_pack<VEC>(gr + i);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + u * kWarp * VEC;
      if (i >= hi) continue;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {  // increasing i: the lane's first arg-max
        take(sum, best, arg, static_cast<acc_t>(v[u].v[e]) * (gr ? gv[u].v[e] : acc_t(1)), i + e);
      }
    }
  }
  warp_merge(sum, best, arg);
  if (lane == 0) store_stat(out, r, k, sum, best, arg);
}

// Statistics along the outer axis: block (b, tile of 32·VEC consecutive i, piece k of
// [0, Lo)); lane tx owns the VEC consecutive i from tile·32·VEC + tx·VEC (one pack; VEC > 1:
// Li, the strides and x's pointer are multiples of VEC), warp ty the j ≡ ty (mod 8) of the
// piece; y = x[b, j, i] · gate[b, j]. Output row r = b·Li + i.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads) outer_stats_kernel(const scalar_t* __restrict__ x,
                                                               const acc_t* __restrict__ gate, Plane pl,
                                                               StatOut<acc_t> out) {
  __shared__ acc_t s_sum[kRows][kWarp * VEC];
  __shared__ acc_t s_max[kRows][kWarp * VEC];
  __shared__ int64_t s_arg[kRows][kWarp * VEC];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t tiles = (pl.Li + kWarp * VEC - 1) / (kWarp * VEC);
  const int64_t bid = blockIdx.x;
  const int64_t k = bid % out.splits, q = bid / out.splits;
  const int64_t tile = q % tiles, b = q / tiles;
  const int64_t i = (tile * kWarp + tx) * VEC;  // this lane's first i
  const int64_t lo = pl.Lo * k / out.splits, hi = pl.Lo * (k + 1) / out.splits;
  acc_t sum[VEC], best[VEC];
  int64_t arg[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    sum[e] = 0;
    best[e] = neg_inf<acc_t>();
    arg[e] = kNone;
  }
  if (i < pl.Li) {  // the whole pack (VEC divides Li)
    const scalar_t* xc = x + b * pl.sB + i;
    const acc_t* gr = gate ? gate + b * pl.Lo : nullptr;
    for (int64_t j0 = lo + ty; j0 < hi; j0 += kRows * kUnroll) {
      Pack<scalar_t, VEC> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * kRows;
        if (j < hi) v[u] = load_pack<VEC>(xc + j * pl.sO);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t j = j0 + u * kRows;
        if (j >= hi) continue;
        const acc_t gj = gr ? gr[j] : acc_t(1);
#pragma unroll
        for (int e = 0; e < VEC; ++e) take(sum[e], best[e], arg[e], static_cast<acc_t>(v[u].v[e]) * gj, j);
      }
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    s_sum[ty][tx * VEC + e] = sum[e];
    s_max[ty][tx * VEC + e] = best[e];
    s_arg[ty][tx * VEC + e] = arg[e];
  }
  __syncthreads();
  if (ty == 0 && i < pl.Li) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      for (int t = 1; t < kRows; ++t) {
        merge(sum[e], best[e], arg[e], s_sum[t][tx * VEC + e], s_max[t][tx * VEC + e], s_arg[t][tx * VEC + e]);
      }
      store_stat(out, b * pl.Li + i + e, k, sum[e], best[e], arg[e]);
    }
  }
}

// Second launch of a split reduction: a warp per row, lane l merging pieces l, l + 32, …
// in order, then the butterfly (one fixed order: deterministic; the first arg-max, since a
// tie keeps the lower index). Launched with 32 threads per row.
template <typename acc_t>
__global__ void combine_stats_kernel(int64_t rows, StatOut<acc_t> out) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = tid / kWarp; r < rows; r += n_warps) {  // warp-uniform
    acc_t sum = 0, best = neg_inf<acc_t>();
    int64_t arg = kNone;
    for (int64_t k = lane; k < out.splits; k += kWarp) {
      const int64_t q = r * out.splits + k;
      merge(sum, best, arg, out.part_sum[q], out.part_max[q], out.part_idx[q]);
    }
    warp_merge(sum, best, arg);
    if (lane == 0) {
      out.mean[r] = sum * out.inv;
      out.max[r] = best;
      out.idx[r] = arg == kNone ? 0 : arg;
    }
  }
}

constexpr int kMapUnroll = 4;  // packs per thread in flight before any is computed

// dx's statistic terms (csrc/gates_terms.h) in the plane's axes: rf of (b, j), cf of (b, i)
// (null = 1); a max along i adds rd[b, j]·cf at i = ridx[b, j], a max along j adds
// cd[b, i]·rf at j = cidx[b, i]. Passed by value (kernel parameter space).
template <typename acc_t>
struct PlaneTerms {
  const acc_t* rf[terms::kMaxTerms];
  const acc_t* cf[terms::kMaxTerms];
  const int64_t* ridx[terms::kMaxTerms];
  const acc_t* rd[terms::kMaxTerms];
  const int64_t* cidx[terms::kMaxTerms];
  const acc_t* cd[terms::kMaxTerms];
  int K;
};

template <typename acc_t>
PlaneTerms<acc_t> plane_terms(const terms::Terms<acc_t>& T, bool p_unit) {
  PlaneTerms<acc_t> out{};
  out.K = T.K;
  for (int k = 0; k < T.K; ++k) {
    const terms::Term<acc_t>& t = T.t[k];
    out.rf[k] = p_unit ? t.L : t.R;
    out.cf[k] = p_unit ? t.R : t.L;
    // The arg-max is indexed by the statistic's output: (b, c) for a max over p, (b, p)
    // for a max over c. It is a row's when that output axis is the plane's row axis.
    const bool per_row = t.over_c != p_unit;
    (per_row ? out.ridx[k] : out.cidx[k]) = t.idx;
    (per_row ? out.rd[k] : out.cd[k]) = t.d;
  }
  return out;
}

// The map's value at VEC consecutive elements of one plane row (b, j), i.. i + VEC − 1:
// grad · G[b, c] · S[b, p] (g absent: 0) + the terms, in the accumulation type. r: (b, j)
// in a (B, Lo) tensor; col: (b, i) in a (B, Li) tensor. Products in the CPU's order. Used
// by map_kernel (packs) and stencil_dx_kernel (VEC = 1).
template <typename scalar_t, typename acc_t, int VEC, typename index_t>
__device__ __forceinline__ void map_pack(const Pack<scalar_t, VEC>& g, bool has_grad, const acc_t* __restrict__ row_gate,
                                         const acc_t* __restrict__ col_gate, const PlaneTerms<acc_t>& T, index_t r,
                                         index_t j, index_t i, index_t col, bool p_unit, acc_t (&t)[VEC]) {
  if (has_grad) {
    const acc_t rg = row_gate ? row_gate[r] : acc_t(1);
    Pack<acc_t, VEC> cg;
    if (col_gate) cg = load_pack<VEC>(col_gate + col);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const acc_t x = static_cast<acc_t>(g.v[v]);
      const acc_t c = col_gate ? cg.v[v] : acc_t(1);
      t[v] = p_unit ? x * rg * c : x * c * rg;
    }
  } else {
#pragma unroll
    for (int v = 0; v < VEC; ++v) t[v] = 0;
  }
#pragma unroll
  for (int k = 0; k < terms::kMaxTerms; ++k) {
    if (k >= T.K) break;
    const acc_t rf = T.rf[k] ? T.rf[k][r] : acc_t(1);
    Pack<acc_t, VEC> cf;
    if (T.cf[k]) {
      cf = load_pack<VEC>(T.cf[k] + col);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v) cf.v[v] = 1;
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) t[v] += rf * cf.v[v];
    if (T.ridx[k]) {  // a max along i: this row's one i
      const int64_t at_i = T.ridx[k][r] - static_cast<int64_t>(i);
      const acc_t d = T.rd[k][r];
#pragma unroll
      for (int v = 0; v < VEC; ++v) t[v] += at_i == v ? d * cf.v[v] : acc_t(0);
    }
    if (T.cidx[k]) {  // a max along j: the columns whose arg-max is this row
      const Pack<int64_t, VEC> ci = load_pack<VEC>(T.cidx[k] + col);
      const Pack<acc_t, VEC> cd = load_pack<VEC>(T.cd[k] + col);
#pragma unroll
      for (int v = 0; v < VEC; ++v) t[v] += ci.v[v] == static_cast<int64_t>(j) ? cd.v[v] * rf : acc_t(0);
    }
  }
}

// The map kernel: out = grad · G[b, c] · S[b, p] + the terms, grad absent = 0, in x's
// layout. gates_grad_x; gates_apply is it with grad = x and no terms. The plane's elements
// are taken in order as packs of VEC along i (Li, the strides and the pointers are
// multiples of VEC when VEC > 1): thread t of the grid owns packs t + n·kThreads·gridDim
// (coalesced runs per warp) and issues kMapUnroll packs' loads before computing any,
// so that each thread has 64 bytes of float32 in flight. A pack's (b, j, i) come from two
// divisions in index_t (32-bit where the plane allows).
template <typename scalar_t, typename acc_t, int VEC, typename index_t>
__global__ void __launch_bounds__(kThreads) map_kernel(const scalar_t* __restrict__ grad, const acc_t* __restrict__ G,
                                                       const acc_t* __restrict__ S, PlaneTerms<acc_t> T,
                                                       scalar_t* __restrict__ out, Plane pl, bool p_unit) {
  constexpr int U = kMapUnroll;
  const acc_t* row_gate = p_unit ? G : S;  // of (b, j)
  const acc_t* col_gate = p_unit ? S : G;  // of (b, i)
  const index_t Li = static_cast<index_t>(pl.Li), Lo = static_cast<index_t>(pl.Lo);
  const index_t n_packs = static_cast<index_t>(pl.B * pl.Lo * pl.Li / VEC);
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t q0 = static_cast<index_t>(blockIdx.x) * (kThreads * U) + flat_tid(); q0 < n_packs;
       q0 += stride * U) {
    index_t r[U], j[U], i[U], col[U], off[U];  // off: in x
    Pack<scalar_t, VEC> g[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const index_t q = q0 + u * kThreads;
      if (q >= n_packs) continue;
      const index_t e = q * VEC;
      r[u] = e / Li;
      i[u] = e - r[u] * Li;
      const index_t b = r[u] / Lo;
      j[u] = r[u] - b * Lo;
      col[u] = b * Li + i[u];
      off[u] = b * static_cast<index_t>(pl.sB) + j[u] * static_cast<index_t>(pl.sO) + i[u];
      if (grad) g[u] = load_pack<VEC>(grad + off[u]);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (q0 + u * kThreads >= n_packs) continue;
      acc_t t[VEC];
      map_pack<scalar_t, acc_t, VEC, index_t>(g[u], grad != nullptr, row_gate, col_gate, T, r[u], j[u], i[u], col[u],
                                              p_unit, t);
      Pack<scalar_t, VEC> o;
#pragma unroll
      for (int v = 0; v < VEC; ++v) o.v[v] = static_cast<scalar_t>(t[v]);
      store_pack<VEC>(out + off[u], o);
    }
  }
}

// map_kernel's launch: packs of kVec where the plane and every pointer allow, 32-bit index
// arithmetic where every offset fits.
template <typename scalar_t, typename acc_t>
void launch_map(const scalar_t* grad, const acc_t* G, const acc_t* S, const PlaneTerms<acc_t>& T, scalar_t* out,
                const Plane& pl, bool p_unit, cudaStream_t stream) {
  bool vec = pl.Li % kVec == 0 && pl.sB % kVec == 0 && pl.sO % kVec == 0 && aligned_to(grad, sizeof(scalar_t) * kVec) &&
             aligned_to(out, sizeof(scalar_t) * kVec) && aligned_to(p_unit ? S : G, sizeof(acc_t) * kVec);
  for (int k = 0; k < T.K; ++k) {
    vec = vec && aligned_to(T.cf[k], sizeof(acc_t) * kVec) && aligned_to(T.cidx[k], sizeof(int64_t) * kVec) &&
          aligned_to(T.cd[k], sizeof(acc_t) * kVec);
  }
  const int64_t n = pl.B * pl.Lo * pl.Li;
  const int64_t max_off = (pl.B - 1) * pl.sB + (pl.Lo - 1) * pl.sO + pl.Li;
  const bool narrow = n < (int64_t(1) << 31) && max_off < (int64_t(1) << 31);
  const int64_t per_block = int64_t(kThreads) * kMapUnroll * (vec ? kVec : 1);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((n + per_block - 1) / per_block, int64_t(1) << 20)));
  const dim3 block(kWarp, kRows);
  if (vec && narrow) {
    map_kernel<scalar_t, acc_t, kVec, uint32_t><<<grid, block, 0, stream>>>(grad, G, S, T, out, pl, p_unit);
  } else if (vec) {
    map_kernel<scalar_t, acc_t, kVec, int64_t><<<grid, block, 0, stream>>>(grad, G, S, T, out, pl, p_unit);
  } else if (narrow) {
    map_kernel<scalar_t, acc_t, 1, uint32_t><<<grid, block, 0, stream>>>(grad, G, S, T, out, pl, p_unit);
  } else {
    map_kernel<scalar_t, acc_t, 1, int64_t><<<grid, block, 0, stream>>>(grad, G, S, T, out, pl, p_unit);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One read of x (and R): row[b, j] = Σ_i t · cw[b, i] and col[b, i] = Σ_j t · rw[b, j] with
// t = x · R. Block (b, chunk of 32·CPT inner indices, piece k of [0, Lo)): lane tx owns
// i = chunk·32·CPT + tx + 32u (u < CPT), warp ty the j ≡ ty (mod 8) of the piece. A row's
// chunk sum is a warp sum (written to row, or to row_part[(b·Lo + j)·chunks + chunk]); the
// column sums merge the 8 warps in shared memory (col, or col_part[(b·splits + k)·Li + i]).
template <typename acc_t>
struct ArgPairs {  // gates_reduce's arg-max pairs in the plane's axes (null: absent)
  const int64_t* ri;  // of (b, j): adds rv[b, j]·t at i = ri[b, j] to the column sums
  const acc_t* rv;
  const int64_t* ci;  // of (b, i): adds cv[b, i]·t at j = ci[b, i] to the row sums
  const acc_t* cv;
};

template <typename scalar_t, typename acc_t, int CPT>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const scalar_t* __restrict__ x,
                                                          const scalar_t* __restrict__ R,
                                                          const acc_t* __restrict__ rw, const acc_t* __restrict__ cw,
                                                          ArgPairs<acc_t> args, Plane pl, int64_t chunks, int64_t splits,
                                                          acc_t* __restrict__ row, acc_t* __restrict__ col,
                                                          acc_t* __restrict__ row_part, acc_t* __restrict__ col_part) {
  __shared__ acc_t s_col[kRows][kWarp * CPT];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t bid = blockIdx.x;
  const int64_t k = bid % splits, q = bid / splits;
  const int64_t chunk = q % chunks, b = q / chunks;
  const int64_t i0 = chunk * (kWarp * CPT) + tx;
  const int64_t lo = pl.Lo * k / splits, hi = pl.Lo * (k + 1) / splits;
  acc_t csum[CPT], cwv[CPT], cav[CPT];
  int64_t cai[CPT];
#pragma unroll
  for (int u = 0; u < CPT; ++u) {
    const int64_t i = i0 + u * kWarp;
    csum[u] = 0;
    cwv[u] = i < pl.Li ? (cw ? cw[b * pl.Li + i] : acc_t(1)) : acc_t(0);
    cai[u] = args.ci && i < pl.Li ? args.ci[b * pl.Li + i] : -1;
    cav[u] = args.ci && i < pl.Li ? args.cv[b * pl.Li + i] : acc_t(0);
  }
  for (int64_t j = lo + ty; j < hi; j += kRows) {  // the same trip count for a whole warp
    const int64_t base = b * pl.sB + j * pl.sO;
    const acc_t rv = rw ? rw[b * pl.Lo + j] : acc_t(1);
    const int64_t rai = args.ri ? args.ri[b * pl.Lo + j] : -1;
    const acc_t rav = args.ri ? args.rv[b * pl.Lo + j] : acc_t(0);
    acc_t t[CPT];
#pragma unroll
    for (int u = 0; u < CPT; ++u) {
      const int64_t i = i0 + u * kWarp;
      t[u] = i < pl.Li ? static_cast<acc_t>(x[base + i]) : acc_t(0);
      if (R && i < pl.Li) t[u] *= static_cast<acc_t>(R[base + i]);
    }
    acc_t rsum = 0;
#pragma unroll
    for (int u = 0; u < CPT; ++u) {
      const int64_t i = i0 + u * kWarp;
      if (i < pl.Li) {
        rsum += t[u] * (cwv[u] + (cai[u] == j ? cav[u] : acc_t(0)));
        csum[u] += t[u] * (rv + (rai == i ? rav : acc_t(0)));
      }
    }
    rsum = warp_sum(rsum);
    if (tx == 0) {
      if (chunks == 1) {
        row[b * pl.Lo + j] = rsum;
      } else {
        row_part[(b * pl.Lo + j) * chunks + chunk] = rsum;
      }
    }
  }
#pragma unroll
  for (int u = 0; u < CPT; ++u) s_col[ty][tx + u * kWarp] = csum[u];
  __syncthreads();
  if (ty == 0) {
#pragma unroll
    for (int u = 0; u < CPT; ++u) {
      const int64_t i = i0 + u * kWarp;
      if (i >= pl.Li) continue;
      acc_t s = 0;
      for (int w = 0; w < kRows; ++w) s += s_col[w][tx + u * kWarp];
      if (splits == 1) {
        col[b * pl.Li + i] = s;
      } else {
        col_part[(b * splits + k) * pl.Li + i] = s;
      }
    }
  }
}

// Second launch of a split reduce: row = Σ_chunk row_part (a warp per row, its lanes over
// the chunks, then the butterfly: one fixed order), col = Σ_k col_part (a thread per column,
// k in order). (A thread per row summing its chunks serially took 18 µs per call at
// 8×64×128×128 on the H200: 512 threads, 128 dependent loads each.)
template <typename acc_t>
__global__ void reduce_finish_kernel(const acc_t* __restrict__ row_part, const acc_t* __restrict__ col_part, Plane pl,
                                     int64_t chunks, int64_t splits, acc_t* __restrict__ row, acc_t* __restrict__ col) {
  const int64_t n_row = chunks > 1 ? pl.B * pl.Lo : 0;
  const int64_t n_col = splits > 1 ? pl.B * pl.Li : 0;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int lane = threadIdx.x % kWarp;
  for (int64_t t = tid / kWarp; t < n_row; t += n_threads / kWarp) {  // warp-uniform
    acc_t s = 0;
    for (int64_t c = lane; c < chunks; c += kWarp) s += row_part[t * chunks + c];
    s = warp_sum(s);
    if (lane == 0) row[t] = s;
  }
  for (int64_t q = tid; q < n_col; q += n_threads) {
    const int64_t b = q / pl.Li, i = q - b * pl.Li;
    acc_t s = 0;
    for (int64_t k = 0; k < splits; ++k) s += col_part[(b * splits + k) * pl.Li + i];
    col[q] = s;
  }
}

unsigned finish_blocks(int64_t n) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 1 << 20))); }

// Mean, max and first arg-max of x · gate over p (over_p: outputs (B, C), gate (B, P)) or
// over c (outputs (B, P), gate (B, C)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pool_stats(const at::Tensor& x, const std::optional<at::Tensor>& gate,
                                                          bool over_p, const char* name, const char* gate_name) {
  auto g = geometry(x, name);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x);
  const int64_t n_out = over_p ? g.C : g.P, len = over_p ? g.P : g.C;
  auto mean = at::empty({g.B, n_out}, x.options().dtype(acc));
  auto mx = at::empty({g.B, n_out}, x.options().dtype(acc));
  auto idx = at::empty({g.B, n_out}, x.options().dtype(at::kLong));
  if (x.numel() == 0) return {mean.zero_(), mx.zero_(), idx.zero_()};
  const Plane pl = plane(g);
  const bool inner = over_p == g.p_unit;  // the reduced axis is the unit-stride one
  const int64_t sms = sm_count(x);
  const int64_t rows = g.B * n_out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gates_pool_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor keep;
    const acc_t* gp = gate_ptr<acc_t>(gate, x, g.B, len, acc, gate_name, keep);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // Packs of kVec along the unit-stride axis where the plane and the pointers allow.
    const bool vec = pl.Li % kVec == 0 && pl.sB % kVec == 0 && pl.sO % kVec == 0 &&
                     aligned_to(xp, sizeof(scalar_t) * kVec) && (!inner || aligned_to(gp, sizeof(acc_t) * kVec));
    const int64_t width = vec ? kVec : 1;
    int64_t splits, blocks;
    if (inner) {  // one warp per row and piece
      splits = split_count(rows, len, int64_t(kWarp) * kUnroll * 2 * width, sms * kBlocksPerSM * kRows);
      blocks = (rows * splits + kRows - 1) / kRows;
    } else {  // one block per (b, 32·width outputs) and piece
      const int64_t tiles = g.B * ((n_out + kWarp * width - 1) / (kWarp * width));
      splits = split_count(tiles, len, int64_t(kRows) * kUnroll * 2, sms * kBlocksPerSM);
      blocks = tiles * splits;
    }
    const unsigned grid = grid_1d(blocks, name);
    StatParts parts = stat_parts(rows, splits, x, acc);
    const StatOut<acc_t> out = stat_out<acc_t>(mean, mx, idx, parts, splits, len);
    const dim3 block(kWarp, kRows);
    if (inner && vec) {
      inner_stats_kernel<scalar_t, acc_t, kVec><<<grid, block, 0, stream>>>(xp, gp, pl, out);
    } else if (inner) {
      inner_stats_kernel<scalar_t, acc_t, 1><<<grid, block, 0, stream>>>(xp, gp, pl, out);
    } else if (vec) {
      outer_stats_kernel<scalar_t, acc_t, kVec><<<grid, block, 0, stream>>>(xp, gp, pl, out);
    } else {
      outer_stats_kernel<scalar_t, acc_t, 1><<<grid, block, 0, stream>>>(xp, gp, pl, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (splits > 1) {
      combine_stats_kernel<acc_t><<<finish_blocks(rows * kWarp), 256, 0, stream>>>(rows, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {mean, mx, idx};
}

// ---- the small programs (csrc/gates_small.h) ---------------------------------------------
// The channel MLP: one block per image (rows kernels), warps over hidden units with lanes
// over channels (coalesced rows of W1); the weight gradients one thread per weight,
// summing the images in order. The spatial gate: one thread per pixel, its k×k taps read
// through L1; the weight gradient as per-block partials (a warp sum per tap, then the
// block's 8 warps in shared memory), added in block order by one sum.


// H = W1·(a·G0) + b1 (and the max row), T = act(H), g = σ(W2·(T_a + T_m) + 2·b2), gate = G0·g.
// Shared memory: A (C) and tsum (HID).
template <typename T>
__global__ void __launch_bounds__(kThreads) channel_mlp_fwd_kernel(
    const T* __restrict__ a, const T* __restrict__ m, const T* __restrict__ g0, const T* __restrict__ w1,
    const T* __restrict__ b1, const T* __restrict__ w2, const T* __restrict__ b2, T* __restrict__ H,
    T* __restrict__ Tt, T* __restrict__ U, T* __restrict__ TH, T* __restrict__ g, T* __restrict__ gate,
    small::MlpDims d, bool telu) {
  extern __shared__ unsigned char smem_raw[];
  T* A = reinterpret_cast<T*>(smem_raw);
  T* tsum = A + d.C;
  const int64_t b = blockIdx.x;
  const int tid = flat_tid();
  for (int k = 0; k < (d.pair ? 2 : 1); ++k) {
    const T* src = (k == 0 ? a : m) + b * d.C;
    for (int64_t c = tid; c < d.C; c += kThreads) A[c] = g0 ? src[c] * g0[b * d.C + c] : src[c];
    __syncthreads();
    const int64_t r = k * d.B + b;
    for (int64_t h = threadIdx.y; h < d.HID; h += kRows) {  // the same trip count for a whole warp
      T acc = T(0);
      for (int64_t c = threadIdx.x; c < d.C; c += kWarp) acc += w1[h * d.C + c] * A[c];
      acc = warp_sum(acc);
      if (threadIdx.x == 0) {
        const T hv = acc + (b1 ? b1[h] : T(0));
        T u, th;
        const T t = small::mlp_act(hv, telu, u, th);
        H[r * d.HID + h] = hv;
        Tt[r * d.HID + h] = t;
        if (telu) {
          U[r * d.HID + h] = u;
          TH[r * d.HID + h] = th;
        }
        tsum[h] = k == 0 ? t : tsum[h] + t;  // one writer per h
      }
    }
    __syncthreads();  // A is reloaded for the next row; tsum complete after the last
  }
  for (int64_t c = tid; c < d.C; c += kThreads) {
    T z = T(0);
    for (int64_t h = 0; h < d.HID; ++h) z += w2[c * d.HID + h] * tsum[h];
    if (b2) z += (d.pair ? T(2) : T(1)) * b2[c];
    const T gv = small::sigmoid(z);
    g[b * d.C + c] = gv;
    if (g0) gate[b * d.C + c] = g0[b * d.C + c] * gv;
  }
}

// Backward, per image: dz = σ'·dgate·G0, dT = W2ᵀ·dz, dH = dT·act'(H) (both rows), then the
// statistics' gradients dA = W1ᵀ·dH: da = dA_a·G0·scale_a, dm = dA_m·G0, dG0 = dgate·g +
// dA_a·a + dA_m·m. Shared memory: dz (C), dH (2·HID).
template <typename T>
__global__ void __launch_bounds__(kThreads) channel_mlp_bwd_rows_kernel(
    const T* __restrict__ dgate, const T* __restrict__ a, const T* __restrict__ m, const T* __restrict__ g0,
    const T* __restrict__ H, const T* __restrict__ U, const T* __restrict__ TH, const T* __restrict__ g,
    const T* __restrict__ w1, const T* __restrict__ w2, T* __restrict__ dz_out, T* __restrict__ dh_out,
    T* __restrict__ da, T* __restrict__ dm, T* __restrict__ dG0, small::MlpDims d, bool telu, T scale_a) {
  extern __shared__ unsigned char smem_raw[];
  T* dz = reinterpret_cast<T*>(smem_raw);
  T* dh = dz + d.C;
  const int64_t b = blockIdx.x;
  const int tid = flat_tid();
  for (int64_t c = tid; c < d.C; c += kThreads) {
    const int64_t q = b * d.C + c;
    const T dg = g0 ? dgate[q] * g0[q] : dgate[q];
    const T z = dg * g[q] * (T(1) - g[q]);
    dz[c] = z;
    dz_out[q] = z;
  }
  __syncthreads();
  for (int64_t h = threadIdx.y; h < d.HID; h += kRows) {
    T acc = T(0);
    for (int64_t c = threadIdx.x; c < d.C; c += kWarp) acc += w2[c * d.HID + h] * dz[c];
    acc = warp_sum(acc);
    if (threadIdx.x == 0) {
      for (int k = 0; k < (d.pair ? 2 : 1); ++k) {
        const int64_t q = (k * d.B + b) * d.HID + h;
        const T v = small::mlp_act_grad(acc, H[q], telu ? U[q] : T(0), telu ? TH[q] : T(0), telu);
        dh[k * d.HID + h] = v;
        dh_out[q] = v;
      }
    }
  }
  __syncthreads();
  for (int64_t c = tid; c < d.C; c += kThreads) {
    const int64_t q = b * d.C + c;
    T dA0 = T(0), dA1 = T(0);
    for (int64_t h = 0; h < d.HID; ++h) {
      dA0 += dh[h] * w1[h * d.C + c];
      if (d.pair) dA1 += dh[d.HID + h] * w1[h * d.C + c];
    }
    if (g0) {
      dG0[q] = dgate[q] * g[q] + dA0 * a[q] + (d.pair ? dA1 * m[q] : T(0));
      dA0 *= g0[q];
      dA1 *= g0[q];
    }
    da[q] = dA0 * scale_a;
    if (d.pair) dm[q] = dA1;
  }
}

// The weight gradients, one thread per output, the images summed in order:
// dW1[h, c] = Σ_b Σ_rows dH·(x·G0), dW2[c, h] = Σ_b dz·(T_a + T_m), db1[h] = Σ dH,
// db2[c] = (2 when paired)·Σ_b dz. Outputs laid out as [dW1 | dW2 | db1 | db2].
template <typename T>
__global__ void __launch_bounds__(kThreads) channel_mlp_bwd_weights_kernel(
    const T* __restrict__ dz, const T* __restrict__ dh, const T* __restrict__ Tt, const T* __restrict__ a,
    const T* __restrict__ m, const T* __restrict__ g0, T* __restrict__ dw1, T* __restrict__ dw2, T* __restrict__ db1,
    T* __restrict__ db2, small::MlpDims d, bool biases) {
  const int64_t n1 = d.HID * d.C, n2 = n1 + d.C * d.HID, n3 = n2 + (biases ? d.HID : 0), n4 = n3 + (biases ? d.C : 0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + flat_tid(); t < n4; t += stride) {
    T acc = T(0);
    if (t < n1) {
      const int64_t h = t / d.C, c = t - h * d.C;
      for (int64_t b = 0; b < d.B; ++b) {
        const T gv = g0 ? g0[b * d.C + c] : T(1);
        acc += dh[b * d.HID + h] * (a[b * d.C + c] * gv);
        if (d.pair) acc += dh[(d.B + b) * d.HID + h] * (m[b * d.C + c] * gv);
      }
      dw1[t] = acc;
    } else if (t < n2) {
      const int64_t q = t - n1, c = q / d.HID, h = q - c * d.HID;
      for (int64_t b = 0; b < d.B; ++b) {
        const T ts = Tt[b * d.HID + h] + (d.pair ? Tt[(d.B + b) * d.HID + h] : T(0));
        acc += dz[b * d.C + c] * ts;
      }
      dw2[q] = acc;
    } else if (t < n3) {
      const int64_t h = t - n2;
      for (int64_t b = 0; b < d.B; ++b) {
        acc += dh[b * d.HID + h];
        if (d.pair) acc += dh[(d.B + b) * d.HID + h];
      }
      db1[h] = acc;
    } else {
      const int64_t c = t - n3;
      for (int64_t b = 0; b < d.B; ++b) acc += dz[b * d.C + c];
      db2[c] = d.pair ? T(2) * acc : acc;
    }
  }
}

// The spatial gate's logit at (b, y, x) (without the bias): Σ over the k×k taps inside the
// map of w[0, t]·mean·S0 + w[1, t]·max·S0 at the tap.
template <typename T>
__device__ __forceinline__ T spatial_logit(const T* mean, const T* mx, const T* s0, const T* w, int64_t b, int64_t y,
                                           int64_t x, const small::SpatialDims& d) {
  const int64_t R = d.K / 2, KK = d.K * d.K;
  T acc = T(0);
  for (int64_t i = 0; i < d.K; ++i) {
    const int64_t ys = y + i - R;
    if (ys < 0 || ys >= d.H) continue;
    for (int64_t j = 0; j < d.K; ++j) {
      const int64_t xs = x + j - R;
      if (xs < 0 || xs >= d.W) continue;
      const int64_t q = b * d.P + ys * d.W + xs;
      const T gv = s0 ? s0[q] : T(1);
      acc += w[i * d.K + j] * (mean[q] * gv) + w[KK + i * d.K + j] * (mx[q] * gv);
    }
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) spatial_fwd_kernel(const T* __restrict__ mean, const T* __restrict__ mx,
                                                               const T* __restrict__ s0, const T* __restrict__ w,
                                                               const T* __restrict__ bias, T* __restrict__ s,
                                                               T* __restrict__ gate, small::SpatialDims d) {
  const int64_t n = d.B * d.P, stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + flat_tid(); q < n; q += stride) {
    const int64_t b = q / d.P, p = q - b * d.P, y = p / d.W, x = p - y * d.W;
    const T sv = small::sigmoid((bias ? bias[0] : T(0)) + spatial_logit(mean, mx, s0, w, b, y, x, d));
    s[q] = sv;
    if (s0) gate[q] = s0[q] * sv;
  }
}

// dlogit = dgate·S0·s(1 − s), dS0 = dgate·s (its first part); per block the partial sums
// of the weight gradient Σ dlogit·M[ch, shifted] (2·k² of them) and of the bias gradient,
// written to part[block]. One pixel per thread (no grid stride: the partials are per block).
// Shared memory: 8 warps × (2·k² + 1).
template <typename T>
__global__ void __launch_bounds__(kThreads) spatial_bwd_logit_kernel(
    const T* __restrict__ dgate, const T* __restrict__ s0, const T* __restrict__ s, const T* __restrict__ mean,
    const T* __restrict__ mx, T* __restrict__ dl, T* __restrict__ ds0, T* __restrict__ part, small::SpatialDims d) {
  extern __shared__ unsigned char smem_raw[];
  const int64_t KK = d.K * d.K, NP = 2 * KK + 1, R = d.K / 2;
  T* sp = reinterpret_cast<T*>(smem_raw);  // [kRows][NP]
  const int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + flat_tid();
  const bool ok = q < d.B * d.P;
  const int64_t b = ok ? q / d.P : 0, p = ok ? q - b * d.P : 0, y = p / d.W, x = p - y * d.W;
  T v = T(0);
  if (ok) {
    T dg = dgate[q];
    if (s0) {
      ds0[q] = dg * s[q];
      dg *= s0[q];
    }
    v = dg * s[q] * (T(1) - s[q]);
    dl[q] = v;
  }
  for (int64_t t = 0; t < NP; ++t) {  // the same for every thread: warp sums stay converged
    T c = T(0);
    if (ok && t < 2 * KK) {
      const int64_t ch = t / KK, tap = t - ch * KK, i = tap / d.K, j = tap - i * d.K;
      const int64_t ys = y + i - R, xs = x + j - R;
      if (ys >= 0 && ys < d.H && xs >= 0 && xs < d.W) {
        const int64_t o = b * d.P + ys * d.W + xs;
        c = v * ((ch == 0 ? mean[o] : mx[o]) * (s0 ? s0[o] : T(1)));
      }
    } else if (ok) {
      c = v;
    }
    c = warp_sum(c);
    if (threadIdx.x == 0) sp[threadIdx.y * NP + t] = c;
  }
  __syncthreads();
  for (int64_t t = flat_tid(); t < NP; t += kThreads) {
    T acc = T(0);
    for (int w = 0; w < kRows; ++w) acc += sp[w * NP + t];
    part[static_cast<int64_t>(blockIdx.x) * NP + t] = acc;
  }
}

// dM[ch] = Σ_{i,j} w[ch, i, j]·dl[y − i + k/2, x − j + k/2] (the transposed convolution);
// with S0, dS0 += dM·[mean, max] and the statistics' gradients are dM·S0; dmean · scale.
template <typename T>
__global__ void __launch_bounds__(kThreads) spatial_bwd_input_kernel(
    const T* __restrict__ dl, const T* __restrict__ w, const T* __restrict__ s0, const T* __restrict__ mean,
    const T* __restrict__ mx, T* __restrict__ ds0, T* __restrict__ dmean, T* __restrict__ dmax, small::SpatialDims d,
    T scale_mean) {
  const int64_t n = d.B * d.P, stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t R = d.K / 2, KK = d.K * d.K;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + flat_tid(); q < n; q += stride) {
    const int64_t b = q / d.P, p = q - b * d.P, y = p / d.W, x = p - y * d.W;
    T d0 = T(0), d1 = T(0);
    for (int64_t i = 0; i < d.K; ++i) {
      const int64_t ys = y - i + R;
      if (ys < 0 || ys >= d.H) continue;
      for (int64_t j = 0; j < d.K; ++j) {
        const int64_t xs = x - j + R;
        if (xs < 0 || xs >= d.W) continue;
        const T v = dl[b * d.P + ys * d.W + xs];
        d0 += w[i * d.K + j] * v;
        d1 += w[KK + i * d.K + j] * v;
      }
    }
    if (s0) {
      ds0[q] += d0 * mean[q] + d1 * mx[q];
      d0 *= s0[q];
      d1 *= s0[q];
    }
    dmean[q] = d0 * scale_mean;
    dmax[q] = d1;
  }
}

// ---- ELAT's K×K, C→1 stencil (semantics as csrc/gates.cpp's gates_stencil*) ------------
// Blocks take 8 × 32 output pixels of one image (kRows × kWarp threads). The map's input
// tile with its K/2 halo is staged in shared memory, CC channels at a time, loaded in x's
// own order (w fastest for NCHW, c fastest for channels_last: coalesced either way); the
// taps then read shared memory. A tap whose weight is 0 is skipped (warp-uniform): ELAT's
// composite 7×7 stencil has 25 nonzero taps of 49.

constexpr int kTileH = kRows, kTileW = kWarp;
constexpr int kMaxPairs = 4;  // (channel, tap) pairs per thread in the weight gradient

struct StencilGeo {
  int64_t B, C, H, W, K, R, sB, sC, sH, sW;
  int64_t tiles_h, tiles_w;
  bool c_unit;  // channels_last: c has stride 1
};

// Stage channels [c0, c0 + cc) of image b's tile (origin h0 − R, w0 − R, size
// (8 + K − 1) × (32 + K − 1)) into t[c][r][q], zero outside the map.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_tile(const scalar_t* __restrict__ x, const StencilGeo& g, int64_t b,
                                           int64_t h0, int64_t w0, int64_t c0, int64_t cc, acc_t* t) {
  const int64_t TH = kTileH + g.K - 1, TW = kTileW + g.K - 1, n = cc * TH * TW;
  for (int64_t e = flat_tid(); e < n; e += kThreads) {
    int64_t c, r, q;
    if (g.c_unit) {  // c fastest: consecutive threads read consecutive channels of a pixel
      c = e % cc;
      const int64_t rq = e / cc;
      r = rq / TW, q = rq - r * TW;
    } else {  // q fastest: consecutive threads read consecutive w
      q = e % TW;
      const int64_t cr = e / TW;
      r = cr % TH, c = cr / TH;
    }
    const int64_t h = h0 - g.R + r, w = w0 - g.R + q;
    acc_t v = acc_t(0);
    if (h >= 0 && h < g.H && w >= 0 && w < g.W) v = static_cast<acc_t>(x[b * g.sB + (c0 + c) * g.sC + h * g.sH + w * g.sW]);
    t[(c * TH + r) * TW + q] = v;
  }
}

// The staged tile's (sum, max, first arg-max) over its pixels for channels [c0, c0 + n):
// warp ty takes channels ty, ty + 8, …; lane l scans the pixels (l / 4, 8·(l % 4) + 0…7)
// in increasing p, then the warp merges. Not inlined: it keeps the logit loop's registers.
template <typename acc_t>
__device__ __noinline__ void pool_tile(const acc_t* tile, const StencilGeo& g, const StatOut<acc_t>& pool, int64_t b,
                                       int64_t h0, int64_t w0, int64_t c0, int64_t n, int64_t tile_id) {
  const int64_t TH = kTileH + g.K - 1, TW = kTileW + g.K - 1;
  const int tx = threadIdx.x;
  const int64_t r = tx / 4, q0 = (tx % 4) * 8, h = h0 + r;
  for (int64_t c = threadIdx.y; c < n; c += kRows) {  // warp-uniform
    const acc_t* tc = tile + c * TH * TW + (r + g.R) * TW + g.R;
    acc_t sum = 0, best = neg_inf<acc_t>();
    int64_t arg = kNone;
    for (int64_t q = q0; q < q0 + 8; ++q) {
      if (h < g.H && w0 + q < g.W) take(sum, best, arg, tc[q], h * g.W + w0 + q);
    }
    warp_merge(sum, best, arg);
    if (tx == 0) store_stat(pool, b * g.C + c0 + c, tile_id, sum, best, arg);
  }
}

// ELAT's composite 7×7 stencil has 25 nonzero taps, those of its three dilated 3×3
// convolutions: (di, dj) ∈ {−d, 0, d}² for d = 1, 2, 3. Tap t: 0 the centre, then
// 1 + 3·dir + (d − 1) in direction dir = N, NE, E, SE, S, SW, W, NW (as the Triton path's
// _stencil_taps). With elat_taps the kernels below read only these, at offsets fixed at
// compile time.
constexpr int kElatTaps = 25;
constexpr int kElatK = static_cast<int>(terms::kElatK);
constexpr int kElatR = kElatK / 2;
constexpr int kElatWPad = 28;  // a channel's 25 weights staged as 7 packs of 4 (3 zeros)
constexpr int kElatChunk = 64;  // stencil_dx_kernel, NCHW: channels whose weights are staged at once

__host__ __device__ constexpr int elat_dir_y(int dir) { return (dir == 0 || dir == 1 || dir == 7) ? -1 : (dir == 2 || dir == 6) ? 0 : 1; }
__host__ __device__ constexpr int elat_dir_x(int dir) { return (dir == 0 || dir == 4) ? 0 : (dir <= 3 ? 1 : -1); }
__host__ __device__ constexpr int elat_di(int t) { return t == 0 ? 0 : elat_dir_y((t - 1) / 3) * ((t - 1) % 3 + 1); }
__host__ __device__ constexpr int elat_dj(int t) { return t == 0 ? 0 : elat_dir_x((t - 1) / 3) * ((t - 1) % 3 + 1); }

// The tap index of offset (di, dj), −1 where ELAT has no tap.
__host__ __device__ constexpr int elat_index(int di, int dj) {
  for (int t = 0; t < kElatTaps; ++t) {
    if (elat_di(t) == di && elat_dj(t) == dj) return t;
  }
  return -1;
}

constexpr bool elat_table_ok() {  // 25 distinct taps, each one of csrc/gates_terms.h's elat_tap (the CPU's set)
  int n = 0;
  for (int di = -kElatR; di <= kElatR; ++di) {
    for (int dj = -kElatR; dj <= kElatR; ++dj) {
      const int t = elat_index(di, dj);
      if ((t >= 0) != terms::elat_tap(di, dj)) return false;
      n += t >= 0;
    }
  }
  return n == kElatTaps;
}
static_assert(elat_table_ok(), "ELAT's tap table must list its 25 taps once each");

// The staged tile of a 7×7 stencil: (8 + 6) × (32 + 6) values; the centre tap's index in K².
constexpr int kElatTH = kTileH + kElatK - 1, kElatTW = kTileW + kElatK - 1;
constexpr int kElatCentre = kElatR * kElatK + kElatR;

// Channel c's weight of ELAT tap t in the stencil's (C, K²) weights.
template <typename acc_t>
__device__ __forceinline__ acc_t elat_weight(const acc_t* __restrict__ wt, int64_t c, int t) {
  return wt[c * kElatK * kElatK + kElatCentre + elat_di(t) * kElatK + elat_dj(t)];
}

// A column of kTileH outputs from a staged tile, each the sum over ELAT's taps:
// acc[r] += Σ_t w[t]·base[(r + S·di_t)·TW + S·dj_t] (S = +1: the logit from x's tile;
// S = −1: the input gradient from the gradient's tile). base points at the column's row 0
// (the tile's halo before it). Unrolled over the source values: each of the ~86 values the
// column reads is loaded from shared memory once and feeds every product that uses it
// (200 multiply-adds), instead of one load per product; the indices are template
// arguments, so every offset and tap is a compile-time constant.
template <int S, int Q, int U, int R, typename acc_t>
__device__ __forceinline__ void elat_add(acc_t v, const acc_t (&w)[kElatTaps], acc_t (&acc)[kTileH]) {
  constexpr int t = elat_index(S * (Q - R), S * U);
  if constexpr (t >= 0) acc[R] += w[t] * v;
}

template <int S, int Q, int U, typename acc_t, int... R>
__device__ __forceinline__ void elat_source(const acc_t* base, const acc_t (&w)[kElatTaps], acc_t (&acc)[kTileH],
                                            std::integer_sequence<int, R...>) {
  if constexpr (((elat_index(S * (Q - R), S * U) >= 0) || ...)) {
    const acc_t v = base[Q * kElatTW + U];
    (elat_add<S, Q, U, R>(v, w, acc), ...);
  }
}

template <int S, int Q, typename acc_t, int... U>
__device__ __forceinline__ void elat_source_row(const acc_t* base, const acc_t (&w)[kElatTaps], acc_t (&acc)[kTileH],
                                                std::integer_sequence<int, U...>) {
  (elat_source<S, Q, U - kElatR>(base, w, acc, std::make_integer_sequence<int, kTileH>{}), ...);
}

template <int S, typename acc_t, int... Q>
__device__ __forceinline__ void elat_source_rows(const acc_t* base, const acc_t (&w)[kElatTaps], acc_t (&acc)[kTileH],
                                                 std::integer_sequence<int, Q...>) {
  (elat_source_row<S, Q - kElatR>(base, w, acc, std::make_integer_sequence<int, kElatK>{}), ...);
}

template <int S, typename acc_t>
__device__ __forceinline__ void elat_column(const acc_t* base, const acc_t (&w)[kElatTaps], acc_t (&acc)[kTileH]) {
  elat_source_rows<S>(base, w, acc, std::make_integer_sequence<int, kTileH + kElatK - 1>{});
}

// Channels [c0, c0 + n) of ELAT's weights wt (C, 49) into ws[c·28 + t] (t < 25; 0 after).
template <typename acc_t>
__device__ __forceinline__ void stage_elat_weights(const acc_t* __restrict__ wt, int64_t c0, int64_t n, acc_t* ws) {
  for (int64_t e = flat_tid(); e < n * kElatWPad; e += kThreads) {
    const int64_t c = e / kElatWPad;
    const int t = static_cast<int>(e - c * kElatWPad);
    ws[e] = t < kElatTaps ? elat_weight(wt, c0 + c, t) : acc_t(0);
  }
}

// One channel's staged weights into registers, 16 bytes per shared-memory read.
template <typename acc_t>
__device__ __forceinline__ void load_elat_weights(const acc_t* ws, acc_t (&w)[kElatTaps]) {
  constexpr int V = 16 / sizeof(acc_t);
#pragma unroll
  for (int k = 0; k < kElatWPad / V; ++k) {
    const Pack<acc_t, V> p = load_pack<V>(ws + k * V);
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (k * V + v < kElatTaps) w[k * V + v] = p.v[v];
    }
  }
}

// The shared memory of the ELAT kernels: cc staged channels and their padded weights, at
// least the 8 warps' partial columns of elat_fwd_kernel.
size_t elat_smem(int64_t cc, size_t elem) {
  return std::max<size_t>(cc * (kElatTH * kElatTW + kElatWPad), size_t(kRows) * kTileH * kTileW) * elem;
}

// y[b, h·W + w] = Σ_c Σ_ij wt[c, i·K + j]·x[b, c, h + i − R, w + j − R]. Grid: (tiles, B).
// Shared memory: cc·TH·TW tile values and cc·K² weights. With POOL the block also writes
// its tile's (sum, max, first arg-max) over p of every channel of x, read from the staged
// tile (ELAT's H·W pool in the same read of x; pool_tile); piece k of row (b, c) is the
// tile's index. Any K; a zero weight is skipped (warp-uniform). ELAT's taps: elat_fwd_kernel.
template <typename scalar_t, typename acc_t, bool POOL>
__global__ void __launch_bounds__(kThreads) stencil_fwd_kernel(const scalar_t* __restrict__ x,
                                                               const acc_t* __restrict__ wt, acc_t* __restrict__ y,
                                                               StencilGeo g, int64_t cc, StatOut<acc_t> pool) {
  extern __shared__ unsigned char smem_raw[];
  const int64_t TH = kTileH + g.K - 1, TW = kTileW + g.K - 1, KK = g.K * g.K;
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* ws = tile + cc * TH * TW;
  const int64_t b = blockIdx.y, tile_id = blockIdx.x;
  const int64_t h0 = (tile_id / g.tiles_w) * kTileH, w0 = (tile_id % g.tiles_w) * kTileW;
  const int ty = threadIdx.y, tx = threadIdx.x;
  acc_t acc = acc_t(0);
  for (int64_t c0 = 0; c0 < g.C; c0 += cc) {
    const int64_t n = std::min<int64_t>(cc, g.C - c0);
    __syncthreads();  // the previous chunk's reads are done
    stage_tile(x, g, b, h0, w0, c0, n, tile);
    for (int64_t e = flat_tid(); e < n * KK; e += kThreads) ws[e] = wt[c0 * KK + e];
    __syncthreads();
    if (POOL) pool_tile(tile, g, pool, b, h0, w0, c0, n, tile_id);
    for (int64_t c = 0; c < n; ++c) {
      const acc_t* tc = tile + c * TH * TW;
      for (int64_t i = 0; i < g.K; ++i) {
        for (int64_t j = 0; j < g.K; ++j) {
          const acc_t wv = ws[c * KK + i * g.K + j];
          if (wv == acc_t(0)) continue;  // the same tap for every thread: no divergence
          acc += wv * tc[(ty + i) * TW + tx + j];
        }
      }
    }
  }
  const int64_t h = h0 + ty, w = w0 + tx;
  if (h < g.H && w < g.W) y[b * g.H * g.W + h * g.W + w] = acc;
}

// ELAT's logit (gates_stencil with elat_taps; K = 7): the same tiles and pool, but thread
// (tx, ty) takes the tile's column tx for channels ty, ty + 8, … of each staged chunk and
// keeps the column's 8 outputs in registers (elat_column: ~11 shared-memory reads per
// output and channel instead of 50); the 8 warps' partial columns are summed at the end in
// shared memory, in warp order (deterministic). Shared memory: elat_smem(cc).
template <typename scalar_t, typename acc_t, bool POOL>
__global__ void __launch_bounds__(kThreads) elat_fwd_kernel(const scalar_t* __restrict__ x,
                                                            const acc_t* __restrict__ wt, acc_t* __restrict__ y,
                                                            StencilGeo g, int64_t cc, StatOut<acc_t> pool) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* ws = tile + cc * kElatTH * kElatTW;
  const int64_t b = blockIdx.y, tile_id = blockIdx.x;
  const int64_t h0 = (tile_id / g.tiles_w) * kTileH, w0 = (tile_id % g.tiles_w) * kTileW;
  const int ty = threadIdx.y, tx = threadIdx.x;
  acc_t acc[kTileH];
#pragma unroll
  for (int r = 0; r < kTileH; ++r) acc[r] = acc_t(0);
  for (int64_t c0 = 0; c0 < g.C; c0 += cc) {
    const int64_t n = std::min<int64_t>(cc, g.C - c0);
    __syncthreads();  // the previous chunk's reads are done
    stage_tile(x, g, b, h0, w0, c0, n, tile);
    stage_elat_weights(wt, c0, n, ws);
    __syncthreads();
    if (POOL) pool_tile(tile, g, pool, b, h0, w0, c0, n, tile_id);
    for (int64_t c = ty; c < n; c += kRows) {  // warp-uniform
      acc_t w[kElatTaps];
      load_elat_weights(ws + c * kElatWPad, w);
      elat_column<1>(tile + c * (kElatTH * kElatTW) + kElatR * kElatTW + tx + kElatR, w, acc);
    }
  }
  __syncthreads();
  acc_t* red = tile;  // red[(warp·8 + r)·32 + tx]
#pragma unroll
  for (int r = 0; r < kTileH; ++r) red[(ty * kTileH + r) * kTileW + tx] = acc[r];
  __syncthreads();
  acc_t sum = acc_t(0);
  for (int k = 0; k < kRows; ++k) sum += red[(k * kTileH + ty) * kTileW + tx];
  const int64_t h = h0 + ty, w = w0 + tx;
  if (h < g.H && w < g.W) y[b * g.H * g.W + h * g.W + w] = sum;
}

// dx = the map's value (map_pack: grad·G·S + the statistics' terms) + the stencil's input
// gradient Σ_ij wt[c, i·K + j]·gr[b, h − i + R, w − j + R], in one pass: one read of grad,
// one write of dx (gates_grad_x with a stencil; ELAT's backward). Grid (tiles, B), the
// tile's 8 × 32 pixels; the gradient's tile with its halo is staged in shared memory once.
// ELAT (elat_taps): only its 25 taps, at compile-time offsets; otherwise any K, every tap,
// zero weights skipped (the first kernel of this pass, kept for K ≠ 7).
// - p_unit (NCHW): thread = pixel, looping over the channels (stores coalesced along w).
//   ELAT: its 25 gradient neighbours in registers; each channel's weights staged in shared
//   memory (chunks of kElatChunk channels) and read as 7 broadcast 16-byte packs.
// - channels_last: thread = channel c0 + t mod nc (chunks of nc ≤ 256 channels; stores
//   coalesced along c), looping over the tile's columns t / nc + k·(256 / nc). ELAT: its
//   channel's 25 weights in registers, each column's 8 pixels from elat_column (the
//   gradient values are broadcast reads shared by the lanes of a pixel).
template <typename scalar_t, typename acc_t, bool ELAT, bool P_UNIT>
__global__ void __launch_bounds__(kThreads) stencil_dx_kernel(const scalar_t* __restrict__ grad,
                                                              const acc_t* __restrict__ G, const acc_t* __restrict__ S,
                                                              PlaneTerms<acc_t> T, const acc_t* __restrict__ wt,
                                                              const acc_t* __restrict__ gr, scalar_t* __restrict__ dx,
                                                              StencilGeo g) {
  extern __shared__ unsigned char smem_raw[];
  const int64_t TH = kTileH + g.K - 1, TW = kTileW + g.K - 1, KK = g.K * g.K, P = g.H * g.W, R = g.R;
  acc_t* gt = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* ws = gt + kElatTH * kElatTW;  // ELAT, NCHW: kElatChunk·28 weights
  const int64_t b = blockIdx.y, tile_id = blockIdx.x;
  const int64_t h0 = (tile_id / g.tiles_w) * kTileH, w0 = (tile_id % g.tiles_w) * kTileW;
  for (int64_t e = flat_tid(); e < TH * TW; e += kThreads) {
    const int64_t r = e / TW, q = e - r * TW, h = h0 - R + r, w = w0 - R + q;
    gt[e] = (h >= 0 && h < g.H && w >= 0 && w < g.W) ? gr[b * P + h * g.W + w] : acc_t(0);
  }
  __syncthreads();
  const acc_t* row_gate = P_UNIT ? G : S;
  const acc_t* col_gate = P_UNIT ? S : G;
  // Any K: the stencil term of channel c at tile pixel (ty, tx).
  auto tap_sum = [&](int64_t c, int64_t ty, int64_t tx) {
    acc_t s = acc_t(0);
    for (int64_t i = 0; i < g.K; ++i) {
      for (int64_t j = 0; j < g.K; ++j) {
        const acc_t wv = wt[c * KK + i * g.K + j];
        if (wv == acc_t(0)) continue;
        s += wv * gt[(ty - i + 2 * R) * TW + tx - j + 2 * R];  // gr at (h − i + R, w − j + R)
      }
    }
    return s;
  };
  // dx's offset at (b, c) and tile pixel (ty, tx).
  auto offset = [&](int64_t c, int64_t ty, int64_t tx) { return b * g.sB + c * g.sC + (h0 + ty) * g.sH + (w0 + tx) * g.sW; };
  // dx there: the map's value (grad's value gv there) plus the stencil term st.
  auto finish = [&](int64_t c, int64_t ty, int64_t tx, scalar_t gv, acc_t st) {
    const int64_t p = (h0 + ty) * g.W + w0 + tx;
    Pack<scalar_t, 1> gp;
    gp.v[0] = gv;
    acc_t v[1];
    if constexpr (P_UNIT) {
      map_pack<scalar_t, acc_t, 1, int64_t>(gp, grad != nullptr, row_gate, col_gate, T, b * g.C + c, c, p, b * P + p,
                                            true, v);
    } else {
      map_pack<scalar_t, acc_t, 1, int64_t>(gp, grad != nullptr, row_gate, col_gate, T, b * P + p, p, c, b * g.C + c,
                                            false, v);
    }
    dx[offset(c, ty, tx)] = static_cast<scalar_t>(v[0] + st);
  };
  auto put = [&](int64_t c, int64_t ty, int64_t tx, acc_t st) {
    finish(c, ty, tx, grad ? grad[offset(c, ty, tx)] : scalar_t(0), st);
  };
  if constexpr (P_UNIT) {
    const int64_t ty = threadIdx.y, tx = threadIdx.x;
    const bool inside = h0 + ty < g.H && w0 + tx < g.W;
    if constexpr (ELAT) {
      acc_t nb[kElatTaps];
#pragma unroll
      for (int t = 0; t < kElatTaps; ++t) nb[t] = gt[(ty + kElatR - elat_di(t)) * kElatTW + tx + kElatR - elat_dj(t)];
      for (int64_t c0 = 0; c0 < g.C; c0 += kElatChunk) {
        const int64_t n = std::min<int64_t>(kElatChunk, g.C - c0);
        __syncthreads();  // the previous chunk's weights are read
        stage_elat_weights(wt, c0, n, ws);
        __syncthreads();
        if (!inside) continue;
        for (int64_t c = 0; c < n; c += kMapUnroll) {  // kMapUnroll loads of grad in flight
          scalar_t gv[kMapUnroll];
#pragma unroll
          for (int u = 0; u < kMapUnroll; ++u) gv[u] = grad && c + u < n ? grad[offset(c0 + c + u, ty, tx)] : scalar_t(0);
#pragma unroll
          for (int u = 0; u < kMapUnroll; ++u) {
            if (c + u >= n) break;
            acc_t w[kElatTaps];
            load_elat_weights(ws + (c + u) * kElatWPad, w);
            acc_t s = acc_t(0);
#pragma unroll
            for (int t = 0; t < kElatTaps; ++t) s += w[t] * nb[t];
            finish(c0 + c + u, ty, tx, gv[u], s);
          }
        }
      }
    } else if (inside) {
      for (int64_t c = 0; c < g.C; ++c) put(c, ty, tx, tap_sum(c, ty, tx));
    }
    return;
  } else {
    const int tid = flat_tid();
    for (int64_t c0 = 0; c0 < g.C; c0 += kThreads) {
      const int64_t nc = std::min<int64_t>(kThreads, g.C - c0), lanes = kThreads / nc;
      if (tid >= nc * lanes) break;  // the same for every chunk but the last; no barrier below
      const int64_t c = c0 + tid % nc;
      if constexpr (ELAT) {
        acc_t w[kElatTaps];
#pragma unroll
        for (int t = 0; t < kElatTaps; ++t) w[t] = elat_weight(wt, c, t);
        for (int64_t tx = tid / nc; tx < kTileW; tx += lanes) {
          if (w0 + tx >= g.W) break;
          acc_t acc[kTileH];
#pragma unroll
          for (int r = 0; r < kTileH; ++r) acc[r] = acc_t(0);
          elat_column<-1>(gt + kElatR * kElatTW + tx + kElatR, w, acc);
#pragma unroll
          for (int r = 0; r < kTileH; ++r) {
            if (h0 + r < g.H) put(c, r, tx, acc[r]);
          }
        }
      } else {
        for (int64_t q = tid / nc; q < kTileH * kTileW; q += lanes) {
          const int64_t ty = q / kTileW, tx = q - ty * kTileW;
          if (h0 + ty < g.H && w0 + tx < g.W) put(c, ty, tx, tap_sum(c, ty, tx));
        }
      }
    }
  }
}

// Partial weight gradients: block (group of tiles, chunk of cc channels) sums
// x[b, c, h + i − R, w + j − R]·gr[b, h, w] over its tiles' pixels for each of its cc·K²
// (channel, tap) pairs (at most kMaxPairs per thread, in registers), into
// part[group, c, tap]. Shared memory: cc·TH·TW x values and 8·32 gradient values.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) stencil_grad_weight_kernel(const scalar_t* __restrict__ x,
                                                                       const acc_t* __restrict__ gr,
                                                                       acc_t* __restrict__ part, StencilGeo g,
                                                                       int64_t cc, int64_t groups) {
  extern __shared__ unsigned char smem_raw[];
  const int64_t TH = kTileH + g.K - 1, TW = kTileW + g.K - 1, KK = g.K * g.K, P = g.H * g.W;
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* gs = tile + cc * TH * TW;
  const int64_t grp = blockIdx.x, c0 = static_cast<int64_t>(blockIdx.y) * cc;
  const int64_t n = std::min<int64_t>(cc, g.C - c0);
  const int64_t tiles = g.tiles_h * g.tiles_w, total = g.B * tiles;
  const int64_t t_lo = total * grp / groups, t_hi = total * (grp + 1) / groups;
  acc_t acc[kMaxPairs];
#pragma unroll
  for (int u = 0; u < kMaxPairs; ++u) acc[u] = acc_t(0);
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int64_t b = t / tiles, tile_id = t - b * tiles;
    const int64_t h0 = (tile_id / g.tiles_w) * kTileH, w0 = (tile_id % g.tiles_w) * kTileW;
    __syncthreads();
    stage_tile(x, g, b, h0, w0, c0, n, tile);
    {
      const int ty = threadIdx.y, tx = threadIdx.x;
      const int64_t h = h0 + ty, w = w0 + tx;
      gs[ty * kTileW + tx] = (h < g.H && w < g.W) ? gr[b * P + h * g.W + w] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kMaxPairs; ++u) {
      const int64_t pair = flat_tid() + static_cast<int64_t>(u) * kThreads;
      if (pair >= n * KK) break;
      const int64_t c = pair / KK, tap = pair - c * KK, i = tap / g.K, j = tap - i * g.K;
      const acc_t* tc = tile + c * TH * TW;
      acc_t s = acc_t(0);
      for (int64_t ty = 0; ty < kTileH; ++ty) {
        for (int64_t tx = 0; tx < kTileW; ++tx) s += tc[(ty + i) * TW + tx + j] * gs[ty * kTileW + tx];
      }
      acc[u] += s;
    }
  }
#pragma unroll
  for (int u = 0; u < kMaxPairs; ++u) {
    const int64_t pair = flat_tid() + static_cast<int64_t>(u) * kThreads;
    if (pair < n * KK) part[(grp * g.C + c0) * KK + pair] = acc[u];
  }
}

// One tap row's K multiply-adds per staged x value, sliding along a 32-wide tile row
// (fully unrolled: each x value is read from shared memory once).
template <typename acc_t, int KT>
__device__ __forceinline__ void grad_weight_row(const acc_t* xr, const acc_t* grow, acc_t (&a)[KT]) {
#pragma unroll
  for (int tx = 0; tx < kTileW; ++tx) {
    const acc_t gv = grow[tx];
#pragma unroll
    for (int j = 0; j < KT; ++j) a[j] += xr[tx + j] * gv;
  }
}

// Whether ELAT's tap rows di = ±D hold exactly the taps (di, −D), (di, 0), (di, D).
template <int KT, int D>
constexpr bool elat_row_is_three() {
  int count = 0;
  for (int j = -KT / 2; j <= KT / 2; ++j) count += terms::elat_tap(D, j) + terms::elat_tap(-D, j);
  return count == 6 && terms::elat_tap(D, -D) && terms::elat_tap(D, 0) && terms::elat_tap(D, D) &&
         terms::elat_tap(-D, -D) && terms::elat_tap(-D, 0) && terms::elat_tap(-D, D);
}

// ELAT's tap row di = ±D (D = 1, 2, 3): only its taps (di, 0) and (di, ±D) (terms::elat_tap),
// columns R − D, R and R + D: 3 multiply-adds per x value instead of 7.
template <typename acc_t, int KT, int D>
__device__ __forceinline__ void grad_weight_elat_row(const acc_t* xr, const acc_t* grow, acc_t (&a)[KT]) {
  constexpr int R = KT / 2;
  static_assert(elat_row_is_three<KT, D>(), "ELAT's off-centre rows hold the taps (±D, 0) and (±D, ±D) only");
#pragma unroll
  for (int tx = 0; tx < kTileW; ++tx) {
    const acc_t gv = grow[tx];
    a[R - D] += xr[tx + R - D] * gv;
    a[R] += xr[tx + R] * gv;
    a[R + D] += xr[tx + R + D] * gv;
  }
}

// The same partial sums for a compile-time K (ELAT's 7): work item (channel, tap row i,
// tile row ty) slides along the tile row, each staged x value feeding K multiply-adds from
// registers (a fully unrolled 32-wide row), instead of two shared-memory reads per
// multiply-add. The 8 tile rows' sums are merged in shared memory at the end, in order.
// ELAT (elat_taps): the items are ordered (i, c, ty), so that a warp's 32 items share a tap
// row (for chunks of 4 or 8 channels), and the six off-centre rows compute their 3 taps
// only: 25 multiply-adds per x value and channel instead of 49.
template <typename scalar_t, typename acc_t, int KT, bool ELAT>
__global__ void __launch_bounds__(kThreads) stencil_grad_weight_rows_kernel(const scalar_t* __restrict__ x,
                                                                            const acc_t* __restrict__ gr,
                                                                            acc_t* __restrict__ part, StencilGeo g,
                                                                            int64_t cc, int64_t groups) {
  static_assert(!ELAT || KT == terms::kElatK, "ELAT's tap rows are those of its 7x7 stencil");
  constexpr int TH = kTileH + KT - 1, TW = kTileW + KT - 1;
  constexpr int kItems = (8 * KT * kTileH + kThreads - 1) / kThreads;  // cc ≤ 8
  extern __shared__ unsigned char smem_raw[];
  acc_t* tile = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* gs = tile + cc * TH * TW;
  const int64_t P = g.H * g.W;
  const int64_t grp = blockIdx.x, c0 = static_cast<int64_t>(blockIdx.y) * cc;
  const int n = static_cast<int>(std::min<int64_t>(cc, g.C - c0));
  const int64_t tiles = g.tiles_h * g.tiles_w, total = g.B * tiles;
  const int64_t t_lo = total * grp / groups, t_hi = total * (grp + 1) / groups;
  const int tid = flat_tid();
  acc_t acc[kItems][KT];
#pragma unroll
  for (int u = 0; u < kItems; ++u)
#pragma unroll
    for (int j = 0; j < KT; ++j) acc[u][j] = acc_t(0);
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int64_t b = t / tiles, tile_id = t - b * tiles;
    const int64_t h0 = (tile_id / g.tiles_w) * kTileH, w0 = (tile_id % g.tiles_w) * kTileW;
    __syncthreads();
    stage_tile(x, g, b, h0, w0, c0, n, tile);
    {
      const int64_t h = h0 + threadIdx.y, w = w0 + threadIdx.x;
      gs[threadIdx.y * kTileW + threadIdx.x] = (h < g.H && w < g.W) ? gr[b * P + h * g.W + w] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kItems; ++u) {
      const int item = tid + u * kThreads;
      if (item >= n * KT * kTileH) break;
      const int ty = item % kTileH;
      const int c = ELAT ? (item / kTileH) % n : item / (kTileH * KT);
      const int i = ELAT ? item / (kTileH * n) : (item / kTileH) % KT;
      const acc_t* xr = tile + (c * TH + ty + i) * TW;
      const acc_t* grow = gs + ty * kTileW;
      if constexpr (ELAT) {
        switch (i < KT / 2 ? KT / 2 - i : i - KT / 2) {  // |di|: uniform across a warp (see above)
          case 1: grad_weight_elat_row<acc_t, KT, 1>(xr, grow, acc[u]); break;
          case 2: grad_weight_elat_row<acc_t, KT, 2>(xr, grow, acc[u]); break;
          case 3: grad_weight_elat_row<acc_t, KT, 3>(xr, grow, acc[u]); break;
          default: grad_weight_row<acc_t, KT>(xr, grow, acc[u]);  // di = 0: all 7 taps
        }
      } else {
        grad_weight_row<acc_t, KT>(xr, grow, acc[u]);
      }
    }
  }
  // merge the tile rows: red[(c·K + i)·K + j][ty], then one thread per (c, tap) sums over ty
  __syncthreads();
  acc_t* red = tile;
#pragma unroll
  for (int u = 0; u < kItems; ++u) {
    const int item = tid + u * kThreads;
    if (item >= n * KT * kTileH) break;
    const int ty = item % kTileH;
    const int ci = ELAT ? ((item / kTileH) % n) * KT + item / (kTileH * n) : item / kTileH;  // c·K + i
#pragma unroll
    for (int j = 0; j < KT; ++j) red[(ci * KT + j) * kTileH + ty] = acc[u][j];
  }
  __syncthreads();
  for (int64_t e = tid; e < n * KT * KT; e += kThreads) {
    acc_t sum = acc_t(0);
    for (int ty = 0; ty < kTileH; ++ty) sum += red[e * kTileH + ty];
    part[(grp * g.C + c0) * KT * KT + e] = sum;  // ELAT: the taps off its set were never accumulated, 0
  }
}

StencilGeo stencil_geo(const at::Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(x.dim() == 4 && x.is_cuda(), name, ": x must be a (B, C, H, W) CUDA tensor, got ", x.sizes(), " on ",
              x.device());
  TORCH_CHECK(K >= 1 && K % 2 == 1 && K <= 15, name, ": the stencil size K must be odd, 1 to 15, got ", K);
  StencilGeo g{x.size(0), x.size(1), x.size(2), x.size(3), K, K / 2, x.stride(0), x.stride(1), x.stride(2),
               x.stride(3), (x.size(2) + kTileH - 1) / kTileH, (x.size(3) + kTileW - 1) / kTileW, false};
  if (!(g.W == 1 || g.sW == 1)) {
    TORCH_CHECK(g.C == 1 || g.sC == 1, name, ": x must be contiguous or channels_last, got strides ", x.strides());
    g.c_unit = true;
  }
  TORCH_CHECK(g.tiles_h * g.tiles_w <= kMaxGrid && g.B <= kMaxGridY, name, ": ", g.B, " images of ",
              g.tiles_h * g.tiles_w, " tiles exceed the grid limits");
  return g;
}

// The map's geometry with the stencil w (1, C, K, K) on its device.
StencilGeo stencil_geo(const at::Tensor& x, const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.dim() == 4, name, ": w must be (1, C, K, K), got ", w.sizes());
  TORCH_CHECK(w.device() == x.device(), name, ": w must be on the map's device ", x.device(), ", got ", w.device());
  return stencil_geo(x, w.size(2), name);
}

// Channels per staged tile: as many as fit in `budget` bytes (at most 8, at least 1).
int64_t stencil_chunk(const StencilGeo& g, size_t elem, size_t budget) {
  const int64_t per = (kTileH + g.K - 1) * (kTileW + g.K - 1) * static_cast<int64_t>(elem);
  return std::max<int64_t>(1, std::min<int64_t>({8, g.C, static_cast<int64_t>(budget) / per}));
}

// The stencil's weight as (C, K²) values of the accumulation type, contiguous.
at::Tensor stencil_taps(const at::Tensor& w, const StencilGeo& g, at::ScalarType acc, const char* name) {
  TORCH_CHECK(w.dim() == 4 && w.size(0) == 1 && w.size(1) == g.C && w.size(2) == g.K && w.size(3) == g.K, name,
              ": w must be (1, C = ", g.C, ", K, K), got ", w.sizes());
  return w.to(acc).contiguous();
}

// dlogit: (B, H·W) values of the accumulation type on the map's device.
void check_stencil_grad(const at::Tensor& gr, const StencilGeo& g, at::ScalarType acc, const at::Device& dev,
                        const char* op) {
  TORCH_CHECK(gr.device() == dev && gr.scalar_type() == acc && gr.numel() == g.B * g.H * g.W, op, ": g must be ", acc,
              " on ", dev, " with B·H·W = ", g.B * g.H * g.W, " elements, got ", gr.scalar_type(), " ", gr.sizes(),
              " on ", gr.device());
}

unsigned flat_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20)));
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return small::has(t) ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace

// Mean, max and first arg-max over p = (h, w) of y = x · S[b, p]; each (B, C).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gates_pool_hw_cuda(const at::Tensor& x,
                                                                  const std::optional<at::Tensor>& S) {
  return pool_stats(x, S, /*over_p=*/true, "gates_pool_hw", "S");
}

// Mean, max and first arg-max over c of y = x · G[b, c]; each (B, P).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gates_pool_c_cuda(const at::Tensor& x,
                                                                 const std::optional<at::Tensor>& G) {
  return pool_stats(x, G, /*over_p=*/false, "gates_pool_c", "G");
}

// out = x · G[b, c] · S[b, p], in x's dtype and layout: the map kernel with grad = x.
at::Tensor gates_apply_cuda(const at::Tensor& x, const std::optional<at::Tensor>& G, const std::optional<at::Tensor>& S) {
  auto g = geometry(x, "gates_apply");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x);
  auto out = at::empty_like(x);
  TORCH_CHECK(out.strides() == x.strides(), "gates_apply: could not allocate the output in x's layout");
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gates_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor kg, ks;
    const acc_t* gp = gate_ptr<acc_t>(G, x, g.B, g.C, acc, "G", kg);
    const acc_t* sp = gate_ptr<acc_t>(S, x, g.B, g.P, acc, "S", ks);
    launch_map<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), gp, sp, PlaneTerms<acc_t>{}, out.data_ptr<scalar_t>(),
                                plane(g), g.p_unit, c10::cuda::getCurrentCUDAStream());
  });
  return out;
}

// U[b, c] = Σ_p R·x·S[b, p] and V[b, p] = Σ_c R·x·G[b, c], in one read of x (and of R,
// which must have x's strides). R, G, S absent = 1.
std::tuple<at::Tensor, at::Tensor> gates_reduce_cuda(const at::Tensor& x, const std::optional<at::Tensor>& R,
                                                     const std::optional<at::Tensor>& G,
                                                     const std::optional<at::Tensor>& S,
                                                     const std::optional<at::Tensor>& g_idx,
                                                     const std::optional<at::Tensor>& g_val,
                                                     const std::optional<at::Tensor>& s_idx,
                                                     const std::optional<at::Tensor>& s_val) {
  auto g = geometry(x, "gates_reduce");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x);
  const bool has_r = R.has_value() && R->defined();
  if (has_r) {
    TORCH_CHECK(R->device() == x.device() && R->sizes() == x.sizes() && R->strides() == x.strides() &&
                    R->scalar_type() == x.scalar_type(),
                "gates_reduce: R must match x in device, shape, strides and dtype; got ", R->device(), " ", R->sizes(),
                " ", R->strides(), " ", R->scalar_type());
  }
  if (x.numel() == 0) {
    return {at::zeros({g.B, g.C}, x.options().dtype(acc)), at::zeros({g.B, g.P}, x.options().dtype(acc))};
  }
  auto U = at::empty({g.B, g.C}, x.options().dtype(acc));
  auto V = at::empty({g.B, g.P}, x.options().dtype(acc));
  const Plane pl = plane(g);
  const int cpt = pl.Li <= kWarp ? 1 : (pl.Li <= 2 * kWarp ? 2 : 4);
  const int64_t chunks = (pl.Li + kWarp * cpt - 1) / (kWarp * cpt);
  const int64_t splits = split_count(g.B * chunks, pl.Lo, int64_t(kRows) * 8, sm_count(x) * kBlocksPerSM);
  const unsigned grid = grid_1d(g.B * chunks * splits, "gates_reduce");
  at::Tensor row_part, col_part;
  if (chunks > 1) row_part = at::empty({g.B * pl.Lo * chunks}, x.options().dtype(acc));
  if (splits > 1) col_part = at::empty({g.B * splits * pl.Li}, x.options().dtype(acc));
  // NCHW: rows are channels (row sums give U, column sums V); channels_last: the reverse.
  at::Tensor& row_out = g.p_unit ? U : V;
  at::Tensor& col_out = g.p_unit ? V : U;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gates_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor kg, ks;
    const acc_t* gp = gate_ptr<acc_t>(G, x, g.B, g.C, acc, "G", kg);
    const acc_t* sp = gate_ptr<acc_t>(S, x, g.B, g.P, acc, "S", ks);
    const acc_t* rw = g.p_unit ? gp : sp;
    const acc_t* cw = g.p_unit ? sp : gp;
    std::vector<at::Tensor> keep;
    const auto gpair = terms::arg_pair<acc_t>(g_idx, g_val, g.B, g.C, acc, x.device(), "g_idx", "g_val", keep);
    const auto spair = terms::arg_pair<acc_t>(s_idx, s_val, g.B, g.P, acc, x.device(), "s_idx", "s_val", keep);
    // NCHW: the g pair is indexed by the rows (channels), the s pair by the columns; else the reverse.
    const auto& rpair = g.p_unit ? gpair : spair;
    const auto& cpair = g.p_unit ? spair : gpair;
    const ArgPairs<acc_t> args{rpair.first, rpair.second, cpair.first, cpair.second};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = has_r ? R->const_data_ptr<scalar_t>() : nullptr;
    acc_t* row = row_out.data_ptr<acc_t>();
    acc_t* col = col_out.data_ptr<acc_t>();
    acc_t* rpart = chunks > 1 ? row_part.data_ptr<acc_t>() : nullptr;
    acc_t* cpart = splits > 1 ? col_part.data_ptr<acc_t>() : nullptr;
    const dim3 block(kWarp, kRows);
    if (cpt == 1) {
      reduce_kernel<scalar_t, acc_t, 1><<<grid, block, 0, stream>>>(xp, rp, rw, cw, args, pl, chunks, splits, row, col, rpart, cpart);
    } else if (cpt == 2) {
      reduce_kernel<scalar_t, acc_t, 2><<<grid, block, 0, stream>>>(xp, rp, rw, cw, args, pl, chunks, splits, row, col, rpart, cpart);
    } else {
      reduce_kernel<scalar_t, acc_t, 4><<<grid, block, 0, stream>>>(xp, rp, rw, cw, args, pl, chunks, splits, row, col, rpart, cpart);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (chunks > 1 || splits > 1) {
      const int64_t n = std::max(chunks > 1 ? g.B * pl.Lo * kWarp : 0, splits > 1 ? g.B * pl.Li : 0);
      reduce_finish_kernel<acc_t><<<finish_blocks(n), 256, 0, stream>>>(rpart, cpart, pl, chunks, splits, row, col);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {U, V};
}

// dx = grad · G[b, c] · S[b, p] + each statistic's term (csrc/gates_terms.h) + with
// stencil_w ELAT's stencil input gradient, in x's dtype and layout (grad must have x's
// strides): one pass, the map kernel (stencil_dx_kernel with a stencil).
at::Tensor gates_grad_x_cuda(const std::optional<at::Tensor>& grad, const at::Tensor& x,
                             const std::optional<at::Tensor>& G, const std::optional<at::Tensor>& S,
                             const c10::List<std::optional<at::Tensor>>& L,
                             const c10::List<std::optional<at::Tensor>>& R,
                             const c10::List<std::optional<at::Tensor>>& idx,
                             const c10::List<std::optional<at::Tensor>>& d, at::IntArrayRef kinds,
                             const std::optional<at::Tensor>& stencil_w, const std::optional<at::Tensor>& stencil_g,
                             bool elat_taps) {
  const char* op = "gates_grad_x";
  auto g = geometry(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto acc = acc_type(x);
  const bool has_grad = grad.has_value() && grad->defined();
  if (has_grad) {
    TORCH_CHECK(grad->device() == x.device() && grad->sizes() == x.sizes() && grad->strides() == x.strides() &&
                    grad->scalar_type() == x.scalar_type(),
                "gates_grad_x: grad must match x in device, shape, strides and dtype; got ", grad->device(), " ",
                grad->sizes(), " ", grad->strides(), " ", grad->scalar_type());
  }
  const bool stencil = terms::stencil_args(stencil_w, stencil_g, elat_taps, op);
  StencilGeo sg{};
  at::Tensor wt, gc;
  if (stencil) {
    sg = stencil_geo(x, *stencil_w, op);
    check_stencil_grad(*stencil_g, sg, acc, x.device(), op);
    wt = stencil_taps(*stencil_w, sg, acc, op);
    gc = stencil_g->contiguous();
  }
  auto dx = at::empty_like(x);
  TORCH_CHECK(dx.strides() == x.strides(), "gates_grad_x: could not allocate dx in x's layout");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gates_grad_x", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> keep;
    const terms::Terms<acc_t> T = terms::dx_terms<acc_t>(L, R, idx, d, kinds, g.B, g.C, g.P, acc, x.device(), keep);
    if (x.numel() == 0) return;
    at::Tensor kg, ks;
    const acc_t* gp = gate_ptr<acc_t>(G, x, g.B, g.C, acc, "G", kg);
    const acc_t* sp = gate_ptr<acc_t>(S, x, g.B, g.P, acc, "S", ks);
    const scalar_t* gr_p = has_grad ? grad->const_data_ptr<scalar_t>() : nullptr;
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (!stencil) {
      launch_map<scalar_t, acc_t>(gr_p, gp, sp, plane_terms(T, g.p_unit), dx.data_ptr<scalar_t>(), plane(g), g.p_unit,
                                  stream);
      return;
    }
    // One pass: the map's value plus the stencil's input gradient (stencil_dx_kernel).
    size_t smem = (kTileH + sg.K - 1) * (kTileW + sg.K - 1) * sizeof(acc_t);
    if (elat_taps && !sg.c_unit) smem += kElatChunk * kElatWPad * sizeof(acc_t);
    const dim3 grid(static_cast<unsigned>(sg.tiles_h * sg.tiles_w), static_cast<unsigned>(sg.B)), block(kWarp, kRows);
    const PlaneTerms<acc_t> pt = plane_terms(T, !sg.c_unit);
    const acc_t* wp = wt.const_data_ptr<acc_t>();
    const acc_t* gcp = gc.const_data_ptr<acc_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    if (elat_taps && !sg.c_unit) {
      stencil_dx_kernel<scalar_t, acc_t, true, true><<<grid, block, smem, stream>>>(gr_p, gp, sp, pt, wp, gcp, dxp, sg);
    } else if (elat_taps) {
      stencil_dx_kernel<scalar_t, acc_t, true, false><<<grid, block, smem, stream>>>(gr_p, gp, sp, pt, wp, gcp, dxp, sg);
    } else if (!sg.c_unit) {
      stencil_dx_kernel<scalar_t, acc_t, false, true><<<grid, block, smem, stream>>>(gr_p, gp, sp, pt, wp, gcp, dxp, sg);
    } else {
      stencil_dx_kernel<scalar_t, acc_t, false, false><<<grid, block, smem, stream>>>(gr_p, gp, sp, pt, wp, gcp, dxp, sg);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

// ---- the small programs: semantics as in csrc/gates.cpp ----------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gates_channel_mlp_fwd_cuda(
    const at::Tensor& a, const std::optional<at::Tensor>& m, const std::optional<at::Tensor>& G0, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const at::Tensor& w2, const std::optional<at::Tensor>& b2, bool telu) {
  const auto d = small::mlp_dims(a, m, G0, w1, b1, w2, b2, "gates_channel_mlp_fwd");
  const c10::cuda::CUDAGuard guard(a.device());
  const small::MlpOut o = small::mlp_outputs(a, d, telu, small::has(G0));
  at::Tensor H = o.H, T_ = o.T, U = o.U, TH = o.TH, g = o.g, gate = o.gate;
  if (d.B == 0 || d.C == 0) return {H.zero_(), T_.zero_(), U, TH, g, gate};
  TORCH_CHECK(d.B <= kMaxGrid, "gates_channel_mlp_fwd: batch ", d.B, " exceeds the grid limit");
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gates_channel_mlp_fwd", [&] {
    using T = scalar_t;
    const size_t smem = (d.C + d.HID) * sizeof(T);
    TORCH_CHECK(smem <= kMaxSmem, "gates_channel_mlp_fwd: C + HID = ", d.C + d.HID, " values of ", sizeof(T),
                " bytes exceed the kernel's 48 KB of shared memory");
    channel_mlp_fwd_kernel<T><<<static_cast<unsigned>(d.B), dim3(kWarp, kRows), smem, stream>>>(
        a.const_data_ptr<T>(), opt_ptr<T>(m), opt_ptr<T>(G0), w1.const_data_ptr<T>(), opt_ptr<T>(b1),
        w2.const_data_ptr<T>(), opt_ptr<T>(b2), H.data_ptr<T>(), T_.data_ptr<T>(), telu ? U.data_ptr<T>() : nullptr,
        telu ? TH.data_ptr<T>() : nullptr, g.data_ptr<T>(), small::has(G0) ? gate.data_ptr<T>() : nullptr, d, telu);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {H, T_, U, TH, g, gate};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gates_channel_mlp_bwd_cuda(const at::Tensor& dgate, const at::Tensor& a, const std::optional<at::Tensor>& m,
                           const std::optional<at::Tensor>& G0, const at::Tensor& H, const at::Tensor& T_,
                           const std::optional<at::Tensor>& U, const std::optional<at::Tensor>& TH, const at::Tensor& g,
                           const at::Tensor& w1, const at::Tensor& w2, bool telu, bool biases, double scale_a) {
  const char* op = "gates_channel_mlp_bwd";
  const auto d = small::mlp_bwd_dims(dgate, a, m, G0, H, T_, U, TH, g, w1, w2, telu, op);
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t rows = d.pair ? 2 * d.B : d.B;
  const auto acc = a.scalar_type();
  // the weights' gradients are written whole by their kernel (zeroed only when it does not run)
  const small::MlpGrads r = small::mlp_grads(a, d, small::has(G0), biases, /*zero_weights=*/d.B == 0);
  at::Tensor da = r.da, dm = r.dm, dG0 = r.dG0, dw1 = r.dw1, db1 = r.db1, dw2 = r.dw2, db2 = r.db2;
  if (d.B == 0 || d.C == 0) return {da, dm, dG0, dw1, db1, dw2, db2};
  TORCH_CHECK(d.B <= kMaxGrid, op, ": batch ", d.B, " exceeds the grid limit");
  auto dz = at::empty({d.B, d.C}, a.options());
  auto dh = at::empty({rows, d.HID}, a.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "gates_channel_mlp_bwd", [&] {
    using T = scalar_t;
    const size_t smem = (d.C + 2 * d.HID) * sizeof(T);
    TORCH_CHECK(smem <= kMaxSmem, "gates_channel_mlp_bwd: C + 2·HID = ", d.C + 2 * d.HID, " values of ", sizeof(T),
                " bytes exceed the kernel's 48 KB of shared memory");
    channel_mlp_bwd_rows_kernel<T><<<static_cast<unsigned>(d.B), dim3(kWarp, kRows), smem, stream>>>(
        dgate.const_data_ptr<T>(), a.const_data_ptr<T>(), opt_ptr<T>(m), opt_ptr<T>(G0), H.const_data_ptr<T>(),
        telu ? U->const_data_ptr<T>() : nullptr, telu ? TH->const_data_ptr<T>() : nullptr, g.const_data_ptr<T>(),
        w1.const_data_ptr<T>(), w2.const_data_ptr<T>(), dz.data_ptr<T>(), dh.data_ptr<T>(), da.data_ptr<T>(),
        d.pair ? dm.data_ptr<T>() : nullptr, small::has(G0) ? dG0.data_ptr<T>() : nullptr, d, telu,
        static_cast<T>(scale_a));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t n = 2 * d.HID * d.C + (biases ? d.HID + d.C : 0);
    channel_mlp_bwd_weights_kernel<T><<<flat_blocks(n), dim3(kWarp, kRows), 0, stream>>>(
        dz.const_data_ptr<T>(), dh.const_data_ptr<T>(), T_.const_data_ptr<T>(), a.const_data_ptr<T>(), opt_ptr<T>(m),
        opt_ptr<T>(G0), dw1.data_ptr<T>(), dw2.data_ptr<T>(), biases ? db1.data_ptr<T>() : nullptr,
        biases ? db2.data_ptr<T>() : nullptr, d, biases);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {da, dm, dG0, dw1, db1, dw2, db2};
}

std::tuple<at::Tensor, at::Tensor> gates_spatial_fwd_cuda(const at::Tensor& mean, const at::Tensor& mx,
                                                          const std::optional<at::Tensor>& S0, const at::Tensor& w,
                                                          const std::optional<at::Tensor>& bias, int64_t width) {
  const auto d = small::spatial_fwd_dims(mean, mx, S0, w, bias, width, "gates_spatial_fwd");
  const c10::cuda::CUDAGuard guard(mean.device());
  const small::SpatialFwdOut out = small::spatial_fwd_outputs(mean, d, small::has(S0));
  at::Tensor s = out.s, gate = out.gate;
  if (mean.numel() == 0) return {s, gate};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "gates_spatial_fwd", [&] {
    using T = scalar_t;
    spatial_fwd_kernel<T><<<flat_blocks(d.B * d.P), dim3(kWarp, kRows), 0, stream>>>(
        mean.const_data_ptr<T>(), mx.const_data_ptr<T>(), opt_ptr<T>(S0), w.const_data_ptr<T>(), opt_ptr<T>(bias),
        s.data_ptr<T>(), small::has(S0) ? gate.data_ptr<T>() : nullptr, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {s, gate};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gates_spatial_bwd_cuda(
    const at::Tensor& dgate, const std::optional<at::Tensor>& S0, const at::Tensor& s, const at::Tensor& mean,
    const at::Tensor& mx, const at::Tensor& w, bool has_bias, int64_t width, double scale_mean) {
  const char* op = "gates_spatial_bwd";
  const auto d = small::spatial_bwd_dims(dgate, S0, s, mean, mx, w, width, op);
  const auto acc = mean.scalar_type();
  const c10::cuda::CUDAGuard guard(mean.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the partials' sum is this kernel's own arithmetic
  const int64_t KK = d.K * d.K, NP = 2 * KK + 1;
  const small::SpatialBwdOut grads = small::spatial_bwd_outputs(mean, d, small::has(S0));
  at::Tensor dmean = grads.dmean, dmax = grads.dmax, dS0 = grads.dS0;
  const int64_t n = d.B * d.P;
  const int64_t blocks = std::max<int64_t>(1, (n + kThreads - 1) / kThreads);
  TORCH_CHECK(blocks <= kMaxGrid, op, ": ", blocks, " thread blocks exceed the grid limit");
  auto part = at::zeros({blocks, NP}, mean.options());
  if (n > 0) {
    auto dl = at::empty({d.B, d.P}, mean.options());
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(acc, "gates_spatial_bwd", [&] {
      using T = scalar_t;
      spatial_bwd_logit_kernel<T><<<static_cast<unsigned>(blocks), dim3(kWarp, kRows), kRows * NP * sizeof(T), stream>>>(
          dgate.const_data_ptr<T>(), opt_ptr<T>(S0), s.const_data_ptr<T>(), mean.const_data_ptr<T>(),
          mx.const_data_ptr<T>(), dl.data_ptr<T>(), small::has(S0) ? dS0.data_ptr<T>() : nullptr, part.data_ptr<T>(),
          d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      spatial_bwd_input_kernel<T><<<flat_blocks(n), dim3(kWarp, kRows), 0, stream>>>(
          dl.const_data_ptr<T>(), w.const_data_ptr<T>(), opt_ptr<T>(S0), mean.const_data_ptr<T>(),
          mx.const_data_ptr<T>(), small::has(S0) ? dS0.data_ptr<T>() : nullptr, dmean.data_ptr<T>(),
          dmax.data_ptr<T>(), d, static_cast<T>(scale_mean));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const auto [dw, db] = small::spatial_weight_grads(part, w, has_bias);  // the partials in order
  return {dmean, dmax, dS0, dw, db};
}

// ---- ELAT's stencil: semantics as in csrc/gates.cpp ---------------------------------------

// ELAT's logit y (B, H·W) and, with `pool`, the H·W pool of x (mean, max, first arg-max,
// each (B, C)) taken from the same staged tiles, merged over the tiles in tile order by
// combine_stats_kernel. Without `pool` those three come back undefined.
// The logit's launch: elat_fwd_kernel for ELAT's taps, stencil_fwd_kernel for any K.
template <typename scalar_t, typename acc_t, bool POOL>
void launch_stencil_fwd(bool elat_taps, dim3 grid, dim3 block, int64_t cc, cudaStream_t stream, const scalar_t* x,
                        const acc_t* wt, acc_t* y, const StencilGeo& g, const StatOut<acc_t>& out) {
  if (elat_taps) {
    elat_fwd_kernel<scalar_t, acc_t, POOL><<<grid, block, elat_smem(cc, sizeof(acc_t)), stream>>>(x, wt, y, g, cc, out);
  } else {
    const size_t smem = (cc * (kTileH + g.K - 1) * (kTileW + g.K - 1) + cc * g.K * g.K) * sizeof(acc_t);
    stencil_fwd_kernel<scalar_t, acc_t, POOL><<<grid, block, smem, stream>>>(x, wt, y, g, cc, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stencil_forward(const at::Tensor& x, const at::Tensor& w,
                                                                           bool pool, bool elat_taps, const char* op) {
  const StencilGeo g = stencil_geo(x, w, op);
  terms::check_elat_taps(w, elat_taps, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = acc_type(x);
  const at::Tensor wt = stencil_taps(w, g, acc, op);
  auto y = at::zeros({g.B, g.H * g.W}, x.options().dtype(acc));
  at::Tensor mean, mx, idx;
  if (pool) {
    mean = at::zeros({g.B, g.C}, x.options().dtype(acc));
    mx = at::zeros({g.B, g.C}, x.options().dtype(acc));
    idx = at::zeros({g.B, g.C}, x.options().dtype(at::kLong));
  }
  if (x.numel() == 0) return {mean, mx, idx, y};
  const int64_t tiles = g.tiles_h * g.tiles_w, rows = g.B * g.C;
  StatParts parts = stat_parts(pool ? rows : 0, tiles, x, acc);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gates_stencil", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t KK = g.K * g.K;
    const int64_t cc = stencil_chunk(g, sizeof(acc_t), kMaxSmem - 8 * KK * sizeof(acc_t));
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(g.B)), block(kWarp, kRows);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* wp = wt.const_data_ptr<acc_t>();
    if (!pool) {
      launch_stencil_fwd<scalar_t, acc_t, false>(elat_taps, grid, block, cc, stream, xp, wp, y.data_ptr<acc_t>(), g,
                                                 StatOut<acc_t>{});
      return;
    }
    const StatOut<acc_t> out = stat_out<acc_t>(mean, mx, idx, parts, tiles, g.H * g.W);
    launch_stencil_fwd<scalar_t, acc_t, true>(elat_taps, grid, block, cc, stream, xp, wp, y.data_ptr<acc_t>(), g, out);
    if (tiles > 1) {
      combine_stats_kernel<acc_t><<<finish_blocks(rows * kWarp), 256, 0, stream>>>(rows, out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {mean, mx, idx, y};
}

at::Tensor gates_stencil_cuda(const at::Tensor& x, const at::Tensor& w, bool elat_taps) {
  return std::get<3>(stencil_forward(x, w, /*pool=*/false, elat_taps, "gates_stencil"));
}

// gates_pool_hw(x, None) and gates_stencil(x, w) in one read of x.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gates_pool_hw_stencil_cuda(const at::Tensor& x,
                                                                                      const at::Tensor& w,
                                                                                      bool elat_taps) {
  return stencil_forward(x, w, /*pool=*/true, elat_taps, "gates_pool_hw_stencil");
}

at::Tensor gates_stencil_grad_weight_cuda(const at::Tensor& x, const at::Tensor& gr, int64_t K, bool elat_taps) {
  const char* op = "gates_stencil_grad_weight";
  const StencilGeo g = stencil_geo(x, K, op);
  terms::check_elat_k(K, elat_taps, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto acc = acc_type(x);
  check_stencil_grad(gr, g, acc, x.device(), op);
  const int64_t KK = K * K;
  if (x.numel() == 0) return at::zeros({1, g.C, K, K}, x.options().dtype(acc));
  const at::Tensor gc = gr.contiguous();
  at::Tensor part;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gates_stencil_grad_weight", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t fit = stencil_chunk(g, sizeof(acc_t), kMaxSmem - kTileH * kTileW * sizeof(acc_t));
    const int64_t cc = std::max<int64_t>(1, std::min<int64_t>(fit, int64_t(kMaxPairs) * kThreads / KK));
    TORCH_CHECK(KK <= int64_t(kMaxPairs) * kThreads, op, ": K = ", K, " has more taps than one block holds");
    const int64_t chunks = (g.C + cc - 1) / cc, tiles = g.B * g.tiles_h * g.tiles_w;
    const int64_t groups = std::max<int64_t>(1, std::min<int64_t>(tiles, (sm_count(x) * kBlocksPerSM + chunks - 1) / chunks));
    TORCH_CHECK(chunks <= kMaxGridY, op, ": ", g.C, " channels exceed the grid limit");
    part = at::empty({groups, g.C, KK}, x.options().dtype(acc));
    const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(chunks));
    if (K == terms::kElatK) {  // the sliding-row kernel; its end-of-block merge reuses the tile's memory
      TORCH_INTERNAL_ASSERT(cc <= 8, op, ": the sliding-row kernel holds 8 channels a block (stencil_chunk)");
      const size_t tile_elems = cc * (kTileH + 6) * (kTileW + 6) + kTileH * kTileW;
      const size_t smem = std::max<size_t>(tile_elems, cc * KK * kTileH) * sizeof(acc_t);
      auto kernel = elat_taps ? stencil_grad_weight_rows_kernel<scalar_t, acc_t, 7, true>
                              : stencil_grad_weight_rows_kernel<scalar_t, acc_t, 7, false>;
      kernel<<<grid, dim3(kWarp, kRows), smem, stream>>>(x.const_data_ptr<scalar_t>(), gc.const_data_ptr<acc_t>(),
                                                        part.data_ptr<acc_t>(), g, cc, groups);
    } else {
      const size_t smem = (cc * (kTileH + g.K - 1) * (kTileW + g.K - 1) + kTileH * kTileW) * sizeof(acc_t);
      stencil_grad_weight_kernel<scalar_t, acc_t><<<grid, dim3(kWarp, kRows), smem, stream>>>(
          x.const_data_ptr<scalar_t>(), gc.const_data_ptr<acc_t>(), part.data_ptr<acc_t>(), g, cc, groups);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return part.sum(0).reshape({1, g.C, K, K});  // the groups' partials in group order
}

TORCH_LIBRARY_IMPL(disseg, CUDA, m) {
  m.impl("gates_pool_hw", &gates_pool_hw_cuda);
  m.impl("gates_pool_c", &gates_pool_c_cuda);
  m.impl("gates_apply", &gates_apply_cuda);
  m.impl("gates_pool_hw_stencil", &gates_pool_hw_stencil_cuda);
  m.impl("gates_reduce", &gates_reduce_cuda);
  m.impl("gates_grad_x", &gates_grad_x_cuda);
  m.impl("gates_channel_mlp_fwd", &gates_channel_mlp_fwd_cuda);
  m.impl("gates_channel_mlp_bwd", &gates_channel_mlp_bwd_cuda);
  m.impl("gates_spatial_fwd", &gates_spatial_fwd_cuda);
  m.impl("gates_spatial_bwd", &gates_spatial_bwd_cuda);
  m.impl("gates_stencil", &gates_stencil_cuda);
  m.impl("gates_stencil_grad_weight", &gates_stencil_grad_weight_cuda);
}

}  // namespace disseg
