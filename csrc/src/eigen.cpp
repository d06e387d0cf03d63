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

// Overwrites the symmetric d x d matrix `work` (destroyed); see top_eigenpairs for outputs.
void top_eigenpairs_inplace(double* work, index_t d, index_t r, double* values, double* vectors,
                            EigenMethod method) {
  const blas_int n = to_blas(d, "d");
  blas_int info = 0;
  if (method == EigenMethod::Auto) {
    // MRRR computes only the wanted vectors, but divide and conquer's blocked back-transform
    // is so much faster per vector that syevd wins beyond r ~ d/5 (bench/README.md: syevr is
    // 1.4-1.7x faster at r = d/10 and 1.25-1.3x slower at r = 0.3 d, for d = 576..4096).
    method = (r * 5 <= d) ? EigenMethod::Syevr : EigenMethod::Syevd;
  }
  if (method == EigenMethod::Syevd) {
    std::vector<double> w(static_cast<std::size_t>(d));
    blas_int lwork = -1, liwork = -1, iwork_query = 0;
    double work_query = 0.0;
    dsyevd_f("V", "L", &n, work, &n, w.data(), &work_query, &lwork, &iwork_query, &liwork, &info,
             1, 1);
    if (info != 0) throw LapackError("dsyevd (workspace query)", info);
    lwork = static_cast<blas_int>(work_query);
    liwork = iwork_query;
    std::vector<double> lw(static_cast<std::size_t>(lwork));
    std::vector<blas_int> iw(static_cast<std::size_t>(liwork));
    dsyevd_f("V", "L", &n, work, &n, w.data(), lw.data(), &lwork, iw.data(), &liwork, &info, 1, 1);
    if (info != 0) throw LapackError("dsyevd", info);
    // Ascending in LAPACK; column j (contiguous) is the eigenvector of w[j].
    for (index_t i = 0; i < r; ++i) {
      const index_t col = d - 1 - i;
      values[i] = w[col];
      std::memcpy(vectors + i * d, work + col * d, sizeof(double) * d);
    }
    return;
  }
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
  lwork = static_cast<blas_int>(work_query);
  liwork = iwork_query;
  std::vector<double> lw(static_cast<std::size_t>(lwork));
  std::vector<blas_int> iw(static_cast<std::size_t>(liwork));
  dsyevr_f("V", "I", "L", &n, work, &n, &vl, &vu, &il, &iu, &abstol, &found, w.data(), z.data(),
           &n, isuppz.data(), lw.data(), &lwork, iw.data(), &liwork, &info, 1, 1, 1);
  if (info != 0) throw LapackError("dsyevr", info);
  if (found != static_cast<blas_int>(r)) throw LapackError("dsyevr (eigenvalue count)", found);
  for (index_t i = 0; i < r; ++i) {
    const index_t col = r - 1 - i;
    values[i] = w[col];
    std::memcpy(vectors + i * d, z.data() + col * d, sizeof(double) * d);
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
  lwork = static_cast<blas_int>(work_query);
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
