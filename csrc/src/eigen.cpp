#include "rom_fast/eigen.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "blas_lapack.hpp"
#include "eigen_internal.hpp"
#include "parallel.hpp"

namespace rom_fast {

using detail::blas_int;
using detail::require;
using detail::to_blas;

namespace detail {

// Auto uses syevr for r <= d / kSyevrMaxFraction.
constexpr index_t kSyevrMaxFraction = 10;

void require_symmetric(const double* a, index_t d, const char* what) {
  require_finite(a, d, d, d, what);
  double scale = 0.0, asym = 0.0;
  for (index_t i = 0; i < d; ++i) {
    for (index_t j = 0; j <= i; ++j) {
      scale = std::max(scale, std::abs(a[i * d + j]));
      asym = std::max(asym, std::abs(a[i * d + j] - a[j * d + i]));
    }
  }
  require(asym <= 1e-8 * scale, std::string(what) + " is not symmetric (max |a_ij - a_ji| = " +
                                    std::to_string(asym) + ", max |a_ij| = " +
                                    std::to_string(scale) + ")");
}

namespace {

// LAPACK returns eigenpairs ascending: `ascending` holds `count` eigenvalues and `columns` the
// matching unit eigenvectors as contiguous columns of length d. Copies the r largest out,
// largest first (row i of the row-major r x d `vectors` is the vector of values[i]).
void copy_largest_first(const double* ascending, const double* columns, index_t count, index_t d,
                        index_t r, double* values, double* vectors) {
  for (index_t i = 0; i < r; ++i) {
    const index_t col = count - 1 - i;
    values[i] = ascending[col];
    std::memcpy(vectors + i * d, columns + col * d, sizeof(double) * d);
  }
}

// LAPACK's syevd driver: every eigenvector is back-transformed; the top r are copied out.
void top_eigenpairs_syevd(double* work, index_t d, index_t r, double* values, double* vectors) {
  const blas_int n = to_blas(d, "d");
  blas_int info = 0;
  std::vector<double> w(static_cast<std::size_t>(d));
  blas_int lwork = -1, liwork = -1, iwork_query = 0;
  double work_query = 0.0;
  dsyevd_f("V", "L", &n, work, &n, w.data(), &work_query, &lwork, &iwork_query, &liwork, &info,
           1, 1);
  if (info != 0) throw LapackError("dsyevd (workspace query)", info);
  lwork = detail::lwork_from(work_query, "dsyevd");
  liwork = std::max<blas_int>(1, iwork_query);
  std::vector<double> lw(static_cast<std::size_t>(lwork));
  std::vector<blas_int> iw(static_cast<std::size_t>(liwork));
  dsyevd_f("V", "L", &n, work, &n, w.data(), lw.data(), &lwork, iw.data(), &liwork, &info, 1, 1);
  if (info != 0) throw LapackError("dsyevd", info);
  copy_largest_first(w.data(), work, d, d, r, values, vectors);
}

// syevd's three steps, with the last one cut to what is kept: tridiagonal reduction (sytrd),
// all eigenpairs of the tridiagonal by divide and conquer (stedc, cheap: O(d^2) to O(d^3)
// with heavy deflation), then the Householder back-transform (ormtr) of only the r kept
// vectors. The full back-transform is ~half of syevd's time at d = 4096 (bench/README.md).
void top_eigenpairs_stedc(double* work, index_t d, index_t r, double* values, double* vectors) {
  const blas_int n = to_blas(d, "d"), nr = to_blas(r, "r");
  blas_int info = 0, lwork = -1, liwork = -1, iwork_query = 0;
  double work_query = 0.0;
  std::vector<double> diag(static_cast<std::size_t>(d)), off(static_cast<std::size_t>(d)),
      tau(static_cast<std::size_t>(d));
  dsytrd_f("L", &n, work, &n, diag.data(), off.data(), tau.data(), &work_query, &lwork, &info, 1);
  if (info != 0) throw LapackError("dsytrd (workspace query)", info);
  lwork = detail::lwork_from(work_query, "dsytrd");
  std::vector<double> lw(static_cast<std::size_t>(lwork));
  dsytrd_f("L", &n, work, &n, diag.data(), off.data(), tau.data(), lw.data(), &lwork, &info, 1);
  if (info != 0) throw LapackError("dsytrd", info);

  std::vector<double> z(static_cast<std::size_t>(d * d));
  lwork = -1;
  dstedc_f("I", &n, diag.data(), off.data(), z.data(), &n, &work_query, &lwork, &iwork_query,
           &liwork, &info, 1);
  if (info != 0) throw LapackError("dstedc (workspace query)", info);
  lwork = detail::lwork_from(work_query, "dstedc");
  liwork = std::max<blas_int>(1, iwork_query);
  lw.assign(static_cast<std::size_t>(lwork), 0.0);
  std::vector<blas_int> iw(static_cast<std::size_t>(liwork));
  dstedc_f("I", &n, diag.data(), off.data(), z.data(), &n, lw.data(), &lwork, iw.data(), &liwork,
           &info, 1);
  if (info != 0) throw LapackError("dstedc", info);
  // The kept vectors, then back-transformed in place (row-major r x d is column-major d x r).
  copy_largest_first(diag.data(), z.data(), d, d, r, values, vectors);
  std::vector<double>().swap(z);

  lwork = -1;
  dormtr_f("L", "L", "N", &n, &nr, work, &n, tau.data(), vectors, &n, &work_query, &lwork, &info,
           1, 1, 1);
  if (info != 0) throw LapackError("dormtr (workspace query)", info);
  lwork = detail::lwork_from(work_query, "dormtr");
  lw.assign(static_cast<std::size_t>(lwork), 0.0);
  dormtr_f("L", "L", "N", &n, &nr, work, &n, tau.data(), vectors, &n, lw.data(), &lwork, &info,
           1, 1, 1);
  if (info != 0) throw LapackError("dormtr", info);
}

// LAPACK's syevr driver for a subset. For an index range it does not use MRRR but bisection
// and inverse iteration, which is why it loses beyond small r.
void top_eigenpairs_syevr(double* work, index_t d, index_t r, double* values, double* vectors) {
  const blas_int n = to_blas(d, "d");
  blas_int info = 0;
  const blas_int il = to_blas(d - r + 1, "il"), iu = n;
  const double vl = 0.0, vu = 0.0, abstol = 0.0;
  blas_int found = 0;
  std::vector<double> w(static_cast<std::size_t>(d));
  std::vector<double> z(static_cast<std::size_t>(d * r));
  std::vector<blas_int> isuppz(static_cast<std::size_t>(2 * r));
  blas_int lwork = -1, liwork = -1, iwork_query = 0;
  double work_query = 0.0;
  dsyevr_f("V", "I", "L", &n, work, &n, &vl, &vu, &il, &iu, &abstol, &found, w.data(), z.data(),
           &n, isuppz.data(), &work_query, &lwork, &iwork_query, &liwork, &info, 1, 1, 1);
  if (info != 0) throw LapackError("dsyevr (workspace query)", info);
  lwork = detail::lwork_from(work_query, "dsyevr");
  liwork = std::max<blas_int>(1, iwork_query);
  std::vector<double> lw(static_cast<std::size_t>(lwork));
  std::vector<blas_int> iw(static_cast<std::size_t>(liwork));
  dsyevr_f("V", "I", "L", &n, work, &n, &vl, &vu, &il, &iu, &abstol, &found, w.data(), z.data(),
           &n, isuppz.data(), lw.data(), &lwork, iw.data(), &liwork, &info, 1, 1, 1);
  if (info != 0) throw LapackError("dsyevr", info);
  if (found != static_cast<blas_int>(r)) throw LapackError("dsyevr (eigenvalue count)", found);
  copy_largest_first(w.data(), z.data(), r, d, r, values, vectors);
}

}  // namespace

// Overwrites the symmetric d x d matrix `work` (destroyed); see top_eigenpairs for outputs.
void top_eigenpairs_inplace(double* work, index_t d, index_t r, double* values, double* vectors,
                            EigenMethod method) {
  if (method == EigenMethod::Auto) {
    // The measured crossover (bench/README.md, `bench_kernels.py eigen`).
    method = (r * kSyevrMaxFraction <= d) ? EigenMethod::Syevr : EigenMethod::Stedc;
  }
  switch (method) {
    case EigenMethod::Syevd: return top_eigenpairs_syevd(work, d, r, values, vectors);
    case EigenMethod::Syevr: return top_eigenpairs_syevr(work, d, r, values, vectors);
    default: return top_eigenpairs_stedc(work, d, r, values, vectors);
  }
}

std::vector<double> eigenvalues_inplace(double* work, index_t d) {
  const blas_int n = to_blas(d, "d");
  blas_int info = 0, lwork = -1, liwork = -1, iwork_query = 0;
  double work_query = 0.0;
  std::vector<double> w(static_cast<std::size_t>(d));
  dsyevd_f("N", "L", &n, work, &n, w.data(), &work_query, &lwork, &iwork_query, &liwork, &info, 1,
           1);
  if (info != 0) throw LapackError("dsyevd (workspace query)", info);
  lwork = detail::lwork_from(work_query, "dsyevd");
  liwork = std::max<blas_int>(1, iwork_query);
  std::vector<double> lw(static_cast<std::size_t>(lwork));
  std::vector<blas_int> iw(static_cast<std::size_t>(liwork));
  dsyevd_f("N", "L", &n, work, &n, w.data(), lw.data(), &lwork, iw.data(), &liwork, &info, 1, 1);
  if (info != 0) throw LapackError("dsyevd", info);
  std::reverse(w.begin(), w.end());
  return w;
}

}  // namespace detail

void top_eigenpairs(const double* a, index_t d, index_t r, double* values, double* vectors,
                    EigenMethod method) {
  require(d >= 1, "top_eigenpairs: matrix dimension must be >= 1");
  require(r >= 1 && r <= d, "top_eigenpairs: r must be in [1, " + std::to_string(d) + "], got " +
                                std::to_string(r));
  detail::require_symmetric(a, d, "sym");
  std::vector<double> work(a, a + d * d);
  detail::top_eigenpairs_inplace(work.data(), d, r, values, vectors, method);
}

std::vector<double> eigenvalues(const double* a, index_t d) {
  require(d >= 1, "eigenvalues: matrix dimension must be >= 1");
  detail::require_symmetric(a, d, "sym");
  std::vector<double> work(a, a + d * d);
  return detail::eigenvalues_inplace(work.data(), d);
}

}  // namespace rom_fast
