// Minimal test harness: CHECK records failures, main() returns non-zero if any; ctest runs it.
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace check {

inline int& failures() {
  static int n = 0;
  return n;
}

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++check::failures();                                                       \
    }                                                                            \
  } while (0)

#define CHECK_CLOSE(a, b, rtol)                                                            \
  do {                                                                                     \
    const double _a = (a), _b = (b);                                                       \
    if (!(std::abs(_a - _b) <= (rtol) * std::max(1.0, std::max(std::abs(_a), std::abs(_b))))) { \
      std::fprintf(stderr, "%s:%d: %s = %.17g vs %s = %.17g\n", __FILE__, __LINE__, #a, _a, #b, _b); \
      ++check::failures();                                                                 \
    }                                                                                      \
  } while (0)

template <class E, class F>
bool throws(F&& f) {
  try {
    f();
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

inline std::vector<double> randn(std::size_t n, unsigned seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> dist;
  std::vector<double> v(n);
  for (double& x : v) x = dist(rng);
  return v;
}

inline int report(const char* name) {
  if (failures() == 0) std::printf("%s: all checks passed\n", name);
  return failures() == 0 ? 0 : 1;
}

/// max_ij |a - b| / max(1, max |b|)
inline double rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double d = 0.0, s = 1.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    d = std::max(d, std::abs(a[i] - b[i]));
    s = std::max(s, std::abs(b[i]));
  }
  return d / s;
}

}  // namespace check
