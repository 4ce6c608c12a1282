"""Command line: ``python -m rnnkern labs|train|sample|export|bench|backends`` (or ``rnnkern ...``).

    python -m rnnkern labs                 lab 12 reproductions, short output, outcome checks
    python -m rnnkern train [args]         char-rnn training, on tiny-shakespeare by default;
                                           --level word for a word-level model
                                           (examples/char_rnn.py train --help)
    python -m rnnkern sample [args]        sample from a checkpoint of either level
    python -m rnnkern export --checkpoint X --onnx model.onnx
                                           the checkpoint's model as ONNX (needs onnx;
                                           --with-lengths, --with-state, --opset N)
    python -m rnnkern bench [cpu|e2e|all] [args]
                                           benchmarks/bench_cpu.py (kernels vs PyTorch) and
                                           benchmarks/bench_e2e.py (training recipes vs PyTorch),
                                           from a source checkout
    python -m rnnkern backends             which backends run here, and why not

The examples are installed with the package (``rnnkern.examples``); the benchmarks are not.
"""
from __future__ import annotations

import os
import subprocess
import sys

from ._source_tree import source_tree_root

USAGE = __doc__.split("\n\n")[1]
BENCHES = {"cpu": "bench_cpu.py", "e2e": "bench_e2e.py"}


def _bench(argv):
    which = "all"
    if argv and argv[0] in ("cpu", "e2e", "all"):
        which, argv = argv[0], argv[1:]
    root = source_tree_root()
    candidates = ([os.path.join(root, "benchmarks")] if root else []) + [
        os.path.join(os.getcwd(), "benchmarks")]
    bench_dir = next((d for d in candidates if os.path.isdir(d)), None)
    if bench_dir is None:
        print("benchmarks/ not found: the benchmarks are not installed with the package; run "
              "`python -m rnnkern bench` inside a source checkout (or its sdist)", file=sys.stderr)
        return 2
    names = list(BENCHES) if which == "all" else [which]
    rc = 0
    for name in names:
        script = os.path.join(bench_dir, BENCHES[name])
        if not os.path.isfile(script):
            print(f"skip {name}: {script} does not exist", flush=True)
            continue
        print(f"== {BENCHES[name]} {' '.join(argv)}", flush=True)
        # a fresh process per benchmark: each sets its own thread counts before importing
        rc = max(rc, subprocess.call([sys.executable, script, *argv], cwd=os.path.dirname(bench_dir)))
    return rc


def _backends():
    import rnnkern as rk
    for name, (ok, reason) in rk.available_backends().items():
        print(f"{name:6s} {'yes' if ok else 'no '}  {reason}")
    print(f"(rnnkern {rk.__version__} imported from {os.path.dirname(rk.__file__)})")
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "labs":
        from .labs import main as labs_main
        return labs_main(rest)
    if command in ("train", "sample"):
        from .labs import load_example
        # cli(), not main(): the same one-line errors as `python examples/char_rnn.py`
        return load_example("char_rnn").cli([command, *rest], prog="rnnkern")
    if command == "export":
        from .onnx.cli import main as export_main
        return export_main(rest)
    if command == "bench":
        return _bench(rest)
    if command == "backends":
        return _backends()
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
