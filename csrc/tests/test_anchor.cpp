// Consistency checks of the dense-anchored statistics (the float64 numpy reference of the
// whole objective lives in tests/test_anchor.py): the cross moment against a naive sum, and
// the correction against its defining normal equations, without solving them again.
#include <cmath>
#include <limits>

#include "check.hpp"
#include "rom_fast/rom_fast.hpp"

using rom_fast::index_t;

int main() {
  const index_t n = 300, d = 7, d_out = 5;
  std::vector<double> xc = check::randn(n * d, 1), xd = xc, w = check::randn(d_out * d, 3);
  const std::vector<double> noise = check::randn(n * d, 2);
  for (index_t i = 0; i < n * d; ++i) xd[i] += 0.3 * noise[i];   // the dense path drifted apart
  std::vector<float> xc32(xc.begin(), xc.end()), xd32(xd.begin(), xd.end());
  for (index_t i = 0; i < n * d; ++i) {   // exact in float32, so both input types agree exactly
    xc[i] = xc32[i];
    xd[i] = xd32[i];
  }

  // Cross moment: chunked float64, chunked float32 and a naive sum agree.
  rom_fast::CrossGramAccumulator c64(d, d), c32(d, d);
  c64.update(xd.data(), xc.data(), 100);
  c64.update(xd.data() + 100 * d, xc.data() + 100 * d, n - 100);
  c32.update(xd32.data(), xc32.data(), n);
  std::vector<double> a(d * d), b(d * d);
  c64.cross(a.data());
  c32.cross(b.data());
  for (index_t i = 0; i < d; ++i) {
    for (index_t j = 0; j < d; ++j) {
      double ref = 0;
      for (index_t t = 0; t < n; ++t) ref += xd[t * d + i] * xc[t * d + j];
      CHECK_CLOSE(a[i * d + j], ref, 1e-12);
      CHECK_CLOSE(b[i * d + j], ref, 1e-12);
    }
  }
  CHECK(c64.count() == n);
  double s0 = 0;
  for (index_t t = 0; t < n; ++t) s0 += xd[t * d];
  CHECK_CLOSE(c64.dense_column_sum()[0], s0, 1e-12);

  // A failed update changes nothing.
  std::vector<double> bad(xd.begin(), xd.begin() + 2 * d);
  bad[3] = std::nan("");
  CHECK(check::throws<std::invalid_argument>([&] { c64.update(bad.data(), xc.data(), 2); }));
  CHECK(c64.count() == n);
  CHECK(check::throws<std::invalid_argument>([&] { rom_fast::CrossGramAccumulator(0, 3); }));
  // dim_dense * dim_comp past index_t or a vector's capacity: refused, nothing allocated.
  const index_t huge = std::numeric_limits<index_t>::max();
  CHECK(check::throws<std::invalid_argument>([&] { rom_fast::CrossGramAccumulator(index_t{1} << 32, index_t{1} << 32); }));
  CHECK(check::throws<std::invalid_argument>([&] { rom_fast::CrossGramAccumulator(huge, 2); }));
  CHECK(check::throws<std::invalid_argument>([&] { rom_fast::CrossGramAccumulator(1, huge); }));

  rom_fast::GramAccumulator g(d, rom_fast::GramPrecision::Float64);
  g.update(xc.data(), n);
  std::vector<double> gram(d * d);
  g.gram(gram.data());
  for (bool with_bias : {false, true}) {
    const double ridge = 1e-3;
    rom_fast::AnchorCorrection corr(g, c64, ridge, with_bias);
    std::vector<double> bias = check::randn(d_out, 4), w_eff(d_out * d), b_eff(d_out);
    for (double alpha : {0.0, 1.0, static_cast<double>(INFINITY)}) {
      corr.apply(w.data(), d_out, with_bias ? bias.data() : nullptr, alpha, w_eff.data(),
                 with_bias ? b_eff.data() : nullptr);
      const double f = std::isinf(alpha) ? 1.0 : alpha / (1 + alpha);
      const double lam = corr.lambda();
      // Normal equations on the inputs (bias-free part): (W_eff - W)(C + lam I) = f W (C_dc - C)
      // (+ the bias column's coupling through the column sums when with_bias).
      const std::vector<double>& sc = g.column_sum();
      const std::vector<double>& sd = c64.dense_column_sum();
      for (index_t o = 0; o < d_out; ++o) {
        for (index_t j = 0; j < d; ++j) {
          double lhs = 0, rhs = 0;
          for (index_t k = 0; k < d; ++k) {
            const double delta = w_eff[o * d + k] - w[o * d + k];
            lhs += delta * (gram[k * d + j] + (k == j ? lam : 0.0));
            rhs += f * w[o * d + k] * (a[k * d + j] - gram[k * d + j]);
          }
          if (with_bias) {
            lhs += (b_eff[o] - bias[o]) * sc[j];
            rhs += f * bias[o] * 0.0;   // the constant feature's drift row is zero
          }
          CHECK_CLOSE(lhs, rhs, 1e-9);
        }
        if (with_bias) {   // the constant column: (W_eff - W) s_c + (b_eff - b)(N + lam) = f W (s_d - s_c)
          double lhs = (b_eff[o] - bias[o]) * (static_cast<double>(n) + lam), rhs = 0;
          for (index_t k = 0; k < d; ++k) {
            lhs += (w_eff[o * d + k] - w[o * d + k]) * sc[k];
            rhs += f * w[o * d + k] * (sd[k] - sc[k]);
          }
          CHECK_CLOSE(lhs, rhs, 1e-9);
        }
      }
      if (alpha == 0.0) {
        for (index_t i = 0; i < d_out * d; ++i) CHECK(w_eff[i] == w[i]);
      }
    }
    // float32 weights give the float64 result of their exact values.
    std::vector<float> w32(w.begin(), w.end());
    std::vector<double> w_exact(w32.begin(), w32.end()), e32(d_out * d), e64(d_out * d);
    std::vector<float> b32(bias.begin(), bias.end());
    std::vector<double> b_exact(b32.begin(), b32.end()), be(d_out);
    corr.apply(w32.data(), d_out, with_bias ? b32.data() : nullptr, 2.0, e32.data(),
               with_bias ? be.data() : nullptr);
    corr.apply(w_exact.data(), d_out, with_bias ? b_exact.data() : nullptr, 2.0, e64.data(),
               with_bias ? be.data() : nullptr);
    for (index_t i = 0; i < d_out * d; ++i) CHECK_CLOSE(e32[i], e64[i], 1e-14);
    CHECK(check::throws<std::invalid_argument>(
        [&] { corr.apply(w.data(), d_out, nullptr, -1.0, w_eff.data(), b_eff.data()); }));
  }
  // Mismatched statistics and a bad ridge are refused.
  rom_fast::CrossGramAccumulator other(d, d);
  other.update(xd.data(), xc.data(), 10);
  CHECK(check::throws<std::invalid_argument>([&] { rom_fast::AnchorCorrection(g, other, 1e-3, false); }));
  CHECK(check::throws<std::invalid_argument>([&] { rom_fast::AnchorCorrection(g, c64, 0.0, false); }));
  // Rank-deficient inputs (a duplicated column): the ridge keeps the solve well posed.
  std::vector<double> xr = xc;
  for (index_t t = 0; t < n; ++t) xr[t * d + 1] = xr[t * d];
  rom_fast::GramAccumulator gr(d, rom_fast::GramPrecision::Float64);
  gr.update(xr.data(), n);
  rom_fast::CrossGramAccumulator cr(d, d);
  cr.update(xd.data(), xr.data(), n);
  rom_fast::AnchorCorrection deficient(gr, cr, 1e-6, false);
  std::vector<double> we(d_out * d);
  deficient.apply(w.data(), d_out, nullptr, INFINITY, we.data(), nullptr);
  for (double v : we) CHECK(std::isfinite(v));
  return check::report("test_anchor");
}
