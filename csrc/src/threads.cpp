#include "rom_fast/threads.hpp"

#include <stdexcept>

#ifdef _OPENMP
#include <omp.h>
#endif

// Name of OpenBLAS's thread setter for this build (e.g. scipy_openblas_set_num_threads),
// defined by CMake when the BLAS is OpenBLAS.
#ifdef ROM_FAST_OPENBLAS_SET_THREADS
extern "C" void ROM_FAST_OPENBLAS_SET_THREADS(int);
#endif

namespace rom_fast {

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads: n must be >= 1, got " + std::to_string(n));
#ifdef _OPENMP
  omp_set_num_threads(n);
#endif
#ifdef ROM_FAST_OPENBLAS_SET_THREADS
  ROM_FAST_OPENBLAS_SET_THREADS(n);
#endif
}

int get_num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool blas_threads_controlled() {
#ifdef ROM_FAST_OPENBLAS_SET_THREADS
  return true;
#else
  return false;
#endif
}

}  // namespace rom_fast
