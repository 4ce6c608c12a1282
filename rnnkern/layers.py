"""Recurrent layers with PyTorch names: :class:`RNN`, :class:`LSTM`, :class:`GRU`.

A layer owns its parameters (``params``, PyTorch names and layouts), validates every input,
stacks ``num_layers`` cells, and hands each cell's whole sequence to a backend through the seam
described in :mod:`rnnkern.backends`. It keeps what the last forward call saved so that
:meth:`backward` can run BPTT and fill ``grads``.

Shape legend: B batch, T time steps, I input size, H hidden size, L layers, G gates.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import backends, recurrent_stack
from .cellspec import CellSpec
from .device import array_module as _xp
from .device import (check_device, check_finite, check_range, check_same_device, device_of,
                     to_device, to_host)

_DTYPES = {"float32": np.float32, "float64": np.float64}


def _as_dtype(dtype):
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return np.dtype(_DTYPES[name])


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def dropout_mask(rng, shape, p, dtype, out=None, device="cpu"):
    """The inverted-dropout mask that every dropout here draws (the layers' own, ``Dropout``'s,
    the fused step's): ``1/(1-p)`` where ``rng.random(shape) < 1-p``, else 0, in ``dtype``
    (written into ``out`` when given). The same draw from ``rng`` and the same bits as
    ``((rng.random(shape) < keep) / keep).astype(dtype)`` (the boolean times 1/keep rounded
    to ``dtype`` is 0 or that value), without that form's float64 quotient and cast: char-rnn's
    [50,50,128] float32 mask, 3.5 -> 1.8 ms alone; char-rnn with --dropout 0.2, blocks of 10
    batches alternating in one process, 26.85 -> 25.80 ms a batch.

    ``device="cuda"``: the mask is drawn on the GPU (a CuPy array) by a counter-based generator
    keyed by ONE integer drawn from ``rng`` (csrc/cuda/dropout.cu): the same ``1/(1-p)``-or-0
    values and keep probability, reproducible from ``rng``'s state (so from the seed and from a
    checkpoint of it), other draws than the host's."""
    if check_device(device) != "cpu":
        from .backends.cuda import elementwise
        key = int(rng.integers(0, 2 ** 63))
        return elementwise.dropout_mask(key, shape, p, dtype, out=out)
    keep = 1.0 - p
    return np.multiply(rng.random(shape) < keep, np.asarray(1.0 / keep).astype(dtype), out=out)


class _Recurrent:
    """Common machinery of RNN, LSTM and GRU; use those classes."""

    kind = None  # "rnn" | "lstm" | "gru", set by subclasses

    def __init__(self, input_size, hidden_size, num_layers=1, *, dtype="float32",
                 backend="auto", seed=None, dropout=0.0, bidirectional=False, **cell_options):
        self.input_size = _positive_int("input_size", input_size)
        self.hidden_size = _positive_int("hidden_size", hidden_size)
        self.num_layers = _positive_int("num_layers", num_layers)
        if not isinstance(bidirectional, (bool, np.bool_)):
            raise ValueError(f"bidirectional must be True or False, got {bidirectional!r}")
        self.bidirectional = bool(bidirectional)
        self.dtype = _as_dtype(dtype)
        if backend != "auto":
            backends._check_name(backend)
        self.backend = backend
        if not (isinstance(dropout, numbers.Real) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.training = True
        self.spec = CellSpec(self.kind, **cell_options)
        self._rng = np.random.default_rng(seed)
        self.params = self._init_params()
        self._param_names = tuple(self.params)     # PyTorch's order, the stack's weight order
        self._stack_config = recurrent_stack.StackConfig(self.spec, self.num_layers,
                                                         self.bidirectional, backend)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._saved = None

    # ------------------------------------------------------------------ parameters
    @property
    def num_directions(self):
        """D: 2 for a bidirectional layer, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def output_size(self):
        """D*H: features of each output step (forward half, then backward half)."""
        return self.num_directions * self.hidden_size

    def _state_layout(self):
        return "[2L,B,H]" if self.bidirectional else "[L,B,H]"

    def param_shapes(self):
        """``{name: shape}`` of every parameter, PyTorch names and order: ``weight_ih_l0
        [G*H,I]``, ``weight_hh_l0 [G*H,H]``, ``bias_ih_l0``, ``bias_hh_l0 [G*H]``, then (when
        bidirectional) the same with ``_reverse``, then layer 1 (input D*H) ..."""
        G, H = self.spec.gates, self.hidden_size
        shapes = {}
        for k in range(self.num_layers):
            n_in = self.input_size if k == 0 else self.output_size
            for sfx in ("", "_reverse")[:self.num_directions]:
                shapes[f"weight_ih_l{k}{sfx}"] = (G * H, n_in)
                shapes[f"weight_hh_l{k}{sfx}"] = (G * H, H)
                shapes[f"bias_ih_l{k}{sfx}"] = (G * H,)
                shapes[f"bias_hh_l{k}{sfx}"] = (G * H,)
        return shapes

    def _init_params(self):
        """U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias, as PyTorch initialises them."""
        bound = 1.0 / np.sqrt(self.hidden_size)
        return {name: self._rng.uniform(-bound, bound, shape).astype(self.dtype)
                for name, shape in self.param_shapes().items()}

    def load_params(self, params):
        """Replace every parameter (same names and shapes; values are copied and cast), on the
        layer's device whichever device the values come from."""
        expected = self.param_shapes()
        if set(params) != set(expected):
            raise ValueError(f"params must have keys {sorted(expected)}, got {sorted(params)}")
        device, new = self.device, {}
        for name, shape in expected.items():
            value = to_host(params[name])
            if value.shape != shape:
                raise ValueError(f"params[{name!r}] must have shape {shape}, got {value.shape}")
            new[name] = to_device(np.array(value, dtype=self.dtype, order="C"), device)
        self.params = new
        self.grads = {k: _xp(v).zeros_like(v) for k, v in new.items()}

    # ------------------------------------------------------------------ device
    @property
    def device(self):
        """Where the parameters live: "cpu" (NumPy) or "cuda" (CuPy); inputs must live there
        too."""
        return device_of(next(iter(self.params.values())))

    def to(self, device):
        """Move the parameters and gradients to ``device`` ("cpu" or "cuda"; copies, as
        ``torch.nn.Module.to``); what the last forward kept for a backward is dropped. Returns
        the layer. ``"cuda"`` needs CuPy (ImportError naming the package otherwise)."""
        device = check_device(device)
        if device == "cuda" and self.backend not in ("auto", "cuda"):
            raise ValueError(f"{type(self).__name__} with backend={self.backend!r} runs on the "
                             f"CPU; on the GPU use backend='auto' or 'cuda'")
        self.params = {k: to_device(v, device) for k, v in self.params.items()}
        self.grads = {k: to_device(v, device) for k, v in self.grads.items()}
        self._saved = None
        return self

    def _layer_weights(self, k, xp, direction=0):
        """(w_ih, w_hh, b_ih, b_hh) of layer k (direction 1: its ``_reverse`` weights) as
        C-contiguous arrays of the layer's dtype."""
        weights = []
        sfx = "_reverse" if direction else ""
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            w = self.params[f"{n}_l{k}{sfx}"]
            # fast path: what load_params/optimizers keep is already right (no copy, no cast)
            if not (type(w) is xp.ndarray and w.dtype == self.dtype and w.flags.c_contiguous):
                w = xp.ascontiguousarray(xp.asarray(w), dtype=self.dtype)
            weights.append(w)
        return weights

    # ------------------------------------------------------------------ modes
    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    # ------------------------------------------------------------------ validation
    def _check_x(self, x):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            x = np.asarray(x)
        check_same_device(x, self.device, "x", type(self).__name__)
        xp = _xp(x)
        if x.dtype.kind not in "f":
            raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
        if x.ndim != 3:
            raise ValueError(f"x must have 3 dimensions [B,T,I], got shape {tuple(x.shape)}")
        if x.shape[2] != self.input_size:
            raise ValueError(f"x.shape[-1] must be equal to input_size. "
                             f"Expected {self.input_size}, got {x.shape[2]}")
        x = xp.ascontiguousarray(x, dtype=self.dtype)
        check_finite(x, "x")
        return x, xp

    def _check_lengths(self, lengths, B, T, xp=np):
        """lengths as int64 [B] on x's device (``xp``), or None. Host values are checked to lie
        in [0, T]; device ones only when ``config.CHECK_FINITE_ON_DEVICE`` (that scan is a
        device-to-host read; the kernels treat a length outside [0, T] as its nearest end)."""
        if lengths is None:
            return None
        on_device = type(lengths).__module__.startswith("cupy")
        if on_device and xp is np:
            lengths, on_device = lengths.get(), False
        if not on_device:
            lengths = np.asarray(lengths)
        if lengths.dtype.kind not in "iu":
            raise TypeError(f"lengths must be integers, got dtype {lengths.dtype}")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must have shape [B] = ({B},), got {tuple(lengths.shape)}")
        check_range(lengths, "lengths", 0, T + 1, f"[0, T] = [0, {T}]")
        return xp.ascontiguousarray(xp.asarray(lengths), dtype=np.int64)

    def _check_state(self, state, name, B, xp):
        """A [L,B,H] state array ([2L,B,H] when bidirectional; or zeros for None), validated
        and cast."""
        shape = (self.num_directions * self.num_layers, B, self.hidden_size)
        if state is None:
            return xp.zeros(shape, dtype=self.dtype)
        if not hasattr(state, "shape"):
            state = np.asarray(state)
        if state.dtype.kind != "f":
            raise TypeError(f"{name} must be a floating-point array, got dtype {state.dtype}")
        if tuple(state.shape) != shape:
            raise ValueError(f"{name} must have shape {self._state_layout()} = {shape}, "
                             f"got {tuple(state.shape)}")
        check_finite(state, name)  # before any copy to the device: NumPy is scanned
        return xp.ascontiguousarray(xp.asarray(state), dtype=self.dtype)

    def _split_state(self, initial_state, B, xp):
        """(h0 [D*L,B,H], c0 [D*L,B,H] or None) from the user's initial_state."""
        if self.spec.has_cell_state:
            if initial_state is None:
                initial_state = (None, None)
            if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
                raise ValueError(f"initial_state of an LSTM must be a tuple (h0, c0), "
                                 f"each {self._state_layout()}")
            return (self._check_state(initial_state[0], "initial_state[0] (h0)", B, xp),
                    self._check_state(initial_state[1], "initial_state[1] (c0)", B, xp))
        if isinstance(initial_state, (tuple, list)):
            raise ValueError(f"initial_state of a {self.kind.upper()} must be one array "
                             f"{self._state_layout()}, got a {type(initial_state).__name__}")
        return self._check_state(initial_state, "initial_state", B, xp), None

    def _pack_state(self, h, c):
        return (h, c) if self.spec.has_cell_state else h

    # ------------------------------------------------------------------ forward / backward
    def __call__(self, x, initial_state=None, lengths=None):
        return self.forward(x, initial_state, lengths)

    def forward(self, x, initial_state=None, lengths=None):
        """Run all layers over ``x``.

        Args:
            x:             [B,T,I] floating-point inputs (NumPy, or CuPy for the GPU)
            initial_state: LSTM ``(h0, c0)`` each [L,B,H]; GRU/RNN ``h0`` [L,B,H]; None: zeros.
                           Bidirectional: [2L,B,H], entry ``2*l + d`` for layer l, direction d
                           (0 forward, 1 reverse), as PyTorch
            lengths:       None or ints [B] in [0, T]; steps at ``t >= lengths[b]`` output zeros
                           and leave the state unchanged (TF ``dynamic_rnn``); the reverse
                           direction starts at each row's last valid step (PyTorch's packed
                           sequences, TF1 ``bidirectional_dynamic_rnn``)

        Returns:
            outputs [B,T,D*H] of the last layer (D = 2 when bidirectional: forward half, then
            reverse half), and the final state with the structure of ``initial_state`` (LSTM
            ``(h_n, c_n)``, else ``h_n``), each [D*L,B,H].
        """
        return self._forward_validated(*self._checked(x, initial_state, lengths))

    def infer(self, x, initial_state=None, lengths=None):
        """:meth:`forward` for inference: no dropout and nothing kept for :meth:`backward`.

        Same arguments and results as :meth:`forward`. Each direction's time loop runs in runs
        of K steps, the state carried from one to the next, K chosen so that a run's
        activations fit ``config.INFER_CHUNK_BYTES``: memory bounded whatever T is, rather than
        O(B*T*G*H) (:func:`rnnkern.recurrent_stack.run_unsaved`). The outputs are those of
        :meth:`forward` in eval mode."""
        return self._forward_validated(*self._checked(x, initial_state, lengths), keep=False)

    def _checked(self, x, initial_state, lengths):
        """forward's and infer's arguments checked: (x, h0, c0, lengths, xp)."""
        x, xp = self._check_x(x)
        B, T, _ = x.shape
        lengths = self._check_lengths(lengths, B, T, xp)
        h0, c0 = self._split_state(initial_state, B, xp)
        return x, h0, c0, lengths, xp

    def _forward_validated(self, x, h0, c0, lengths, xp=np, keep=True):
        """:meth:`forward` after its checks (the step plan's seam stack calls it directly):
        x [B,T,I] C-contiguous of the layer's dtype, h0 and c0 [D*L,B,H] (c0 None but for the
        LSTM), lengths int64 [B] on x's device or None. The stack runs in
        :mod:`rnnkern.recurrent_stack` (a reverse direction through the same one-direction
        seam, each row reversed within its length), with this layer's dropout masks.

        ``keep=False`` (:meth:`infer`): no dropout, each direction run in bounded time chunks,
        nothing saved; :meth:`backward` then needs a forward of its own."""
        B, T, _ = x.shape
        L, D = self.num_layers, self.num_directions
        masks = None
        if keep and self.dropout and self.training and L > 1:   # drawn in the layers' order
            masks = [dropout_mask(self._rng, (B, T, D * self.hidden_size), self.dropout,
                                  self.dtype, device=device_of(x)) for _ in range(L - 1)]
        cfg = self._stack_config
        weights = [w for k in range(L) for d in range(D) for w in self._layer_weights(k, xp, d)]
        self._saved = None  # the last call's activations go before this call's are made
        out, h_n, c_n, self._saved = recurrent_stack.forward(
            cfg, x, h0, c0, lengths, weights, masks, backends.resolve(self.backend, x), keep=keep)
        return out, self._pack_state(h_n, c_n)

    def backward(self, d_outputs, d_state=None):
        """Backprop through time for the last forward call; fills :attr:`grads`.

        Args:
            d_outputs: [B,T,D*H] gradient of the loss w.r.t. ``outputs`` (None: zeros)
            d_state:   gradient w.r.t. the final state, same structure as the state (None: zeros)

        Returns:
            dx [B,T,I] and the gradient w.r.t. ``initial_state`` (same structure as the state).
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() call first")
        run = self._saved
        B, T, xp, H = run.B, run.T, run.xp, self.output_size
        if d_outputs is not None:
            if not hasattr(d_outputs, "shape"):
                d_outputs = np.asarray(d_outputs)
            if d_outputs.dtype.kind != "f":
                raise TypeError(f"d_outputs must be a floating-point array, "
                                f"got dtype {d_outputs.dtype}")
            if tuple(d_outputs.shape) != (B, T, H):
                raise ValueError(f"d_outputs must have shape "
                                 f"[B,T,{'2H' if self.bidirectional else 'H'}] = {(B, T, H)}, "
                                 f"got {tuple(d_outputs.shape)}")
            d_outputs = xp.ascontiguousarray(xp.asarray(d_outputs), dtype=self.dtype)
        d_h, d_c = (None, None)
        if d_state is not None:
            if self.spec.has_cell_state:
                if not isinstance(d_state, (tuple, list)) or len(d_state) != 2:
                    raise ValueError("d_state of an LSTM must be a tuple (d_h, d_c)")
                d_h = None if d_state[0] is None else self._check_state(d_state[0], "d_state[0]", B, xp)
                d_c = None if d_state[1] is None else self._check_state(d_state[1], "d_state[1]", B, xp)
            else:
                d_h = self._check_state(d_state, "d_state", B, xp)
        return self._backward_validated(d_outputs, d_h, d_c)

    def _backward_validated(self, d_outputs, d_h=None, d_c=None):
        """:meth:`backward` after its checks: d_outputs [B,T,D*H] of the layer's dtype and device
        or None, d_h and d_c [D*L,B,H] or None. Fills :attr:`grads` with new arrays
        (:func:`rnnkern.recurrent_stack.backward`)."""
        dx, dh0, dc0, grads = recurrent_stack.backward(self._saved, d_outputs, d_h, d_c)
        self.grads.update(zip(self._param_names, grads))   # both in PyTorch's order
        return dx, self._pack_state(dh0, dc0)

    def __repr__(self):
        opts = {"rnn": f"nonlinearity={self.spec.nonlinearity!r}",
                "lstm": f"forget_bias={self.spec.forget_bias}",
                "gru": f"reset_after={self.spec.reset_after}"}[self.kind]
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}, "
                f"num_layers={self.num_layers}, {opts}, "
                f"{'bidirectional=True, ' if self.bidirectional else ''}dtype={self.dtype.name!r}, "
                f"backend={self.backend!r})")


def _document(cls, summary, options, state, example):
    """Give a recurrent layer class a docstring that stands alone: its own math, options, state and
    example around the arguments every recurrent layer shares (one copy of that text)."""
    cls.__doc__ = f"""{summary}

    Args:
        input_size:  I, features of ``x`` per step
        hidden_size: H, units of each layer
        num_layers:  L, layers stacked (layer k > 0 reads layer k-1's outputs)
{options}
        dtype:       "float32" (default) or "float64"
        backend:     "auto" (C++, then Numba, then NumPy; CUDA for CuPy inputs) or one of
                     "numpy", "numba", "cpp", "cuda"; see ``rnnkern.available_backends()``
        seed:        seeds the U(-1/sqrt(H), 1/sqrt(H)) initialisation (PyTorch's) and dropout
        dropout:     probability of zeroing each output of every layer but the last, in training
        bidirectional: False (default), or True for a second, reverse direction per layer
                     (D = 2, ``torch.nn.{cls.__name__}(bidirectional=True)``): outputs
                     [B,T,2H] (forward half, then reverse half), states [2L,B,H] with entry
                     ``2*k + d`` for layer k, direction d; layer k > 0 reads 2H features

    Parameters, PyTorch's names and shapes (G = {cls.gates} gates): ``params["weight_ih_l{{k}}"]``
    [G*H, I or D*H], ``weight_hh_l{{k}}`` [G*H, H], ``bias_ih_l{{k}}`` and ``bias_hh_l{{k}}`` [G*H],
    and the same with a ``_reverse`` suffix when bidirectional; :attr:`grads` has the same keys
    after :meth:`backward`.

    Call ``layer(x, initial_state=None, lengths=None)`` with ``x`` [B,T,I] floats (NumPy, or CuPy
    for the GPU) -> ``(outputs [B,T,D*H], final_state)``; {state[:-1]} ([2L,B,H] when
    bidirectional). ``initial_state=None`` means zeros. ``lengths`` (ints [B] in [0, T]): steps at
    ``t >= lengths[b]`` output zeros and leave the state unchanged (TF ``dynamic_rnn``); the reverse
    direction starts at each row's last valid step (PyTorch's packed sequences).

    Example::

{example}
    """
    return cls


class RNN(_Recurrent):
    kind = "rnn"
    gates = 1

    def __init__(self, input_size, hidden_size, num_layers=1, *, nonlinearity="tanh", **kwargs):
        super().__init__(input_size, hidden_size, num_layers, nonlinearity=nonlinearity, **kwargs)


class LSTM(_Recurrent):
    kind = "lstm"
    gates = 4

    def __init__(self, input_size, hidden_size, num_layers=1, *, forget_bias=1.0, **kwargs):
        if not isinstance(forget_bias, numbers.Real) or not np.isfinite(forget_bias):
            raise ValueError(f"forget_bias must be a finite number, got {forget_bias!r}")
        super().__init__(input_size, hidden_size, num_layers, forget_bias=float(forget_bias),
                         **kwargs)


class GRU(_Recurrent):
    kind = "gru"
    gates = 3

    def __init__(self, input_size, hidden_size, num_layers=1, *, reset_after=True, **kwargs):
        super().__init__(input_size, hidden_size, num_layers, reset_after=bool(reset_after),
                         **kwargs)


_document(
    RNN,
    "Elman RNN: ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)`` (``torch.nn.RNN``).",
    '''        nonlinearity: "tanh" (default) or "relu", the ``act`` above''',
    "the state is ``h`` [L,B,H].",
    """        >>> rnn = RNN(5, 8, num_layers=2, seed=0)
        >>> out, h_n = rnn(np.zeros((3, 7, 5), np.float32))     # out [3,7,8], h_n [2,3,8]""")

_document(
    LSTM,
    """LSTM with PyTorch's gate order ``i, f, g, o`` and TF1's run-time ``forget_bias``.

    With ``a = x W_ih^T + b_ih + h W_hh^T + b_hh`` split into ``a_i, a_f, a_g, a_o``:
    ``i = sigmoid(a_i)``, ``f = sigmoid(a_f + forget_bias)``, ``g = tanh(a_g)``,
    ``o = sigmoid(a_o)``, ``c' = f c + i g``, ``h' = o tanh(c')``.""",
    '''        forget_bias: added to the forget gate's input at run time; 1.0 (default) matches TF1
                     ``BasicLSTMCell``, 0.0 matches ``torch.nn.LSTM``''',
    "the state is ``(h, c)``, each [L,B,H].",
    """        >>> lstm = LSTM(5, 8, seed=0)
        >>> out, (h_n, c_n) = lstm(np.zeros((3, 7, 5), np.float32))   # out [3,7,8], h_n [1,3,8]
        >>> bi = LSTM(5, 8, num_layers=2, bidirectional=True, seed=0)
        >>> out, (h_n, c_n) = bi(np.zeros((3, 7, 5), np.float32), lengths=[7, 2, 5])
        >>> # out [3,7,16] (forward half, then reverse half), h_n and c_n [4,3,8]""")

_document(
    GRU,
    """GRU with PyTorch's gate order ``r, z, n``, in either convention.

    With ``r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr)`` and ``z`` alike:
    reset-after (PyTorch, cuDNN, Keras 2): ``n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn))``;
    reset-before (TF1 ``GRUCell``): ``n = tanh(x W_in^T + b_in + (r h) W_hn^T + b_hn)``.
    Both: ``h' = (1 - z) n + z h``.""",
    '''        reset_after: True (default) for the reset-after convention, False for reset-before''',
    "the state is ``h`` [L,B,H].",
    """        >>> gru = GRU(5, 8, reset_after=False, seed=0)           # TF1's GRUCell
        >>> out, h_n = gru(np.zeros((3, 7, 5), np.float32))     # out [3,7,8], h_n [1,3,8]""")
