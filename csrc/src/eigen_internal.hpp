// Eigen-solver entry points shared inside the core (no validation; callers validate).
#pragma once

#include <vector>

#include "rom_fast/eigen.hpp"

namespace rom_fast::detail {

/// Throws std::invalid_argument unless the d x d matrix is finite and symmetric.
void require_symmetric(const double* a, index_t d, const char* what);

/// top_eigenpairs on a scratch copy that it destroys.
void top_eigenpairs_inplace(double* work, index_t d, index_t r, double* values, double* vectors,
                            EigenMethod method);

/// All eigenvalues, descending, of a scratch copy that it destroys.
std::vector<double> eigenvalues_inplace(double* work, index_t d);

}  // namespace rom_fast::detail
