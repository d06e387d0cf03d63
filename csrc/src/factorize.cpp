#include "rom_fast/factorize.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "blas_lapack.hpp"
#include "eigen_internal.hpp"
#include "parallel.hpp"

namespace rom_fast {

using detail::blas_int;
using detail::require;
using detail::to_blas;

namespace {

// Directions of C_y whose energy is below this fraction of the largest cannot be recovered
// accurately through the k x k Gram (their error grows like eps * lambda_max / lambda_i) and
// carry no energy on the calibration data, so they are returned as zeros.
constexpr double kNegligibleEnergy = 1e-10;

// top_eigenpairs_inplace, adding its wall time to out.eigen_seconds.
void timed_top_eigenpairs(double* a, index_t d, index_t r, double* values, double* vectors,
                          EigenMethod method, LowRankFactors& out) {
  const auto t0 = std::chrono::steady_clock::now();
  detail::top_eigenpairs_inplace(a, d, r, values, vectors, method);
  out.eigen_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

std::vector<double> widen(const float* x, index_t n) {
  std::vector<double> out(static_cast<std::size_t>(n));
  detail::widen_into(x, n, out.data());
  return out;
}

template <class T>
void check_layer(const T* weight, index_t d_out, index_t d_in, const double* bias,
                 index_t rank) {
  require(d_out >= 1 && d_in >= 1, "weight must have positive dimensions, got " +
                                       std::to_string(d_out) + " x " + std::to_string(d_in));
  require(rank >= 1 && rank <= std::min(d_out, d_in),
          "rank must be in [1, min(d_out, d_in)] = [1, " + std::to_string(std::min(d_out, d_in)) +
              "], got " + std::to_string(rank));
  detail::require_finite(weight, d_out, d_in, d_in, "weight");
  if (bias) detail::require_finite(bias, 1, d_out, d_out, "bias");
}

// B = W~ F  (d_out x k, column-major), W~ = [W, bias] when the factor is augmented.
template <class T>
std::vector<double> project_weight(const T* weight, index_t m, index_t n, const double* bias,
                                   const InputFactor& f) {
  const index_t p = f.rows(), k = f.rank();
  const std::vector<index_t>& perm = f.perm();
  // Column i of the permuted weight is column perm[i] of W~ (the constant feature is n).
  std::vector<double> wp(static_cast<std::size_t>(m * p));
#pragma omp parallel for schedule(static)
  for (index_t i = 0; i < p; ++i) {
    const index_t src = perm[i];
    double* col = wp.data() + i * m;
    if (src < n) {
      for (index_t row = 0; row < m; ++row) col[row] = static_cast<double>(weight[row * n + src]);
    } else {
      for (index_t row = 0; row < m; ++row) col[row] = bias ? bias[row] : 0.0;
    }
  }
  if (k == 0) return {};
  // L = [L11; L21] (L11 k x k lower triangular): B = Wp[:, :k] L11 + Wp[:, k:] L21.
  const blas_int bm = to_blas(m, "d_out"), bk = to_blas(k, "rank"), bp = to_blas(p, "dim");
  const double one = 1.0;
  dtrmm_f("R", "L", "N", "N", &bm, &bk, &one, f.lower().data(), &bp, wp.data(), &bm, 1, 1, 1, 1);
  if (p > k) {
    const blas_int rest = to_blas(p - k, "dim");
    dgemm_f("N", "N", &bm, &bk, &rest, &one, wp.data() + k * m, &bm, f.lower().data() + k, &bp,
            &one, wp.data(), &bm, 1, 1);
  }
  wp.resize(static_cast<std::size_t>(m * k));
  return wp;
}

// Float32 weights are widened to float64 for V_r W one band of kWidenRows rows at a time,
// after the caller's projection and eigensolver buffers are gone: widening a whole 11008 x 4096
// weight would add 360 MB to the factorization's peak, a band adds 34 MB.
constexpr index_t kWidenRows = 1024;

// Fills w1, w2, b1, b2 of `out` from V_r (r x d_out row-major, i.e. column-major d_out x r).
// mean_out: the output mean (d_out) in Centered mode, else null.
template <class T>
void assemble(const T* weight, index_t m, index_t n, const double* bias,
              const std::vector<double>& vr, index_t r, const double* mean_out,
              LowRankFactors& out) {
  out.d_out = m;
  out.d_in = n;
  out.rank = r;
  out.w1.assign(static_cast<std::size_t>(m * r), 0.0);
#pragma omp parallel for schedule(static)
  for (index_t j = 0; j < m; ++j) {
    for (index_t i = 0; i < r; ++i) out.w1[j * r + i] = vr[i * m + j];
  }
  auto project = [&](const double* v) {  // V_r v  (r)
    std::vector<double> c(static_cast<std::size_t>(r), 0.0);
    for (index_t i = 0; i < r; ++i) {
      double s = 0.0;
      for (index_t j = 0; j < m; ++j) s += vr[i * m + j] * v[j];
      c[i] = s;
    }
    return c;
  };
  out.b1.clear();
  out.b2.clear();
  if (mean_out) {
    // Optimal affine fit: y ~ mu + P (y - mu), P = V_r^T V_r, with y = W x + b. Folding the
    // constant terms into one output bias: b1 = mu - P (mu - b).
    std::vector<double> t(mean_out, mean_out + m);
    if (bias) {
      for (index_t j = 0; j < m; ++j) t[j] -= bias[j];
    }
    const std::vector<double> c = project(t.data());
    out.b1.assign(mean_out, mean_out + m);
    for (index_t j = 0; j < m; ++j) {
      double s = 0.0;
      for (index_t i = 0; i < r; ++i) s += vr[i * m + j] * c[i];
      out.b1[j] -= s;
    }
  } else if (bias) {
    out.b2 = project(bias);
  }
  // W2^T (d_in x r, column-major) = W^T V_r^T, summed over row bands of W: row-major W is
  // column-major W^T (ld d_in); V_r^T's rows of a band start at row0 (ld d_out).
  constexpr bool is_f64 = std::is_same_v<T, double>;
  const index_t band = is_f64 ? m : std::min(m, kWidenRows);
  std::vector<double> staging(is_f64 ? 0 : static_cast<std::size_t>(band * n));
  out.w2.assign(static_cast<std::size_t>(r * n), 0.0);
  const blas_int bm = to_blas(m, "d_out"), bn = to_blas(n, "d_in"), br = to_blas(r, "rank");
  const double one = 1.0;
  for (index_t row0 = 0; row0 < m; row0 += band) {
    const index_t rows = std::min(band, m - row0);
    const double* w = nullptr;
    if constexpr (is_f64) {
      w = weight + row0 * n;
    } else {
      detail::widen_into(weight + row0 * n, rows * n, staging.data());
      w = staging.data();
    }
    const blas_int brows = to_blas(rows, "rows");
    dgemm_f("N", "N", &bn, &br, &brows, &one, w, &bn, vr.data() + row0, &bm, &one,
            out.w2.data(), &bn, 1, 1);
  }
}

// Top-r eigenvectors of C_y = B B^T (V_r, r x d_out row-major) and their eigenvalues, solving
// in min(d_out, k) dimensions.
std::vector<double> output_eigenvectors(const std::vector<double>& b, index_t m, index_t k,
                                        index_t r, EigenMethod method, LowRankFactors& out) {
  out.eigenvalues.assign(static_cast<std::size_t>(r), 0.0);
  out.total_energy = 0.0;
  for (double v : b) out.total_energy += v * v;
  if (k == 0) {  // no energy at all: any V_r is optimal; zeros keep the layer silent
    return std::vector<double>(static_cast<std::size_t>(r * m), 0.0);
  }
  const blas_int bm = to_blas(m, "d_out"), bk = to_blas(k, "rank");
  const double one = 1.0, zero = 0.0;
  if (m <= k) {
    std::vector<double> vr(static_cast<std::size_t>(r * m), 0.0);
    std::vector<double> cy(static_cast<std::size_t>(m * m));
    dsyrk_f("L", "N", &bm, &bk, &one, b.data(), &bm, &zero, cy.data(), &bm, 1, 1);
    timed_top_eigenpairs(cy.data(), m, r, out.eigenvalues.data(), vr.data(), method, out);
    return vr;
  }
  // d_out > k: C_y and G = B^T B share their nonzero eigenvalues; u_i = B q_i / sqrt(l_i).
  // V_r (r x d_out) is allocated only after G and the eigensolver's workspace are gone: for a
  // 7B gate_proj that keeps 121 MB off the factorization's peak.
  const index_t re = std::min(r, k);
  std::vector<double> q(static_cast<std::size_t>(re * k));
  {
    std::vector<double> g(static_cast<std::size_t>(k * k));
    dsyrk_f("L", "T", &bk, &bm, &one, b.data(), &bm, &zero, g.data(), &bk, 1, 1);
    timed_top_eigenpairs(g.data(), k, re, out.eigenvalues.data(), q.data(), method, out);
  }
  std::vector<double> vr(static_cast<std::size_t>(r * m), 0.0);
  // Row-major Q (re x k) is column-major k x re; V_r (re x m row-major) is column-major U.
  const blas_int bre = to_blas(re, "rank");
  dgemm_f("N", "N", &bm, &bre, &bk, &one, b.data(), &bm, q.data(), &bk, &zero, vr.data(), &bm, 1,
          1);
  const double top = std::max(out.eigenvalues[0], 0.0);
  for (index_t i = 0; i < re; ++i) {
    const double lam = out.eigenvalues[i];
    double* col = vr.data() + i * m;
    const double scale = (lam > kNegligibleEnergy * top && lam > 0.0) ? 1.0 / std::sqrt(lam) : 0.0;
    for (index_t j = 0; j < m; ++j) col[j] *= scale;
    if (scale == 0.0) out.eigenvalues[i] = std::max(lam, 0.0);
  }
  return vr;
}

}  // namespace

InputFactor::InputFactor(const double* gram, index_t dim, const double* colsum, double count,
                         Centering centering, bool with_bias)
    : dim_(dim), rows_(dim), centering_(centering), with_bias_(with_bias) {
  require(dim >= 1, "InputFactor: dim must be >= 1");
  detail::require_symmetric(gram, dim, "gram");
  const bool needs_sum = centering == Centering::Centered || with_bias;
  if (needs_sum) {
    require(colsum != nullptr, "InputFactor: colsum is required for centred or biased layers");
    require(std::isfinite(count) && count >= 1.0, "InputFactor: count must be >= 1");
    detail::require_finite(colsum, 1, dim, dim, "colsum");
  }
  if (centering == Centering::Centered) with_bias_ = false;  // the mean absorbs the bias
  rows_ = with_bias_ ? dim + 1 : dim;
  const index_t p = rows_;
  std::vector<double> m(static_cast<std::size_t>(p * p));
  for (index_t i = 0; i < dim; ++i) {
    std::memcpy(m.data() + i * p, gram + i * dim, sizeof(double) * dim);
  }
  if (centering == Centering::Centered) {
    mean_.assign(colsum, colsum + dim);
    for (double& v : mean_) v /= count;
    for (index_t i = 0; i < dim; ++i) {
      for (index_t j = 0; j < dim; ++j) m[i * p + j] -= colsum[i] * mean_[j];
    }
  } else if (with_bias_) {
    for (index_t i = 0; i < dim; ++i) {
      m[i * p + dim] = colsum[i];
      m[dim * p + i] = colsum[i];
    }
    m[dim * p + dim] = count;
  }
  const blas_int bp = to_blas(p, "dim");
  std::vector<blas_int> piv(static_cast<std::size_t>(p));
  std::vector<double> work(static_cast<std::size_t>(2 * p));
  blas_int rank = 0, info = 0;
  const double tol = -1.0;  // LAPACK default: p * eps * max(diag)
  dpstrf_f("L", &bp, m.data(), &bp, piv.data(), &rank, &tol, work.data(), &info, 1);
  if (info < 0) throw LapackError("dpstrf", info);
  // info == 1 only reports rank deficiency, which is expected and handled by `rank`. A zero
  // matrix yields rank 0 (a layer whose inputs were all zero).
  double maxdiag = 0.0;
  for (index_t i = 0; i < p; ++i) maxdiag = std::max(maxdiag, m[i * p + i]);
  rank_ = (maxdiag > 0.0 || info == 0) ? static_cast<index_t>(rank) : 0;
  perm_.resize(static_cast<std::size_t>(p));
  for (index_t i = 0; i < p; ++i) perm_[i] = static_cast<index_t>(piv[i]) - 1;
  // Keep the first rank columns; LAPACK leaves the strict upper triangle untouched.
  lower_.assign(static_cast<std::size_t>(p * rank_), 0.0);
  for (index_t j = 0; j < rank_; ++j) {
    for (index_t i = j; i < p; ++i) lower_[j * p + i] = m[j * p + i];
  }
}

namespace {

// Float32 weights are read as they are by the projection and widened in bands by assemble.
template <class T>
LowRankFactors factorize_layer_impl(const T* weight, index_t d_out, index_t d_in,
                                    const double* bias, const InputFactor& factor, index_t rank,
                                    EigenMethod method) {
  // Dimensions first: a d_in that disagrees with the factor must be refused before the
  // weight is read with it (found by AddressSanitizer).
  require(factor.dim() == d_in, "factor dimension " + std::to_string(factor.dim()) +
                                    " does not match the weight's d_in " + std::to_string(d_in));
  check_layer(weight, d_out, d_in, bias, rank);
  require(!bias || factor.with_bias() || factor.centering() == Centering::Centered,
          "the layer has a bias: build its InputFactor with_bias=true (or centred)");
  LowRankFactors out;
  std::vector<double> b = project_weight(weight, d_out, d_in, bias, factor);
  const std::vector<double> vr =
      output_eigenvectors(b, d_out, factor.rank(), rank, method, out);
  std::vector<double>().swap(b);
  std::vector<double> mean_out;
  if (factor.centering() == Centering::Centered) {
    mean_out.assign(static_cast<std::size_t>(d_out), 0.0);
    for (index_t j = 0; j < d_out; ++j) {
      double s = bias ? bias[j] : 0.0;
      for (index_t i = 0; i < d_in; ++i) s += static_cast<double>(weight[j * d_in + i]) * factor.mean()[i];
      mean_out[j] = s;
    }
  }
  assemble(weight, d_out, d_in, bias, vr, rank, mean_out.empty() ? nullptr : mean_out.data(), out);
  return out;
}

}  // namespace

LowRankFactors factorize_layer(const double* weight, index_t d_out, index_t d_in,
                               const double* bias, const InputFactor& factor, index_t rank,
                               EigenMethod method) {
  return factorize_layer_impl(weight, d_out, d_in, bias, factor, rank, method);
}

LowRankFactors factorize_layer(const float* weight, index_t d_out, index_t d_in, const float* bias,
                               const InputFactor& factor, index_t rank, EigenMethod method) {
  require(d_out >= 1 && d_in >= 1, "weight must have positive dimensions");
  const std::vector<double> b = bias ? widen(bias, d_out) : std::vector<double>{};
  return factorize_layer_impl(weight, d_out, d_in, bias ? b.data() : nullptr, factor, rank, method);
}

namespace {

template <class T>
LowRankFactors factorize_output_gram_impl(const T* weight, index_t d_out, index_t d_in,
                                          const double* bias, const double* gram_out,
                                          const double* colsum_out, double count,
                                          Centering centering, index_t rank, EigenMethod method) {
  check_layer(weight, d_out, d_in, bias, rank);
  detail::require_symmetric(gram_out, d_out, "gram_out");
  std::vector<double> c(gram_out, gram_out + d_out * d_out);
  std::vector<double> mean_out;
  if (centering == Centering::Centered) {
    require(colsum_out != nullptr, "centred factorization needs the output column sum");
    require(std::isfinite(count) && count >= 1.0, "count must be >= 1");
    detail::require_finite(colsum_out, 1, d_out, d_out, "colsum_out");
    mean_out.assign(colsum_out, colsum_out + d_out);
    for (double& v : mean_out) v /= count;
    for (index_t i = 0; i < d_out; ++i) {
      for (index_t j = 0; j < d_out; ++j) c[i * d_out + j] -= colsum_out[i] * mean_out[j];
    }
  }
  LowRankFactors out;
  out.total_energy = 0.0;
  for (index_t i = 0; i < d_out; ++i) out.total_energy += c[i * d_out + i];
  out.eigenvalues.assign(static_cast<std::size_t>(rank), 0.0);
  std::vector<double> vr(static_cast<std::size_t>(rank * d_out));
  timed_top_eigenpairs(c.data(), d_out, rank, out.eigenvalues.data(), vr.data(), method, out);
  std::vector<double>().swap(c);
  assemble(weight, d_out, d_in, bias, vr, rank, mean_out.empty() ? nullptr : mean_out.data(), out);
  return out;
}

}  // namespace

LowRankFactors factorize_layer_output_gram(const double* weight, index_t d_out, index_t d_in,
                                           const double* bias, const double* gram_out,
                                           const double* colsum_out, double count,
                                           Centering centering, index_t rank,
                                           EigenMethod method) {
  return factorize_output_gram_impl(weight, d_out, d_in, bias, gram_out, colsum_out, count,
                                    centering, rank, method);
}

LowRankFactors factorize_layer_output_gram(const float* weight, index_t d_out, index_t d_in,
                                           const float* bias, const double* gram_out,
                                           const double* colsum_out, double count,
                                           Centering centering, index_t rank,
                                           EigenMethod method) {
  require(d_out >= 1 && d_in >= 1, "weight must have positive dimensions");
  const std::vector<double> b = bias ? widen(bias, d_out) : std::vector<double>{};
  return factorize_output_gram_impl(weight, d_out, d_in, bias ? b.data() : nullptr, gram_out,
                                    colsum_out, count, centering, rank, method);
}

namespace {

template <class T>
std::vector<double> output_spectrum_impl(const T* weight, index_t d_out, index_t d_in,
                                         const double* bias, const InputFactor& factor) {
  require(factor.dim() == d_in, "factor dimension does not match the weight's d_in");
  check_layer(weight, d_out, d_in, bias, 1);
  const index_t k = factor.rank();
  const std::vector<double> b = project_weight(weight, d_out, d_in, bias, factor);
  if (k == 0) return {};
  const index_t s = std::min(d_out, k);
  const blas_int bm = to_blas(d_out, "d_out"), bk = to_blas(k, "rank");
  const double one = 1.0, zero = 0.0;
  std::vector<double> c(static_cast<std::size_t>(s * s));
  if (d_out <= k) {
    dsyrk_f("L", "N", &bm, &bk, &one, b.data(), &bm, &zero, c.data(), &bm, 1, 1);
  } else {
    dsyrk_f("L", "T", &bk, &bm, &one, b.data(), &bm, &zero, c.data(), &bk, 1, 1);
  }
  return detail::eigenvalues_inplace(c.data(), s);
}

}  // namespace

std::vector<double> output_spectrum(const double* weight, index_t d_out, index_t d_in,
                                    const double* bias, const InputFactor& factor) {
  return output_spectrum_impl(weight, d_out, d_in, bias, factor);
}

std::vector<double> output_spectrum(const float* weight, index_t d_out, index_t d_in,
                                    const float* bias, const InputFactor& factor) {
  const std::vector<double> b = bias ? widen(bias, d_out) : std::vector<double>();
  return output_spectrum_impl(weight, d_out, d_in, bias ? b.data() : nullptr, factor);
}

}  // namespace rom_fast
