#include "rom_fast/gram.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "blas_lapack.hpp"
#include "parallel.hpp"

namespace rom_fast {

using detail::blas_int;
using detail::require;
using detail::to_blas;

namespace {

// Rows widened per dsyrk call for float32 input (GramPrecision::Float64): large enough for dsyrk to run at its
// GEMM-like rate, small enough that the float64 copy stays in a few MB of cache-friendly
// memory. The token split does not change the result beyond float64 rounding.
index_t staging_rows(index_t dim) { return std::max<index_t>(1024, (index_t{1} << 22) / dim); }

// Below these sizes a pass runs on one thread: a parallel region's start-up (and, on a shared
// machine, waiting for a core that BLAS's just-finished threads still spin on) costs more than
// the pass. Measured: a pipeline chunk's (1024 x 576) column sums, ~1 ms on one thread.
constexpr index_t kParallelScanValues = index_t{1} << 22;
constexpr index_t kParallelFlushDim = 2048;

}  // namespace

GramAccumulator::GramAccumulator(index_t dim, GramPrecision precision, index_t block_rows)
    : dim_(dim), precision_(precision), block_rows_(block_rows) {
  require(dim >= 1, "GramAccumulator: dim must be >= 1, got " + std::to_string(dim));
  require(block_rows >= 1,
          "GramAccumulator: block_rows must be >= 1, got " + std::to_string(block_rows));
  require(precision == GramPrecision::Float32 || precision == GramPrecision::Float64,
          "GramAccumulator: unknown precision");
  upper_.assign(detail::checked_elements(dim, dim, "GramAccumulator"), 0.0);
  colsum_.assign(static_cast<std::size_t>(dim), 0.0);
}

// One pass over the chunk: checks finiteness and forms its column sums (each thread owns a
// contiguous range of columns and walks the rows in token order, so the sums do not depend on
// the thread count). Nothing is committed when a value is not finite.
template <class T>
void GramAccumulator::scan_chunk(const T* x, index_t n, std::vector<double>& sums) const {
  const index_t d = dim_;
  sums.assign(static_cast<std::size_t>(d), 0.0);
  double* out = sums.data();
  detail::ParallelErrors errors;
#pragma omp parallel if (n * d >= kParallelScanValues)
  {
    index_t lo = 0, hi = d;
#ifdef _OPENMP
    const index_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    lo = d * t / nt;
    hi = d * (t + 1) / nt;
#endif
    errors.run([&] {
      for (index_t i = 0; i < n; ++i) {
        const T* row = x + i * d;
        for (index_t j = lo; j < hi; ++j) out[j] += static_cast<double>(row[j]);
      }
      // A NaN or infinity anywhere in a column makes its sum non-finite; then find it.
      for (index_t j = lo; j < hi; ++j) {
        if (!std::isfinite(out[j])) detail::require_finite(x, n, d, d, "x");
      }
    });
  }
  errors.rethrow();
}

void GramAccumulator::commit(const std::vector<double>& sums, index_t n) {
  for (index_t j = 0; j < dim_; ++j) colsum_[j] += sums[j];
  count_ += n;
}

void GramAccumulator::accumulate_f64(const double* x, index_t n, index_t ld) {
  // Row-major X (n x d) is column-major X^T (d x n): X^T X = (X^T)(X^T)^T = syrk('N').
  const blas_int bn = to_blas(dim_, "dim"), bk = to_blas(n, "rows"), blda = to_blas(ld, "ld");
  const double one = 1.0;
  dsyrk_f("U", "N", &bn, &bk, &one, x, &blda, &one, upper_.data(), &bn, 1, 1);
}

void GramAccumulator::require_live(const char* what) const {
  if (taken_) {
    throw std::logic_error(std::string("GramAccumulator.") + what +
                           ": the Gram was handed over by take_gram(); reset() to reuse");
  }
}

void GramAccumulator::update(const double* x, index_t n) {
  require_live("update");
  require(n >= 0, "GramAccumulator.update: negative row count");
  if (n == 0) return;
  std::vector<double> sums;
  scan_chunk(x, n, sums);  // throws before anything is modified
  accumulate_f64(x, n, dim_);
  commit(sums, n);
}

void GramAccumulator::accumulate_f32_blocks(const float* x, index_t n) {
  const index_t d = dim_;
  if (scratch_.empty()) scratch_.resize(static_cast<std::size_t>(d * d));
  const blas_int bn = to_blas(d, "dim");
  const float one = 1.0f, zero = 0.0f;
  float* s = scratch_.data();
  double* up = upper_.data();
  for (index_t start = 0; start < n; start += block_rows_) {
    const blas_int bk = to_blas(std::min(block_rows_, n - start), "rows");
    // beta = 0: the scratch holds this block alone, so float32 error never spans blocks.
    ssyrk_f("U", "N", &bn, &bk, &one, x + start * d, &bn, &zero, s, &bn, 1, 1);
    // Column j holds j + 1 valid values: small interleaved chunks balance the triangle.
#pragma omp parallel for schedule(static, 16) if (d >= kParallelFlushDim)
    for (index_t j = 0; j < d; ++j) {
      const float* src = s + j * d;
      double* dst = up + j * d;
      for (index_t i = 0; i <= j; ++i) dst[i] += static_cast<double>(src[i]);
    }
  }
}

void GramAccumulator::accumulate_f32_widened(const float* x, index_t n) {
  const index_t block = std::min(n, staging_rows(dim_));
  staging_.resize(static_cast<std::size_t>(block * dim_));
  for (index_t start = 0; start < n; start += block) {
    const index_t rows = std::min(block, n - start);
    detail::widen_into(x + start * dim_, rows * dim_, staging_.data());
    accumulate_f64(staging_.data(), rows, dim_);
  }
}

void GramAccumulator::update(const float* x, index_t n) {
  require_live("update");
  require(n >= 0, "GramAccumulator.update: negative row count");
  if (n == 0) return;
  std::vector<double> sums;
  scan_chunk(x, n, sums);  // throws before anything is modified
  if (precision_ == GramPrecision::Float32) {
    accumulate_f32_blocks(x, n);
  } else {
    accumulate_f32_widened(x, n);
  }
  commit(sums, n);
}

void GramAccumulator::merge(const GramAccumulator& other) {
  require_live("merge");
  other.require_live("merge (other)");
  require(other.dim_ == dim_, "GramAccumulator.merge: dim mismatch (" + std::to_string(dim_) +
                                  " vs " + std::to_string(other.dim_) + ")");
  const index_t total = dim_ * dim_;
  const double* src = other.upper_.data();
  double* dst = upper_.data();
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < total; ++i) dst[i] += src[i];
  for (index_t j = 0; j < dim_; ++j) colsum_[j] += other.colsum_[j];
  count_ += other.count_;
}

void GramAccumulator::reset() {
  if (taken_) {
    upper_.assign(static_cast<std::size_t>(dim_ * dim_), 0.0);
    taken_ = false;
  } else {
    std::fill(upper_.begin(), upper_.end(), 0.0);
  }
  std::fill(colsum_.begin(), colsum_.end(), 0.0);
  count_ = 0;
}

void GramAccumulator::gram(double* out) const {
  require_live("gram");
  const index_t d = dim_;
  const double* up = upper_.data();
  // upper_ is column-major with (i <= j) valid at up[j * d + i]; mirror into a full matrix.
#pragma omp parallel for schedule(static)
  for (index_t j = 0; j < d; ++j) {
    for (index_t i = 0; i <= j; ++i) {
      const double v = up[j * d + i];
      out[j * d + i] = v;
      out[i * d + j] = v;
    }
  }
}

std::vector<double> GramAccumulator::gram() const {
  require_live("gram");
  std::vector<double> out(static_cast<std::size_t>(dim_ * dim_));
  gram(out.data());
  return out;
}

std::vector<double> GramAccumulator::take_gram() {
  require_live("take_gram");
  const index_t d = dim_;
  double* g = upper_.data();
  // (i <= j) is valid at g[j * d + i]; its mirror g[i * d + j] lies in the invalid lower part.
#pragma omp parallel for schedule(static, 16) if (d >= kParallelFlushDim)
  for (index_t j = 0; j < d; ++j) {
    for (index_t i = 0; i < j; ++i) g[i * d + j] = g[j * d + i];
  }
  std::vector<double> out = std::move(upper_);
  upper_ = std::vector<double>();
  std::vector<float>().swap(scratch_);
  std::vector<double>().swap(staging_);
  taken_ = true;
  return out;
}

void GramAccumulator::centered_gram(double* out) const {
  require_live("centered_gram");
  require(count_ >= 1, "centered_gram: no tokens accumulated");
  gram(out);
  const index_t d = dim_;
  const double inv_n = 1.0 / static_cast<double>(count_);
  const double* s = colsum_.data();
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < d; ++i) {
    for (index_t j = 0; j < d; ++j) out[i * d + j] -= s[i] * s[j] * inv_n;
  }
}

}  // namespace rom_fast
