"""The one-call training step on the C++ backend: ``rnnkern.TrainStep`` running its
:class:`rnnkern.step_plan.cpp.CppPlan`, which drives ``rnnkern._C.StackStepF32/F64``
(csrc/bindings/stack.cpp, csrc/cpu/stack.h, head.h, adam.h), against the generic loop
(``TrainStep(..., generic=True)``: model.forward, sequence_loss, model.backward, optimizer.step)
on identical models.

Covered: every cell (LSTM forget_bias 0/1, GRU reset_after True/False, RNN tanh/relu) in stacks
of 1-3 cells over 1-2 layer objects, mixed cells; every input mode of the first layer (OneHot or
Embedding read from a table by ids when V <= B*T, their rows gathered as floats when V > B*T,
float input); lengths (incl. 0 and T), position weights (incl. all zero), initial states,
return_state; dropout between cells and before the head; threads, LSTM ring rows, the forward's
cut and huge pages (no result may depend on them); Adam inside the call (the NumPy rule's
bits); the head's math (finite for large logits, finite differences); bad input (refused with
the generic loop's errors, nothing changed) and the binding's own checks.

float64 to rtol 1e-10, float32 to rtol 1e-4 / atol 1e-5 (tests/conftest.py's TOLERANCE).
Shape legend: B batch, T time steps, V vocabulary, E embedding width, H hidden size, C classes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace

import numpy as np
import pytest

import rnnkern as rk
from rnnkern import config
from rnnkern.cellspec import CellSpec
from conftest import numeric_grad

_OK, _WHY = rk.available_backends()["cpp"]
if not _OK:
    pytest.skip(f"backend 'cpp' unavailable: {_WHY}", allow_module_level=True)

from rnnkern.backends.cpp import _C, native_spec  # noqa: E402  (after the skip)
from rnnkern.step_plan.cpp import CppPlan  # noqa: E402

TOL = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=1e-4, atol=1e-5)}
DTYPES = ["float64", "float32"]

CELLS = {  # name -> (layer class, cell options)
    "lstm": (rk.LSTM, {"forget_bias": 1.0}),
    "lstm-fb0": (rk.LSTM, {"forget_bias": 0.0}),
    "gru": (rk.GRU, {"reset_after": True}),
    "gru-rb": (rk.GRU, {"reset_after": False}),
    "rnn-tanh": (rk.RNN, {"nonlinearity": "tanh"}),
    "rnn-relu": (rk.RNN, {"nonlinearity": "relu"}),
}

# input modes: (encoder, V) at the default batch B=3, T=4 (N = 12 ids), and how the plan
# names its input stage
INPUTS = {
    "onehot-table": ("onehot", 6),        # V <= N: W_ih read transposed by ids
    "onehot-rows": ("onehot", 13),        # V > N: one-hot rows gathered as floats
    "embedding-table": ("embedding", 6),  # V <= N: the table E W_ih^T
    "embedding-rows": ("embedding", 13),  # V > N: rows gathered, dE scattered
    "floats": ("floats", 5),              # x [B,T,5]
}
INPUT_WORDS = {
    "onehot-table": "OneHot ids -> columns of W_ih [",
    "onehot-rows": "OneHot ids -> table rows gathered (NumPy), floats into the call",
    "embedding-table": "Embedding ids -> rows of E W_ih^T [",
    "embedding-rows": "Embedding ids -> table rows gathered (NumPy), floats into the call; "
                      "their gradient scattered into dE",
    "floats": "floats [B,T,I], copied in",
}


def input_net(inp, B, T, **kw):
    """A Net of input mode ``inp`` for batches [B,T] (V chosen on the mode's side of B*T)."""
    enc, _ = INPUTS[inp]
    V = min(6, B * T) if inp.endswith("table") else B * T + 1 if inp.endswith("rows") else 5
    return Net(enc=enc, V=V, **kw)


# ------------------------------------------------------------------------------ model pairs
@dataclass(frozen=True)
class Net:
    """A model of the plan's form: [OneHot(V) | Embedding(V,E) | nothing (floats [B,T,V])] ->
    recurrent layer objects ``stack`` ((cell name, num_layers, H), ...) -> [Dropout] -> Dense."""

    enc: str = "onehot"
    stack: tuple = (("lstm", 1, 5),)
    V: int = 6
    E: int = 3
    C: int = 4
    bias: bool = True
    dropout: float = 0.0        # each layer object's dropout between its cells
    head_dropout: float = 0.0   # a Dropout module before the head (0: none)
    dtype: str = "float64"

    def build(self, seed=0):
        """The model; the same seed gives the same parameters and dropout generators."""
        dt, mods = self.dtype, []
        width = self.V
        if self.enc == "onehot":
            mods.append(rk.OneHot(self.V, dtype=dt))
        elif self.enc == "embedding":
            mods.append(rk.Embedding(self.V, self.E, seed=seed, dtype=dt))
            width = self.E
        for i, (cell, L, H) in enumerate(self.stack):
            cls, opts = CELLS[cell]
            mods.append(cls(width, H, L, dtype=dt, backend="cpp", seed=seed + 1 + i,
                            dropout=self.dropout, **opts))
            width = H
        if self.head_dropout:
            mods.append(rk.Dropout(self.head_dropout, seed=seed + 7))
        mods.append(rk.Dense(width, self.C, bias=self.bias, seed=seed + 9, dtype=dt))
        return rk.Sequential(mods)

    def batch(self, B, T, seed=1):
        """x (ids, the last one V-1, or floats) and targets y."""
        rng = np.random.default_rng(seed)
        if self.enc == "floats":
            x = rng.standard_normal((B, T, self.V)).astype(self.dtype)
        else:
            x = rng.integers(0, self.V, (B, T))
            x.flat[-1] = self.V - 1
        return x, rng.integers(0, self.C, (B, T))

    def state(self, B, seed=2):
        """A random initial state: per layer None, h [L,B,H] or (h, c)."""
        rng = np.random.default_rng(seed)
        out = [None] if self.enc != "floats" else []
        for cell, L, H in self.stack:
            h = (0.5 * rng.standard_normal((L, B, H))).astype(self.dtype)
            c = (0.5 * rng.standard_normal((L, B, H))).astype(self.dtype)
            out.append((h, c) if cell.startswith("lstm") else h)
        out += [None] * (1 + bool(self.head_dropout))
        return tuple(out)


def scenario(net, B=3, T=4, seed=1):
    """Steps with lengths (incl. T and 0), position weights (some zero), an initial state and
    return_state, and plain ones."""
    x, y = net.batch(B, T, seed)
    x2, y2 = net.batch(B, T, seed + 10)
    rng = np.random.default_rng(seed + 20)
    lengths = rng.integers(0, T + 1, B)
    lengths[-1] = 0
    lengths[0] = T
    weights = rng.random((B, T))
    weights[weights < 0.25] = 0.0
    state = net.state(B)
    return [dict(x=x, y=y, lengths=lengths, weights=weights, return_state=True),
            dict(x=x2, y=y2, initial_state=state, return_state=True),
            dict(x=x, y=y2, initial_state=state, lengths=lengths, weights=weights),
            dict(x=x2, y=y)]


@dataclass
class Run:
    model: rk.Sequential
    opt: object
    step: rk.TrainStep
    outs: list


def assert_cpp_plan(step):
    assert step.plan is not None, step.generic_reason
    assert isinstance(step.plan, CppPlan) and step.plan.backend.name == "cpp", str(step.plan)


def assert_input_mode(step, inp):
    """The step ran a CppPlan whose input stage is mode ``inp``."""
    assert_cpp_plan(step)
    words = str(step.plan)
    assert step.plan.stages["input"].startswith(INPUT_WORDS[inp]), words
    if inp.endswith("table"):
        assert "read inside the call" in step.plan.stages["input"], words
    assert "one call for the whole stack" in words, words


def default_optimizer(dtype):
    """Adam in float64; SGD in float32, whose update does not magnify rounding (Adam's
    m / sqrt(v) turns a gradient of rounding size into a step of lr)."""
    return rk.Adam(0.05) if dtype == "float64" else rk.SGD(0.2)


def train(net, calls, *, generic=False, opt=None, seed=0):
    """The calls through a TrainStep on ``net.build(seed)`` (planned: a CppPlan each call)."""
    model = net.build(seed)
    opt = default_optimizer(net.dtype) if opt is None else opt()
    step = rk.TrainStep(model, rk.sequence_loss, opt, generic=generic)
    outs = []
    for call in calls:
        outs.append(step(**call))
        if generic:
            assert step.plan is None
        else:
            assert_cpp_plan(step)
    return Run(model, opt, step, outs)


def both(net, calls, **kw):
    """(planned run, generic run) of the same calls on identical models."""
    return train(net, calls, **kw), train(net, calls, generic=True, **kw)


def flat_states(state):
    """Every array of a state tuple, in order."""
    out = []
    for s in state:
        if s is None:
            continue
        out += list(s) if isinstance(s, tuple) else [s]
    return out


def assert_same(got, want, dtype, bits=False):
    """Losses, final states, every parameter and gradient, the optimizer's state and the
    dropout generators of two runs agree (to the dtype's tolerance, or to the bit)."""
    check = np.testing.assert_array_equal if bits else (
        lambda a, b, err_msg="": np.testing.assert_allclose(a, b, err_msg=err_msg, **TOL[dtype]))
    assert len(got.outs) == len(want.outs)
    for i, (g, w) in enumerate(zip(got.outs, want.outs)):
        assert isinstance(g, tuple) == isinstance(w, tuple)
        if isinstance(w, tuple):
            gs, ws = flat_states(g[1]), flat_states(w[1])
            assert [a.shape for a in gs] == [a.shape for a in ws]
            for k, (a, b) in enumerate(zip(gs, ws)):
                assert a.dtype == np.dtype(dtype)
                check(a, b, err_msg=f"step {i} state {k}")
            g, w = g[0], w[0]
        assert isinstance(g, float)
        check(g, w, err_msg=f"step {i} loss")
    pg, pw = got.model.params, want.model.params
    assert pg.keys() == pw.keys()
    for k in pw:
        assert pg[k].dtype == np.dtype(dtype)
        check(pg[k], pw[k], err_msg=f"param {k}")
        check(got.model.grads[k], want.model.grads[k], err_msg=f"grad {k}")
    assert got.opt.iterations == want.opt.iterations
    sg, sw = got.opt.state_dict()["state"], want.opt.state_dict()["state"]
    assert sg.keys() == sw.keys()
    for k in sw:
        for slot in sw[k]:
            check(sg[k][slot], sw[k][slot], err_msg=f"optimizer {k}.{slot}")
    assert got.model.get_rng_state() == want.model.get_rng_state()


@pytest.fixture
def tunable():
    """tunable(name, value): a ``CPP_*`` setting of rnnkern.config for this test, restored after;
    CPP_THREADS to 0, automatic (reading it gives the count resolved from 0, which
    monkeypatch.setattr would then pin)."""
    saved = {}

    def use(name, value):
        saved.setdefault(name, getattr(config, name))
        setattr(config, name, value)
        assert getattr(config, name) == value
    yield use
    for name, value in saved.items():
        setattr(config, name, 0 if name == "CPP_THREADS" else value)


@pytest.fixture
def threads(tunable):
    """threads(n, ring_rows=None): the C++ time loops on n threads, split from the smallest
    work up (and the LSTM backward's ring rows)."""
    def use(n, ring_rows=None):
        tunable("CPP_THREADS", n)
        tunable("CPP_SPLIT_MIN_WORK", 0)
        if ring_rows is not None:
            tunable("CPP_LSTM_RING_ROWS", ring_rows)
    return use


# ------------------------------------------------------------------------------ the generic loop
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inp", list(INPUTS))
@pytest.mark.parametrize("cell", list(CELLS))
def test_every_cell_and_input_matches_the_generic_loop(cell, inp, dtype):
    enc, V = INPUTS[inp]
    net = Net(enc=enc, V=V, stack=((cell, 2, 5),), dtype=dtype)
    got, want = both(net, scenario(net))
    assert_same(got, want, dtype)
    assert_input_mode(got.step, inp)


def test_the_plan_names_its_stages():
    net = Net(enc="embedding", V=6, stack=(("gru", 2, 5), ("lstm", 1, 7)), C=3)
    run = train(net, scenario(net)[:1])
    assert str(run.step.plan).splitlines() == [
        "step plan for batches [B,T] = [3,4], float64, backend cpp:",
        ("  input   Embedding ids -> rows of E W_ih^T [6,15] (NumPy GEMM), read inside the "
         "call; its gradient -> dW_ih, dE (NumPy GEMMs)"),
        "  stack   cpp, one call for the whole stack: GRU(3->5 x2), LSTM(5->7)",
        "  head    Dense(7->3) + sequence_loss inside the call",
        "  update  Adam.step_flat over the flat parameters, its rule in C++ after the call"]
    assert repr(run.step) == f"TrainStep({run.step.plan})"


STACKS = [  # (input, ((cell, num_layers, H), ...)): 1-3 cells over 1-2 layer objects
    ("onehot-table", (("lstm-fb0", 1, 5),)),
    ("embedding-table", (("gru", 3, 4),)),
    ("onehot-table", (("gru", 2, 5), ("lstm", 1, 7))),
    ("embedding-rows", (("rnn-relu", 1, 6), ("gru-rb", 2, 3))),
    ("floats", (("lstm", 2, 4), ("rnn-tanh", 1, 5))),
    ("onehot-rows", (("gru-rb", 1, 17), ("lstm-fb0", 2, 6))),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inp, stack", STACKS,
                         ids=["-".join([s[0]] + [f"{c}x{L}" for c, L, _ in s[1]]) for s in STACKS])
def test_stacks_and_mixed_cells_match_the_generic_loop(inp, stack, dtype):
    enc, V = INPUTS[inp]
    net = Net(enc=enc, V=V, stack=stack, dtype=dtype)
    got, want = both(net, scenario(net))
    assert_same(got, want, dtype)
    assert_input_mode(got.step, inp)
    kinds = str(got.step.plan).split("whole stack: ")[1].split("\n")[0]
    assert kinds.count("(") == len(stack)


SHAPES = [  # (name, B, T, H, C, bias)
    ("T1", 4, 1, 5, 4, True),
    ("B1", 1, 5, 5, 4, True),
    ("H1", 3, 4, 1, 3, True),
    ("H17-C7", 3, 4, 17, 7, True),
    ("H33-C17-nobias", 2, 3, 33, 17, False),
    ("C1-nobias", 3, 2, 3, 1, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("name, B, T, H, C, bias", SHAPES, ids=[s[0] for s in SHAPES])
def test_awkward_shapes_match_the_generic_loop(name, B, T, H, C, bias, cell, dtype):
    """T=1, B=1, H=1, H over one and two SIMD vectors (17, 33), C not a multiple of 16 (1, 7,
    17), Dense without bias; the input modes in turn over the grid."""
    inp = list(INPUTS)[(SHAPES.index((name, B, T, H, C, bias)) + list(CELLS).index(cell))
                       % len(INPUTS)]
    net = input_net(inp, B, T, C=C, bias=bias, stack=((cell, 2, H),), dtype=dtype)
    got, want = both(net, scenario(net, B=B, T=T))
    assert_same(got, want, dtype)
    assert_input_mode(got.step, inp)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inp, stack", [
    ("embedding-table", (("lstm", 3, 5),)),
    ("onehot-table", (("gru", 2, 5), ("rnn-tanh", 2, 4))),
    ("embedding-rows", (("gru-rb", 2, 6), ("lstm-fb0", 1, 5))),
    ("floats", (("rnn-relu", 2, 4),)),
], ids=["embedding-lstmx3", "onehot-grux2-rnnx2", "embedding-rows-grux2-lstm", "floats-relux2"])
def test_dropout_between_cells_and_before_the_head_matches_the_generic_loop(inp, stack, dtype):
    """The plan draws the masks from the layers' own generators in their order: after several
    steps (lengths, weights, states), every result and every generator's state agree."""
    enc, V = INPUTS[inp]
    net = Net(enc=enc, V=V, stack=stack, dropout=0.3, head_dropout=0.25, dtype=dtype)
    calls = scenario(net) + scenario(net, seed=5)
    got, want = both(net, calls)
    assert_same(got, want, dtype)
    moved, untouched = got.model.get_rng_state(), net.build().get_rng_state()
    draws = {str(i) for i, m in enumerate(got.model.layers)   # every dropout drew its masks
             if type(m) is rk.Dropout or getattr(m, "num_layers", 1) > 1}
    assert {k for k in moved if moved[k] != untouched[k]} == draws
    # eval mode: no masks (a new plan), still the generic loop's results
    for run in (got, want):
        run.model.eval()
        run.outs.append(run.step(*net.batch(3, 4, seed=9)))
    assert_cpp_plan(got.step)
    assert got.model.get_rng_state() == moved
    assert_same(got, want, dtype)


def test_position_weights_all_zero_and_lengths_all_zero():
    """All-zero weights: zero loss and zero gradients (both paths); all lengths 0: only the
    biases reach the head."""
    net = Net(enc="embedding", stack=(("gru", 2, 5),))
    x, y = net.batch(3, 4)
    calls = [dict(x=x, y=y, weights=np.zeros((3, 4))),
             dict(x=x, y=y, lengths=np.zeros(3, np.int64), return_state=True),
             dict(x=x, y=y, weights=np.zeros((3, 4), np.int64), lengths=[4, 0, 2])]
    got, want = both(net, calls, opt=lambda: rk.SGD(0.1))
    assert_same(got, want, "float64")
    assert got.outs[0] == 0.0 and got.outs[2] == 0.0
    assert not any(g.any() for g in got.model.grads.values())
    h = got.outs[1][1][1]   # lengths 0: the initial (zero) state
    assert not h.any()


def test_the_state_carried_from_step_to_step_matches_the_generic_loop():
    """Truncated BPTT: each step starts from the state the previous one returned (each path
    its own), for a mixed stack; a partial initial state (None for a layer: zeros)."""
    net = Net(enc="onehot", V=6, stack=(("lstm", 1, 5), ("gru-rb", 2, 4)), dropout=0.2)
    runs = []
    for generic in (False, True):
        run = train(net, [], generic=generic)
        state = None
        for seed in range(4):
            x, y = net.batch(3, 4, seed)
            loss, state = run.step(x, y, initial_state=state, return_state=True)
            run.outs.append((loss, state))
        partial = (None, None, state[2], None)
        run.outs.append(run.step(x, y, initial_state=partial, return_state=True))
        runs.append(run)
    assert_same(*runs, "float64")


def test_loosely_typed_batches_match_the_generic_loop():
    """Targets as lists, int32 lengths, boolean weights, float32 or Fortran-ordered floats
    into a float64 model: converted as the generic loop converts them."""
    net = Net(enc="floats", V=5, stack=(("rnn-tanh", 2, 5),))
    x, y = net.batch(3, 4)
    w = np.random.default_rng(0).random((3, 4)) < 0.5
    calls = [dict(x=x.astype(np.float32), y=y.tolist(), weights=w,
                  lengths=np.array([4, 0, 2], np.int32)),
             dict(x=np.asfortranarray(x), y=y.astype(np.uint8), weights=w.tolist(),
                  lengths=[1, 2, 3]),
             dict(x=x[:, ::-1], y=y, weights=w.astype(np.float32))]
    got, want = both(net, calls)
    assert_same(got, want, "float64")


# ------------------------------------------------------------------------------ threads
@pytest.mark.parametrize("nthreads, ring_rows", [(1, None), (1, 1), (2, 3), (2, 1), (3, None),
                                                 (3, 3)])
@pytest.mark.parametrize("cell", ["lstm", "gru-rb", "rnn-relu"])
def test_threads_and_ring_rows_match_the_generic_loop(threads, nthreads, ring_rows, cell):
    threads(nthreads, ring_rows)
    assert config.CPP_THREADS == nthreads and config.CPP_SPLIT_MIN_WORK == 0
    for inp, dtype in (("embedding-table", "float64"), ("onehot-rows", "float32")):
        enc, V = INPUTS[inp]
        net = Net(enc=enc, V=V, stack=((cell, 2, 17), ("lstm", 1, 5)), dropout=0.2,
                  head_dropout=0.1, dtype=dtype)
        got, want = both(net, scenario(net, B=7, T=4) + scenario(net, B=7, T=4, seed=3))
        assert_same(got, want, dtype)
        assert len(got.step.plan.call.cut) == min(nthreads, 7) + 1


@pytest.mark.parametrize("B", [2, 7])
def test_the_thread_count_changed_between_steps_matches_the_generic_loop(threads, tunable, B):
    """One plan, its call run on 2, 3, 1, then 3 threads (B=2: fewer rows than threads)."""
    threads(2)
    net = Net(enc="embedding", V=6, stack=(("lstm", 2, 5), ("rnn-relu", 1, 3)), dropout=0.2)
    runs, calls = [], set()
    for generic in (False, True):
        run = train(net, [], generic=generic)
        for n, call in zip((2, 3, 1, 3), scenario(net, B, 4)):
            tunable("CPP_THREADS", n)
            run.outs.append(run.step(**call))
            if not generic:
                calls.add(run.step.plan.call)
                assert len(run.step.plan.call.cut) == min(n, B) + 1
        runs.append(run)
    assert len(calls) == 1
    assert_same(*runs, "float64")


CUTS = {  # threads: held cuts of B = 9 rows, the even one first
    2: ([0, 4, 9], [0, 1, 9], [0, 8, 9], [0, 9, 9], [0, 0, 9]),
    # 3: a thread forwarding rows of both other chunks, or of none
    3: ([0, 3, 6, 9], [0, 0, 0, 9], [0, 9, 9, 9], [0, 1, 8, 9], [0, 0, 9, 9], [0, 5, 5, 9]),
}


@pytest.mark.parametrize("nthreads", sorted(CUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cell", list(CELLS))
def test_the_forward_cut_changes_no_bit(threads, cell, dtype, nthreads):
    """The call cuts its forward's rows over the threads by their measured speeds, so the cut
    moves from step to step and a thread forwards rows whose backward another runs: under
    held cuts from even to lopsided (threads without rows), with lengths, weights, states and
    dropout masks, every result is the same to the bit."""
    threads(nthreads)
    inp = ["embedding-table", "onehot-rows", "floats"][list(CELLS).index(cell) % 3]
    enc, V = INPUTS[inp]
    net = Net(enc=enc, V=V, stack=((cell, 2, 17),), dropout=0.3, head_dropout=0.2, dtype=dtype)
    B, T = 9, 4
    first, rest = scenario(net, B, T)[:1], scenario(net, B, T)[1:] + scenario(net, B, T, 4)

    def run(cut):
        r = train(net, first)           # builds the call; its cut moved after that step
        call = r.step.plan.call
        assert call.cut[0] == 0 and call.cut[-1] == B and len(call.cut) == nthreads + 1
        call.hold_cut(cut)
        for c in rest:
            r.outs.append(r.step(**c))
            assert r.step.plan.call is call and call.cut == cut
        return r
    even, *others = CUTS[nthreads]
    want = run(even)
    for cut in others:
        assert_same(run(cut), want, dtype, bits=True)


def test_the_cut_follows_the_threads_and_refuses_a_bad_one(threads):
    """Left to move, the cut stays a cut of the batch, each thread's share within [1/2, 2] of
    the even one; a cut that does not rise from 0 is refused, one for another batch not used."""
    threads(2)
    net = Net(stack=(("gru", 2, 5),))
    x, y = net.batch(12, 3)
    run = train(net, [dict(x=x, y=y)] * 20)
    call = run.step.plan.call
    cut = call.cut
    assert cut[0] == 0 and cut[2] == 12 and 3 <= cut[1] <= 9, cut
    for bad in ([0, 7, 5], [1, 7, 12]):
        with pytest.raises(ValueError, match="cut must rise from 0 to B"):
            call.hold_cut(bad)
    call.hold_cut([0, 7, 13])     # another batch's: the moving cut goes on
    run.step(x, y)
    assert call.cut[0] == 0 and call.cut[2] == 12
    call.hold_cut([0, 2, 12])
    run.step(x, y)
    assert call.cut == [0, 2, 12]
    call.hold_cut([])             # free again
    run.step(x, y)
    assert call.cut[2] == 12


def _advised_huge_kib():
    """kB of this process's mappings advised MADV_HUGEPAGE (VmFlags "hg" in /proc/self/smaps)."""
    total, size = 0, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("VmFlags:") and " hg" in line:
                total += size
    return total


def test_buffers_on_huge_pages_change_no_result(tunable, threads):
    """csrc/cpu/buffer.h puts work buffers from CPP_HUGE_PAGE_MIN bytes up on transparent huge
    pages: with every buffer there, or none, every result agrees to the bit; the threshold
    refuses < 0."""
    tunable("CPP_HUGE_PAGE_MIN", config.CPP_HUGE_PAGE_MIN)   # restored after
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        config.CPP_HUGE_PAGE_MIN = -1
    threads(2)
    smaps = os.path.exists("/proc/self/smaps")
    net = Net(enc="embedding", V=13, stack=(("lstm", 2, 17), ("gru", 1, 5)), dropout=0.3)
    calls = scenario(net, B=5, T=4)

    def run(threshold):
        tunable("CPP_HUGE_PAGE_MIN", threshold)
        before = _advised_huge_kib() if smaps else 0
        r = train(net, calls)
        r.advised = (_advised_huge_kib() if smaps else 0) - before  # while its buffers live
        return r
    huge = run(0)           # every buffer on huge pages
    small = run(2 ** 62)    # none
    assert_same(huge, small, "float64", bits=True)
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if smaps and os.path.exists(thp):
        with open(thp) as f:
            if "[never]" not in f.read():
                assert huge.advised >= 2048, huge.advised   # at least one 2 MiB page advised


# ------------------------------------------------------------------------------ Adam inside
INSIDE = "Adam inside the call, over the flat parameters (C++)"
AFTER = "Adam.step_flat over the flat parameters, its rule in C++ after the call"
NUMPY = "Adam.step_flat over the flat parameters (NumPy)"


@pytest.mark.parametrize("eps_mode", ["tf", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inp", ["onehot-table", "onehot-rows", "floats"])
def test_adam_inside_the_call_gives_the_numpy_bits(monkeypatch, inp, dtype, eps_mode):
    """A plain Adam runs inside the call (csrc/cpu/adam.h, no FMA contraction): the same bits
    as Adam.step_flat after it, over steps with an lr change, a state reload (whose first step
    builds the flat state through step_flat, then the call takes it again), an eps_mode switch
    and a clip_value set and unset (the update leaves the call and comes back). References:
    the same plan with the update kept outside (_adam_inside patched; _C.adam after the call),
    that with NumPy's rule (_adam_after patched too), and an Adam whose clip_value clips
    nothing (np.clip to +-1e30 changes no finite gradient: the same math)."""
    enc, V = INPUTS[inp]
    net = Net(enc=enc, V=V, stack=(("lstm", 2, 17), ("gru-rb", 1, 5)), dtype=dtype,
              dropout=0.2, head_dropout=0.1)
    calls = scenario(net, B=4, T=3)
    other = {"tf": "torch", "torch": "tf"}[eps_mode]

    def run(clip_value=None, outside=False, numpy_rule=False):
        where = []
        with monkeypatch.context() as mp:
            if outside or numpy_rule:
                mp.setattr(CppPlan, "_adam_inside", lambda self: False)
            if numpy_rule:
                mp.setattr(CppPlan, "_adam_after", lambda self: False)
            r = train(net, calls[:2], opt=lambda: rk.Adam(0.05, eps_mode=eps_mode,
                                                          clip_value=clip_value))
            opt, step = r.opt, r.step

            def steps(cs):
                r.outs.extend(step(**c) for c in cs)
                where.append(step.plan.stages["update"])
                assert where[-1] in str(step.plan)
            where.append(step.plan.stages["update"])
            opt.lr = 0.02
            steps(calls[2:])
            opt.load_state_dict(opt.state_dict())
            steps(calls[:1])
            steps(calls[1:])
            opt.eps_mode = other
            steps(calls[:2])
            if clip_value is None:
                opt.clip_value = 1e30
                steps(calls[2:3])
                opt.clip_value = None
                steps(calls[3:])
            else:
                steps(calls[2:])
            assert opt.iterations == 12
        return r, where
    inside, where = run()
    assert where == [INSIDE, INSIDE, AFTER, INSIDE, INSIDE, AFTER, INSIDE]
    outside, where = run(outside=True)
    assert set(where) == {AFTER}
    assert_same(inside, outside, dtype, bits=True)
    numpy_rule, where = run(numpy_rule=True)
    assert set(where) == {NUMPY}
    assert_same(inside, numpy_rule, dtype, bits=True)
    clipped, where = run(clip_value=1e30)
    assert set(where) == {AFTER}
    assert_same(inside, clipped, dtype, bits=True)


@pytest.mark.parametrize("enc, opt", [
    ("embedding", lambda: rk.Adam(0.05)),                       # dE formed after the call
    ("onehot", lambda: rk.Adam(0.05, clip_norm=1.0)),           # needs every gradient first
    ("onehot", lambda: rk.Adam(0.05, clip_value=0.01)),
    ("floats", lambda: rk.Adam(0.05, weight_decay=0.01)),
    ("onehot", lambda: rk.SGD(0.1, momentum=0.9)),
    ("floats", lambda: rk.RMSprop(0.01)),
], ids=["embedding", "clip_norm", "clip_value", "weight_decay", "sgd", "rmsprop"])
def test_other_updates_run_after_the_call_and_match_the_generic_loop(enc, opt):
    net = Net(enc=enc, stack=(("gru", 1, 5), ("lstm", 1, 4)))
    got, want = both(net, scenario(net), opt=opt)
    assert_same(got, want, "float64")
    c_adam = type(got.opt) is rk.Adam and not got.opt.weight_decay  # Adam's rule in C++
    assert got.step.plan.stages["update"] == (AFTER if c_adam else (
        f"{type(got.opt).__name__}.step_flat over the flat parameters (NumPy)"))
    assert "inside the call" not in str(got.step.plan).split("update")[1]


# ------------------------------------------------------------------------------ the head's math
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_stay_finite(dtype):
    """Logits of several hundred (a head scaled up): loss and gradients finite, the generic
    loop's values (float64 run as the reference for float32)."""
    net = Net(enc="onehot", stack=(("rnn-relu", 1, 6),), C=5, dtype=dtype)
    calls = scenario(net)

    def scaled(generic, dt=dtype):
        model = replace(net, dtype=dt).build()
        model.layers[-1].params["weight"] *= 400.0
        model.layers[-1].params["bias"] *= 400.0
        step = rk.TrainStep(model, rk.sequence_loss, rk.SGD(1e-6), generic=generic)
        losses = [step(**c) for c in calls]
        return losses, step, model
    losses, step, model = scaled(False)
    assert_cpp_plan(step)
    assert np.isfinite([v[0] if isinstance(v, tuple) else v for v in losses]).all()
    assert max(v[0] if isinstance(v, tuple) else v for v in losses) > 50.0
    for k, g in model.grads.items():
        assert np.isfinite(g).all(), k
    ref_losses, _, ref = scaled(True, "float64")
    for a, b in zip(losses, ref_losses):
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        np.testing.assert_allclose(a, b, rtol=1e-10 if dtype == "float64" else 1e-5)
    for k in ref.params:
        np.testing.assert_allclose(model.grads[k], ref.grads[k], err_msg=k,
                                   **(TOL[dtype] if dtype == "float64" else
                                      dict(rtol=1e-3, atol=1e-4)))


def test_zero_weight_positions_give_zero_loss_and_no_gradient():
    """Positions of weight 0 add nothing: the same loss and gradients whatever their targets,
    and whatever the inputs that reach only them (a row of zero weights; the ids in a
    zero-weight tail); all-zero weights: loss 0."""
    net = Net(enc="embedding", stack=(("lstm", 1, 5),))
    x, y = net.batch(3, 4)
    w = np.ones((3, 4))
    w[1, 2:] = 0.0
    w[2, :] = 0.0
    y2, x2 = y.copy(), x.copy()
    y2[1, 2:] = (y2[1, 2:] + 1) % net.C
    y2[2] = (y2[2] + 2) % net.C
    x2[2] = (x2[2] + 1) % net.V
    x2[1, 3] = (x2[1, 3] + 1) % net.V
    grads, losses = [], []
    for xx, yy in ((x, y), (x2, y2)):
        r = train(net, [dict(x=xx, y=yy, weights=w)], opt=lambda: rk.SGD(0.0))
        losses.append(r.outs[0])
        grads.append(np.concatenate([g.ravel() for g in r.model.grads.values()]))
    assert losses[0] == losses[1] and losses[0] > 0
    np.testing.assert_array_equal(grads[0], grads[1])
    r = train(net, [dict(x=x, y=y, weights=np.zeros((3, 4)))], opt=lambda: rk.SGD(0.0))
    assert r.outs[0] == 0.0 and not any(g.any() for g in r.model.grads.values())


@pytest.mark.parametrize("inp", ["onehot-table", "embedding-table", "embedding-rows", "floats"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_gradients_match_finite_differences_of_the_generic_loss(cell, inp):
    """Every gradient the call leaves (lr 0: the parameters stay) against central differences
    of the generic loss (model.forward + sequence_loss) in float64, with lengths, weights and
    an initial state, through two cells and a head without bias."""
    enc = inp.split("-")[0]
    V = {"onehot-table": 6, "embedding-table": 6, "embedding-rows": 7, "floats": 3}[inp]
    net = Net(enc=enc, V=V, E=2, C=3, bias=False, stack=((cell, 2, 2),))
    B, T = 2, 3
    call = scenario(net, B, T)[2]
    run = train(net, [call], opt=lambda: rk.SGD(0.0))
    assert_input_mode(run.step, inp)
    model = run.model

    def loss():
        pred = model.forward(call["x"], lengths=call["lengths"],
                             initial_state=call["initial_state"])
        return rk.sequence_loss(pred, call["y"], weights=call["weights"])
    for k, p in model.params.items():
        np.testing.assert_allclose(model.grads[k], numeric_grad(loss, p), rtol=1e-5, atol=1e-8,
                                   err_msg=k)


# ------------------------------------------------------------------------------ bad input
def _snapshot(run):
    return ({k: v.copy() for k, v in run.model.params.items()}, run.model.get_rng_state(),
            run.opt.iterations, {k: {s: a.copy() for s, a in st.items()}
                                 for k, st in run.opt.state.items()})


def _assert_unchanged(run, snap, what):
    params, rngs, iterations, state = snap
    for k, v in run.model.params.items():
        np.testing.assert_array_equal(v, params[k], err_msg=f"{what}: {k}")
    assert run.model.get_rng_state() == rngs, what
    assert run.opt.iterations == iterations, what
    for k, st in state.items():
        for s, a in st.items():
            np.testing.assert_array_equal(run.opt.state[k][s], a, err_msg=f"{what}: {k}.{s}")


def _with_lstm_h0(net, change):
    """net's random initial state with the first LSTM layer's h0 changed."""
    state = list(net.state(3))
    i = next(i for i, s in enumerate(state) if isinstance(s, tuple))
    state[i] = (change(state[i][0]), state[i][1])
    return tuple(state)


def _refused(step, call):
    with pytest.raises((ValueError, TypeError)) as info:
        step(**call)
    return info.value


def bad_batches(net, B=3, T=4):
    """name -> (step kwargs with one thing wrong, pattern of the message both paths give)."""
    x, y = net.batch(B, T)
    good = dict(x=x, y=y)
    bad = {
        "targets float": (dict(good, y=y.astype(np.float64)), "targets must be an integer"),
        "targets shape": (dict(good, y=y[:, :-1]), r"targets must have shape \[B,T\]"),
        "weights shape": (dict(good, weights=np.ones((B, T + 1))), "weights must have shape"),
        "weights str": (dict(good, weights=np.full((B, T), "a")), "weights must be"),
        "weights nan": (dict(good, weights=np.full((B, T), np.nan)), "weights contains NaN"),
        "lengths > T": (dict(good, lengths=[T + 1, 1, 1]), r"lengths must lie in \[0, T\]"),
        "lengths < 0": (dict(good, lengths=[-1, 1, 1]), r"lengths must lie in \[0, T\]"),
        "lengths float": (dict(good, lengths=np.ones(B)), "lengths must be integers"),
        "lengths shape": (dict(good, lengths=[1, 2]), r"lengths must have shape \[B\]"),
        "state count": (dict(good, initial_state=(None, None)),
                        "initial_state must be a tuple with one entry per layer"),
        "state shape": (dict(good, initial_state=_with_lstm_h0(net, lambda h: h[:, :-1])),
                        r"h0\) must have shape \[L,B,H\]"),
        "state nan": (dict(good, initial_state=_with_lstm_h0(net, lambda h: h * np.nan)),
                      r"h0\) contains NaN"),
    }
    if net.enc == "floats":
        bad.update({
            "x ints": (dict(good, x=x.astype(np.int64)), "x must be a floating-point array"),
            "x width": (dict(good, x=x[:, :, :-1]), r"x.shape\[-1\] must be equal to input_size"),
            "x 4-D": (dict(good, x=x[..., None]), "x must have 3 dimensions"),
            "x nan": (dict(good, x=np.where(x > 1, np.nan, x)), "x contains NaN"),
        })
    else:
        name, V = {"onehot": "OneHot", "embedding": "Embedding"}[net.enc], net.V
        bad.update({
            "ids >= V": (dict(good, x=np.where(x == x[0, 0], V, x)),
                         rf"{name} ids must lie in \[0, {V}\), got (min \d+ and max )?{V}"),
            "ids < 0": (dict(good, x=np.where(x == x[1, 2], -3, x)),
                        rf"{name} ids must lie in \[0, {V}\), got (min )?-3"),
            "ids wrap": (dict(good, x=np.where(x == x[2, 3], 2**63 + 5, x.astype(np.uint64))),
                         rf"{name} ids must lie in \[0, {V}\), got (min \d+ and max )?{2**63 + 5}"),
            "ids float": (dict(good, x=x.astype(np.float64)),
                          f"{name} input must be integer ids"),
        })
    return good, bad


def assert_refused_as_generic(planned, generic, bad):
    """Each bad call raises the generic loop's exception type, both messages matching the
    pattern, and changes nothing of the planned run (parameters, optimizer, generators)."""
    for what, (call, pattern) in bad.items():
        snap = _snapshot(planned)
        err = _refused(planned.step, call)
        _assert_unchanged(planned, snap, what)
        want = _refused(generic.step, call)
        assert type(err) is type(want), (what, err, want)
        assert re.search(pattern, str(err)), (what, str(err))
        assert re.search(pattern, str(want)), (what, str(want))


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("inp", list(INPUTS))
def test_bad_input_is_refused_as_the_generic_loop_refuses_it_and_changes_nothing(inp, dropout):
    """Each bad batch raises the generic loop's exception type with a message naming what is
    wrong (ids out of range: the encoder and the value, whether the plan or the call finds
    them), and leaves every parameter, the optimizer and the dropout generators as they were:
    the next good steps equal a run that never saw it."""
    enc, V = INPUTS[inp]
    net = Net(enc=enc, V=V, stack=(("lstm", 2, 5), ("gru", 1, 4)), dropout=dropout,
              head_dropout=dropout)
    good, bad = bad_batches(net)
    planned, generic = train(net, [good]), train(net, [good], generic=True)
    assert_refused_as_generic(planned, generic, bad)
    fresh = train(net, [good])
    for run in (planned, fresh):
        run.outs += [run.step(**c) for c in scenario(net)]
    assert_same(planned, fresh, "float64", bits=True)


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("inp", ["onehot-table", "embedding-rows", "floats"])
def test_targets_out_of_range_are_refused_and_change_nothing(inp, dropout):
    enc, V = INPUTS[inp]
    net = Net(enc=enc, V=V, stack=(("lstm", 2, 5), ("gru", 1, 4)), dropout=dropout,
              head_dropout=dropout)
    good = dict(zip("xy", net.batch(3, 4)))
    y = good["y"]
    bad = {"targets >= C": (dict(good, y=np.where(y == y[0, 0], net.C, y)),
                            r"targets must lie in \[0, C\) = \[0, 4\), got (min \d+ and max )?4"),
           "targets < 0": (dict(good, y=np.where(y == y[1, 1], -1, y)),
                           r"targets must lie in \[0, C\) = \[0, 4\), got (min )?-1")}
    planned, generic = train(net, [good]), train(net, [good], generic=True)
    assert_refused_as_generic(planned, generic, bad)


@pytest.mark.parametrize("inp", ["onehot-table", "embedding-rows"])
def test_ids_of_a_wrong_shape_are_refused_with_a_clear_message(inp):
    enc, V = INPUTS[inp]
    net = Net(enc=enc, V=V, stack=(("gru", 1, 4),))
    good = dict(zip("xy", net.batch(3, 4)))
    bad = {"ids [B,T,1]": (dict(good, x=good["x"][..., None]),
                           r"(ids|x) must (have|be).*(dimensions|2-D|shape)")}
    assert_refused_as_generic(train(net, [good]), train(net, [good], generic=True), bad)


@pytest.mark.parametrize("inp", ["onehot-table", "embedding-table", "embedding-rows"])
def test_ids_of_any_integer_dtype_and_layout_give_the_same_bits(inp):
    enc, V = INPUTS[inp]
    net = Net(enc=enc, V=V, stack=(("gru", 2, 5),))
    x, y = net.batch(3, 4)
    calls = [dict(x=x, y=y)] * 2
    want = train(net, calls)
    for ids in (x.astype(np.int32), x.astype(np.uint8), np.asfortranarray(x),
                np.repeat(x, 2, axis=1)[:, ::2]):
        got = train(net, [dict(x=ids, y=y.astype(np.int16))] * 2)
        assert_same(got, want, "float64", bits=True)


# ------------------------------------------------------------------------------ the binding
def _direct(dtype=np.float64, B=2, T=3, V=4, H=3, C=5, cell="gru", mode="table", **over):
    """A one-layer StackStep built by hand (mode "table": ids into a [V,G*H] table;
    "transposed": [G*H,V]; "x": floats [B,T,V]); ``over`` replaces any keyword array.
    Returns (step, its keyword arrays, the run arguments ids, targets)."""
    rng = np.random.default_rng(0)
    cls, opts = CELLS[cell]
    spec = CellSpec(cls.kind, **opts)
    G = spec.gates
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    z = lambda *s: np.zeros(s, dtype)  # noqa: E731
    lstm = spec.has_cell_state
    layer = dict(spec=native_spec(spec), w_ih=r(G * H, V), w_hh=r(G * H, H), b_ih=r(G * H),
                 b_hh=r(G * H), dw_ih=z(G * H, V), dw_hh=z(G * H, H), db_ih=z(G * H),
                 db_hh=z(G * H), h0=z(B, H), c0=z(B, H) if lstm else None, h_n=z(B, H),
                 c_n=z(B, H) if lstm else None)
    layer.update({k[6:]: v for k, v in over.items() if k.startswith("layer_")})
    ids = rng.integers(0, V, (B, T)) if mode != "x" else None
    if mode == "table":
        inputs = dict(table=r(V, G * H), d_table=z(V, G * H))
    elif mode == "transposed":
        inputs = dict(table=layer["w_ih"], d_table=layer["dw_ih"], table_transposed=True)
    else:
        inputs = dict(x=r(B, T, V), dx=z(B, T, V))
    kw = dict(inputs, batch=(B, T), weight=r(C, H), bias=r(C), dw=z(C, H), db=z(C),
              weights=np.ones(B * T, dtype), lengths=np.full(B, T, np.int64))
    kw.update({k: v for k, v in over.items() if not k.startswith("layer_")})
    make = _C.StackStepF32 if dtype == np.float32 else _C.StackStepF64
    return make([_C.StackLayer(**layer)], **kw), kw, ids, rng.integers(0, C, (B, T))


@pytest.mark.parametrize("mode", ["table", "transposed", "x"])
def test_the_binding_runs_and_checks_ids_and_targets_on_each_run(mode):
    step, kw, ids, targets = _direct(mode=mode, cell="lstm")
    run = lambda: step.run(ids, targets, False, False, 1.0 / 6, False)  # noqa: E731
    loss = run()
    assert np.isfinite(loss) and loss > 0
    assert loss == run()   # no state kept between runs
    saved = targets.flat[4]
    targets.flat[4] = 5
    with pytest.raises(ValueError, match=r"targets must lie in \[0, C\) = \[0, 5\), got 5 at "
                                         r"position 4"):
        run()
    targets.flat[4] = saved
    if mode != "x":
        for bad, where in ((4, 5), (-1, 0)):
            saved = ids.flat[where]
            ids.flat[where] = bad
            with pytest.raises(ValueError, match=rf"ids must lie in \[0, V\) = \[0, 4\), got "
                                                 rf"{bad} at position {where}"):
                run()
            ids.flat[where] = saved
        for bad, pattern in ((ids.astype(np.int32), "ids must have dtype int64"),
                             (ids.reshape(-1), r"ids must have shape \[2, 3\]"),
                             (np.asfortranarray(ids), "ids must be C-contiguous")):
            with pytest.raises(ValueError, match=pattern):
                step.run(bad, targets, False, False, 1.0 / 6, False)
    else:
        with pytest.raises(ValueError, match="ids are for a table input only"):
            step.run(targets, targets, False, False, 1.0 / 6, False)
    with pytest.raises(ValueError, match=r"targets must have shape \[2, 3\]"):
        step.run(ids, targets.reshape(-1), False, False, 1.0 / 6, False)
    with pytest.raises(ValueError, match="adam_t > 0 needs set_adam's arrays first"):
        step.run(ids, targets, False, False, 1.0 / 6, False, 1, 0.1, 0.9, 0.999, 1e-8)
    assert run() == loss


def test_the_binding_keeps_its_arrays_alive():
    """The StackStep holds every array it was given: with the caller's references gone (and a
    garbage collection), its runs give the same loss."""
    import gc
    step, _, ids, targets = _direct(mode="table", cell="gru-rb")
    want = step.run(ids, targets, False, False, 1.0 / 6, False)
    fresh, kw2, ids2, targets2 = _direct(mode="table", cell="gru-rb")
    del kw2
    gc.collect()
    junk = [np.full(1000, np.nan) for _ in range(50)]   # reuse any freed memory
    assert fresh.run(ids2, targets2, False, False, 1.0 / 6, False) == want
    del junk


def test_the_binding_names_a_bad_array():
    """Every array is checked once, when the StackStep is made: a wrong shape, dtype or
    layout raises ValueError naming it."""
    B, T, V, H, C, G = 2, 3, 4, 3, 5, 3
    f32 = np.float32
    cases = [
        (dict(mode="table", table=np.zeros((V, G * H + 1))), r"table must have shape \[4, 9\]"),
        (dict(mode="table", d_table=np.zeros((V + 1, G * H))), "d_table must have shape"),
        (dict(mode="transposed", table=np.zeros((G * H + 1, V))),
         r"table must have shape \[9, 4\]"),
        (dict(mode="transposed", d_table=np.zeros((V, G * H))),
         r"d_table must have shape \[9, 4\]"),
        (dict(mode="x", x=np.zeros((B, T))), r"x must be a 3-D numpy.ndarray"),
        (dict(mode="x", dx=np.zeros((B, T, V + 1))), "dx must have shape"),
        (dict(mode="x", x=np.zeros((B, T, V + 1))), r"layers\[0\].w_ih must have shape"),
        (dict(mode="x", x=np.zeros((B + 1, T, V))), r"x must have shape \[2, 3, 4\]"),
        (dict(layer_h0=np.zeros((B + 1, H))), r"layers\[0\].h0 must have shape \[2, 3\]"),
        (dict(layer_dw_hh=np.zeros((G * H, H), f32)), r"layers\[0\].dw_hh must have dtype"),
        (dict(layer_w_hh=np.asfortranarray(np.zeros((G * H, H)))),
         r"layers\[0\].w_hh must be C-contiguous"),
        (dict(layer_b_ih=np.zeros(G * H + 1)), r"layers\[0\].b_ih must have shape"),
        (dict(layer_mask=np.ones((B, T, H))), r"layers\[0\].mask must be None"),
        (dict(weight=np.zeros((C, H + 1))), r"weight must have shape \[5, 3\]"),
        (dict(dw=np.zeros((C + 1, H))), r"dw must have shape \[5, 3\]"),
        (dict(bias=np.zeros(C + 1)), r"bias must have shape \[5\]"),
        (dict(db=None), "db must be an array, got None"),
        (dict(weights=np.ones(B * T, f32)), "weights must have dtype float64"),
        (dict(lengths=np.full(B + 1, T, np.int64)), r"lengths must have shape \[2\]"),
        (dict(head_mask=np.ones((B, T, H + 1))), "head_mask must have shape"),
        (dict(mode="table", x=np.zeros((B, T, V))),
         r"give the first layer's input as a table \(read by ids\) or as x"),
        (dict(batch=(-1, 3)), r"batch must be \(B, T\) >= 0"),
    ]
    _direct()   # the unchanged arguments are good
    with pytest.raises(ValueError, match=r"layers\[0\].w_ih must have dtype float32"):
        _direct(dtype=np.float32, layer_w_ih=np.zeros((G * H, V)))
    for over, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            _direct(**over)
    with pytest.raises(ValueError, match=r"layers\[0\].c0 must be an array, got None"):
        _direct(cell="lstm", layer_c0=None)
    with pytest.raises(ValueError, match="layers must hold at least one layer"):
        _C.StackStepF64([], **_direct()[1])
