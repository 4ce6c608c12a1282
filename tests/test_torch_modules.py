"""rnnkern.torch: torch.nn.LSTM/GRU/RNN drop-ins over rnnkern's kernels.

Parity with torch.nn in float64 (outputs, states, the input's, the initial states' and every
parameter's gradient, rtol 1e-10) over every cell and option, packed sequences, unbatched input,
dropout drawn from torch's RNG; autograd (gradcheck, two graphs alive at once, retain_graph,
the double-backward error); torch.compile through the custom operator; convert/revert; Adam
training and DistributedDataParallel (gloo, two processes) against the originals.
Shape legend: B batch, T time steps, I input size, H hidden size, L layers, D directions.
"""
from __future__ import annotations

import copy
import gc
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import rnnkern.torch as rkt  # noqa: E402
from rnnkern import recurrent_stack as stack  # noqa: E402
from rnnkern.torch import crossing, function  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)
# (cell name, nn class name, extra constructor kwargs)
CELLS = [("lstm", "LSTM", {}), ("gru", "GRU", {}), ("rnn_tanh", "RNN", {}),
         ("rnn_relu", "RNN", {"nonlinearity": "relu"})]
# (T, B, I, H): ordinary, then the awkward ones
SHAPES = [(5, 3, 4, 6), (1, 2, 3, 4), (4, 1, 2, 3), (3, 2, 2, 1)]


def pair(nn_name, I, H, L=1, seed=0, **kw):
    """(torch.nn module, rnnkern twin) with the same float64 weights."""
    torch.manual_seed(seed)
    ref = getattr(torch.nn, nn_name)(I, H, L, dtype=F64, **kw)
    ours = getattr(rkt, nn_name)(I, H, L, dtype=F64, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def close(actual, expected, what):
    assert actual is not None and expected is not None, what
    np.testing.assert_allclose(actual.detach().numpy(), expected.detach().numpy(),
                               err_msg=what, **TOL)


def states(s):
    return list(s) if isinstance(s, tuple) else [s]


def initial_state(nn_name, D, L, B, H, gen, unbatched=False):
    shape = (D * L, H) if unbatched else (D * L, B, H)
    make = lambda: torch.randn(shape, dtype=F64, generator=gen, requires_grad=True)  # noqa: E731
    return (make(), make()) if nn_name == "LSTM" else make()


def run_and_grad(module, x, hx, weights):
    """Forward, a loss reaching every output (outputs and final states, random weights),
    backward; returns (outputs, final states, grads of x, of hx's tensors, of each param)."""
    out, s = module(x, hx)
    data = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
    loss = (data * weights[0][:data.numel()].reshape(data.shape)).sum()
    for k, t in enumerate(states(s)):
        loss = loss + (t * weights[k + 1][:t.numel()].reshape(t.shape)).sum()
    leaves = [x.data if isinstance(x, torch.nn.utils.rnn.PackedSequence) else x]
    leaves += [] if hx is None else states(hx)
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, leaves + params)
    return data, states(s), grads[:len(leaves)], grads[len(leaves):]


def assert_parity(ref, ours, x_ref, x_ours, hx_ref, hx_ours, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = [torch.randn(4096, dtype=F64, generator=gen) for _ in range(3)]
    o1, s1, gi1, gp1 = run_and_grad(ref, x_ref, hx_ref, w)
    o2, s2, gi2, gp2 = run_and_grad(ours, x_ours, hx_ours, w)
    close(o2, o1, "output")
    for k, (a, b) in enumerate(zip(s2, s1, strict=True)):
        close(a, b, f"final state {k}")
    for k, (a, b) in enumerate(zip(gi2, gi1, strict=True)):
        close(a, b, f"gradient of input/initial state {k}")
    names = [n for n, _ in ref.named_parameters()]
    assert names == [n for n, _ in ours.named_parameters()]
    for n, a, b in zip(names, gp2, gp1, strict=True):
        close(a, b, f"gradient of {n}")


# ---------------------------------------------------------------------- construction

def test_import_rnnkern_does_not_import_torch():
    code = "import sys, rnnkern; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("nn_name", ["LSTM", "GRU", "RNN"])
def test_constructor_matches_torch(nn_name):
    import inspect
    ours = [p for p in inspect.signature(getattr(rkt, nn_name)).parameters.values()
            if p.name != "backend"]
    expected = {"LSTM": "input_size hidden_size num_layers bias batch_first dropout "
                        "bidirectional proj_size device dtype",
                "GRU": "input_size hidden_size num_layers bias batch_first dropout "
                       "bidirectional device dtype",
                "RNN": "input_size hidden_size num_layers nonlinearity bias batch_first "
                       "dropout bidirectional device dtype"}[nn_name].split()
    assert [p.name for p in ours] == expected
    positional = (3, 4, 2) + (("relu",) if nn_name == "RNN" else ()) + (True, True, 0.25, True)
    ref, mine = getattr(torch.nn, nn_name)(*positional), getattr(rkt, nn_name)(*positional)
    for attr in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional"):
        assert getattr(mine, attr) == getattr(ref, attr), attr
    if nn_name == "RNN":
        assert mine.nonlinearity == "relu"
    assert [(n, p.shape) for n, p in mine.named_parameters()] == \
        [(n, p.shape) for n, p in ref.named_parameters()]


@pytest.mark.parametrize("nn_name", ["LSTM", "GRU", "RNN"])
def test_state_dict_both_ways_and_same_initialisation(nn_name):
    torch.manual_seed(3)
    ref = getattr(torch.nn, nn_name)(5, 6, 2, bidirectional=True)
    torch.manual_seed(3)
    mine = getattr(rkt, nn_name)(5, 6, 2, bidirectional=True)
    for (n1, a), (n2, b) in zip(ref.state_dict().items(), mine.state_dict().items(),
                                strict=True):
        assert n1 == n2 and torch.equal(a, b), n1   # torch.nn's draws, in its order
    other = getattr(rkt, nn_name)(5, 6, 2, bidirectional=True)
    other.load_state_dict(ref.state_dict())
    back = getattr(torch.nn, nn_name)(5, 6, 2, bidirectional=True)
    back.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), ref.parameters()))
    assert len(mine.all_weights) == 4 and mine.all_weights[1][0] is mine.weight_ih_l0_reverse


def test_unsupported_options_raise():
    with pytest.raises(NotImplementedError, match="proj_size"):
        rkt.LSTM(3, 4, proj_size=2)
    for cls in (rkt.LSTM, rkt.GRU, rkt.RNN):
        with pytest.raises(NotImplementedError, match="bias=False"):
            cls(3, 4, bias=False)
    with pytest.raises(ValueError, match="hidden_size"):
        rkt.GRU(3, 0)
    with pytest.raises(TypeError, match="input_size"):
        rkt.GRU(3.0, 4)
    with pytest.raises(ValueError, match="dropout"):
        rkt.LSTM(3, 4, 2, dropout=1.5)
    with pytest.raises(ValueError, match="nonlinearity"):
        rkt.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        rkt.LSTM(3, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="backend must be one of"):
        rkt.LSTM(3, 4, backend="fortran")


def test_bad_input_raises_naming_the_argument():
    m = rkt.LSTM(3, 4, 2)
    with pytest.raises(ValueError, match="2D or 3D"):
        m(torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="input_size. Expected 3, got 5"):
        m(torch.zeros(2, 2, 5))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.zeros(2, 2, 3, dtype=F64))
    with pytest.raises(TypeError, match="tuple"):
        m(torch.zeros(2, 2, 3), torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"hx\[1\] \(c_0\) size \(2, 2, 4\)"):
        m(torch.zeros(2, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(TypeError, match="one tensor"):
        rkt.GRU(3, 4)(torch.zeros(2, 2, 3), (torch.zeros(1, 2, 4),))
    with pytest.raises(ValueError, match="unbatched 2-D input, hx should also be 2-D"):
        rkt.GRU(3, 4)(torch.zeros(2, 3), torch.zeros(1, 1, 4))
    with pytest.raises(ValueError, match="backend 'cuda' cannot run input on cpu"):
        rkt.RNN(3, 4, backend="cuda")(torch.zeros(2, 1, 3))


# ---------------------------------------------------------------------- parity with torch.nn

GRID = list(itertools.product(CELLS, [False, True], [1, 2], [False, True], [False, True]))


@pytest.mark.parametrize("case", range(len(GRID)))
def test_parity_with_torch_nn(case):
    """Every cell x bidirectional x 1-2 layers x batch_first x hx given, the shapes cycling
    through the awkward ones (T=1, B=1, H=1)."""
    (name, nn_name, kw), bidirectional, L, batch_first, with_hx = GRID[case]
    T, B, I, H = SHAPES[case % len(SHAPES)]
    D = 2 if bidirectional else 1
    ref, ours = pair(nn_name, I, H, L, seed=case, batch_first=batch_first,
                     bidirectional=bidirectional, **kw)
    gen = torch.Generator().manual_seed(100 + case)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=F64, generator=gen,
                    requires_grad=True)
    hx = initial_state(nn_name, D, L, B, H, gen) if with_hx else None
    assert_parity(ref, ours, x, x, hx, hx, seed=case)


@pytest.mark.parametrize("name,nn_name,kw", CELLS[:3])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence_parity(name, nn_name, kw, bidirectional, enforce_sorted):
    L, I, H, D = 2, 3, 4, 2 if bidirectional else 1
    lengths = [5, 4, 2, 1] if enforce_sorted else [2, 5, 1, 4]
    ref, ours = pair(nn_name, I, H, L, bidirectional=bidirectional, **kw)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 4, I, dtype=F64, generator=gen)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
    packed.data.requires_grad_(True)
    hx = initial_state(nn_name, D, L, 4, H, gen)
    out_ref, _ = ref(packed, hx)
    out_ours, _ = ours(packed, hx)
    assert type(out_ours) is torch.nn.utils.rnn.PackedSequence
    assert torch.equal(out_ours.batch_sizes, out_ref.batch_sizes)
    for attr in ("sorted_indices", "unsorted_indices"):
        a, b = getattr(out_ours, attr), getattr(out_ref, attr)
        assert (a is None and b is None) or torch.equal(a, b), attr
    assert_parity(ref, ours, packed, packed, hx, hx)


@pytest.mark.parametrize("backend", ["numpy", "numba", "cpp"])
@pytest.mark.parametrize("nn_name", ["LSTM", "GRU"])
def test_every_cpu_backend(backend, nn_name):
    import rnnkern as rk
    ok, reason = rk.available_backends()[backend]
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")
    torch.manual_seed(0)
    ref = getattr(torch.nn, nn_name)(3, 4, 2, bidirectional=True, dtype=F64)
    ours = getattr(rkt, nn_name)(3, 4, 2, bidirectional=True, dtype=F64, backend=backend)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 3, dtype=F64)
    packed = pack_padded_sequence(x, torch.tensor([3, 5, 2]), enforce_sorted=False)
    packed.data.requires_grad_(True)
    assert_parity(ref, ours, packed, packed, None, None)


@pytest.mark.parametrize("name,nn_name,kw", CELLS[:3])
def test_unbatched_input(name, nn_name, kw):
    ref, ours = pair(nn_name, 3, 4, 2, bidirectional=True, **kw)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, dtype=F64, generator=gen, requires_grad=True)
    hx = initial_state(nn_name, 2, 2, 1, 4, gen, unbatched=True)
    assert_parity(ref, ours, x, x, hx, hx)
    assert_parity(ref, ours, x, x, None, None)


@pytest.mark.parametrize("name,nn_name,kw", CELLS[:3])
def test_dropout_follows_torch_rng_and_training_mode(name, nn_name, kw):
    """Training: torch.manual_seed gives torch.nn's own masks (same outputs and gradients,
    padded and packed); eval: no dropout; the masks change from call to call."""
    ref, ours = pair(nn_name, 3, 5, 3, dropout=0.4, bidirectional=True, **kw)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 2, 3, dtype=F64, generator=gen, requires_grad=True)
    torch.manual_seed(11)
    gen_w = torch.Generator().manual_seed(5)
    w = [torch.randn(4096, dtype=F64, generator=gen_w) for _ in range(3)]
    o1, s1, gi1, gp1 = run_and_grad(ref, x, None, w)
    torch.manual_seed(11)
    o2, s2, gi2, gp2 = run_and_grad(ours, x, None, w)
    close(o2, o1, "output with dropout")
    for a, b in zip(gi2 + gp2, gi1 + gp1):
        close(a, b, "gradient with dropout")
    packed = pack_padded_sequence(x.detach(), torch.tensor([4, 6]), enforce_sorted=False)
    torch.manual_seed(12)
    p1 = ref(packed)[0].data
    torch.manual_seed(12)
    close(ours(packed)[0].data, p1, "packed output with dropout")
    assert not torch.equal(ours(x)[0], ours(x)[0])          # fresh masks each call
    ref.eval(), ours.eval()
    close(ours(x)[0], ref(x)[0], "eval output")
    assert torch.equal(ours(x)[0], ours(x)[0])


def test_module_conversions_and_float32():
    """.double()/.float() move the parameters; float32 agrees with torch.nn to float32
    accuracy."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(4, 8, 2, batch_first=True)
    ours = rkt.LSTM(4, 8, 2, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 4)
    np.testing.assert_allclose(ours(x)[0].detach().numpy(), ref(x)[0].detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    ours.double()
    assert ours.weight_hh_l1.dtype == F64 and ours(x.double())[0].dtype == F64


# ---------------------------------------------------------------------- autograd

@pytest.mark.parametrize("name,nn_name,kw", CELLS)
def test_gradcheck(name, nn_name, kw):
    """torch.autograd.gradcheck of the autograd function: x, h0 (c0) and every weight of a
    2-layer bidirectional stack with lengths and a dropout mask."""
    m = getattr(rkt, nn_name)(2, 3, 2, bidirectional=True, dtype=F64, **kw)
    cfg = m._stack_config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 2, dtype=F64, generator=gen, requires_grad=True)
    h0 = torch.randn(4, 2, 3, dtype=F64, generator=gen, requires_grad=True)
    c0 = torch.randn(4, 2, 3, dtype=F64, generator=gen, requires_grad=True) \
        if nn_name == "LSTM" else None
    mask = [(torch.rand(2, 4, 6, generator=gen, dtype=F64) > 0.3).to(F64) / 0.7]
    lengths = torch.tensor([4, 2])
    weights = [w.detach().clone().requires_grad_(True) for w in m._weights()]

    def f(x, h0, c0, *weights):
        return function.RecurrentStackFunction.apply(cfg, x, h0, c0, lengths, mask, *weights)
    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights), eps=1e-6, atol=1e-7)


def test_two_forwards_then_two_backwards():
    """Each graph keeps its own saved activations: backwards in either order, interleaved
    with the forwards, give each forward's own gradients."""
    ref, ours = pair("LSTM", 3, 4, 2, bidirectional=True)
    gen = torch.Generator().manual_seed(9)
    xs = [torch.randn(5, 2, 3, dtype=F64, generator=gen, requires_grad=True) for _ in range(2)]
    outs = [ours(x)[0] for x in xs]
    outs[1].sum().backward()
    g1 = xs[1].grad.clone()
    outs[0].pow(2).sum().backward()
    ref_outs = [ref(x)[0] for x in xs]
    expected = torch.autograd.grad(ref_outs[0].pow(2).sum(), xs[0])[0]
    close(xs[0].grad, expected, "first forward's dx")
    close(g1, torch.autograd.grad(ref_outs[1].sum(), xs[1])[0], "second forward's dx")


def test_retain_graph_backward_twice_accumulates():
    _, ours = pair("GRU", 3, 4, 2)
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    out = ours(x)[0].sum()
    out.backward(retain_graph=True)
    first = x.grad.clone()
    out.backward()
    close(x.grad, 2 * first, "dx after two backwards")


def test_double_backward_raises():
    _, ours = pair("LSTM", 3, 4)
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    out, (h, c) = ours(x)
    dx, dw = torch.autograd.grad(out.sum() + h.sum(), [x, ours.weight_hh_l0], create_graph=True)
    for first in (dx, dw):
        with pytest.raises(RuntimeError, match="gradient of a gradient.*not supported"):
            first.pow(2).sum().backward(retain_graph=True)


def test_custom_op_autograd_and_double_backward_error():
    """The operator torch.compile records: schema, fake tensors and autograd registration
    (opcheck), the same gradients as the eager function, and its own double-backward error."""
    m = rkt.LSTM(2, 3, 2, bidirectional=True, dtype=F64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 2, dtype=F64, generator=gen, requires_grad=True)
    h0 = torch.randn(4, 2, 3, dtype=F64, generator=gen, requires_grad=True)
    c0 = torch.randn(4, 2, 3, dtype=F64, generator=gen, requires_grad=True)
    mask = [torch.full((2, 4, 6), 2.0, dtype=F64)]
    lengths = torch.tensor([4, 3])
    args = (x, h0, c0, lengths, mask, m._weights(), "lstm", "tanh", 2, True, "auto")
    torch.library.opcheck(function.recurrent_stack_op, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    out, h_n, c_n, _ = function.recurrent_stack_op(*args)
    grads = torch.autograd.grad((out.sum() + h_n.sum() + c_n.pow(2).sum()),
                                [x, h0, c0, *m.parameters()], create_graph=True)
    eager = function.RecurrentStackFunction.apply(m._stack_config, x, h0, c0, lengths, mask,
                                                  *m._weights())
    expected = torch.autograd.grad(eager[0].sum() + eager[1].sum() + eager[2].pow(2).sum(),
                                   [x, h0, c0, *m.parameters()])
    for a, b in zip(grads, expected):
        close(a, b, "custom op gradient")
    with pytest.raises(RuntimeError, match="double backward"):
        grads[0].sum().backward()


def test_torch_compile_runs_without_graph_break():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rkt.GRU(3, 4, 2, batch_first=True, bidirectional=True, dtype=F64)
            self.fc = torch.nn.Linear(8, 2, dtype=F64)

        def forward(self, x):
            out, h = self.rnn(x)
            return self.fc(out).pow(2).mean() + h.sum()

    model = Model()
    x = torch.randn(2, 5, 3, dtype=F64)
    explain = torch._dynamo.explain(model)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected_loss = model(x)
    expected_loss.backward()
    close(loss, expected_loss, "compiled loss")
    for a, p in zip(got, model.parameters()):
        close(a, p.grad, "compiled gradient")
    # an LSTM given its initial state: the state's gradients come through the operator too
    ref, lstm = pair("LSTM", 3, 4, 2)
    h0, c0 = (torch.randn(2, 2, 4, dtype=F64, requires_grad=True) for _ in range(2))
    run = torch.compile(lambda x, h, c: lstm(x, (h, c))[1][1].sum(), backend="aot_eager")
    grads = torch.autograd.grad(run(x.transpose(0, 1), h0, c0), [h0, c0, lstm.weight_hh_l1])
    expected = torch.autograd.grad(ref(x.transpose(0, 1), (h0, c0))[1][1].sum(),
                                   [h0, c0, ref.weight_hh_l1])
    for a, b in zip(grads, expected):
        close(a, b, "compiled LSTM state gradient")
    del loss, compiled, run
    torch._dynamo.reset()
    gc.collect()
    assert not function._RECORDS   # each saved record went with its graph


# ---------------------------------------------------------------------- crossing

def test_cpu_tensors_cross_without_copies(monkeypatch):
    t = torch.randn(3, 4, 5)
    a = crossing.to_array(t)
    assert a.ctypes.data == t.data_ptr()
    back = crossing.to_tensor(a)
    assert back.data_ptr() == a.ctypes.data
    seen = {}
    real = stack.forward

    def spy(cfg, x, h0, c0, lengths, weights, masks=None, backend=None):
        seen["x"], seen["w"] = x.ctypes.data, [w.ctypes.data for w in weights]
        return real(cfg, x, h0, c0, lengths, weights, masks, backend)
    monkeypatch.setattr(stack, "forward", spy)
    m = rkt.LSTM(5, 4, batch_first=True)
    m(t)
    assert seen["x"] == t.data_ptr()
    assert seen["w"] == [p.data_ptr() for p in m.parameters()]


@pytest.mark.parametrize("torch_threads", [1, 2])
def test_split_threshold_raised_only_while_torch_has_workers(monkeypatch, torch_threads):
    from rnnkern.backends import cpp
    from rnnkern.torch import threads
    if not cpp.available()[0]:
        pytest.skip(f"cpp backend unavailable: {cpp.available()[1]}")
    before = cpp._C.split_min_work()
    seen = []
    real_forward, real_backward = cpp.forward, cpp.backward
    monkeypatch.setattr(cpp, "forward",
                        lambda *a: seen.append(cpp._C.split_min_work()) or real_forward(*a))
    monkeypatch.setattr(cpp, "backward",
                        lambda *a: seen.append(cpp._C.split_min_work()) or real_backward(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: torch_threads)
    m = rkt.GRU(3, 4, 2, backend="cpp")
    m(torch.randn(4, 2, 3))[0].sum().backward()
    expected = max(before, threads.TORCH_SPLIT_MIN_WORK) if torch_threads > 1 else before
    assert seen == [expected] * 4
    assert cpp._C.split_min_work() == before   # restored


@pytest.mark.gpu
def test_cuda_tensors_run_on_the_cuda_backend():
    from rnnkern.backends import cuda
    ok, reason = cuda.available()
    if not ok:
        pytest.skip(f"cuda backend unavailable: {reason}")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    ref, ours = pair("LSTM", 3, 4, 2, bidirectional=True)
    gpu = copy.deepcopy(ours).cuda()
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    xg = x.detach().cuda().requires_grad_(True)
    out, (h, c) = gpu(xg)
    (out.sum() + h.sum() + c.sum()).backward()
    out_c, (h_c, c_c) = ours(x)
    (out_c.sum() + h_c.sum() + c_c.sum()).backward()
    close(out.cpu(), out_c, "cuda output")
    close(xg.grad.cpu(), x.grad, "cuda dx")
    for p, q in zip(gpu.parameters(), ours.parameters()):
        close(p.grad.cpu(), q.grad, "cuda parameter gradient")


# ---------------------------------------------------------------------- convert / revert

class Shifted(torch.nn.LSTM):
    """A subclass with its own behaviour: convert must leave it alone."""


def nested_model():
    torch.manual_seed(0)
    shared = torch.nn.GRU(4, 4, dtype=F64)
    return torch.nn.ModuleDict({
        "encoder": torch.nn.Sequential(torch.nn.Linear(3, 4, dtype=F64),
                                       torch.nn.LSTM(4, 4, 2, bidirectional=True, dtype=F64)),
        "blocks": torch.nn.ModuleList([shared, torch.nn.RNN(4, 4, nonlinearity="relu",
                                                            dtype=F64), shared]),
        "custom": Shifted(4, 4, dtype=F64),
    })


def test_convert_and_revert_keep_the_parameters():
    model = nested_model()
    params = dict(model.named_parameters())
    x = torch.randn(5, 2, 4, dtype=F64)
    expected = [model["blocks"][i](x)[0] for i in range(2)] + [model["encoder"][1](x)[0]]
    assert rkt.convert(model) is model
    assert type(model["encoder"][1]) is rkt.LSTM and type(model["blocks"][1]) is rkt.RNN
    assert model["blocks"][0] is model["blocks"][2] and type(model["blocks"][0]) is rkt.GRU
    assert model["blocks"][1].nonlinearity == "relu" and model["encoder"][1].bidirectional
    assert type(model["custom"]) is Shifted
    assert all(p is params[n] for n, p in model.named_parameters())   # the same objects
    got = [model["blocks"][i](x)[0] for i in range(2)] + [model["encoder"][1](x)[0]]
    for a, b in zip(got, expected):
        close(a, b, "converted output")
    rkt.revert(model)
    assert type(model["encoder"][1]) is torch.nn.LSTM and type(model["blocks"][0]) is torch.nn.GRU
    assert all(p is params[n] for n, p in model.named_parameters())
    close(model["encoder"][1](x)[0], expected[2], "reverted output")
    lone = torch.nn.LSTM(3, 4)
    twin = rkt.convert(lone)
    assert type(twin) is rkt.LSTM and twin.weight_ih_l0 is lone.weight_ih_l0
    assert type(rkt.revert(twin)) is torch.nn.LSTM


def test_convert_refuses_what_it_cannot_run():
    model = torch.nn.Sequential(torch.nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(NotImplementedError, match=r"model\.0 \(LSTM\).*proj_size"):
        rkt.convert(model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        rkt.convert("model")


class TinyLM(torch.nn.Module):
    def __init__(self, V=7, E=5, H=6, dtype=F64):
        super().__init__()
        self.embed = torch.nn.Embedding(V, E, dtype=dtype)
        self.rnn = torch.nn.LSTM(E, H, 2, batch_first=True, dtype=dtype)
        self.fc = torch.nn.Linear(H, V, dtype=dtype)

    def forward(self, ids):
        return self.fc(self.rnn(self.embed(ids))[0])


def train(model, batches, steps=6):
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for k in range(steps):
        x, y = batches[k % len(batches)]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, 7), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_converted_model_follows_the_loss_curve_under_adam():
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 7, (4, 6), generator=gen),
                torch.randint(0, 7, (4, 6), generator=gen)) for _ in range(3)]
    torch.manual_seed(0)
    original = TinyLM()
    converted = rkt.convert(copy.deepcopy(original))
    expected, got = train(original, batches), train(converted, batches)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    assert expected[-1] < expected[0]
    for (n, a), b in zip(original.named_parameters(), converted.parameters()):
        close(b, a, f"trained {n}")


# ---------------------------------------------------------------------- DistributedDataParallel

DDP_STEPS = 3


def _ddp_batch():
    gen = torch.Generator().manual_seed(1)
    return (torch.randint(0, 7, (4, 6), generator=gen), torch.randint(0, 7, (4, 6), generator=gen))


def _ddp_worker(rank, out_dir):
    """One of two gloo ranks: the converted TinyLM under DDP, each on half the batch. They meet
    through a file store in ``out_dir`` (a free TCP port found beforehand can be taken by
    another process before the ranks bind it)."""
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}",
                            rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(rkt.convert(TinyLM()))
        x, y = _ddp_batch()
        half = slice(2 * rank, 2 * rank + 2)
        train(model, [(x[half], y[half])], steps=DDP_STEPS)
        if rank == 0:
            torch.save(model.module.state_dict(), os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_matches_one_process(tmp_path):
    torch.multiprocessing.start_processes(_ddp_worker, args=(str(tmp_path),),
                                          nprocs=2, join=True, start_method="spawn")
    torch.manual_seed(0)
    single = rkt.convert(TinyLM())
    train(single, [_ddp_batch()], steps=DDP_STEPS)   # mean loss = the mean of the halves' means
    got = torch.load(tmp_path / "ddp.pt")
    for n, p in single.state_dict().items():
        close(got[n], p, f"DDP-trained {n}")
