"""The training step on the GPU reads nothing back (issue 23): the gate, the device step count,
the GPU form of TrainStep, and the Trainer's reads every ``log_every`` steps.

Without a GPU: the gate and the gated update kernels of ``csrc/cuda/optim.cu`` run in the host
emulator (``cuda_emu``) against the NumPy rule to the bit, every optimizer, with NaN/inf losses
among finite ones; and the GPU form of TrainStep and the Trainer's device loop run on a host
model whose steps are sent down the device path (``*_ON_HOST`` switches), their updates through
the emulated kernels, so what they read and when is checked on the CPU. The stand-in losses are
:class:`Watched` arrays, which count every read on the host.

With a GPU (``-m gpu``, ``benchmarks/gpu_check.sh``): a NaN injected at step k on the device
equals the CPU run that skipped step k, the Trainer's history equals the CPU one, and a step
returns while work queued before it still runs (so nothing in it waited for the device).

Shape legend: B batch, T time steps, V vocabulary, E embedding width, H hidden, N elements.
"""
import math
import time
import typing

import numpy as np
import pytest

import rnnkern as rk
from rnnkern import config, optim, train_step
from rnnkern.backends import cuda
from rnnkern.step_plan.device import DevicePlan

import cuda_emu

needs_gxx = pytest.mark.skipif(cuda_emu.compiler() is None, reason="g++ not found: cannot "
                               "build the host emulation of the CUDA kernels")

OPTIMIZERS = {
    "sgd": lambda: rk.SGD(0.1),
    "sgd-momentum-wd": lambda: rk.SGD(0.1, momentum=0.9, weight_decay=0.01),
    "sgd-nesterov": lambda: rk.SGD(0.05, momentum=0.8, nesterov=True),
    "adam-tf": lambda: rk.Adam(0.01),
    "adam-torch-wd": lambda: rk.Adam(0.01, eps=1e-6, eps_mode="torch", weight_decay=0.1),
    "rmsprop-centered-momentum": lambda: rk.RMSprop(0.01, momentum=0.9, centered=True),
    "rmsprop": lambda: rk.RMSprop(0.01),
    "adagrad": lambda: rk.Adagrad(0.1, initial_accumulator_value=0.1),
}
LAYOUT = (("w", (5, 7)), ("b", (7,)), ("v", (3, 2, 11)))    # N = 108 > 3 blocks x 32 threads
N = 108
KERNELS = {rk.SGD: "rk_sgd_update", rk.Adam: "rk_adam_update", rk.RMSprop: "rk_rmsprop_update",
           rk.Adagrad: "rk_adagrad_update"}
# NaN first (nothing made yet: SGD's buffer, Adam's t = 0), then finite and non-finite mixed
LOSSES = [math.nan, 0.5, math.inf, 0.25, -math.inf, math.nan, 0.75]


@pytest.fixture(scope="module")
def emu_runtime(tmp_path_factory):
    return cuda_emu.EmuRuntime(n_sm=3, outdir=str(tmp_path_factory.mktemp("cuda_emu_step")))


@pytest.fixture
def fused(emu_runtime, monkeypatch):
    """Optimizers step host arrays through their fused kernels (the device path), emulated on
    host threads: 32 threads a block, at most one block per 'SM' (3)."""
    if cuda_emu.compiler() is None:
        pytest.skip("g++ not found: cannot build the host emulation of the CUDA kernels")
    monkeypatch.setattr(cuda.runtime, "_runtime", emu_runtime)
    monkeypatch.setattr(config, "CUDA_THREADS", 32)
    monkeypatch.setattr(config, "CUDA_ELEMENTWISE_BLOCKS_PER_SM", 1)
    monkeypatch.setattr(optim, "_FUSED_ON_HOST", True)
    return emu_runtime


@pytest.fixture
def device_form(fused, monkeypatch):
    """TrainStep takes host batches down its GPU form too (the update emulated)."""
    monkeypatch.setattr(train_step, "_DEVICE_FORM_ON_HOST", True)
    return fused


def on_the_host(call, *args, **kwargs):
    """``call`` with the host paths (NumPy rules, host TrainStep) while a test runs the others
    through the device paths."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(optim, "_FUSED_ON_HOST", False)
        m.setattr(train_step, "_DEVICE_FORM_ON_HOST", False)
        return call(*args, **kwargs)


def assert_same_optimizer(got, want):
    """The two optimizers' records equal to the bit. A device step lays out its state before the
    gate, so after only skipped steps it holds the initial state where the host has none yet."""
    a, b = got.state_dict(), want.state_dict()
    assert a["iterations"] == b["iterations"] == got.iterations == want.iterations
    a, b = ({k: st for k, st in sd["state"].items() if st} for sd in (a, b))
    for k, st in a.items():
        if k not in b:
            b[k] = want._init_state(next(iter(st.values())))
    assert a.keys() == b.keys()
    for k in b:
        assert a[k].keys() == b[k].keys(), k
        for s in b[k]:
            np.testing.assert_array_equal(a[k][s], b[k][s], err_msg=f"{k} {s}")


# ====================================================================== the gated kernels
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_gated_update_skips_nonfinite_losses_to_the_bit(fused, make, dtype):
    """Steps whose loss is finite equal the NumPy rule to the bit; a NaN/inf step (its gradient
    NaN too, as a real one's) leaves the parameters, every state slot and the step count as they
    were; the gate and one update launch every step; the tally counts both kinds."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(N).astype(dtype)
    ref, opt = make(), make()
    p_ref, p = p0.copy(), p0.copy()
    tally = np.zeros(4)
    for i, loss in enumerate(LOSSES):
        g = (rng.standard_normal(N) * 3).astype(dtype)
        if not math.isfinite(loss):
            g[::5] = np.nan
        else:
            on_the_host(ref.step_flat, p_ref, g.copy(), LAYOUT)
        before, kept = len(fused.launches), p.copy()
        opt.step_flat(p, g, LAYOUT, loss=np.asarray(loss), tally=tally)
        assert [n for n, *_ in fused.launches[before:]] == ["rk_step_gate", KERNELS[type(opt)]]
        np.testing.assert_array_equal(p, p_ref, err_msg=f"step {i}")
        if not math.isfinite(loss):
            np.testing.assert_array_equal(p, kept)
        assert opt._clock is not None                # the count lives on the device
        assert_same_optimizer(opt, ref)
    finite = [v for v in LOSSES if math.isfinite(v)]
    assert tally[0] == sum(finite) and tally[1:3].tolist() == [len(finite), 4]
    assert tally[3] == 0.75 and ref.iterations == 3
    assert not np.array_equal(p, p0)


@pytest.mark.parametrize("make", [lambda **k: rk.SGD(0.1, momentum=0.9, **k),
                                  lambda **k: rk.Adam(0.05, **k)], ids=["sgd", "adam"])
def test_gated_clipping_turns_no_nan_into_an_update(fused, make):
    """Clipping by value and by global norm before the gate: a NaN step's clipped gradient
    updates nothing, and last_grad_norm stays that of the last finite step."""
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(N)
    ref, opt = make(clip_norm=1.0, clip_value=2.0), make(clip_norm=1.0, clip_value=2.0)
    p_ref, p = p0.copy(), p0.copy()
    for loss in (1.0, math.nan, 2.0, math.inf):
        g = rng.standard_normal(N) * 5
        if math.isfinite(loss):
            on_the_host(ref.step_flat, p_ref, g.copy(), LAYOUT)
        else:
            g[3] = np.nan if math.isnan(loss) else np.inf
        opt.step_flat(p, g, LAYOUT, loss=np.asarray(loss))
        np.testing.assert_array_equal(p, p_ref)
        assert opt.last_grad_norm == ref.last_grad_norm > 1.0
    assert_same_optimizer(opt, ref)


def test_gated_step_of_parameter_dicts(fused):
    """Optimizer.step(params, grads, loss=...): the concatenated update (one dtype) and the
    per-name one (two dtypes: a launch each after one gate) skip a NaN step alike."""
    rng = np.random.default_rng(3)
    for dtypes in ((np.float64, np.float64), (np.float64, np.float32)):
        ref_p = {"w": rng.standard_normal((4, 3)).astype(dtypes[0]),
                 "b": rng.standard_normal(3).astype(dtypes[1])}
        got_p = {k: v.copy() for k, v in ref_p.items()}
        ref, opt = rk.SGD(0.1, momentum=0.5), rk.SGD(0.1, momentum=0.5)
        for loss in (math.nan, 1.0, math.nan, 2.0):
            g = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in ref_p.items()}
            if math.isfinite(loss):
                on_the_host(ref.step, ref_p, {k: v.copy() for k, v in g.items()})
            before = len(fused.launches)
            opt.step(got_p, g, loss=np.asarray(loss))
            assert len(fused.launches) - before == (2 if dtypes[0] == dtypes[1] else 3)
            for k in ref_p:
                np.testing.assert_array_equal(got_p[k], ref_p[k], err_msg=f"{dtypes} {k}")
        assert_same_optimizer(opt, ref)


def test_adam_bias_table_grows_and_stops_where_it_saturates(fused, monkeypatch):
    """The table of (1-b1^t, sqrt(1-b2^t)) doubles as t grows and ends where both are 1.0
    exactly; every t equals the host's bias correction, before and after that end, and after
    the count is set on the host (written to the device at the next step)."""
    monkeypatch.setattr(rk.Adam, "BIAS_TABLE_MIN_ROWS", 2)
    rng = np.random.default_rng(4)
    ref, opt = rk.Adam(0.01, beta1=0.3, beta2=0.5), rk.Adam(0.01, beta1=0.3, beta2=0.5)
    p_ref = rng.standard_normal(N)
    p = p_ref.copy()
    sizes = []
    for t in range(1, 61):
        g = rng.standard_normal(N)
        on_the_host(ref.step_flat, p_ref, g.copy(), LAYOUT)
        opt.step_flat(p, g, LAYOUT, loss=np.asarray(1.0))
        sizes.append(len(opt._bias["rows"]))
        np.testing.assert_array_equal(p, p_ref, err_msg=f"t={t}")
    # from t = 54 on, 1 - 0.5^t rounds to 1.0 (1 - 2^-54: a tie, to even), and 1 - 0.3^t
    # long before: the table stops at its first row of (1.0, 1.0)
    assert sizes[:5] == [2, 2, 4, 4, 8] and sizes[-1] == 54 and opt._bias["full"]
    assert opt._bias["rows"][-1] == (1.0, 1.0) != opt._bias["rows"][-2]
    ref.iterations = opt.iterations = 1000
    for _ in range(2):
        g = rng.standard_normal(N)
        on_the_host(ref.step_flat, p_ref, g.copy(), LAYOUT)
        opt.step_flat(p, g, LAYOUT, loss=np.asarray(1.0))
        np.testing.assert_array_equal(p, p_ref)
    assert opt.iterations == 1002 and len(opt._bias["rows"]) == 54


def test_step_count_and_state_dict_through_the_device(fused, monkeypatch):
    """iterations and state_dict read the device count (skipped steps not counted);
    load_state_dict goes on exactly, SGD's momentum buffer included (not 'first' again); moving
    the state to another device brings the count home as a plain attribute."""
    rng = np.random.default_rng(5)
    ref, opt = rk.SGD(0.1, momentum=0.9), rk.SGD(0.1, momentum=0.9)
    p_ref = rng.standard_normal(N)
    p = p_ref.copy()
    for loss in (1.0, math.nan, 1.0):
        g = rng.standard_normal(N)
        if math.isfinite(loss):
            on_the_host(ref.step_flat, p_ref, g.copy(), LAYOUT)
        opt.step_flat(p, g, LAYOUT, loss=np.asarray(loss))
    sd = opt.state_dict()
    assert sd["iterations"] == 2 == opt.iterations and opt._iterations == 0
    again = rk.SGD(0.1, momentum=0.9)
    again.step_flat(p.copy(), np.zeros(N), LAYOUT, loss=np.asarray(math.nan))   # a clock, no step
    again.load_state_dict(sd)
    assert again.iterations == 2
    q = p.copy()
    for _ in range(2):
        g = rng.standard_normal(N)
        on_the_host(ref.step_flat, p_ref, g.copy(), LAYOUT)
        again.step_flat(q, g, LAYOUT, loss=np.asarray(1.0))
        np.testing.assert_array_equal(q, p_ref)
    assert_same_optimizer(again, ref)
    monkeypatch.setattr(optim, "to_device", lambda a, d: a)
    again._follow("cuda")
    assert again._iterations == 4 and again._clock is None


def test_gate_arguments_are_checked(fused):
    opt = rk.Adam(0.1)
    with pytest.raises(ValueError, match=r"tally must be a C-contiguous float64 array of shape "
                                         r"\(4,\)"):
        opt.step_flat(np.zeros(N), np.zeros(N), LAYOUT, loss=np.asarray(1.0),
                      tally=np.zeros(3))
    with pytest.raises(ValueError, match=r"loss must be a scalar, got shape \(2,\)"):
        opt.step_flat(np.zeros(N), np.zeros(N), LAYOUT, loss=np.zeros(2))


def test_a_host_step_given_its_loss_skips_it_too():
    """On the host (no fused kernels) a loss given to step/step_flat gates the update the same
    way, in Python."""
    p = {"w": np.ones(3)}
    opt, tally = rk.Adam(0.1), np.zeros(4)
    opt.step(p, {"w": np.ones(3)}, loss=math.nan, tally=tally)
    assert opt.iterations == 0 and p["w"].tolist() == [1.0] * 3
    opt.step(p, {"w": np.ones(3)}, loss=2.0, tally=tally)
    assert opt.iterations == 1 and tally.tolist() == [2.0, 1.0, 1.0, 2.0]


# ====================================================================== TrainStep's GPU form
class Watched(np.ndarray):
    """A 0-d loss that counts every read on the host (float, bool, int, item) in ``reads``."""

    reads: typing.ClassVar[list] = []

    def _read(self):
        Watched.reads.append(1)
        return self.view(np.ndarray)[()]

    def __float__(self):
        return float(self._read())

    def __bool__(self):
        return bool(self._read())

    def __int__(self):
        return int(self._read())

    def __index__(self):
        return int(self._read())

    def item(self, *args):
        return self._read().item()


def watched(a):
    return np.asarray(a, np.float64).view(Watched)


def lm(V=7, E=5, H=6, seed=0):
    return rk.Sequential([rk.Embedding(V, E, seed=seed, dtype="float64"),
                          rk.LSTM(E, H, seed=seed + 1, dtype="float64", backend="numpy"),
                          rk.Dense(H, V, seed=seed + 2, dtype="float64")])


def batches(n, B=3, T=4, V=7, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))) for _ in range(n)]


class InjectNaN:
    """sequence_loss, whose value is NaN at the calls numbered in ``at`` (0-based, counting
    training calls only: with return_grad); values as :class:`Watched` arrays when ``watch``."""

    __name__ = "sequence_loss_with_nan"

    def __init__(self, at=(), watch=False):
        self.at, self.watch, self.calls = set(at), watch, 0

    def __call__(self, pred, y, weights=None, return_grad=False):
        out = rk.sequence_loss(pred, y, weights, return_grad=return_grad)
        value = out[0] if return_grad else out
        if return_grad:
            if self.calls in self.at:
                value = math.nan
            self.calls += 1
        if self.watch:
            value = watched(value)
        return (value, out[1]) if return_grad else value


def test_device_step_returns_the_loss_unread_and_updates_the_flat_buffer(device_form):
    """The GPU form: the loss comes back as the 0-d array the loss made (never read), the
    parameters are views of one flat buffer updated by ONE fused launch after the gate, and
    the result equals the host's generic loop to the bit."""
    Watched.reads.clear()
    dev, host = lm(), lm()
    loss = InjectNaN(watch=True)
    step = rk.TrainStep(dev, loss, rk.Adam(0.05, clip_norm=0.5))
    ref = rk.TrainStep(host, rk.sequence_loss, rk.Adam(0.05, clip_norm=0.5), generic=True)
    for x, y in batches(3):
        before = len(device_form.launches)
        value = step(x, y)
        assert [n for n, *_ in device_form.launches[before:]] == ["rk_step_gate",
                                                                  "rk_adam_update"]
        want = on_the_host(ref, x, y)
        assert type(value) is Watched and value.shape == ()
        assert value.view(np.ndarray)[()] == want
    assert Watched.reads == []
    assert isinstance(step.plan, DevicePlan) and step.generic_reason is None
    words = str(step.plan)
    assert "one flat float64 buffer" in words and "Adam's fused kernel" in words
    assert "no host read" in words and "TrainStep(step plan on the device" in repr(step)
    flat = step.plan.flat
    for v in dev.params.values():
        assert np.shares_memory(v, flat.params)
    for k, v in host.params.items():
        np.testing.assert_array_equal(dev.params[k], v, err_msg=k)
    assert_same_optimizer(step.optimizer, ref.optimizer)
    tally = step.read()
    assert (tally.steps, tally.nonfinite, tally.new_steps) == (3, 0, 3)
    assert step.read().new_steps == 0


def test_device_step_generic_updates_the_dicts(device_form):
    """generic=True on the device: the dicts' update (concatenated), gated all the same."""
    model = lm()
    step = rk.TrainStep(model, InjectNaN(at=[1]), rk.SGD(0.1, momentum=0.9), generic=True,
                        on_nonfinite="skip")
    ref = rk.TrainStep(lm(), InjectNaN(at=[1]), rk.SGD(0.1, momentum=0.9), generic=True,
                       on_nonfinite="skip")
    for x, y in batches(3):
        step(x, y)
        on_the_host(ref, x, y)
    assert step.plan is None and "generic=True" in step.generic_reason
    for k, v in ref.model.params.items():
        np.testing.assert_array_equal(model.params[k], v)
    assert step.skipped == 0 and step.read().new_nonfinite == 1 and step.skipped == 1 == \
        ref.skipped


@pytest.mark.parametrize("k", [0, 2])
def test_nan_at_step_k_on_the_device_equals_the_host_skipping_it(device_form, k):
    """A NaN loss at step k: the device step runs its backward and launches the update, the
    gate stops it; parameters, optimizer state and step count equal the host run that skipped
    step k, bit for bit. on_nonfinite acts at the read: 'skip' counts, 'raise' raises."""
    data = batches(4)
    runs = {}
    for mode in ("skip", "raise"):
        step = rk.TrainStep(lm(), InjectNaN(at=[k]), rk.Adam(0.05), on_nonfinite=mode)
        for x, y in data:
            step(x, y)                             # never raises: nothing is read
        runs[mode] = step
    ref = rk.TrainStep(lm(), InjectNaN(at=[k]), rk.Adam(0.05), on_nonfinite="skip")
    for x, y in data:
        on_the_host(ref, x, y)
    assert ref.skipped == 1 and ref.optimizer.iterations == 3
    for step in runs.values():
        for name, v in ref.model.params.items():
            np.testing.assert_array_equal(step.model.params[name], v, err_msg=name)
        assert_same_optimizer(step.optimizer, ref.optimizer)
    tally = runs["skip"].read()
    assert (tally.steps, tally.nonfinite, runs["skip"].skipped) == (3, 1, 1)
    with pytest.raises(rk.NonFiniteLossError, match=r"1 step\(s\) since the previous read had "
                                                    r"a NaN or infinite loss.*last finite step"):
        runs["raise"].read()
    assert runs["raise"].skipped == 0


def test_device_step_with_another_optimizer_reads_every_step(device_form):
    """An optimizer without the device gate: the step reads its loss (a float), as before."""
    class Plain:
        def __init__(self):
            self.inner = rk.SGD(0.1)

        def step(self, params, grads):
            on_the_host(self.inner.step, params, grads)

    step = rk.TrainStep(lm(), rk.sequence_loss, Plain())
    x, y = batches(1)[0]
    assert isinstance(step(x, y), float) and step.tally is None


# ====================================================================== the Trainer's reads
def fit_pair(epochs=2, n=7, at=(), mode="skip", val=False, callbacks=(), **kwargs):
    """The same Trainer on the device form and on the host (generic loop, the same operations);
    returns (device trainer, host trainer, reads of the device tally); the device run's reads
    of its Watched losses are left in ``Watched.reads``. ``callbacks``: a list, or a function
    giving each side its own."""
    reads = []
    Watched.reads.clear()
    real = train_step.to_host

    def counting(a):
        reads.append(1)
        return real(a)

    data = batches(n)
    out = []
    for side in ("device", "host"):
        tr = rk.Trainer(lm(), InjectNaN(at, watch=True), rk.Adam(0.05, clip_norm=1.0),
                        progress=False, on_nonfinite=mode, generic=side == "host",
                        callbacks=callbacks() if callable(callbacks) else callbacks, **kwargs)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(train_step, "to_host", counting)
            try:
                if side == "device":
                    tr.fit(data, epochs, val_data=data[:2] if val else None)
                else:
                    loss_reads = list(Watched.reads)
                    on_the_host(tr.fit, data, epochs, val_data=data[:2] if val else None)
            except rk.NonFiniteLossError as e:
                tr.error = e
        out.append(tr)
    Watched.reads[:] = loss_reads
    return out[0], out[1], len(reads)


def test_trainer_reads_the_device_loss_every_n_steps(device_form):
    """log_every=3 over 7 batches: reads after steps 3, 6 and 7 of each epoch, nothing else
    read (the losses are Watched); callbacks at each read; the history, counters and
    parameters equal the host trainer's, bit for bit."""
    seen = []
    cb = rk.LambdaCallback(on_step_end=lambda t: seen.append(
        (t.epoch, t.step_in_epoch, t.global_step, t.last_loss)))
    dev, host, reads = fit_pair(log_every=3, callbacks=[cb])
    assert Watched.reads == [] and reads == 6
    dev_seen, host_seen = seen[:6], seen[6:]
    assert [s[:3] for s in dev_seen] == [(0, 3, 3), (0, 6, 6), (0, 7, 7),
                                         (1, 3, 10), (1, 6, 13), (1, 7, 14)]
    host_at = {(e, s): (g, loss) for e, s, g, loss in host_seen}
    for e, s, g, loss in dev_seen:
        assert (g, loss) == host_at[(e, s)]
    assert dev.history == host.history and len(dev.history["loss"]) == 2
    assert (dev.global_step, dev.skipped_steps) == (host.global_step, host.skipped_steps) == \
        (14, 0)
    for k, v in host.model.params.items():
        np.testing.assert_array_equal(dev.model.params[k], v, err_msg=k)
    assert_same_optimizer(dev.optimizer, host.optimizer)


def test_trainer_default_log_every_and_validation_read_once(device_form):
    """log_every=None reads every 50 steps on the device (here: at each epoch's end); an
    evaluate sums its batches' losses where they are and reads once."""
    dev, host, reads = fit_pair(epochs=2, n=3, val=True)
    assert reads == 2 and len(Watched.reads) == 2          # one read per evaluate
    assert dev.history == host.history and dev.history["val_loss"][0] is not None


def test_trainer_skip_on_the_device_counts_at_reads(device_form):
    """on_nonfinite='skip': skipped steps counted from the device at the reads; the epoch mean
    leaves them out as on the host; TerminateOnNaN stops at the first read covering one."""
    dev, host, _ = fit_pair(at=[1, 9], log_every=4)
    assert dev.history == host.history
    assert (dev.global_step, dev.skipped_steps) == (host.global_step, host.skipped_steps) == \
        (12, 2)
    assert dev._step.skipped == 2
    dev, host, reads = fit_pair(at=[1], log_every=4, callbacks=lambda: [rk.TerminateOnNaN()])
    assert (dev.callbacks[0].stopped_at, host.callbacks[0].stopped_at) == (3, 1)
    assert dev.stop_training and reads == 1 and dev.history["loss"] == []
    assert (dev.global_step, dev.skipped_steps, dev.read_skipped) == (3, 1, 1)


def test_trainer_raise_on_the_device_raises_at_the_read(device_form):
    """on_nonfinite='raise': the read after the NaN step raises; the steps up to it ran (the
    NaN one skipped by the gate), so the parameters equal a host run that skipped that step."""
    dev, host, reads = fit_pair(epochs=1, at=[4], mode="raise", log_every=3)
    assert isinstance(dev.error, rk.NonFiniteLossError) and reads == 2
    assert "training went on until this read" in str(dev.error)
    assert (dev.global_step, dev.step_in_epoch, dev.skipped_steps) == (5, 6, 0)
    ref = rk.TrainStep(lm(), InjectNaN(at=[4]), rk.Adam(0.05, clip_norm=1.0),
                       on_nonfinite="skip")
    for x, y in batches(6):
        on_the_host(ref, x, y)
    for k, v in ref.model.params.items():
        np.testing.assert_array_equal(dev.model.params[k], v, err_msg=k)
    assert isinstance(host.error, rk.NonFiniteLossError) and host.global_step == 4


def test_trainer_checkpoints_after_the_same_steps_and_resumes(device_form, tmp_path):
    """checkpoint_every=2 with a NaN at the 3rd step and log_every=5: the device trainer reads
    where a checkpoint could fall, so it writes after the same steps as the host; its last
    checkpoint (mid-epoch) resumes on the device form and on the host alike."""
    saved = []
    orig = rk.Trainer.save

    def recording(self, path, user=None):
        saved.append(("host" if self._step.generic else "device", self.epoch,
                      self.step_in_epoch, self.global_step))
        return orig(self, path, user)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(rk.Trainer, "save", recording)
        fit_pair(epochs=1, n=7, at=[2], log_every=5, checkpoint=str(tmp_path / "ck.npz"),
                 checkpoint_every=2)
    assert [s[1:] for s in saved if s[0] == "device"] == \
        [s[1:] for s in saved if s[0] == "host"] == [(0, 2, 2), (0, 5, 4), (0, 7, 6)]
    # a device run's checkpoint after its 5th step, resumed on either side
    first = rk.Trainer(lm(), rk.sequence_loss, rk.Adam(0.05, clip_norm=1.0), progress=False,
                       checkpoint=str(tmp_path / "dev.npz"), checkpoint_every=5)
    first.fit(batches(7), 1)
    resumed = {}
    for side in ("device", "host"):
        tr = rk.Trainer(lm(seed=3), rk.sequence_loss, rk.Adam(0.05, clip_norm=1.0),
                        progress=False, generic=side == "host", log_every=2)
        tr.load(str(tmp_path / "dev.npz"))
        assert (tr.epoch, tr.step_in_epoch, tr.global_step) == (0, 5, 5)
        if side == "device":
            tr.fit(batches(7), 2)
        else:
            on_the_host(tr.fit, batches(7), 2)
        resumed[side] = tr
    assert resumed["device"].history == resumed["host"].history
    for k, v in resumed["host"].model.params.items():
        np.testing.assert_array_equal(resumed["device"].model.params[k], v, err_msg=k)
    assert_same_optimizer(resumed["device"].optimizer, resumed["host"].optimizer)


def test_save_and_fit_read_pending_device_steps_first(device_form, tmp_path):
    tr = rk.Trainer(lm(), rk.sequence_loss, rk.SGD(0.1), progress=False)
    for batch in batches(2):
        assert not isinstance(tr.train_step(batch), float)
    assert tr.global_step == 0 and tr._pending == 2
    tr.save(str(tmp_path / "c.npz"))
    assert tr.global_step == 2 and tr._pending == 0
    assert rk.load_checkpoint(tmp_path / "c.npz")["meta"]["global_step"] == 2
    tr.train_step(batches(1)[0])
    tr.fit(batches(2), 1)                       # counts the step made before it first
    assert (tr.global_step, tr._pending, tr._loss_count) == (5, 0, 2)


def test_host_trainer_reads_every_step_whatever_log_every():
    """On the host nothing changes: each step's loss is a float, used at once."""
    seen = []
    tr = rk.Trainer(lm(), rk.sequence_loss, rk.SGD(0.1), progress=False, log_every=5,
                    callbacks=[rk.LambdaCallback(on_step_end=lambda t: seen.append(
                        type(t.last_loss)))])
    tr.fit(batches(3), 1)
    assert seen == [float] * 3 and tr._step.tally is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
def test_log_every_is_checked(bad):
    with pytest.raises(ValueError, match=r"log_every must be None or an int >= 1, got"):
        rk.Trainer(lm(), rk.sequence_loss, rk.SGD(0.1), log_every=bad)


# ====================================================================== on a GPU
def _gpu():
    ok, reason = cuda.available()
    if not ok:
        pytest.skip(f"cuda backend unavailable: {reason}")
    import cupy
    return cupy


def gpu_lm(seed=0):
    return rk.Sequential([rk.Embedding(7, 5, seed=seed, dtype="float64"),
                          rk.LSTM(5, 6, seed=seed + 1, dtype="float64"),
                          rk.Dense(6, 7, seed=seed + 2, dtype="float64")])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("make", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_gpu_gated_update_skips_nonfinite_losses_to_the_bit(make, dtype):
    """On the device: the gate and the gated kernels against the NumPy rule that skips the
    non-finite steps, to the bit, every slot and the count."""
    cupy = _gpu()
    rng = np.random.default_rng(0)
    host = {k: rng.standard_normal(s).astype(dtype) for k, s in LAYOUT}
    dev = {k: cupy.asarray(v) for k, v in host.items()}
    ref, opt = make(), make()
    for loss in LOSSES:
        g = {k: (rng.standard_normal(s) * 3).astype(dtype) for k, s in LAYOUT}
        if math.isfinite(loss):
            ref.step(host, {k: v.copy() for k, v in g.items()})
        opt.step(dev, {k: cupy.asarray(v) for k, v in g.items()}, loss=cupy.asarray(loss))
    for k, want in host.items():
        np.testing.assert_array_equal(cupy.asnumpy(dev[k]), want, err_msg=k)
        for s in ref.state[k]:
            np.testing.assert_array_equal(cupy.asnumpy(opt.state[k][s]), ref.state[k][s])
    assert opt.iterations == ref.iterations == 3


@pytest.mark.gpu
@pytest.mark.parametrize("k", [0, 2])
def test_gpu_nan_at_step_k_equals_the_cpu_run_that_skipped_it(k):
    """Embedding -> LSTM -> Dense, Adam with clipping, float64: a NaN loss injected at step k
    on the device; the parameters, optimizer state and step count equal the CPU run that
    skipped step k (rtol 1e-10), and the read counts the skipped step."""
    cupy = _gpu()
    data = batches(4)
    ref = rk.TrainStep(gpu_lm(), InjectNaN(at=[k]), rk.Adam(0.05, clip_norm=0.5),
                       on_nonfinite="skip")
    step = rk.TrainStep(gpu_lm().to("cuda"), InjectNaN(at=[k]), rk.Adam(0.05, clip_norm=0.5),
                        on_nonfinite="skip")
    for x, y in data:
        ref(x, y)
        value = step(cupy.asarray(x), cupy.asarray(y))
        assert isinstance(value, cupy.ndarray) and value.shape == ()
    assert isinstance(step.plan, DevicePlan)
    flat = step.plan.flat.params
    lo, hi = flat.data.ptr, flat.data.ptr + flat.nbytes
    assert all(lo <= v.data.ptr < hi for v in step.model.params.values())
    tally = step.read()
    assert (tally.steps, tally.nonfinite, step.skipped) == (3, 1, 1) == \
        (ref.optimizer.iterations, 1, ref.skipped)
    assert step.optimizer.iterations == 3
    for name, v in ref.model.params.items():
        np.testing.assert_allclose(cupy.asnumpy(step.model.params[name]), v, rtol=1e-10,
                                   atol=1e-12, err_msg=name)
    for name, st in ref.optimizer.state.items():
        for s, a in st.items():
            np.testing.assert_allclose(cupy.asnumpy(step.optimizer.state[name][s]), a,
                                       rtol=1e-9, atol=1e-13, err_msg=f"{name} {s}")


@pytest.mark.gpu
def test_gpu_trainer_history_equals_the_cpu_one():
    """The Trainer on the device (log_every=3, a NaN step skipped, validation) gives the CPU
    trainer's history, counters and parameters (rtol 1e-10)."""
    cupy = _gpu()
    data = batches(7)
    runs = {}
    for name in ("cpu", "cuda"):
        tr = rk.Trainer(gpu_lm().to(name), InjectNaN(at=[4]), rk.Adam(0.05, clip_norm=1.0),
                        progress=False, on_nonfinite="skip", log_every=3, stateful=True)
        tr.fit(data, 2, val_data=data[:2])
        runs[name] = tr
    cpu, gpu = runs["cpu"], runs["cuda"]
    assert (gpu.global_step, gpu.skipped_steps) == (cpu.global_step, cpu.skipped_steps) == (13, 1)
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(gpu.history[key], cpu.history[key], rtol=1e-10)
    assert gpu.history["lr"] == cpu.history["lr"]
    for k, v in cpu.model.params.items():
        np.testing.assert_allclose(cupy.asnumpy(gpu.model.params[k]), v, rtol=1e-10,
                                   atol=1e-12, err_msg=k)


@pytest.mark.gpu
def test_gpu_step_never_waits_for_the_device(monkeypatch):
    """Nothing in a device step copies to the host: with a kernel that spins about a second
    queued ahead of them on the stream, TrainStep calls and Trainer.train_step calls (device
    batches) return long before it ends; any read inside them would have waited for it. (The
    persistent strategy's barrier check, a read after each of its launches, is turned off
    here.)"""
    cupy = _gpu()
    monkeypatch.setattr(config, "CUDA_CHECK_BARRIER", False)
    spin = cupy.RawKernel(r'''
        extern "C" __global__ void spin(long long cycles) {
            const long long t0 = clock64();
            while (clock64() - t0 < cycles) { }
        }''', "spin")
    try:                                   # cudaDevAttrClockRate (kHz)
        khz = cupy.cuda.runtime.deviceGetAttribute(13, cupy.cuda.Device().id)
    except Exception:  # noqa: BLE001 - an SM clock of about 2 GHz
        khz = 2_000_000
    cycles = np.int64(khz * 1000)          # about a second at that clock
    spin((1,), (1,), (np.int64(0),))       # compiled here, not in the timed part
    data = [tuple(cupy.asarray(a) for a in b) for b in batches(8)]
    step = rk.TrainStep(gpu_lm().to("cuda"), rk.sequence_loss, rk.Adam(0.05, clip_norm=0.5))
    trainer = rk.Trainer(gpu_lm().to("cuda"), rk.sequence_loss, rk.SGD(0.1, momentum=0.9),
                         progress=False)
    for x, y in data[:3]:                  # compile, plan, tally, memory pool: made here
        step(x, y)
        trainer.train_step((x, y))
    cupy.cuda.get_current_stream().synchronize()
    for run in (lambda x, y: step(x, y), lambda x, y: trainer.train_step((x, y))):
        t0 = time.perf_counter()
        spin((1,), (1,), (cycles,))
        for x, y in data[3:]:
            run(x, y)
        host = time.perf_counter() - t0
        cupy.cuda.get_current_stream().synchronize()
        total = time.perf_counter() - t0
        assert total > 0.3, f"the spin kernel ended early ({total:.3f} s)"
        assert host < 0.5 * total, (f"5 steps took {host:.3f} s on the host behind a "
                                    f"{total:.3f} s kernel: something waited for the device")
    assert step.optimizer.iterations == 8 and trainer._pending == 8
