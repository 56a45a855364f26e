// Attention gates, C++ CPU kernels. See shared/spec/attention.md and
// disseg_kernels/ops/gates.py (the engine that calls them).
//
// Every kernel reads x (B, C, H, W) in its own layout: NCHW-contiguous (the spatial
// index p = h*W + w has stride 1) or channels_last (the channel has stride 1); the loops
// run along the unit-stride dimension, so neither layout is copied. The small gate
// tensors are dense (B, C) or (B, P) in the accumulation type (float for float/half/
// bfloat16 inputs, double for double). A gate that is absent (nullopt) is 1.
#include "cpu_lanes.h"  // first: it sets CPU_CAPABILITY before any ATen header

#include <ATen/ATen.h>
#include <torch/library.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "gates_small.h"
#include "gates_terms.h"

namespace disseg {
namespace {

struct Geometry {
  int64_t B, C, P, sB, sC, sP;
  bool p_unit;  // NCHW-like: p has stride 1 (else the channel has stride 1)
};

Geometry geometry(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 4, name, ": x must be (B, C, H, W), got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), name, ": x must be a CPU tensor, got ", x.device());
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

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A small gate tensor: nullopt, or a (B, n) tensor of the accumulation type.
template <typename acc_t>
const acc_t* gate_ptr(const std::optional<at::Tensor>& t, int64_t B, int64_t n, at::ScalarType acc, const char* what,
                      at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->numel() == B * n, what, " must have ", B * n, " elements (B·", n, "), got shape ", t->sizes());
  TORCH_CHECK(t->scalar_type() == acc, what, " must be ", acc, ", got ", t->scalar_type());
  keep = t->contiguous();
  return keep.data_ptr<acc_t>();
}

constexpr int64_t kBlock = 512;

// The first p < n where pred(p) holds (n − 1 if none), in 64-wide chunks: a vectorised
// test per chunk, then a vectorised min-reduction over the matching indices of the chunk
// that holds it. pred recomputes what the caller's pass compared (x·gate, rounded the same
// way), so no row buffer is written. (A scalar scan from 0 cost about as much as the whole
// vectorised sum-and-max pass before it.)
template <typename Pred>
int64_t first_where(int64_t n, const Pred& pred) {
  constexpr int64_t kChunk = 64;
  for (int64_t p0 = 0; p0 < n; p0 += kChunk) {
    const int64_t e = std::min(n, p0 + kChunk);
    int hit = 0;
_Pragma("omp simd reduction(| : hit)")
    for (int64_t p = p0; p < e; ++p) hit |= static_cast<int>(pred(p));
    if (!hit) continue;
    int64_t first = e;
_Pragma("omp simd reduction(min : first)")
    for (int64_t p = p0; p < e; ++p) first = std::min(first, pred(p) ? p : e);
    return first;
  }
  return n - 1;
}

// A pool's NaN rule: a NaN is above every number (PyTorch's max pools and torch.max agree),
// at its first index (as torch.max; adaptive_max_pool2d answers the last NaN). The passes
// keep no NaN flag (one more lane array or reduction cost the channels_last lane loop its
// vectorisation: 3x): a NaN makes the row's sum NaN, and only then is the row searched for
// its first NaN (an inf − inf sum without one keeps the max).
template <typename acc_t, typename Value>
void first_nan(int64_t n, const Value& value, acc_t& best, int64_t& idx) {
  const int64_t i = first_where(n, [&](int64_t p) { const acc_t v = value(p); return v != v; });
  const acc_t v = value(i);
  if (v != v) {
    best = v;
    idx = i;
  }
}

// Mean, max and first arg-max of v[i] = x[i] · gate[i] (gate[i] = 1 without a gate) over one
// unit-stride row of n values: a vectorised sum-and-max pass, then first_where over the
// same products (first_nan when the sum is NaN). A NaN is the max, at its first index; a
// row with no value above −inf answers −inf at index 0. Both the NCHW pool over H·W and the
// channels_last pool over C are this row (long rows there, short ones here: 16 lanes of
// arg-max kept through the pass cost 2.5-4x more at C = 64, most of it in merging the
// lanes per pixel).
template <bool kGate, typename scalar_t, typename acc_t>
int64_t pool_row_with(const scalar_t* x, const acc_t* gate, int64_t n, acc_t& sum_out, acc_t& max_out) {
  const auto value = [&](int64_t i) { return kGate ? acc_t(x[i]) * gate[i] : acc_t(x[i]); };
  acc_t sum = 0, best = -std::numeric_limits<acc_t>::infinity();
_Pragma("omp simd reduction(+ : sum) reduction(max : best)")
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = value(i);
    sum += v;
    best = v > best ? v : best;
  }
  sum_out = sum;
  int64_t idx = first_where(n, [&](int64_t p) { return value(p) == best; });
  if (sum != sum) first_nan(n, value, best, idx);
  max_out = best;
  return idx;
}

// n values of x as the pools' lane loops read them: float16 widened once into buf (its
// per-element conversion is a scalar call that kept those loops scalar, 3.5-4x slower
// than bfloat16, whose widening is a shift), every other type in place.
template <typename scalar_t>
auto lane_row(const scalar_t* x, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    buf.resize(n);
    lanes::widen(x, buf.data(), n);
    return static_cast<const float*>(buf.data());
  } else {
    return x;
  }
}

template <typename scalar_t, typename acc_t>
int64_t pool_row(const scalar_t* x, const acc_t* gate, int64_t n, acc_t& sum_out, acc_t& max_out) {
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    thread_local std::vector<float> buf;
    return pool_row(lane_row(x, n, buf), gate, n, sum_out, max_out);
  }
  return gate ? pool_row_with<true>(x, gate, n, sum_out, max_out) : pool_row_with<false>(x, gate, n, sum_out, max_out);
}

}  // namespace

// Mean, max and first arg-max over p = (h, w) of y = x · S[b, p]; each (B, C). In every
// layout (and in gates_pool_c) a NaN is the max, at its first index, and a row with no
// value above −inf answers −inf at index 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gates_pool_hw_cpu(const at::Tensor& x, const std::optional<at::Tensor>& S) {
  auto g = geometry(x, "gates_pool_hw");
  auto acc = acc_type(x);
  auto mean = at::empty({g.B, g.C}, x.options().dtype(acc));
  auto mx = at::empty({g.B, g.C}, x.options().dtype(acc));
  auto idx = at::empty({g.B, g.C}, x.options().dtype(at::kLong));
  if (x.numel() == 0) return {mean.zero_(), mx.zero_(), idx.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gates_pool_hw", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor ks;
    const acc_t* sp = gate_ptr<acc_t>(S, g.B, g.P, acc, "S", ks);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* mean_p = mean.data_ptr<acc_t>();
    acc_t* max_p = mx.data_ptr<acc_t>();
    int64_t* idx_p = idx.data_ptr<int64_t>();
    const acc_t inv = acc_t(1) / acc_t(g.P);
    if (g.p_unit) {
      at::parallel_for(0, g.B * g.C, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t bc = lo; bc < hi; ++bc) {
          const int64_t b = bc / g.C, c = bc % g.C;
          acc_t sum, best;
          idx_p[bc] = pool_row(xp + b * g.sB + c * g.sC, sp ? sp + b * g.P : nullptr, g.P, sum, best);
          mean_p[bc] = sum * inv;
          max_p[bc] = best;
        }
      });
    } else {
      const int64_t nblk = (g.C + kBlock - 1) / kBlock;
      at::parallel_for(0, g.B * nblk, 1, [&](int64_t lo, int64_t hi) {
        std::vector<acc_t> sum(kBlock), best(kBlock);
        std::vector<int64_t> bi(kBlock);
        std::vector<float> buf;
        for (int64_t t = lo; t < hi; ++t) {
          const int64_t b = t / nblk, c0 = (t % nblk) * kBlock, n = std::min(kBlock, g.C - c0);
          std::fill(sum.begin(), sum.begin() + n, acc_t(0));
          std::fill(best.begin(), best.begin() + n, -std::numeric_limits<acc_t>::infinity());
          std::fill(bi.begin(), bi.begin() + n, int64_t(0));
          acc_t* su = sum.data();
          acc_t* be = best.data();
          int64_t* bx = bi.data();
          for (int64_t p = 0; p < g.P; ++p) {
            const auto* xr = lane_row(xp + b * g.sB + p * g.sP + c0, n, buf);
            const acc_t s = sp ? sp[b * g.P + p] : acc_t(1);
_Pragma("omp simd")
            for (int64_t c = 0; c < n; ++c) {
              acc_t v = acc_t(xr[c]) * s;
              su[c] += v;
              const bool gt = v > be[c];
              be[c] = gt ? v : be[c];
              bx[c] = gt ? p : bx[c];
            }
          }
          for (int64_t c = 0; c < n; ++c) {  // a row of −inf only keeps index 0, as pool_row
            if (su[c] != su[c]) {  // a NaN sum (rare): the max is the first NaN, if there is one
              const scalar_t* xc = xp + b * g.sB + (c0 + c) * g.sC;
              first_nan(g.P, [&](int64_t p) { return acc_t(xc[p * g.sP]) * (sp ? sp[b * g.P + p] : acc_t(1)); },
                        be[c], bx[c]);
            }
            mean_p[b * g.C + c0 + c] = su[c] * inv;
            max_p[b * g.C + c0 + c] = be[c];
            idx_p[b * g.C + c0 + c] = bx[c];
          }
        }
      });
    }
  });
  return {mean, mx, idx};
}

// Mean, max and first arg-max over c of y = x · G[b, c]; each (B, P).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gates_pool_c_cpu(const at::Tensor& x, const std::optional<at::Tensor>& G) {
  auto g = geometry(x, "gates_pool_c");
  auto acc = acc_type(x);
  auto mean = at::empty({g.B, g.P}, x.options().dtype(acc));
  auto mx = at::empty({g.B, g.P}, x.options().dtype(acc));
  auto idx = at::empty({g.B, g.P}, x.options().dtype(at::kLong));
  if (x.numel() == 0) return {mean.zero_(), mx.zero_(), idx.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gates_pool_c", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor kg;
    const acc_t* gp = gate_ptr<acc_t>(G, g.B, g.C, acc, "G", kg);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* mean_p = mean.data_ptr<acc_t>();
    acc_t* max_p = mx.data_ptr<acc_t>();
    int64_t* idx_p = idx.data_ptr<int64_t>();
    const acc_t inv = acc_t(1) / acc_t(g.C);
    if (g.p_unit) {
      const int64_t nblk = (g.P + kBlock - 1) / kBlock;
      at::parallel_for(0, g.B * nblk, 1, [&](int64_t lo, int64_t hi) {
        std::vector<acc_t> sum(kBlock), best(kBlock);
        std::vector<int64_t> bi(kBlock);
        std::vector<float> buf;
        for (int64_t t = lo; t < hi; ++t) {
          const int64_t b = t / nblk, p0 = (t % nblk) * kBlock, n = std::min(kBlock, g.P - p0);
          std::fill(sum.begin(), sum.begin() + n, acc_t(0));
          std::fill(best.begin(), best.begin() + n, -std::numeric_limits<acc_t>::infinity());
          std::fill(bi.begin(), bi.begin() + n, int64_t(0));
          acc_t* su = sum.data();
          acc_t* be = best.data();
          int64_t* bx = bi.data();
          for (int64_t c = 0; c < g.C; ++c) {
            const auto* xr = lane_row(xp + b * g.sB + c * g.sC + p0, n, buf);
            const acc_t w = gp ? gp[b * g.C + c] : acc_t(1);
_Pragma("omp simd")
            for (int64_t p = 0; p < n; ++p) {
              acc_t v = acc_t(xr[p]) * w;
              su[p] += v;
              const bool gt = v > be[p];
              be[p] = gt ? v : be[p];
              bx[p] = gt ? c : bx[p];
            }
          }
          for (int64_t p = 0; p < n; ++p) {  // a row of −inf only keeps index 0, as pool_row
            if (su[p] != su[p]) {  // a NaN sum (rare): the max is the first NaN, if there is one
              const scalar_t* xq = xp + b * g.sB + p0 + p;
              first_nan(g.C, [&](int64_t c) { return acc_t(xq[c * g.sC]) * (gp ? gp[b * g.C + c] : acc_t(1)); },
                        be[p], bx[p]);
            }
            mean_p[b * g.P + p0 + p] = su[p] * inv;
            max_p[b * g.P + p0 + p] = be[p];
            idx_p[b * g.P + p0 + p] = bx[p];
          }
        }
      });
    } else {
      // A pixel's C values are contiguous: one row each.
      at::parallel_for(0, g.B * g.P, 64, [&](int64_t lo, int64_t hi) {
        int64_t b = lo / g.P, p = lo % g.P;  // counters, not a division per pixel
        for (int64_t bp = lo; bp < hi; ++bp, p = (p + 1 == g.P) ? (++b, 0) : p + 1) {
          acc_t sum, best;
          idx_p[bp] = pool_row(xp + b * g.sB + p * g.sP, gp ? gp + b * g.C : nullptr, g.C, sum, best);
          mean_p[bp] = sum * inv;
          max_p[bp] = best;
        }
      });
    }
  });
  return {mean, mx, idx};
}

// out = x · G[b, c] · S[b, p], in x's dtype and layout.
at::Tensor gates_apply_cpu(const at::Tensor& x, const std::optional<at::Tensor>& G, const std::optional<at::Tensor>& S) {
  auto g = geometry(x, "gates_apply");
  auto acc = acc_type(x);
  auto out = at::empty_like(x);
  TORCH_CHECK(out.strides() == x.strides(), "gates_apply: could not allocate the output in x's layout");
  if (x.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gates_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor kg, ks;
    const acc_t* gp = gate_ptr<acc_t>(G, g.B, g.C, acc, "G", kg);
    const acc_t* sp = gate_ptr<acc_t>(S, g.B, g.P, acc, "S", ks);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    if (g.p_unit) {
      at::parallel_for(0, g.B * g.C, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t bc = lo; bc < hi; ++bc) {
          const int64_t b = bc / g.C, c = bc % g.C, off = b * g.sB + c * g.sC;
          const acc_t w = gp ? gp[bc] : acc_t(1);
          const acc_t* sr = sp ? sp + b * g.P : nullptr;
          const scalar_t* xr = xp + off;
          scalar_t* orow = op + off;
          if (sr) {
_Pragma("omp simd")
            for (int64_t p = 0; p < g.P; ++p) orow[p] = scalar_t(acc_t(xr[p]) * w * sr[p]);
          } else {
_Pragma("omp simd")
            for (int64_t p = 0; p < g.P; ++p) orow[p] = scalar_t(acc_t(xr[p]) * w);
          }
        }
      });
    } else {
      at::parallel_for(0, g.B * g.P, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t bp = lo; bp < hi; ++bp) {
          const int64_t b = bp / g.P, p = bp % g.P, off = b * g.sB + p * g.sP;
          const acc_t s = sp ? sp[bp] : acc_t(1);
          const acc_t* gr = gp ? gp + b * g.C : nullptr;
          const scalar_t* xr = xp + off;
          scalar_t* orow = op + off;
          if (gr) {
_Pragma("omp simd")
            for (int64_t c = 0; c < g.C; ++c) orow[c] = scalar_t(acc_t(xr[c]) * gr[c] * s);
          } else {
_Pragma("omp simd")
            for (int64_t c = 0; c < g.C; ++c) orow[c] = scalar_t(acc_t(xr[c]) * s);
          }
        }
      });
    }
  });
  return out;
}

// U[b, c] = Σ_p R·x·S[b, p] and V[b, p] = Σ_c R·x·G[b, c], in one read of x (and of R,
// which must have x's strides). R, G, S absent = 1. The arg-max pairs (csrc/gates_terms.h)
// add V[b, g_idx[b, c]] += g_val[b, c]·R·x[b, c, g_idx[b, c]] and U[b, s_idx[b, p]] +=
// s_val[b, p]·R·x[b, s_idx[b, p], p], in index order after the pass.
std::tuple<at::Tensor, at::Tensor> gates_reduce_cpu(const at::Tensor& x, const std::optional<at::Tensor>& R,
                                                    const std::optional<at::Tensor>& G,
                                                    const std::optional<at::Tensor>& S,
                                                    const std::optional<at::Tensor>& g_idx,
                                                    const std::optional<at::Tensor>& g_val,
                                                    const std::optional<at::Tensor>& s_idx,
                                                    const std::optional<at::Tensor>& s_val) {
  auto g = geometry(x, "gates_reduce");
  auto acc = acc_type(x);
  const bool has_r = R.has_value() && R->defined();
  if (has_r) {
    TORCH_CHECK(R->sizes() == x.sizes() && R->strides() == x.strides() && R->scalar_type() == x.scalar_type(),
                "gates_reduce: R must match x in shape, strides and dtype; got ", R->sizes(), " ", R->strides());
  }
  auto U = at::zeros({g.B, g.C}, x.options().dtype(acc));
  auto V = at::zeros({g.B, g.P}, x.options().dtype(acc));
  if (x.numel() == 0) return {U, V};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gates_reduce", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor kg, ks;
    const acc_t* gp = gate_ptr<acc_t>(G, g.B, g.C, acc, "G", kg);
    const acc_t* sp = gate_ptr<acc_t>(S, g.B, g.P, acc, "S", ks);
    std::vector<at::Tensor> keep;
    const int64_t *gi, *si;  // (lambdas cannot capture structured bindings in C++17)
    const acc_t *gv, *sv;
    std::tie(gi, gv) = terms::arg_pair<acc_t>(g_idx, g_val, g.B, g.C, acc, x.device(), "g_idx", "g_val", keep);
    std::tie(si, sv) = terms::arg_pair<acc_t>(s_idx, s_val, g.B, g.P, acc, x.device(), "s_idx", "s_val", keep);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = has_r ? R->const_data_ptr<scalar_t>() : nullptr;
    acc_t* up = U.data_ptr<acc_t>();
    acc_t* vp = V.data_ptr<acc_t>();
    // One thread per batch element keeps the (B, P) or (B, C) accumulations race-free;
    // with fewer batch elements than threads, the planes are split and merged instead.
    const int64_t nthreads = at::get_num_threads();
    const int64_t splits = std::max<int64_t>(1, std::min<int64_t>((nthreads + g.B - 1) / g.B, g.p_unit ? g.C : g.P));
    std::vector<acc_t> part_u(splits > 1 ? g.B * splits * g.C : 0), part_v(splits > 1 ? g.B * splits * g.P : 0);
    at::parallel_for(0, g.B * splits, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> xbuf, rbuf;  // float16 rows widened (lane_row)
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t b = t / splits, k = t % splits;
        acc_t* ur = splits > 1 ? part_u.data() + t * g.C : up + b * g.C;
        acc_t* vr = splits > 1 ? part_v.data() + t * g.P : vp + b * g.P;
        const acc_t* gr = gp ? gp + b * g.C : nullptr;
        const acc_t* sr = sp ? sp + b * g.P : nullptr;
        if (g.p_unit) {
          const int64_t c_lo = g.C * k / splits, c_hi = g.C * (k + 1) / splits;
          for (int64_t c = c_lo; c < c_hi; ++c) {
            const int64_t off = b * g.sB + c * g.sC;
            const auto* xr = lane_row(xp + off, g.P, xbuf);
            const auto* rr = rp ? lane_row(rp + off, g.P, rbuf) : nullptr;
            const acc_t w = gr ? gr[c] : acc_t(1);
            acc_t u = 0;
_Pragma("omp simd reduction(+ : u)")
            for (int64_t p = 0; p < g.P; ++p) {
              acc_t v = acc_t(xr[p]) * (rr ? acc_t(rr[p]) : acc_t(1));
              u += v * (sr ? sr[p] : acc_t(1));
              vr[p] += v * w;
            }
            ur[c] = u;
          }
        } else {
          const int64_t p_lo = g.P * k / splits, p_hi = g.P * (k + 1) / splits;
          for (int64_t p = p_lo; p < p_hi; ++p) {
            const int64_t off = b * g.sB + p * g.sP;
            const auto* xr = lane_row(xp + off, g.C, xbuf);
            const auto* rr = rp ? lane_row(rp + off, g.C, rbuf) : nullptr;
            const acc_t s = sr ? sr[p] : acc_t(1);
            acc_t v = 0;
_Pragma("omp simd reduction(+ : v)")
            for (int64_t c = 0; c < g.C; ++c) {
              acc_t t2 = acc_t(xr[c]) * (rr ? acc_t(rr[c]) : acc_t(1));
              v += t2 * (gr ? gr[c] : acc_t(1));
              ur[c] += t2 * s;
            }
            vr[p] = v;
          }
        }
      }
    });
    if (splits > 1) {
      for (int64_t b = 0; b < g.B; ++b) {
        for (int64_t k = 0; k < splits; ++k) {
          const acc_t* pu = part_u.data() + (b * splits + k) * g.C;
          const acc_t* pv = part_v.data() + (b * splits + k) * g.P;
          for (int64_t c = 0; c < g.C; ++c) up[b * g.C + c] += pu[c];
          for (int64_t p = 0; p < g.P; ++p) vp[b * g.P + p] += pv[p];
        }
      }
    }
    if (gi || si) {
      // R·x at (b, c, p)
      auto t_at = [&](int64_t b, int64_t c, int64_t p) {
        const int64_t off = b * g.sB + c * g.sC + p * g.sP;
        return acc_t(xp[off]) * (rp ? acc_t(rp[off]) : acc_t(1));
      };
      at::parallel_for(0, g.B, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          for (int64_t c = 0; gi && c < g.C; ++c) {
            const int64_t p = gi[b * g.C + c];
            if (p >= 0 && p < g.P) vp[b * g.P + p] += gv[b * g.C + c] * t_at(b, c, p);
          }
          for (int64_t p = 0; si && p < g.P; ++p) {
            const int64_t c = si[b * g.P + p];
            if (c >= 0 && c < g.C) up[b * g.C + c] += sv[b * g.P + p] * t_at(b, c, p);
          }
        }
      });
    }
  });
  return {U, V};
}

void add_stencil_grad_input(at::Tensor& dx, const at::Tensor& w, const at::Tensor& g, bool elat_taps, const char* op);

// dx = grad · G[b, c] · S[b, p] + each statistic's term (csrc/gates_terms.h: L·R and the
// max's share at its arg-max) + with stencil_w the input gradient of ELAT's stencil for
// its output gradient stencil_g (add_stencil_grad_input), in x's dtype and layout (grad
// must have x's strides).
at::Tensor gates_grad_x_cpu(const std::optional<at::Tensor>& grad, const at::Tensor& x,
                            const std::optional<at::Tensor>& G, const std::optional<at::Tensor>& S,
                            const c10::List<std::optional<at::Tensor>>& L,
                            const c10::List<std::optional<at::Tensor>>& R,
                            const c10::List<std::optional<at::Tensor>>& idx,
                            const c10::List<std::optional<at::Tensor>>& d, at::IntArrayRef kinds,
                            const std::optional<at::Tensor>& stencil_w, const std::optional<at::Tensor>& stencil_g,
                            bool elat_taps) {
  auto g = geometry(x, "gates_grad_x");
  const bool stencil = terms::stencil_args(stencil_w, stencil_g, elat_taps, "gates_grad_x");
  auto acc = acc_type(x);
  const bool has_grad = grad.has_value() && grad->defined();
  if (has_grad) {
    TORCH_CHECK(grad->sizes() == x.sizes() && grad->strides() == x.strides() && grad->scalar_type() == x.scalar_type(),
                "gates_grad_x: grad must match x in shape, strides and dtype; got ", grad->sizes(), " ",
                grad->strides());
  }
  auto dx = at::empty_like(x);
  TORCH_CHECK(dx.strides() == x.strides(), "gates_grad_x: could not allocate dx in x's layout");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gates_grad_x", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<at::Tensor> keep;
    const terms::Terms<acc_t> T = terms::dx_terms<acc_t>(L, R, idx, d, kinds, g.B, g.C, g.P, acc, x.device(), keep);
    if (x.numel() == 0) return;
    at::Tensor kg, ks;
    const acc_t* gp = gate_ptr<acc_t>(G, g.B, g.C, acc, "G", kg);
    const acc_t* sp = gate_ptr<acc_t>(S, g.B, g.P, acc, "S", ks);
    const scalar_t* gr_p = has_grad ? grad->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dp = dx.data_ptr<scalar_t>();
    if (g.p_unit) {
      // Row (b, c), blocks of p: the rank-1 parts along p; a max over p adds at one p of the
      // row, a max over c wherever idx[b, p] is this c.
      at::parallel_for(0, g.B * g.C, 1, [&](int64_t lo, int64_t hi) {
        std::vector<acc_t> buf(kBlock);
        acc_t* bw = buf.data();
        for (int64_t bc = lo; bc < hi; ++bc) {
          const int64_t b = bc / g.C, c = bc % g.C, off = b * g.sB + c * g.sC;
          const acc_t w = gp ? gp[bc] : acc_t(1);
          const acc_t* sr = sp ? sp + b * g.P : nullptr;
          for (int64_t p0 = 0; p0 < g.P; p0 += kBlock) {
            const int64_t n = std::min(kBlock, g.P - p0);
            if (gr_p) {
              const scalar_t* gr = gr_p + off + p0;
_Pragma("omp simd")
              for (int64_t p = 0; p < n; ++p) bw[p] = acc_t(gr[p]) * w * (sr ? sr[p0 + p] : acc_t(1));
            } else {
              std::fill(bw, bw + n, acc_t(0));
            }
            for (int k = 0; k < T.K; ++k) {
              const terms::Term<acc_t>& t = T.t[k];
              const acc_t l = t.L ? t.L[bc] : acc_t(1);
              const acc_t* rr = t.R ? t.R + b * g.P + p0 : nullptr;
              if (rr) {
_Pragma("omp simd")
                for (int64_t p = 0; p < n; ++p) bw[p] += l * rr[p];
              } else {
_Pragma("omp simd")
                for (int64_t p = 0; p < n; ++p) bw[p] += l;
              }
              if (!t.idx) continue;
              if (!t.over_c) {
                const int64_t q = t.idx[bc] - p0;
                if (q >= 0 && q < n) bw[q] += t.d[bc] * (rr ? rr[q] : acc_t(1));
              } else {
                const int64_t* ir = t.idx + b * g.P + p0;
                const acc_t* dr = t.d + b * g.P + p0;
_Pragma("omp simd")
                for (int64_t p = 0; p < n; ++p) bw[p] += ir[p] == c ? dr[p] * l : acc_t(0);
              }
            }
            scalar_t* out = dp + off + p0;
_Pragma("omp simd")
            for (int64_t p = 0; p < n; ++p) out[p] = scalar_t(bw[p]);
          }
        }
      });
    } else {
      // Row (b, p) along c: the transpose.
      at::parallel_for(0, g.B * g.P, 16, [&](int64_t lo, int64_t hi) {
        std::vector<acc_t> buf(g.C);
        acc_t* bw = buf.data();
        for (int64_t bp = lo; bp < hi; ++bp) {
          const int64_t b = bp / g.P, p = bp % g.P, off = b * g.sB + p * g.sP;
          const acc_t s = sp ? sp[bp] : acc_t(1);
          const acc_t* gr = gp ? gp + b * g.C : nullptr;
          if (gr_p) {
            const scalar_t* grr = gr_p + off;
_Pragma("omp simd")
            for (int64_t c = 0; c < g.C; ++c) bw[c] = acc_t(grr[c]) * (gr ? gr[c] : acc_t(1)) * s;
          } else {
            std::fill(bw, bw + g.C, acc_t(0));
          }
          for (int k = 0; k < T.K; ++k) {
            const terms::Term<acc_t>& t = T.t[k];
            const acc_t r = t.R ? t.R[bp] : acc_t(1);
            const acc_t* lr = t.L ? t.L + b * g.C : nullptr;
            if (lr) {
_Pragma("omp simd")
              for (int64_t c = 0; c < g.C; ++c) bw[c] += lr[c] * r;
            } else {
_Pragma("omp simd")
              for (int64_t c = 0; c < g.C; ++c) bw[c] += r;
            }
            if (!t.idx) continue;
            if (t.over_c) {
              const int64_t c = t.idx[bp];
              if (c >= 0 && c < g.C) bw[c] += t.d[bp] * (lr ? lr[c] : acc_t(1));
            } else {
              const int64_t* ir = t.idx + b * g.C;
              const acc_t* dr = t.d + b * g.C;
_Pragma("omp simd")
              for (int64_t c = 0; c < g.C; ++c) bw[c] += ir[c] == p ? dr[c] * r : acc_t(0);
            }
          }
          scalar_t* out = dp + off;
_Pragma("omp simd")
          for (int64_t c = 0; c < g.C; ++c) out[c] = scalar_t(bw[c]);
        }
      });
    }
  });
  if (stencil) add_stencil_grad_input(dx, *stencil_w, *stencil_g, elat_taps, "gates_grad_x");
  return dx;
}

// ---------------------------------------------------------------------------------------
// ELAT's spatial logit: a K×K, C→1 correlation with zero padding K/2 (K odd; ELAT's
// composite of three dilated 3×3 convolutions is K = 7), its input gradient (added into
// dx) and its weight gradient. oneDNN runs this one-output-channel shape at ~15 GFLOP/s
// here (a (4, 64, 128, 128) forward+backward: ~140 ms); these loops run along the
// unit-stride axis (w for NCHW, c for channels_last) and vectorise.
// ---------------------------------------------------------------------------------------

struct Stencil {
  int64_t B, C, H, W, K, R, sB, sC, sH, sW;
  bool c_unit;  // channels_last (c has stride 1); else w has stride 1
  std::vector<int64_t> taps;  // the taps read, t = i·K + j: all K², or ELAT's 25 (elat_taps)
};

// s.taps for elat_taps or not (csrc/gates_terms.h's elat_tap; w checked 7×7 before).
void set_taps(Stencil& s, bool elat_taps) {
  s.taps.clear();
  for (int64_t t = 0; t < s.K * s.K; ++t) {
    if (!elat_taps || terms::elat_tap(t / s.K - s.R, t % s.K - s.R)) s.taps.push_back(t);
  }
}

bool all_taps(const Stencil& s) { return static_cast<int64_t>(s.taps.size()) == s.K * s.K; }

// s.taps as an index tensor over the K² taps.
at::Tensor tap_index(const Stencil& s) { return at::tensor(s.taps, at::TensorOptions().dtype(at::kLong)); }

// w (1, C, K, K) as the read taps' (C, T) matrix in the accumulation type, contiguous.
at::Tensor tap_matrix(const at::Tensor& w, const Stencil& s, at::ScalarType acc) {
  const at::Tensor all = w[0].reshape({s.C, s.K * s.K}).to(acc);
  return all_taps(s) ? all.contiguous() : all.index_select(1, tap_index(s));
}

Stencil stencil_geometry(const at::Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu(), name, ": x must be a (B, C, H, W) CPU tensor, got ", x.sizes());
  TORCH_CHECK(K >= 1 && K % 2 == 1, name, ": the stencil size K must be odd and positive, got ", K);
  Stencil s{x.size(0), x.size(1), x.size(2), x.size(3), K, K / 2,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3), false, {}};
  set_taps(s, false);
  if (s.W == 1 || s.sW == 1) {
    s.sW = 1;
  } else {
    TORCH_CHECK(s.C == 1 || s.sC == 1, name, ": x must be contiguous or channels_last, got strides ", x.strides());
    s.c_unit = true;
    s.sC = 1;
  }
  return s;
}

// x's geometry and the stencil w's size, w checked to be (1, C, K, K).
Stencil stencil_geometry(const at::Tensor& x, const at::Tensor& w, bool elat_taps, const char* name) {
  TORCH_CHECK(w.dim() == 4 && w.size(0) == 1 && w.size(2) == w.size(3), name, ": w must be (1, C, K, K), got ",
              w.sizes());
  terms::check_elat_taps(w, elat_taps, name);
  Stencil s = stencil_geometry(x, w.size(2), name);
  TORCH_CHECK(w.size(1) == s.C, name, ": w must have C = ", s.C, " channels, got ", w.sizes());
  set_taps(s, elat_taps);
  return s;
}

// dlogit g: (B, H·W) values in the accumulation type, returned contiguous.
at::Tensor stencil_grad(const at::Tensor& g, const Stencil& s, at::ScalarType acc, const char* name) {
  TORCH_CHECK(g.numel() == s.B * s.H * s.W && g.scalar_type() == acc, name, ": g must be ", acc, " with B·H·W = ",
              s.B * s.H * s.W, " elements, got ", g.scalar_type(), " ", g.sizes());
  return g.contiguous();
}

// Output indices o of a row whose tap j (offset j − R) lands inside [0, n): [lo, hi).
inline void tap_range(int64_t j, int64_t R, int64_t n, int64_t& lo, int64_t& hi) {
  lo = std::max<int64_t>(0, R - j);
  hi = std::min<int64_t>(n, n + R - j);
}

// Rows of the stencil kernels go in bands of up to 32 per task (one GEMM each).
constexpr int64_t kStencilBand = 32;

int64_t stencil_bands(const Stencil& s) {
  return s.B * ((s.H + kStencilBand - 1) / kStencilBand);
}

// f(task, b, h0, h1) for every band [h0, h1) of every image b, in parallel. Each worker
// first sets the dispatch guard (it is thread-local): the tasks' ATen calls are this
// kernel's own arithmetic, never autograd's, even for a grad-requiring x in grad mode.
template <typename F>
void for_each_band(const Stencil& s, F&& f) {
  const int64_t per_image = (s.H + kStencilBand - 1) / kStencilBand;
  at::parallel_for(0, stencil_bands(s), 1, [&](int64_t t0, int64_t t1) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h0 = (t % per_image) * kStencilBand;
      f(t, t / per_image, h0, std::min<int64_t>(s.H, h0 + kStencilBand));
    }
  });
}

// One image's input rows [r0, r1) of x as a (C, rows·W) matrix view (both layouts; no copy).
at::Tensor stencil_rows(const at::Tensor& x, const Stencil& s, int64_t b, int64_t r0, int64_t r1) {
  const at::Tensor xb = x[b];
  return s.c_unit ? xb.permute({1, 2, 0}).narrow(0, r0, r1 - r0).reshape({(r1 - r0) * s.W, s.C}).t()
                  : xb.narrow(1, r0, r1 - r0).reshape({s.C, (r1 - r0) * s.W});
}

// y[b, h, w] = Σ_c Σ_ij w[c, i, j] · x[b, c, h + i − R, w + j − R], as (B, H·W) in the
// accumulation type. Per band of output rows of one image, one GEMM gives every tap's channel
// sum at every input pixel the band reads, D = W_taps (K², C) @ X_rows (C, rows·W) (x's rows
// are a strided view in both layouts: no copy unless x is bf16/fp16), then each output row
// adds its K² taps' shifted rows of D with unit stride. The band's R halo rows on each side
// are computed twice (bands of 32 rows: 1.19x the GEMM's work at K = 7). Against the
// per-tap loops it replaced (this op alone, min of 7, the 2-core AVX-512 CPU, 2026-11-27):
// (4, 64, 128, 128) NCHW 7.7 → 2.9 ms, channels_last 15.7 → 3.4 ms (C = 64 made its
// per-pixel channel loops too short); (8, 64, 64, 64) 10.5 → 1.5 and 7.6 → 1.6 ms;
// (4, 256, 32, 32) 9.2 → 0.66 and 2.7 → 0.72 ms: about 150 GFLOP/s.
at::Tensor gates_stencil_cpu(const at::Tensor& x, const at::Tensor& w, bool elat_taps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the GEMMs are this kernel's own arithmetic
  const Stencil s = stencil_geometry(x, w, elat_taps, "gates_stencil");
  const auto acc = acc_type(x);
  auto y = at::zeros({s.B, s.H * s.W}, x.options().dtype(acc));
  if (y.numel() == 0 || s.C == 0) return y;
  const int64_t K = s.K, R = s.R, H = s.H, W = s.W;
  const at::Tensor taps = tap_matrix(w, s, acc).t().contiguous();  // (T, C)
  AT_DISPATCH_FLOATING_TYPES(acc, "gates_stencil", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    for_each_band(s, [&](int64_t, int64_t b, int64_t h0, int64_t h1) {
      const int64_t r0 = std::max<int64_t>(0, h0 - R), r1 = std::min<int64_t>(H, h1 + R), n = (r1 - r0) * W;
      at::Tensor rows = stencil_rows(x, s, b, r0, r1);
      if (rows.scalar_type() != acc) rows = rows.to(acc);
      const at::Tensor d = at::mm(taps, rows);  // (T, rows·W), contiguous
      const scalar_t* dp = d.const_data_ptr<scalar_t>();
      for (int64_t h = h0; h < h1; ++h) {
        scalar_t* out = yp + (b * H + h) * W;
        for (size_t k = 0; k < s.taps.size(); ++k) {
          const int64_t i = s.taps[k] / K, j = s.taps[k] % K, hh = h + i - R;
          if (hh < 0 || hh >= H) continue;
          const scalar_t* row = dp + static_cast<int64_t>(k) * n + (hh - r0) * W;
          const int64_t shift = j - R;
          int64_t lo, hi;
          tap_range(j, R, W, lo, hi);
_Pragma("omp simd")
          for (int64_t o = lo; o < hi; ++o) out[o] += row[o + shift];
        }
      }
    });
  });
  return y;
}

// The backward's shifted gradient for one image's input rows [r0, r1): (T, rows·W) in the
// accumulation type, entry (k, (hh − r0)·W + ww) = g[b, hh − i + R, ww − j + R] for the k-th
// read tap s.taps[k] = i·K + j,
// the gradient of the output pixel whose tap t reads input pixel (hh, ww) (0 where that
// pixel is outside the map). Both weight and input gradients are GEMMs with it.
template <typename acc_t>
at::Tensor shifted_grad(const acc_t* gp, const Stencil& s, int64_t b, int64_t r0, int64_t r1,
                        const at::TensorOptions& opts) {
  const int64_t K = s.K, R = s.R, H = s.H, W = s.W, n = (r1 - r0) * W;
  auto gs = at::empty({static_cast<int64_t>(s.taps.size()), n}, opts);
  acc_t* out = gs.data_ptr<acc_t>();
  for (size_t k = 0; k < s.taps.size(); ++k) {
    const int64_t i = s.taps[k] / K, j = s.taps[k] % K;
    acc_t* row = out + static_cast<int64_t>(k) * n;
    int64_t lo, hi;  // input columns ww whose output column ww − j + R is inside
    tap_range(K - 1 - j, R, W, lo, hi);
    for (int64_t hh = r0; hh < r1; ++hh) {
      acc_t* dst = row + (hh - r0) * W;
      const int64_t h = hh - i + R;
      if (h < 0 || h >= H || lo >= hi) {
        std::fill(dst, dst + W, acc_t(0));
        continue;
      }
      const acc_t* grow = gp + (b * H + h) * W;  // dst[ww] = grow[ww − j + R]
      std::fill(dst, dst + lo, acc_t(0));
      std::copy(grow + (lo - j + R), grow + (hi - j + R), dst + lo);
      std::fill(dst + hi, dst + W, acc_t(0));
    }
  }
  return gs;
}


// dx[b, c, h, w] += Σ_ij w[c, i, j] · g[b, h − i + R, w − j + R] (g: (B, H·W), the
// accumulation type; dx: x's layout and dtype, updated in place, one rounding): gates_grad_x's
// stencil term (with elat_taps, only ELAT's 25 taps read). Per band of input rows of one
// image: (C, T) @ shifted_grad (T, rows·W), added into dx's rows. A second
// pass over dx on the CPU; the CUDA kernel adds it in the map's own pass.
void add_stencil_grad_input(at::Tensor& dx, const at::Tensor& w, const at::Tensor& g, bool elat_taps, const char* op) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the GEMMs are this kernel's own arithmetic
  const Stencil s = stencil_geometry(dx, w, elat_taps, op);
  const auto acc = acc_type(dx);
  const at::Tensor gc = stencil_grad(g, s, acc, op);
  if (dx.numel() == 0) return;
  const at::Tensor taps = tap_matrix(w, s, acc);  // (C, T)
  AT_DISPATCH_FLOATING_TYPES(acc, "gates_grad_x", [&] {
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    for_each_band(s, [&](int64_t, int64_t b, int64_t r0, int64_t r1) {
      const at::Tensor gs = shifted_grad(gp, s, b, r0, r1, gc.options());
      at::Tensor rows = stencil_rows(dx, s, b, r0, r1);  // a view of dx: added in place
      if (s.c_unit) {
        rows.t().add_(at::mm(gs.t(), taps.t()));  // (rows·W, C), dx's contiguous order
      } else {
        rows.add_(at::mm(taps, gs));
      }
    });
  });
}

// dw[0, c, i, j] = Σ_b Σ_hw x[b, c, h + i − R, w + j − R] · g[b, h, w], in the accumulation
// type: per band of input rows of one image, (C, rows·W) @ shifted_grad (T, rows·W)ᵀ, the
// bands' (C, T) partial sums added in a fixed order (deterministic for a given shape). With
// elat_taps only ELAT's 25 taps are computed; the other 24 are returned as 0.
// With the input gradient's GEMM, the ELAT module's backward went 29.1 → 13.8 ms at
// (4, 64, 128, 128) NCHW, fwd+bwd 34.9 → 7.4 ms at (8, 64, 64, 64), channels_last 56.7 →
// 15.2 ms (benchmarks/results/gates_cpu_2026-11-27*stencil_gemm.md, before: *_before_*).
at::Tensor gates_stencil_grad_weight_cpu(const at::Tensor& x, const at::Tensor& g, int64_t K, bool elat_taps) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the GEMMs are this kernel's own arithmetic
  const char* op = "gates_stencil_grad_weight";
  Stencil s = stencil_geometry(x, K, op);
  terms::check_elat_k(K, elat_taps, op);
  set_taps(s, elat_taps);
  const auto acc = acc_type(x);
  const at::Tensor gc = stencil_grad(g, s, acc, op);
  const int64_t T = static_cast<int64_t>(s.taps.size());
  if (x.numel() == 0) return at::zeros({1, s.C, K, K}, x.options().dtype(acc));
  auto parts = at::empty({stencil_bands(s), s.C, T}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "gates_stencil_grad_weight", [&] {
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    for_each_band(s, [&](int64_t t, int64_t b, int64_t r0, int64_t r1) {
      const at::Tensor gs = shifted_grad(gp, s, b, r0, r1, gc.options());
      at::Tensor rows = stencil_rows(x, s, b, r0, r1);
      if (rows.scalar_type() != acc) rows = rows.to(acc);
      at::Tensor part = parts[t];
      at::mm_out(part, rows, gs.t());
    });
  });
  const at::Tensor dw = parts.sum(0);  // (C, T)
  if (all_taps(s)) return dw.reshape({1, s.C, K, K});
  auto full = at::zeros({s.C, K * K}, dw.options());  // the taps not read: 0
  full.index_copy_(1, tap_index(s), dw);
  return full.reshape({1, s.C, K, K});
}

// ---------------------------------------------------------------------------------------
// The small programs (csrc/gates_small.h): the channel gate's MLP and the spatial gate's
// 2→1 k×k convolution, forward and backward, on the (B, C) and (B, H·W) statistics. Every
// sum runs in a fixed order (per-image partials added in image order): deterministic.
// ---------------------------------------------------------------------------------------
namespace {

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  T lanes[Vec::size()];
  acc.store(lanes);
  T s = T(0);
  for (int k = 0; k < Vec::size(); ++k) s += lanes[k];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return small::has(t) ? t->const_data_ptr<T>() : nullptr;
}

}  // namespace

// The channel gate's MLP forward: (H, T, U, TH, g, gate), rows [a; m] (B of them without
// m); U = e^min(H, 20) and TH = tanh(U) for TeLU (empty for ReLU), gate = G0·g (empty
// without G0).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gates_channel_mlp_fwd_cpu(
    const at::Tensor& a, const std::optional<at::Tensor>& m, const std::optional<at::Tensor>& G0, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const at::Tensor& w2, const std::optional<at::Tensor>& b2, bool telu) {
  const auto d = small::mlp_dims(a, m, G0, w1, b1, w2, b2, "gates_channel_mlp_fwd");
  const small::MlpOut o = small::mlp_outputs(a, d, telu, small::has(G0));
  at::Tensor H = o.H, T_ = o.T, U = o.U, TH = o.TH, g = o.g, gate = o.gate;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gates_channel_mlp_fwd", [&] {
    using T = scalar_t;
    const T *ap = a.const_data_ptr<T>(), *mp = opt_ptr<T>(m), *g0 = opt_ptr<T>(G0);
    const T *w1p = w1.const_data_ptr<T>(), *w2p = w2.const_data_ptr<T>(), *b1p = opt_ptr<T>(b1), *b2p = opt_ptr<T>(b2);
    T *hp = H.data_ptr<T>(), *tp = T_.data_ptr<T>(), *gp = g.data_ptr<T>();
    T *up = telu ? U.data_ptr<T>() : nullptr, *thp = telu ? TH.data_ptr<T>() : nullptr;
    T* gatep = g0 ? gate.data_ptr<T>() : nullptr;
    at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1_) {
      std::vector<T> A(d.C), tsum(d.HID);
      for (int64_t b = b0; b < b1_; ++b) {
        std::fill(tsum.begin(), tsum.end(), T(0));
        for (int64_t k = 0; k < (d.pair ? 2 : 1); ++k) {
          const T* src = (k == 0 ? ap : mp) + b * d.C;
          for (int64_t c = 0; c < d.C; ++c) A[c] = g0 ? src[c] * g0[b * d.C + c] : src[c];
          const int64_t r = k * d.B + b;
          for (int64_t h = 0; h < d.HID; ++h) {
            const T hv = dot(w1p + h * d.C, A.data(), d.C) + (b1p ? b1p[h] : T(0));
            T u, th;
            const T t = small::mlp_act(hv, telu, u, th);
            hp[r * d.HID + h] = hv;
            tp[r * d.HID + h] = t;
            if (telu) {
              up[r * d.HID + h] = u;
              thp[r * d.HID + h] = th;
            }
            tsum[h] += t;
          }
        }
        for (int64_t c = 0; c < d.C; ++c) {
          T z = dot(w2p + c * d.HID, tsum.data(), d.HID);
          if (b2p) z += (d.pair ? T(2) : T(1)) * b2p[c];
          const T gv = small::sigmoid(z);
          gp[b * d.C + c] = gv;
          if (g0) gatep[b * d.C + c] = g0[b * d.C + c] * gv;
        }
      }
    });
  });
  return {H, T_, U, TH, g, gate};
}

// Backward of gates_channel_mlp_fwd for the gradient of its gate: (da, dm, dG0, dw1, db1,
// dw2, db2), da multiplied by scale_a; dm empty without m, dG0 without G0, db1/db2
// without biases.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gates_channel_mlp_bwd_cpu(const at::Tensor& dgate, const at::Tensor& a, const std::optional<at::Tensor>& m,
                          const std::optional<at::Tensor>& G0, const at::Tensor& H, const at::Tensor& T_,
                          const std::optional<at::Tensor>& U, const std::optional<at::Tensor>& TH, const at::Tensor& g,
                          const at::Tensor& w1, const at::Tensor& w2, bool telu, bool biases, double scale_a) {
  const auto d = small::mlp_bwd_dims(dgate, a, m, G0, H, T_, U, TH, g, w1, w2, telu, "gates_channel_mlp_bwd");
  const int64_t rows = d.pair ? 2 * d.B : d.B;
  const small::MlpGrads r = small::mlp_grads(a, d, small::has(G0), biases, /*zero_weights=*/true);
  at::Tensor da = r.da, dm = r.dm, dG0 = r.dG0, dw1 = r.dw1, db1 = r.db1, dw2 = r.dw2, db2 = r.db2;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "gates_channel_mlp_bwd", [&] {
    using T = scalar_t;
    const T *ap = a.const_data_ptr<T>(), *mp = opt_ptr<T>(m), *g0 = opt_ptr<T>(G0), *dgp = dgate.const_data_ptr<T>();
    const T *hp = H.const_data_ptr<T>(), *tp = T_.const_data_ptr<T>(), *gp = g.const_data_ptr<T>();
    const T *up = telu ? U->const_data_ptr<T>() : nullptr, *thp = telu ? TH->const_data_ptr<T>() : nullptr;
    const T *w1p = w1.const_data_ptr<T>(), *w2p = w2.const_data_ptr<T>();
    T *dap = da.data_ptr<T>(), *dmp = d.pair ? dm.data_ptr<T>() : nullptr, *dg0p = g0 ? dG0.data_ptr<T>() : nullptr;
    T *dw1p = dw1.data_ptr<T>(), *dw2p = dw2.data_ptr<T>();
    T *db1p = biases ? db1.data_ptr<T>() : nullptr, *db2p = biases ? db2.data_ptr<T>() : nullptr;
    // Per image: dz = σ'·dgate·G0, dT = W2ᵀ·dz (both rows), dH = dT·act'(H), and the
    // statistics' gradients dA = W1ᵀ·dH.
    std::vector<T> dz(d.B * d.C), dh(rows * d.HID);
    at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1_) {
      std::vector<T> dt(d.HID), dA(d.C);
      for (int64_t b = b0; b < b1_; ++b) {
        std::fill(dt.begin(), dt.end(), T(0));
        for (int64_t c = 0; c < d.C; ++c) {
          const int64_t q = b * d.C + c;
          const T dg = g0 ? dgp[q] * g0[q] : dgp[q];
          const T z = dg * gp[q] * (T(1) - gp[q]);
          dz[q] = z;
          const T* w2r = w2p + c * d.HID;
          for (int64_t h = 0; h < d.HID; ++h) dt[h] += w2r[h] * z;
        }
        for (int64_t k = 0; k < (d.pair ? 2 : 1); ++k) {
          const int64_t r = k * d.B + b;
          for (int64_t h = 0; h < d.HID; ++h) {
            const int64_t q = r * d.HID + h;
            dh[q] = small::mlp_act_grad(dt[h], hp[q], telu ? up[q] : T(0), telu ? thp[q] : T(0), telu);
          }
          std::fill(dA.begin(), dA.end(), T(0));
          for (int64_t h = 0; h < d.HID; ++h) {
            const T v = dh[r * d.HID + h];
            const T* w1r = w1p + h * d.C;
            for (int64_t c = 0; c < d.C; ++c) dA[c] += v * w1r[c];
          }
          T* out = k == 0 ? dap : dmp;
          for (int64_t c = 0; c < d.C; ++c) {
            const int64_t q = b * d.C + c;
            const T raw = (k == 0 ? ap : mp)[q];
            if (g0) {
              if (k == 0) dg0p[q] = dgp[q] * gp[q];
              dg0p[q] += dA[c] * raw;
              out[q] = dA[c] * g0[q];
            } else {
              out[q] = dA[c];
            }
            if (k == 0) out[q] *= static_cast<T>(scale_a);
          }
        }
      }
    });
    // The weight gradients, summed over the images in order.
    std::vector<T> A(d.C), tsum(d.HID);
    for (int64_t b = 0; b < d.B; ++b) {
      for (int64_t h = 0; h < d.HID; ++h) tsum[h] = tp[b * d.HID + h] + (d.pair ? tp[(d.B + b) * d.HID + h] : T(0));
      for (int64_t c = 0; c < d.C; ++c) {
        const T z = dz[b * d.C + c];
        T* row = dw2p + c * d.HID;
        for (int64_t h = 0; h < d.HID; ++h) row[h] += z * tsum[h];
        if (biases) db2p[c] += d.pair ? T(2) * z : z;
      }
      for (int64_t k = 0; k < (d.pair ? 2 : 1); ++k) {
        const T* src = (k == 0 ? ap : mp) + b * d.C;
        for (int64_t c = 0; c < d.C; ++c) A[c] = g0 ? src[c] * g0[b * d.C + c] : src[c];
        const int64_t r = k * d.B + b;
        for (int64_t h = 0; h < d.HID; ++h) {
          const T v = dh[r * d.HID + h];
          T* row = dw1p + h * d.C;
          for (int64_t c = 0; c < d.C; ++c) row[c] += v * A[c];
          if (biases) db1p[h] += v;
        }
      }
    }
  });
  return {da, dm, dG0, dw1, db1, dw2, db2};
}

// The spatial gate forward: s = σ(bias + conv_k([mean, max]·S0, w)) and gate = S0·s (empty
// without S0), each (B, H·W). Per output row: one unit-stride pass per tap.
std::tuple<at::Tensor, at::Tensor> gates_spatial_fwd_cpu(const at::Tensor& mean, const at::Tensor& mx,
                                                         const std::optional<at::Tensor>& S0, const at::Tensor& w,
                                                         const std::optional<at::Tensor>& bias, int64_t width) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // M's products are this kernel's own arithmetic
  const auto d = small::spatial_fwd_dims(mean, mx, S0, w, bias, width, "gates_spatial_fwd");
  const small::SpatialFwdOut out = small::spatial_fwd_outputs(mean, d, small::has(S0));
  at::Tensor s = out.s, gate = out.gate;
  if (mean.numel() == 0) return {s, gate};
  // the gated maps M = [mean, max]·S0, once
  const at::Tensor M0 = small::has(S0) ? mean * *S0 : mean, M1 = small::has(S0) ? mx * *S0 : mx;
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "gates_spatial_fwd", [&] {
    using T = scalar_t;
    const T *m0 = M0.const_data_ptr<T>(), *m1 = M1.const_data_ptr<T>(), *wp = w.const_data_ptr<T>();
    const T* s0 = opt_ptr<T>(S0);
    const T bv = small::has(bias) ? bias->const_data_ptr<T>()[0] : T(0);
    T *sp = s.data_ptr<T>(), *gatep = s0 ? gate.data_ptr<T>() : nullptr;
    const int64_t R = d.K / 2, KK = d.K * d.K;
    at::parallel_for(0, d.B * d.H, 8, [&](int64_t r0, int64_t r1) {
      std::vector<T> acc(d.W);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / d.H, y = r % d.H;
        std::fill(acc.begin(), acc.end(), bv);
        for (int64_t i = 0; i < d.K; ++i) {
          const int64_t ys = y + i - R;
          if (ys < 0 || ys >= d.H) continue;
          for (int64_t j = 0; j < d.K; ++j) {
            const T w0 = wp[i * d.K + j], w1 = wp[KK + i * d.K + j];
            const int64_t lo = std::max<int64_t>(0, R - j), hi = std::min<int64_t>(d.W, d.W + R - j);
            const T* a0 = m0 + b * d.P + ys * d.W + (j - R);
            const T* a1 = m1 + b * d.P + ys * d.W + (j - R);
            for (int64_t x = lo; x < hi; ++x) acc[x] += w0 * a0[x] + w1 * a1[x];
          }
        }
        const int64_t o = b * d.P + y * d.W;
        for (int64_t x = 0; x < d.W; ++x) {
          const T sv = small::sigmoid(acc[x]);
          sp[o + x] = sv;
          if (s0) gatep[o + x] = s0[o + x] * sv;
        }
      }
    });
  });
  return {s, gate};
}

// Backward of gates_spatial_fwd for the gradient of its gate: (dmean, dmax, dS0, dw, db),
// dmean multiplied by scale_mean; dS0 empty without S0, db empty without has_bias.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gates_spatial_bwd_cpu(
    const at::Tensor& dgate, const std::optional<at::Tensor>& S0, const at::Tensor& s, const at::Tensor& mean,
    const at::Tensor& mx, const at::Tensor& w, bool has_bias, int64_t width, double scale_mean) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto d = small::spatial_bwd_dims(dgate, S0, s, mean, mx, w, width, "gates_spatial_bwd");
  const auto acc = mean.scalar_type();
  const int64_t R = d.K / 2, KK = d.K * d.K;
  const small::SpatialBwdOut grads = small::spatial_bwd_outputs(mean, d, small::has(S0));
  at::Tensor dmean = grads.dmean, dmax = grads.dmax, dS0 = grads.dS0;
  auto dl = at::empty({d.B, d.P}, mean.options());
  auto part = at::zeros({d.B, 2 * KK + 1}, mean.options());
  const at::Tensor M0 = small::has(S0) ? mean * *S0 : mean, M1 = small::has(S0) ? mx * *S0 : mx;
  AT_DISPATCH_FLOATING_TYPES(acc, "gates_spatial_bwd", [&] {
    using T = scalar_t;
    const T *dgp = dgate.const_data_ptr<T>(), *s0 = opt_ptr<T>(S0), *sp = s.const_data_ptr<T>();
    const T *mp = mean.const_data_ptr<T>(), *xp = mx.const_data_ptr<T>(), *wp = w.const_data_ptr<T>();
    const T *m0 = M0.const_data_ptr<T>(), *m1 = M1.const_data_ptr<T>();
    T *dlp = dl.data_ptr<T>(), *ds0 = s0 ? dS0.data_ptr<T>() : nullptr, *pp = part.data_ptr<T>();
    T *dmp = dmean.data_ptr<T>(), *dxp = dmax.data_ptr<T>();
    // 1. dlogit = dgate·S0·s(1 − s), dS0 = dgate·s (its first part); per image the weight
    //    gradient's sums Σ dl·M[ch, shifted] kept per tap and column, reduced at the end.
    at::parallel_for(0, d.B, 1, [&](int64_t b0, int64_t b1_) {
      std::vector<T> cols(2 * KK * d.W);
      for (int64_t b = b0; b < b1_; ++b) {
        T* pr = pp + b * (2 * KK + 1);
        for (int64_t p = b * d.P; p < (b + 1) * d.P; ++p) {
          T dg = dgp[p];
          if (s0) {
            ds0[p] = dg * sp[p];
            dg *= s0[p];
          }
          dlp[p] = dg * sp[p] * (T(1) - sp[p]);
          pr[2 * KK] += dlp[p];
        }
        std::fill(cols.begin(), cols.end(), T(0));
        for (int64_t y = 0; y < d.H; ++y) {
          const T* dly = dlp + b * d.P + y * d.W;
          for (int64_t i = 0; i < d.K; ++i) {
            const int64_t ys = y + i - R;
            if (ys < 0 || ys >= d.H) continue;
            for (int64_t j = 0; j < d.K; ++j) {
              const int64_t lo = std::max<int64_t>(0, R - j), hi = std::min<int64_t>(d.W, d.W + R - j);
              const T* a0 = m0 + b * d.P + ys * d.W + (j - R);
              const T* a1 = m1 + b * d.P + ys * d.W + (j - R);
              T* c0 = cols.data() + (i * d.K + j) * d.W;
              T* c1 = cols.data() + (KK + i * d.K + j) * d.W;
              for (int64_t x = lo; x < hi; ++x) {
                c0[x] += dly[x] * a0[x];
                c1[x] += dly[x] * a1[x];
              }
            }
          }
        }
        for (int64_t t = 0; t < 2 * KK; ++t) {
          T v = T(0);
          for (int64_t x = 0; x < d.W; ++x) v += cols[t * d.W + x];
          pr[t] = v;
        }
      }
    });
    // 2. dM[ch] = the transposed convolution of dl; with S0, dS0 += Σ_ch dM·[mean, max] and
    //    the statistics' gradients are dM·S0.
    at::parallel_for(0, d.B * d.H, 8, [&](int64_t r0, int64_t r1) {
      std::vector<T> a0(d.W), a1(d.W);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / d.H, y = r % d.H;
        std::fill(a0.begin(), a0.end(), T(0));
        std::fill(a1.begin(), a1.end(), T(0));
        for (int64_t i = 0; i < d.K; ++i) {
          const int64_t ys = y - i + R;
          if (ys < 0 || ys >= d.H) continue;
          for (int64_t j = 0; j < d.K; ++j) {
            const T w0 = wp[i * d.K + j], w1 = wp[KK + i * d.K + j];
            const int64_t lo = std::max<int64_t>(0, j - R), hi = std::min<int64_t>(d.W, d.W + j - R);
            const T* src = dlp + b * d.P + ys * d.W + (R - j);
            for (int64_t x = lo; x < hi; ++x) {
              a0[x] += w0 * src[x];
              a1[x] += w1 * src[x];
            }
          }
        }
        const int64_t o = b * d.P + y * d.W;
        for (int64_t x = 0; x < d.W; ++x) {
          T v0 = a0[x], v1 = a1[x];
          if (s0) {
            ds0[o + x] += v0 * mp[o + x] + v1 * xp[o + x];
            v0 *= s0[o + x];
            v1 *= s0[o + x];
          }
          dmp[o + x] = v0 * static_cast<T>(scale_mean);
          dxp[o + x] = v1;
        }
      }
    });
  });
  const auto [dw, db] = small::spatial_weight_grads(part, w, has_bias);  // the partials in order
  return {dmean, dmax, dS0, dw, db};
}

// gates_pool_hw(x, None) and gates_stencil(x, w): one op so that a device with a fused pass
// (CUDA: the stencil kernel pools its staged tiles) reads x once. On the CPU the two passes
// run one after the other (the stencil is a GEMM here: x is read in its own blocking).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gates_pool_hw_stencil_cpu(const at::Tensor& x,
                                                                                     const at::Tensor& w,
                                                                                     bool elat_taps) {
  auto [mean, mx, idx] = gates_pool_hw_cpu(x, std::nullopt);
  return {mean, mx, idx, gates_stencil_cpu(x, w, elat_taps)};
}

TORCH_LIBRARY_FRAGMENT(disseg, m) {
  m.def("gates_pool_hw(Tensor x, Tensor? S) -> (Tensor, Tensor, Tensor)");
  m.def("gates_pool_c(Tensor x, Tensor? G) -> (Tensor, Tensor, Tensor)");
  m.def("gates_apply(Tensor x, Tensor? G, Tensor? S) -> Tensor");
  m.def(
      "gates_reduce(Tensor x, Tensor? R, Tensor? G, Tensor? S, Tensor? g_idx=None, Tensor? g_val=None,"
      " Tensor? s_idx=None, Tensor? s_val=None) -> (Tensor, Tensor)");
  m.def(
      "gates_grad_x(Tensor? grad, Tensor x, Tensor? G, Tensor? S, Tensor?[] L, Tensor?[] R, Tensor?[] idx,"
      " Tensor?[] d, int[] kinds, Tensor? stencil_w=None, Tensor? stencil_g=None, bool elat_taps=False) -> Tensor");
  m.def("gates_stencil(Tensor x, Tensor w, bool elat_taps=False) -> Tensor");
  m.def("gates_pool_hw_stencil(Tensor x, Tensor w, bool elat_taps=False) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gates_stencil_grad_weight(Tensor x, Tensor g, int K, bool elat_taps=False) -> Tensor");
  m.def(
      "gates_channel_mlp_fwd(Tensor a, Tensor? m, Tensor? G0, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, bool telu)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "gates_channel_mlp_bwd(Tensor dgate, Tensor a, Tensor? m, Tensor? G0, Tensor H, Tensor T, Tensor? U, Tensor? TH,"
      " Tensor g, Tensor w1, Tensor w2, bool telu, bool biases, float scale_a)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gates_spatial_fwd(Tensor mean, Tensor mx, Tensor? S0, Tensor w, Tensor? bias, int width) -> (Tensor, Tensor)");
  m.def(
      "gates_spatial_bwd(Tensor dgate, Tensor? S0, Tensor s, Tensor mean, Tensor mx, Tensor w, bool has_bias,"
      " int width, float scale_mean) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(disseg, CPU, m) {
  m.impl("gates_pool_hw", &gates_pool_hw_cpu);
  m.impl("gates_pool_c", &gates_pool_c_cpu);
  m.impl("gates_apply", &gates_apply_cpu);
  m.impl("gates_reduce", &gates_reduce_cpu);
  m.impl("gates_grad_x", &gates_grad_x_cpu);
  m.impl("gates_stencil", &gates_stencil_cpu);
  m.impl("gates_pool_hw_stencil", &gates_pool_hw_stencil_cpu);
  m.impl("gates_stencil_grad_weight", &gates_stencil_grad_weight_cpu);
  m.impl("gates_channel_mlp_fwd", &gates_channel_mlp_fwd_cpu);
  m.impl("gates_channel_mlp_bwd", &gates_channel_mlp_bwd_cpu);
  m.impl("gates_spatial_fwd", &gates_spatial_fwd_cpu);
  m.impl("gates_spatial_bwd", &gates_spatial_bwd_cpu);
}

}  // namespace disseg
