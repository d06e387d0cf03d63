// OpenMP helpers: exception capture across a parallel region, input validation and widening
// loops.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <exception>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "rom_fast/common.hpp"

namespace rom_fast::detail {

/// Captures the first exception thrown inside an OpenMP region so it can be rethrown on the
/// calling thread: an exception escaping a parallel region terminates the process.
class ParallelErrors {
 public:
  template <class F>
  void run(F&& body) noexcept {
    try {
      body();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!first_) first_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr first_;
};

/// Throws std::invalid_argument naming `what` if any of the n x d row-major values
/// (leading dimension ld) is NaN or infinite. Checked in parallel over rows.
template <class T>
void require_finite(const T* x, index_t n, index_t d, index_t ld, const char* what) {
  ParallelErrors errors;
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < n; ++i) {
    errors.run([&] {
      const T* row = x + i * ld;
      for (index_t j = 0; j < d; ++j) {
        if (!std::isfinite(row[j])) {
          throw std::invalid_argument(std::string(what) + " has a non-finite value at row " +
                                      std::to_string(i) + ", column " + std::to_string(j));
        }
      }
    });
  }
  errors.rethrow();
}

/// dst[i] = double(src[i]) for n values (exact), in parallel.
inline void widen_into(const float* src, index_t n, double* dst) {
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < n; ++i) dst[i] = static_cast<double>(src[i]);
}

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

/// rows * cols (both >= 1) as a std::vector<double> size, or std::invalid_argument naming
/// `what` when the product overflows index_t or exceeds what a vector of doubles can hold
/// (so it cannot wrap into a small allocation followed by out-of-bounds writes).
inline std::size_t checked_elements(index_t rows, index_t cols, const char* what) {
  const auto limit = static_cast<index_t>(std::min<std::size_t>(
      std::vector<double>().max_size(), static_cast<std::size_t>(std::numeric_limits<index_t>::max())));
  if (rows > limit / cols) {
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(rows) + " x " +
                                std::to_string(cols) + " elements do not fit in memory (size overflow)");
  }
  return static_cast<std::size_t>(rows * cols);
}

}  // namespace rom_fast::detail
