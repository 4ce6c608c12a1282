"""pytest-benchmark view of benchmarks/bench_cpu.py: rnnkern CPU backends vs torch.nn.LSTM/GRU.

    python -m pytest benchmarks/test_bench_cpu.py --benchmark-group-by=group \
        --benchmark-columns=median,min,rounds -k "char-rnn"

Each (cell, size, mode) is one benchmark group, so the table compares contestants side by side.
Contestants: every available CPU backend (``rk.available_backends()``) plus torch when installed,
2 threads. pytest-benchmark runs each contestant's rounds back to back rather than alternating;
bench_cpu.py (alternating blocks, one process) is the source of the ratios in README.md.
Shape legend: B batch, T time, I input, H hidden, L layers.
"""
from __future__ import annotations

import importlib.util

import pytest

import bench_cpu

pytest.importorskip("pytest_benchmark")

CONTESTANTS = list(bench_cpu.cpu_backends())
if importlib.util.find_spec("torch") is not None:
    CONTESTANTS.append("torch")

ROUNDS = {"lab": 200, "lab-batch": 40, "char-rnn": 10, "large": 3}


@pytest.fixture(scope="module", autouse=True)
def _torch_threads():
    if "torch" in CONTESTANTS:
        import torch
        torch.set_num_threads(2)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("contestant", CONTESTANTS)
@pytest.mark.parametrize("size", list(bench_cpu.SIZES))
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cpu(benchmark, cell, size, contestant, mode):
    shape = bench_cpu.SIZES[size]
    run = bench_cpu.make_torch(cell, *shape) if contestant == "torch" else \
        bench_cpu.make_rk(cell, contestant, *shape)
    benchmark.group = f"{cell} {size} {shape} {mode}"
    benchmark.extra_info["gflop"] = 3 * bench_cpu.gemm_flops(cell, *shape) / 1e9 \
        if mode == "fwdbwd" else bench_cpu.gemm_flops(cell, *shape) / 1e9
    benchmark.pedantic(run, args=(mode,), rounds=ROUNDS[size], iterations=1, warmup_rounds=2)
