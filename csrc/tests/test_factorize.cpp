// Consistency checks of the factorization routes (the float64 numpy/scipy reference tests
// live in tests/test_factorize.py).
#include "check.hpp"
#include "rom_fast/rom_fast.hpp"

using rom_fast::Centering;
using rom_fast::index_t;

struct Data {
  index_t n, d_in, d_out;
  std::vector<double> x, w, y;  // x: n x d_in, w: d_out x d_in, y = x w^T: n x d_out
};

static Data make(index_t n, index_t d_in, index_t d_out, unsigned seed) {
  Data s{n, d_in, d_out, check::randn(n * d_in, seed), check::randn(d_out * d_in, seed + 1), {}};
  // Anisotropic inputs, like real activations.
  for (index_t t = 0; t < n; ++t)
    for (index_t i = 0; i < d_in; ++i) s.x[t * d_in + i] *= 1.0 / (1.0 + i);
  s.y.assign(n * d_out, 0.0);
  for (index_t t = 0; t < n; ++t)
    for (index_t o = 0; o < d_out; ++o)
      for (index_t i = 0; i < d_in; ++i) s.y[t * d_out + o] += s.x[t * d_in + i] * s.w[o * d_in + i];
  return s;
}

// ||Y - X W2^T W1^T||_F^2
static double fit_error(const Data& s, const rom_fast::LowRankFactors& f) {
  double err = 0;
  std::vector<double> h(f.rank);
  for (index_t t = 0; t < s.n; ++t) {
    for (index_t k = 0; k < f.rank; ++k) {
      h[k] = 0;
      for (index_t i = 0; i < s.d_in; ++i) h[k] += f.w2[k * s.d_in + i] * s.x[t * s.d_in + i];
    }
    for (index_t o = 0; o < s.d_out; ++o) {
      double v = f.b1.empty() ? 0.0 : f.b1[o];
      for (index_t k = 0; k < f.rank; ++k) v += f.w1[o * f.rank + k] * h[k];
      err += (s.y[t * s.d_out + o] - v) * (s.y[t * s.d_out + o] - v);
    }
  }
  return err;
}

int main() {
  // d_out < d_in, d_out > d_in (the k x k route), and fewer tokens than d_in (rank-deficient).
  const index_t shapes[][3] = {{500, 40, 24}, {500, 24, 70}, {15, 40, 60}};
  for (const auto& sh : shapes) {
    const Data s = make(sh[0], sh[1], sh[2], 11);
    rom_fast::GramAccumulator in(s.d_in), out(s.d_out);
    in.update(s.x.data(), s.n);
    out.update(s.y.data(), s.n);
    const auto gin = in.gram(), gout = out.gram();
    const rom_fast::InputFactor factor(gin.data(), s.d_in, nullptr, 0.0, Centering::Uncentered, false);
    CHECK(factor.rank() == std::min(s.n, s.d_in));
    const index_t r = std::min(s.d_in, s.d_out) / 2;
    const auto f = rom_fast::factorize_layer(s.w.data(), s.d_out, s.d_in, nullptr, factor, r);
    const auto g = rom_fast::factorize_layer_output_gram(s.w.data(), s.d_out, s.d_in, nullptr,
                                                         gout.data(), nullptr, 0.0,
                                                         Centering::Uncentered, r);
    double kept = 0;
    for (double v : f.eigenvalues) kept += v;
    // Both routes reach the Eckart-Young optimum: error = total energy - kept eigenvalues.
    CHECK_CLOSE(fit_error(s, f), f.total_energy - kept, 1e-8);
    CHECK_CLOSE(fit_error(s, g), fit_error(s, f), 1e-8);
    for (index_t i = 0; i < r; ++i) CHECK_CLOSE(f.eigenvalues[i], g.eigenvalues[i], 1e-9);
    const auto spec = rom_fast::output_spectrum(s.w.data(), s.d_out, s.d_in, nullptr, factor);
    CHECK(spec.size() == static_cast<std::size_t>(std::min(s.d_out, factor.rank())));
    for (index_t i = 0; i < std::min<index_t>(r, spec.size()); ++i) CHECK_CLOSE(spec[i], f.eigenvalues[i], 1e-9);
    // Centred: the affine fit is at least as good as the linear one.
    const rom_fast::InputFactor cfac(gin.data(), s.d_in, in.column_sum().data(),
                                     static_cast<double>(s.n), Centering::Centered, false);
    const auto c = rom_fast::factorize_layer(s.w.data(), s.d_out, s.d_in, nullptr, cfac, r);
    CHECK(c.b1.size() == static_cast<std::size_t>(s.d_out));
    CHECK(fit_error(s, c) <= fit_error(s, f) + 1e-9 * f.total_energy);
  }

  const Data s = make(200, 16, 8, 3);
  rom_fast::GramAccumulator in(s.d_in);
  in.update(s.x.data(), s.n);
  const auto gin = in.gram();
  const rom_fast::InputFactor factor(gin.data(), s.d_in, nullptr, 0.0, Centering::Uncentered, false);
  CHECK(check::throws<std::invalid_argument>(
      [&] { rom_fast::factorize_layer(s.w.data(), s.d_out, s.d_in, nullptr, factor, 0); }));
  CHECK(check::throws<std::invalid_argument>(
      [&] { rom_fast::factorize_layer(s.w.data(), s.d_out, s.d_in, nullptr, factor, 9); }));
  CHECK(check::throws<std::invalid_argument>(
      [&] { rom_fast::factorize_layer(s.w.data(), s.d_out, s.d_in + 1, nullptr, factor, 2); }));
  std::vector<double> bias(s.d_out, 1.0);
  CHECK(check::throws<std::invalid_argument>(
      [&] { rom_fast::factorize_layer(s.w.data(), s.d_out, s.d_in, bias.data(), factor, 2); }));
  auto w = s.w;
  w[3] = std::numeric_limits<double>::infinity();
  CHECK(check::throws<std::invalid_argument>(
      [&] { rom_fast::factorize_layer(w.data(), s.d_out, s.d_in, nullptr, factor, 2); }));
  return check::report("test_factorize");
}
