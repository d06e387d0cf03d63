#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <vector>

#include "check.hpp"
#include "rom_fast/rom_fast.hpp"

using rom_fast::GramAccumulator;
using rom_fast::GramPrecision;
using rom_fast::index_t;

static constexpr double kU32 = 0x1p-24, kU64 = 0x1p-53;

static std::vector<double> naive_gram(const std::vector<double>& x, index_t n, index_t d) {
  std::vector<double> g(d * d, 0.0);
  for (index_t t = 0; t < n; ++t)
    for (index_t i = 0; i < d; ++i)
      for (index_t j = 0; j < d; ++j) g[i * d + j] += x[t * d + i] * x[t * d + j];
  return g;
}

static std::vector<double> abs_gram(const std::vector<double>& x, index_t n, index_t d) {
  std::vector<double> ax(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) ax[i] = std::abs(x[i]);
  return naive_gram(ax, n, d);
}

// max_ij |g - ref| / (per-element bound (B u32 + m u64) sum_t |x_ti||x_tj|); <= 1 passes.
static double bound_ratio(const std::vector<double>& g, const std::vector<double>& ref,
                          const std::vector<double>& abs_ref, double block_rows, double blocks) {
  double worst = 0.0;
  for (std::size_t i = 0; i < g.size(); ++i) {
    const double tol = (block_rows * kU32 + blocks * kU64) * abs_ref[i];
    worst = std::max(worst, std::abs(g[i] - ref[i]) / tol);
  }
  return worst;
}

// GramPrecision::Float32: the documented bound holds, at block edges too, and is tight enough
// that float32 accumulation across blocks would break it.
static void float32_blocks() {
  const index_t n = 5000, d = 37, block = 300;  // 17 blocks, the last one partial
  const auto x64 = check::randn(n * d, 7);
  std::vector<float> x(x64.begin(), x64.end());
  const std::vector<double> xr(x.begin(), x.end());
  const auto ref = naive_gram(xr, n, d), abs_ref = abs_gram(xr, n, d);
  const double blocks = std::ceil(double(n) / block);

  GramAccumulator acc(d, GramPrecision::Float32, block);
  CHECK(acc.precision() == GramPrecision::Float32 && acc.block_rows() == block);
  acc.update(x.data(), n);
  const double ratio = bound_ratio(acc.gram(), ref, abs_ref, block, blocks);
  CHECK(ratio <= 1.0);
  CHECK(ratio > 0.0);  // float32 products really are used (Float64 would be ~1e-7 of the bound)
  GramAccumulator wide(d, GramPrecision::Float64);
  wide.update(x.data(), n);
  CHECK(check::rel_diff(wide.gram(), ref) < 1e-12);
  // Column sums stay exact float64 sums whatever the precision.
  CHECK(check::rel_diff(acc.column_sum(), wide.column_sum()) == 0.0);

  // Whole chunks split between accumulators (as across processes) and merged: the same
  // float32 block products, so only float64 summation order differs.
  GramAccumulator a(d, GramPrecision::Float32, block), b(d, GramPrecision::Float32, block);
  GramAccumulator both(d, GramPrecision::Float32, block);
  for (index_t c = 0; c < 5; ++c) {
    (c % 2 ? b : a).update(x.data() + c * 1000 * d, 1000);
    both.update(x.data() + c * 1000 * d, 1000);
  }
  a.merge(b);
  CHECK(check::rel_diff(a.gram(), both.gram()) < 1e-14);

  // Another thread count may round the float32 sums differently, but within the bound.
  rom_fast::set_num_threads(1);
  GramAccumulator one(d, GramPrecision::Float32, block);
  one.update(x.data(), n);
  rom_fast::set_num_threads(2);
  CHECK(bound_ratio(one.gram(), ref, abs_ref, block, blocks) <= 1.0);

  // Identical rows make float32 rounding systematic: with B = 64 blocks the bound holds, while
  // one float32 sum over all 262144 rows (the too-loose implementation) exceeds it ~3x.
  const index_t m = 262144, k = 8, small = 64;
  std::vector<float> rows(m * k);
  std::vector<double> v(k);
  for (index_t j = 0; j < k; ++j) v[j] = static_cast<float>(1.0 + 0.37 * j / k + 1e-3 * std::sin(j));
  for (index_t t = 0; t < m; ++t)
    for (index_t j = 0; j < k; ++j) rows[t * k + j] = static_cast<float>(v[j]);
  std::vector<double> exact(k * k);
  for (index_t i = 0; i < k; ++i)
    for (index_t j = 0; j < k; ++j) exact[i * k + j] = double(m) * v[i] * v[j];
  GramAccumulator blocked(k, GramPrecision::Float32, small), through(k, GramPrecision::Float32, m);
  blocked.update(rows.data(), m);
  through.update(rows.data(), m);
  CHECK(bound_ratio(blocked.gram(), exact, exact, small, double(m / small)) <= 1.0);
  CHECK(bound_ratio(through.gram(), exact, exact, small, double(m / small)) > 1.0);

  // A bad value in a later block of a long float32 chunk: nothing is committed.
  auto bad = x;
  bad[4999 * d + 2] = std::numeric_limits<float>::infinity();
  const auto before = acc.gram();
  CHECK(check::throws<std::invalid_argument>([&] { acc.update(bad.data(), n); }));
  CHECK(acc.count() == n);
  CHECK(check::rel_diff(acc.gram(), before) == 0.0);
  CHECK(check::throws<std::invalid_argument>([] { GramAccumulator z(4, GramPrecision::Float32, 0); }));
}

// take_gram hands over exactly what gram() returns, in both precisions and on both sides of
// the parallel mirror's threshold, and leaves the accumulator spent until reset().
static void take_gram_hands_over_the_buffer() {
  for (const index_t d : {index_t{1}, index_t{37}, index_t{2100}}) {
    for (const auto precision : {GramPrecision::Float64, GramPrecision::Float32}) {
      const index_t n = 40;
      const auto xd = check::randn(n * d, 7);
      const std::vector<float> x(xd.begin(), xd.end());
      GramAccumulator acc(d, precision);
      acc.update(x.data(), n);
      const auto expected = acc.gram();
      const auto colsum = acc.column_sum();
      const auto taken = acc.take_gram();
      CHECK(taken == expected);
      CHECK(acc.taken() && acc.count() == n && acc.column_sum() == colsum);
      std::vector<double> out(d * d);
      CHECK(check::throws<std::logic_error>([&] { acc.gram(out.data()); }));
      CHECK(check::throws<std::logic_error>([&] { acc.centered_gram(out.data()); }));
      CHECK(check::throws<std::logic_error>([&] { acc.update(x.data(), n); }));
      CHECK(check::throws<std::logic_error>([&] { (void)acc.take_gram(); }));
      GramAccumulator live(d);
      CHECK(check::throws<std::logic_error>([&] { live.merge(acc); }));
      CHECK(check::throws<std::logic_error>([&] { acc.merge(live); }));
      acc.reset();
      CHECK(!acc.taken() && acc.count() == 0);
      acc.update(x.data(), n);
      CHECK(acc.gram() == expected);
    }
  }
}

int main() {
  const index_t n = 1000, d = 37;
  const auto x = check::randn(n * d, 1);
  const auto ref = naive_gram(x, n, d);

  GramAccumulator whole(d);
  CHECK(whole.precision() == GramPrecision::Float64);  // the default
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

  // GramPrecision::Float64 widens float32 input exactly: the float64 Gram of the rounded values.
  std::vector<float> xf(x.begin(), x.end());
  std::vector<double> xr(xf.begin(), xf.end());
  GramAccumulator f32(d, GramPrecision::Float64);
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
  // dim * dim past index_t (d > 3037000499) or past a vector's capacity is refused before
  // anything is allocated, instead of wrapping around (undefined behaviour).
  CHECK(check::throws<std::invalid_argument>([] { GramAccumulator z(3037000500); }));
  CHECK(check::throws<std::invalid_argument>([] { GramAccumulator z(index_t{1} << 31); }));
  CHECK(check::throws<std::invalid_argument>([] { GramAccumulator z(std::numeric_limits<index_t>::max()); }));
  GramAccumulator other(d + 1);
  CHECK(check::throws<std::invalid_argument>([&] { whole.merge(other); }));
  GramAccumulator empty(d);
  std::vector<double> out(d * d);
  CHECK(check::throws<std::invalid_argument>([&] { empty.centered_gram(out.data()); }));
  float32_blocks();
  take_gram_hands_over_the_buffer();
  return check::report("test_gram");
}
