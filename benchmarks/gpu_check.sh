#!/usr/bin/env bash
# One GPU check for the cuda backend, on an NVIDIA machine with CuPy and a CUDA build of PyTorch
# (no network needed): compile the kernels, run the `gpu` tests (the layers' kernels, the stepwise
# loop captured as CUDA graphs, then whole models on the device: tests/test_device.py), then
# time every strategy (stepwise both as graphs and launched step by step) against
# torch.nn.LSTM/GRU on cuDNN for the six shapes of issue 5, and a char-rnn epoch trained on the
# GPU against PyTorch (benchmarks/bench_gpu_train.py). About 9 minutes at most.
#
#   bash benchmarks/gpu_check.sh [extra bench_gpu.py arguments]
#   RNNKERN_GPU_TUNING=1 bash benchmarks/gpu_check.sh    # also the tuning points (~1 min more)
#
# Runs from the source tree (PYTHONPATH=repo root), so no install step is needed. The tables
# go to stdout and, when $OUT is set, to $OUT/gpu_bench*.txt (and the main table's rows to
# $OUT/gpu_bench.json; at most 8 files come back from a device run). Exit status: non-zero
# if the compile, a test or a benchmark failed (later steps still run after a failure).
# Time limits per step add up to under 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out_dir="${OUT:-}"
# the interpreter that has CuPy and PyTorch (some GPU images have python3 only)
PY="${PYTHON:-$(command -v python3 || command -v python)}"
status=0

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi not available"
"$PY" - <<'PY' || { echo "CuPy or PyTorch missing"; exit 2; }
import cupy, torch
from rnnkern.backends import cuda
print("CuPy", cupy.__version__, "| torch", torch.__version__, "| torch.cuda:", torch.cuda.is_available())
print("cuda backend:", cuda.available())
PY

echo "== compile (NVRTC through CuPy, float and double, every module)"
timeout 60 "$PY" - <<'PY' || status=1
import time, numpy as np
from rnnkern.backends import cuda
rt = cuda.runtime.get_runtime()
first = {"stepwise": "rk_lstm_fwd_step", "persistent": "rk_lstm_persist_fwd",
         "cluster": "rk_lstm_cluster_fwd", "optim": "rk_adam_update",
         "dropout": "rk_dropout_mask"}
for module in cuda.runtime.MODULES:
    if module == "cluster" and not rt.supports_clusters():
        print("  cluster: skipped (no thread-block clusters before compute capability 9.0)")
        continue
    for dtype in (np.float32, np.float64):
        t0 = time.perf_counter()
        rt.kernel(module, first[module], dtype)
        print(f"  {module:10} {np.dtype(dtype).name}: {time.perf_counter() - t0:.2f} s")
print("  device limits (SMs, opt-in shared memory per block):", rt.props(),
      "| thread-block clusters:", rt.supports_clusters())
PY

# Warnings stay visible but do not fail here (pytest.ini turns them into errors for CI, where
# the GPU packages are absent): a new CuPy/NumPy deprecation on the GPU machine should not hide
# the kernels' results.
pytest_gpu=("$PY" -m pytest -q -m gpu -p no:cacheprovider -W default --tb=short)
echo "== gpu tests: tests/test_cuda.py"
timeout 75 "${pytest_gpu[@]}" tests/test_cuda.py || status=1
echo "== gpu tests: whole models on the device (tests/test_device.py: CPU parity of training,"
echo "   fused optimizer kernels to the bit, dropout masks, checkpoints, generate)"
timeout 60 "${pytest_gpu[@]}" tests/test_device.py || status=1
echo "== gpu tests: the step reads nothing back (tests/test_device_step.py: the gate skips a NaN"
echo "   step as the CPU does, Trainer history = CPU, no wait for the device inside a step)"
timeout 45 "${pytest_gpu[@]}" tests/test_device_step.py || status=1
echo "== gpu tests: the cuda cases of the other suites (backend and torch parity)"
timeout 40 "${pytest_gpu[@]}" tests/ --ignore=tests/test_cuda.py --ignore=tests/test_device.py \
  --ignore=tests/test_device_step.py || status=1

bench() {  # bench NAME TIMEOUT ARGS...: one bench_gpu.py run, its table also under $OUT
  local name="$1" limit="$2"
  shift 2
  if [ -n "$out_dir" ]; then
    timeout "$limit" "$PY" benchmarks/bench_gpu.py "$@" | tee "$out_dir/$name.txt" || status=1
  else
    timeout "$limit" "$PY" benchmarks/bench_gpu.py "$@" || status=1
  fi
}

echo "== benchmark: layer API (what users call), float32, ms per call"
bench gpu_bench 115 --budget 90 ${out_dir:+--json "$out_dir/gpu_bench.json"} "$@"

echo "== benchmark: backend seam (kernels without layer validation), small shapes"
small="1,6,5,5,1;1,100,64,128,1;32,100,128,256,1;50,50,65,128,2"
bench gpu_bench_seam 30 --seam --kinds lstm,gru --shapes "$small" --budget 22
echo "== benchmark: a char-rnn epoch (100 batches) trained wholly on the GPU vs PyTorch"
if [ -n "$out_dir" ]; then
  timeout 120 "$PY" benchmarks/bench_gpu_train.py --max-batches 100 --repeats 3 \
    | tee "$out_dir/gpu_train.txt" || status=1
else
  timeout 120 "$PY" benchmarks/bench_gpu_train.py --max-batches 100 --repeats 3 || status=1
fi
if [ -n "${RNNKERN_GPU_TUNING:-}" ]; then
  echo "== tuning points (backend seam, LSTM): stepwise GEMMs straight to cuBLAS vs through"
  echo "   cupy.matmul on the large shapes; persistent dots without 4x4 tiles on the large shapes;"
  echo "   cluster teams capped at 8; where cluster stops paying"
  large="64,100,512,512,1;128,100,1024,1024,1"
  bench gpu_tune_direct_gemm 25 --seam --kinds lstm --shapes "$large" --budget 15
  bench gpu_tune_cupy_matmul 25 --seam --kinds lstm --shapes "$large" --cupy-matmul --budget 15
  bench gpu_tune_no_tiles 25 --seam --kinds lstm --shapes "$large" --tile-min 2147483647 \
    --budget 15
  bench gpu_tune_teams8 20 --seam --kinds lstm --shapes "$small" --max-teams 8 --budget 14
  bench gpu_tune_cutoff 30 --seam --kinds lstm,gru \
    --shapes "64,100,128,256,1;128,50,128,256,1;256,50,65,128,1" --budget 22
fi

echo "== done (status $status)"
exit "$status"
