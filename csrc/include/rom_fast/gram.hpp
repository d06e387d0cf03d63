// Streaming second-moment (Gram) accumulation over calibration tokens.
#pragma once

#include <vector>

#include "rom_fast/common.hpp"

namespace rom_fast {

/// Arithmetic of the d x d product for float32 chunks (float64 chunks always use dsyrk).
enum class GramPrecision {
  /// ssyrk over blocks of at most block_rows() rows of one chunk into a float32 scratch; each
  /// block's product is added into the float64 Gram. Per element, against the exact Gram of
  /// the float32 values: |err_ij| <= (B u32 + m u64) sum_t |x_ti||x_tj| with B the block rows,
  /// u32 = 2^-24, and m the number of blocks added so far (float64 accumulation of the blocks).
  /// About twice the speed of Float64 at d >= 1536; blocks never straddle two update() calls, so splitting
  /// the tokens by whole chunks (e.g. across processes) changes only float64 summation order
  /// at a given thread count. The thread count may change the float32 rounding (OpenBLAS
  /// splits the sums by it), within the bound.
  Float32,
  /// float32 values widened exactly to float64, then dsyrk: |err_ij| <= n u64 sum_t |x_ti||x_tj|.
  /// The default: Float32's ~1e-7 relative Gram error moved a tiny Qwen2's compressed logits by
  /// 1.7e-4 of their maximum against the float64 reference (tests/test_pipeline.py allows 1e-4).
  Float64,
};

/// Accumulates G = sum_t x_t x_t^T (d x d), the column sum s = sum_t x_t (d) and the token
/// count N over any number of row-major chunks X (n x d). The Gram is held in float64; for
/// float32 input its products are formed as `precision` says (float64 input: in float64, so
/// the result depends on the chunking only through float64 rounding). Column sums and the
/// finiteness check are always exact float64 sums in token order. The d x d product uses BLAS
/// ?syrk (half the flops of a general product).
///
/// Thread safety: one accumulator must not be updated from two threads at once; use one
/// accumulator per producer and merge() them.
class GramAccumulator {
 public:
  /// Rows per float32 block unless told: the error bound's B (B u32 = 6.1e-5 worst case;
  /// random-sign rounding typically gives ~sqrt(B) u32 = 1.9e-6) and long enough for ssyrk to
  /// run at its GEMM rate (bench/README.md, "Gram accumulation").
  static constexpr index_t kDefaultBlockRows = 1024;

  /// d >= 1 and block_rows >= 1, else std::invalid_argument; so is a d whose d x d Gram
  /// overflows index_t or a vector's capacity (d > ~1.07e9 with libstdc++). block_rows applies to
  /// GramPrecision::Float32 only. The float32 path holds a d x d float32 scratch (4 d^2 bytes,
  /// allocated at its first use).
  explicit GramAccumulator(index_t dim, GramPrecision precision = GramPrecision::Float64,
                           index_t block_rows = kDefaultBlockRows);

  /// Adds the n rows of `x` (n x d, row-major, leading dimension d). n == 0 is a no-op.
  /// Throws std::invalid_argument, leaving the accumulator unchanged, if any value is not
  /// finite.
  void update(const float* x, index_t n);
  void update(const double* x, index_t n);

  /// Adds the statistics of `other` (same dim, else std::invalid_argument).
  void merge(const GramAccumulator& other);

  /// Clears all statistics (and re-allocates the Gram after take_gram()).
  void reset();

  /// Hands the full symmetric d x d Gram over without a copy: the upper triangle is mirrored
  /// in place and the buffer moved out, and the float32 scratch / widening buffers are freed,
  /// so the caller holds the accumulator's only d x d (0.97 GB at d = 11008, where gram() would
  /// briefly hold two). The accumulator is then spent: update, merge, gram, centered_gram and
  /// a second take_gram throw std::logic_error until reset(); dim, count and column_sum stay.
  std::vector<double> take_gram();
  bool taken() const noexcept { return taken_; }

  index_t dim() const noexcept { return dim_; }
  GramPrecision precision() const noexcept { return precision_; }
  index_t block_rows() const noexcept { return block_rows_; }
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
  void accumulate_f32_blocks(const float* x, index_t n);
  void accumulate_f32_widened(const float* x, index_t n);
  void require_live(const char* what) const;

  index_t dim_;
  GramPrecision precision_;
  index_t block_rows_;
  index_t count_ = 0;
  bool taken_ = false;            // take_gram() moved upper_ out
  std::vector<double> upper_;   // column-major d x d, upper triangle valid
  std::vector<double> colsum_;  // d
  std::vector<double> staging_; // float32 -> float64 widening buffer (Float64), reused
  std::vector<float> scratch_;   // column-major d x d block product (Float32), reused
};

}  // namespace rom_fast
