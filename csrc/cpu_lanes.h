// float lanes for every float dtype a CPU kernel reads: one at::vec::Vectorized<float>
// (16 lanes on AVX-512, 8 on AVX2) loaded from float, bfloat16 or float16 memory and
// stored back to it. Half types are widened on load and rounded to nearest even on store,
// as c10's scalar conversions (a NaN stays a NaN; its payload is ATen's, not c10's).
// Scalar conversions of c10::BFloat16 / c10::Half in a loop keep GCC from vectorising it:
// the half-type kernels ran 3-10x slower than float without these.
// Include this first in a translation unit (before any ATen header), as cpu_vec.h.
#pragma once

#include "cpu_vec.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace disseg {
namespace lanes {

using fvec = at::vec::Vectorized<float>;
constexpr int64_t kWidth = fvec::size();

// T has float lanes (double keeps its scalar loops).
template <typename T>
constexpr bool has_lanes = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

template <typename T>
inline fvec load_float(const T* p) {
  static_assert(has_lanes<T>);
  if constexpr (std::is_same_v<T, float>) {
    return fvec::loadu(p);
  } else {
    fvec v;
    at::vec::load_to_float(p, v);
    return v;
  }
}

template <typename T>
inline void store_float(T* p, const fvec& v) {
  static_assert(has_lanes<T>);
  if constexpr (std::is_same_v<T, float>) {
    v.store(p);
  } else {
    at::vec::convert_from_float<T>(v, v).store(p, kWidth);
  }
}

// dst[i] = float(src[i]) for i < n.
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + kWidth <= n; i += kWidth) load_float(src + i).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

}  // namespace lanes
}  // namespace disseg
