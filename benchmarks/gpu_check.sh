#!/usr/bin/env bash
# One GPU check for the cuda backend, on an NVIDIA machine with CuPy and a CUDA build of PyTorch
# (no network needed): compile the kernels, run the `gpu` tests, then time both strategies
# against torch.nn.LSTM/GRU on cuDNN for the six shapes of issue 5. About 5 minutes at most.
#
#   bash benchmarks/gpu_check.sh [extra bench_gpu.py arguments]
#
# Runs from the source tree (PYTHONPATH=repo root), so no install step is needed. The table
# goes to stdout and to $OUT/gpu_bench.txt when $OUT is set. Exit status: non-zero if the
# compile or the tests failed (the benchmark still runs after failed tests).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out_dir="${OUT:-}"
status=0

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi not available"
python - <<'PY' || { echo "CuPy or PyTorch missing"; exit 2; }
import cupy, torch
from rnnkern.backends import cuda
print("CuPy", cupy.__version__, "| torch", torch.__version__, "| torch.cuda:", torch.cuda.is_available())
print("cuda backend:", cuda.available())
PY

echo "== compile (NVRTC through CuPy, float and double, every module)"
timeout 60 python - <<'PY' || status=1
import time, numpy as np
from rnnkern.backends import cuda
rt = cuda._get_runtime()
for module in cuda.MODULES:
    for dtype in (np.float32, np.float64):
        t0 = time.perf_counter()
        rt.kernel(module, "rk_lstm_persist_fwd" if module == "persistent" else "rk_lstm_fwd_step", dtype)
        print(f"  {module:10} {np.dtype(dtype).name}: {time.perf_counter() - t0:.2f} s")
print("  device limits (SMs, opt-in shared memory per block):", rt.props())
PY

echo "== gpu tests"
timeout 100 python -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda.py || status=1

echo "== benchmark (float32, ms per call)"
if [ -n "$out_dir" ]; then
  timeout 130 python benchmarks/bench_gpu.py --budget 100 --json "$out_dir/gpu_bench.json" "$@" \
    | tee "$out_dir/gpu_bench.txt" || status=1
else
  timeout 130 python benchmarks/bench_gpu.py --budget 100 "$@" || status=1
fi
echo "== done (status $status)"
exit "$status"
