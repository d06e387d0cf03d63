#include <algorithm>

#include "check.hpp"
#include "rom_fast/rom_fast.hpp"

using rom_fast::index_t;

// Random orthogonal Q (modified Gram-Schmidt on a Gaussian matrix), A = Q diag(lam) Q^T.
static std::vector<double> spd_with_spectrum(const std::vector<double>& lam, unsigned seed) {
  const index_t d = static_cast<index_t>(lam.size());
  auto q = check::randn(d * d, seed);  // rows are the vectors
  for (index_t i = 0; i < d; ++i) {
    for (index_t j = 0; j < i; ++j) {
      double dot = 0;
      for (index_t t = 0; t < d; ++t) dot += q[i * d + t] * q[j * d + t];
      for (index_t t = 0; t < d; ++t) q[i * d + t] -= dot * q[j * d + t];
    }
    double nrm = 0;
    for (index_t t = 0; t < d; ++t) nrm += q[i * d + t] * q[i * d + t];
    nrm = std::sqrt(nrm);
    for (index_t t = 0; t < d; ++t) q[i * d + t] /= nrm;
  }
  std::vector<double> a(d * d, 0.0);
  for (index_t k = 0; k < d; ++k)
    for (index_t i = 0; i < d; ++i)
      for (index_t j = 0; j < d; ++j) a[i * d + j] += lam[k] * q[k * d + i] * q[k * d + j];
  return a;
}

int main() {
  const index_t d = 60;
  std::vector<double> lam(d);
  for (index_t i = 0; i < d; ++i) lam[i] = std::pow(0.8, static_cast<double>(i));  // 1 .. 2e-6
  const auto a = spd_with_spectrum(lam, 7);
  for (auto method : {rom_fast::EigenMethod::Syevd, rom_fast::EigenMethod::Syevr,
                      rom_fast::EigenMethod::Stedc, rom_fast::EigenMethod::Auto}) {
    for (index_t r : {index_t{1}, index_t{10}, d}) {
      std::vector<double> vals(r), vecs(r * d);
      rom_fast::top_eigenpairs(a.data(), d, r, vals.data(), vecs.data(), method);
      for (index_t i = 0; i < r; ++i) {
        CHECK_CLOSE(vals[i], lam[i], 1e-12);
        // Residual ||A v - lam v|| and unit norm.
        double res = 0, nrm = 0;
        for (index_t row = 0; row < d; ++row) {
          double av = 0;
          for (index_t t = 0; t < d; ++t) av += a[row * d + t] * vecs[i * d + t];
          res = std::max(res, std::abs(av - vals[i] * vecs[i * d + row]));
          nrm += vecs[i * d + row] * vecs[i * d + row];
        }
        CHECK(res < 1e-12);
        CHECK_CLOSE(nrm, 1.0, 1e-12);
      }
    }
  }
  const auto all = rom_fast::eigenvalues(a.data(), d);
  for (index_t i = 0; i < d; ++i) CHECK_CLOSE(all[i], lam[i], 1e-12);

  std::vector<double> vals(d), vecs(d * d);
  CHECK(check::throws<std::invalid_argument>(
      [&] { rom_fast::top_eigenpairs(a.data(), d, 0, vals.data(), vecs.data()); }));
  CHECK(check::throws<std::invalid_argument>(
      [&] { rom_fast::top_eigenpairs(a.data(), d, d + 1, vals.data(), vecs.data()); }));
  auto asym = a;
  asym[1] += 0.5;
  CHECK(check::throws<std::invalid_argument>(
      [&] { rom_fast::top_eigenpairs(asym.data(), d, 3, vals.data(), vecs.data()); }));
  return check::report("test_eigen");
}
