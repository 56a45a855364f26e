// Multi-scale upsample-and-concatenate, CUDA kernels: torch.ops.disseg.multiscale_fwd /
// multiscale_bwd for CUDA tensors. The schemas are defined in csrc/multiscale.cpp and the
// semantics are those of its CPU kernels: bilinear with align_corners=True (the source
// coordinate of output row o is o·(H_i − 1)/(H_o − 1), computed in the accumulation type
// as ATen's upsample_bilinear2d does), the output in the first input's layout (NCHW or
// channels_last), the input gradients in their inputs' layouts.
//
// Forward: one thread per output element of an input's channel slice, threads of a warp on
// the output's unit-stride axis (w for NCHW, c for channels_last): each input is read once
// (its taps from cache) and the output written once, straight into its slice.
// Backward: a gather instead of the CPU's scatter (no atomics, deterministic), separable:
// one pass along W into an accumulation-type (B, C, H_o, W_i) buffer, one along H into the
// input gradient. In each, one thread per destination element sums the weighted sources
// whose taps reach it along that axis. Those are found from a candidate range ±1 around
// o ∈ [(k − 1)(out − 1)/(in − 1), (k + 1)(out − 1)/(in − 1)] and tested with the forward's
// own tap arithmetic, so rounding can never drop or add a tap. (The one-pass 2-D gather it
// replaces tested the candidate rows × columns per element: 8.1 ms of the fused_cuda
// Stage II step's 86 ms of kernels on the H200, 2026-11-27; Triton's two-pass version of
// the same gather measured 144 µs per call against its 245 µs there.) An unscaled input's
// gradient is a copy of its channel slice.
//
// Only ATen core / per-operator headers, <torch/library.h>, <cuda_runtime.h> and c10/cuda
// headers are included, as in csrc/dispersive_cuda.cu (tests/test_cuda_compile.py compiles
// this file against a CPU build of torch). Offsets are int64.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include "multiscale_args.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace disseg {
namespace {

constexpr int kWarp = 32;
constexpr int kRows = 8;  // blocks are (32, 8): 8 rows of 32 threads along the unit-stride axis
constexpr int kThreads = kWarp * kRows;
constexpr int64_t kColsPerThread = 4;  // the grid's y extent covers a row in ~4 strides
constexpr int64_t kMaxGridX = int64_t(1) << 24;
constexpr int64_t kMaxGridY = 65535;

// One axis of the resampling: output index o reads input o·scale.
template <typename acc_t>
struct Axis {
  int64_t in, out;
  acc_t scale;
};

template <typename acc_t>
Axis<acc_t> make_axis(int64_t in, int64_t out) {
  // as csrc/multiscale.cpp and ATen's area_pixel_compute_scale (align_corners=True)
  return Axis<acc_t>{in, out, out > 1 ? acc_t(in - 1) / acc_t(out - 1) : acc_t(0)};
}

// (b, c, h, w) element strides.
struct Strides {
  int64_t sB, sC, sH, sW;
};

Strides strides_of(const at::Tensor& t) { return Strides{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename acc_t>
__device__ __forceinline__ void taps(int64_t o, const Axis<acc_t>& a, int64_t& i0, int64_t& i1, acc_t& l0, acc_t& l1) {
  const acc_t src = a.scale * static_cast<acc_t>(o);
  i0 = static_cast<int64_t>(src);
  if (i0 > a.in - 1) i0 = a.in - 1;
  i1 = i0 + (i0 < a.in - 1 ? 1 : 0);
  l1 = src - static_cast<acc_t>(i0);
  l0 = acc_t(1) - l1;
}

// The weight with which output index o reaches input index k (hit: whether either tap is k;
// both taps are k at the last input index).
template <typename acc_t>
__device__ __forceinline__ acc_t tap_weight(int64_t o, int64_t k, const Axis<acc_t>& a, bool& hit) {
  int64_t i0, i1;
  acc_t l0, l1;
  taps(o, a, i0, i1, l0, l1);
  acc_t w = 0;
  hit = false;
  if (i0 == k) {
    w += l0;
    hit = true;
  }
  if (i1 == k) {
    w += l1;
    hit = true;
  }
  return w;
}

// Output indices that may have a tap on input index k (a superset; tap_weight decides).
__device__ __forceinline__ void candidates(int64_t k, int64_t in, int64_t out, int64_t& lo, int64_t& hi) {
  if (in <= 1) {
    lo = 0;
    hi = out - 1;
    return;
  }
  lo = k >= 1 ? ((k - 1) * (out - 1)) / (in - 1) - 1 : 0;
  hi = ((k + 1) * (out - 1) + (in - 2)) / (in - 1) + 1;
  lo = lo < 0 ? 0 : lo;
  hi = hi > out - 1 ? out - 1 : hi;
}

// Row r of a (B, C, H, W) map walked in rows: (b, c, h) with the inner axis w, or (b, h, w)
// with the inner axis c (C_INNER); the inner index is the caller's.
template <bool C_INNER>
__device__ __forceinline__ void decode_row(int64_t r, int64_t C, int64_t H, int64_t W, int64_t& b, int64_t& c,
                                           int64_t& h, int64_t& w) {
  if (C_INNER) {
    w = r % W;
    const int64_t q = r / W;
    h = q % H;
    b = q / H;
  } else {
    h = r % H;
    const int64_t q = r / H;
    c = q % C;
    b = q / C;
  }
}

// out[b, c, oh, ow] (c within the input's slice; `out` points at the slice's channel 0) =
// the bilinear sample of in[b, c] at (oh·scale_h, ow·scale_w). Rows: (b, c, oh) with the
// inner axis ow (NCHW output), or (b, oh, ow) with the inner axis c (channels_last).
template <typename scalar_t, typename acc_t, bool C_INNER>
__global__ void __launch_bounds__(kThreads) upsample_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                                            Strides is, Strides os, int64_t B, int64_t C,
                                                            Axis<acc_t> ah, Axis<acc_t> aw) {
  const int64_t H = ah.out, W = aw.out;
  const int64_t rows = C_INNER ? B * H * W : B * C * H;
  const int64_t inner = C_INNER ? C : W;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRows) {
    int64_t b, c = 0, oh, ow = 0;
    decode_row<C_INNER>(r, C, H, W, b, c, oh, ow);
    int64_t h0, h1;
    acc_t a0, a1;
    taps(oh, ah, h0, h1, a0, a1);
    for (int64_t i = static_cast<int64_t>(blockIdx.y) * kWarp + threadIdx.x; i < inner;
         i += static_cast<int64_t>(gridDim.y) * kWarp) {
      if (C_INNER) {
        c = i;
      } else {
        ow = i;
      }
      int64_t w0, w1;
      acc_t b0, b1;
      taps(ow, aw, w0, w1, b0, b1);
      const scalar_t* p = in + b * is.sB + c * is.sC;
      const scalar_t* r0 = p + h0 * is.sH;
      const scalar_t* r1 = p + h1 * is.sH;
      const acc_t v = a0 * (b0 * static_cast<acc_t>(r0[w0 * is.sW]) + b1 * static_cast<acc_t>(r0[w1 * is.sW])) +
                      a1 * (b0 * static_cast<acc_t>(r1[w0 * is.sW]) + b1 * static_cast<acc_t>(r1[w1 * is.sW]));
      out[b * os.sB + c * os.sC + oh * os.sH + ow * os.sW] = static_cast<scalar_t>(v);
    }
  }
}

// dst[b, c, h, w] = Σ_o weight(o → k) · src[b, c, ·, ·] along one axis: W when ALONG_W
// (k = w, the source row is h), else H (k = h, the source column is w); `ax` is that
// axis (in: dst's extent, out: src's). `src` points at the slice's channel 0. Rows: (b, c, h)
// with the inner axis w, or (b, h, w) with the inner axis c (C_INNER: channels_last, a warp
// reads and writes along c).
template <typename src_t, typename acc_t, typename out_t, bool C_INNER, bool ALONG_W>
__global__ void __launch_bounds__(kThreads) axis_grad_kernel(const src_t* __restrict__ src, out_t* __restrict__ dst,
                                                             Strides ss, Strides ds, int64_t B, int64_t C, int64_t Hd,
                                                             int64_t Wd, Axis<acc_t> ax) {
  const int64_t rows = C_INNER ? B * Hd * Wd : B * C * Hd;
  const int64_t inner = C_INNER ? C : Wd;
  const int64_t step = ALONG_W ? ss.sW : ss.sH;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.y; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kRows) {
    int64_t b, c = 0, h, w = 0;
    decode_row<C_INNER>(r, C, Hd, Wd, b, c, h, w);
    for (int64_t i = static_cast<int64_t>(blockIdx.y) * kWarp + threadIdx.x; i < inner;
         i += static_cast<int64_t>(gridDim.y) * kWarp) {
      if (C_INNER) {
        c = i;
      } else {
        w = i;
      }
      const int64_t k = ALONG_W ? w : h;
      int64_t lo, hi;
      candidates(k, ax.in, ax.out, lo, hi);
      const src_t* line = src + b * ss.sB + c * ss.sC + (ALONG_W ? h * ss.sH : w * ss.sW);
      acc_t acc = 0;
      for (int64_t o = lo; o <= hi; ++o) {
        bool hit;
        const acc_t wt = tap_weight(o, k, ax, hit);
        if (hit) acc += wt * static_cast<acc_t>(line[o * step]);
      }
      dst[b * ds.sB + c * ds.sC + h * ds.sH + w * ds.sW] = static_cast<out_t>(acc);
    }
  }
}

dim3 row_grid(int64_t rows, int64_t inner) {
  const int64_t gx = std::min<int64_t>((rows + kRows - 1) / kRows, kMaxGridX);
  const int64_t gy = std::min<int64_t>((inner + kWarp * kColsPerThread - 1) / (kWarp * kColsPerThread), kMaxGridY);
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, gx)), static_cast<unsigned>(std::max<int64_t>(1, gy)));
}

// One pass of the separable backward over dst (B, C, Hd, Wd).
template <bool ALONG_W, typename src_t, typename acc_t, typename out_t, typename Stream>
void launch_axis_grad(const src_t* src, Strides ss, out_t* dst, Strides ds, int64_t B, int64_t C, int64_t Hd,
                      int64_t Wd, Axis<acc_t> ax, bool c_inner, Stream stream) {
  const dim3 block(kWarp, kRows);
  if (c_inner) {
    axis_grad_kernel<src_t, acc_t, out_t, true, ALONG_W><<<row_grid(B * Hd * Wd, C), block, 0, stream>>>(
        src, dst, ss, ds, B, C, Hd, Wd, ax);
  } else {
    axis_grad_kernel<src_t, acc_t, out_t, false, ALONG_W><<<row_grid(B * C * Hd, Wd), block, 0, stream>>>(
        src, dst, ss, ds, B, C, Hd, Wd, ax);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor multiscale_fwd_cuda(at::TensorList tensors, at::IntArrayRef scales) {
  TORCH_CHECK(tensors.empty() || tensors[0].is_cuda(), "multiscale_fwd: tensors[0] must be a CUDA tensor, got ",
              tensors[0].device());
  const auto [B, Ctot, H, W, c_inner] = multiscale_out(tensors, scales);
  const auto& t0 = tensors[0];
  const c10::cuda::CUDAGuard guard(t0.device());
  auto out = at::empty({B, Ctot, H, W},
                       t0.options().memory_format(c_inner ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const Strides os = strides_of(out);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t0.scalar_type(), "multiscale_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* op = out.data_ptr<scalar_t>();
    int64_t c0 = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = tensors[i];
      const int64_t C = t.size(1);
      if (C > 0) {
        const auto ah = make_axis<acc_t>(t.size(2), H);
        const auto aw = make_axis<acc_t>(t.size(3), W);
        const dim3 block(kWarp, kRows);
        const scalar_t* ip = t.const_data_ptr<scalar_t>();
        scalar_t* slice = op + c0 * os.sC;
        if (c_inner) {
          upsample_kernel<scalar_t, acc_t, true><<<row_grid(B * H * W, C), block, 0, stream>>>(
              ip, slice, strides_of(t), os, B, C, ah, aw);
        } else {
          upsample_kernel<scalar_t, acc_t, false><<<row_grid(B * C * H, W), block, 0, stream>>>(
              ip, slice, strides_of(t), os, B, C, ah, aw);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      c0 += C;
    }
  });
  return out;
}

// The gradient of one input (B, C, Hi, Wi) from its channel slice [c0, c0 + C) of grad_out,
// in `like`'s dtype and memory format.
at::Tensor multiscale_bwd_cuda(const at::Tensor& grad_out, int64_t c0, int64_t C, int64_t Hi, int64_t Wi,
                               const at::Tensor& like) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.is_cuda(), "multiscale_bwd: grad_out must be a 4-d CUDA tensor, got ",
              grad_out.sizes(), " on ", grad_out.device());
  const int64_t B = grad_out.size(0), H = grad_out.size(2), W = grad_out.size(3);
  TORCH_CHECK(C >= 0 && c0 >= 0 && c0 + C <= grad_out.size(1), "multiscale_bwd: channel slice [", c0, ", ", c0 + C,
              ") outside grad_out's ", grad_out.size(1), " channels");
  TORCH_CHECK(Hi >= 0 && Wi >= 0, "multiscale_bwd: input size ", Hi, "x", Wi, " must not be negative");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto fmt = like.suggest_memory_format();
  const auto acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Written in the final dtype when it is grad_out's (the usual case), else accumulated and cast.
  const bool direct = like.scalar_type() == grad_out.scalar_type();
  const auto opts = grad_out.options().dtype(direct ? grad_out.scalar_type() : acc);
  // The strides the CPU kernel's .contiguous(fmt) of a fresh NCHW tensor gives (they differ
  // from at::empty(fmt)'s only in size-1 dimensions).
  auto gin = at::empty({B, C, Hi, Wi}, opts);
  if (!gin.is_contiguous(fmt)) gin = at::empty({B, C, Hi, Wi}, opts.memory_format(fmt));
  if (gin.numel() == 0) return direct ? gin : gin.to(like.scalar_type());
  if (Hi == H && Wi == W) {  // unscaled: align_corners=True samples every pixel exactly
    gin.copy_(grad_out.narrow(1, c0, C));
    return direct ? gin : gin.to(like.scalar_type());
  }
  const Strides gs = strides_of(grad_out), is = strides_of(gin);
  const bool c_inner = gs.sC == 1 && C > 1;  // channels_last gradient: warps read along c
  // The W pass's result, in the accumulation type and the gradient's layout.
  const auto rows = at::empty({B, C, H, Wi}, grad_out.options().dtype(acc).memory_format(
                                                 c_inner ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  const Strides rs = strides_of(rows);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "multiscale_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto ah = make_axis<acc_t>(Hi, H);
    const auto aw = make_axis<acc_t>(Wi, W);
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>() + c0 * gs.sC;
    acc_t* rp = rows.data_ptr<acc_t>();
    launch_axis_grad<true>(gp, gs, rp, rs, B, C, H, Wi, aw, c_inner, stream);
    if (direct) {
      launch_axis_grad<false>(static_cast<const acc_t*>(rp), rs, gin.data_ptr<scalar_t>(), is, B, C, Hi, Wi, ah,
                              c_inner, stream);
    } else {
      launch_axis_grad<false>(static_cast<const acc_t*>(rp), rs, gin.data_ptr<acc_t>(), is, B, C, Hi, Wi, ah, c_inner,
                              stream);
    }
  });
  return direct ? gin : gin.to(like.scalar_type());
}

TORCH_LIBRARY_IMPL(disseg, CUDA, m) {
  m.impl("multiscale_fwd", &multiscale_fwd_cuda);
  m.impl("multiscale_bwd", &multiscale_bwd_cuda);
}

}  // namespace disseg
