// Multi-scale upsample-and-concatenate, C++ CPU kernel. See shared/spec/attention.md.
//
// out = cat([up_{s_i}(x_i)], dim=1), bilinear with align_corners=True (the source
// coordinate of output row o is o·(H_i − 1)/(H_o − 1), as in ATen's upsample_bilinear2d).
// Each input is read once and each output element written once, straight into its
// channel slice; no upsampled intermediate. Inputs and output are indexed through their
// strides (NCHW or channels_last, the output in the layout of the first input).
#include "cpu_lanes.h"  // first: it sets ATen's vector width

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "multiscale_args.h"

#include <algorithm>
#include <utility>
#include <vector>

namespace disseg {
namespace {

template <typename acc_t>
struct Taps {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l0, l1;
};

template <typename acc_t>
Taps<acc_t> taps(int64_t in, int64_t out) {
  Taps<acc_t> t;
  t.i0.resize(out), t.i1.resize(out), t.l0.resize(out), t.l1.resize(out);
  const acc_t scale = out > 1 ? acc_t(in - 1) / acc_t(out - 1) : acc_t(0);
  for (int64_t o = 0; o < out; ++o) {
    const acc_t src = scale * acc_t(o);
    int64_t i0 = static_cast<int64_t>(src);
    if (i0 > in - 1) i0 = in - 1;
    const int64_t step = i0 < in - 1 ? 1 : 0;
    const acc_t l1 = src - acc_t(i0);
    t.i0[o] = i0, t.i1[o] = i0 + step, t.l0[o] = acc_t(1) - l1, t.l1[o] = l1;
  }
  return t;
}

// Unit-stride rows, in float lanes for float / bfloat16 / float16 (cpu_lanes.h: a scalar
// c10::BFloat16 or c10::Half conversion in the loop keeps it scalar, 3-5x slower than
// float), the same products in the same order as the scalar tail; double stays scalar.

// q[c] = a0·(b0·p00[c] + b1·p01[c]) + a1·(b0·p10[c] + b1·p11[c])
template <typename T, typename acc_t>
void blend4_row(T* __restrict__ q, const T* __restrict__ p00, const T* __restrict__ p01, const T* __restrict__ p10,
                const T* __restrict__ p11, acc_t a0, acc_t a1, acc_t b0, acc_t b1, int64_t n) {
  int64_t c = 0;
  if constexpr (lanes::has_lanes<T>) {
    const lanes::fvec A0(a0), A1(a1), B0(b0), B1(b1);
    for (; c + lanes::kWidth <= n; c += lanes::kWidth) {
      const lanes::fvec top = B0 * lanes::load_float(p00 + c) + B1 * lanes::load_float(p01 + c);
      const lanes::fvec bottom = B0 * lanes::load_float(p10 + c) + B1 * lanes::load_float(p11 + c);
      lanes::store_float(q + c, A0 * top + A1 * bottom);
    }
  }
  _Pragma("omp simd")
  for (int64_t k = c; k < n; ++k)
    q[k] = T(a0 * (b0 * acc_t(p00[k]) + b1 * acc_t(p01[k])) + a1 * (b0 * acc_t(p10[k]) + b1 * acc_t(p11[k])));
}

// o[i] = a0·h0[i] + a1·h1[i] (h in the accumulation type)
template <typename T, typename acc_t>
void blend2_row(T* __restrict__ o, const acc_t* __restrict__ h0, const acc_t* __restrict__ h1, acc_t a0, acc_t a1,
                int64_t n) {
  int64_t i = 0;
  if constexpr (lanes::has_lanes<T>) {
    const lanes::fvec A0(a0), A1(a1);
    for (; i + lanes::kWidth <= n; i += lanes::kWidth)
      lanes::store_float(o + i, A0 * lanes::fvec::loadu(h0 + i) + A1 * lanes::fvec::loadu(h1 + i));
  }
  _Pragma("omp simd")
  for (int64_t k = i; k < n; ++k) o[k] = T(a0 * h0[k] + a1 * h1[k]);
}

// d0[i] += k0·g[i] and d1[i] += k1·g[i] (d0, d1 disjoint rows of the accumulation type)
template <typename T, typename acc_t>
void axpy2_row(acc_t* __restrict__ d0, acc_t* __restrict__ d1, const T* __restrict__ g, acc_t k0, acc_t k1,
               int64_t n) {
  int64_t i = 0;
  if constexpr (lanes::has_lanes<T>) {
    const lanes::fvec K0(k0), K1(k1);
    for (; i + lanes::kWidth <= n; i += lanes::kWidth) {
      const lanes::fvec v = lanes::load_float(g + i);
      (lanes::fvec::loadu(d0 + i) + K0 * v).store(d0 + i);
      (lanes::fvec::loadu(d1 + i) + K1 * v).store(d1 + i);
    }
  }
  _Pragma("omp simd")
  for (int64_t k = i; k < n; ++k) {
    const acc_t v = acc_t(g[k]);
    d0[k] += k0 * v;
    d1[k] += k1 * v;
  }
}

// d[i] += k·g[i]
template <typename T, typename acc_t>
void axpy_row(acc_t* __restrict__ d, const T* __restrict__ g, acc_t k, int64_t n) {
  int64_t i = 0;
  if constexpr (lanes::has_lanes<T>) {
    const lanes::fvec K(k);
    for (; i + lanes::kWidth <= n; i += lanes::kWidth)
      (lanes::fvec::loadu(d + i) + K * lanes::load_float(g + i)).store(d + i);
  }
  _Pragma("omp simd")
  for (int64_t m = i; m < n; ++m) d[m] += k * acc_t(g[m]);
}

// o[i] = T(src[i])
template <typename T, typename acc_t>
void round_row(T* __restrict__ o, const acc_t* __restrict__ src, int64_t n) {
  int64_t i = 0;
  if constexpr (lanes::has_lanes<T>) {
    for (; i + lanes::kWidth <= n; i += lanes::kWidth) lanes::store_float(o + i, lanes::fvec::loadu(src + i));
  }
  for (; i < n; ++i) o[i] = T(src[i]);
}

}  // namespace

at::Tensor multiscale_fwd_cpu(at::TensorList tensors, at::IntArrayRef scales) {
  TORCH_CHECK(tensors.empty() || tensors[0].device().is_cpu(), "multiscale_fwd: tensors[0] must be a CPU tensor, got ",
              tensors[0].device());
  const auto [B, Ctot, H, W, channels_last] = multiscale_out(tensors, scales);
  const auto& t0 = tensors[0];
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  auto out = at::empty({B, Ctot, H, W}, t0.options().memory_format(fmt));
  const bool c_unit = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t osB = out.stride(0), osC = out.stride(1), osH = out.stride(2), osW = out.stride(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t0.scalar_type(), "multiscale_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* op = out.data_ptr<scalar_t>();
    int64_t c0 = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = tensors[i];
      const int64_t C = t.size(1), Hi = t.size(2), Wi = t.size(3);
      const int64_t sB = t.stride(0), sC = t.stride(1), sH = t.stride(2), sW = t.stride(3);
      const scalar_t* ip = t.const_data_ptr<scalar_t>();
      const auto th = taps<acc_t>(Hi, H);
      const auto tw = taps<acc_t>(Wi, W);
      scalar_t* ob = op + c0 * osC;
      if (c_unit) {
        at::parallel_for(0, B * H, 1, [&](int64_t lo, int64_t hi) {
          for (int64_t bh = lo; bh < hi; ++bh) {
            const int64_t b = bh / H, oh = bh % H;
            const acc_t a0 = th.l0[oh], a1 = th.l1[oh];
            const scalar_t* r0 = ip + b * sB + th.i0[oh] * sH;
            const scalar_t* r1 = ip + b * sB + th.i1[oh] * sH;
            for (int64_t ow = 0; ow < W; ++ow) {
              const acc_t b0 = tw.l0[ow], b1 = tw.l1[ow];
              const int64_t w0 = tw.i0[ow] * sW, w1 = tw.i1[ow] * sW;
              scalar_t* o = ob + b * osB + oh * osH + ow * osW;
              if (sC == 1) {  // channels_last input too: unit stride on both sides (vectorised)
                blend4_row(o, r0 + w0, r0 + w1, r1 + w0, r1 + w1, a0, a1, b0, b1, C);
                continue;
              }
              for (int64_t c = 0; c < C; ++c) {
                const int64_t cc = c * sC;
                o[c * osC] = scalar_t(a0 * (b0 * acc_t(r0[w0 + cc]) + b1 * acc_t(r0[w1 + cc])) +
                                      a1 * (b0 * acc_t(r1[w0 + cc]) + b1 * acc_t(r1[w1 + cc])));
              }
            }
          }
        });
      } else {
        // Separable, per (b, c) plane: the Hi input rows interpolated along W once (the
        // gathers), then each output row a blend of two of them (unit stride, vectorised);
        // the same products in the same order as the four-tap formula.
        at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
          std::vector<acc_t> hrows(Hi * W);
          for (int64_t bc = lo; bc < hi; ++bc) {
            const int64_t b = bc / C, c = bc % C;
            const scalar_t* plane = ip + b * sB + c * sC;
            for (int64_t ih = 0; ih < Hi; ++ih) {
              const scalar_t* r = plane + ih * sH;
              acc_t* h = hrows.data() + ih * W;
              for (int64_t ow = 0; ow < W; ++ow)
                h[ow] = tw.l0[ow] * acc_t(r[tw.i0[ow] * sW]) + tw.l1[ow] * acc_t(r[tw.i1[ow] * sW]);
            }
            scalar_t* o = ob + b * osB + c * osC;
            for (int64_t oh = 0; oh < H; ++oh) {
              const acc_t a0 = th.l0[oh], a1 = th.l1[oh];
              const acc_t* __restrict__ h0 = hrows.data() + th.i0[oh] * W;
              const acc_t* __restrict__ h1 = hrows.data() + th.i1[oh] * W;
              scalar_t* __restrict__ orow = o + oh * osH;
              if (osW == 1) {
                blend2_row(orow, h0, h1, a0, a1, W);
              } else {
                for (int64_t ow = 0; ow < W; ++ow) orow[ow * osW] = scalar_t(a0 * h0[ow] + a1 * h1[ow]);
              }
            }
          }
        });
      }
      c0 += C;
    }
  });
  return out;
}

// For each input index, the output indices whose two taps include it and the weight of
// that tap (an index that is both taps of one output appears twice).
template <typename acc_t>
std::vector<std::vector<std::pair<int64_t, acc_t>>> tap_lists(const Taps<acc_t>& t, int64_t in) {
  std::vector<std::vector<std::pair<int64_t, acc_t>>> lists(in);
  for (size_t o = 0; o < t.i0.size(); ++o) {
    lists[t.i0[o]].emplace_back(static_cast<int64_t>(o), t.l0[o]);
    lists[t.i1[o]].emplace_back(static_cast<int64_t>(o), t.l1[o]);
  }
  return lists;
}

// The gradient of one input from its channel slice [c0, c0 + C) of grad_out, returned in
// `like`'s dtype and layout.
// * grad_out channels_last (channel stride 1): a gather per input row (b, ih). The output
//   rows with a tap on ih add their weighted pixels into one float row of Wi·C values,
//   the channels of a pixel unit-stride (vectorised), and the row is written once.
// * otherwise: per (b, c) plane, separable (below) into a float input plane, cast once.
at::Tensor multiscale_bwd_cpu(const at::Tensor& grad_out, int64_t c0, int64_t C, int64_t Hi, int64_t Wi,
                              const at::Tensor& like) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.device().is_cpu(), "multiscale_bwd: grad_out must be a 4-d CPU tensor");
  const int64_t B = grad_out.size(0), H = grad_out.size(2), W = grad_out.size(3);
  TORCH_CHECK(c0 >= 0 && c0 + C <= grad_out.size(1), "multiscale_bwd: channel slice [", c0, ", ", c0 + C,
              ") outside grad_out's ", grad_out.size(1), " channels");
  const auto fmt = like.suggest_memory_format();
  const int64_t gsB = grad_out.stride(0), gsC = grad_out.stride(1), gsH = grad_out.stride(2), gsW = grad_out.stride(3);
  if (gsC == 1 && C > 1 && like.scalar_type() == grad_out.scalar_type()) {
    auto gin = at::empty({B, C, Hi, Wi}, like.options());  // as csrc/multiscale_cuda.cu: contiguous
    if (!gin.is_contiguous(fmt)) gin = at::empty({B, C, Hi, Wi}, like.options().memory_format(fmt));  // unless that is not fmt
    if (gin.numel() == 0) return gin;
    const int64_t isB = gin.stride(0), isC = gin.stride(1), isH = gin.stride(2), isW = gin.stride(3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "multiscale_bwd_rows", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = grad_out.const_data_ptr<scalar_t>() + c0;
      scalar_t* ip = gin.data_ptr<scalar_t>();
      const auto th = taps<acc_t>(Hi, H);
      const auto tw = taps<acc_t>(Wi, W);
      const auto rows = tap_lists(th, Hi);
      at::parallel_for(0, B * Hi, 1, [&](int64_t lo, int64_t hi) {
        std::vector<acc_t> buf(Wi * C);
        for (int64_t r = lo; r < hi; ++r) {
          const int64_t b = r / Hi, ih = r % Hi;
          std::fill(buf.begin(), buf.end(), acc_t(0));
          for (const auto& [oh, a] : rows[ih]) {
            const scalar_t* g = gp + b * gsB + oh * gsH;
            for (int64_t ow = 0; ow < W; ++ow) {
              const scalar_t* __restrict__ gv = g + ow * gsW;
              const acc_t k0 = a * tw.l0[ow], k1 = a * tw.l1[ow];
              acc_t* __restrict__ d0 = buf.data() + tw.i0[ow] * C;
              if (tw.i0[ow] == tw.i1[ow]) {
                axpy_row(d0, gv, k0 + k1, C);
              } else {
                axpy2_row(d0, buf.data() + tw.i1[ow] * C, gv, k0, k1, C);  // d1: the next pixel's C values
              }
            }
          }
          scalar_t* o = ip + b * isB + ih * isH;
          for (int64_t w = 0; w < Wi; ++w) {
            const acc_t* src = buf.data() + w * C;
            scalar_t* dst = o + w * isW;
            if (isC == 1) {
              round_row(dst, src, C);
            } else {
              for (int64_t c = 0; c < C; ++c) dst[c * isC] = scalar_t(src[c]);
            }
          }
        }
      });
    });
    return gin;
  }
  auto acc = grad_out.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto gin = at::zeros({B, C, Hi, Wi}, grad_out.options().dtype(acc));  // (B, C, Hi, Wi) accumulation planes
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "multiscale_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>() + c0 * gsC;
    acc_t* ap = gin.data_ptr<acc_t>();
    const auto th = taps<acc_t>(Hi, H);
    const auto tw = taps<acc_t>(Wi, W);
    // Separable: the output rows summed onto the input rows they tap (unit stride along W,
    // vectorised when grad_out's rows are), then each of those Hi rows spread onto the
    // input columns (the scatter, Hi·W instead of H·W·4 updates).
    at::parallel_for(0, B * C, 1, [&](int64_t lo, int64_t hi) {
      std::vector<acc_t> vrows(Hi * W);
      for (int64_t bc = lo; bc < hi; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        acc_t* plane = ap + bc * Hi * Wi;
        const scalar_t* g = gp + b * gsB + c * gsC;
        std::fill(vrows.begin(), vrows.end(), acc_t(0));
        for (int64_t oh = 0; oh < H; ++oh) {
          const scalar_t* __restrict__ grow = g + oh * gsH;
          acc_t* __restrict__ v0 = vrows.data() + th.i0[oh] * W;
          if (th.i0[oh] == th.i1[oh] || gsW != 1) {
            acc_t* v1 = vrows.data() + th.i1[oh] * W;
            const acc_t a0 = th.l0[oh], a1 = th.l1[oh];
            for (int64_t ow = 0; ow < W; ++ow) {
              const acc_t v = acc_t(grow[ow * gsW]);
              v0[ow] += a0 * v;
              v1[ow] += a1 * v;
            }
            continue;
          }
          axpy2_row(v0, vrows.data() + th.i1[oh] * W, grow, th.l0[oh], th.l1[oh], W);  // v1: another row than v0
        }
        for (int64_t ih = 0; ih < Hi; ++ih) {
          const acc_t* vr = vrows.data() + ih * W;
          acc_t* p = plane + ih * Wi;
          for (int64_t ow = 0; ow < W; ++ow) {
            p[tw.i0[ow]] += tw.l0[ow] * vr[ow];
            p[tw.i1[ow]] += tw.l1[ow] * vr[ow];
          }
        }
      }
    });
  });
  return gin.to(like.scalar_type()).contiguous(fmt);
}

TORCH_LIBRARY_FRAGMENT(disseg, m) {
  m.def("multiscale_fwd(Tensor[] tensors, int[] scales) -> Tensor");
  m.def("multiscale_bwd(Tensor grad_out, int c0, int C, int Hi, int Wi, Tensor like) -> Tensor");
}

TORCH_LIBRARY_IMPL(disseg, CPU, m) {
  m.impl("multiscale_fwd", &multiscale_fwd_cpu);
  m.impl("multiscale_bwd", &multiscale_bwd_cpu);
}

}  // namespace disseg
