// Shared conventions of the rom_fast core.
//
// Layout: every matrix argument is a dense ROW-MAJOR array; "n x d" means n rows of d
// contiguous elements. Sizes are std::int64_t (the BLAS integer width is an internal
// detail, see ROM_FAST_BLAS_ILP64).
//
// Errors: invalid arguments (sizes, ranks, non-finite values, non-symmetric input) throw
// std::invalid_argument; a LAPACK failure (info != 0 where it is not expected) throws
// rom_fast::LapackError; a problem whose LAPACK workspace does not fit the BLAS integer type
// (a 32-bit LAPACK at d ~ 32768) throws std::overflow_error. No exception ever escapes an
// OpenMP region: the first one is captured and rethrown on the calling thread.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace rom_fast {

using index_t = std::int64_t;

/// Raised when a LAPACK routine reports failure (e.g. an eigensolver that did not converge).
class LapackError : public std::runtime_error {
 public:
  LapackError(const std::string& routine, long long info)
      : std::runtime_error(routine + " failed with info = " + std::to_string(info)), info_(info) {}
  long long info() const noexcept { return info_; }

 private:
  long long info_;
};

/// Element types accepted for activations and weights. Statistics are always float64.
enum class DType { Float32, Float64 };

}  // namespace rom_fast
