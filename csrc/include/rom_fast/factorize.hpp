// Reduced order model of one linear layer: y = W x + b  ->  y ~ W1 (W2 x + b2) + b1.
//
// Given the statistics of the layer's inputs x (or of its outputs y), the top-r eigenvectors
// V_r (r x d_out) of the output second moment C_y = W C_x W^T give W2 = V_r W (r x d_in),
// W1 = V_r^T (d_out x r): the best rank-r fit of the outputs on the calibration tokens in
// Frobenius norm (Eckart-Young). All arithmetic is float64.
#pragma once

#include <vector>

#include "rom_fast/common.hpp"
#include "rom_fast/eigen.hpp"

namespace rom_fast {

enum class Centering {
  Uncentered,  ///< second moment E[y y^T]: optimal rank-r *linear* fit (the default)
  Centered,    ///< covariance: optimal rank-r *affine* fit; the mean goes into the bias b1
};

/// A factor F (p x k, k <= p) of the input statistic, with F F^T equal to
///   Uncentered, no bias : G = sum x x^T                           (p = d_in)
///   Uncentered, bias    : [[G, s], [s^T, N]]  (inputs augmented with a constant 1,
///                         so the layer's bias is part of the fit)  (p = d_in + 1)
///   Centered            : G - s s^T / N                           (p = d_in)
/// computed once per input and shared by every layer that reads it (q/k/v; gate/up).
/// It is a rank-revealing pivoted Cholesky factor (LAPACK dpstrf): exact for rank-deficient
/// statistics (fewer tokens than d_in, dead channels), where plain Cholesky whitening fails;
/// the factor is only multiplied, never inverted. Columns whose pivot falls below
/// p * eps * max(diag) are dropped (their energy is below float64 resolution).
class InputFactor {
 public:
  /// gram: d x d symmetric (row-major). colsum: d (may be null only for Uncentered without
  /// bias). count: number of tokens (>= 1 where colsum is used).
  InputFactor(const double* gram, index_t dim, const double* colsum, double count,
              Centering centering, bool with_bias);

  index_t dim() const noexcept { return dim_; }         ///< d_in
  index_t rows() const noexcept { return rows_; }       ///< p (d_in, or d_in + 1 with bias)
  index_t rank() const noexcept { return rank_; }       ///< k, numerical rank
  Centering centering() const noexcept { return centering_; }
  bool with_bias() const noexcept { return with_bias_; }
  /// Input mean s / N (d_in); empty unless Centered.
  const std::vector<double>& mean() const noexcept { return mean_; }

  /// Lower-trapezoidal L (p x k, column-major) and pivots: F = P L, i.e. row perm()[i] of F
  /// is row i of L.
  const std::vector<double>& lower() const noexcept { return lower_; }
  const std::vector<index_t>& perm() const noexcept { return perm_; }

 private:
  index_t dim_, rows_, rank_ = 0;
  Centering centering_;
  bool with_bias_;
  std::vector<double> mean_;
  std::vector<double> lower_;
  std::vector<index_t> perm_;
};

/// Result of factorizing one layer. Row-major, float64.
struct LowRankFactors {
  index_t d_out = 0, d_in = 0, rank = 0;
  std::vector<double> w1;  ///< d_out x rank  (= V_r^T)
  std::vector<double> w2;  ///< rank x d_in   (= V_r W)
  std::vector<double> b1;  ///< d_out, or empty (output bias; Centered mode)
  std::vector<double> b2;  ///< rank, or empty (= V_r b; uncentered layer with a bias)
  std::vector<double> eigenvalues;  ///< the rank largest eigenvalues of C_y, descending
  double total_energy = 0.0;        ///< trace(C_y); the fit's squared error is total - sum(eigenvalues)
  double eigen_seconds = 0.0;       ///< wall time in the eigensolver; the rest of the call is products
};

/// Factorizes W (d_out x d_in) with optional bias (d_out, may be null) from its input factor.
/// The eigenproblem is solved in min(d_out, k) dimensions: for d_out > k (gate/up
/// projections) via the k x k Gram of B = W F, never as a d_out x d_out eigendecomposition.
/// Eigen-directions whose energy is below 1e-10 of the largest carry nothing on the
/// calibration data and are returned as zero rows/columns. 1 <= rank <= min(d_out, d_in).
/// A layer with a bias needs a factor built with_bias (Uncentered) or Centered.
LowRankFactors factorize_layer(const double* weight, index_t d_out, index_t d_in,
                               const double* bias, const InputFactor& factor, index_t rank,
                               EigenMethod method = EigenMethod::Auto);
LowRankFactors factorize_layer(const float* weight, index_t d_out, index_t d_in,
                               const float* bias, const InputFactor& factor, index_t rank,
                               EigenMethod method = EigenMethod::Auto);

/// The same from the Gram of the layer's *outputs* y = W x + b (d_out x d_out), the cheap
/// route when d_in > d_out (down_proj). Centered needs colsum_out (d_out) and count.
LowRankFactors factorize_layer_output_gram(const double* weight, index_t d_out, index_t d_in,
                                           const double* bias, const double* gram_out,
                                           const double* colsum_out, double count,
                                           Centering centering, index_t rank,
                                           EigenMethod method = EigenMethod::Auto);
LowRankFactors factorize_layer_output_gram(const float* weight, index_t d_out, index_t d_in,
                                           const float* bias, const double* gram_out,
                                           const double* colsum_out, double count,
                                           Centering centering, index_t rank,
                                           EigenMethod method = EigenMethod::Auto);

/// All eigenvalues of C_y (descending; min(d_out, k) of them, the rest are zero): the exact
/// truncation loss of every rank, sum(values[r:]), for rank planning. Float32 weights are read
/// as they are (the arithmetic is float64).
std::vector<double> output_spectrum(const double* weight, index_t d_out, index_t d_in,
                                    const double* bias, const InputFactor& factor);
std::vector<double> output_spectrum(const float* weight, index_t d_out, index_t d_in,
                                    const float* bias, const InputFactor& factor);

}  // namespace rom_fast
