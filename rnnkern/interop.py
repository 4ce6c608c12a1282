"""Exact weight-layout conversion between rnnkern and PyTorch, TF1 and Keras.

rnnkern's canonical parameters are PyTorch's (:mod:`rnnkern.layers`); this module is the only
place that knows the other layouts. Shape legend: I input size, H hidden size, G gates
(RNN 1, LSTM 4, GRU 3), L layers.

==========  =================================  =========================  ====================
format      weights per layer                  gate order (blocks of H)   runtime constants
==========  =================================  =========================  ====================
rnnkern     weight_ih [G*H,I], weight_hh       LSTM i,f,g,o; GRU r,z,n    LSTM ``forget_bias``,
/PyTorch    [G*H,H], bias_ih [G*H], bias_hh                               GRU ``reset_after``
TF1         rnn/lstm kernel [I+H,G*H] (rows x  LSTM i,j,f,o (j = g);      BasicLSTMCell adds
            then h), bias [G*H]; gru           GRU gates r,u (u = z),     ``forget_bias`` (1.0);
            gates/kernel [I+H,2H], gates/bias  then candidate             GRUCell resets h
            [2H], candidate/kernel [I+H,H],                               before the matmul
            candidate/bias [H]
Keras       [kernel [I,G*H], recurrent_kernel  LSTM i,f,c,o; GRU z,r,h    none (unit_forget_bias
            [H,G*H], bias]; GRU bias [2,3H]                               acts at init only)
            (input, recurrent) if reset_after,
            else [3H]
==========  =================================  =========================  ====================

Sources of the layouts: TensorFlow 1.x ``rnn_cell_impl.py`` (``BasicRNNCell``, ``BasicLSTMCell``,
``GRUCell``) and Keras ``layers/rnn/{lstm,gru,simple_rnn}.py`` (``call`` methods).

Bidirectional layers (``bidirectional=True``; layer k > 0 reads both directions' outputs, 2H
features, as ``torch.nn.LSTM(bidirectional=True)``):

* PyTorch: the reverse direction's parameters carry a ``_reverse`` suffix
  (``weight_ih_l0_reverse`` ...), in the same layouts.
* TF1: per layer one dict with the forward cell's variables under ``fw/`` and the backward
  cell's under ``bw/`` (``fw/kernel``, ``fw/bias``, ``bw/kernel`` ...; GRU ``fw/gates/kernel``
  ...), the scopes ``tf.nn.bidirectional_dynamic_rnn`` gives them (``.../fw/basic_lstm_cell/
  kernel``); several layers are ``tf.contrib.rnn.stack_bidirectional_dynamic_rnn``'s
  ``cell_{k}`` (each layer reads the previous one's concatenated outputs). Two ``MultiRNNCell``
  stacks in one ``bidirectional_dynamic_rnn`` are another model (each direction stacked alone).
* Keras: ``Bidirectional(LSTM(...)).get_weights()``: the forward layer's
  ``[kernel, recurrent_kernel, bias]``, then the backward layer's (6 arrays per layer); pass
  ``bidirectional=True`` to :func:`from_keras` (a flat list of 6 arrays could be two layers).

Semantics chosen here (one rule everywhere): **a conversion preserves the computed function.**

* TF1 and Keras have one bias per gate where rnnkern has two: importing puts it in ``bias_ih``
  and zeros in ``bias_hh``; exporting writes ``bias_ih + bias_hh``. That sum is exact for the
  RNN, the LSTM and the ``reset_after=False`` GRU because both biases add to the same
  pre-activation (for that GRU, ``b_hn`` sits outside ``r``). A ``reset_after=True`` GRU cannot
  be written as a TF1 ``GRUCell`` (nor as a ``reset_after=False`` Keras GRU): refused.
* LSTM forget bias: each format has a runtime constant added to the forget gate (PyTorch 0,
  Keras 0, TF1 ``forget_bias``, default 1.0). When the layer's ``forget_bias`` differs from the
  other format's constant, the difference is moved into the f-block of the bias, so both compute
  the same gates. Importing: ``from_torch``/``from_keras`` default to ``forget_bias=0.0`` and
  ``from_tf1`` to the TF cell's value, so nothing is moved unless you ask for another value.
  Exporting a default ``rk.LSTM`` (``forget_bias=1.0``) to PyTorch adds 1.0 to ``bias_ih``'s f-block.
* ``which="grads"`` converts :attr:`layer.grads` with the same layout map but never adds
  constants; the gradient of a single TF1/Keras bias is the gradient of ``bias_ih`` (equal to
  that of ``bias_hh`` wherever the sum is exact).
* The layer's dtype defaults to float64 when the source arrays are float64, else float32; pass
  ``dtype=`` (and ``backend=``, ``seed=`` ...) through ``**layer_kwargs``.
* Torch is never imported: tensors are recognised by their ``detach`` method.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .cellspec import GATES

__all__ = ["from_torch", "to_torch", "from_tf1", "to_tf1", "from_keras", "to_keras"]

# Block permutations into rnnkern order: rnnkern block j = foreign block perm[j].
_TF1_LSTM = (0, 2, 1, 3)    # TF1 i,j,f,o    -> i,f,g,o
_KERAS_GRU = (1, 0, 2)      # Keras z,r,h    -> r,z,n
_IDENTITY = {1: (0,), 3: (0, 1, 2), 4: (0, 1, 2, 3)}
_F_BLOCK = 1                # index of the forget gate in rnnkern's LSTM order
_WHICH = ("params", "grads")


# ---------------------------------------------------------------------------------- helpers
def _array(value, name):
    """NumPy copy-free view of a NumPy array, torch tensor or CuPy array; must be real floats."""
    if hasattr(value, "detach"):            # torch.Tensor, without importing torch
        value = value.detach().cpu().numpy()
    elif hasattr(value, "get") and type(value).__module__.startswith("cupy"):
        value = value.get()
    value = np.asarray(value)
    if value.dtype.kind != "f":
        raise TypeError(f"{name} must be a floating-point array, got dtype {value.dtype}")
    if value.size and not np.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return value


def _permute(a, perm, H, axis=0):
    """Blocks of H along ``axis`` reordered: block j of the result is block perm[j] of ``a``."""
    a = np.moveaxis(a, axis, 0)
    out = np.concatenate([a[g * H:(g + 1) * H] for g in perm], axis=0)
    return np.moveaxis(out, 0, axis)


def _inverse(perm):
    inv = [0] * len(perm)
    for j, g in enumerate(perm):
        inv[g] = j
    return tuple(inv)


def _check_cell(cell):
    if cell not in GATES:
        raise ValueError(f"cell must be one of {sorted(GATES)}, got {cell!r}")
    return cell


def _check_which(which):
    if which not in _WHICH:
        raise ValueError(f"which must be 'params' or 'grads', got {which!r}")
    return which


def _check_shape(a, shape, name):
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")


def _default_dtype(arrays):
    return "float64" if any(a.dtype == np.float64 for a in arrays) else "float32"


def _build(cell, input_size, hidden_size, num_layers, params, dtype_hint, layer_kwargs):
    """A new layer of ``cell`` carrying ``params`` (PyTorch names, already in rnnkern order)."""
    from . import layers
    cls = {"rnn": layers.RNN, "lstm": layers.LSTM, "gru": layers.GRU}[cell]
    kwargs = dict(layer_kwargs)
    kwargs.setdefault("dtype", dtype_hint)
    layer = cls(input_size, hidden_size, num_layers, **kwargs)
    layer.load_params(params)
    return layer


def _shift_forget(params, H, delta):
    """Add ``delta`` to the f-block of every ``bias_ih`` (both directions; in place, float64
    math)."""
    if delta == 0.0:
        return params
    for name in [n for n in params if n.startswith("bias_ih_l")]:
        b = np.array(params[name], dtype=np.float64)
        b[_F_BLOCK * H:(_F_BLOCK + 1) * H] += delta
        params[name] = b
    return params


def _directions(layer_kwargs, detected, fmt):
    """Whether the new layer is bidirectional: what the weights say (``detected``), which a
    ``bidirectional=`` in ``layer_kwargs`` may only confirm."""
    got = layer_kwargs.setdefault("bidirectional", detected)
    if not isinstance(got, (bool, np.bool_)) or bool(got) != detected:
        raise ValueError(f"bidirectional={got!r} contradicts the {fmt}, which "
                         f"{'hold' if detected else 'have no'} reverse-direction weights")
    return detected


def _suffixes(layer):
    """``(suffix, direction prefix)`` of each direction of ``layer``'s parameters."""
    return (("", "fw/"), ("_reverse", "bw/")) if layer.bidirectional else (("", ""),)


def _forget_bias_for_import(cell, layer_kwargs, source_forget_bias):
    """The delta to add to the f-bias so the new layer computes what the source did."""
    if cell != "lstm":
        return 0.0
    layer_kwargs.setdefault("forget_bias", source_forget_bias)
    fb = layer_kwargs["forget_bias"]
    if not isinstance(fb, (int, float, np.floating, np.integer)) or not np.isfinite(fb):
        raise ValueError(f"forget_bias must be a finite number, got {fb!r}")
    return float(source_forget_bias) - float(fb)


def _layer_arrays(layer, which):
    _check_which(which)
    src = layer.params if which == "params" else layer.grads
    return {k: np.array(v.get() if hasattr(v, "get") and not isinstance(v, np.ndarray) else v)
            for k, v in src.items()}


def _require_gru_convention(layer_kwargs, required, fmt):
    ra = layer_kwargs.setdefault("reset_after", required)
    if bool(ra) != required:
        raise ValueError(f"{fmt} GRU weights follow reset_after={required}; a layer with "
                         f"reset_after={bool(ra)} cannot compute the same function")


# ---------------------------------------------------------------------------------- PyTorch
_TORCH_MODES = {"LSTM": ("lstm", None), "GRU": ("gru", None),
                "RNN_TANH": ("rnn", "tanh"), "RNN_RELU": ("rnn", "relu")}


def from_torch(state_dict_or_module, cell=None, **layer_kwargs):
    """A new rnnkern layer holding the weights of a ``torch.nn.LSTM/GRU/RNN`` (or its state_dict).

    Args:
        state_dict_or_module: a torch RNN module, or a mapping ``weight_ih_l0 [G*H,I]``,
            ``weight_hh_l0 [G*H,H]``, ``bias_ih_l0 [G*H]``, ``bias_hh_l0 [G*H]``, ... with NumPy
            arrays or torch tensors as values.
        cell: "rnn" | "lstm" | "gru"; inferred when None (module: its mode; mapping: G = rows of
            ``weight_hh_l0`` / H, with H = its columns).
        **layer_kwargs: passed to the layer (``dtype``, ``backend``, ``seed``, ``nonlinearity``,
            ``forget_bias`` ...). LSTM ``forget_bias`` defaults to 0.0 (PyTorch's); another value
            is compensated in ``bias_ih`` so the function is unchanged.

    A module's ``nonlinearity``, ``num_layers``, ``dropout``, ``bidirectional`` and train/eval
    mode carry over; ``batch_first`` only changes torch's input layout (rnnkern is always
    [B,T,I]), not weights. A state_dict with ``_reverse`` keys makes a bidirectional layer.
    ``proj_size > 0`` and ``bias=False`` weights are refused (ValueError).
    """
    layer_kwargs = dict(layer_kwargs)
    training = None
    if isinstance(state_dict_or_module, Mapping):
        sd, source = dict(state_dict_or_module), "state_dict"
    elif hasattr(state_dict_or_module, "state_dict"):
        mod = state_dict_or_module
        mode = getattr(mod, "mode", None)
        if mode not in _TORCH_MODES:
            raise ValueError(f"state_dict_or_module must be a torch.nn.LSTM, GRU or RNN (or a "
                             f"state_dict of one); got a {type(mod).__name__} with mode {mode!r}")
        mod_cell, nonlin = _TORCH_MODES[mode]
        if cell is not None and _check_cell(cell) != mod_cell:
            raise ValueError(f"cell={cell!r} contradicts the module, a {type(mod).__name__} "
                             f"({mod_cell})")
        cell = mod_cell
        if getattr(mod, "proj_size", 0):
            raise ValueError(f"torch LSTM with proj_size={mod.proj_size} is not supported")
        if not getattr(mod, "bias", True):
            raise ValueError("torch RNNs built with bias=False are not supported; rnnkern "
                             "layers always have bias_ih and bias_hh (load zeros instead)")
        if nonlin is not None:
            got = layer_kwargs.setdefault("nonlinearity", nonlin)
            if got != nonlin:
                raise ValueError(f"nonlinearity={got!r} contradicts the module's {nonlin!r}")
        layer_kwargs.setdefault("dropout", float(getattr(mod, "dropout", 0.0)))
        training = getattr(mod, "training", None)
        sd, source = dict(mod.state_dict()), "module"
    else:
        raise TypeError(f"state_dict_or_module must be a torch RNN module or a mapping of "
                        f"PyTorch parameter names to arrays, got {type(state_dict_or_module)}")

    keys = set(sd)
    if any(k.startswith("weight_hr_l") for k in keys):
        raise ValueError("LSTM projection weights (weight_hr_l*, proj_size > 0) are not supported")
    if "weight_hh_l0" not in keys or "weight_ih_l0" not in keys:
        raise ValueError(f"state_dict must contain weight_ih_l0 and weight_hh_l0, "
                         f"got keys {sorted(keys)}")
    L = 0
    while f"weight_ih_l{L}" in keys:
        L += 1
    bidirectional = _directions(layer_kwargs, any(k.endswith("_reverse") for k in keys), source)
    expected = {f"{n}_l{k}{sfx}" for k in range(L)
                for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                for sfx in ("", "_reverse")[:1 + bidirectional]}
    missing = sorted(expected - keys)
    if missing:
        if all(m.startswith("bias") for m in missing):
            raise ValueError(f"state_dict has no {missing} (bias=False?); rnnkern layers always "
                             f"have biases (load zeros instead)")
        if all(m.endswith("_reverse") for m in missing):
            raise ValueError(f"state_dict is missing {missing}: a bidirectional state_dict "
                             f"needs the '_reverse' weights of every layer")
        raise ValueError(f"state_dict is missing {missing}")
    extra = sorted(keys - expected)
    if extra:
        raise ValueError(f"state_dict has unexpected keys {extra}")

    params = {k: _array(v, f"state_dict[{k!r}]") for k, v in sd.items()}
    w_hh = params["weight_hh_l0"]
    if w_hh.ndim != 2 or w_hh.shape[1] < 1 or w_hh.shape[0] % w_hh.shape[1]:
        raise ValueError(f"weight_hh_l0 must have shape [G*H, H], got {w_hh.shape}")
    H = w_hh.shape[1]
    G = w_hh.shape[0] // H
    inferred = {g: c for c, g in GATES.items()}.get(G)
    if cell is None:
        if inferred is None:
            raise ValueError(f"cannot infer the cell from weight_hh_l0 {w_hh.shape}: "
                             f"rows/H = {G}, expected 1 (rnn), 3 (gru) or 4 (lstm)")
        cell = inferred
    elif _check_cell(cell) != inferred:
        raise ValueError(f"cell={cell!r} needs weight_hh_l0 of shape [{GATES[cell]}*H, H], "
                         f"got {w_hh.shape}")
    if params["weight_ih_l0"].ndim != 2:
        raise ValueError(f"weight_ih_l0 must have shape [G*H, I], "
                         f"got {params['weight_ih_l0'].shape}")
    I = params["weight_ih_l0"].shape[1]
    if cell == "gru":
        _require_gru_convention(layer_kwargs, True, "PyTorch")
    delta = _forget_bias_for_import(cell, layer_kwargs, 0.0)
    dtype = _default_dtype(params.values())
    _shift_forget(params, H, delta)
    layer = _build(cell, I, H, L, params, dtype, layer_kwargs)
    if training is not None:
        layer.train(training)
    return layer


def to_torch(layer, which="params"):
    """``{name: ndarray}`` in PyTorch names and shapes, ready for ``module.load_state_dict``
    (after ``torch.from_numpy``; a bidirectional layer's include the ``_reverse`` ones, for a
    ``bidirectional=True`` module). LSTM ``params``: ``forget_bias`` is added to ``bias_ih``'s
    f-block (torch has no runtime forget bias). ``which="grads"``: :attr:`layer.grads`.
    A ``reset_after=False`` GRU is refused: ``torch.nn.GRU`` resets after the matmul.
    (For rnnkern's own save/load use ``layer.params`` / ``layer.load_params``.)"""
    out = _layer_arrays(layer, which)
    if layer.kind == "gru" and not layer.spec.reset_after:
        raise ValueError("a reset_after=False GRU cannot be expressed as a torch.nn.GRU (which "
                         "applies the reset after the matmul); use reset_after=True")
    if which == "params" and layer.kind == "lstm":
        dtype = layer.dtype
        _shift_forget(out, layer.hidden_size, layer.spec.forget_bias)
        out = {k: np.asarray(v, dtype=dtype) for k, v in out.items()}
    return out


# ---------------------------------------------------------------------------------- TF1
def _per_layer(weights, name):
    if isinstance(weights, Mapping):
        return [weights]
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(f"{name} must be a non-empty list with one dict per layer")
    for k, w in enumerate(weights):
        if not isinstance(w, Mapping):
            raise ValueError(f"{name}[{k}] must be a dict of TF1 variables, got {type(w).__name__}")
    return list(weights)


_TF1_KEYS = {"rnn": ("kernel", "bias"), "lstm": ("kernel", "bias"),
             "gru": ("gates/kernel", "gates/bias", "candidate/kernel", "candidate/bias")}


def from_tf1(cell, weights, *, source_forget_bias=1.0, **layer_kwargs):
    """A new layer from TF1 ``BasicRNNCell`` / ``BasicLSTMCell`` / ``GRUCell`` variables.

    Args:
        cell: "rnn" | "lstm" | "gru".
        weights: list with one dict per layer (a single dict = one layer), as TF stores them:
            rnn/lstm ``{"kernel": [I+H, G*H], "bias": [G*H]}`` (rows: x then h; LSTM columns
            i, j, f, o); gru ``{"gates/kernel": [I+H, 2H], "gates/bias": [2H],
            "candidate/kernel": [I+H, H], "candidate/bias": [H]}`` (gate columns r, u).
            Bidirectional (``tf.nn.bidirectional_dynamic_rnn``'s forward and backward cells;
            several layers: ``stack_bidirectional_dynamic_rnn``): the same names under ``fw/``
            and ``bw/`` (``{"fw/kernel", "fw/bias", "bw/kernel", "bw/bias"}``), layer k > 0
            with I = 2H (it reads both directions' outputs).
        source_forget_bias: the ``forget_bias`` the TF1 LSTM cells were built with (default 1.0).
        **layer_kwargs: passed to the layer. LSTM ``forget_bias`` defaults to
            ``source_forget_bias``; GRU gets ``reset_after=False`` (True is refused); RNN
            ``nonlinearity`` defaults to "tanh" (pass "relu" for ``activation=tf.nn.relu``);
            ``bidirectional`` follows the names (another value is refused).
    """
    cell = _check_cell(cell)
    layer_kwargs = dict(layer_kwargs)
    weights = _per_layer(weights, "weights")
    G = GATES[cell]
    need = _TF1_KEYS[cell]
    bi_need = tuple(f"{d}/{n}" for d in ("fw", "bw") for n in need)
    bidirectional = _directions(layer_kwargs, set(weights[0]) == set(bi_need), "TF1 variables")
    directions = (("", "fw/"), ("_reverse", "bw/")) if bidirectional else (("", ""),)
    params, arrays, I0, H = {}, [], None, None
    for k, w in enumerate(weights):
        keys = bi_need if bidirectional else need
        if set(w) != set(keys):
            raise ValueError(f"weights[{k}] must have keys {list(keys)}"
                             f"{'' if k else ' (or those under fw/ and bw/ for a bidirectional layer)'}"
                             f", got {sorted(w)}")
        for sfx, d in directions:
            a = {n: _array(w[d + n], f"weights[{k}][{d + n!r}]") for n in need}
            arrays += a.values()
            bias_name = "candidate/bias" if cell == "gru" else "bias"
            if a[bias_name].ndim != 1 or (cell != "gru" and a[bias_name].shape[0] % G):
                raise ValueError(f"weights[{k}][{d + bias_name!r}] must have shape "
                                 f"[{'' if cell == 'gru' else f'{G}*'}H], "
                                 f"got {a[bias_name].shape}")
            Hk = a[bias_name].shape[0] // (1 if cell == "gru" else G)
            if H is None:
                H = Hk
            elif Hk != H:
                raise ValueError(f"weights[{k}] {d}has hidden size {Hk}, layer 0 has {H}")
            kern = a["candidate/kernel" if cell == "gru" else "kernel"]
            if kern.ndim != 2 or kern.shape[0] <= H:
                raise ValueError(f"weights[{k}] {d}kernel must have shape [I+H, ...] with I >= 1 "
                                 f"and H = {H}, got {kern.shape}")
            I = kern.shape[0] - H
            if k == 0 and I0 is None:
                I0 = I
            elif k == 0 and I != I0:
                raise ValueError(f"weights[0] {d}kernel reads {I} inputs, fw/kernel {I0}")
            elif k and I != len(directions) * H:
                raise ValueError(f"weights[{k}] {d}kernel must have I+H = "
                                 f"{(len(directions) + 1) * H} rows (layer input is the previous "
                                 f"layer's h{', both directions' if bidirectional else ''}), "
                                 f"got {kern.shape[0]}")
            if cell == "gru":
                for n, shape in (("gates/kernel", (I + H, 2 * H)), ("gates/bias", (2 * H,)),
                                 ("candidate/kernel", (I + H, H))):
                    _check_shape(a[n], shape, f"weights[{k}][{d + n!r}]")
                kernel = np.concatenate([a["gates/kernel"], a["candidate/kernel"]], axis=1)
                bias = np.concatenate([a["gates/bias"], a["candidate/bias"]])  # r,u,c = r,z,n
                perm = _IDENTITY[3]
            else:
                _check_shape(a["kernel"], (I + H, G * H), f"weights[{k}][{d + 'kernel'!r}]")
                kernel, bias = a["kernel"], a["bias"]
                perm = _TF1_LSTM if cell == "lstm" else _IDENTITY[1]
            params[f"weight_ih_l{k}{sfx}"] = _permute(kernel[:I].T, perm, H)
            params[f"weight_hh_l{k}{sfx}"] = _permute(kernel[I:].T, perm, H)
            params[f"bias_ih_l{k}{sfx}"] = _permute(bias, perm, H)
            params[f"bias_hh_l{k}{sfx}"] = np.zeros_like(bias)
    if cell == "gru":
        _require_gru_convention(layer_kwargs, False, "TF1 GRUCell")
    delta = _forget_bias_for_import(cell, layer_kwargs, float(source_forget_bias))
    _shift_forget(params, H, delta)
    return _build(cell, I0, H, len(weights), params, _default_dtype(arrays), layer_kwargs)


def to_tf1(layer, which="params", *, forget_bias=1.0):
    """TF1 variables of ``layer``: a list with one dict per layer (layout as :func:`from_tf1`;
    a bidirectional layer's under ``fw/`` and ``bw/``).

    ``forget_bias``: that of the TF1 LSTM cells that will run the weights (default 1.0, as
    ``BasicLSTMCell``); the difference to the layer's own is folded into the f-bias.
    A ``reset_after=True`` GRU is refused: TF1 ``GRUCell`` applies the reset before the matmul.
    """
    src = _layer_arrays(layer, which)
    cell, H, G = layer.kind, layer.hidden_size, layer.spec.gates
    if cell == "gru" and layer.spec.reset_after:
        raise ValueError("a reset_after=True GRU cannot be expressed as a TF1 GRUCell (which "
                         "resets h before the candidate matmul); use reset_after=False")
    perm = _inverse(_TF1_LSTM) if cell == "lstm" else _IDENTITY[G]
    out = []
    for k in range(layer.num_layers):
        variables = {}
        for sfx, d in _suffixes(layer):
            w_ih, w_hh = src[f"weight_ih_l{k}{sfx}"], src[f"weight_hh_l{k}{sfx}"]
            if which == "params":
                bias = src[f"bias_ih_l{k}{sfx}"].astype(np.float64) + src[f"bias_hh_l{k}{sfx}"]
                if cell == "lstm":
                    bias[_F_BLOCK * H:(_F_BLOCK + 1) * H] += layer.spec.forget_bias - forget_bias
                bias = bias.astype(layer.dtype)
            else:
                bias = src[f"bias_ih_l{k}{sfx}"]  # d(one shared bias) = d(bias_ih) = d(bias_hh)
            kernel = _permute(np.concatenate([w_ih.T, w_hh.T], axis=0), perm, H, axis=1)
            bias = _permute(bias, perm, H)
            if cell == "gru":
                variables.update({d + "gates/kernel": np.ascontiguousarray(kernel[:, :2 * H]),
                                  d + "gates/bias": bias[:2 * H].copy(),
                                  d + "candidate/kernel": np.ascontiguousarray(kernel[:, 2 * H:]),
                                  d + "candidate/bias": bias[2 * H:].copy()})
            else:
                variables.update({d + "kernel": np.ascontiguousarray(kernel), d + "bias": bias})
        out.append(variables)
    return out


# ---------------------------------------------------------------------------------- Keras
def _keras_layers(weights, bidirectional=False):
    """[[kernel, recurrent_kernel, bias], ...] (bidirectional: forward's three then backward's,
    six arrays) per layer, from one layer's list, a list of such lists, or a flat
    ``model.get_weights()`` list."""
    n = 6 if bidirectional else 3
    what = ("[kernel, recurrent_kernel, bias] of the forward then the backward layer"
            if bidirectional else "[kernel, recurrent_kernel, bias]")
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError(f"weights must be a non-empty list: {what} or one such list per layer")
    if all(isinstance(w, (list, tuple)) for w in weights):
        groups = [list(w) for w in weights]
    elif not any(isinstance(w, (list, tuple)) for w in weights):
        if len(weights) % n:
            raise ValueError(f"weights must hold {what} per layer (use_bias=False is not "
                             f"supported); got {len(weights)} arrays")
        groups = [list(weights[i:i + n]) for i in range(0, len(weights), n)]
    else:
        raise ValueError("weights must be a list of arrays or a list of per-layer lists, "
                         "not a mixture")
    for k, g in enumerate(groups):
        if len(g) != n:
            raise ValueError(f"weights[{k}] must be {what}, got {len(g)} arrays (use_bias=False "
                             f"is not supported)")
    return groups


def from_keras(cell, weights, **layer_kwargs):
    """A new layer from Keras ``SimpleRNN`` / ``LSTM`` / ``GRU`` weights (``layer.get_weights()``).

    Args:
        cell: "rnn" | "lstm" | "gru".
        weights: ``[kernel [I,G*H], recurrent_kernel [H,G*H], bias]`` for one layer, or one such
            list per layer (or a flat list of 3*L arrays). LSTM columns i,f,c,o, bias [4H];
            GRU columns z,r,h, bias [2,3H] (input, recurrent) when the Keras layer had
            ``reset_after=True``, [3H] when False — the convention is read from that shape.
            With ``bidirectional=True``: ``Bidirectional(...).get_weights()``, the forward
            layer's three arrays then the backward layer's, per layer (flat: 6*L arrays);
            layer k > 0 has I = 2H (``merge_mode="concat"``).
        **layer_kwargs: passed to the layer. LSTM ``forget_bias`` defaults to 0.0 (Keras has
            no runtime forget bias). Assumes Keras' default activations (tanh, sigmoid).
    """
    cell = _check_cell(cell)
    layer_kwargs = dict(layer_kwargs)
    bidirectional = layer_kwargs.setdefault("bidirectional", False)
    if not isinstance(bidirectional, (bool, np.bool_)):
        raise ValueError(f"bidirectional must be True or False, got {bidirectional!r}")
    groups = _keras_layers(weights, bidirectional)
    D = 2 if bidirectional else 1
    G = GATES[cell]
    perm = _KERAS_GRU if cell == "gru" else _IDENTITY[G]
    params, arrays, I0, H, reset_after = {}, [], None, None, None
    for k, group in enumerate(groups):
        for d, sfx in enumerate(("", "_reverse")[:D]):
            where = f"weights[{k}]" + (f" ({('forward', 'backward')[d]})" if D == 2 else "")
            kernel, rec, bias = (_array(a, f"weights[{k}][{3 * d + j}] ({n})") for j, (a, n) in
                                 enumerate(zip(group[3 * d:3 * d + 3],
                                               ("kernel", "recurrent_kernel", "bias"))))
            arrays += [kernel, rec, bias]
            if rec.ndim != 2 or rec.shape[1] != G * rec.shape[0] or rec.shape[0] < 1:
                raise ValueError(f"{where} recurrent_kernel must have shape [H, {G}*H] for a "
                                 f"{cell}, got {rec.shape}")
            Hk = rec.shape[0]
            if H is None:
                H = Hk
            elif Hk != H:
                raise ValueError(f"{where} has hidden size {Hk}, layer 0 has {H}")
            if kernel.ndim != 2 or kernel.shape[1] != G * H or kernel.shape[0] < 1:
                raise ValueError(f"{where} kernel must have shape [I, {G * H}], "
                                 f"got {kernel.shape}")
            I = kernel.shape[0]
            if k == 0 and I0 is None:
                I0 = I
            elif k == 0 and I != I0:
                raise ValueError(f"{where} kernel reads {I} inputs, the forward layer {I0}")
            elif k and I != D * H:
                raise ValueError(f"{where} kernel must have {D * H} rows (the previous layer's "
                                 f"{'2H' if D == 2 else 'H'}), got {I}")
            ra = cell == "gru" and bias.ndim == 2
            if ra:
                _check_shape(bias, (2, 3 * H), f"{where} bias (reset_after=True)")
                b_ih, b_hh = bias[0], bias[1]
            else:
                _check_shape(bias, (G * H,), f"{where} bias")
                b_ih, b_hh = bias, np.zeros_like(bias)
            if reset_after is None:
                reset_after = ra
            elif ra != reset_after:
                raise ValueError(f"{where} bias shape {bias.shape} mixes GRU conventions "
                                 f"with layer 0")
            params[f"weight_ih_l{k}{sfx}"] = _permute(kernel.T, perm, H)
            params[f"weight_hh_l{k}{sfx}"] = _permute(rec.T, perm, H)
            params[f"bias_ih_l{k}{sfx}"] = _permute(b_ih, perm, H)
            params[f"bias_hh_l{k}{sfx}"] = _permute(b_hh, perm, H)
    if cell == "gru":
        _require_gru_convention(layer_kwargs, reset_after, "These Keras")
    delta = _forget_bias_for_import(cell, layer_kwargs, 0.0)
    _shift_forget(params, H, delta)
    return _build(cell, I0, H, len(groups), params, _default_dtype(arrays), layer_kwargs)


def to_keras(layer, which="params"):
    """Keras weights of ``layer``: one ``[kernel, recurrent_kernel, bias]`` list per layer
    (bidirectional: six arrays, the forward layer's then the backward layer's, as
    ``Bidirectional(...).get_weights()``).

    LSTM ``params``: the layer's ``forget_bias`` is folded into the f-bias (Keras has none at
    run time). GRU: bias [2,3H] for ``reset_after=True``, [3H] (``bias_ih + bias_hh``) for False.
    """
    src = _layer_arrays(layer, which)
    cell, H, G = layer.kind, layer.hidden_size, layer.spec.gates
    perm = _inverse(_KERAS_GRU) if cell == "gru" else _IDENTITY[G]
    out = []
    for k in range(layer.num_layers):
        group = []
        for sfx, _ in _suffixes(layer):
            kernel = _permute(src[f"weight_ih_l{k}{sfx}"].T, perm, H, axis=1)
            rec = _permute(src[f"weight_hh_l{k}{sfx}"].T, perm, H, axis=1)
            b_ih, b_hh = src[f"bias_ih_l{k}{sfx}"], src[f"bias_hh_l{k}{sfx}"]
            if cell == "gru" and layer.spec.reset_after:
                bias = np.stack([_permute(b_ih, perm, H), _permute(b_hh, perm, H)])
            else:
                if which == "params":
                    b = b_ih.astype(np.float64) + b_hh
                    if cell == "lstm":
                        b[_F_BLOCK * H:(_F_BLOCK + 1) * H] += layer.spec.forget_bias
                    b_ih = b.astype(layer.dtype)
                bias = _permute(b_ih, perm, H)
            group += [np.ascontiguousarray(kernel), np.ascontiguousarray(rec), bias]
        out.append(group)
    return out
