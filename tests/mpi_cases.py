"""The programs tests/test_distributed.py runs under ``mpiexec`` (or as one plain process).

    python tests/mpi_cases.py CASE OUTDIR

Each writes what it computed to OUTDIR (one ``.npz`` per rank, plus counters); the assertions
live in tests/test_distributed.py. Every data-parallel run is paired with the same model trained
by one process on the same global batches, in the same script (no distributed argument), so a
launch checks itself against its own reference.

Cases:
  equivalence  TrainStep over every cell, input, plan and loss form, uneven shares, masked
               positions, a carried state and clipping; a stateful Trainer with validation
               and a checkpoint every 5 steps, stopped at step 5; the same checkpoint resumed
               on the same ranks
  resume       (one plain process) the 2-rank checkpoint of ``equivalence`` resumed here
  fail-step    ids out of range in rank 1's rows only: rank 1 raises inside the step
  fail-save    rank 0 cannot write its checkpoint (a directory stands at its path)
  hang         rank 1 sleeps in a callback; the group's 4 s timeout ends the job
  leave        rank 1's program ends after 2 steps while rank 0 trains on

Shape legend: B batch rows (global), T time steps, V vocabulary, H hidden size, C classes.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

import rnnkern as rk
import rnnkern.trainer

B, T, V, H, C = 7, 5, 9, 6, 9      # 7 rows: shares of 4 and 3 on 2 ranks
CELLS = {"lstm": rk.LSTM, "gru": rk.GRU, "rnn": rk.RNN}


def make_model(cell, enc, backend, layers=2, seed=0, dropout=0.0):
    """[OneHot(V) | Embedding(V,4)] -> recurrent(H, layers) -> [Dropout] -> Dense(C), float64."""
    mods, n_in = [], V
    if enc == "onehot":
        mods.append(rk.OneHot(V, dtype="float64"))
    else:
        mods.append(rk.Embedding(V, 4, seed=seed, dtype="float64"))
        n_in = 4
    mods.append(CELLS[cell](n_in, H, layers, dtype="float64", seed=seed + 1, backend=backend,
                            dropout=dropout))
    if dropout:
        mods.append(rk.Dropout(dropout, seed=seed + 3))
    mods.append(rk.Dense(H, C, seed=seed + 2, dtype="float64"))
    return rk.Sequential(mods)


def make_regressor(seed=0):
    """A model off the step plan's form (LastStep): the generic loop. x [B,T,3] -> y [B,2]."""
    return rk.Sequential([rk.GRU(3, H, dtype="float64", seed=seed + 1, backend="numpy"),
                          rk.LastStep(), rk.Dense(H, 2, seed=seed + 2, dtype="float64")])


def batches(n, masked, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x, y = rng.integers(0, V, (B, T)), rng.integers(0, C, (B, T))
        w = None
        if masked:   # zeros anywhere, and the last row (rank 1's) all zeros at some step
            w = (rng.random((B, T)) < 0.7).astype(np.float64)
            w[-1] = 0.0 if len(out) == 1 else w[-1]
        out.append((x, y, w))
    return out


def regression_batches(n, seed=2):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((B, T, 3)), rng.standard_normal((B, 2)), None)
            for _ in range(n)]


def run_steps(model, loss, data, distributed, carry, generic=False):
    """An optimizer step per batch; returns (losses, the final flat parameters, the step,
    the allreduces it ran)."""
    opt = rk.Adam(0.05, clip_norm=0.5)        # small: clipping is active at every step
    step = rk.TrainStep(model, loss, opt, distributed=distributed, generic=generic)
    allreduces = 0 if distributed is None else distributed.timings["allreduce"][1]
    state, losses = None, []
    for x, y, w in data:
        if carry:
            value, state = step(x, y, initial_state=state, weights=w, return_state=True)
        else:
            value = step(x, y, weights=w)
        losses.append(value)
    params = np.concatenate([p.reshape(-1) for p in model.params.values()])
    if distributed is not None:
        allreduces = distributed.timings["allreduce"][1] - allreduces
    return np.array(losses), params, step, allreduces


def bad_input(group):
    """The errors of a batch with fewer rows than ranks and of a bad timeout, raised alike on
    every rank before any collective (the group stays usable)."""
    step = rk.TrainStep(make_model("rnn", "onehot", "numpy"), rk.sequence_loss, rk.SGD(0.1),
                        distributed=group)
    messages = []
    x, y, _ = batches(1, False)[0]
    for make in (lambda: step(x[:1], y[:1]), lambda: rk.distributed.MPIGroup(timeout=0)):
        try:
            make()
            messages.append("no error")
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def equivalence(out):
    group = rk.distributed.MPIGroup()
    results = {"bad_input": bad_input(group)}
    for backend in ("cpp", "numpy"):
        for cell in CELLS:
            for enc in ("embedding", "onehot"):
                for masked in (False, True):
                    name = f"{backend}-{cell}-{enc}-{'masked' if masked else 'full'}"
                    data = batches(3, masked)
                    carry = not masked
                    ref = run_steps(make_model(cell, enc, backend), rk.sequence_loss, data, None,
                                    carry)
                    got = run_steps(make_model(cell, enc, backend, seed=group.rank),
                                    rk.sequence_loss, data, group, carry)
                    results[name] = (ref, got)
                    results[name + "/plan"] = str(got[2].plan)
    for loss in (rk.mse, rk.sum_squares):
        name = f"generic-{loss.__name__}"
        data = regression_batches(3)
        ref = run_steps(make_regressor(), loss, data, None, False)
        got = run_steps(make_regressor(seed=group.rank), loss, data, group, False)
        results[name] = (ref, got)
        results[name + "/plan"] = repr(got[2])
    data = batches(3, True)
    results["generic-sequence_loss"] = (
        run_steps(make_model("lstm", "embedding", "cpp"), rk.sequence_loss, data, None, True,
                  generic=True),
        run_steps(make_model("lstm", "embedding", "cpp", seed=group.rank), rk.sequence_loss,
                  data, group, True, generic=True))
    for backend in ("cpp", "numpy"):     # dropout: each rank its own masks, one update
        model = make_model("lstm", "embedding", backend, seed=group.rank, dropout=0.4)
        step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(0.05), distributed=group)
        step.synchronise()
        streams = model.get_rng_state()
        for x, y, _ in batches(3, False):
            step(x, y)
        results[f"dropout-{backend}"] = [flat(model).tolist(), streams]
    arrays = {}
    for name, value in results.items():
        if not isinstance(value, tuple):
            continue
        (ref_loss, ref_params, _, _), (loss, params, _, allreduces) = value
        arrays.update({f"{name}/ref_loss": ref_loss, f"{name}/loss": loss,
                       f"{name}/ref_params": ref_params, f"{name}/params": params,
                       f"{name}/allreduces": np.array(allreduces)})
    arrays.update(trainer_case(group, out))
    np.savez(os.path.join(out, f"equivalence.rank{group.rank}.npz"), **arrays)
    with open(os.path.join(out, f"plans.rank{group.rank}.json"), "w") as f:
        json.dump({k: v for k, v in results.items() if not isinstance(v, tuple)}, f)


# ---------------------------------------------------------------------- the Trainer
def stream_data():
    """char-rnn's data: a stream cut into B contiguous rows, batches [B,T] in order."""
    ids = np.random.default_rng(5).integers(0, V, 4 * B * T + 1)
    val = np.random.default_rng(6).integers(0, V, 2 * B * T + 1)
    return rk.StreamBatches(ids, B, T), rk.StreamBatches(val, B, T)


def make_trainer(distributed, checkpoint=None, seed=0, callbacks=()):
    model = make_model("lstm", "embedding", "cpp", seed=seed)
    return rk.Trainer(model, rk.sequence_loss, rk.Adam(0.02, clip_norm=1.0), stateful=True,
                      progress=False, checkpoint=checkpoint, checkpoint_every=5,
                      distributed=distributed, callbacks=list(callbacks))


def count_writes():
    """Count this process's checkpoint writes (the Trainer's save_checkpoint calls)."""
    calls = []
    real = rnnkern.trainer.save_checkpoint

    def counted(path, **kwargs):
        calls.append(path)
        return real(path, **kwargs)
    rnnkern.trainer.save_checkpoint = counted
    return calls


class StopAt(rk.Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.global_step == self.step:
            trainer.stop_training = True


def flat(model):
    return np.concatenate([p.reshape(-1) for p in model.params.values()])


def trainer_case(group, out):
    """The stateful Trainer on 2 ranks vs 1 process: 2 epochs with validation; a checkpoint
    at step 5 (mid-epoch 2, a carried state in it), resumed on these ranks."""
    train, val = stream_data()
    ref = make_trainer(None)
    ref.fit(train, epochs=2, val_data=val)
    writes = count_writes()
    ck = os.path.join(out, "mid.npz")
    stopped = make_trainer(group, checkpoint=ck, seed=group.rank, callbacks=[StopAt(5)])
    stopped.fit(train, epochs=2, val_data=val)
    n_writes = len(writes)
    resumed = make_trainer(group, checkpoint=os.path.join(out, "end.npz"), seed=7)
    resumed.load(ck)
    resumed.fit(train, epochs=2, val_data=val)
    whole = make_trainer(group, seed=group.rank)
    whole.fit(train, epochs=2, val_data=val)
    return {"trainer/ref_params": flat(ref.model), "trainer/params": flat(whole.model),
            "trainer/ref_loss": np.array(ref.history["loss"]),
            "trainer/loss": np.array(whole.history["loss"]),
            "trainer/ref_val": np.array(ref.history["val_loss"]),
            "trainer/val": np.array(whole.history["val_loss"]),
            "resumed/params": flat(resumed.model),
            "resumed/val": np.array(resumed.history["val_loss"]),
            "writes": np.array([n_writes, len(writes)]),
            "stopped_step": np.array(stopped.global_step)}


def resume(out):
    """One process (distributed="mpi", a world of one) resumes the 2-rank checkpoint."""
    train, val = stream_data()
    ref = make_trainer(None)
    ref.fit(train, epochs=2, val_data=val)
    got = make_trainer("mpi", seed=3)
    got.load(os.path.join(out, "mid.npz"))
    step = got.global_step
    got.fit(train, epochs=2, val_data=val)
    np.savez(os.path.join(out, "resume.npz"), ref_params=flat(ref.model),
             params=flat(got.model), ref_val=np.array(ref.history["val_loss"]),
             val=np.array(got.history["val_loss"]), size=got.group.size, from_step=step)


# ---------------------------------------------------------------------- failures
def fail_step(out):
    group = rk.distributed.MPIGroup(timeout=60)
    step = rk.TrainStep(make_model("lstm", "onehot", "cpp"), rk.sequence_loss, rk.Adam(0.01),
                        distributed=group)
    x, y, _ = batches(1, False)[0]
    step(x, y)
    x = x.copy()
    x[-1, 0] = V + 3              # the last row: rank 1's
    step(x, y)


def fail_save(out):
    group = rk.distributed.MPIGroup(timeout=60)
    path = os.path.join(out, "taken")
    os.makedirs(path, exist_ok=True)   # rank 0's save meets a directory
    train, _ = stream_data()
    make_trainer(group, checkpoint=path).fit(train, epochs=3)


class Sleep(rk.Callback):
    def on_step_end(self, trainer):
        if trainer.group.rank == 1 and trainer.global_step == 2:
            time.sleep(120)


def hang(out):
    group = rk.distributed.MPIGroup(timeout=4)
    train, _ = stream_data()
    make_trainer(group, callbacks=[Sleep()]).fit(train, epochs=3)


def leave(out):
    group = rk.distributed.MPIGroup(timeout=60)
    train, _ = stream_data()
    trainer = make_trainer(group)
    trainer.fit([train[0], train[1]] if group.rank == 1 else train, epochs=1)


CASES = {"equivalence": equivalence, "resume": resume, "fail-step": fail_step,
         "fail-save": fail_save, "hang": hang, "leave": leave}

if __name__ == "__main__":
    CASES[sys.argv[1]](sys.argv[2])
