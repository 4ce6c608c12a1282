"""Fit the float32 tanh used by the Numba kernels (rnnkern/backends/numba_math.py).

    python benchmarks/fit_fast_tanh.py

Form (odd/even rational, as Eigen's ``ptanh``; the coefficients here are our own fit; the C++
kernels use the same coefficients, csrc/include/rnnkern/cells.h):
``tanh(x) ~ x * P(x^2) / Q(x^2)`` on ``|x| <= 9`` (beyond, float32 tanh rounds to +-1), P of
degree 6 and Q of degree 3 in ``x^2``, ``Q(0) = 1`` and Q's coefficients kept >= 0 so Q has no
root (a free fit cancels a pole against a zero and breaks in float32).
Method: Sanathanan-Koerner iteration (weights 1/Q of the previous fit turn the rational fit into
linear least squares), then Lawson reweighting (weights times |error|) toward the minimax fit.
Prints the float32 coefficients and the maximum error of the float32 evaluation over a dense grid.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import lsq_linear

CLAMP = 9.0
P_DEG, Q_DEG = 6, 3


def fit(iterations=200, lawson_from=10):
    t = np.cos(np.linspace(0, np.pi, 30001)) * 0.5 + 0.5        # Chebyshev-dense near ends
    x = np.unique(np.concatenate([np.linspace(0, CLAMP, 30001), t * CLAMP]))[1:]
    y, s = np.tanh(x), x * x
    sk_w, lawson_w = np.ones_like(x), np.ones_like(x)
    lower = np.concatenate([np.full(P_DEG + 1, -np.inf), np.zeros(Q_DEG)])
    best = (np.inf, None, None)
    for it in range(iterations):
        # unknowns p_0..p_6, q_1..q_3:  x P(s) - y (Q(s) - 1) = y
        A = np.concatenate([np.stack([x * s ** k for k in range(P_DEG + 1)], 1),
                            np.stack([-y * s ** k for k in range(1, Q_DEG + 1)], 1)], 1)
        w = sk_w * np.sqrt(lawson_w)
        c = lsq_linear(A * w[:, None], y * w, bounds=(lower, np.inf), method="bvls").x
        p, q = c[:P_DEG + 1], np.concatenate([[1.0], c[P_DEG + 1:]])
        Q = np.polyval(q[::-1], s)
        err = x * np.polyval(p[::-1], s) / Q - y
        if np.abs(err).max() < best[0]:
            best = (np.abs(err).max(), p, q)
        sk_w = 1 / Q
        if it >= lawson_from:
            lawson_w = np.maximum(lawson_w * np.abs(err), 1e-300)
            lawson_w /= lawson_w.sum()
    return best[1], best[2]


def eval_float32(p, q, x):
    """The kernels' evaluation order, in float32 (Horner, clamp in and out)."""
    f = np.float32
    x = np.clip(x.astype(f), -f(CLAMP), f(CLAMP))
    s = x * x
    P = f(p[-1])
    for k in range(len(p) - 2, -1, -1):
        P = P * s + f(p[k])
    Q = f(q[-1])
    for k in range(len(q) - 2, -1, -1):
        Q = Q * s + f(q[k])
    return np.clip(x * P / Q, f(-1), f(1))


def main():
    p, q = fit()
    print("P (x^0 .. x^12, float32):", [repr(np.float32(v)) for v in p])
    print("Q (x^0 .. x^6, float32): ", [repr(np.float32(v)) for v in q])
    xs = np.linspace(-12, 12, 2_000_001).astype(np.float32)
    err = eval_float32(p, q, xs).astype(np.float64) - np.tanh(xs.astype(np.float64))
    print(f"max |error| of the float32 evaluation on [-12, 12]: {np.abs(err).max():.2e}")


if __name__ == "__main__":
    main()
