// Dense-anchored targets: statistics that tie the compressed model's activations to the dense
// model's at the same tokens, and the regression that turns them into a layer's target.
//
// A layer W (d_out x d_in) sees X_c (N x d_in) on the compressed path and X_d on the dense
// one. The paper fits W X_c; the anchored objective
//     min_B  ||W X_c - B X_c||^2 + alpha ||W X_d - B X_c||^2,   rank(B) <= r
// is the ROM of an *effective* weight on the same inputs X_c:
//     W_eff = W C_mix C_cc^-1,  C_mix = (C_cc + alpha C_dc) / (1 + alpha),
//     C_cc = X_c^T X_c, C_dc = X_d^T X_c,
// so factorize_layer(W_eff, InputFactor(C_cc), r) gives its exact optimum (reduced-rank
// regression). It corrects the drift the layers before have introduced instead of fitting it.
#pragma once

#include <vector>

#include "rom_fast/common.hpp"
#include "rom_fast/gram.hpp"

namespace rom_fast {

/// Accumulates C_dc = sum_t xd_t xc_t^T (d_dense x d_comp), the column sum of the dense rows
/// and the pair count N over row-aligned chunks: row t of x_dense and row t of x_comp are the
/// same token on the two paths. Products are formed in float64 (float32 input is widened
/// exactly) with BLAS dgemm.
///
/// Thread safety: as GramAccumulator (one updater at a time; merge() per-producer copies).
class CrossGramAccumulator {
 public:
  /// dim_dense, dim_comp >= 1, else std::invalid_argument; so are dims whose product overflows
  /// index_t or a vector's capacity.
  CrossGramAccumulator(index_t dim_dense, index_t dim_comp);

  /// Adds n row pairs: x_dense (n x dim_dense) and x_comp (n x dim_comp), both row-major.
  /// Throws std::invalid_argument, leaving the accumulator unchanged, on a non-finite value.
  void update(const float* x_dense, const float* x_comp, index_t n);
  void update(const double* x_dense, const double* x_comp, index_t n);

  /// Adds the statistics of `other` (same dims, else std::invalid_argument).
  void merge(const CrossGramAccumulator& other);

  index_t dim_dense() const noexcept { return dim_dense_; }
  index_t dim_comp() const noexcept { return dim_comp_; }
  index_t count() const noexcept { return count_; }

  /// Writes C_dc (dim_dense x dim_comp, row-major) into `out`.
  void cross(double* out) const;
  /// Column sum of the dense rows (dim_dense).
  const std::vector<double>& dense_column_sum() const noexcept { return dense_sum_; }

 private:
  template <class T>
  void update_impl(const T* x_dense, const T* x_comp, index_t n);

  index_t dim_dense_, dim_comp_;
  index_t count_ = 0;
  std::vector<double> cross_;      // row-major dim_dense x dim_comp
  std::vector<double> dense_sum_;  // dim_dense
};

/// The drift correction shared by the layers of one stage (q/k/v, or gate/up):
///     M = (C_dc - C_cc) (C_cc + lambda I)^-1,   lambda = ridge * mean(diag C_cc),
/// over the d inputs, or over d + 1 with a constant feature (`with_bias`) so a layer bias is
/// fitted too. Then W_eff = W + f W M with f = alpha / (1 + alpha) (1 for alpha = inf) and
/// alpha = 0 gives W exactly. C_cc + lambda I is positive definite for any lambda > 0 (C_cc is
/// a Gram), so one Cholesky solve is safe even on rank-deficient statistics: the ridge is what
/// makes the regression well posed there.
class AnchorCorrection {
 public:
  /// `comp` holds C_cc (and the compressed column sum and N), `cross` C_dc over the same
  /// tokens (dims d x d, same count). ridge > 0. Throws std::invalid_argument on mismatched
  /// statistics, LapackError if the regularised Gram is not positive definite.
  AnchorCorrection(const GramAccumulator& comp, const CrossGramAccumulator& cross, double ridge,
                   bool with_bias);
  /// The same from materialised statistics (e.g. summed over processes): `gram` and `cross`
  /// d x d row-major, `comp_sum` and `dense_sum` d (read only with_bias), `count` = N >= 1.
  AnchorCorrection(index_t d, const double* gram, const double* comp_sum, const double* cross,
                   const double* dense_sum, double count, double ridge, bool with_bias);

  index_t dim() const noexcept { return dim_; }
  bool with_bias() const noexcept { return with_bias_; }
  double lambda() const noexcept { return lambda_; }

  /// w_eff = w + f w M (d_out x d, row-major, float64 out) and, with a bias, b_eff (d_out).
  /// `bias` may be null (treated as zero) when with_bias(); b_eff must be null otherwise.
  /// alpha >= 0 (infinity allowed), else std::invalid_argument.
  void apply(const float* w, index_t d_out, const float* bias, double alpha, double* w_eff,
             double* b_eff) const;
  void apply(const double* w, index_t d_out, const double* bias, double alpha, double* w_eff,
             double* b_eff) const;

 private:
  template <class T>
  void apply_impl(const T* w, index_t d_out, const T* bias, double alpha, double* w_eff,
                  double* b_eff) const;

  index_t dim_;                  // d (the layer's d_in)
  bool with_bias_;
  double lambda_ = 0.0;
  std::vector<double> m_;        // row-major (d + b) x (d + b): the correction M
};

}  // namespace rom_fast
