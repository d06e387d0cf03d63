#include "rom_fast/neurons.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "blas_lapack.hpp"
#include "eigen_internal.hpp"
#include "parallel.hpp"

namespace rom_fast {

using detail::blas_int;
using detail::require;
using detail::to_blas;

namespace {

// Columns per OpenMP chunk when a row-major matrix is reduced by columns.
constexpr index_t kColumnChunk = 512;
// A greedy step's own loops (between its BLAS calls) run in parallel only past this many
// elements: an OpenMP region's threads spin after it while OpenBLAS's threads work, and for
// small steps (block 1 at n = 1536) that contention cost 40% of the time on 2 cores.
constexpr index_t kParallelElements = index_t{1} << 22;

// Greedy removal on the inverse and the refit, both over the m columns still stored. Stored
// column s is original column orig[s]; orig is increasing, so comparing stored indices
// compares original ones (the tie rule). Removed columns are zeroed in place (so later
// updates leave them zero) and squeezed out once they are an eighth of the stored ones.
//   hinv: column-major m x m, leading dimension n, LOWER triangle only (symmetric). Every
//         write (dsyrk "L", the zeroing, compact) is to an element (i, j) with i >= j, so the
//         strict upper triangle of the n x n buffer is never written.
//   wr:   row-major d x m (column-major m x d), leading dimension n.
class Greedy {
 public:
  Greedy(double* hinv, std::vector<double>& wr, index_t d, index_t n)
      : hinv_(hinv), wr_(wr), d_(d), n_(n), m_(n), orig_(static_cast<std::size_t>(n)),
        active_(static_cast<std::size_t>(n), 1) {
    for (index_t s = 0; s < n; ++s) orig_[static_cast<std::size_t>(s)] = s;
  }

  /// Removes the g remaining columns of smallest Delta, appending their original indices to
  /// `removed` (ascending Delta, then index); returns the step's exact loss increase.
  double step(index_t g, std::vector<index_t>& removed) {
    if (inactive_ * 8 > m_) compact();
    const std::vector<index_t> group = smallest_scores(g);
    const blas_int bg = to_blas(g, "block"), bm = to_blas(m_, "columns"),
                   bd = to_blas(d_, "d"), bn = to_blas(n_, "n");

    // Hinv[B,B] = L L^T.
    std::vector<double> lbb(static_cast<std::size_t>(g * g));
    for (index_t c = 0; c < g; ++c) {
      for (index_t a = 0; a < g; ++a) lbb[static_cast<std::size_t>(c * g + a)] = at(group[a], group[c]);
    }
    blas_int info = 0;
    dpotrf_f("L", &bg, lbb.data(), &bg, &info, 1);
    if (info != 0) {
      throw LapackError("dpotrf (the inverse's block of a greedy step; raise the ridge)", info);
    }

    // Z = L^-1 Hinv[B,:] (g x m, column-major), so Hinv[:,B] Hinv[B,B]^-1 Hinv[B,:] = Z^T Z.
    std::vector<double> z(static_cast<std::size_t>(g * m_));
#pragma omp parallel for schedule(static) if (g * m_ >= kParallelElements)
    for (index_t j = 0; j < m_; ++j) {
      for (index_t a = 0; a < g; ++a) z[static_cast<std::size_t>(j * g + a)] = at(group[a], j);
    }
    const double one = 1.0, minus_one = -1.0;
    dtrsm_f("L", "L", "N", "N", &bg, &bm, &one, lbb.data(), &bg, z.data(), &bg, 1, 1, 1, 1);

    // Y = W_R[:,B] L^-T (d x g, column-major): the step costs ||Y||^2, and
    // W_R[:,B] Hinv[B,B]^-1 Hinv[B,:] = Y Z.
    std::vector<double> y(static_cast<std::size_t>(d_ * g));
    for (index_t a = 0; a < g; ++a) {
      const index_t s = group[static_cast<std::size_t>(a)];
      for (index_t r = 0; r < d_; ++r) y[static_cast<std::size_t>(a * d_ + r)] = wr_[static_cast<std::size_t>(r * n_ + s)];
    }
    dtrsm_f("R", "L", "T", "N", &bd, &bg, &one, lbb.data(), &bg, y.data(), &bd, 1, 1, 1, 1);
    double increase = 0.0;
    for (double v : y) increase += v * v;

    // Row-major W_R is column-major W_R^T (m x d): W_R^T -= Z^T Y^T. Hinv -= Z^T Z.
    dgemm_f("T", "T", &bm, &bd, &bg, &minus_one, z.data(), &bg, y.data(), &bd, &one, wr_.data(),
            &bn, 1, 1);
    dsyrk_f("L", "T", &bm, &bg, &minus_one, z.data(), &bg, &one, hinv_, &bn, 1, 1);

    // Exact zeros for the removed rows/columns (rounding leaves ~eps there).
    for (const index_t s : group) {
      for (index_t i = s; i < m_; ++i) hinv_[static_cast<std::size_t>(s * n_ + i)] = 0.0;
      for (index_t j = 0; j < s; ++j) hinv_[static_cast<std::size_t>(j * n_ + s)] = 0.0;
      active_[static_cast<std::size_t>(s)] = 0;
      removed.push_back(orig_[static_cast<std::size_t>(s)]);
    }
    for (index_t r = 0; r < d_; ++r) {
      for (const index_t s : group) wr_[static_cast<std::size_t>(r * n_ + s)] = 0.0;
    }
    inactive_ += g;
    return increase;
  }

 private:
  // Hinv(i, j) of the symmetric matrix, read from its lower triangle.
  double at(index_t i, index_t j) const {
    return i >= j ? hinv_[static_cast<std::size_t>(j * n_ + i)] : hinv_[static_cast<std::size_t>(i * n_ + j)];
  }

  // The g active stored columns of smallest ||W_R[:,s]||^2 / Hinv_ss, ties to the lower index.
  std::vector<index_t> smallest_scores(index_t g) const {
    std::vector<double> norm(static_cast<std::size_t>(m_), 0.0);
#pragma omp parallel for schedule(static) if (d_ * m_ >= kParallelElements)
    for (index_t c0 = 0; c0 < m_; c0 += kColumnChunk) {
      const index_t c1 = std::min(m_, c0 + kColumnChunk);
      for (index_t r = 0; r < d_; ++r) {
        const double* row = wr_.data() + r * n_;
        for (index_t j = c0; j < c1; ++j) norm[static_cast<std::size_t>(j)] += row[j] * row[j];
      }
    }
    std::vector<std::pair<double, index_t>> cand;
    cand.reserve(static_cast<std::size_t>(m_ - inactive_));
    for (index_t s = 0; s < m_; ++s) {
      if (!active_[static_cast<std::size_t>(s)]) continue;
      const double diag = hinv_[static_cast<std::size_t>(s * n_ + s)];
      if (!(diag > 0.0) || !std::isfinite(diag)) {
        // Exact arithmetic keeps the inverse positive definite; rounding on a badly
        // conditioned H can break that.
        throw LapackError("select_inputs: the updated inverse lost positive definiteness at column " +
                              std::to_string(orig_[static_cast<std::size_t>(s)]) + " (raise the ridge)",
                          orig_[static_cast<std::size_t>(s)]);
      }
      cand.emplace_back(norm[static_cast<std::size_t>(s)] / diag, s);
    }
    // std::pair orders by score, then stored (= original) index.
    std::nth_element(cand.begin(), cand.begin() + (g - 1), cand.end());
    std::sort(cand.begin(), cand.begin() + g);
    std::vector<index_t> group(static_cast<std::size_t>(g));
    for (index_t a = 0; a < g; ++a) group[static_cast<std::size_t>(a)] = cand[static_cast<std::size_t>(a)].second;
    return group;
  }

  // Squeezes the removed columns out of hinv and wr (same leading dimension n). In place and
  // in increasing order: new element (i, j) comes from old (o_i, o_j) with o_i >= i and
  // o_j >= j, which no earlier write has touched. Both are lower (i >= j, o_i >= o_j).
  void compact() {
    std::vector<index_t> live;
    live.reserve(static_cast<std::size_t>(m_ - inactive_));
    for (index_t s = 0; s < m_; ++s) {
      if (active_[static_cast<std::size_t>(s)]) live.push_back(s);
    }
    const index_t m = static_cast<index_t>(live.size());
    for (index_t j = 0; j < m; ++j) {
      const index_t oj = live[static_cast<std::size_t>(j)];
      for (index_t i = j; i < m; ++i) {
        hinv_[static_cast<std::size_t>(j * n_ + i)] = hinv_[static_cast<std::size_t>(oj * n_ + live[static_cast<std::size_t>(i)])];
      }
    }
#pragma omp parallel for schedule(static)
    for (index_t r = 0; r < d_; ++r) {
      double* row = wr_.data() + r * n_;
      for (index_t j = 0; j < m; ++j) row[j] = row[live[static_cast<std::size_t>(j)]];
    }
    std::vector<index_t> orig(static_cast<std::size_t>(m));
    for (index_t j = 0; j < m; ++j) orig[static_cast<std::size_t>(j)] = orig_[static_cast<std::size_t>(live[static_cast<std::size_t>(j)])];
    orig_.swap(orig);
    active_.assign(static_cast<std::size_t>(m), 1);
    m_ = m;
    inactive_ = 0;
  }

  double* hinv_;
  std::vector<double>& wr_;
  index_t d_, n_;
  index_t m_;                  // stored columns (active and removed-but-not-squeezed)
  index_t inactive_ = 0;       // removed columns still stored
  std::vector<index_t> orig_;  // stored -> original column
  std::vector<char> active_;   // per stored column
};

// Group sizes: n - keep removals, then keep - curve_to, each in groups of `block` with a
// smaller last one, so that a boundary lands exactly at keep.
std::vector<index_t> group_sizes(index_t n, index_t keep, index_t curve_to, index_t block) {
  std::vector<index_t> sizes;
  for (index_t left : {n - keep, keep - curve_to}) {
    for (; left > 0; left -= std::min(block, left)) sizes.push_back(std::min(block, left));
  }
  return sizes;
}

// W[:,cols]^T of the row-major d x n weight as a column-major |cols| x d matrix (row-major
// d x |cols|), widened exactly (float32) or copied.
template <class T>
std::vector<double> weight_columns_t(const T* weight, index_t d, index_t n,
                                     const std::vector<index_t>& cols) {
  const index_t q = static_cast<index_t>(cols.size());
  std::vector<double> out(static_cast<std::size_t>(d * q));
#pragma omp parallel for schedule(static)
  for (index_t row = 0; row < d; ++row) {
    const T* src = weight + row * n;
    double* dst = out.data() + row * q;
    for (index_t c = 0; c < q; ++c) dst[c] = static_cast<double>(src[cols[static_cast<std::size_t>(c)]]);
  }
  return out;
}

// out (column-major |rows| x |cols|) = C[rows, cols] of the original Gram after the in-place
// factorisation: C(i, j) for i != j is the untouched strict upper triangle of the column-major
// buffer (element buf[max(i, j) * n + min(i, j)]), C(i, i) the saved diagonal. In 64 x 64
// tiles, so that the half read across rows of buf stays in cache.
std::vector<double> original_block(const double* buf, index_t n, const std::vector<double>& diag,
                                   const std::vector<index_t>& rows,
                                   const std::vector<index_t>& cols) {
  constexpr index_t kTile = 64;
  const index_t p = static_cast<index_t>(rows.size()), q = static_cast<index_t>(cols.size());
  std::vector<double> out(static_cast<std::size_t>(p * q));
#pragma omp parallel for schedule(static)
  for (index_t c0 = 0; c0 < q; c0 += kTile) {
    const index_t c1 = std::min(q, c0 + kTile);
    for (index_t a0 = 0; a0 < p; a0 += kTile) {
      const index_t a1 = std::min(p, a0 + kTile);
      for (index_t a = a0; a < a1; ++a) {
        const index_t i = rows[static_cast<std::size_t>(a)];
        const double* row_i = buf + i * n;   // column i of the column-major view
        for (index_t c = c0; c < c1; ++c) {
          const index_t j = cols[static_cast<std::size_t>(c)];
          out[static_cast<std::size_t>(c * p + a)] =
              j < i ? row_i[j] : j > i ? buf[j * n + i] : diag[static_cast<std::size_t>(i)];
        }
      }
    }
  }
  return out;
}

// W'_S = W H[:,S] H[S,S]^-1 = W[:,S] + W[:,R] H[R,S] H[S,S]^-1 (R the removed columns), from
// the caller's W (row-major d x n) and C (see original_block): one Cholesky of H[S,S], with
// the smaller of |R| and d right-hand sides. Row-major d x k out. Each temporary is freed as
// soon as it has been used (the order changes no arithmetic).
template <class T>
std::vector<double> refit(const T* weight, index_t d, index_t n, const double* buf,
                          const std::vector<double>& diag, double lambda,
                          const std::vector<index_t>& kept, const std::vector<index_t>& dropped) {
  const index_t k = static_cast<index_t>(kept.size()), r = static_cast<index_t>(dropped.size());
  // Row-major d x k out is column-major k x d: out^T = W[:,S]^T (+ the correction).
  std::vector<double> out = weight_columns_t(weight, d, n, kept);
  if (r == 0) return out;

  const blas_int bk = to_blas(k, "keep"), br = to_blas(r, "removed"), bd = to_blas(d, "d");
  blas_int info = 0;
  const double one = 1.0, zero = 0.0;
  const auto factor_hss = [&] {   // column-major k x k: H[S,S] = L L^T
    std::vector<double> hss = original_block(buf, n, diag, kept, kept);
    for (index_t c = 0; c < k; ++c) hss[static_cast<std::size_t>(c * k + c)] += lambda;
    dpotrf_f("L", &bk, hss.data(), &bk, &info, 1);
    if (info != 0) throw LapackError("dpotrf (H[S,S] of the kept columns)", info);
    return hss;
  };
  if (r <= d) {
    // X = H[S,S]^-1 H[S,R]; out^T += X W[:,R]^T.
    std::vector<double> hss = factor_hss();
    std::vector<double> hsr = original_block(buf, n, diag, kept, dropped);   // k x r: H[S,R]
    dpotrs_f("L", &bk, &br, hss.data(), &bk, hsr.data(), &bk, &info, 1);
    if (info != 0) throw LapackError("dpotrs", info);
    std::vector<double>().swap(hss);
    const std::vector<double> wrt = weight_columns_t(weight, d, n, dropped);   // r x d: W[:,R]^T
    dgemm_f("N", "N", &bk, &bd, &br, &one, hsr.data(), &bk, wrt.data(), &br, &one, out.data(),
            &bk, 1, 1);
  } else {
    // out^T += H[S,S]^-1 (H[S,R] W[:,R]^T).
    std::vector<double> t(static_cast<std::size_t>(k * d));
    {
      const std::vector<double> hsr = original_block(buf, n, diag, kept, dropped);
      const std::vector<double> wrt = weight_columns_t(weight, d, n, dropped);
      dgemm_f("N", "N", &bk, &bd, &br, &one, hsr.data(), &bk, wrt.data(), &br, &zero, t.data(),
              &bk, 1, 1);
    }
    const std::vector<double> hss = factor_hss();
    dpotrs_f("L", &bk, &bd, hss.data(), &bk, t.data(), &bk, &info, 1);
    if (info != 0) throw LapackError("dpotrs", info);
    for (std::size_t i = 0; i < out.size(); ++i) out[i] += t[i];
  }
  return out;
}

// The argument checks that need no data (before a copying entry point copies anything).
void check_sizes(index_t d, index_t n, index_t keep, const SelectionOptions& options) {
  require(d >= 1 && n >= 1, "select_inputs: the weight must be at least 1 x 1, got " +
                                std::to_string(d) + " x " + std::to_string(n));
  detail::checked_elements(d, n, "select_inputs (weight)");
  detail::checked_elements(n, n, "select_inputs (gram)");
  require(keep >= 1 && keep <= n, "select_inputs: keep must be in [1, " + std::to_string(n) +
                                      "], got " + std::to_string(keep));
  const index_t curve_to = options.curve_to.value_or(keep);
  require(curve_to >= 1 && curve_to <= keep, "select_inputs: curve_to must be in [1, keep = " +
                                                  std::to_string(keep) + "], got " +
                                                  std::to_string(curve_to));
  require(options.block >= 1,
          "select_inputs: block must be >= 1, got " + std::to_string(options.block));
  require(std::isfinite(options.ridge) && options.ridge > 0,
          "select_inputs: ridge must be > 0 and finite, got " + std::to_string(options.ridge));
}

// The one implementation: `gram` is the workspace. Every check runs before it is written.
// The refit reads C from the workspace's untouched triangle, or, for the copying entry points,
// from the same elements of the caller's Gram (`source`, equal values), and then `copy` (the
// workspace) is freed before the refit allocates.
template <class T>
InputSelection select_impl(const T* weight, index_t d, index_t n, double* gram, index_t keep,
                           const SelectionOptions& options, const double* source = nullptr,
                           std::vector<double>* copy = nullptr) {
  check_sizes(d, n, keep, options);
  const std::size_t wn = static_cast<std::size_t>(d * n);
  const index_t curve_to = options.curve_to.value_or(keep);
  const blas_int bn = to_blas(n, "n"), bd = to_blas(d, "d");
  {
    const auto w0 = reinterpret_cast<std::uintptr_t>(weight), w1 = w0 + wn * sizeof(T);
    const auto g0 = reinterpret_cast<std::uintptr_t>(gram),
               g1 = g0 + static_cast<std::size_t>(n * n) * sizeof(double);
    require(w1 <= g0 || g1 <= w0, "select_inputs_in_place: weight and gram overlap (the gram is "
                                  "overwritten; pass a copy of one)");
  }
  detail::require_finite(weight, d, n, n, "weight");
  detail::require_symmetric(gram, n, "gram");

  InputSelection out;
  out.rows = d;
  out.cols = n;
  // diag C, kept for the refit: the factorisation overwrites it.
  std::vector<double> diag(static_cast<std::size_t>(n));
  double trace = 0.0;
  for (index_t i = 0; i < n; ++i) {
    diag[static_cast<std::size_t>(i)] = gram[static_cast<std::size_t>(i * n + i)];
    trace += diag[static_cast<std::size_t>(i)];
  }
  // Relative to the inputs' scale; all-zero inputs (trace 0) still get a positive ridge.
  out.lambda = options.ridge * (trace > 0 ? trace / static_cast<double>(n) : 1.0);

  // H = L L^T in the lower triangle (row-major symmetric == column-major), in place: LAPACK
  // with "L" never references the strict upper triangle, which keeps C for the refit.
  for (index_t i = 0; i < n; ++i) gram[static_cast<std::size_t>(i * n + i)] += out.lambda;
  blas_int info = 0;
  dpotrf_f("L", &bn, gram, &bn, &info, 1);
  if (info != 0) throw LapackError("dpotrf (regularised input Gram H = C + lambda I)", info);

  // W (float64) and, after the dtrmm, the greedy's W_R: the only d x n buffer. The refit reads
  // the caller's weight again.
  std::vector<double> wr(wn);
  const auto load_weight = [&] {
    if constexpr (std::is_same<T, double>::value) {
      std::copy(weight, weight + wn, wr.begin());
    } else {
      detail::widen_into(weight, static_cast<index_t>(wn), wr.data());
    }
  };
  load_weight();
  double twh = 0.0, ww = 0.0;
  for (double v : wr) ww += v * v;
  // tr(W H W^T) = ||L^T W^T||_F^2: half the flops of W C.
  const double one = 1.0;
  dtrmm_f("L", "L", "T", "N", &bn, &bd, &one, gram, &bn, wr.data(), &bn, 1, 1, 1, 1);
  for (double v : wr) twh += v * v;
  out.total_energy = std::max(0.0, twh - out.lambda * ww);

  const std::vector<index_t> sizes = group_sizes(n, keep, curve_to, options.block);
  out.curve_kept.assign(1, n);
  out.curve_loss.assign(1, 0.0);
  out.removed.reserve(static_cast<std::size_t>(n - curve_to));
  if (!sizes.empty()) {
    dpotri_f("L", &bn, gram, &bn, &info, 1);
    if (info != 0) throw LapackError("dpotri (inverse of H)", info);
    load_weight();
    Greedy greedy(gram, wr, d, n);
    index_t kept_now = n;
    double loss = 0.0;
    for (const index_t g : sizes) {
      loss += greedy.step(g, out.removed);
      kept_now -= g;
      out.curve_kept.push_back(kept_now);
      out.curve_loss.push_back(loss);
    }
  }
  std::vector<double>().swap(wr);   // the refit needs the memory

  // S = all but the first n - keep removed (a group boundary lies there).
  const std::vector<index_t> dropped(out.removed.begin(), out.removed.begin() + (n - keep));
  std::vector<char> is_dropped(static_cast<std::size_t>(n), 0);
  for (const index_t c : dropped) is_dropped[static_cast<std::size_t>(c)] = 1;
  out.kept.reserve(static_cast<std::size_t>(keep));
  for (index_t c = 0; c < n; ++c) {
    if (!is_dropped[static_cast<std::size_t>(c)]) out.kept.push_back(c);
  }
  if (copy != nullptr) std::vector<double>().swap(*copy);
  out.weight = refit(weight, d, n, source != nullptr ? source : gram, diag, out.lambda, out.kept,
                     dropped);
  return out;
}

// The copying entry points: the in-place one on a private copy, freed before the refit.
template <class T>
InputSelection select_copy(const T* weight, index_t d, index_t n, const double* gram,
                           index_t keep, const SelectionOptions& options) {
  check_sizes(d, n, keep, options);
  std::vector<double> work(gram, gram + static_cast<std::size_t>(n * n));
  return select_impl(weight, d, n, work.data(), keep, options, gram, &work);
}

template <class T>
InputSelection select_accumulated(const T* weight, index_t d, const GramAccumulator& gram,
                                  index_t keep, const SelectionOptions& options) {
  check_sizes(d, gram.dim(), keep, options);
  // A fresh symmetric copy: consumed (and kept through the refit, which reads C from it).
  std::vector<double> work = gram.gram();
  return select_impl(weight, d, gram.dim(), work.data(), keep, options);
}

}  // namespace

InputSelection select_inputs(const float* weight, index_t d, index_t n, const double* gram,
                             index_t keep, const SelectionOptions& options) {
  return select_copy(weight, d, n, gram, keep, options);
}
InputSelection select_inputs(const double* weight, index_t d, index_t n, const double* gram,
                             index_t keep, const SelectionOptions& options) {
  return select_copy(weight, d, n, gram, keep, options);
}
InputSelection select_inputs(const float* weight, index_t d, const GramAccumulator& gram,
                             index_t keep, const SelectionOptions& options) {
  return select_accumulated(weight, d, gram, keep, options);
}
InputSelection select_inputs(const double* weight, index_t d, const GramAccumulator& gram,
                             index_t keep, const SelectionOptions& options) {
  return select_accumulated(weight, d, gram, keep, options);
}
InputSelection select_inputs_in_place(const float* weight, index_t d, index_t n, double* gram,
                                      index_t keep, const SelectionOptions& options) {
  return select_impl(weight, d, n, gram, keep, options);
}
InputSelection select_inputs_in_place(const double* weight, index_t d, index_t n, double* gram,
                                      index_t keep, const SelectionOptions& options) {
  return select_impl(weight, d, n, gram, keep, options);
}

}  // namespace rom_fast
