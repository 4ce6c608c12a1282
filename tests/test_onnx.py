"""rnnkern.onnx (issue 21, part 2): exported models run in onnxruntime and give what
``model.forward`` gives (eval mode), for every supported layer and option, float32 and
float64, with and without lengths and initial states, T = 0 and B = 0 included.

float32 models export ONNX's LSTM/GRU/RNN operators; float64 ones a Scan over the cell
(onnxruntime has no float64 kernel for the operators), and the Scan form is also checked in
float32. Skips when onnx or onnxruntime is not installed (``pip install 'rnnkern[onnx]'``).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx is not installed: pip install 'rnnkern[onnx]'")
ort = pytest.importorskip("onnxruntime",
                          reason="onnxruntime is not installed: pip install 'rnnkern[onnx]'")

import rnnkern as rk                       # noqa: E402
import rnnkern.onnx as ro                  # noqa: E402
from rnnkern.__main__ import main as cli   # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = {"float32": 1e-5, "float64": 1e-12}

CELLS = {
    "lstm": lambda I, H, **kw: rk.LSTM(I, H, forget_bias=0.0, **kw),
    "lstm-forget-bias": lambda I, H, **kw: rk.LSTM(I, H, forget_bias=1.0, **kw),
    "gru": lambda I, H, **kw: rk.GRU(I, H, reset_after=True, **kw),
    "gru-reset-before": lambda I, H, **kw: rk.GRU(I, H, reset_after=False, **kw),
    "rnn-tanh": lambda I, H, **kw: rk.RNN(I, H, nonlinearity="tanh", **kw),
    "rnn-relu": lambda I, H, **kw: rk.RNN(I, H, nonlinearity="relu", **kw),
}


def session(proto):
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def flat(state):
    """The arrays of a Sequential state tuple, in the graph's output order."""
    out = []
    for entry in state:
        if entry is not None:
            out += list(entry) if isinstance(entry, tuple) else [entry]
    return out


def check(model, sess, x, *, lengths=None, state=None, with_state=False, dtype="float32"):
    """Run ``sess`` and ``model.forward`` on the same input; assert they agree."""
    outs = sess.run(None, ro.feeds(model, x, lengths=lengths, initial_state=state,
                                   with_state=with_state))
    y, final = model.forward(x, state, lengths, return_state=True)
    got, want = [outs[0]], [y]
    if with_state:
        got += flat(ro.unpack_state(model, outs))
        want += flat(final)
    for name, a, b in zip(ro.output_names(model, with_state=with_state), got, want,
                          strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape, a.dtype)
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL[dtype], err_msg=name)


def random_state(model, B, rng, dtype):
    state = []
    for layer in model.layers:
        if not isinstance(layer, (rk.LSTM, rk.GRU, rk.RNN)):
            state.append(None)
            continue
        shape = (layer.num_directions * layer.num_layers, B, layer.hidden_size)
        parts = [rng.standard_normal(shape).astype(dtype) * 0.5
                 for _ in range(2 if isinstance(layer, rk.LSTM) else 1)]
        state.append(tuple(parts) if len(parts) == 2 else parts[0])
    return tuple(state)


def recurrent_model(cell, dtype, bidirectional, head="dense"):
    """Embedding(7,5) -> a 2-layer cell -> Dropout -> Dense(.,3) (or LastStep -> Dense)."""
    rnn = CELLS[cell](5, 4, num_layers=2, bidirectional=bidirectional, dtype=dtype, seed=1)
    tail = [rk.Dropout(0.5, seed=3)] + ([rk.LastStep()] if head == "last" else [])
    return rk.Sequential([rk.Embedding(7, 5, dtype=dtype, seed=0), rnn, *tail,
                          rk.Dense(rnn.output_size, 3, dtype=dtype, seed=2)]).eval()


LENGTHS = np.array([6, 0, 3, 1, 6])   # full, empty, inside; B = 5, T = 6


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_recurrent_layers_match_forward(cell, dtype, bidirectional):
    rng = np.random.default_rng(0)
    model = recurrent_model(cell, dtype, bidirectional)
    ids = rng.integers(0, 7, (5, 6))
    state = random_state(model, 5, rng, dtype)
    plain = session(ro.build_model(model))
    full = session(ro.build_model(model, with_lengths=True, with_state=True))
    check(model, plain, ids, dtype=dtype)
    for lengths in (LENGTHS, np.full(5, 6)):
        for s in (None, state):
            check(model, full, ids, lengths=lengths, state=s, with_state=True, dtype=dtype)
    # T = 0: outputs [B,0,3] and the initial state; B = 0: empty everything
    check(model, full, ids[:, :0], lengths=np.zeros(5, np.int64), state=state,
          with_state=True, dtype=dtype)
    check(model, plain, ids[:, :0], dtype=dtype)
    check(model, full, ids[:0], lengths=np.zeros(0, np.int64),
          state=random_state(model, 0, rng, dtype), with_state=True, dtype=dtype)


@pytest.mark.parametrize("cell", list(CELLS))
def test_scan_form_in_float32_matches_forward(cell):
    """The Scan form (float64's) checked against float32 models too, beside the operators."""
    rng = np.random.default_rng(1)
    model = recurrent_model(cell, "float32", True)
    ids = rng.integers(0, 7, (5, 6))
    sess = session(ro.build_model(model, with_lengths=True, with_state=True,
                                  recurrent_form="scan"))
    for s in (None, random_state(model, 5, rng, "float32")):
        check(model, sess, ids, lengths=LENGTHS, state=s, with_state=True)


def test_float64_operator_form_is_valid_onnx():
    """ONNX's operators take float64 (onnx.checker passes); onnxruntime 1.32 has no float64
    kernel for them, which is why export writes the Scan form for float64: with it, the run
    must fail for that reason (a runtime that has the kernel gets its output compared)."""
    model = recurrent_model("lstm-forget-bias", "float64", True)
    proto = ro.build_model(model, recurrent_form="operator")
    assert {n.op_type for n in proto.graph.node} >= {"LSTM"}
    onnx.checker.check_model(proto, full_check=True)
    ids = np.random.default_rng(2).integers(0, 7, (3, 4))
    try:
        sess = session(proto)
        outs = sess.run(None, ro.feeds(model, ids))
    except Exception as exc:    # onnxruntime: "LSTM operator does not support double yet"
        assert "double" in str(exc), exc
        return
    np.testing.assert_allclose(outs[0], model.forward(ids), atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_one_hot_last_step_and_float_inputs(dtype):
    rng = np.random.default_rng(3)
    one_hot = rk.Sequential([rk.OneHot(6, dtype=dtype), rk.GRU(6, 5, dtype=dtype, seed=0),
                             rk.Dropout(0.3), rk.LastStep(),
                             rk.Dense(5, 2, bias=False, dtype=dtype, seed=1)]).eval()
    floats = rk.Sequential([rk.LSTM(3, 4, bidirectional=True, dtype=dtype, seed=0),
                            rk.Dense(8, 2, dtype=dtype, seed=1), rk.LastStep()]).eval()
    last = recurrent_model("lstm-forget-bias", dtype, False, head="last")
    cases = [(one_hot, rng.integers(0, 6, (4, 5))),
             (floats, rng.standard_normal((4, 5, 3)).astype(dtype)),
             (last, rng.integers(0, 7, (4, 5)))]
    lengths = np.array([5, 0, 2, 1])
    for model, x in cases:
        plain = session(ro.build_model(model))
        with_lengths = session(ro.build_model(model, with_lengths=True))
        check(model, plain, x, dtype=dtype)
        check(model, with_lengths, x, lengths=lengths, dtype=dtype)
        check(model, plain, x[:, :0], dtype=dtype)            # LastStep at T = 0: zeros
        check(model, with_lengths, x[:0], lengths=lengths[:0], dtype=dtype)
    assert session(ro.build_model(floats)).get_inputs()[0].type == (
        "tensor(float)" if dtype == "float32" else "tensor(double)")


def test_mixed_dtypes_cast_between_layers():
    model = rk.Sequential([rk.Embedding(6, 3, seed=0), rk.LSTM(3, 4, dtype="float64", seed=1),
                           rk.Dense(4, 2, seed=2)]).eval()
    sess = session(ro.build_model(model, with_lengths=True, with_state=True))
    check(model, sess, np.random.default_rng(4).integers(0, 6, (4, 5)),
          lengths=np.array([5, 0, 2, 1]), with_state=True)


def test_step_by_step_with_state_is_the_whole_sequence():
    """Sampling's use: one step at a time, the state carried through the graph's outputs."""
    model = rk.Sequential([rk.Embedding(7, 5, seed=0), rk.LSTM(5, 4, num_layers=2, seed=1),
                           rk.Dense(4, 7, seed=2)]).eval()
    sess = session(ro.build_model(model, with_state=True))
    ids = np.random.default_rng(5).integers(0, 7, (2, 6))
    state, steps = None, []
    for t in range(ids.shape[1]):
        outs = sess.run(None, ro.feeds(model, ids[:, t:t + 1], initial_state=state,
                                       with_state=True))
        steps.append(outs[0])
        state = ro.unpack_state(model, outs)
    y, final = model.forward(ids, return_state=True)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), y, atol=1e-5)
    for a, b in zip(flat(state), flat(final)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_graph_signature_file_and_checker(tmp_path):
    model = recurrent_model("gru", "float32", True)
    path = tmp_path / "sub" / "model.onnx"
    returned = ro.export(model, path, with_lengths=True, with_state=True)
    proto = onnx.load(path)
    assert proto == returned
    onnx.checker.check_model(proto, full_check=True)
    onnx.checker.check_model(str(path))
    assert proto.opset_import[0].version == 17

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    ins = {v.name: dims(v) for v in proto.graph.input}
    outs = {v.name: dims(v) for v in proto.graph.output}
    assert [v.name for v in proto.graph.input] == ro.input_names(
        model, with_lengths=True, with_state=True) == ["input", "lengths", "initial_h.1"]
    assert [v.name for v in proto.graph.output] == ["output", "final_h.1"]
    assert ins == {"input": ["batch", "time"], "lengths": ["batch"],
                   "initial_h.1": [4, "batch", 4]}
    assert outs == {"output": ["batch", "time", 3], "final_h.1": [4, "batch", 4]}
    lstm = rk.Sequential([rk.LSTM(3, 4, seed=0)])
    assert ro.input_names(lstm, with_state=True) == ["input", "initial_h.0", "initial_c.0"]
    assert ro.output_names(lstm, with_state=True) == ["output", "final_h.0", "final_c.0"]
    # the operators: one node per layer, both directions in it, TF1's convention on the GRU
    gru = rk.Sequential([rk.GRU(3, 4, num_layers=2, reset_after=False, seed=0)])
    nodes = [n for n in ro.build_model(gru).graph.node if n.op_type == "GRU"]
    assert len(nodes) == 2 and all(
        onnx.helper.get_attribute_value(a) == 0 for n in nodes for a in n.attribute
        if a.name == "linear_before_reset")


@pytest.mark.parametrize("opset", [14, 17, 21])
def test_opsets(opset):
    model = recurrent_model("lstm-forget-bias", "float32", True)
    proto = ro.build_model(model, with_lengths=True, opset=opset)
    assert proto.opset_import[0].version == opset
    check(model, session(proto), np.random.default_rng(6).integers(0, 7, (5, 6)),
          lengths=LENGTHS)
    newest = onnx.defs.onnx_opset_version()
    onnx.checker.check_model(ro.build_model(model, opset=newest), full_check=True)
    for bad in (13, newest + 1, "17", True):
        with pytest.raises(ro.ExportError, match="opset must be an integer"):
            ro.build_model(model, opset=bad)


class Doubler:
    """A user layer: Sequential runs it, export cannot know what it computes."""

    def __init__(self):
        self.params, self.grads = {}, {}

    def forward(self, x, lengths=None):
        return 2 * x

    def backward(self, dy):
        return 2 * dy

    def train(self, mode=True):
        return self


class MyDense(rk.Dense):
    pass


def test_unsupported_layers_and_models_are_named():
    emb, lstm, fc = rk.Embedding(5, 3, seed=0), rk.LSTM(3, 4, seed=0), rk.Dense(4, 2, seed=0)
    cases = [
        (rk.Sequential([emb, lstm, Doubler(), fc]), r"layers\[2\] \(Doubler\)"),
        (rk.Sequential([emb, lstm, Doubler(), MyDense(4, 2)]),
         r"layers\[2\] \(Doubler\), layers\[3\] \(MyDense\)"),
        (rk.Sequential([lstm, rk.Embedding(4, 3)]), r"layers\[1\] \(Embedding\).*first layer"),
        (rk.Sequential([emb, lstm, rk.LastStep(), rk.GRU(4, 4)]),
         r"layers\[3\] \(GRU\).*layers\[2\] \(LastStep\)"),
        (rk.Sequential([emb, rk.LSTM(5, 4)]), r"layers\[1\] \(LSTM\) reads 5 features.* 3"),
        (lstm, r"takes a rnnkern.Sequential, got LSTM"),
    ]
    for model, message in cases:
        with pytest.raises(ro.ExportError, match=message):
            ro.build_model(model)
    assert issubclass(ro.ExportError, ValueError)
    with pytest.raises(ro.ExportError, match="supported layers: OneHot, Embedding, LSTM"):
        ro.export(cases[0][0], os.devnull)


def test_without_onnx_the_error_says_what_to_install():
    code = ("import sys; sys.modules['onnx'] = None\n"
            "import rnnkern as rk, rnnkern.onnx as ro\n"
            "m = rk.Sequential([rk.LSTM(3, 4)])\n"
            "try:\n    ro.export(m, 'x.onnx')\n"
            "except ImportError as e:\n    print('ImportError:', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ImportError: rnnkern.onnx needs the onnx package" in proc.stdout
    assert "pip install 'rnnkern[onnx]'" in proc.stdout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A checkpoint of `train` (char level, GRU, 2 layers of 8), trained in this process."""
    from rnnkern.labs import load_example
    d = tmp_path_factory.mktemp("export")
    (d / "tiny.txt").write_text("the quick brown fox jumps over the lazy dog. " * 60)
    load_example("char_rnn").main(
        ["train", "--text", str(d / "tiny.txt"), "--checkpoint", str(d / "ck.npz"),
         "--model", "gru", "--rnn-size", "8", "--num-layers", "2", "--seq-length", "10",
         "--batch-size", "4", "--max-batches", "2", "--epochs", "1", "--sample-length", "5",
         "--quiet", "--blas-threads", "0"])
    return d


def test_cli_exports_a_checkpoint(checkpoint):
    from rnnkern.labs import load_example
    env = dict(os.environ, NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR", "/tmp/numba-cache"),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "rnnkern", "export", "--checkpoint", "ck.npz",
                           "--onnx", "out/model.onnx", "--with-lengths", "--with-state"],
                          capture_output=True, text=True, cwd=checkpoint, env=env, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "wrote out/model.onnx" in proc.stdout
    path = checkpoint / "out" / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model, vocab, _ = load_example("char_rnn").load_model(str(checkpoint / "ck.npz"))
    model.eval()
    meta = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert '"vocab"' in meta["rnnkern.checkpoint"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(7).integers(0, len(vocab), (3, 9))
    check(model, sess, ids, lengths=np.array([9, 4, 0]), with_state=True)


@pytest.mark.parametrize("argv, names", [
    (["--checkpoint", "absent.npz", "--onnx", "m.onnx"], ["absent.npz", "not found"]),
    (["--checkpoint", "tiny.txt", "--onnx", "m.onnx"], ["--checkpoint tiny.txt",
                                                         "not a readable"]),
    (["--checkpoint", "ck.npz", "--onnx", "."], ["--onnx .", "directory"]),
    (["--checkpoint", "ck.npz", "--onnx", "m.onnx", "--opset", "9"], ["opset", "9"]),
    (["--checkpoint", "ck.npz"], ["--onnx"]),
])
def test_cli_bad_input_is_one_line_and_exit_2(checkpoint, argv, names, capsys, monkeypatch):
    monkeypatch.chdir(checkpoint)
    try:
        rc = cli(["export", *argv])
    except SystemExit as exc:          # argparse's own errors (a missing option)
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rnnkern export: error: "), err
    for name in names:
        assert name in lines[0], (name, err)
    assert not (checkpoint / "m.onnx").exists()
