"""The C++ backend's two GEMM paths side by side: its register-tiled loop vs SciPy's BLAS.

    python benchmarks/bench_cpp_gemm.py [--reps 200]

Times (best of ``reps``, float32, inside ``_C`` so no Python overhead) the products one layer
runs at the benchmark sizes of bench_cpu.py: the per-step recurrent GEMMs and the hoisted
input / weight-gradient GEMMs. The loop/BLAS threshold, ``rnnkern.config.CPP_BLAS_MIN_FLOPS``
(default in csrc/cpu/gemm.cpp: M*N*K >= 2^23 goes to BLAS), comes from this table plus
whole-layer timings: in a real time loop BLAS's worker threads are cold between steps and on a
busy 2-core machine their hand-off costs more than the tight repeat here shows. Shape legend:
B batch, T time, I input, H hidden, G gates.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rnnkern import config  # noqa: E402
from rnnkern.backends import cpp  # noqa: E402

SIZES = {"lab": (1, 6, 5, 5), "lab-batch": (170, 10, 25, 25), "char-rnn": (50, 50, 65, 128),
         "large": (64, 100, 512, 512)}


def products(B, T, I, H, G=4):
    """(label, M, N, K, trans_a) for the GEMMs of one LSTM layer."""
    GH = G * H
    return [("step h W_hh^T", B, GH, H, False), ("step dG W_hh", B, H, GH, False),
            ("x W_ih^T (B*T rows)", B * T, GH, I, False), ("dW_hh = dG^T h", GH, H, B * T, True)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args()
    ok, why = cpp.available()
    if not ok:
        sys.exit(f"cpp backend unavailable: {why}")
    C = cpp._C
    threshold = config.CPP_BLAS_MIN_FLOPS
    print(f"# GEMM loop build: {C.gemm_loop_isa()}; BLAS registered: {C.have_blas()}; "
          f"threshold M*N*K >= {threshold} (rnnkern.config.CPP_BLAS_MIN_FLOPS)")
    print("| size | product | M x N x K | loop us | loop GFLOP/s | BLAS us | BLAS GFLOP/s | used |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (B, T, I, H) in SIZES.items():
        for label, M, N, K, ta in products(B, T, I, H):
            reps = args.reps if M * N * K < 10**7 else max(5, args.reps // 20)
            loop = C._bench_gemm(M, N, K, ta, False, reps)
            blas = C._bench_gemm(M, N, K, ta, True, reps) if C.have_blas() else float("nan")
            used = "BLAS" if C.have_blas() and M * N * K >= threshold else "loop"
            gf = 2 * M * N * K / 1e9
            print(f"| {name} | {label} | {M}x{N}x{K} | {loop * 1e6:.1f} | {gf / loop:.1f} | "
                  f"{blas * 1e6:.1f} | {gf / blas:.1f} | {used} |")


if __name__ == "__main__":
    main()
