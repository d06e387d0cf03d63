// Thread control for the core's OpenMP regions and its BLAS.
#pragma once

namespace rom_fast {

/// Sets the number of threads used by rom_fast's OpenMP loops and, when the BLAS is
/// OpenBLAS, by BLAS/LAPACK calls. n >= 1, else std::invalid_argument.
void set_num_threads(int n);
/// The current OpenMP thread count used by rom_fast.
int get_num_threads();
/// Whether BLAS threading is controlled by set_num_threads (OpenBLAS builds).
bool blas_threads_controlled();

}  // namespace rom_fast
