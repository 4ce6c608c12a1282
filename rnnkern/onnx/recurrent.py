"""ONNX forms of ``LSTM``, ``GRU`` and ``RNN`` (stacked, bidirectional, every cell option).

Two forms, the same function of the inputs:

``operator``: ONNX's own ``LSTM``/``GRU``/``RNN`` operators, one node per layer (both
directions in it). Gates reordered (PyTorch's LSTM ``i,f,g,o`` -> ONNX ``i,o,f,c``, GRU
``r,z,n`` -> ``z,r,h``), ``b_ih`` and ``b_hh`` side by side as ONNX's ``Wb, Rb``, TF1's
``forget_bias`` folded into ``Wb``'s forget block, ``linear_before_reset`` 1 for the
reset-after GRU and 0 for TF1's reset-before one, RNN ``Tanh`` or ``Relu``.

``scan``: one ONNX ``Scan`` per layer and direction over the cell written out in elementary
operators (MatMul, Add, Sigmoid, Tanh, Relu, Mul, Where), step by step as rnnkern's NumPy
reference computes it; the input projection ``x W_ih^T + b_ih`` for all steps in one MatMul
before it. The reverse direction reverses each row within its length before and after. This
is the float64 form: onnxruntime has no float64 kernel for the LSTM, GRU or RNN operators
("operator does not support double yet"), while every operator here runs in float64.

Both: outputs zero past each row's length, the state carried unchanged there (the initial
state for a row of length 0), as ``layer.forward``.
"""
from __future__ import annotations

import numpy as np

from ..interop import _KERAS_GRU, _layer_arrays, _permute, _shift_forget

# block j of ONNX's gate order is block ORDER[j] of rnnkern's (PyTorch's): LSTM i,f,g,o ->
# i,o,f,c; GRU r,z,n -> z,r,h (Keras's order too)
ONNX_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": _KERAS_GRU, "rnn": (0,)}


def _weights(layer, k, d):
    """(w_ih [G*H,In], w_hh [G*H,H], b_ih, b_hh [G*H]) of layer k, direction d: host copies,
    TF1's ``forget_bias`` folded into b_ih's forget block (both forms add it there)."""
    params = _layer_arrays(layer, "params")
    if layer.spec.kind == "lstm":
        _shift_forget(params, layer.hidden_size, layer.spec.forget_bias)
    sfx = "_reverse" if d else ""
    return [params[f"{n}_l{k}{sfx}"].astype(layer.dtype)
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def _layer_states(g, state, D, k):
    """Entries D*k .. D*k+D-1 of a [D*L,B,H] state input (None stays None)."""
    if state is None:
        return None
    return g.op("Slice", [state, g.ints(D * k), g.ints(D * k + D), g.ints(0)], hint="state")


def _stack(g, parts):
    """One [N,B,H] tensor from [n,B,H] parts along the first axis."""
    return parts[0] if len(parts) == 1 else g.op("Concat", parts, axis=0, hint="state")


def lower(g, steps, layer, x, h0=None, c0=None, want_state=False, form="operator"):
    """The layer over ``x`` [T',B',In] (time-major, the layer's dtype), in ``form``
    "operator" or "scan".

    ``h0``, ``c0``: names of the [D*L,B',H] initial states (None: zeros). Returns ``(y, hn,
    cn)``: outputs [T',B',D*H], and when ``want_state`` the final states [D*L,B',H] (``cn``
    None but for an LSTM)."""
    lower_layer = _operator_layer if form == "operator" else _scan_layer
    D, lstm = layer.num_directions, layer.spec.has_cell_state
    hs, cs = [], []
    for k in range(layer.num_layers):
        x, hn, cn = lower_layer(g, steps, layer, k, x, _layer_states(g, h0, D, k),
                                _layer_states(g, c0, D, k) if lstm else None, want_state)
        hs.append(hn)
        cs.append(cn)
    if not want_state:
        return x, None, None
    return x, _stack(g, hs), _stack(g, cs) if lstm else None


# ---------------------------------------------------------------------- ONNX operators
def _operator_layer(g, steps, layer, k, x, h0, c0, want_state):
    spec, H, D = layer.spec, layer.hidden_size, layer.num_directions
    order = ONNX_GATE_ORDER[spec.kind]
    W, R, Bias = [], [], []
    for d in range(D):
        w_ih, w_hh, b_ih, b_hh = _weights(layer, k, d)
        W.append(_permute(w_ih, order, H))
        R.append(_permute(w_hh, order, H))
        Bias.append(np.concatenate([_permute(b_ih, order, H), _permute(b_hh, order, H)]))
    op = spec.kind.upper()
    attrs = dict(hidden_size=H, direction="bidirectional" if D == 2 else "forward")
    if spec.kind == "rnn":
        attrs["activations"] = ["Relu" if spec.nonlinearity == "relu" else "Tanh"] * D
    if spec.kind == "gru":
        attrs["linear_before_reset"] = int(spec.reset_after)
    inputs = [x, g.const(np.stack(W), hint=f"{op}_W"), g.const(np.stack(R), hint=f"{op}_R"),
              g.const(np.stack(Bias), hint=f"{op}_B"),
              steps.seq_lens() if steps.with_lengths else "", h0 or ""]
    if spec.kind == "lstm":
        inputs.append(c0 or "")
    while inputs[-1] == "":
        inputs.pop()
    outputs = [None]
    if want_state:
        outputs += [None, None] if spec.kind == "lstm" else [None]
    res = g.op(op, inputs, outputs, hint=spec.kind, **attrs)
    Y = res[0]
    if D == 1:                       # [T',1,B,H] -> [T',B,H]
        y = g.squeeze(Y, 1)
    else:                            # [T',2,B,H] -> [T',B,2,H] -> [T',B,2H]
        y = g.op("Reshape", [g.op("Transpose", [Y], perm=[0, 2, 1, 3]), g.ints(0, 0, 2 * H)])
    if steps.with_lengths:           # rows of length 0 ran one step (sequence_lens >= 1)
        y = g.op("Where", [steps.mask(), y, g.zero(layer.dtype)], hint=f"{spec.kind}_out")
    if not want_state:
        return y, None, None
    # a row of length 0 keeps its initial state (the graph ran one step for it)
    keep = [g.op("Where", [steps.positive(), s, s0 or g.zero(layer.dtype)], hint="state")
            for s, s0 in zip(res[1:], (h0, c0))]
    return y, keep[0], keep[1] if spec.kind == "lstm" else None


# ---------------------------------------------------------------------- Scan over the cell
def _scan_layer(g, steps, layer, k, x, h0, c0, want_state):
    spec, H, D, dtype = layer.spec, layer.hidden_size, layer.num_directions, layer.dtype
    lstm = spec.kind == "lstm"
    mask = steps.mask()
    outs, hs, cs = [], [], []
    for d in range(D):
        w_ih, w_hh, b_ih, b_hh = _weights(layer, k, d)
        x_d = steps.reverse(x) if d else x
        xw = g.op("Add", [g.op("MatMul", [x_d, g.const(w_ih.T, hint="W_ih_t")]),
                          g.const(b_ih, hint="b_ih")], hint="gx")
        zeros = None
        states = []
        for s0 in ((h0, c0) if lstm else (h0,)):
            if s0 is None:
                zeros = zeros or g.zeros(g.op("Concat", [steps.Bp, g.ints(H)], axis=0), dtype)
                states.append(zeros)
            else:
                states.append(g.op("Gather", [s0, g.const(np.int64(d))], axis=0,
                                   hint="state"))
        body = _cell_body(g, spec, H, dtype, w_hh, b_hh)
        res = g.op("Scan", states + [xw, mask], len(states) + 1, hint=f"{spec.kind}_scan",
                   body=body, num_scan_inputs=2)
        y = res[-1]
        outs.append(steps.reverse(y) if d else y)
        hs.append(g.unsqueeze(res[0], 0))
        if lstm:
            cs.append(g.unsqueeze(res[1], 0))
    y = outs[0] if D == 1 else g.op("Concat", outs, axis=2, hint=f"{spec.kind}_out")
    if not want_state:
        return y, None, None
    return y, _stack(g, hs), _stack(g, cs) if lstm else None


def _cell_body(g, spec, H, dtype, w_hh, b_hh):
    """The Scan body of one step: (h, [c,] gx_t [B,G*H], valid_t [B,1]) -> (h', [c',] y_t),
    with h' = h and y_t = 0 where the step is past the row's length. The weights are
    initializers of the main graph, read from the outer scope."""
    from onnx import helper

    from .graph import elem_type
    b = g.body()
    et = elem_type(dtype)
    lstm = spec.kind == "lstm"
    h = b.name("h")
    c = b.name("c") if lstm else None
    gx, valid = b.name("gx_t"), b.name("valid_t")
    b.inputs = ([helper.make_tensor_value_info(h, et, [None, H])]
                + ([helper.make_tensor_value_info(c, et, [None, H])] if lstm else [])
                + [helper.make_tensor_value_info(gx, et, [None, spec.gates * H]),
                   helper.make_tensor_value_info(valid, elem_type(np.bool_), [None, 1])])

    def matmul_add(v, w, bias):
        return b.op("Add", [b.op("MatMul", [v, b.const(w.T, hint="W_hh_t")]),
                            b.const(bias, hint="b_hh")])

    def split(v, n):
        return b.op("Split", [v, b.ints(*([H] * n))], n, axis=1)

    c_new = None
    if spec.kind == "rnn":
        a = b.op("Add", [gx, matmul_add(h, w_hh, b_hh)])
        h_new = b.op("Relu" if spec.nonlinearity == "relu" else "Tanh", [a])
    elif lstm:
        a_i, a_f, a_g, a_o = split(b.op("Add", [gx, matmul_add(h, w_hh, b_hh)]), 4)
        i, f, o = (b.op("Sigmoid", [v]) for v in (a_i, a_f, a_o))
        c_new = b.op("Add", [b.op("Mul", [f, c]), b.op("Mul", [i, b.op("Tanh", [a_g])])])
        h_new = b.op("Mul", [o, b.op("Tanh", [c_new])])
    else:
        gx_r, gx_z, gx_n = split(gx, 3)
        gh_r, gh_z = split(matmul_add(h, w_hh[:2 * H], b_hh[:2 * H]), 2)
        r = b.op("Sigmoid", [b.op("Add", [gx_r, gh_r])])
        z = b.op("Sigmoid", [b.op("Add", [gx_z, gh_z])])
        if spec.reset_after:
            n_in = b.op("Mul", [r, matmul_add(h, w_hh[2 * H:], b_hh[2 * H:])])
        else:
            n_in = matmul_add(b.op("Mul", [r, h]), w_hh[2 * H:], b_hh[2 * H:])
        n = b.op("Tanh", [b.op("Add", [gx_n, n_in])])
        one = b.const(np.ones((), dtype))
        h_new = b.op("Add", [b.op("Mul", [b.op("Sub", [one, z]), n]), b.op("Mul", [z, h])])
    outs = [b.op("Where", [valid, h_new, h], hint="h_out")]
    if lstm:
        outs.append(b.op("Where", [valid, c_new, c], hint="c_out"))
    outs.append(b.op("Where", [valid, h_new, b.zero(dtype)], hint="y_t"))
    b.outputs = [helper.make_tensor_value_info(n, et, [None, H]) for n in outs]
    return b.make_graph(b.name(f"{spec.kind}_step"))
