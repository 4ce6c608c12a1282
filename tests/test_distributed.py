"""Data-parallel training over MPI (rnnkern/distributed.py): 2 ranks through ``mpiexec`` compute
what one process computes on the same global batches (float64, relative 1e-10) for LSTM, GRU
and RNN with Embedding and one-hot input, on the C++ and seam plans and the generic loop, with
uneven shares, masked positions, a carried state and clipping; one allreduce per step; the
Trainer's checkpoints are written once and resume on 1 rank; a rank that raises or hangs ends
the job with an error on every rank; the CLI's --distributed at both levels.

The MPI programs are tests/mpi_cases.py; a few launches cover every case (each ~1-3 s).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import rnnkern as rk

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "mpi_cases.py")
F64 = 1e-10


def _mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")   # the mpich wheel's
    return beside if os.path.exists(beside) else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason='needs mpi4py and mpiexec: pip install "rnnkern[mpi]"')


def launch(args, ranks=2, timeout=120, cwd=None):
    """Run ``args`` (after ``python``) on ``ranks`` ranks, or as one plain process (ranks=0)."""
    env = dict(os.environ, RNNKERN_MPI_TIMEOUT="60", PYTHONUNBUFFERED="1")
    env.setdefault("HYDRA_LAUNCHER", "fork")   # MPICH: start local ranks directly, never ssh
    cmd = [sys.executable, *args]
    if ranks:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    """One 2-rank launch of every equivalence case; (rank 0's, rank 1's) results and notes."""
    out = tmp_path_factory.mktemp("mpi")
    ok(launch([CASES, "equivalence", str(out)]))
    ranks = [np.load(out / f"equivalence.rank{r}.npz") for r in (0, 1)]
    notes = [json.loads((out / f"plans.rank{r}.json").read_text()) for r in (0, 1)]
    return out, ranks, notes


def relative(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


CASE_NAMES = ([f"{b}-{c}-{e}-{m}" for b in ("cpp", "numpy") for c in ("lstm", "gru", "rnn")
               for e in ("embedding", "onehot") for m in ("full", "masked")]
              + ["generic-mse", "generic-sum_squares", "generic-sequence_loss"])


@needs_mpi
def test_two_ranks_equal_one_process(equivalence):
    """Parameters and losses after 3 steps on 2 ranks (rows 4 + 3) match one process's."""
    _, ranks, notes = equivalence
    worst = 0.0
    for rank in ranks:
        for name in CASE_NAMES:
            for what in ("params", "loss"):
                err = relative(rank[f"{name}/{what}"], rank[f"{name}/ref_{what}"])
                assert err < F64, f"{name} {what}: relative error {err:.2e}"
                worst = max(worst, err)
            assert int(rank[f"{name}/allreduces"]) == 3, f"{name}: one allreduce per step"
    # the ranks hold the same parameters, to the bit
    for name in CASE_NAMES:
        np.testing.assert_array_equal(ranks[0][f"{name}/params"], ranks[1][f"{name}/params"])
    assert "allreduce" in notes[0]["cpp-lstm-embedding-full/plan"]
    assert "[4,5]" in notes[0]["cpp-lstm-embedding-full/plan"]      # rank 0: 4 of 7 rows
    assert "[3,5]" in notes[1]["cpp-lstm-embedding-full/plan"]      # rank 1: the other 3
    print(f"worst relative error over {len(CASE_NAMES)} cases: {worst:.1e}")


@needs_mpi
@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_dropout_ranks_draw_their_own_masks_and_keep_one_model(equivalence, backend):
    """After synchronise, rank 1's dropout generators are rank 0's jumped once; training with
    dropout keeps the ranks' parameters identical."""
    _, _, notes = equivalence
    (params0, streams0), (params1, streams1) = (n[f"dropout-{backend}"] for n in notes)
    assert params0 == params1 and np.isfinite(params0).all()
    assert len(streams0) == 2 and streams0.keys() == streams1.keys()   # the LSTM, the Dropout
    for key, st in streams0.items():
        bits = np.random.PCG64()
        bits.state = st
        assert streams1[key] == bits.jumped(1).state


@needs_mpi
def test_trainer_two_ranks_equal_one_process(equivalence):
    """The stateful Trainer (carried state, validation) over 2 epochs."""
    _, ranks, _ = equivalence
    for rank in ranks:
        for what in ("params", "loss", "val"):
            err = relative(rank[f"trainer/{what}"], rank[f"trainer/ref_{what}"])
            assert err < F64, f"trainer {what}: relative error {err:.2e}"


@needs_mpi
def test_checkpoints_written_once_and_resumed_on_two_ranks(equivalence):
    out, ranks, _ = equivalence
    assert int(ranks[0]["stopped_step"]) == 5
    assert int(ranks[0]["writes"][0]) == 1 and int(ranks[1]["writes"][1]) == 0
    assert os.path.exists(out / "mid.npz")
    ck = rk.load_checkpoint(out / "mid.npz")
    assert ck["meta"]["step_in_epoch"] == 1                 # mid-epoch: a carried state ...
    h = ck["arrays"]["state.1.0"]
    assert h.shape == (2, 7, 6) and np.all(np.any(h != 0, axis=(0, 2)))   # ... of all 7 rows
    for rank in ranks:
        err = relative(rank["resumed/params"], rank["trainer/ref_params"])
        assert err < F64, f"resumed on 2 ranks: relative error {err:.2e}"


@needs_mpi
def test_resume_two_rank_checkpoint_on_one_rank(equivalence):
    out, _, _ = equivalence
    ok(launch([CASES, "resume", str(out)], ranks=0))
    got = np.load(out / "resume.npz")
    assert int(got["size"]) == 1 and int(got["from_step"]) == 5
    assert relative(got["params"], got["ref_params"]) < F64
    assert relative(got["val"], got["ref_val"]) < F64


@needs_mpi
def test_bad_input_raises_on_every_rank(equivalence):
    _, _, notes = equivalence
    for note in notes:
        few, timeout = note["bad_input"]
        assert "a batch of 1 rows cannot be shared by 2 ranks" in few
        assert "timeout must be a positive number" in timeout


@needs_mpi
@pytest.mark.parametrize("case, failed, told", [
    ("fail-step", "ValueError: OneHot ids must lie in [0, 9)",
     r"rank 0: rank 1 of 2 failed with ValueError: OneHot ids must lie in \[0, 9\)"),
    ("fail-save", "IsADirectoryError", "rank 1: rank 0 of 2 failed with IsADirectoryError"),
    # (a loaded machine may delay either rank past the timeout first: either may say it)
    ("hang", None, r"rank [01]: no answer from the other ranks for 4 s"),
    ("leave", None, "rank 0: rank 1 of 2 ended its program while this rank waits in a step's "
                    "gradient allreduce"),
])
def test_a_failing_rank_ends_the_job(tmp_path, case, failed, told):
    """A rank that raises (inside the step, or writing the checkpoint), hangs, or leaves early:
    the job ends with a non-zero status, the failing rank's own error and the other's naming
    it."""
    proc = launch([CASES, case, str(tmp_path)], timeout=60)
    assert proc.returncode != 0
    if failed is not None:
        assert failed in proc.stderr
    # the two ranks write their tracebacks at once, and one may land inside the other's line
    assert "DistributedError" in proc.stderr and re.search(told, proc.stderr), proc.stderr


CLI = ["-m", "rnnkern", "train", "--max-chars", "8000", "--batch-size", "6", "--seq-length",
       "12", "--rnn-size", "16", "--epochs", "2", "--sample-length", "20", "--max-vocab", "200"]


@needs_mpi
@pytest.mark.parametrize("level", ["char", "word"])
def test_cli_distributed(tmp_path, level):
    """``mpiexec -n 2 python -m rnnkern train --distributed``: one process's epochs (printed
    once), one checkpoint, equal to one process's parameters (float32)."""
    args = CLI if level == "word" else [a for a in CLI if a not in ("--max-vocab", "200")]
    args = [*args, "--level", level]
    two = ok(launch([*args, "--distributed", "--checkpoint", "two.npz"], cwd=tmp_path))
    one = ok(launch([*args, "--checkpoint", "one.npz"], ranks=0, cwd=tmp_path))
    assert two.stdout.count("epoch 2/2:") == 1 and two.stdout.count("---- sample ----") == 1
    assert "MPI ranks 2" in two.stdout
    lines = [[ln.split(",")[0] for ln in p.stdout.splitlines() if ln.startswith("epoch")]
             for p in (two, one)]
    assert lines[0] == lines[1]             # the train losses, to 4 decimals
    a, b = (rk.load_checkpoint(tmp_path / f)["params"] for f in ("two.npz", "one.npz"))
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-5, err_msg=k)


# ---------------------------------------------------------------------- no MPI needed
def test_import_does_not_import_mpi4py():
    code = ("import sys, rnnkern, rnnkern.examples.char_rnn; "
            "assert 'mpi4py' not in sys.modules, 'imported'")
    ok(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60))


def test_missing_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r'pip install "rnnkern\[mpi\]"'):
        rk.distributed.MPIGroup()


@pytest.mark.parametrize("value", ["nccl", True, 2])
def test_unknown_distributed_value(value):
    model = rk.Sequential([rk.OneHot(3), rk.RNN(3, 4), rk.Dense(4, 3)])
    with pytest.raises(ValueError, match="distributed must be None, 'mpi' or an "):
        rk.Trainer(model, rk.sequence_loss, rk.SGD(0.1), distributed=value)


def test_loss_fraction_reproduces_the_whole_batch_loss():
    """Each share's loss (normalised on its own) times its fraction sums to the batch's,
    for masked sequence_loss (a share with all weights zero included), mse and sum_squares."""
    from rnnkern.distributed import loss_fraction
    rng = np.random.default_rng(0)
    logits, y = rng.standard_normal((5, 3, 4)), rng.integers(0, 4, (5, 3))
    w = (rng.random((5, 3)) < 0.6).astype(float)
    w[4] = 0.0
    pred, target = rng.standard_normal((5, 2)), rng.standard_normal((5, 2))
    for rows in ([slice(0, 3), slice(3, 5)], [slice(0, 2), slice(2, 4), slice(4, 5)]):
        for loss, args, kw in ((rk.sequence_loss, (logits, y), {"weights": w}),
                               (rk.sequence_loss, (logits, y), {}),
                               (rk.mse, (pred, target), {}), (rk.sum_squares, (pred, target), {})):
            whole = loss(*args, **kw)
            parts = sum(loss(*(a[r] for a in args), **{k: v[r] for k, v in kw.items()})
                        * loss_fraction(loss, args[1], kw.get("weights"), r, 5) for r in rows)
            assert parts == pytest.approx(whole, rel=1e-13), loss.__name__


def test_split_streams_gives_rank_r_the_generators_jumped_r_times():
    from rnnkern.distributed import split_streams
    models = [rk.Sequential([rk.Embedding(5, 3, seed=0),
                             rk.LSTM(3, 4, 2, dropout=0.5, seed=1), rk.Dropout(0.5, seed=2),
                             rk.Dense(4, 5, seed=3)]) for _ in range(3)]
    before = models[0].get_rng_state()
    for rank, model in enumerate(models):
        split_streams(model, rank)
    assert models[0].get_rng_state() == before
    for key, st in before.items():
        bits = np.random.PCG64()
        bits.state = st
        assert models[2].get_rng_state()[key] == bits.jumped(2).state
        assert models[1].get_rng_state()[key] != models[2].get_rng_state()[key]
