// Dispersive loss, row statistics of a row set against a rectangular column set.
// Included by csrc/dispersive.cpp inside namespace disseg::{anonymous}: it reuses that
// file's GEMM helpers (gemm_nt, gemm_nn, SingleThreadedBlas), its vector helpers (Vec,
// vexp, reduce_add, reduce_max) and its variant codes. Not a translation unit of its own.
//
// disseg::dispersive_row_stats(rows (n, D), cols (m, D), variant, tau, margin, scale_by_dim,
// include_diagonal, self_offset, grad_weight, need_grad) -> (m (n,), s (n,), acc (n, D))
// is the primitive `_row_stats` of disseg_kernels/distributed.py (its docstring is the
// contract). With l_ij = -d_ij / tau (InfoNCE variants):
//   m_i   = max_j l_ij,  s_i = sum_j exp(l_ij - m_i),
//   acc_i = sum_j g exp(l_ij - m_i) w_ij (z_i - z_j)  (l2: w = 1/d, 0 at d = 0; l2sq: w = 2)
//           or sum_j g exp(l_ij - m_i) zhat_j          (cosine: rows and cols already unit)
//   hinge: m_i = 0, s_i = sum_j h_ij^2, acc_i = sum_j g (h_ij / d_ij) (z_i - z_j),
//          h = max(0, margin - d).
// Column i + self_offset is row i itself: dropped unless include_diagonal (then d = 0
// exactly for the L2 family).
//
// Work units are (row tile, column group): row tiles run in parallel; when there are
// fewer row tiles than threads (few samples, huge D) the column tiles are split into
// groups too, each with its own statistics, merged online at the end. Per tile:
//   * the L2 family works on rows and columns shifted by the row tile's mean (distances
//     ignore it; it removes the cancellation of r_i z_i - sum_j v_ij z_j and of the Gram
//     distance n_i + n_j - 2 G_ij for rows with a large common offset);
//   * S = R C^T by single-threaded BLAS (float32 for float32 inputs);
//   * precision: as dispersive.cpp's tiled regime, a float32 tile with a close pair
//     (d^2 < (n_i + n_j) / 16) is recomputed with a float64 GEMM; infonce_l2sq, whose
//     d^2 / tau is exponentiated as it is (a float32 Gram error ~eps32 (n_i + n_j) s / tau
//     in the logit), stays in float32 only while (n_i + n_j) s / tau <= kL2sqF32 over the
//     tile (logit error ~1e-5; normalised features), else uses float64; in a float64 tile, a pair with d^2 < 1e-3 (n_i + n_j) (near
//     duplicates, where the Gram form loses digits) gets its distance from exact
//     differences sum_k (r_ik - c_jk)^2, so duplicate rows give d = 0 exactly;
//   * an online per-row max (flash-style): a row's s, sum of weights and acc are
//     rescaled when its max rises; then V (the weights) in place of S and acc += V C.
// Memory: O(threads x tile x D); nothing n x m.

constexpr double kRowsClose = 1.0 / 16.0;  // float32 tile -> float64 tile
constexpr double kRowsExact = kExactD2;    // float64 Gram distance -> exact differences
constexpr double kL2sqF32 = 64.0;          // infonce_l2sq: largest (n_i + n_j) s / tau of a float32 tile

template <typename T>
T reduce_min(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](const Vec<T>& a, const Vec<T>& b) { return at::vec::minimum(a, b); }, v);
}

int64_t rows_tile(int64_t D, int64_t elem_bytes) {
  return block_rows(D, elem_bytes);  // dispersive.cpp: the same block size as the whole-batch tiles
}

template <typename T>  // T: the compute dtype of rows and cols, float or double
struct RowStatsRect {
  static constexpr bool kF64 = std::is_same<T, double>::value;

  const T* R;  // n x D
  const T* C;  // m x D
  int64_t n, m, D, variant;
  double tau, margin, scale, gw;
  bool include_diagonal, has_self, need_grad;
  int64_t off;
  int64_t BR, BC, ldS, nrt, nct, ng;

  T* out_acc;                // n x D (need_grad)
  std::vector<double> gm, gs;  // ng x n: every group's m and s
  std::vector<T> pacc;       // (ng - 1) x n x D: acc of groups >= 1

  struct Workspace {
    std::vector<T> rt, ct, S, nr, nc, shiftv;
    std::vector<double> rtd, ctd, Sd, nrd, ncd, rsum;
    bool rtd_ready = false;
  };
  std::vector<Workspace> ws;

  bool infonce() const { return variant != kHinge; }
  bool shifted() const { return variant != kCosine; }

  // u = d^2 (L2 family) or 1 - cos (cosine) in place of the Gram tile; +inf on lanes that
  // are no pair (the tail, an excluded self pair). False when check_close finds a pair too
  // close for this precision.
  template <typename g_t>
  bool distances(g_t* S, int64_t bi, int64_t bj, const g_t* nr, const g_t* nc, int64_t self0, bool check_close) {
    using VG = Vec<g_t>;
    constexpr int64_t WG = VG::size();
    constexpr int full = (int)((1ULL << WG) - 1);
    const VG zero(g_t(0)), inf(std::numeric_limits<g_t>::infinity()), kappa((g_t)kRowsClose), bjv((g_t)bj);
    for (int64_t a = 0; a < bi; ++a) {
      g_t* srow = S + a * ldS;
      const int64_t bself = has_self ? self0 + a : -1;
      const VG ni(variant == kCosine ? g_t(0) : nr[a]);
      for (int64_t b0 = 0; b0 < bj; b0 += WG) {
        const VG sv = VG::loadu(srow + b0);
        VG u;
        if (variant == kCosine) {
          u = VG(g_t(1)) - sv;
        } else {
          const VG nsum = ni + VG::loadu(nc + b0);
          u = at::vec::maximum(at::vec::fmadd(sv, VG(g_t(-2)), nsum), zero);
          if (check_close) {
            int bits = ~(u < nsum * kappa).zero_mask() & full;
            if (b0 + WG > bj) bits &= (int)((1ULL << (bj - b0)) - 1);
            if (bself >= b0 && bself < b0 + WG) bits &= ~(1 << (bself - b0));
            if (bits) return false;
          }
        }
        if (b0 + WG > bj) u = VG::blendv(u, inf, VG::arange(g_t(b0), g_t(1)) >= bjv);
        u.store(srow + b0);
      }
      if (bself >= 0 && bself < bj) {
        if (!include_diagonal)
          srow[bself] = std::numeric_limits<g_t>::infinity();
        else if (variant != kCosine)
          srow[bself] = g_t(0);  // the row itself: d = 0 exactly
      }
    }
    return true;
  }

  // Near duplicates of a float64 tile: d^2 from exact differences of the inputs (the
  // difference of two float32 values is exact in float64).
  void exact_close_pairs(double* Sd, int64_t i0, int64_t bi, int64_t j0, int64_t bj, const double* nr,
                         const double* nc, int64_t self0) {
    if (variant == kCosine) return;
    for (int64_t a = 0; a < bi; ++a) {
      double* srow = Sd + a * ldS;
      const int64_t bself = has_self ? self0 + a : -1;
      for (int64_t b = 0; b < bj; ++b) {
        if (b == bself || !(srow[b] < kRowsExact * (nr[a] + nc[b]))) continue;
        srow[b] = exact_d2(R + (i0 + a) * D, C + (j0 + b) * D, D);
      }
    }
  }

  // The weights V in place of u, with the online update of the unit's statistics.
  // Returns whether any weight is non-zero.
  template <typename g_t>
  bool weights(g_t* S, int64_t bi, int64_t bj, double* um, double* us, double* rsum, T* uacc) {
    using VG = Vec<g_t>;
    constexpr int64_t WG = VG::size();
    const VG zero(g_t(0)), vmargin((g_t)margin), vscale((g_t)scale), vgw((g_t)gw), vgw2((g_t)(2.0 * gw));
    const double negc = -scale / tau;
    bool any = false;
    for (int64_t a = 0; a < bi; ++a) {
      g_t* srow = S + a * ldS;
      VG rs = zero, acc_s = zero;
      if (variant == kHinge) {
        for (int64_t b0 = 0; b0 < bj; b0 += WG) {
          const VG d = VG::loadu(srow + b0).sqrt();
          const VG h = at::vec::maximum(vmargin - d * vscale, zero);
          const VG v = VG::blendv(h / d * vgw, zero, d == zero);
          acc_s = at::vec::fmadd(h, h, acc_s);
          rs = rs + v;
          v.store(srow + b0);
        }
      } else {
        VG vmin(std::numeric_limits<g_t>::infinity());
        for (int64_t b0 = 0; b0 < bj; b0 += WG) vmin = at::vec::minimum(vmin, VG::loadu(srow + b0));
        const double umin = (double)reduce_min<g_t>(vmin);
        if (umin == std::numeric_limits<double>::infinity()) {  // no pair in this row
          std::fill(srow, srow + ldS, g_t(0));
          continue;
        }
        const double t = negc * (variant == kL2 ? std::sqrt(umin) : umin);
        if (t > um[a]) {
          const double f = um[a] == kNegInf ? 0.0 : std::exp(um[a] - t);
          us[a] *= f;
          rsum[a] *= f;
          if (uacc != nullptr) {
            T* row = uacc + a * D;
            const T ft = (T)f;
            for (int64_t k = 0; k < D; ++k) row[k] *= ft;
          }
          um[a] = t;
        }
        const VG vm((g_t)um[a]), vnegc((g_t)negc);
        for (int64_t b0 = 0; b0 < bj; b0 += WG) {
          const VG u = VG::loadu(srow + b0);
          const VG d = variant == kL2 ? u.sqrt() : u;
          const VG p = vexp(at::vec::fmsub(d, vnegc, vm));
          VG v;
          if (variant == kL2)
            v = VG::blendv(p / d * vgw, zero, d == zero);
          else if (variant == kL2sq)  // a duplicate counts in s; its gradient p (z_i - z_j) is 0
            v = VG::blendv(p * vgw2, zero, d == zero);
          else
            v = p * vgw;
          acc_s = acc_s + p;
          rs = rs + v;
          v.store(srow + b0);
        }
      }
      const double rsa = (double)reduce_add<g_t>(rs);
      us[a] += (double)reduce_add<g_t>(acc_s);
      rsum[a] += rsa;
      any = any || rsa != 0.0 || variant == kCosine;
    }
    return any;
  }

  static void sq_norms(const T* X, int64_t rows, int64_t D, T* out) {
    for (int64_t a = 0; a < rows; ++a) {
      const T* x = X + a * D;
      if constexpr (kF64) {
        out[a] = dot_f64(x, x, D);
      } else {
        double s2 = 0.0;  // the float64 sum keeps ||x||^2 exact to float32 rounding
        for (int64_t k = 0; k < D; ++k) s2 += (double)x[k] * x[k];
        out[a] = (T)s2;
      }
    }
  }

  void unit(int64_t I, int64_t g, Workspace& w) {
    const int64_t i0 = I * BR, bi = std::min(BR, n - i0);
    double* um = gm.data() + g * n + i0;
    double* us = gs.data() + g * n + i0;
    T* uacc = !need_grad ? nullptr : g == 0 ? out_acc + i0 * D : pacc.data() + ((g - 1) * n + i0) * D;
    std::fill(um, um + bi, infonce() ? kNegInf : 0.0);
    std::fill(us, us + bi, 0.0);
    double* rsum = w.rsum.data();
    std::fill(rsum, rsum + bi, 0.0);
    if (uacc != nullptr) std::fill(uacc, uacc + bi * D, T(0));
    w.rtd_ready = false;

    // The row tile, shifted by its mean (L2 family).
    const T* rt = R + i0 * D;
    if (shifted()) {
      std::vector<double> mean(D, 0.0);
      for (int64_t a = 0; a < bi; ++a)
        for (int64_t k = 0; k < D; ++k) mean[k] += rt[a * D + k];
      for (int64_t k = 0; k < D; ++k) w.shiftv[k] = (T)(mean[k] / (double)bi);
      for (int64_t a = 0; a < bi; ++a)
        for (int64_t k = 0; k < D; ++k) w.rt[a * D + k] = rt[a * D + k] - w.shiftv[k];
      rt = w.rt.data();
    }
    if (variant != kCosine) sq_norms(rt, bi, D, w.nr.data());

    const int64_t J0 = g * nct / ng, J1 = (g + 1) * nct / ng;
    for (int64_t J = J0; J < J1; ++J) {
      const int64_t j0 = J * BC, bj = std::min(BC, m - j0);
      const T* ct = C + j0 * D;
      if (shifted()) {
        for (int64_t b = 0; b < bj; ++b)
          for (int64_t k = 0; k < D; ++k) w.ct[b * D + k] = ct[b * D + k] - w.shiftv[k];
        ct = w.ct.data();
      }
      if (variant != kCosine) sq_norms(ct, bj, D, w.nc.data());
      tile(i0, bi, j0, bj, rt, ct, w, um, us, uacc);
    }

    // acc_i = rsum_i (z_i - c) - sum_j v_ij (z_j - c) for the L2 family.
    if (uacc != nullptr && shifted()) {
      for (int64_t a = 0; a < bi; ++a) {
        const T ra = (T)rsum[a];
        const T* x = rt + a * D;
        T* o = uacc + a * D;
        for (int64_t k = 0; k < D; ++k) o[k] = ra * x[k] - o[k];
      }
    }
  }

  void tile(int64_t i0, int64_t bi, int64_t j0, int64_t bj, const T* rt, const T* ct, Workspace& w, double* um,
            double* us, T* uacc) {
    const int64_t self0 = i0 + off - j0;  // the self lane of row 0 of the tile
    T* S = w.S.data();
    bool f64 = kF64;
    if (!f64 && variant == kL2sq) {
      const T nrmax = *std::max_element(w.nr.data(), w.nr.data() + bi);
      const T ncmax = *std::max_element(w.nc.data(), w.nc.data() + bj);
      f64 = ((double)nrmax + (double)ncmax) * scale / tau > kL2sqF32;
    }
    if (!f64) {
      if (D > 0)
        gemm_nt<T>(bi, bj, D, T(1), rt, D, ct, D, T(0), S, ldS);
      else
        std::fill(S, S + bi * ldS, T(0));
      f64 = !distances<T>(S, bi, bj, w.nr.data(), w.nc.data(), self0, variant != kCosine);
    }
    bool any;
    if (!f64) {
      any = weights<T>(S, bi, bj, um, us, w.rsum.data(), uacc);
    } else {
      // float64 tile (from the same shifted float32 values for float32 inputs)
      double* Sd = kF64 ? reinterpret_cast<double*>(S) : w.Sd.data();
      const double *rd, *cd, *nrd, *ncd;
      if constexpr (kF64) {
        rd = rt;
        cd = ct;
        nrd = w.nr.data();
        ncd = w.nc.data();
      } else {
        if (w.rtd.empty()) {  // allocated on first use: most float32 tiles never need them
          w.rtd.resize(BR * D);
          w.ctd.resize(BC * D);
        }
        if (!w.rtd_ready) {
          for (int64_t k = 0; k < bi * D; ++k) w.rtd[k] = rt[k];
          for (int64_t a = 0; a < bi; ++a) w.nrd[a] = dot_f64(w.rtd.data() + a * D, w.rtd.data() + a * D, D);
          w.rtd_ready = true;
        }
        for (int64_t k = 0; k < bj * D; ++k) w.ctd[k] = ct[k];
        for (int64_t b = 0; b < bj; ++b) w.ncd[b] = dot_f64(w.ctd.data() + b * D, w.ctd.data() + b * D, D);
        rd = w.rtd.data();
        cd = w.ctd.data();
        nrd = w.nrd.data();
        ncd = w.ncd.data();
      }
      if (D > 0)
        gemm_nt<double>(bi, bj, D, 1.0, rd, D, cd, D, 0.0, Sd, ldS);
      else
        std::fill(Sd, Sd + bi * ldS, 0.0);
      distances<double>(Sd, bi, bj, nrd, ncd, self0, false);
      exact_close_pairs(Sd, i0, bi, j0, bj, nrd, ncd, self0);
      any = weights<double>(Sd, bi, bj, um, us, w.rsum.data(), uacc);
      if (!kF64 && any && uacc != nullptr)
        for (int64_t a = 0; a < bi; ++a)
          for (int64_t b = 0; b < bj; ++b) S[a * ldS + b] = (T)Sd[a * ldS + b];
    }
    if (any && uacc != nullptr && D > 0) gemm_nn<T>(bi, D, bj, T(1), S, ldS, ct, D, T(1), uacc, D);
  }

  // Few rows (n <= kFewRows; the model's regime: N = 8..64 of D up to 262,144+): one row
  // tile, column tiles of kFewCols, and the reduction over D split across threads in
  // chunks of kChunk: the Gram tile in float64 (float32 products are exact in float64),
  // as dispersive.cpp's few-samples regime, then acc += V C~ split over D the same way.
  static constexpr int64_t kFewRows = 64;
  static constexpr int64_t kFewCols = 64;
  static constexpr int64_t kChunk = 512;

  void run_few_rows() {
    const int64_t nch = (D + kChunk - 1) / kChunk;
    const int threads = std::max(1, at::get_num_threads());
    const bool sh = shifted();
    ldS = (kFewCols + 15) / 16 * 16;
    std::vector<T> c(sh ? D : 0);
    std::vector<double> part((size_t)threads * n, 0.0);
    at::parallel_for(0, nch, 1, [&](int64_t b, int64_t e) {
      double* nrp = part.data() + (size_t)at::get_thread_num() * n;
      std::vector<double> mean(kChunk), x(kChunk);
      for (int64_t ch = b; ch < e; ++ch) {
        const int64_t k0 = ch * kChunk, w = std::min(kChunk, D - k0);
        if (sh) {
          std::fill(mean.begin(), mean.begin() + w, 0.0);
          for (int64_t a = 0; a < n; ++a)
            for (int64_t k = 0; k < w; ++k) mean[k] += R[a * D + k0 + k];
          for (int64_t k = 0; k < w; ++k) c[k0 + k] = (T)(mean[k] / (double)n);
          for (int64_t a = 0; a < n; ++a) {
            for (int64_t k = 0; k < w; ++k) x[k] = (double)(R[a * D + k0 + k] - c[k0 + k]);
            nrp[a] += dot_f64(x.data(), x.data(), w);
          }
        }
      }
    });
    std::vector<double> nr(n + ldS, 0.0);
    for (int t = 0; t < threads; ++t)
      for (int64_t a = 0; a < n; ++a) nr[a] += part[(size_t)t * n + a];

    double* um = gm.data();
    double* us = gs.data();
    std::vector<double> rsum(n, 0.0), Sd((size_t)n * ldS), nc(ldS);
    std::vector<T> Vt((size_t)n * ldS);
    if (need_grad) std::fill(out_acc, out_acc + n * D, T(0));
    std::vector<double> gpart;
    for (int64_t j0 = 0; j0 < m; j0 += kFewCols) {
      const int64_t bj = std::min(kFewCols, m - j0);
      // Pass 1: Gram tile and column norms, float64, split over D.
      gpart.assign((size_t)threads * (n * bj + bj), 0.0);
      at::parallel_for(0, nch, 1, [&](int64_t b, int64_t e) {
        SingleThreadedBlas guard;
        double* G = gpart.data() + (size_t)at::get_thread_num() * (n * bj + bj);
        double* ncp = G + n * bj;
        std::vector<double> rb((size_t)n * kChunk), cb((size_t)bj * kChunk);
        for (int64_t ch = b; ch < e; ++ch) {
          const int64_t k0 = ch * kChunk, w = std::min(kChunk, D - k0);
          for (int64_t a = 0; a < n; ++a) {
            double* x = rb.data() + a * w;
            const T* src = R + a * D + k0;
            if (sh)
              for (int64_t k = 0; k < w; ++k) x[k] = (double)(src[k] - c[k0 + k]);
            else
              for (int64_t k = 0; k < w; ++k) x[k] = (double)src[k];
          }
          for (int64_t q = 0; q < bj; ++q) {
            double* y = cb.data() + q * w;
            const T* src = C + (j0 + q) * D + k0;
            if (sh) {
              for (int64_t k = 0; k < w; ++k) y[k] = (double)(src[k] - c[k0 + k]);
              ncp[q] += dot_f64(y, y, w);
            } else {
              for (int64_t k = 0; k < w; ++k) y[k] = (double)src[k];
            }
          }
          gemm_nt<double>(n, bj, w, 1.0, rb.data(), w, cb.data(), w, 1.0, G, bj);
        }
      });
      std::fill(Sd.begin(), Sd.end(), 0.0);
      std::fill(nc.begin(), nc.end(), 0.0);
      for (int t = 0; t < threads; ++t) {
        const double* G = gpart.data() + (size_t)t * (n * bj + bj);
        for (int64_t a = 0; a < n; ++a)
          for (int64_t q = 0; q < bj; ++q) Sd[a * ldS + q] += G[a * bj + q];
        for (int64_t q = 0; q < bj; ++q) nc[q] += G[n * bj + q];
      }
      const int64_t self0 = off - j0;
      distances<double>(Sd.data(), n, bj, nr.data(), nc.data(), self0, false);
      exact_close_pairs(Sd.data(), 0, n, j0, bj, nr.data(), nc.data(), self0);
      const bool any = weights<double>(Sd.data(), n, bj, um, us, rsum.data(), need_grad ? out_acc : nullptr);
      if (!need_grad || !any) continue;
      // Pass 2: acc += V (C - c), split over D.
      for (size_t k = 0; k < Vt.size(); ++k) Vt[k] = (T)Sd[k];
      at::parallel_for(0, nch, 1, [&](int64_t b, int64_t e) {
        SingleThreadedBlas guard;
        std::vector<T> cb(sh ? (size_t)bj * kChunk : 0);
        for (int64_t ch = b; ch < e; ++ch) {
          const int64_t k0 = ch * kChunk, w = std::min(kChunk, D - k0);
          const T* B = C + j0 * D + k0;
          int64_t ldb = D;
          if (sh) {
            for (int64_t q = 0; q < bj; ++q)
              for (int64_t k = 0; k < w; ++k) cb[q * w + k] = C[(j0 + q) * D + k0 + k] - c[k0 + k];
            B = cb.data();
            ldb = w;
          }
          gemm_nn<T>(n, w, bj, T(1), Vt.data(), ldS, B, ldb, T(1), out_acc + k0, D);
        }
      });
    }
    if (need_grad && sh) {  // acc_i = rsum_i (z_i - c) - sum_j v_ij (z_j - c)
      at::parallel_for(0, nch, 1, [&](int64_t b, int64_t e) {
        for (int64_t ch = b; ch < e; ++ch) {
          const int64_t k0 = ch * kChunk, w = std::min(kChunk, D - k0);
          for (int64_t a = 0; a < n; ++a) {
            const T ra = (T)rsum[a];
            T* o = out_acc + a * D + k0;
            const T* x = R + a * D + k0;
            for (int64_t k = 0; k < w; ++k) o[k] = ra * (x[k] - c[k0 + k]) - o[k];
          }
        }
      });
    }
  }

  void run(at::Tensor& m_out, at::Tensor& s_out) {
    if (n <= kFewRows && m > 0 && D > 0) {
      ng = 1;
      gm.assign(n, infonce() ? kNegInf : 0.0);
      gs.assign(n, 0.0);
      run_few_rows();
      T* mp = m_out.data_ptr<T>();
      T* sp = s_out.data_ptr<T>();
      for (int64_t i = 0; i < n; ++i) {
        mp[i] = (T)gm[i];
        sp[i] = (T)gs[i];
      }
      return;
    }
    BR = std::min(rows_tile(D, sizeof(T)), std::max<int64_t>(n, 1));
    BC = std::min(rows_tile(D, sizeof(T)), std::max<int64_t>(m, 1));
    ldS = (BC + 15) / 16 * 16;
    nrt = (n + BR - 1) / BR;
    nct = (m + BC - 1) / BC;
    const int64_t threads = std::max(1, at::get_num_threads());
    ng = nrt >= threads ? 1 : std::max<int64_t>(1, std::min(nct, (threads + nrt - 1) / nrt));
    gm.assign(ng * n, infonce() ? kNegInf : 0.0);
    gs.assign(ng * n, 0.0);
    if (need_grad && ng > 1) pacc.assign((ng - 1) * n * D, T(0));
    ws.resize(threads);
    const bool f64_tiles = !kF64 && variant != kCosine;
    for (auto& w : ws) {
      w.S.assign(BR * ldS, T(0));
      w.nr.assign(ldS + BR, T(0));
      w.nc.assign(ldS, T(0));
      w.rsum.assign(BR, 0.0);
      if (shifted()) {
        w.rt.assign(BR * D, T(0));
        w.ct.assign(BC * D, T(0));
        w.shiftv.assign(D, T(0));
      }
      if (f64_tiles) {  // float64 tiles of float32 inputs: allocated here, touched only when used
        w.Sd.assign(BR * ldS, 0.0);
        w.nrd.assign(BR, 0.0);
        w.ncd.assign(ldS, 0.0);
      }
    }
    if (m > 0) {
      at::parallel_for(0, nrt * ng, 1, [&](int64_t begin, int64_t end) {
        SingleThreadedBlas guard;
        for (int64_t u = begin; u < end; ++u) unit(u / ng, u % ng, ws[at::get_thread_num()]);
      });
    } else if (need_grad) {
      std::fill(out_acc, out_acc + n * D, T(0));
    }

    // Merge the column groups (online), write m and s.
    T* mp = m_out.data_ptr<T>();
    T* sp = s_out.data_ptr<T>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        double mi = gm[i], si = gs[i];
        if (infonce()) {
          for (int64_t g = 1; g < ng; ++g) mi = std::max(mi, gm[g * n + i]);
          const double f0 = mi == kNegInf ? 0.0 : std::exp(gm[i] - mi);
          si = gs[i] * f0;
          if (need_grad && ng > 1) {
            T* o = out_acc + i * D;
            const T ft = (T)f0;
            for (int64_t k = 0; k < D; ++k) o[k] *= ft;
          }
        }
        for (int64_t g = 1; g < ng; ++g) {
          const double f = !infonce() ? 1.0 : mi == kNegInf ? 0.0 : std::exp(gm[g * n + i] - mi);
          si += gs[g * n + i] * f;
          if (need_grad) {
            T* o = out_acc + i * D;
            const T* p = pacc.data() + ((g - 1) * n + i) * D;
            const T ft = (T)f;
            for (int64_t k = 0; k < D; ++k) o[k] += ft * p[k];
          }
        }
        mp[i] = (T)mi;
        sp[i] = (T)si;
      }
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispersive_row_stats_cpu(
    const at::Tensor& rows, const at::Tensor& cols, int64_t variant, double tau, double margin, bool scale_by_dim,
    bool include_diagonal, std::optional<int64_t> self_offset, double grad_weight, bool need_grad) {
  const char* op = "dispersive_row_stats_cpu: ";
  TORCH_CHECK(rows.device().is_cpu() && cols.device().is_cpu(), op, "rows and cols must be CPU tensors, got ",
              rows.device(), " and ", cols.device());
  TORCH_CHECK(rows.dim() == 2 && cols.dim() == 2, op, "rows and cols must be 2-D, got shapes ", rows.sizes(), " and ",
              cols.sizes());
  TORCH_CHECK(rows.size(1) == cols.size(1), op, "rows and cols must have the same D, got ", rows.sizes(), " and ",
              cols.sizes());
  TORCH_CHECK(rows.scalar_type() == cols.scalar_type(), op, "rows and cols must share a dtype, got ",
              rows.scalar_type(), " and ", cols.scalar_type());
  const auto dt = rows.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, "rows must be float32 or float64 (the compute dtype), got ",
              dt);
  TORCH_CHECK(rows.is_contiguous() && cols.is_contiguous(), op, "rows and cols must be contiguous");
  TORCH_CHECK(variant >= 0 && variant <= 3, op,
              "variant must be 0..3 (infonce_l2, infonce_l2sq, infonce_cosine, hinge; covariance has no fused "
              "row statistics), got ",
              variant);
  TORCH_CHECK(tau > 0 && std::isfinite(tau), op, "tau must be a finite number > 0, got ", tau);
  TORCH_CHECK(margin > 0 && std::isfinite(margin), op, "margin must be a finite number > 0, got ", margin);
  const int64_t n = rows.size(0), m = cols.size(0), D = rows.size(1);
  at::Tensor m_out = at::full({n}, variant == kHinge ? 0.0 : kNegInf, rows.options());
  at::Tensor s_out = at::zeros({n}, rows.options());
  at::Tensor acc = need_grad ? at::empty({n, D}, rows.options()) : at::empty({n, 0}, rows.options());
  if (n == 0) return {m_out, s_out, acc};
  AT_DISPATCH_FLOATING_TYPES(dt, "dispersive_row_stats_cpu", [&] {
    RowStatsRect<scalar_t> k;
    k.R = rows.data_ptr<scalar_t>();
    k.C = cols.data_ptr<scalar_t>();
    k.n = n;
    k.m = m;
    k.D = D;
    k.variant = variant;
    k.tau = tau;
    k.margin = margin;
    k.scale = scale_by_dim && D > 0 ? 1.0 / (double)D : 1.0;
    k.gw = grad_weight;
    k.include_diagonal = include_diagonal;
    k.has_self = self_offset.has_value();
    k.off = self_offset.value_or(0);
    k.need_grad = need_grad;
    k.out_acc = need_grad ? acc.data_ptr<scalar_t>() : nullptr;
    k.run(m_out, s_out);
  });
  return {m_out, s_out, acc};
}
