// Factorizes a random layer from token statistics and serves it with lowrank_apply.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <rom_fast/rom_fast.hpp>

int main() {
  const rom_fast::index_t n = 256, d_in = 64, d_out = 96, rank = 16;
  std::mt19937 rng(0);
  std::normal_distribution<double> normal;
  std::vector<double> x(n * d_in), w(d_out * d_in);
  for (auto& v : x) v = normal(rng);
  for (auto& v : w) v = normal(rng);

  rom_fast::GramAccumulator stats(d_in);
  stats.update(x.data(), n);
  const std::vector<double> gram = stats.gram();
  const rom_fast::InputFactor factor(gram.data(), d_in, nullptr, 0.0,
                                     rom_fast::Centering::Uncentered, false);
  const rom_fast::LowRankFactors f = rom_fast::factorize_layer(w.data(), d_out, d_in, nullptr, factor, rank);

  std::vector<double> y(n * d_out), scratch(n * rank);
  rom_fast::lowrank_apply(x.data(), n, d_in, f.w1.data(), f.w2.data(), d_out, rank, nullptr,
                          y.data(), scratch.data());
  double err = 0.0, kept = 0.0;
  for (rom_fast::index_t t = 0; t < n; ++t)
    for (rom_fast::index_t o = 0; o < d_out; ++o) {
      double exact = 0.0;
      for (rom_fast::index_t i = 0; i < d_in; ++i) exact += w[o * d_in + i] * x[t * d_in + i];
      err += (exact - y[t * d_out + o]) * (exact - y[t * d_out + o]);
    }
  for (double v : f.eigenvalues) kept += v;
  const double optimum = f.total_energy - kept;
  std::printf("rom_fast %s: rank %lld fit error %.6g, optimum %.6g\n", ROM_FAST_VERSION_STRING,
              static_cast<long long>(rank), err, optimum);
  return std::abs(err - optimum) <= 1e-8 * f.total_energy ? 0 : 1;
}
