// Checks of the greedy input selection on a small singular problem (the fuller float64 numpy
// reference lives in tests/test_neurons.py): the refit against its normal equations, each
// removal against a brute-force greedy over naive Cholesky refits, the curve against the loss
// of each set's refit, the schedule of the groups, the in-place variant against the copying
// one (bitwise), and the refused inputs.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "check.hpp"
#include "rom_fast/rom_fast.hpp"

using rom_fast::index_t;

namespace {

// H = C + lambda I (row-major n x n).
std::vector<double> ridged(const std::vector<double>& c, index_t n, double lambda) {
  std::vector<double> h = c;
  for (index_t i = 0; i < n; ++i) h[i * n + i] += lambda;
  return h;
}

// L(S, W') = tr(D H D^T), D = W - W' E_S^T, by plain loops.
double loss(const std::vector<double>& w, index_t d, index_t n, const std::vector<double>& h,
            const std::vector<index_t>& kept, const std::vector<double>& wk) {
  const index_t k = static_cast<index_t>(kept.size());
  double total = 0;
  for (index_t r = 0; r < d; ++r) {
    std::vector<double> diff(w.begin() + r * n, w.begin() + (r + 1) * n);
    for (index_t a = 0; a < k; ++a) diff[kept[a]] -= wk[r * k + a];
    for (index_t i = 0; i < n; ++i) {
      for (index_t j = 0; j < n; ++j) total += diff[i] * h[i * n + j] * diff[j];
    }
  }
  return total;
}

// The refit's normal equations W' H[S,S] = W H[:,S], elementwise, relative to their scale.
double normal_equation_residual(const std::vector<double>& w, index_t d, index_t n,
                                const std::vector<double>& h, const std::vector<index_t>& kept,
                                const std::vector<double>& wk) {
  const index_t k = static_cast<index_t>(kept.size());
  double worst = 0, scale = 0;
  for (index_t r = 0; r < d; ++r) {
    for (index_t b = 0; b < k; ++b) {
      double lhs = 0, rhs = 0;
      for (index_t a = 0; a < k; ++a) lhs += wk[r * k + a] * h[kept[a] * n + kept[b]];
      for (index_t i = 0; i < n; ++i) rhs += w[r * n + i] * h[i * n + kept[b]];
      worst = std::max(worst, std::abs(lhs - rhs));
      scale = std::max(scale, std::abs(rhs));
    }
  }
  return worst / std::max(scale, 1e-300);
}

// W'_S by a naive Cholesky solve of the normal equations H[S,S] W'^T = H[S,:] W^T.
std::vector<double> solve_refit(const std::vector<double>& w, index_t d, index_t n,
                                const std::vector<double>& h, const std::vector<index_t>& kept) {
  const index_t k = static_cast<index_t>(kept.size());
  std::vector<double> l(k * k, 0.0), out(d * k);
  for (index_t j = 0; j < k; ++j) {
    for (index_t i = j; i < k; ++i) {
      double v = h[kept[i] * n + kept[j]];
      for (index_t p = 0; p < j; ++p) v -= l[i * k + p] * l[j * k + p];
      l[i * k + j] = i == j ? std::sqrt(v) : v / l[j * k + j];
    }
  }
  for (index_t r = 0; r < d; ++r) {
    std::vector<double> b(k, 0.0);
    for (index_t a = 0; a < k; ++a) {
      for (index_t i = 0; i < n; ++i) b[a] += w[r * n + i] * h[i * n + kept[a]];
    }
    for (index_t a = 0; a < k; ++a) {   // L y = b
      for (index_t p = 0; p < a; ++p) b[a] -= l[a * k + p] * b[p];
      b[a] /= l[a * k + a];
    }
    for (index_t a = k - 1; a >= 0; --a) {   // L^T x = y
      for (index_t p = a + 1; p < k; ++p) b[a] -= l[p * k + a] * b[p];
      b[a] /= l[a * k + a];
    }
    std::copy(b.begin(), b.end(), out.begin() + r * k);
  }
  return out;
}

}  // namespace

int main() {
  const index_t n = 12, d = 4, tokens = 9;   // tokens < n: a singular Gram
  const std::vector<double> x = check::randn(tokens * n, 11), w = check::randn(d * n, 12);
  std::vector<double> c(n * n, 0.0);
  for (index_t t = 0; t < tokens; ++t) {
    for (index_t i = 0; i < n; ++i) {
      for (index_t j = 0; j < n; ++j) c[i * n + j] += x[t * n + i] * x[t * n + j];
    }
  }
  double trace = 0;
  for (index_t i = 0; i < n; ++i) trace += c[i * n + i];

  // block 1, down to curve_to = 2: every step's set, refitted on its own, has the curve's loss.
  rom_fast::SelectionOptions opt;
  opt.ridge = 1e-2;
  opt.curve_to = 2;
  const index_t keep = 7;
  const rom_fast::InputSelection sel = rom_fast::select_inputs(w.data(), d, n, c.data(), keep, opt);
  CHECK_CLOSE(sel.lambda, 1e-2 * trace / n, 1e-15);
  const std::vector<double> h = ridged(c, n, sel.lambda);
  CHECK(sel.rows == d && sel.cols == n);
  CHECK(static_cast<index_t>(sel.kept.size()) == keep);
  CHECK(static_cast<index_t>(sel.removed.size()) == n - 2);
  CHECK(static_cast<index_t>(sel.curve_kept.size()) == n - 2 + 1);
  CHECK(sel.curve_kept.front() == n && sel.curve_loss.front() == 0.0);
  CHECK(std::is_sorted(sel.kept.begin(), sel.kept.end()));
  CHECK(static_cast<index_t>(sel.weight.size()) == d * keep);
  CHECK(normal_equation_residual(w, d, n, h, sel.kept, sel.weight) < 1e-12);
  CHECK_CLOSE(loss(w, d, n, h, sel.kept, sel.weight), sel.curve_loss[n - keep], 1e-10);
  double energy = 0;
  for (index_t r = 0; r < d; ++r) {
    for (index_t i = 0; i < n; ++i) {
      for (index_t j = 0; j < n; ++j) energy += w[r * n + i] * c[i * n + j] * w[r * n + j];
    }
  }
  CHECK_CLOSE(sel.total_energy, energy, 1e-11);
  {
    std::vector<index_t> all(sel.kept);
    all.insert(all.end(), sel.removed.begin(), sel.removed.begin() + (n - keep));
    std::sort(all.begin(), all.end());
    for (index_t i = 0; i < n; ++i) CHECK(all[i] == i);   // kept and removed partition the columns
  }
  // Each removal is the cheapest single one from the set before it (brute force).
  {
    std::vector<index_t> remaining(n);
    for (index_t i = 0; i < n; ++i) remaining[i] = i;
    for (std::size_t step = 1; step < sel.curve_kept.size(); ++step) {
      double best = INFINITY;
      index_t arg = -1;
      for (const index_t cand : remaining) {
        std::vector<index_t> s;
        for (const index_t j : remaining) {
          if (j != cand) s.push_back(j);
        }
        const double l = loss(w, d, n, h, s, solve_refit(w, d, n, h, s));
        if (l < best) best = l, arg = cand;
      }
      CHECK(sel.removed[step - 1] == arg);
      CHECK_CLOSE(sel.curve_loss[step], best, 1e-10 * std::max(1.0, sel.curve_loss.back()));
      remaining.erase(std::find(remaining.begin(), remaining.end(), sel.removed[step - 1]));
    }
  }
  for (std::size_t step = 1; step < sel.curve_kept.size(); ++step) {
    const index_t k = sel.curve_kept[step];
    CHECK(k == n - static_cast<index_t>(step));
    CHECK(sel.curve_loss[step] >= sel.curve_loss[step - 1]);
    rom_fast::SelectionOptions at_k;
    at_k.ridge = opt.ridge;
    const rom_fast::InputSelection s = rom_fast::select_inputs(w.data(), d, n, c.data(), k, at_k);
    // Nested: the greedy set at k is the full run's set after `step` removals.
    std::vector<index_t> expect;
    for (index_t col = 0; col < n; ++col) {
      if (std::find(sel.removed.begin(), sel.removed.begin() + step, col) == sel.removed.begin() + step) {
        expect.push_back(col);
      }
    }
    CHECK(s.kept == expect);
    CHECK(normal_equation_residual(w, d, n, h, s.kept, s.weight) < 1e-12);
    CHECK_CLOSE(loss(w, d, n, h, s.kept, s.weight), sel.curve_loss[step],
                1e-10 * std::max(1.0, sel.curve_loss.back()));
  }

  // Groups of 3 with a boundary exactly at keep = 7 (12 -> 9 -> 7 -> 4 -> 2).
  rom_fast::SelectionOptions grouped = opt;
  grouped.block = 3;
  const rom_fast::InputSelection sg = rom_fast::select_inputs(w.data(), d, n, c.data(), keep, grouped);
  CHECK((sg.curve_kept == std::vector<index_t>{12, 9, 7, 4, 2}));
  CHECK(normal_equation_residual(w, d, n, h, sg.kept, sg.weight) < 1e-12);
  CHECK_CLOSE(loss(w, d, n, h, sg.kept, sg.weight), sg.curve_loss[2], 1e-10);
  // A group's increase is at least the best single removal's (the greedy curve bound).
  CHECK(sg.curve_loss[1] >= sel.curve_loss[1] * (1 - 1e-12));

  // keep = n: nothing removed, the weight comes back unchanged.
  const rom_fast::InputSelection all = rom_fast::select_inputs(w.data(), d, n, c.data(), n);
  CHECK(all.removed.empty() && all.curve_kept.size() == 1);
  CHECK(all.weight == w);

  // float32 weights give the float64 result of their exact values; a GramAccumulator the
  // raw Gram's.
  std::vector<float> w32(w.begin(), w.end());
  std::vector<double> w_exact(w32.begin(), w32.end());
  const auto s32 = rom_fast::select_inputs(w32.data(), d, n, c.data(), keep, opt);
  const auto s64 = rom_fast::select_inputs(w_exact.data(), d, n, c.data(), keep, opt);
  CHECK(s32.removed == s64.removed);
  CHECK(check::rel_diff(s32.weight, s64.weight) == 0.0);
  rom_fast::GramAccumulator acc(n);
  acc.update(x.data(), tokens);
  const auto sa = rom_fast::select_inputs(w.data(), d, acc, keep, opt);
  CHECK(sa.removed == sel.removed);
  CHECK(check::rel_diff(sa.weight, sel.weight) < 1e-12);

  // In place: bitwise the copying call's, for float64 and float32 weights, both refit branches
  // (n - keep <= d and > d) and several group sizes; the Gram is consumed (changed).
  {
    const index_t n2 = 64, tokens2 = 40;   // singular again
    const std::vector<double> x2 = check::randn(tokens2 * n2, 21);
    std::vector<double> c2(n2 * n2, 0.0);
    for (index_t t = 0; t < tokens2; ++t) {
      for (index_t i = 0; i < n2; ++i) {
        for (index_t j = 0; j < n2; ++j) c2[i * n2 + j] += x2[t * n2 + i] * x2[t * n2 + j];
      }
    }
    const auto same = [](const rom_fast::InputSelection& a, const rom_fast::InputSelection& b) {
      return a.kept == b.kept && a.removed == b.removed && a.curve_kept == b.curve_kept &&
             a.curve_loss == b.curve_loss && a.weight == b.weight &&
             a.total_energy == b.total_energy && a.lambda == b.lambda;
    };
    for (const index_t d2 : {5, 40}) {
      const std::vector<double> w2 = check::randn(d2 * n2, 22);
      const std::vector<float> w2f(w2.begin(), w2.end());
      for (const auto& bk : {std::pair<index_t, index_t>{1, 54}, {4, 30}, {16, n2}}) {
        rom_fast::SelectionOptions o;
        o.block = bk.first;
        o.curve_to = std::min<index_t>(bk.second, 20);
        std::vector<double> work = c2;
        const auto ref = rom_fast::select_inputs(w2.data(), d2, n2, c2.data(), bk.second, o);
        const auto got = rom_fast::select_inputs_in_place(w2.data(), d2, n2, work.data(), bk.second, o);
        CHECK(same(ref, got));
        CHECK(work != c2);
        work = c2;
        const auto ref32 = rom_fast::select_inputs(w2f.data(), d2, n2, c2.data(), bk.second, o);
        const auto got32 = rom_fast::select_inputs_in_place(w2f.data(), d2, n2, work.data(), bk.second, o);
        CHECK(same(ref32, got32));
      }
    }
    // Refused before anything is written: bad arguments, and a weight inside the Gram.
    std::vector<double> work = c2;
    const std::vector<double> w3 = check::randn(3 * n2, 23);
    CHECK(check::throws<std::invalid_argument>(
        [&] { rom_fast::select_inputs_in_place(w3.data(), 3, n2, work.data(), 0); }));
    CHECK(work == c2);
    CHECK(check::throws<std::invalid_argument>(
        [&] { rom_fast::select_inputs_in_place(work.data() + n2, 3, n2, work.data(), 5); }));
    CHECK(work == c2);
  }

  // Refused inputs.
  using std::invalid_argument;
  const double* pw = w.data();
  const double* pc = c.data();
  auto with = [&](auto edit) {
    rom_fast::SelectionOptions o;
    edit(o);
    return o;
  };
  CHECK(check::throws<invalid_argument>([&] { rom_fast::select_inputs(pw, d, n, pc, 0); }));
  CHECK(check::throws<invalid_argument>([&] { rom_fast::select_inputs(pw, d, n, pc, n + 1); }));
  CHECK(check::throws<invalid_argument>([&] { rom_fast::select_inputs(pw, 0, n, pc, 1); }));
  CHECK(check::throws<invalid_argument>([&] { rom_fast::select_inputs(pw, d, 0, pc, 1); }));
  CHECK(check::throws<invalid_argument>(
      [&] { rom_fast::select_inputs(pw, d, n, pc, 5, with([](auto& o) { o.curve_to = 6; })); }));
  CHECK(check::throws<invalid_argument>(
      [&] { rom_fast::select_inputs(pw, d, n, pc, 5, with([](auto& o) { o.curve_to = 0; })); }));
  CHECK(check::throws<invalid_argument>(
      [&] { rom_fast::select_inputs(pw, d, n, pc, 5, with([](auto& o) { o.block = 0; })); }));
  for (double ridge : {0.0, -1.0, std::nan(""), static_cast<double>(INFINITY)}) {
    CHECK(check::throws<invalid_argument>(
        [&] { rom_fast::select_inputs(pw, d, n, pc, 5, with([&](auto& o) { o.ridge = ridge; })); }));
  }
  std::vector<double> bad_w = w, bad_c = c, asym = c;
  bad_w[5] = std::nan("");
  bad_c[3 * n + 3] = static_cast<double>(INFINITY);
  asym[1] += 1.0;
  CHECK(check::throws<invalid_argument>([&] { rom_fast::select_inputs(bad_w.data(), d, n, pc, 5); }));
  CHECK(check::throws<invalid_argument>([&] { rom_fast::select_inputs(pw, d, n, bad_c.data(), 5); }));
  CHECK(check::throws<invalid_argument>([&] { rom_fast::select_inputs(pw, d, n, asym.data(), 5); }));
  // Sizes past index_t or a vector's capacity: refused before anything is read.
  const index_t huge = std::numeric_limits<index_t>::max();
  CHECK(check::throws<invalid_argument>([&] { rom_fast::select_inputs(pw, huge, 2, pc, 1); }));
  CHECK(check::throws<invalid_argument>(
      [&] { rom_fast::select_inputs(pw, 1, index_t{1} << 32, pc, 1); }));
  // A Gram that is not PSD makes H indefinite: LapackError, not a wrong answer.
  std::vector<double> neg(n * n, 0.0);
  for (index_t i = 0; i < n; ++i) neg[i * n + i] = -1.0;
  CHECK(check::throws<rom_fast::LapackError>([&] { rom_fast::select_inputs(pw, d, n, neg.data(), 5); }));
  return check::report("test_neurons");
}
