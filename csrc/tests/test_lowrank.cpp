#include "check.hpp"
#include "rom_fast/rom_fast.hpp"

using rom_fast::index_t;

int main() {
  const index_t n = 33, d_in = 20, d_out = 28, r = 5;
  const auto x = check::randn(n * d_in, 1), w1 = check::randn(d_out * r, 2),
             w2 = check::randn(r * d_in, 3), b1 = check::randn(d_out, 4);
  std::vector<double> ref(n * d_out);
  for (index_t t = 0; t < n; ++t)
    for (index_t o = 0; o < d_out; ++o) {
      double v = b1[o];
      for (index_t k = 0; k < r; ++k) {
        double h = 0;
        for (index_t i = 0; i < d_in; ++i) h += w2[k * d_in + i] * x[t * d_in + i];
        v += w1[o * r + k] * h;
      }
      ref[t * d_out + o] = v;
    }
  std::vector<double> y(n * d_out), scratch(n * r);
  rom_fast::lowrank_apply(x.data(), n, d_in, w1.data(), w2.data(), d_out, r, b1.data(), y.data(),
                          scratch.data());
  CHECK(check::rel_diff(y, ref) < 1e-12);

  std::vector<float> xf(x.begin(), x.end()), w1f(w1.begin(), w1.end()), w2f(w2.begin(), w2.end()),
      b1f(b1.begin(), b1.end()), yf(n * d_out), sf(n * r);
  rom_fast::lowrank_apply(xf.data(), n, d_in, w1f.data(), w2f.data(), d_out, r, b1f.data(),
                          yf.data(), sf.data());
  CHECK(check::rel_diff(std::vector<double>(yf.begin(), yf.end()), ref) < 1e-4);

  CHECK(check::throws<std::invalid_argument>([&] {
    rom_fast::lowrank_apply(x.data(), n, d_in, w1.data(), w2.data(), d_out, 0, nullptr, y.data(),
                            scratch.data());
  }));
  return check::report("test_lowrank");
}
