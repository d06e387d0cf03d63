// The one place BLAS/LAPACK is declared (Fortran interface).
//
// ROM_FAST_BLAS_PREFIX / ROM_FAST_BLAS_SUFFIX mangle the names: scipy-openblas from PyPI
// exports `scipy_dsyrk_`, a system OpenBLAS/MKL exports `dsyrk_`, an ILP64 build may add
// `64_`. ROM_FAST_BLAS_ILP64 selects 64-bit integers. Character arguments are followed by
// their hidden Fortran lengths, as gfortran-compiled LAPACK expects.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "lapack_workspace.hpp"
#include "rom_fast/common.hpp"

namespace rom_fast::detail {

#ifdef ROM_FAST_BLAS_ILP64
using blas_int = std::int64_t;
#else
using blas_int = std::int32_t;
#endif

/// Converts a size to the BLAS integer, refusing silently truncated dimensions.
inline blas_int to_blas(index_t v, const char* what) {
  if (v < 0 || v > static_cast<index_t>(std::numeric_limits<blas_int>::max())) {
    throw std::invalid_argument(std::string(what) + " = " + std::to_string(v) +
                                " does not fit the BLAS integer type");
  }
  return static_cast<blas_int>(v);
}

/// The size a workspace query (lwork = -1) returned, checked (lapack_workspace.hpp).
inline blas_int lwork_from(double query, const char* routine) {
  return workspace_size<blas_int>(query, routine);
}

}  // namespace rom_fast::detail

#ifndef ROM_FAST_BLAS_PREFIX
#define ROM_FAST_BLAS_PREFIX
#endif
#ifndef ROM_FAST_BLAS_SUFFIX
#define ROM_FAST_BLAS_SUFFIX _
#endif
#define ROM_FAST_CAT_(a, b) a##b
#define ROM_FAST_CAT(a, b) ROM_FAST_CAT_(a, b)
#define ROM_FAST_F77(name) ROM_FAST_CAT(ROM_FAST_CAT(ROM_FAST_BLAS_PREFIX, name), ROM_FAST_BLAS_SUFFIX)

#define dsyrk_f ROM_FAST_F77(dsyrk)
#define ssyrk_f ROM_FAST_F77(ssyrk)
#define dgemm_f ROM_FAST_F77(dgemm)
#define sgemm_f ROM_FAST_F77(sgemm)
#define dtrmm_f ROM_FAST_F77(dtrmm)
#define dsyevd_f ROM_FAST_F77(dsyevd)
#define dsyevr_f ROM_FAST_F77(dsyevr)
#define dsytrd_f ROM_FAST_F77(dsytrd)
#define dstedc_f ROM_FAST_F77(dstedc)
#define dormtr_f ROM_FAST_F77(dormtr)
#define dpstrf_f ROM_FAST_F77(dpstrf)
#define dpotrf_f ROM_FAST_F77(dpotrf)
#define dpotrs_f ROM_FAST_F77(dpotrs)
#define dpotri_f ROM_FAST_F77(dpotri)
#define dtrsm_f ROM_FAST_F77(dtrsm)

extern "C" {
using rom_fast::detail::blas_int;
using fortran_len = std::size_t;

void dsyrk_f(const char* uplo, const char* trans, const blas_int* n, const blas_int* k,
             const double* alpha, const double* a, const blas_int* lda, const double* beta,
             double* c, const blas_int* ldc, fortran_len, fortran_len);
void ssyrk_f(const char* uplo, const char* trans, const blas_int* n, const blas_int* k,
             const float* alpha, const float* a, const blas_int* lda, const float* beta,
             float* c, const blas_int* ldc, fortran_len, fortran_len);
void dgemm_f(const char* transa, const char* transb, const blas_int* m, const blas_int* n,
             const blas_int* k, const double* alpha, const double* a, const blas_int* lda,
             const double* b, const blas_int* ldb, const double* beta, double* c,
             const blas_int* ldc, fortran_len, fortran_len);
void sgemm_f(const char* transa, const char* transb, const blas_int* m, const blas_int* n,
             const blas_int* k, const float* alpha, const float* a, const blas_int* lda,
             const float* b, const blas_int* ldb, const float* beta, float* c,
             const blas_int* ldc, fortran_len, fortran_len);
void dtrmm_f(const char* side, const char* uplo, const char* transa, const char* diag,
             const blas_int* m, const blas_int* n, const double* alpha, const double* a,
             const blas_int* lda, double* b, const blas_int* ldb, fortran_len, fortran_len,
             fortran_len, fortran_len);
void dsyevd_f(const char* jobz, const char* uplo, const blas_int* n, double* a,
              const blas_int* lda, double* w, double* work, const blas_int* lwork,
              blas_int* iwork, const blas_int* liwork, blas_int* info, fortran_len, fortran_len);
void dsyevr_f(const char* jobz, const char* range, const char* uplo, const blas_int* n, double* a,
              const blas_int* lda, const double* vl, const double* vu, const blas_int* il,
              const blas_int* iu, const double* abstol, blas_int* m, double* w, double* z,
              const blas_int* ldz, blas_int* isuppz, double* work, const blas_int* lwork,
              blas_int* iwork, const blas_int* liwork, blas_int* info, fortran_len, fortran_len,
              fortran_len);
void dsytrd_f(const char* uplo, const blas_int* n, double* a, const blas_int* lda, double* d,
              double* e, double* tau, double* work, const blas_int* lwork, blas_int* info,
              fortran_len);
void dstedc_f(const char* compz, const blas_int* n, double* d, double* e, double* z,
              const blas_int* ldz, double* work, const blas_int* lwork, blas_int* iwork,
              const blas_int* liwork, blas_int* info, fortran_len);
void dormtr_f(const char* side, const char* uplo, const char* trans, const blas_int* m,
              const blas_int* n, const double* a, const blas_int* lda, const double* tau,
              double* c, const blas_int* ldc, double* work, const blas_int* lwork, blas_int* info,
              fortran_len, fortran_len, fortran_len);
void dpstrf_f(const char* uplo, const blas_int* n, double* a, const blas_int* lda, blas_int* piv,
              blas_int* rank, const double* tol, double* work, blas_int* info, fortran_len);
void dpotrf_f(const char* uplo, const blas_int* n, double* a, const blas_int* lda, blas_int* info,
              fortran_len);
void dpotrs_f(const char* uplo, const blas_int* n, const blas_int* nrhs, const double* a,
              const blas_int* lda, double* b, const blas_int* ldb, blas_int* info, fortran_len);
void dpotri_f(const char* uplo, const blas_int* n, double* a, const blas_int* lda, blas_int* info,
              fortran_len);
void dtrsm_f(const char* side, const char* uplo, const char* transa, const char* diag,
             const blas_int* m, const blas_int* n, const double* alpha, const double* a,
             const blas_int* lda, double* b, const blas_int* ldb, fortran_len, fortran_len,
             fortran_len, fortran_len);
}
