// LAPACK workspace sizes (lapack_workspace.hpp): a query result that is not a representable
// size throws instead of being cast to garbage.
#include <cstdint>
#include <limits>
#include <stdexcept>

#include "check.hpp"
#include "lapack_workspace.hpp"

using rom_fast::detail::workspace_size;

int main() {
  CHECK(workspace_size<std::int32_t>(100.0, "q") == 100);
  CHECK(workspace_size<std::int32_t>(99.9999, "q") == 100);          // rounded up, never short
  CHECK(workspace_size<std::int32_t>(0.0, "q") == 1);                // LAPACK wants lwork >= 1
  CHECK(workspace_size<std::int32_t>(2147483647.0, "q") == 2147483647);
  CHECK(workspace_size<std::int64_t>(1e15, "q") == std::int64_t{1000000000000000});
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  for (double bad : {nan, inf, -inf, -1.0, 2147483648.0, 1e300}) {
    CHECK(check::throws<std::overflow_error>([&] { workspace_size<std::int32_t>(bad, "dsyevd"); }));
  }
  for (double bad : {nan, inf, -5.0, 9223372036854775808.0, 1e19}) {
    CHECK(check::throws<std::overflow_error>([&] { workspace_size<std::int64_t>(bad, "dsyevd"); }));
  }
  try {   // the message names the routine and the size
    workspace_size<std::int32_t>(3e9, "dsytrd");
    CHECK(false);
  } catch (const std::overflow_error& e) {
    const std::string what = e.what();
    CHECK(what.find("dsytrd") != std::string::npos && what.find("3000000000") != std::string::npos);
  }
  return check::report("test_workspace");
}
