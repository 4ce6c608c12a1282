"""Run the lab 12 reproductions in ``examples/`` in sequence and check each documented outcome.

``python -m rnnkern labs`` imports each example script and calls its ``main(argv)`` with
``--quiet`` (short output), then compares the returned outcome with what the lab documents.
The scripts live in the source tree's ``examples/`` (next to the package, or under the current
directory); they are not part of an installed wheel.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

from .blas_threads import limit_blas_threads, loaded_openblas, restore_blas_threads  # noqa: F401


# re-exported for the examples, bench_e2e and tests (one copy lives in rnnkern.blas_threads)
_openblas_libs = loaded_openblas


def examples_dir():
    """``examples/`` beside the package (source checkout), else under the current directory."""
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(os.path.dirname(here), "examples"),
                 os.path.join(os.getcwd(), "examples")):
        if os.path.isfile(os.path.join(cand, "_common.py")):
            return cand
    raise FileNotFoundError(
        "examples/ not found: run from a source checkout of rnnkern (the lab scripts are not "
        "installed with the package)")


def load_example(name):
    """Import ``examples/<name>.py`` as a module (its directory goes on sys.path for _common)."""
    d = examples_dir()
    if d not in sys.path:
        sys.path.insert(0, d)
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(d, name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------- documented outcomes
def _check_lab0(r):
    expected = (0.596759, 0.513015, 0.371101)
    ok = (r["lengths_zeros"] and r["batch_shape"] == (3, 5, 2)
          and r["stacked_shape"] == (3, 5, 5)
          and all(abs(a - b) < 5e-7 for a, b in zip(r["losses"], expected)))
    return ok, "shapes, zeros past lengths and sequence_loss 0.596759 / 0.513015 / 0.371101"


def _check_lab1(r):
    return r["prediction"] == "ihello", "Prediction str:  ihello"


def _check_lab2(r):
    return r["prediction"] == "if you want you", "Prediction: if you want you"


def _check_lab3(r):
    ok = r["prediction"] == "yf you yant you" and abs(r["loss"] - r["floor"]) < 1e-3
    return ok, "loss within 0.001 of 6 ln2/15 = 0.277259, Prediction: yf you yant you"


def _check_lab4(r):
    return (r["exact"] and r["loss"] < 0.25,
            "sentence reconstructed exactly after its first character, loss < 0.25")


def _check_lab5(r):
    return r["rmse"] < 0.07, "RMSE on the scaled test set below 0.07 (PyTorch, same recipe: ~0.048)"


LABS = [
    ("lab12_0_rnn_basics", "lab 12-0  RNN basics", _check_lab0),
    ("lab12_1_hello_rnn", "lab 12-1  hihello -> ihello", _check_lab1),
    ("lab12_2_char_seq_rnn", "lab 12-2  char-seq RNN", _check_lab2),
    ("lab12_3_char_seq_softmax_only", "lab 12-3  softmax only (no memory)", _check_lab3),
    ("lab12_4_rnn_long_char", "lab 12-4  long sentence, 2-layer LSTM", _check_lab4),
    ("lab12_5_rnn_stock_prediction", "lab 12-5  stock prediction", _check_lab5),
]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rnnkern labs",
                                description="Run the lab 12 reproductions with short output.")
    p.add_argument("--only", nargs="+", metavar="N",
                   help="run only these labs (numbers 0-5 or module names)")
    p.add_argument("--csv", default=None, help="lab 12-5 data file (default: its script's "
                                               "default, ../shared/data/data-02-stock_daily.csv)")
    p.add_argument("--plot", default=os.path.join(tempfile.gettempdir(),
                                                  "rnnkern_lab12_5_stock.png"),
                   help="where lab 12-5 saves its plot (default %(default)s)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blas-threads", type=int, default=1,
                   help="OpenBLAS threads for the run (default 1: the labs are tiny; 0 = leave "
                        "as is)")
    args = p.parse_args(argv)
    if args.blas_threads:
        limit_blas_threads(args.blas_threads)

    selected = LABS
    if args.only:
        selected = [lab for lab in LABS
                    if any(o == lab[0] or o == lab[0][6] for o in args.only)]
        if not selected:
            p.error(f"--only {args.only}: no such lab (0-5)")

    import rnnkern as rk
    from rnnkern.backends import resolve
    import numpy as np
    lstm, gru = (resolve(args.backend, np.zeros(1), kind).name for kind in ("lstm", "gru"))
    print(f"rnnkern {rk.__version__}, backend {args.backend} -> LSTM {lstm}, GRU/RNN {gru} "
          f"(training steps of small models: numba when available)")
    t_all = time.perf_counter()
    failures, skipped = [], []
    for name, title, check in selected:
        print(f"\n== {title} ({name}.py)", flush=True)
        common = ["--quiet", "--seed", str(args.seed), "--backend", args.backend,
                  "--blas-threads", str(args.blas_threads)]
        extra = []
        if name == "lab12_5_rnn_stock_prediction":
            mod = load_example(name)
            csv = args.csv or mod.shared_data(mod.CSV_NAME)
            if not os.path.isfile(csv):
                print(f"SKIP: data file not found: {csv} (pass --csv PATH)")
                skipped.append(name)
                continue
            extra = ["--csv", csv, "--plot", args.plot]
        t0 = time.perf_counter()
        result = load_example(name).main(common + extra)
        ok, outcome = check(result)
        dt = time.perf_counter() - t0
        if name == "lab12_5_rnn_stock_prediction":
            outcome += f"; plot: {args.plot}"
        print(f"{'ok' if ok else 'MISMATCH'}: {outcome} ({dt:.1f} s)", flush=True)
        if not ok:
            failures.append(name)
    total = time.perf_counter() - t_all
    print(f"\n{len(selected) - len(failures) - len(skipped)} of {len(selected)} labs reproduced "
          f"their documented outcome"
          + (f", {len(skipped)} skipped" if skipped else "")
          + (f", MISMATCH: {', '.join(failures)}" if failures else "")
          + f" ({total:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
