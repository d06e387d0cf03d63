// Workspace sizes returned by LAPACK's workspace queries (lwork = -1), as integers.
//
// LAPACK reports the optimal size of a double workspace in work[0], a double: cast unchecked,
// a NaN, a negative value or one past the BLAS integer range (a 32-bit LAPACK near d = 32768
// for dsyevd) is undefined behaviour or a silently short buffer. Kept free of BLAS
// declarations so that the C++ tests can include it.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

namespace rom_fast::detail {

/// The workspace size `query` as `Int`, at least 1; throws std::overflow_error naming `routine`
/// for a NaN/Inf/negative value or one the integer type cannot hold.
template <class Int>
Int workspace_size(double query, const char* routine) {
  // 2^63 as a double is exact; `max() + 1.0` for int32 is exact too.
  const double limit = static_cast<double>(std::numeric_limits<Int>::max()) + 1.0;
  if (!std::isfinite(query) || query < 0.0 || std::ceil(query) >= limit) {
    throw std::overflow_error(std::string(routine) + ": workspace of " + std::to_string(query) +
                              " elements does not fit the " +
                              std::to_string(8 * sizeof(Int)) +
                              "-bit LAPACK integer (a smaller problem, or an ILP64 LAPACK with "
                              "ROM_FAST_BLAS_ILP64, is needed)");
  }
  // ceil: a size just under an integer (rounded by LAPACK) must not lose an element.
  const Int n = static_cast<Int>(std::ceil(query));
  return n < 1 ? Int{1} : n;
}

}  // namespace rom_fast::detail
