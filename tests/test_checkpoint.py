"""Checkpoints as a demanding user meets them: every unreadable file is one CheckpointError naming
it, nothing is pickled either way, Trainer.load checks everything before it changes anything, and
the temporary files of killed saves are cleaned up by the next save without touching live ones."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import rnnkern as rk
from rnnkern import checkpoint as ckmod
from rnnkern.checkpoint import CheckpointError


def model(H=4, seed=0):
    return rk.Sequential([rk.OneHot(5), rk.LSTM(5, H, seed=seed, backend="numpy", dropout=0.2),
                          rk.Dropout(0.3, seed=seed + 1), rk.Dense(H, 5, seed=seed + 2)])


def batches(n=3):
    rng = np.random.default_rng(1)
    return [(rng.integers(0, 5, (2, 4)), rng.integers(0, 5, (2, 4))) for _ in range(n)]


def trained(opt=None, seed=0, steps=2):
    """A trainer after a few steps: optimizer slots, RNG states and counters all non-trivial."""
    tr = rk.Trainer(model(seed=seed), rk.sequence_loss, opt or rk.Adam(0.05), shuffle=True,
                    seed=seed, progress=False)
    tr.fit(batches(steps), epochs=1)
    return tr


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.npz"
    trained().save(path, user={"vocab": ["a", "b"]})
    return path


def rewrite(src, dst, *, record=None, drop=(), extra=None):
    """A copy of checkpoint ``src`` with its __meta__ record edited and/or arrays dropped/added."""
    with np.load(src) as z:
        blobs = {k: z[k] for k in z.files if k not in drop}
    if record is not None:
        old = json.loads(bytes(blobs["__meta__"]).decode())
        blobs["__meta__"] = np.frombuffer(json.dumps(record(old)).encode(), np.uint8)
    blobs.update(extra or {})
    np.savez(dst, **blobs)
    return dst


# ---------------------------------------------------------------------- unreadable files
def bad_files(good, d):
    raw = good.read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0x04
    np.save(d / "array.npy", np.zeros(3))
    return {"truncated": raw[: len(raw) // 2], "truncated-tail": raw[:-10], "empty": b"",
            "bit-flipped": bytes(flipped), "text": b"epoch,loss\n1,0.5\n",
            "random": np.random.default_rng(0).bytes(4096), "npy": (d / "array.npy").read_bytes(),
            "zip-header-only": b"PK\x03\x04" + bytes(40)}


@pytest.mark.parametrize("case", ["truncated", "truncated-tail", "empty", "bit-flipped", "text",
                                  "random", "npy", "zip-header-only"])
def test_unreadable_file_is_one_checkpoint_error_naming_it(good, tmp_path, case):
    path = tmp_path / f"{case}.npz"
    path.write_bytes(bad_files(good, tmp_path)[case])
    with pytest.raises(CheckpointError, match=case) as info:
        rk.load_checkpoint(path)
    msg = str(info.value)
    assert "allow_pickle" not in msg and "pickled data" not in msg
    assert isinstance(info.value, ValueError) and rk.CheckpointError is CheckpointError
    # the same through Trainer.load, and nothing changed
    tr = trained()
    before = snapshot(tr)
    with pytest.raises(CheckpointError, match=case):
        tr.load(path)
    assert_unchanged(tr, before)


def test_directory_is_a_checkpoint_error_and_a_missing_file_stays_file_not_found(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        rk.load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        rk.load_checkpoint(tmp_path / "absent.npz")


def test_every_single_bit_flip_loads_identically_or_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "small.npz"
    state = {"class": "Adam", "lr": 0.1, "iterations": 1, "hyper": {},
             "state": {"w": {"m": np.ones((2, 3)), "v": np.full((2, 3), 2.0)}}}
    rk.save_checkpoint(path, params={"w": np.arange(6.0).reshape(2, 3)}, optimizer_state=state,
                       arrays={"s": np.zeros(2, np.float32)}, meta={"epoch": 1})
    raw = path.read_bytes()
    ref = rk.load_checkpoint(path)
    probe = tmp_path / "probe.npz"
    errors = 0
    for i in range(len(raw)):
        for mask in (0x01, 0x80):
            b = bytearray(raw)
            b[i] ^= mask
            probe.write_bytes(b)
            try:
                got = rk.load_checkpoint(probe)
            except CheckpointError:
                errors += 1
                continue
            # flips that load (zip timestamps, version fields) changed nothing we read
            assert got["meta"] == ref["meta"], i
            for part in ("params", "arrays"):
                assert got[part].keys() == ref[part].keys(), i
                for k, a in got[part].items():
                    assert a.dtype == ref[part][k].dtype and np.array_equal(a, ref[part][k]), i
            assert got["optimizer_state"]["state"].keys() == {"w"}
            for s, a in got["optimizer_state"]["state"]["w"].items():
                np.testing.assert_array_equal(a, state["state"]["w"][s])
    assert errors > len(raw)


def test_pickled_member_is_refused_without_mentioning_allow_pickle(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, __meta__=np.frombuffer(json.dumps({"format": ckmod.FORMAT, "meta": {}})
                                          .encode(), np.uint8),
             **{"params/w": np.array([1, "x"], dtype=object)})
    with pytest.raises(CheckpointError, match="'params/w' holds Python objects") as info:
        rk.load_checkpoint(path)
    assert "allow_pickle" not in str(info.value)


# ---------------------------------------------------------------------- save refuses pickling
@pytest.mark.parametrize("where", ["params", "arrays", "optimizer"])
def test_save_refuses_what_would_be_pickled_and_writes_nothing(tmp_path, where):
    path = tmp_path / "ck.npz"
    rk.save_checkpoint(path, params={"w": np.arange(3.0)}, meta={"epoch": 1})
    before = path.read_bytes()
    obj = np.array([{"a": 1}, None], dtype=object)
    kwargs = {"params": {"w": np.zeros(3)}}
    if where == "params":
        kwargs["params"]["w"] = obj
    elif where == "arrays":
        kwargs["arrays"] = {"state": obj}
    else:
        kwargs["optimizer_state"] = {"class": "Adam", "lr": 0.1, "iterations": 1, "hyper": {},
                                     "state": {"w": {"m": obj}}}
    key = {"params": "params/w", "arrays": "arrays/state", "optimizer": "optim/w/m"}[where]
    with pytest.raises(CheckpointError, match=f"'{key}' has dtype object"):
        rk.save_checkpoint(path, **kwargs)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ck.npz"]


def test_save_refuses_ragged_data_structured_objects_and_unserialisable_meta(tmp_path):
    path = tmp_path / "ck.npz"
    with pytest.raises(CheckpointError, match="'params/w' is not an array"):
        rk.save_checkpoint(path, params={"w": [[1.0, 2.0], [3.0]]})
    with pytest.raises(CheckpointError, match="'arrays/r' has dtype"):
        rk.save_checkpoint(path, params={}, arrays={"r": np.zeros(2, dtype=[("a", "f8"),
                                                                            ("b", "O")])})
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        rk.save_checkpoint(path, params={"w": np.zeros(2)}, meta={"when": object()})
    with pytest.raises(CheckpointError, match="slot 'a/b'"):     # would read back as "b"
        rk.save_checkpoint(path, params={}, optimizer_state={"class": "X", "state": {
            "w": {"a/b": np.zeros(2)}}})
    assert os.listdir(tmp_path) == []
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        trained().save(path, user={"vocab": {1, 2}})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- metadata record
@pytest.mark.parametrize("edit, message", [
    (lambda r: {k: v for k, v in r.items() if k != "meta"}, "'meta' field"),
    (lambda r: dict(r, meta=[1, 2]), "'meta' field"),
    (lambda r: {k: v for k, v in r.items() if k != "format"}, "format"),
    (lambda r: [r], "must be a JSON object"),
    (lambda r: dict(r, optimizer="Adam"), "'optimizer' field"),
    (lambda r: dict(r, optimizer=dict(r["optimizer"], iterations="3")), "'iterations'"),
    (lambda r: dict(r, optimizer=dict(r["optimizer"], lr=None)), "'lr'"),
    (lambda r: dict(r, optimizer=dict(r["optimizer"], hyper=[])), "'hyper'"),
])
def test_ill_formed_record_is_a_checkpoint_error(good, tmp_path, edit, message):
    path = rewrite(good, tmp_path / "bad.npz", record=edit)
    with pytest.raises(CheckpointError, match=message):
        rk.load_checkpoint(path)


def test_record_that_is_not_json_or_not_bytes_is_a_checkpoint_error(good, tmp_path):
    path = rewrite(good, tmp_path / "a.npz", extra={"__meta__": np.frombuffer(b"\xff{", np.uint8)})
    with pytest.raises(CheckpointError, match="not valid UTF-8 JSON"):
        rk.load_checkpoint(path)
    path = rewrite(good, tmp_path / "b.npz", extra={"__meta__": np.zeros(3)})
    with pytest.raises(CheckpointError, match="1-D uint8"):
        rk.load_checkpoint(path)
    path = rewrite(good, tmp_path / "c.npz", extra={"optim/nameonly": np.zeros(3)})
    with pytest.raises(CheckpointError, match="optim/<parameter>/<slot>"):
        rk.load_checkpoint(path)
    path = rewrite(good, tmp_path / "d.npz", extra={"weights/w": np.zeros(3)})
    with pytest.raises(CheckpointError, match="unexpected array 'weights/w'"):
        rk.load_checkpoint(path)


@pytest.mark.parametrize("field", ["epoch", "global_step", "step_in_epoch", "loss_sum",
                                   "loss_count", "history", "rng", "epoch_rng", "carried_state"])
@pytest.mark.parametrize("how", ["missing", "wrong type"])
def test_trainer_meta_field_missing_or_wrongly_typed(good, tmp_path, field, how):
    def edit(r):
        meta = dict(r["meta"])
        if how == "missing":
            del meta[field]
        else:
            meta[field] = "x" if field != "loss_sum" else [1.0]
        return dict(r, meta=meta)
    path = rewrite(good, tmp_path / "bad.npz", record=edit)
    tr = trained(seed=3)
    before = snapshot(tr)
    with pytest.raises(CheckpointError, match=field):
        tr.load(path)
    assert_unchanged(tr, before)


def test_trainer_meta_values_are_checked(good, tmp_path):
    cases = {"epoch": -1, "global_step": True, "last_loss": "low",
             "history": {"loss": [0.5], "lr": []}, "rng": {"bit_generator": "PCG64", "state": 3},
             "carried_state": [{"array": "state.0"}]}
    tr = trained(seed=3)
    before = snapshot(tr)
    for field, value in cases.items():
        path = rewrite(good, tmp_path / f"{field}.npz",
                       record=lambda r: dict(r, meta=dict(r["meta"], **{field: value})))
        with pytest.raises(CheckpointError, match=field):
            tr.load(path)
        assert_unchanged(tr, before)


# ---------------------------------------------------------------------- Trainer.load: all or none
def snapshot(tr):
    return {"params": {k: p.copy() for k, p in tr.model.params.items()},
            "opt": {k: {s: a.copy() for s, a in st.items()}
                    for k, st in tr.optimizer.state.items()},
            "scalars": (tr.optimizer.lr, tr.optimizer.iterations),
            "counters": (tr.epoch, tr.global_step, tr.step_in_epoch, tr.last_loss, tr._loss_sum,
                         tr._loss_count, getattr(tr, "skipped_steps", 0)),
            "history": json.dumps(tr.history), "rng": tr.rng.bit_generator.state,
            "epoch_rng": tr._epoch_rng_state, "model_rng": tr.model.get_rng_state(),
            "state": tr._state}


def assert_unchanged(tr, before):
    after = snapshot(tr)
    assert after["params"].keys() == before["params"].keys()
    for k, p in before["params"].items():
        assert np.array_equal(after["params"][k], p), k
    assert after["opt"].keys() == before["opt"].keys()
    for k, st in before["opt"].items():
        assert after["opt"][k].keys() == st.keys()
        for s, a in st.items():
            assert np.array_equal(after["opt"][k][s], a), (k, s)
    for key in ("scalars", "counters", "history", "rng", "epoch_rng", "model_rng"):
        assert after[key] == before[key], key
    assert after["state"] is before["state"]


def test_load_refuses_another_optimizer_class_before_touching_the_model(good):
    tr = trained(rk.SGD(0.1, momentum=0.9), seed=5)
    before = snapshot(tr)
    with pytest.raises(CheckpointError, match="Adam.*SGD"):
        tr.load(good)
    assert_unchanged(tr, before)


def test_load_refuses_a_parameters_only_checkpoint(tmp_path):
    path = tmp_path / "params.npz"
    tr = trained(seed=2)
    rk.save_checkpoint(path, params={k: p * 2 for k, p in tr.model.params.items()},
                       meta={"epoch": 1})
    before = snapshot(tr)
    with pytest.raises(CheckpointError, match="lacks trainer state.*load_params"):
        tr.load(path)
    assert_unchanged(tr, before)
    # what the message suggests works
    tr.model.load_params(rk.load_checkpoint(path)["params"])
    for k, p in tr.model.params.items():
        np.testing.assert_array_equal(p, before["params"][k] * 2)


@pytest.mark.parametrize("slot", ["m", "v"])
def test_load_refuses_a_missing_optimizer_slot(good, tmp_path, slot):
    name = sorted(trained().model.params)[1]
    path = rewrite(good, tmp_path / "noslot.npz", drop=(f"optim/{name}/{slot}",))
    tr = trained(seed=4)
    before = snapshot(tr)
    with pytest.raises(CheckpointError, match=f"{name}.*lacks slot.*'{slot}'"):
        tr.load(path)
    assert_unchanged(tr, before)
    tr.fit(batches(), epochs=2)       # the trainer is intact and still trains


@pytest.mark.parametrize("damage, message", [
    ("slot shape", "shape"), ("slot dtype", "dtype"), ("extra slot", "unexpected slot"),
    ("unknown parameter", "covers parameters"), ("no optimizer", "no optimizer state"),
    ("param dtype", "dtype"), ("param shape", "shape"), ("param missing", "do not match"),
    ("carried array missing", "carried_state"),
])
def test_load_validates_everything_first(good, tmp_path, damage, message):
    names = sorted(trained().model.params)
    w = names[0]
    with np.load(good) as z:
        shape = z[f"params/{w}"].shape
    drop, extra, record = (), {}, None
    if damage == "slot shape":
        extra = {f"optim/{w}/m": np.zeros((1,) + shape)}
    elif damage == "slot dtype":
        extra = {f"optim/{w}/v": np.zeros(shape, dtype=np.int64)}
    elif damage == "extra slot":
        extra = {f"optim/{w}/momentum_buffer": np.zeros(shape)}
    elif damage == "unknown parameter":
        extra = {"optim/ghost/m": np.zeros(3), "optim/ghost/v": np.zeros(3)}
    elif damage == "no optimizer":
        drop = tuple(f"optim/{n}/{s}" for n in names for s in "mv")
        record = lambda r: {k: v for k, v in r.items() if k != "optimizer"}  # noqa: E731
    elif damage == "param dtype":
        extra = {f"params/{w}": np.zeros(shape, dtype="<U1")}
    elif damage == "param shape":
        extra = {f"params/{w}": np.zeros((2,) + shape)}
    elif damage == "param missing":
        drop = (f"params/{names[-1]}",)
    elif damage == "carried array missing":
        carried = [{"array": "state.0"}]
        record = lambda r: dict(r, meta=dict(r["meta"], carried_state=carried))  # noqa: E731
    path = rewrite(good, tmp_path / "bad.npz", drop=drop, extra=extra, record=record)
    tr = trained(seed=6)
    before = snapshot(tr)
    with pytest.raises(CheckpointError, match=message):
        tr.load(path)
    assert_unchanged(tr, before)


def test_failure_while_applying_rolls_back(good, monkeypatch):
    """A step that fails while applying (a model RNG half set, an optimizer that refuses its
    state) is undone: the model, optimizer and trainer stay as they were."""
    tr = trained(seed=7)
    before = snapshot(tr)
    real_set, sets = tr.model.set_rng_state, []

    def half(state):              # sets the layers' generators, then fails (once)
        real_set(state)
        sets.append(state)
        if len(sets) == 1:
            raise ValueError("incompatible generator")
    monkeypatch.setattr(tr.model, "set_rng_state", half)
    with pytest.raises(CheckpointError, match="model's RNG state.*incompatible generator"):
        tr.load(good)
    monkeypatch.undo()
    assert_unchanged(tr, before)

    real_load = tr.optimizer.load_state_dict
    calls = []

    def flaky(state):             # fails once (the checkpoint), works for the rollback
        calls.append(state)
        real_load(state)
        if len(calls) == 1:
            raise RuntimeError("device lost")
    monkeypatch.setattr(tr.optimizer, "load_state_dict", flaky)
    with pytest.raises(CheckpointError, match="device lost"):
        tr.load(good)
    monkeypatch.undo()
    assert_unchanged(tr, before)


def test_valid_load_still_restores_everything(good):
    tr = trained(seed=8)
    assert tr.load(good) == {"vocab": ["a", "b"]}
    ref = trained()
    for k, p in ref.model.params.items():
        np.testing.assert_array_equal(tr.model.params[k], p)
    assert (tr.epoch, tr.global_step, tr.optimizer.iterations) == (1, 2, 2)
    assert tr.rng.bit_generator.state == ref.rng.bit_generator.state
    assert tr.model.get_rng_state() == ref.model.get_rng_state()


def test_skipped_steps_travel_and_default_to_zero(good, tmp_path):
    tr = trained()
    tr.skipped_steps = 3
    tr.save(tmp_path / "s.npz")
    t2 = trained(seed=1)
    t2.load(tmp_path / "s.npz")
    assert t2.skipped_steps == 3
    older = rewrite(good, tmp_path / "older.npz", record=lambda r: dict(r, meta={
        k: v for k, v in r["meta"].items() if k != "skipped_steps"}))
    t2.load(older)
    assert t2.skipped_steps == 0


# ---------------------------------------------------------------------- stale temporary files
def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def age(path, seconds):
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_save_removes_only_this_checkpoints_abandoned_temp_files(tmp_path):
    path = tmp_path / "ck.npz"
    rk.save_checkpoint(path, params={"w": np.arange(3.0)})
    dead = dead_pid()
    old = ckmod.STALE_TEMP_SECONDS + 5
    stale = [tmp_path / f".ck.npz.tmp-{dead}-abc_123.npz", tmp_path / ".ck.npz.tmp-999999999-x.npz"]
    kept = {
        f".ck.npz.tmp-{os.getpid()}-mine.npz": old,      # this process: a save in progress
        f".ck.npz.tmp-{os.getppid()}-live.npz": old,     # a live writer
        f".ck.npz.tmp-{dead}-fresh.npz": 1,              # just written (another host?)
        f".other.npz.tmp-{dead}-abc.npz": old,           # another checkpoint's
        f".ck.npz.tmp-{dead}-x.npz.tmp-{dead}-y.npz": old,   # checkpoint "ck.npz.tmp-<pid>-x.npz"
        f".ck.npz.tmp-{dead}-abc.npz.part": old,         # not the pattern
        ".tmp-legacy.npz": old,                          # old naming: owner unknown
        "ck.npz.tmp-1-abc.npz": old,                     # not hidden: not ours
    }
    for p in stale:
        p.write_bytes(b"PK\x03\x04partial")
        age(p, old)
    for name, seconds in kept.items():
        (tmp_path / name).write_bytes(b"PK\x03\x04partial")
        age(tmp_path / name, seconds)
    (tmp_path / f".ck.npz.tmp-{dead}-dir.npz").mkdir()   # not a regular file
    link = tmp_path / f".ck.npz.tmp-{dead}-link.npz"            # not a regular file either
    os.symlink(stale[0], link)
    os.utime(link, (time.time() - old,) * 2, follow_symlinks=False)
    assert sorted(ckmod.stale_temp_files(path)) == sorted(map(str, stale))
    rk.save_checkpoint(path, params={"w": np.arange(4.0)})
    left = set(os.listdir(tmp_path))
    assert not any(p.name in left for p in stale)
    assert set(kept) <= left and link.name in left and f".ck.npz.tmp-{dead}-dir.npz" in left
    np.testing.assert_array_equal(rk.load_checkpoint(path)["params"]["w"], np.arange(4.0))


def test_temp_file_name_carries_the_checkpoint_name_and_pid(tmp_path, monkeypatch):
    seen = []
    real = np.savez

    def spy(f, **blobs):
        seen.extend(n for n in os.listdir(tmp_path) if n != "run.npz")
        real(f, **blobs)
    monkeypatch.setattr(np, "savez", spy)
    rk.save_checkpoint(tmp_path / "run.npz", params={"w": np.zeros(2)})
    assert seen and seen[0].startswith(f".run.npz.tmp-{os.getpid()}-") and seen[0].endswith(".npz")
    assert os.listdir(tmp_path) == ["run.npz"]


SAVER = r"""
import importlib.util, sys, numpy as np
spec = importlib.util.spec_from_file_location("ck", sys.argv[1])
ck = importlib.util.module_from_spec(spec); spec.loader.exec_module(ck)
big = np.random.default_rng(0).standard_normal(3_000_000)       # 24 MB a save
print("ready", flush=True)
i = 0
while True:
    i += 1
    ck.save_checkpoint(sys.argv[2], params={"w": big + i}, meta={"i": i})
"""


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL")
def test_kill_9_mid_save_keeps_the_checkpoint_and_the_next_save_cleans_up(tmp_path):
    path = tmp_path / "ck.npz"
    rk.save_checkpoint(path, params={"w": np.zeros(2)}, meta={"i": 0})
    left = []
    for _attempt in range(20):        # until a kill lands mid-write (almost always the first)
        proc = subprocess.Popen([sys.executable, "-c", SAVER, ckmod.__file__, str(path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while not any(n.startswith(".ck.npz.tmp-") for n in os.listdir(tmp_path)):
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        ck = rk.load_checkpoint(path)     # whole, either the first or one of the big ones
        i = ck["meta"]["i"]
        assert ck["params"]["w"].shape == ((2,) if i == 0 else (3_000_000,))
        left = [n for n in os.listdir(tmp_path) if n.startswith(f".ck.npz.tmp-{proc.pid}-")]
        if left:
            break
    assert left, "no kill landed mid-save in 20 tries"
    # just killed: too fresh to be judged abandoned, the next save keeps it ...
    rk.save_checkpoint(path, params={"w": np.ones(2)}, meta={"i": -1})
    assert set(left) <= set(os.listdir(tmp_path))
    # ... and removes it once it has been untouched for STALE_TEMP_SECONDS
    for n in left:
        age(tmp_path / n, ckmod.STALE_TEMP_SECONDS + 1)
    rk.save_checkpoint(path, params={"w": np.full(2, 2.0)}, meta={"i": -2})
    assert os.listdir(tmp_path) == ["ck.npz"]
    assert rk.load_checkpoint(path)["meta"] == {"i": -2}
