// TeLU, CUDA kernels: torch.ops.disseg.telu_fwd / telu_bwd for CUDA tensors. The schemas
// are defined in csrc/telu.cpp; the formulation is the same finite one (see its header):
// with u = e^{min(x, 20)} and e = e^{−2u} (an exponent below −80 gives exactly 0),
//   y  = x · tanh(u),          tanh(u) = (1 − e)/(1 + e)   (a series for u < 0.05)
//   y' = tanh(u) + 4 x u e / (1 + e)²
// which is finite for every finite x and tends to x and 1.
//
// Elementwise over the tensor's memory order (any dense layout: contiguous, channels_last),
// so x, y, grad and dx share one linear index. Each thread moves 16 bytes per access
// (4 floats, 8 halves/bfloat16, 2 doubles) when every pointer is 16-byte aligned, else one
// element; a grid-stride loop covers any size and a scalar tail the last n mod VEC
// elements. Arithmetic in float (double for double); indices are int64.
//
// Only ATen core / per-operator headers, <torch/library.h>, <cuda_runtime.h> and c10/cuda
// headers are included, as in csrc/dispersive_cuda.cu (tests/test_cuda_compile.py compiles
// this file against a CPU build of torch).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace disseg {
namespace {

constexpr int kThreads = 256;
constexpr int kVecBytes = 16;
// Vectors per thread the grid is sized for; the grid-stride loop covers the rest.
constexpr int64_t kVecsPerThread = 4;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

__device__ __forceinline__ float exp_any(float a) { return expf(a); }
__device__ __forceinline__ double exp_any(double a) { return exp(a); }

// e^a for a ≥ −80, else exactly 0 (as csrc/telu.cpp: identical results on both backends).
template <typename T>
__device__ __forceinline__ T exp_or_zero(T a) {
  return a < T(std::is_same<T, double>::value ? -745 : -80) ? T(0) : exp_any(a);
}

// tanh(u) for u ≥ 0 given e = e^{−2u}; the series below 0.05 avoids the cancellation in 1 − e.
template <typename T>
__device__ __forceinline__ T tanh_pos(T u, T e) {
  const T u2 = u * u;
  const T series = u * (T(1) + u2 * (T(-1.0 / 3.0) + u2 * (T(2.0 / 15.0) + u2 * T(-17.0 / 315.0))));
  return u < T(0.05) ? series : (T(1) - e) / (T(1) + e);
}

template <typename T>
__device__ __forceinline__ T telu_fwd_one(T x) {
  const T u = exp_or_zero(x < T(20) ? x : T(20));  // (a NaN x takes 20 and stays NaN through x·t)
  const T e = exp_or_zero(T(-2) * u);
  return x * tanh_pos(u, e);
}

template <typename T>
__device__ __forceinline__ T telu_bwd_one(T x) {
  const T u = exp_or_zero(x < T(20) ? x : T(20));
  const T e = exp_or_zero(T(-2) * u);
  const T d = T(1) + e;
  return tanh_pos(u, e) + x * (T(4) * (u * e)) / (d * d);  // 4·(u·e) first: 4·x overflows past 8.5e37
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// y[i] = telu(x[i]) for i < n, VEC elements per access.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) telu_fwd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                                           int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  const P* xv = reinterpret_cast<const P*>(x);
  P* yv = reinterpret_cast<P*>(y);
  for (int64_t v = tid; v < nvec; v += stride) {
    const P in = xv[v];
    P out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = static_cast<scalar_t>(telu_fwd_one<acc_t>(static_cast<acc_t>(in.v[k])));
    yv[v] = out;
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    y[i] = static_cast<scalar_t>(telu_fwd_one<acc_t>(static_cast<acc_t>(x[i])));
  }
}

// dx[i] = grad[i] · telu'(x[i]) for i < n, VEC elements per access.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads) telu_bwd_kernel(const scalar_t* __restrict__ grad,
                                                           const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                                                           int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = n / VEC;
  const P* gv = reinterpret_cast<const P*>(grad);
  const P* xv = reinterpret_cast<const P*>(x);
  P* dv = reinterpret_cast<P*>(dx);
  for (int64_t v = tid; v < nvec; v += stride) {
    const P g = gv[v];
    const P in = xv[v];
    P out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      out.v[k] = static_cast<scalar_t>(static_cast<acc_t>(g.v[k]) * telu_bwd_one<acc_t>(static_cast<acc_t>(in.v[k])));
    }
    dv[v] = out;
  }
  for (int64_t i = nvec * VEC + tid; i < n; i += stride) {
    dx[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * telu_bwd_one<acc_t>(static_cast<acc_t>(x[i])));
  }
}

bool aligned(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % kVecBytes == 0; }

unsigned blocks_for(int64_t n, int vec) {
  const int64_t vecs = (n + vec - 1) / vec;
  const int64_t per_block = kThreads * kVecsPerThread;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(kMaxBlocks, (vecs + per_block - 1) / per_block)));
}

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.is_non_overlapping_and_dense(), name, ": x must be dense (contiguous, channels_last, ...), got strides ",
              x.strides());
}

}  // namespace

at::Tensor telu_fwd_cuda(const at::Tensor& x) {
  check_x(x, "telu_fwd");
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::empty_like(x);
  TORCH_CHECK(y.strides() == x.strides(), "telu_fwd: could not allocate the output in x's layout");
  const int64_t n = x.numel();
  if (n == 0) return y;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "telu_fwd_cuda", [&] {
    constexpr int kVec = kVecBytes / static_cast<int>(sizeof(scalar_t));
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    if (aligned(xp) && aligned(yp)) {
      telu_fwd_kernel<scalar_t, kVec><<<blocks_for(n, kVec), kThreads, 0, stream>>>(xp, yp, n);
    } else {
      telu_fwd_kernel<scalar_t, 1><<<blocks_for(n, 1), kThreads, 0, stream>>>(xp, yp, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor telu_bwd_cuda(const at::Tensor& grad, const at::Tensor& x) {
  check_x(x, "telu_bwd");
  TORCH_CHECK(grad.device() == x.device(), "telu_bwd: grad must be on x's device ", x.device(), ", got ", grad.device());
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.strides() == x.strides() && grad.scalar_type() == x.scalar_type(),
              "telu_bwd: grad must match x in shape, strides and dtype; got ", grad.sizes(), " ", grad.strides(), " ",
              grad.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  auto dx = at::empty_like(x);
  TORCH_CHECK(dx.strides() == x.strides(), "telu_bwd: could not allocate dx in x's layout");
  const int64_t n = x.numel();
  if (n == 0) return dx;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "telu_bwd_cuda", [&] {
    constexpr int kVec = kVecBytes / static_cast<int>(sizeof(scalar_t));
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.data_ptr<scalar_t>();
    if (aligned(gp) && aligned(xp) && aligned(dp)) {
      telu_bwd_kernel<scalar_t, kVec><<<blocks_for(n, kVec), kThreads, 0, stream>>>(gp, xp, dp, n);
    } else {
      telu_bwd_kernel<scalar_t, 1><<<blocks_for(n, 1), kThreads, 0, stream>>>(gp, xp, dp, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

TORCH_LIBRARY_IMPL(disseg, CUDA, m) {
  m.impl("telu_fwd", &telu_fwd_cuda);
  m.impl("telu_bwd", &telu_bwd_cuda);
}

}  // namespace disseg
