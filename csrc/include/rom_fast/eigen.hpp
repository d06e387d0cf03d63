// Largest eigenpairs of a real symmetric matrix.
#pragma once

#include <vector>

#include "rom_fast/common.hpp"

namespace rom_fast {

enum class EigenMethod {
  Auto,   ///< syevr when r <= d/10, else stedc (the measured crossover, bench/README.md)
  Syevd,  ///< LAPACK's divide-and-conquer driver: all eigenvectors back-transformed
  Syevr,  ///< MRRR, only the requested r eigenpairs
  Stedc,  ///< syevd's steps (sytrd, stedc), back-transforming only the r kept vectors
};

/// The r largest eigenpairs of the symmetric d x d matrix `a` (row-major; only symmetry
/// within 1e-8 relative is accepted). 1 <= r <= d.
///   values  : r, descending
///   vectors : r x d row-major, row i is the unit eigenvector of values[i]
/// Throws std::invalid_argument for bad sizes, non-finite or non-symmetric input, and
/// LapackError if the solver fails.
void top_eigenpairs(const double* a, index_t d, index_t r, double* values, double* vectors,
                    EigenMethod method = EigenMethod::Auto);

/// All eigenvalues of the symmetric d x d matrix `a`, descending (no eigenvectors: much
/// cheaper). Same checks as top_eigenpairs.
std::vector<double> eigenvalues(const double* a, index_t d);

}  // namespace rom_fast
