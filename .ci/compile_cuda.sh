#!/usr/bin/env bash
# Compile every CUDA source with nvcc, for sm_90 and one older arch (sm_80; cluster.cu, which
# needs thread-block clusters: sm_90 only), in float and double, so kernel source errors
# surface in CI without a GPU. Objects go to a temp dir and are deleted.
# Without nvcc: prints a skip line and succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "compile_cuda: SKIPPED (nvcc not found)"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
n=0
for src in csrc/cuda/*.cu; do
  archs="sm_90 sm_80"
  [ "$(basename "$src")" = cluster.cu ] && archs="sm_90"  # thread-block clusters: sm_90+
  for arch in $archs; do
    for real in float double; do
      out="$tmp/$(basename "$src" .cu)_${arch}_${real}.o"
      nvcc -std=c++17 -arch="$arch" -I csrc/include -DRK_REAL="$real" -Werror all-warnings \
        -c "$src" -o "$out"
      n=$((n + 1))
    done
  done
done
echo "compile_cuda: $n compilations OK ($(nvcc --version | tail -1))"
