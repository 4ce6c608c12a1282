#!/usr/bin/env bash
# Run the C++ backend's tests against an AddressSanitizer + UBSan build of rnnkern._C.
# The sanitized extension is built into a scratch copy of the package (the working tree's own
# _C stays as it is); libasan is preloaded because python itself is not instrumented.
# Usage: bash csrc/tools/sanitize.sh [scratch-dir]   (needs cmake, ninja, pybind11, pytest)
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
scratch="${1:-/tmp/rnnkern-sanitize}"
rm -rf "$scratch"
mkdir -p "$scratch/build"
cp -r "$repo/rnnkern" "$repo/tests" "$repo/pytest.ini" "$scratch/"
rm -f "$scratch"/rnnkern/_C*.so
cmake -S "$repo" -B "$scratch/build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DRK_SANITIZE=ON \
  -DRK_VERSION=sanitize -DPython_EXECUTABLE="$(command -v python)" \
  -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$scratch/rnnkern/" >/dev/null
cmake --build "$scratch/build"
cd "$scratch"
# libstdc++ too: ASan intercepts __cxa_throw only if libstdc++ is loaded when it starts
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1"   # CPython's own allocations are not leaks
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export NUMBA_DISABLE_JIT=1  # keep LLVM out of an instrumented process; only cpp tests run anyway
python -c "import rnnkern._C as c; assert c.__version__ == 'sanitize', c.__file__"
python -m pytest -q -p no:cacheprovider tests/test_cpp_bindings.py tests/test_backend_parity.py \
  tests/test_cpp_projected.py tests/test_head_cpp.py tests/test_cpp_activations.py -k "cpp"
# the whole-stack training step (csrc/cpu/lstm_stack.*), through rk.TrainStep
python -m pytest -q -p no:cacheprovider tests/test_train_step.py -k "whole_stack or cpp"
