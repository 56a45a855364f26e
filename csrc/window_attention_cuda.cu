// Contrast-driven window attention, CUDA kernels. Same formulas and layouts as
// csrc/window_attention.cpp (see its header): v, dy, y and dv channels-last (B, H, W, C),
// logits through its (b, head, p) strides with the (s, t) block contiguous.
//
// One warp per (batch, pixel, head). Lanes first work on the k² softmax rows (one row per
// lane) and collapse them onto the (2k−1)² source offsets in shared memory, then each lane
// owns channels (lane, lane + 32, …) of the head and sums over the offsets: reads of a
// head's channels are coalesced and no (B, C·k², H·W) or (B, heads, H·W, k², head_dim)
// buffer exists. Backward: D[a, o] = dy[a]·v[a + o] (warp reductions), then dlogits and
// the row log-sum-exp per window, then dv by the transposed gather.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace disseg {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

template <typename T>
__device__ __forceinline__ T exp_(T x);
template <>
__device__ __forceinline__ float exp_<float>(float x) { return __expf(x); }
template <>
__device__ __forceinline__ double exp_<double>(double x) { return exp(x); }

template <typename T>
__device__ __forceinline__ T log_(T x);
template <>
__device__ __forceinline__ float log_<float>(float x) { return __logf(x); }
template <>
__device__ __forceinline__ double log_<double>(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

struct Geo {
  int64_t B, C, H, W, heads, hd;
  int64_t sb, sh, sp;  // logits strides (b, head, p)
};

// y[q] = Σ_o w[o] · v[q + o],  w[o] = Σ_{s,t: o_t − o_s = o} A[q − o_s, s, t]
template <typename scalar_t, typename acc_t, int K>
__global__ void window_attention_fwd_kernel(const scalar_t* __restrict__ v, const scalar_t* __restrict__ logits,
                                            scalar_t* __restrict__ y, Geo g) {
  constexpr int R = K / 2, KK = K * K, O = 2 * K - 1, OO = O * O;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw) + threadIdx.y * (KK * KK + OO);
  acc_t* A = smem;
  acc_t* w = smem + KK * KK;
  const int lane = threadIdx.x;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  const int64_t HW = g.H * g.W;
  if (item >= g.B * HW * g.heads) return;
  const int64_t h = item % g.heads, bq = item / g.heads, b = bq / HW, q = bq % HW;
  const int64_t qy = q / g.W, qx = q % g.W;
  for (int s = lane; s < KK; s += kWarp) {
    const int64_t py = qy - (s / K - R), px = qx - (s % K - R);
    acc_t* As = A + s * KK;
    if (py < 0 || py >= g.H || px < 0 || px >= g.W) {
      for (int t = 0; t < KK; ++t) As[t] = acc_t(0);
      continue;
    }
    const scalar_t* l = logits + b * g.sb + h * g.sh + (py * g.W + px) * g.sp + s * KK;
    acc_t m = static_cast<acc_t>(l[0]);
#pragma unroll
    for (int t = 1; t < KK; ++t) m = max(m, static_cast<acc_t>(l[t]));
    acc_t sum = 0;
#pragma unroll
    for (int t = 0; t < KK; ++t) {
      As[t] = exp_<acc_t>(static_cast<acc_t>(l[t]) - m);
      sum += As[t];
    }
    const acc_t inv = acc_t(1) / sum;
#pragma unroll
    for (int t = 0; t < KK; ++t) As[t] *= inv;
  }
  __syncwarp();
  for (int o = lane; o < OO; o += kWarp) {
    const int dy = o / O - 2 * R, dx = o % O - 2 * R;
    acc_t acc = 0;
#pragma unroll
    for (int s = 0; s < KK; ++s) {
      const int ty = dy + (s / K - R), tx = dx + (s % K - R);  // o_t = o + o_s
      if (ty >= -R && ty <= R && tx >= -R && tx <= R) acc += A[s * KK + (ty + R) * K + (tx + R)];
    }
    w[o] = acc;
  }
  __syncwarp();
  for (int64_t c = lane; c < g.hd; c += kWarp) {
    acc_t acc = 0;
#pragma unroll
    for (int o = 0; o < OO; ++o) {
      const int64_t sy = qy + o / O - 2 * R, sx = qx + o % O - 2 * R;
      if (sy < 0 || sy >= g.H || sx < 0 || sx >= g.W) continue;
      acc += w[o] * static_cast<acc_t>(v[((b * g.H + sy) * g.W + sx) * g.C + h * g.hd + c]);
    }
    y[((b * g.H + qy) * g.W + qx) * g.C + h * g.hd + c] = static_cast<scalar_t>(acc);
  }
}

// D[b, a, h, o] = dy[a] · v[a + o] over the head's channels
template <typename scalar_t, typename acc_t, int K>
__global__ void offset_dots_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ v,
                                   acc_t* __restrict__ D, Geo g) {
  constexpr int R = K / 2, O = 2 * K - 1, OO = O * O;
  const int lane = threadIdx.x;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  const int64_t HW = g.H * g.W;
  if (item >= g.B * HW * g.heads) return;
  const int64_t h = item % g.heads, ba = item / g.heads, b = ba / HW, a = ba % HW;
  const int64_t ay = a / g.W, ax = a % g.W;
  acc_t* Da = D + item * OO;  // (B, HW, heads, OO) in item order
  for (int o = 0; o < OO; ++o) {
    const int64_t sy = ay + o / O - 2 * R, sx = ax + o % O - 2 * R;
    acc_t part = 0;
    if (sy >= 0 && sy < g.H && sx >= 0 && sx < g.W) {
      for (int64_t c = lane; c < g.hd; c += kWarp) {
        part += static_cast<acc_t>(dy[((b * g.H + ay) * g.W + ax) * g.C + h * g.hd + c]) *
                static_cast<acc_t>(v[((b * g.H + sy) * g.W + sx) * g.C + h * g.hd + c]);
      }
    }
    part = warp_sum(part);
    if (lane == 0) Da[o] = part;
  }
}

// per window p and slot s (one lane each): lse, and dlogits = A ⊙ (dA − Σ_t A ⊙ dA)
template <typename scalar_t, typename acc_t, int K>
__global__ void logits_grad_kernel(const scalar_t* __restrict__ logits, const acc_t* __restrict__ D,
                                   scalar_t* __restrict__ dlogits, acc_t* __restrict__ lse, Geo g) {
  constexpr int R = K / 2, KK = K * K, O = 2 * K - 1, OO = O * O;
  const int lane = threadIdx.x;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  const int64_t HW = g.H * g.W;
  if (item >= g.B * HW * g.heads) return;
  const int64_t h = item % g.heads, bp = item / g.heads, b = bp / HW, p = bp % HW;
  const int64_t py = p / g.W, px = p % g.W;
  for (int s = lane; s < KK; s += kWarp) {
    const scalar_t* l = logits + b * g.sb + h * g.sh + p * g.sp + s * KK;
    acc_t e[KK];
    acc_t m = static_cast<acc_t>(l[0]);
#pragma unroll
    for (int t = 1; t < KK; ++t) m = max(m, static_cast<acc_t>(l[t]));
    acc_t sum = 0;
#pragma unroll
    for (int t = 0; t < KK; ++t) {
      e[t] = exp_<acc_t>(static_cast<acc_t>(l[t]) - m);
      sum += e[t];
    }
    lse[item * KK + s] = m + log_<acc_t>(sum);
    if (dlogits == nullptr) continue;
    scalar_t* dl = dlogits + b * g.sb + h * g.sh + p * g.sp + s * KK;
    const int sy = s / K - R, sx = s % K - R;
    const int64_t qy = py + sy, qx = px + sx;
    if (qy < 0 || qy >= g.H || qx < 0 || qx >= g.W) {
#pragma unroll
      for (int t = 0; t < KK; ++t) dl[t] = static_cast<scalar_t>(0);
      continue;
    }
    const acc_t* Dq = D + ((b * HW + qy * g.W + qx) * g.heads + h) * OO;
    const acc_t inv = acc_t(1) / sum;
    acc_t dA[KK];
    acc_t gsum = 0;
#pragma unroll
    for (int t = 0; t < KK; ++t) {
      dA[t] = Dq[(t / K - R - sy + 2 * R) * O + (t % K - R - sx + 2 * R)];
      gsum += e[t] * inv * dA[t];
    }
#pragma unroll
    for (int t = 0; t < KK; ++t) dl[t] = static_cast<scalar_t>(e[t] * inv * (dA[t] - gsum));
  }
}

// dv[r] = Σ_o' w'[o'] · dy[r + o'],  w'[o'] = Σ_{s,t: o_s − o_t = o'} A[r − o_t, s, t]
template <typename scalar_t, typename acc_t, int K>
__global__ void value_grad_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ logits,
                                  const acc_t* __restrict__ lse, scalar_t* __restrict__ dv, Geo g) {
  constexpr int R = K / 2, KK = K * K, O = 2 * K - 1, OO = O * O;
  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw) + threadIdx.y * (KK * KK + OO);
  acc_t* A = smem;  // A[t][s]
  acc_t* w = smem + KK * KK;
  const int lane = threadIdx.x;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  const int64_t HW = g.H * g.W;
  if (item >= g.B * HW * g.heads) return;
  const int64_t h = item % g.heads, br = item / g.heads, b = br / HW, r = br % HW;
  const int64_t ry = r / g.W, rx = r % g.W;
  for (int t = lane; t < KK; t += kWarp) {
    const int64_t py = ry - (t / K - R), px = rx - (t % K - R);
    acc_t* At = A + t * KK;
    if (py < 0 || py >= g.H || px < 0 || px >= g.W) {
      for (int s = 0; s < KK; ++s) At[s] = acc_t(0);
      continue;
    }
    const int64_t p = py * g.W + px;
    const scalar_t* l = logits + b * g.sb + h * g.sh + p * g.sp + t;
    const acc_t* lse_p = lse + ((b * HW + p) * g.heads + h) * KK;
#pragma unroll
    for (int s = 0; s < KK; ++s) At[s] = exp_<acc_t>(static_cast<acc_t>(l[s * KK]) - lse_p[s]);
  }
  __syncwarp();
  for (int o = lane; o < OO; o += kWarp) {
    const int oy = o / O - 2 * R, ox = o % O - 2 * R;
    acc_t acc = 0;
#pragma unroll
    for (int t = 0; t < KK; ++t) {
      const int sy = oy + (t / K - R), sx = ox + (t % K - R);  // o_s = o' + o_t
      if (sy >= -R && sy <= R && sx >= -R && sx <= R) acc += A[t * KK + (sy + R) * K + (sx + R)];
    }
    w[o] = acc;
  }
  __syncwarp();
  for (int64_t c = lane; c < g.hd; c += kWarp) {
    acc_t acc = 0;
#pragma unroll
    for (int o = 0; o < OO; ++o) {
      const int64_t qy = ry + o / O - 2 * R, qx = rx + o % O - 2 * R;
      if (qy < 0 || qy >= g.H || qx < 0 || qx >= g.W) continue;
      acc += w[o] * static_cast<acc_t>(dy[((b * g.H + qy) * g.W + qx) * g.C + h * g.hd + c]);
    }
    dv[((b * g.H + ry) * g.W + rx) * g.C + h * g.hd + c] = static_cast<scalar_t>(acc);
  }
}

void check_cuda_inputs(const at::Tensor& v, const at::Tensor& logits, int64_t kernel_size, const char* fn) {
  TORCH_CHECK(kernel_size == 1 || kernel_size == 3 || kernel_size == 5, fn,
              ": the CUDA kernels support kernel_size 1, 3 or 5, got ", kernel_size);
  TORCH_CHECK(v.is_cuda() && logits.is_cuda(), fn, ": expects CUDA tensors");
  TORCH_CHECK(v.dim() == 4, fn, ": v must be (B, C, H, W), got ", v.sizes());
  TORCH_CHECK(logits.scalar_type() == v.scalar_type(), fn, ": logits dtype ", logits.scalar_type(),
              " differs from v dtype ", v.scalar_type());
  const int64_t kk = kernel_size * kernel_size;
  TORCH_CHECK(logits.dim() == 5 && logits.size(0) == v.size(0) && logits.size(2) == v.size(2) * v.size(3) &&
                  logits.size(3) == kk && logits.size(4) == kk,
              fn, ": logits must be (B, heads, H*W, k*k, k*k), got ", logits.sizes(), " for v ", v.sizes());
  TORCH_CHECK(logits.size(1) >= 1 && v.size(1) % logits.size(1) == 0, fn, ": C=", v.size(1),
              " is not a multiple of heads=", logits.size(1));
}

Geo make_geo(const at::Tensor& v, const at::Tensor& logits) {
  Geo g;
  g.B = v.size(0), g.C = v.size(1), g.H = v.size(2), g.W = v.size(3);
  g.heads = logits.size(1), g.hd = g.C / g.heads;
  g.sb = logits.stride(0), g.sh = logits.stride(1), g.sp = logits.stride(2);
  return g;
}

at::Tensor kernel_logits(const at::Tensor& logits, int64_t kk) {
  if (logits.stride(4) == 1 && logits.stride(3) == kk) return logits;
  return logits.contiguous();
}

at::Tensor nhwc(const at::Tensor& x) { return x.permute({0, 2, 3, 1}).contiguous(); }

template <typename acc_t>
size_t smem_bytes(int64_t k) {
  const int64_t kk = k * k, O = 2 * k - 1;
  return static_cast<size_t>(kWarpsPerBlock * (kk * kk + O * O)) * sizeof(acc_t);
}

#define DISSEG_WA_K_SWITCH(k, ...)              \
  switch (k) {                                  \
    case 1: {                                   \
      constexpr int K = 1;                      \
      __VA_ARGS__();                            \
      break;                                    \
    }                                           \
    case 3: {                                   \
      constexpr int K = 3;                      \
      __VA_ARGS__();                            \
      break;                                    \
    }                                           \
    default: {                                  \
      constexpr int K = 5;                      \
      __VA_ARGS__();                            \
      break;                                    \
    }                                           \
  }

}  // namespace

at::Tensor window_attention_forward_cuda(const at::Tensor& v_in, const at::Tensor& logits_in, int64_t kernel_size) {
  check_cuda_inputs(v_in, logits_in, kernel_size, "window_attention_forward");
  const c10::cuda::CUDAGuard guard(v_in.device());
  const at::Tensor v = nhwc(v_in);
  const at::Tensor logits = kernel_logits(logits_in, kernel_size * kernel_size);
  const Geo g = make_geo(v_in, logits);
  at::Tensor y = at::empty({g.B, g.H, g.W, g.C}, v.options());
  const int64_t items = g.B * g.H * g.W * g.heads;
  if (items > 0) {
    const dim3 block(kWarp, kWarpsPerBlock);
    const dim3 grid(static_cast<unsigned>((items + kWarpsPerBlock - 1) / kWarpsPerBlock));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "window_attention_forward_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      DISSEG_WA_K_SWITCH(kernel_size, [&] {
        window_attention_fwd_kernel<scalar_t, acc_t, K><<<grid, block, smem_bytes<acc_t>(K), stream>>>(
            v.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g);
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return y.permute({0, 3, 1, 2});
}

std::tuple<at::Tensor, at::Tensor> window_attention_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& v_in, const at::Tensor& logits_in, int64_t kernel_size,
    bool need_dv, bool need_dlogits) {
  check_cuda_inputs(v_in, logits_in, kernel_size, "window_attention_backward");
  TORCH_CHECK(grad_y.sizes() == v_in.sizes(), "window_attention_backward: grad_y ", grad_y.sizes(),
              " must match v ", v_in.sizes());
  const c10::cuda::CUDAGuard guard(v_in.device());
  const int64_t kk = kernel_size * kernel_size, O = 2 * kernel_size - 1;
  const at::Tensor v = nhwc(v_in);
  const at::Tensor dy = nhwc(grad_y.to(v_in.scalar_type()));
  const at::Tensor logits = kernel_logits(logits_in, kk);
  const Geo g = make_geo(v_in, logits);
  at::Tensor dv = need_dv ? at::empty({g.B, g.H, g.W, g.C}, v.options()) : at::empty({0}, v_in.options());
  at::Tensor dlogits = need_dlogits ? at::empty_like(logits) : at::empty({0}, logits_in.options());
  const int64_t items = g.B * g.H * g.W * g.heads;
  if ((need_dv || need_dlogits) && items > 0) {
    const at::ScalarType acc_type = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor lse = at::empty({g.B, g.H * g.W, g.heads, kk}, v.options().dtype(acc_type));
    at::Tensor D = need_dlogits ? at::empty({g.B, g.H * g.W, g.heads, O * O}, v.options().dtype(acc_type))
                                : at::empty({0}, v.options().dtype(acc_type));
    const dim3 block(kWarp, kWarpsPerBlock);
    const dim3 grid(static_cast<unsigned>((items + kWarpsPerBlock - 1) / kWarpsPerBlock));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "window_attention_backward_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      DISSEG_WA_K_SWITCH(kernel_size, [&] {
        if (need_dlogits) {
          offset_dots_kernel<scalar_t, acc_t, K><<<grid, block, 0, stream>>>(
              dy.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), D.data_ptr<acc_t>(), g);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        logits_grad_kernel<scalar_t, acc_t, K><<<grid, block, 0, stream>>>(
            logits.data_ptr<scalar_t>(), need_dlogits ? D.data_ptr<acc_t>() : nullptr,
            need_dlogits ? dlogits.data_ptr<scalar_t>() : nullptr, lse.data_ptr<acc_t>(), g);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (need_dv) {
          value_grad_kernel<scalar_t, acc_t, K><<<grid, block, smem_bytes<acc_t>(K), stream>>>(
              dy.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), dv.data_ptr<scalar_t>(), g);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  }
  if (need_dv) dv = dv.permute({0, 3, 1, 2});
  return {dv, dlogits};
}

TORCH_LIBRARY_IMPL(disseg, CUDA, m) {
  m.impl("window_attention_forward", &window_attention_forward_cuda);
  m.impl("window_attention_backward", &window_attention_backward_cuda);
}

}  // namespace disseg
