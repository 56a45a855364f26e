// Contrast-driven window attention, C++ CPU kernels. See shared/spec/cdfa.md and
// disseg_kernels/ops/window_attention.py for the formulas.
//
// Layout: v, dy, y and dv are read and written channels-last, (B, H, W, C) with the
// head_dim channels of a head contiguous, so the inner loops are unit-stride over the
// channels of one head (vectorised by the compiler through `omp simd`). logits is read
// through its own strides (b, head, p) with the (s, t) block contiguous.
//
// Forward, per output pixel q and head h: the k²·k² softmax weights of the windows that
// cover q collapse onto the (2k−1)² distinct source offsets o = o_t − o_s,
//     w[o] = Σ_{s, t : o_t − o_s = o, q − o_s inside} A[q − o_s, s, t],
//     y[q] = Σ_{o : q + o inside} w[o] · v[q + o],
// i.e. 25 axpys of head_dim per pixel for k = 3 instead of 81.
// Backward (saves v and logits only; A is recomputed):
//     D[a, o]   = dy[a] · v[a + o]                       (25 dots per pixel and head)
//     dA[p,s,t] = D[p + o_s, o_t − o_s]
//     dlogits   = A ⊙ (dA − Σ_t A ⊙ dA), and lse[p, s] = log Σ_t exp(logits[p, s, t])
//     dv[r]     = Σ_{o'} w'[o'] · dy[r + o'],  w'[o'] = Σ_{s,t: o_s − o_t = o', r − o_t inside}
//                 exp(logits[r − o_t, s, t] − lse[r − o_t, s]).
// D is (B, H·W, heads, (2k−1)²) and lse (B, H·W, heads, k²): 25/81 and 9/81 of the
// logits; no (B, C·k², H·W) or (B, heads, H·W, k², head_dim) buffer exists.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace disseg {
namespace {

template <typename T>
inline void exp_inplace(T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

// exp for float, vectorised by the compiler: Cephes expf (range reduction to
// [−ln2/2, ln2/2], degree-6 polynomial, 2^n through the exponent bits), ≤ 2 ulp on
// [−87, 88]; inputs below −87 give ~1e-38 instead of 0 (only masked logits get there).
// GCC if-converts the clamps (and so vectorises the loop) only without trapping math.
template <>
__attribute__((optimize("no-trapping-math"))) inline void exp_inplace<float>(float* __restrict__ v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float x = v[i];
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    const float fn = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - fn * 0.693359375f;
    r = r + fn * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
    v[i] = p * __builtin_bit_cast(float, bits);
  }
}

template <typename T>
inline void axpy(T* __restrict__ y, const T* __restrict__ x, T a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

template <typename T>
inline T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

struct Geometry {
  int64_t B, C, H, W, heads, hd, k, r, kk, O, OO;
  int64_t sb, sh, sp;  // logits strides over (b, head, p), in elements
  Geometry(const at::Tensor& v, const at::Tensor& logits, int64_t kernel_size) {
    B = v.size(0), C = v.size(1), H = v.size(2), W = v.size(3);
    heads = logits.size(1), hd = C / heads;
    k = kernel_size, r = k / 2, kk = k * k, O = 2 * k - 1, OO = O * O;
    sb = logits.stride(0), sh = logits.stride(1), sp = logits.stride(2);
  }
  // index of the source offset (dy, dx) ∈ [−2r, 2r]² in [0, OO)
  inline int64_t off(int64_t dy, int64_t dx) const { return (dy + 2 * r) * O + (dx + 2 * r); }
};

template <typename T, int KS>
void forward_kernel(const T* v, const T* logits, T* y, const Geometry& g) {
  const int64_t H = g.H, W = g.W, C = g.C, hd = g.hd;
  const int64_t k = KS > 0 ? KS : g.k, r = k / 2, kk = k * k, O = 2 * k - 1, OO = O * O;
  auto off = [=](int64_t a, int64_t b) { return (a + 2 * r) * O + (b + 2 * r); };
  at::parallel_for(0, g.B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> e(kk * kk), w(OO);
    std::vector<int64_t> rows(kk);
    for (int64_t bq = begin; bq < end; ++bq) {
      const int64_t b = bq / H, qy = bq % H;
      for (int64_t qx = 0; qx < W; ++qx) {
        T* yq = y + ((b * H + qy) * W + qx) * C;
        for (int64_t h = 0; h < g.heads; ++h) {
          // softmax rows of the windows p = q − o_s that cover q
          int64_t n = 0;
          for (int64_t s = 0; s < kk; ++s) {
            const int64_t py = qy - (s / k - r), px = qx - (s % k - r);
            if (py < 0 || py >= H || px < 0 || px >= W) continue;
            const T* l = logits + b * g.sb + h * g.sh + (py * W + px) * g.sp + s * kk;
            T m = l[0];
            for (int64_t t = 1; t < kk; ++t) m = std::max(m, l[t]);
            for (int64_t t = 0; t < kk; ++t) e[n * kk + t] = l[t] - m;
            rows[n++] = s;
          }
          exp_inplace(e.data(), n * kk);
          std::fill(w.begin(), w.end(), T(0));
          for (int64_t i = 0; i < n; ++i) {
            const int64_t s = rows[i], sy = s / k - r, sx = s % k - r;
            const T* ei = e.data() + i * kk;
            T sum = 0;
            for (int64_t t = 0; t < kk; ++t) sum += ei[t];
            const T inv = T(1) / sum;
            for (int64_t t = 0; t < kk; ++t) w[off(t / k - r - sy, t % k - r - sx)] += ei[t] * inv;
          }
          T* out = yq + h * hd;
          std::fill(out, out + hd, T(0));
          for (int64_t dy = -2 * r; dy <= 2 * r; ++dy) {
            const int64_t sy = qy + dy;
            if (sy < 0 || sy >= H) continue;
            for (int64_t dx = -2 * r; dx <= 2 * r; ++dx) {
              const int64_t sx = qx + dx;
              if (sx < 0 || sx >= W) continue;
              axpy(out, v + ((b * H + sy) * W + sx) * C + h * hd, w[off(dy, dx)], hd);
            }
          }
        }
      }
    }
  });
}

// D[b, a, h, o] = dy[b, a, h] · v[b, a + o, h] (0 where a + o is outside).
template <typename T, int KS>
void offset_dots_kernel(const T* dy, const T* v, T* D, const Geometry& g) {
  const int64_t H = g.H, W = g.W, C = g.C, hd = g.hd;
  const int64_t k = KS > 0 ? KS : g.k, r = k / 2, O = 2 * k - 1, OO = O * O;
  auto off = [=](int64_t a, int64_t b) { return (a + 2 * r) * O + (b + 2 * r); };
  at::parallel_for(0, g.B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ba = begin; ba < end; ++ba) {
      const int64_t b = ba / H, ay = ba % H;
      for (int64_t ax = 0; ax < W; ++ax) {
        const T* dya = dy + ((b * H + ay) * W + ax) * C;
        T* Da = D + ((b * H + ay) * W + ax) * g.heads * OO;
        for (int64_t h = 0; h < g.heads; ++h) {
          T* Dh = Da + h * OO;
          for (int64_t dyo = -2 * r; dyo <= 2 * r; ++dyo) {
            const int64_t sy = ay + dyo;
            for (int64_t dxo = -2 * r; dxo <= 2 * r; ++dxo) {
              const int64_t sx = ax + dxo;
              const bool inside = sy >= 0 && sy < H && sx >= 0 && sx < W;
              Dh[off(dyo, dxo)] =
                  inside ? dot(dya + h * hd, v + ((b * H + sy) * W + sx) * C + h * hd, hd) : T(0);
            }
          }
        }
      }
    }
  });
}

// Per window p: lse of its k² rows and (if D) dlogits = A ⊙ (dA − Σ_t A ⊙ dA).
template <typename T, int KS>
void logits_grad_kernel(const T* logits, const T* D, T* dlogits, T* lse, const Geometry& g) {
  const int64_t H = g.H, W = g.W;
  const int64_t k = KS > 0 ? KS : g.k, r = k / 2, kk = k * k, O = 2 * k - 1, OO = O * O;
  auto off = [=](int64_t a, int64_t b) { return (a + 2 * r) * O + (b + 2 * r); };
  at::parallel_for(0, g.B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> e(kk * kk), m(kk);
    for (int64_t bp = begin; bp < end; ++bp) {
      const int64_t b = bp / H, py = bp % H;
      for (int64_t px = 0; px < W; ++px) {
        const int64_t p = py * W + px;
        for (int64_t h = 0; h < g.heads; ++h) {
          const T* l = logits + b * g.sb + h * g.sh + p * g.sp;
          for (int64_t s = 0; s < kk; ++s) {
            T ms = l[s * kk];
            for (int64_t t = 1; t < kk; ++t) ms = std::max(ms, l[s * kk + t]);
            m[s] = ms;
            for (int64_t t = 0; t < kk; ++t) e[s * kk + t] = l[s * kk + t] - ms;
          }
          exp_inplace(e.data(), kk * kk);
          T* lse_p = lse + ((b * H * W + p) * g.heads + h) * kk;
          T* dl = dlogits ? dlogits + b * g.sb + h * g.sh + p * g.sp : nullptr;
          for (int64_t s = 0; s < kk; ++s) {
            const T* es = e.data() + s * kk;
            T sum = 0;
            for (int64_t t = 0; t < kk; ++t) sum += es[t];
            lse_p[s] = m[s] + std::log(sum);
            if (!dl) continue;
            const int64_t sy = s / k - r, sx = s % k - r, qy = py + sy, qx = px + sx;
            T* dls = dl + s * kk;
            if (qy < 0 || qy >= H || qx < 0 || qx >= W) {  // slot s writes outside: no gradient
              std::fill(dls, dls + kk, T(0));
              continue;
            }
            const T* Dq = D + ((b * H + qy) * W + qx) * g.heads * OO + h * OO;
            const T inv = T(1) / sum;
            T gsum = 0;
            for (int64_t t = 0; t < kk; ++t) {
              const T dA = Dq[off(t / k - r - sy, t % k - r - sx)];
              dls[t] = dA;
              gsum += es[t] * inv * dA;
            }
            for (int64_t t = 0; t < kk; ++t) dls[t] = es[t] * inv * (dls[t] - gsum);
          }
        }
      }
    }
  });
}

// dv[r] = Σ_{o'} w'[o'] · dy[r + o'].
template <typename T, int KS>
void value_grad_kernel(const T* dy, const T* logits, const T* lse, T* dv, const Geometry& g) {
  const int64_t H = g.H, W = g.W, C = g.C, hd = g.hd;
  const int64_t k = KS > 0 ? KS : g.k, r = k / 2, kk = k * k, O = 2 * k - 1, OO = O * O;
  auto off = [=](int64_t a, int64_t b) { return (a + 2 * r) * O + (b + 2 * r); };
  at::parallel_for(0, g.B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> e(kk * kk), w(OO);
    std::vector<int64_t> taps(kk);
    for (int64_t br = begin; br < end; ++br) {
      const int64_t b = br / H, ry = br % H;
      for (int64_t rx = 0; rx < W; ++rx) {
        T* out_r = dv + ((b * H + ry) * W + rx) * C;
        for (int64_t h = 0; h < g.heads; ++h) {
          // the windows p = r − o_t that read r through tap t
          int64_t n = 0;
          for (int64_t t = 0; t < kk; ++t) {
            const int64_t py = ry - (t / k - r), px = rx - (t % k - r);
            if (py < 0 || py >= H || px < 0 || px >= W) continue;
            const int64_t p = py * W + px;
            const T* l = logits + b * g.sb + h * g.sh + p * g.sp + t;
            const T* lse_p = lse + ((b * H * W + p) * g.heads + h) * kk;
            for (int64_t s = 0; s < kk; ++s) e[n * kk + s] = l[s * kk] - lse_p[s];
            taps[n++] = t;
          }
          exp_inplace(e.data(), n * kk);
          std::fill(w.begin(), w.end(), T(0));
          for (int64_t i = 0; i < n; ++i) {
            const int64_t t = taps[i], ty = t / k - r, tx = t % k - r;
            for (int64_t s = 0; s < kk; ++s) w[off(s / k - r - ty, s % k - r - tx)] += e[i * kk + s];
          }
          T* out = out_r + h * hd;
          std::fill(out, out + hd, T(0));
          for (int64_t dyo = -2 * r; dyo <= 2 * r; ++dyo) {
            const int64_t qy = ry + dyo;
            if (qy < 0 || qy >= H) continue;
            for (int64_t dxo = -2 * r; dxo <= 2 * r; ++dxo) {
              const int64_t qx = rx + dxo;
              if (qx < 0 || qx >= W) continue;
              axpy(out, dy + ((b * H + qy) * W + qx) * C + h * hd, w[off(dyo, dxo)], hd);
            }
          }
        }
      }
    }
  });
}

template <typename T, int KS>
void backward_impl(const at::Tensor& dy, const at::Tensor& v, const at::Tensor& logits, at::Tensor& dv,
                   at::Tensor& dlogits, at::Tensor& lse, const Geometry& g, bool need_dv, bool need_dlogits) {
  at::Tensor D;
  if (need_dlogits) {
    D = at::empty({g.B, g.H * g.W, g.heads, g.OO}, v.options());
    offset_dots_kernel<T, KS>(dy.data_ptr<T>(), v.data_ptr<T>(), D.data_ptr<T>(), g);
  }
  logits_grad_kernel<T, KS>(logits.data_ptr<T>(), need_dlogits ? D.data_ptr<T>() : nullptr,
                            need_dlogits ? dlogits.data_ptr<T>() : nullptr, lse.data_ptr<T>(), g);
  D.reset();
  if (need_dv) value_grad_kernel<T, KS>(dy.data_ptr<T>(), logits.data_ptr<T>(), lse.data_ptr<T>(), dv.data_ptr<T>(), g);
}

void check_inputs(const at::Tensor& v, const at::Tensor& logits, int64_t kernel_size, const char* fn) {
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, fn, ": kernel_size must be odd and >= 1, got ", kernel_size);
  TORCH_CHECK(v.dim() == 4, fn, ": v must be (B, C, H, W), got ", v.sizes());
  TORCH_CHECK(v.device().is_cpu() && logits.device().is_cpu(), fn, ": expects CPU tensors");
  TORCH_CHECK(logits.scalar_type() == v.scalar_type(), fn, ": logits dtype ", logits.scalar_type(),
              " differs from v dtype ", v.scalar_type());
  const int64_t kk = kernel_size * kernel_size;
  TORCH_CHECK(logits.dim() == 5 && logits.size(0) == v.size(0) && logits.size(2) == v.size(2) * v.size(3) &&
                  logits.size(3) == kk && logits.size(4) == kk,
              fn, ": logits must be (B, heads, H*W, k*k, k*k), got ", logits.sizes(), " for v ", v.sizes());
  TORCH_CHECK(logits.size(1) >= 1 && v.size(1) % logits.size(1) == 0, fn, ": C=", v.size(1),
              " is not a multiple of heads=", logits.size(1));
}

bool is_half(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// logits itself when its (s, t) block is contiguous, else a contiguous copy
at::Tensor kernel_logits(const at::Tensor& logits, int64_t kk) {
  if (logits.stride(4) == 1 && logits.stride(3) == kk) return logits;
  return logits.contiguous();
}

at::Tensor nhwc(const at::Tensor& x) { return x.permute({0, 2, 3, 1}).contiguous(); }

}  // namespace

at::Tensor window_attention_forward_cpu(const at::Tensor& v_in, const at::Tensor& logits_in, int64_t kernel_size) {
  check_inputs(v_in, logits_in, kernel_size, "window_attention_forward");
  const bool half = is_half(v_in);
  const at::Tensor v = nhwc(half ? v_in.to(at::kFloat) : v_in);
  const at::Tensor logits = kernel_logits(half ? logits_in.to(at::kFloat) : logits_in, kernel_size * kernel_size);
  const Geometry g(v_in, logits, kernel_size);
  at::Tensor y = at::empty({g.B, g.H, g.W, g.C}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "window_attention_forward_cpu", [&] {
    if (kernel_size == 3)
      forward_kernel<scalar_t, 3>(v.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g);
    else
      forward_kernel<scalar_t, 0>(v.data_ptr<scalar_t>(), logits.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), g);
  });
  y = y.permute({0, 3, 1, 2});  // (B, C, H, W), channels-last memory
  return half ? y.to(v_in.scalar_type()) : y;
}

std::tuple<at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& v_in, const at::Tensor& logits_in, int64_t kernel_size,
    bool need_dv, bool need_dlogits) {
  check_inputs(v_in, logits_in, kernel_size, "window_attention_backward");
  TORCH_CHECK(grad_y.sizes() == v_in.sizes(), "window_attention_backward: grad_y ", grad_y.sizes(),
              " must match v ", v_in.sizes());
  const bool half = is_half(v_in);
  const at::ScalarType dt = v_in.scalar_type();
  const at::Tensor v = nhwc(half ? v_in.to(at::kFloat) : v_in);
  const at::Tensor dy = nhwc(half ? grad_y.to(at::kFloat) : grad_y.to(dt));
  const int64_t kk = kernel_size * kernel_size;
  const at::Tensor logits = kernel_logits(half ? logits_in.to(at::kFloat) : logits_in, kk);
  const Geometry g(v_in, logits, kernel_size);
  at::Tensor dv = need_dv ? at::empty({g.B, g.H, g.W, g.C}, v.options()) : at::empty({0}, v_in.options());
  at::Tensor dlogits = need_dlogits ? at::empty_like(logits) : at::empty({0}, logits_in.options());
  if (!need_dv && !need_dlogits) return {dv, dlogits};
  TORCH_CHECK(!need_dlogits || dlogits.strides() == logits.strides(),
              "window_attention_backward: internal error, dlogits strides differ from logits");
  at::Tensor lse = at::empty({g.B, g.H * g.W, g.heads, kk}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "window_attention_backward_cpu", [&] {
    if (kernel_size == 3)
      backward_impl<scalar_t, 3>(dy, v, logits, dv, dlogits, lse, g, need_dv, need_dlogits);
    else
      backward_impl<scalar_t, 0>(dy, v, logits, dv, dlogits, lse, g, need_dv, need_dlogits);
  });

  if (need_dv) {
    dv = dv.permute({0, 3, 1, 2});
    if (half) dv = dv.to(dt);
  }
  if (need_dlogits && half) dlogits = dlogits.to(dt);
  return {dv, dlogits};
}

TORCH_LIBRARY_FRAGMENT(disseg, m) {
  m.def("window_attention_forward(Tensor v, Tensor logits, int kernel_size) -> Tensor");
  m.def(
      "window_attention_backward(Tensor grad_y, Tensor v, Tensor logits, int kernel_size, bool need_dv, "
      "bool need_dlogits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(disseg, CPU, m) {
  m.impl("window_attention_forward", &window_attention_forward_cpu);
  m.impl("window_attention_backward", &window_attention_backward_cpu);
}

}  // namespace disseg
