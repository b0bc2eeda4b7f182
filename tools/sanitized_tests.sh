#!/usr/bin/env bash
# Build the native module with AddressSanitizer + UndefinedBehaviorSanitizer (CMake option KBIT_SANITIZE)
# and run the tests that drive the native kernels against it.
#
#   bash tools/sanitized_tests.sh [pytest args...]     (default: the native-kernel test files)
#
# The instrumented module is assembled with the Python sources in build/sanitize/pkg; a sitecustomize there
# bypasses an editable install's import hook so that this copy is the one imported. libasan (and libstdc++,
# whose __cxa_throw ASan must intercept before torch throws) are preloaded into the Python process.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
build="$root/build/sanitize"
mkdir -p "$build/cmake"
cmake -S "$root" -B "$build/cmake" -DKBIT_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -Dnanobind_DIR="$(python -c 'import nanobind; print(nanobind.cmake_dir())')" \
  -DPython_EXECUTABLE="$(command -v python)" > "$build/cmake.log"
# Compiler output (warnings from GCC's intrinsic headers included) goes to the log; shown only on failure.
if ! cmake --build "$build/cmake" -j 2 > "$build/build.log" 2>&1; then
  tail -n 60 "$build/build.log"
  exit 1
fi
rm -rf "$build/pkg"
mkdir -p "$build/pkg"
cp -r "$root/src/kbit" "$build/pkg/"
rm -f "$build/pkg/kbit/"_C*.so
cp "$build/cmake/"_C*.so "$build/pkg/kbit/"
cat > "$build/pkg/sitecustomize.py" <<'PY'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
PY
if [ "$#" -eq 0 ]; then
  set -- tests/test_quantize_4bit.py tests/test_quantize_8bit.py tests/test_linear4bit.py \
    tests/test_embedding_kbit.py tests/test_ops.py tests/test_fuzz_quantize.py tests/test_optim_numerics.py \
    tests/test_optim_state_dict.py tests/test_fuzz_ops.py tests/test_validation.py tests/test_untrusted_checkpoints.py \
    tests/test_optim_4bit.py tests/test_stochastic_rounding.py -q
fi
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \
ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
PYTHONPATH="$build/pkg" KBIT_SANITIZED_PKG="$build/pkg" \
python - "$@" <<'PY'
import os
import sys

import pytest

import kbit._native as native

if not native._C.__file__.startswith(os.environ["KBIT_SANITIZED_PKG"]):
    sys.exit(f"expected the sanitized module, imported {native._C.__file__}")
print("sanitized module:", native._C.__file__)
sys.exit(pytest.main(["-p", "no:cacheprovider", *sys.argv[1:]]))
PY
