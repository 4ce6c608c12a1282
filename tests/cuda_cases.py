"""The CUDA backend's parity sweep against :mod:`rnnkern.reference`, shared by the GPU tests
(``test_cuda.py``, CuPy arrays) and the emulated CPU tests (``test_cuda_emulated.py``).

Shape legend: B batch, T time steps, I input, H hidden, G gates.
"""
import numpy as np

from rnnkern import reference
from rnnkern.cellspec import CellSpec

SPECS = {
    "rnn-tanh": CellSpec("rnn"),
    "rnn-relu": CellSpec("rnn", nonlinearity="relu"),
    "lstm-fb0": CellSpec("lstm", forget_bias=0.0),
    "lstm-fb1": CellSpec("lstm", forget_bias=1.0),
    "gru-after": CellSpec("gru", reset_after=True),
    "gru-before": CellSpec("gru", reset_after=False),
}

# id: (B, T, I, H, lengths, random initial state and incoming state grads)
SHAPES = {
    "T1-B1-H1": (1, 1, 1, 1, None, True),
    "odd-lengths": (3, 5, 4, 7, [5, 0, 3], True),       # lengths include 0 and T
    "H1-lengths": (2, 4, 3, 1, [4, 1], False),
    "all-zero-lengths": (2, 3, 2, 3, [0, 0], True),
    "B5-odd": (5, 6, 3, 9, None, False),                 # no d_h_n/d_c_n, zero initial state
    "T0": (2, 0, 3, 4, None, True),
    "B0": (0, 3, 3, 4, None, True),
}

TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=1e-4, atol=1e-5)}


def make_case(spec, shape, dtype, seed=0, wscale=0.6):
    """Inputs (NumPy) for forward and backward: (fwd_args, bwd_args); weights U(-wscale, wscale)."""
    B, T, I, H, lengths, with_state = shape
    G = spec.gates
    rng = np.random.default_rng(seed)

    def u(*s, scale=wscale):
        return rng.uniform(-scale, scale, s).astype(dtype)

    lstm = spec.kind == "lstm"
    h0 = u(B, H, scale=1.0) if with_state else np.zeros((B, H), dtype)
    c0 = (u(B, H, scale=1.0) if with_state else np.zeros((B, H), dtype)) if lstm else None
    fwd = (u(B, T, I, scale=1.0), u(G * H, I), u(G * H, H), u(G * H), u(G * H), h0, c0,
           None if lengths is None else np.asarray(lengths, dtype=np.int64))
    d_out = u(B, T, H, scale=1.0)
    d_h = u(B, H, scale=1.0) if with_state else None
    d_c = (u(B, H, scale=1.0) if with_state else None) if lstm else None
    return fwd, (d_out, d_h, d_c)


def host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a


def check_against_reference(backend, spec, shape, dtype, to_device=lambda a: a, wscale=0.6,
                            backend_lengths=None, seed=0):
    """Run forward and backward on ``backend`` and on the reference; assert all results agree.
    ``to_device`` moves every array (lengths too) where the backend wants it, as the layer does;
    ``backend_lengths``: lengths the backend gets instead of the shape's (the reference keeps
    those), say out-of-range values that must act as the shape's; ``seed``: of the inputs."""
    fwd, bwd = make_case(spec, shape, dtype, seed=seed, wscale=wscale)
    ref_out = reference.forward(spec, *fwd)
    if backend_lengths is not None:
        fwd = fwd[:-1] + (np.asarray(backend_lengths, dtype=np.int64),)
    dev = [None if a is None else to_device(a) for a in fwd]
    out = backend.forward(spec, *dev)
    ref_b = reference.backward(spec, ref_out[3], *bwd)
    got_b = backend.backward(spec, out[3], *[None if a is None else to_device(a) for a in bwd])
    tol = TOL[dtype]
    pairs = dict(outputs=(out[0], ref_out[0]), h_n=(out[1], ref_out[1]), c_n=(out[2], ref_out[2]),
                 dx=(got_b[0], ref_b[0]), dh0=(got_b[1], ref_b[1]), dc0=(got_b[2], ref_b[2]))
    pairs.update({f"d{k}": (got_b[3][k], ref_b[3][k]) for k in ref_b[3]})
    for what, (mine, ref) in pairs.items():
        if ref is None:
            assert mine is None, what
            continue
        mine = host(mine)
        assert mine.dtype == dtype and mine.shape == ref.shape, what
        np.testing.assert_allclose(mine, ref, err_msg=what, **tol)
    return out, got_b


def check_graph_reuse(backend, spec, shape, dtype, to_device=lambda a: a, wscale=0.6):
    """The stepwise strategy's CUDA graphs (``rnnkern.backends.cuda.graphs``) against the
    reference, with new inputs and weights at every call of one shape: eager, captured, then
    replayed; two forwards before their two backwards (the second runs on a second instance);
    a record backpropagated twice (``retain_graph``); a forward without a backward. At the end
    every result handed out is checked again: none may alias a buffer a later call reused.
    Returns each forward's graph instance (its record's ``"instance"``: None when eager), in
    order; the records themselves are dropped as a training loop drops them."""
    tol = TOL[dtype]
    records, results = [], []  # results: (what, mine, reference)

    def check(what, mine, want):
        results.append((what, mine, want))
        if want is None:
            assert mine is None, what
        else:
            np.testing.assert_allclose(host(mine), want, err_msg=what, **tol)

    def run(seed):
        fwd, bwd = make_case(spec, shape, dtype, seed=seed, wscale=wscale)
        out = backend.forward(spec, *[None if a is None else to_device(a) for a in fwd])
        records.append(out[3]["instance"])
        ref = reference.forward(spec, *fwd)
        for what, mine, want in zip(("outputs", "h_n", "c_n"), out[:3], ref[:3]):
            check(f"seed {seed}: {what}", mine, want)
        return seed, out, ref, bwd

    def back(seed, out, ref, bwd):
        got = backend.backward(spec, out[3], *[None if a is None else to_device(a) for a in bwd])
        want = reference.backward(spec, ref[3], *bwd)
        for what, mine, ref_grad in zip(("dx", "dh0", "dc0"), got[:3], want[:3]):
            check(f"seed {seed}: {what}", mine, ref_grad)
        for k in want[3]:
            check(f"seed {seed}: d{k}", got[3][k], want[3][k])

    for seed in range(3):                       # eager, captured, replayed
        back(*run(seed))
    first, second = run(10), run(11)            # both alive at once
    back(*second)
    back(*first)
    del first, second
    again = run(12)
    back(*again)
    back(*again)
    del again
    run(13)
    back(*run(14))
    for what, mine, want in results:
        if want is not None:
            np.testing.assert_allclose(host(mine), want, err_msg=f"afterwards, {what}", **tol)
    return records
