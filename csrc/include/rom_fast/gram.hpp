// Streaming second-moment (Gram) accumulation over calibration tokens.
#pragma once

#include <vector>

#include "rom_fast/common.hpp"

namespace rom_fast {

/// Accumulates G = sum_t x_t x_t^T (d x d), the column sum s = sum_t x_t (d) and the token
/// count N over any number of row-major chunks X (n x d). Products are formed in float64
/// (float32 input is widened exactly), so the result depends on the chunking only through
/// float64 rounding. The d x d product uses BLAS dsyrk (half the flops of a general product).
///
/// Thread safety: one accumulator must not be updated from two threads at once; use one
/// accumulator per producer and merge() them.
class GramAccumulator {
 public:
  /// d >= 1, else std::invalid_argument.
  explicit GramAccumulator(index_t dim);

  /// Adds the n rows of `x` (n x d, row-major, leading dimension d). n == 0 is a no-op.
  /// Throws std::invalid_argument, leaving the accumulator unchanged, if any value is not
  /// finite.
  void update(const float* x, index_t n);
  void update(const double* x, index_t n);

  /// Adds the statistics of `other` (same dim, else std::invalid_argument).
  void merge(const GramAccumulator& other);

  /// Clears all statistics.
  void reset();

  index_t dim() const noexcept { return dim_; }
  /// Number of rows added so far.
  index_t count() const noexcept { return count_; }

  /// Writes the full symmetric d x d Gram (row-major == column-major) into `out`.
  void gram(double* out) const;
  std::vector<double> gram() const;

  /// Column sum (d).
  const std::vector<double>& column_sum() const noexcept { return colsum_; }

  /// Writes the centred scatter matrix G - s s^T / N (d x d). N must be >= 1.
  void centered_gram(double* out) const;

 private:
  template <class T>
  void scan_chunk(const T* x, index_t n, std::vector<double>& sums) const;
  void commit(const std::vector<double>& sums, index_t n);
  void accumulate_f64(const double* x, index_t n, index_t ld);

  index_t dim_;
  index_t count_ = 0;
  std::vector<double> upper_;   // column-major d x d, upper triangle valid
  std::vector<double> colsum_;  // d
  std::vector<double> staging_; // float32 -> float64 widening buffer, reused across updates
};

}  // namespace rom_fast
