// The arguments of the gates' backward passes over x that carry a max pool's gradient:
// the arg-max pairs of gates_reduce and the statistic terms of gates_grad_x. Shared by the
// CPU kernels (csrc/gates.cpp) and the CUDA kernels (csrc/gates_cuda.cu): one set of
// checks, one set of pointers, so the two backends read the same arguments the same way.
//
// A statistic of y = x·G0[b, c]·S0[b, p] over p (kind "hw": CA's avg/max pools) or over c
// (kind "c": SA's mean/max maps) contributes to dx
//   L[b, c]·R[b, p]                                   (the mean's share; L, R absent = 1)
//   + d[b, c]·R[b, p] at p = idx[b, c]                (kind "hw": the max's share)
//   + d[b, p]·L[b, c] at c = idx[b, p]                (kind "c")
// and, carried to the gate it was taken under, adds val·x at the arg-max to that gate's
// gradient (gates_reduce's g_idx/g_val and s_idx/s_val). The indices come from the pools
// (gates_pool_hw / gates_pool_c); an index outside its axis adds nothing, on both devices.
//
// Before these existed the engine gathered and scattered the max terms with ATen ops (six
// to eight launches per max on CUDA, whose scatter_add_ used atomics: not deterministic on
// ties of the reduce). Header-only, ATen core headers only.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <utility>
#include <vector>

namespace disseg {
namespace terms {

constexpr int kMaxTerms = 4;  // statistics per dx pass (the CBAT chain has four), as the Triton path

enum Kind : int64_t { kOverP = 0, kOverC = 1 };  // "hw" and "c" in disseg_kernels/ops/gates.py

template <typename acc_t>
struct Term {
  const acc_t* L;      // (B, C), null = 1
  const acc_t* R;      // (B, P), null = 1
  const int64_t* idx;  // null: no max term; (B, C) of p for kOverP, (B, P) of c for kOverC
  const acc_t* d;      // like idx
  bool over_c;
};

template <typename acc_t>
struct Terms {
  Term<acc_t> t[kMaxTerms];
  int K;
};

// An argument's name in errors, "L[2]" or "g_idx", formatted only when a check fails (these
// checks run on every call of a host-bound op).
struct ArgName {
  const char* what;
  int64_t k;  // the list index, or -1
};

inline std::ostream& operator<<(std::ostream& os, const ArgName& a) {
  os << a.what;
  if (a.k >= 0) os << "[" << a.k << "]";
  return os;
}

// A small tensor of `n` elements of dtype `dt` on `dev`, made dense (kept alive in
// `keep`); null when absent.
template <typename T>
const T* small_ptr(const std::optional<at::Tensor>& t, int64_t n, at::ScalarType dt, const at::Device& dev,
                   const char* op, ArgName what, std::vector<at::Tensor>& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == dt, op, ": ", what, " must be ", dt, ", got ", t->scalar_type());
  TORCH_CHECK(t->device() == dev, op, ": ", what, " must be on ", dev, ", got ", t->device());
  TORCH_CHECK(t->numel() == n, op, ": ", what, " must have ", n, " elements, got shape ", t->sizes());
  keep.push_back(t->contiguous());
  return keep.back().const_data_ptr<T>();
}

// gates_grad_x's term lists: L[k] (B, C), R[k] (B, P), idx[k] int64 and d[k] (B, C) for
// kind kOverP or (B, P) for kOverC, each entry None where absent; idx[k] and d[k] both or
// neither. All lists of one length K ≤ kMaxTerms.
template <typename acc_t>
Terms<acc_t> dx_terms(const c10::List<std::optional<at::Tensor>>& L, const c10::List<std::optional<at::Tensor>>& R,
                      const c10::List<std::optional<at::Tensor>>& idx, const c10::List<std::optional<at::Tensor>>& d,
                      at::IntArrayRef kinds, int64_t B, int64_t C, int64_t P, at::ScalarType acc,
                      const at::Device& dev, std::vector<at::Tensor>& keep) {
  const char* op = "gates_grad_x";
  const size_t K = kinds.size();
  TORCH_CHECK(K <= static_cast<size_t>(kMaxTerms), op, ": at most ", kMaxTerms, " terms per pass, got ", K);
  TORCH_CHECK(L.size() == K && R.size() == K && idx.size() == K && d.size() == K, op,
              ": L, R, idx, d and kinds must have one length; got ", L.size(), ", ", R.size(), ", ", idx.size(), ", ",
              d.size(), ", ", K);
  Terms<acc_t> out{};
  out.K = static_cast<int>(K);
  for (size_t k = 0; k < K; ++k) {
    TORCH_CHECK(kinds[k] == kOverP || kinds[k] == kOverC, op, ": kinds[", k, "] must be 0 (over p) or 1 (over c), got ",
                kinds[k]);
    const bool over_c = kinds[k] == kOverC;
    const std::optional<at::Tensor> ik = idx.get(k), dk = d.get(k);
    const bool hi = ik.has_value() && ik->defined(), hd = dk.has_value() && dk->defined();
    TORCH_CHECK(hi == hd, op, ": idx[", k, "] and d[", k, "] must be both given or both absent");
    const int64_t n_arg = B * (over_c ? P : C);
    const auto kk = static_cast<int64_t>(k);
    out.t[k] = Term<acc_t>{small_ptr<acc_t>(L.get(k), B * C, acc, dev, op, {"L", kk}, keep),
                           small_ptr<acc_t>(R.get(k), B * P, acc, dev, op, {"R", kk}, keep),
                           small_ptr<int64_t>(ik, n_arg, at::kLong, dev, op, {"idx", kk}, keep),
                           small_ptr<acc_t>(dk, n_arg, acc, dev, op, {"d", kk}, keep), over_c};
  }
  return out;
}

// gates_reduce's arg-max pair (idx, val), both (B, n) or both absent: null pointers when
// absent.
template <typename acc_t>
std::pair<const int64_t*, const acc_t*> arg_pair(const std::optional<at::Tensor>& idx,
                                                 const std::optional<at::Tensor>& val, int64_t B, int64_t n,
                                                 at::ScalarType acc, const at::Device& dev, const char* idx_name,
                                                 const char* val_name, std::vector<at::Tensor>& keep) {
  const bool hi = idx.has_value() && idx->defined(), hv = val.has_value() && val->defined();
  TORCH_CHECK(hi == hv, "gates_reduce: ", idx_name, " and ", val_name, " must be both given or both absent");
  return {small_ptr<int64_t>(idx, B * n, at::kLong, dev, "gates_reduce", {idx_name, -1}, keep),
          small_ptr<acc_t>(val, B * n, acc, dev, "gates_reduce", {val_name, -1}, keep)};
}

// elat_taps (gates_stencil, gates_pool_hw_stencil, gates_grad_x): w is ELAT's composite
// 7×7 stencil, whose taps off its three dilated 3×3 grids (elat_tap) are read as zero.
// gates_grad_x's stencil: stencil_w (1, C, K, K) and its output gradient stencil_g (B, H·W)
// both or neither (the shapes are the device's stencil checks); returns whether there is one.
constexpr int64_t kElatK = 7;  // ELAT's composite stencil is 7×7

inline void check_elat_k(int64_t K, bool elat_taps, const char* op) {
  TORCH_CHECK(!elat_taps || K == kElatK, op, ": elat_taps needs K = 7, got ", K);
}

inline void check_elat_taps(const at::Tensor& w, bool elat_taps, const char* op, const char* name = "w") {
  TORCH_CHECK(!elat_taps || (w.defined() && w.dim() == 4 && w.size(2) == kElatK && w.size(3) == kElatK), op,
              ": elat_taps needs a 7×7 ", name, ", got ", w.defined() ? w.sizes() : at::IntArrayRef{});
}

inline bool stencil_args(const std::optional<at::Tensor>& w, const std::optional<at::Tensor>& g, bool elat_taps,
                         const char* op) {
  const bool hw = w.has_value() && w->defined(), hg = g.has_value() && g->defined();
  TORCH_CHECK(hw == hg, op, ": stencil_w and stencil_g must be both given or both absent");
  check_elat_taps(hw ? *w : at::Tensor(), elat_taps, op, "stencil_w");
  return hw;
}

// Tap (di, dj) of a 7×7 stencil (offsets −3..3) is one of ELAT's 25: on a row, a column
// or a diagonal through the centre, which is where the taps of dilation 1, 2, 3 sit.
constexpr bool elat_tap(int64_t di, int64_t dj) { return di == 0 || dj == 0 || di == dj || di == -dj; }

}  // namespace terms
}  // namespace disseg
