"""Run the lab 12 reproductions in ``rnnkern.examples`` in sequence and check each documented
outcome.

``python -m rnnkern labs`` imports each example script and calls its ``main(argv)`` with
``--quiet`` (short output), then compares the returned outcome with what the lab documents.
The scripts are the checkout's top-level ``examples/``, installed as the subpackage
``rnnkern.examples``; a package imported from a checkout reads them from its ``examples/``.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time

from ._source_tree import source_tree_root
from .blas_threads import limit_blas_threads, loaded_openblas, restore_blas_threads  # noqa: F401


# re-exported for the examples, bench_e2e and tests (one copy lives in rnnkern.blas_threads)
_openblas_libs = loaded_openblas
EXAMPLES = "rnnkern.examples"


def _examples_package():
    """``rnnkern.examples``: in a checkout, its ``examples/`` folder (registered under that
    name, so the scripts' own imports resolve the same way, installed or not); otherwise the
    installed subpackage (a wheel, ``pip install .``)."""
    if EXAMPLES in sys.modules:
        return sys.modules[EXAMPLES]
    root = source_tree_root()
    init = os.path.join(root, "examples", "__init__.py") if root else ""
    if not os.path.isfile(init):
        return importlib.import_module(EXAMPLES)
    spec = importlib.util.spec_from_file_location(
        EXAMPLES, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[EXAMPLES] = module
    spec.loader.exec_module(module)
    setattr(sys.modules["rnnkern"], "examples", module)   # as an import statement would
    return module


# ---------------------------------------------------------------------- command-line errors
# What bad input raises: the library's ValueError (CheckpointError and UnicodeDecodeError are
# ValueErrors) and the OS's errors for files. Anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, OSError)


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ...``, exit 2), like the
    input errors :func:`run_cli` reports, instead of the full usage block first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_cli(prog, fn):
    """Exit status of ``fn()``: 0, or 2 with one line ``prog: error: ...`` on stderr when it
    fails on bad input (:data:`INPUT_ERRORS`)."""
    try:
        fn()
    except INPUT_ERRORS as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__   # one line, whatever exc says
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    return 0


def readable_file(path, what):
    """Raise the OSError/ValueError that says why ``path`` (given as ``what``, e.g. "--csv")
    cannot be read as a data file: missing, a directory, unreadable or empty."""
    label = f"{what} {path}"
    if os.path.isdir(path):
        raise IsADirectoryError(f"{label}: is a directory, not a file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{label}: file not found")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{label}: permission denied")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{label}: file is empty")


def load_example(name):
    """The example script ``name`` (e.g. ``"lab12_1_hello_rnn"``) as module
    ``rnnkern.examples.<name>``."""
    _examples_package()
    return importlib.import_module(f"{EXAMPLES}.{name}")


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
    p = CliParser(prog="rnnkern labs",
                  description="Run the lab 12 reproductions with short output.")
    p.add_argument("--only", nargs="+", metavar="N",
                   help="run only these labs (numbers 0-5 or module names)")
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="lab 12-5 prices in the lab's layout (default: the packaged copy)")
    p.add_argument("--plot", default="", metavar="PNG",
                   help="draw lab 12-5's test prediction against the truth into this PNG "
                        "(needs matplotlib; default: no plot)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blas-threads", type=int, default=1,
                   help="OpenBLAS threads for the run (default 1: the labs are tiny; 0 = leave "
                        "as is)")
    args = p.parse_args(argv)
    if args.csv is not None:
        # a data file named explicitly that cannot be read is the user's error, not a lab's
        # mismatch: say so before running anything
        try:
            readable_file(args.csv, "--csv")
        except INPUT_ERRORS as exc:
            p.exit(2, f"{p.prog}: error: {exc}\n")
    if args.blas_threads:
        limit_blas_threads(args.blas_threads)

    selected = LABS
    if args.only:
        selected = [lab for lab in LABS
                    if any(o == lab[0] or o == lab[0][6] for o in args.only)]
        if not selected:
            p.error(f"--only {args.only}: no such lab (0-5)")

    import numpy as np
    import rnnkern as rk
    from rnnkern.backends import resolve
    print(f"rnnkern {rk.__version__} from {os.path.dirname(rk.__file__)}")
    print(f"backend {args.backend} -> {resolve(args.backend, np.zeros(1)).name}")
    cpp_ok, cpp_reason = rk.available_backends()["cpp"]
    if not cpp_ok:
        print(f"  (cpp unavailable: {cpp_reason})")
    t_all = time.perf_counter()
    failures = []
    for name, title, check in selected:
        print(f"\n== {title} ({name}.py)", flush=True)
        argv_lab = ["--quiet", "--seed", str(args.seed), "--backend", args.backend,
                    "--blas-threads", str(args.blas_threads)]
        if name == "lab12_5_rnn_stock_prediction":
            argv_lab += ["--plot", args.plot] + (["--csv", args.csv] if args.csv else [])
        t0 = time.perf_counter()
        try:
            ok, outcome = check(load_example(name).main(argv_lab))
        except Exception as exc:  # noqa: BLE001 - one lab's failure must not hide the others'
            ok, outcome = False, f"{type(exc).__name__}: {exc}"
        dt = time.perf_counter() - t0
        if ok and name == "lab12_5_rnn_stock_prediction" and args.plot:
            outcome += f"; plot: {args.plot}"
        print(f"{'ok' if ok else 'MISMATCH'}: {outcome} ({dt:.1f} s)", flush=True)
        if not ok:
            failures.append(name)
    total = time.perf_counter() - t_all
    print(f"\n{len(selected) - len(failures)} of {len(selected)} labs reproduced "
          f"their documented outcome"
          + (f", MISMATCH: {', '.join(failures)}" if failures else "")
          + f" ({total:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
