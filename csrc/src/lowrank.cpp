#include "rom_fast/lowrank.hpp"

#include <string>

#include "blas_lapack.hpp"
#include "parallel.hpp"

namespace rom_fast {

using detail::blas_int;
using detail::require;
using detail::to_blas;

namespace {

template <class T, class Gemm>
void apply(Gemm gemm, const T* x, index_t n, index_t d_in, const T* w1, const T* w2,
           index_t d_out, index_t r, const T* b1, T* y, T* scratch) {
  require(n >= 0 && d_in >= 1 && d_out >= 1 && r >= 1,
          "lowrank_apply: bad sizes n=" + std::to_string(n) + " d_in=" + std::to_string(d_in) +
              " d_out=" + std::to_string(d_out) + " r=" + std::to_string(r));
  require(x && w1 && w2 && y && scratch, "lowrank_apply: null pointer");
  if (n == 0) return;
  const blas_int bn = to_blas(n, "n"), bi = to_blas(d_in, "d_in"), bo = to_blas(d_out, "d_out"),
                 br = to_blas(r, "r");
  const T one = 1, zero = 0;
  // Column-major views: X^T (d_in x n), W2^T (d_in x r), W1^T (r x d_out).
  // T^T = W2 X^T  (r x n);  Y^T = W1 T^T  (d_out x n).
  gemm("T", "N", &br, &bn, &bi, &one, w2, &bi, x, &bi, &zero, scratch, &br, 1, 1);
  if (b1) {
#pragma omp parallel for schedule(static)
    for (index_t t = 0; t < n; ++t) {
      for (index_t j = 0; j < d_out; ++j) y[t * d_out + j] = b1[j];
    }
  }
  const T beta = b1 ? one : zero;
  gemm("T", "N", &bo, &bn, &br, &one, w1, &br, scratch, &br, &beta, y, &bo, 1, 1);
}

}  // namespace

void lowrank_apply(const float* x, index_t n, index_t d_in, const float* w1, const float* w2,
                   index_t d_out, index_t r, const float* b1, float* y, float* scratch) {
  apply(sgemm_f, x, n, d_in, w1, w2, d_out, r, b1, y, scratch);
}

void lowrank_apply(const double* x, index_t n, index_t d_in, const double* w1, const double* w2,
                   index_t d_out, index_t r, const double* b1, double* y, double* scratch) {
  apply(dgemm_f, x, n, d_in, w1, w2, d_out, r, b1, y, scratch);
}

}  // namespace rom_fast
