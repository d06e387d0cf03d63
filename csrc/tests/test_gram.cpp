#include <limits>

#include "check.hpp"
#include "rom_fast/rom_fast.hpp"

using rom_fast::GramAccumulator;
using rom_fast::index_t;

static std::vector<double> naive_gram(const std::vector<double>& x, index_t n, index_t d) {
  std::vector<double> g(d * d, 0.0);
  for (index_t t = 0; t < n; ++t)
    for (index_t i = 0; i < d; ++i)
      for (index_t j = 0; j < d; ++j) g[i * d + j] += x[t * d + i] * x[t * d + j];
  return g;
}

int main() {
  const index_t n = 1000, d = 37;
  const auto x = check::randn(n * d, 1);
  const auto ref = naive_gram(x, n, d);

  GramAccumulator whole(d);
  whole.update(x.data(), n);
  CHECK(whole.count() == n);
  CHECK(check::rel_diff(whole.gram(), ref) < 1e-12);

  // Chunking (including chunks of 1) changes nothing beyond float64 rounding.
  GramAccumulator pieces(d);
  index_t start = 0, step = 1;
  while (start < n) {
    const index_t rows = std::min(step, n - start);
    pieces.update(x.data() + start * d, rows);
    start += rows;
    step = step * 3 + 1;
  }
  CHECK(pieces.count() == n);
  CHECK(check::rel_diff(pieces.gram(), ref) < 1e-12);
  CHECK(check::rel_diff(pieces.column_sum(), whole.column_sum()) < 1e-13);

  // merge == one accumulator over the union.
  GramAccumulator a(d), b(d);
  a.update(x.data(), 400);
  b.update(x.data() + 400 * d, n - 400);
  a.merge(b);
  CHECK(a.count() == n);
  CHECK(check::rel_diff(a.gram(), ref) < 1e-12);

  // float32 input is widened exactly: equal to the float64 Gram of the rounded values.
  std::vector<float> xf(x.begin(), x.end());
  std::vector<double> xr(xf.begin(), xf.end());
  GramAccumulator f32(d);
  f32.update(xf.data(), n);
  CHECK(check::rel_diff(f32.gram(), naive_gram(xr, n, d)) < 1e-12);

  // Thread count does not change the result.
  rom_fast::set_num_threads(1);
  GramAccumulator one(d);
  one.update(x.data(), n);
  rom_fast::set_num_threads(2);
  CHECK(check::rel_diff(one.gram(), whole.gram()) < 1e-13);

  // A non-finite value, found inside the OpenMP check, throws and leaves the state unchanged.
  auto bad = x;
  bad[5 * d + 3] = std::numeric_limits<double>::quiet_NaN();
  const auto before = whole.gram();
  CHECK(check::throws<std::invalid_argument>([&] { whole.update(bad.data(), n); }));
  CHECK(whole.count() == n);
  CHECK(check::rel_diff(whole.gram(), before) == 0.0);

  CHECK(check::throws<std::invalid_argument>([] { GramAccumulator z(0); }));
  GramAccumulator other(d + 1);
  CHECK(check::throws<std::invalid_argument>([&] { whole.merge(other); }));
  GramAccumulator empty(d);
  std::vector<double> out(d * d);
  CHECK(check::throws<std::invalid_argument>([&] { empty.centered_gram(out.data()); }));
  return check::report("test_gram");
}
