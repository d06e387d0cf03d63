#include "rom_fast/anchor.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "blas_lapack.hpp"
#include "parallel.hpp"

namespace rom_fast {

using detail::blas_int;
using detail::require;
using detail::to_blas;

namespace {

// Rows per dgemm call: float32 chunks are widened to float64 this many rows at a time, and a
// weight is corrected in bands of this many rows (no whole float64 copy of an 11008-row layer).
index_t band_rows(index_t width) { return std::max<index_t>(256, (index_t{1} << 21) / width); }

}  // namespace

CrossGramAccumulator::CrossGramAccumulator(index_t dim_dense, index_t dim_comp)
    : dim_dense_(dim_dense), dim_comp_(dim_comp) {
  require(dim_dense >= 1 && dim_comp >= 1,
          "CrossGramAccumulator: dims must be >= 1, got " + std::to_string(dim_dense) + " x " +
              std::to_string(dim_comp));
  cross_.assign(detail::checked_elements(dim_dense, dim_comp, "CrossGramAccumulator"), 0.0);
  dense_sum_.assign(static_cast<std::size_t>(dim_dense), 0.0);
}

template <class T>
void CrossGramAccumulator::update_impl(const T* x_dense, const T* x_comp, index_t n) {
  require(n >= 0, "CrossGramAccumulator: n must be >= 0");
  if (n == 0) return;
  const index_t dd = dim_dense_, dc = dim_comp_;
  // Validate everything before committing anything: a failed update changes nothing.
  detail::require_finite(x_dense, n, dd, dd, "x_dense");
  detail::require_finite(x_comp, n, dc, dc, "x_comp");
  const blas_int m = to_blas(dc, "dim_comp"), nn = to_blas(dd, "dim_dense");
  const double one = 1.0;
  // Row-major C (dd x dc) is column-major C^T (dc x dd) = Xc^T Xd, with the row-major chunks
  // read as their column-major transposes: no copies for float64 input.
  const index_t step = std::is_same<T, double>::value ? n : band_rows(std::max(dd, dc));
  std::vector<double> wd, wc;
  for (index_t r0 = 0; r0 < n; r0 += step) {
    const index_t rows = std::min(step, n - r0);
    const double *pd, *pc;
    if constexpr (std::is_same<T, double>::value) {
      pd = x_dense + r0 * dd;
      pc = x_comp + r0 * dc;
    } else {
      wd.resize(static_cast<std::size_t>(rows * dd));
      wc.resize(static_cast<std::size_t>(rows * dc));
      detail::widen_into(x_dense + r0 * dd, rows * dd, wd.data());
      detail::widen_into(x_comp + r0 * dc, rows * dc, wc.data());
      pd = wd.data();
      pc = wc.data();
    }
    const blas_int k = to_blas(rows, "rows");
    dgemm_f("N", "T", &m, &nn, &k, &one, pc, &m, pd, &nn, &one, cross_.data(), &m, 1, 1);
    for (index_t i = 0; i < rows; ++i) {
      const double* row = pd + i * dd;
      for (index_t j = 0; j < dd; ++j) dense_sum_[static_cast<std::size_t>(j)] += row[j];
    }
  }
  count_ += n;
}

void CrossGramAccumulator::update(const float* x_dense, const float* x_comp, index_t n) {
  update_impl(x_dense, x_comp, n);
}
void CrossGramAccumulator::update(const double* x_dense, const double* x_comp, index_t n) {
  update_impl(x_dense, x_comp, n);
}

void CrossGramAccumulator::merge(const CrossGramAccumulator& other) {
  require(other.dim_dense_ == dim_dense_ && other.dim_comp_ == dim_comp_,
          "CrossGramAccumulator::merge: dims differ");
  for (std::size_t i = 0; i < cross_.size(); ++i) cross_[i] += other.cross_[i];
  for (std::size_t i = 0; i < dense_sum_.size(); ++i) dense_sum_[i] += other.dense_sum_[i];
  count_ += other.count_;
}

void CrossGramAccumulator::cross(double* out) const {
  std::copy(cross_.begin(), cross_.end(), out);
}

namespace {

std::vector<double> gram_of(const GramAccumulator& a) {
  std::vector<double> g(static_cast<std::size_t>(a.dim() * a.dim()));
  a.gram(g.data());
  return g;
}

std::vector<double> cross_of(const CrossGramAccumulator& a) {
  std::vector<double> c(static_cast<std::size_t>(a.dim_dense() * a.dim_comp()));
  a.cross(c.data());
  return c;
}

const CrossGramAccumulator& matching(const GramAccumulator& comp, const CrossGramAccumulator& cross) {
  const index_t d = comp.dim();
  require(cross.dim_dense() == d && cross.dim_comp() == d,
          "AnchorCorrection: the cross moment is " + std::to_string(cross.dim_dense()) + " x " +
              std::to_string(cross.dim_comp()) + ", the Gram " + std::to_string(d) + " x " +
              std::to_string(d));
  require(cross.count() == comp.count(),
          "AnchorCorrection: the Gram and the cross moment count different tokens (" +
              std::to_string(comp.count()) + " vs " + std::to_string(cross.count()) + ")");
  return cross;
}

}  // namespace

AnchorCorrection::AnchorCorrection(const GramAccumulator& comp, const CrossGramAccumulator& cross,
                                   double ridge, bool with_bias)
    : AnchorCorrection(comp.dim(), gram_of(comp).data(), comp.column_sum().data(),
                       cross_of(matching(comp, cross)).data(), cross.dense_column_sum().data(),
                       static_cast<double>(comp.count()), ridge, with_bias) {}

AnchorCorrection::AnchorCorrection(index_t d, const double* gram, const double* s_c,
                                   const double* cdc, const double* s_d, double n, double ridge,
                                   bool with_bias)
    : dim_(d), with_bias_(with_bias) {
  require(d >= 1, "AnchorCorrection: d must be >= 1");
  require(n >= 1, "AnchorCorrection: no tokens were accumulated");
  require(std::isfinite(ridge) && ridge > 0, "AnchorCorrection: ridge must be > 0");
  detail::require_finite(gram, d, d, d, "gram");
  detail::require_finite(cdc, d, d, d, "cross");
  if (with_bias) {
    detail::require_finite(s_c, 1, d, d, "comp_sum");
    detail::require_finite(s_d, 1, d, d, "dense_sum");
  }
  const index_t D = d + (with_bias ? 1 : 0);
  std::vector<double> a(static_cast<std::size_t>(D * D));
  double trace = 0.0;
  for (index_t i = 0; i < d; ++i) trace += gram[static_cast<std::size_t>(i * d + i)];
  // Relative to the inputs' scale; an all-zero input (trace 0) still gets a positive ridge.
  lambda_ = ridge * (trace > 0 ? trace / static_cast<double>(d) : 1.0);

  // A = C_cc (+ constant feature) + lambda I; the right-hand side, row-major D = C_dc - C_cc,
  // read by LAPACK as its column-major transpose: A X = D^T gives X = M^T, i.e. row-major M.
  m_.assign(static_cast<std::size_t>(D * D), 0.0);
  for (index_t i = 0; i < d; ++i) {
    for (index_t j = 0; j < d; ++j) {
      const std::size_t ij = static_cast<std::size_t>(i * d + j);
      a[static_cast<std::size_t>(i * D + j)] = gram[ij];
      m_[static_cast<std::size_t>(i * D + j)] = cdc[ij] - gram[ij];
    }
  }
  if (with_bias) {
    for (index_t i = 0; i < d; ++i) {
      a[static_cast<std::size_t>(i * D + d)] = a[static_cast<std::size_t>(d * D + i)] =
          s_c[i];
      m_[static_cast<std::size_t>(i * D + d)] =
          s_d[i] - s_c[i];
    }
    a[static_cast<std::size_t>(d * D + d)] = n;
  }
  for (index_t i = 0; i < D; ++i) a[static_cast<std::size_t>(i * D + i)] += lambda_;
  const blas_int bn = to_blas(D, "dim");
  blas_int info = 0;
  dpotrf_f("L", &bn, a.data(), &bn, &info, 1);
  if (info != 0) throw LapackError("dpotrf (regularised input Gram)", info);
  dpotrs_f("L", &bn, &bn, a.data(), &bn, m_.data(), &bn, &info, 1);
  if (info != 0) throw LapackError("dpotrs", info);
}

template <class T>
void AnchorCorrection::apply_impl(const T* w, index_t d_out, const T* bias, double alpha,
                                  double* w_eff, double* b_eff) const {
  require(d_out >= 1, "AnchorCorrection::apply: d_out must be >= 1");
  require(!std::isnan(alpha) && alpha >= 0, "AnchorCorrection::apply: alpha must be >= 0");
  require(with_bias_ || (bias == nullptr && b_eff == nullptr),
          "AnchorCorrection::apply: a bias needs a correction built with_bias");
  require(!with_bias_ || b_eff != nullptr, "AnchorCorrection::apply: b_eff is needed");
  const index_t d = dim_, D = d + (with_bias_ ? 1 : 0);
  detail::require_finite(w, d_out, d, d, "weight");
  if (bias != nullptr) detail::require_finite(bias, 1, d_out, d_out, "bias");
  const double f = std::isinf(alpha) ? 1.0 : alpha / (1.0 + alpha);
  const double one = 1.0;
  const blas_int bd = to_blas(d, "dim"), bD = to_blas(D, "dim"), b1 = 1;
  const index_t step = band_rows(D);
  std::vector<double> band;
  for (index_t r0 = 0; r0 < d_out; r0 += step) {
    const index_t rows = std::min(step, d_out - r0);
    // [W, b] for this band of rows, float64, leading dimension D.
    band.resize(static_cast<std::size_t>(rows * D));
    for (index_t i = 0; i < rows; ++i) {
      const T* src = w + (r0 + i) * d;
      double* dst = band.data() + i * D;
      for (index_t j = 0; j < d; ++j) dst[j] = static_cast<double>(src[j]);
      if (with_bias_) dst[d] = bias == nullptr ? 0.0 : static_cast<double>(bias[r0 + i]);
      std::copy(dst, dst + d, w_eff + (r0 + i) * d);
    }
    const blas_int br = to_blas(rows, "rows");
    // Row-major (W_band M) is column-major M^T W_band^T: add f times its first d rows into
    // w_eff (column-major d x rows, ld d) and its last row into b_eff.
    dgemm_f("N", "N", &bd, &br, &bD, &f, m_.data(), &bD, band.data(), &bD, &one,
            w_eff + r0 * d, &bd, 1, 1);
    if (with_bias_) {
      for (index_t i = 0; i < rows; ++i) b_eff[r0 + i] = band[static_cast<std::size_t>(i * D + d)];
      dgemm_f("N", "N", &b1, &br, &bD, &f, m_.data() + d, &bD, band.data(), &bD, &one,
              b_eff + r0, &b1, 1, 1);
    }
  }
}

void AnchorCorrection::apply(const float* w, index_t d_out, const float* bias, double alpha,
                             double* w_eff, double* b_eff) const {
  apply_impl(w, d_out, bias, alpha, w_eff, b_eff);
}
void AnchorCorrection::apply(const double* w, index_t d_out, const double* bias, double alpha,
                             double* w_eff, double* b_eff) const {
  apply_impl(w, d_out, bias, alpha, w_eff, b_eff);
}

}  // namespace rom_fast
