"""``torch.nn.LSTM`` / ``GRU`` / ``RNN`` drop-ins that run rnnkern's kernels.

Same constructor, parameter names, shapes and initialisation as ``torch.nn`` (so
``load_state_dict`` works both ways and ``torch.manual_seed`` gives the same start), and the same
``forward(input, hx=None)`` contract: time-major ``[T,B,I]`` unless ``batch_first`` (``[B,T,I]``),
unbatched ``[T,I]``, or a ``PackedSequence`` (sorted or not); returns ``(output, h_n)``, for the
LSTM ``(output, (h_n, c_n))``, states ``[D*L,B,H]``. The math is torch's: LSTM without TF1's
forget bias, GRU reset-after. Inter-layer dropout follows ``module.training`` and draws its
masks with torch's RNG, as torch's own CPU kernels draw them.

Shape legend: B batch, T time steps, I input size, H hidden size, L layers, D directions (2 when
bidirectional), G gates.
"""
from __future__ import annotations

import math
import numbers
import warnings
from types import SimpleNamespace

import torch
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from rnnkern import backends
from rnnkern.cellspec import CellSpec
from rnnkern.layers import _Recurrent
from rnnkern.torch.function import recurrent_stack, stack_config

__all__ = ["LSTM", "GRU", "RNN"]

_DTYPES = (torch.float32, torch.float64)


def _param_shapes(kind, input_size, hidden_size, num_layers, directions):
    """``{name: shape}`` in PyTorch's order, as :meth:`rnnkern.layers.LSTM.param_shapes` gives
    them (the one copy of that layout), without building a layer's NumPy weights."""
    layer = SimpleNamespace(spec=CellSpec(kind), input_size=input_size,
                            hidden_size=hidden_size, num_layers=num_layers,
                            num_directions=directions, output_size=directions * hidden_size)
    return _Recurrent.param_shapes(layer)


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value}")
    return int(value)


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
    return value


class _RecurrentModule(torch.nn.Module):
    """What the three modules share; use :class:`LSTM`, :class:`GRU` or :class:`RNN`."""

    kind = None         # "lstm" | "gru" | "rnn", set by subclasses
    torch_name = None   # "LSTM" | "GRU" | "RNN"

    def __init__(self, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                 bidirectional, device, dtype, *, nonlinearity="tanh", proj_size=0,
                 backend="auto"):
        super().__init__()
        self.input_size = _check_int("input_size", input_size)
        self.hidden_size = _check_int("hidden_size", hidden_size)
        self.num_layers = _check_int("num_layers", num_layers)
        self.bias = _check_bool("bias", bias)
        self.batch_first = _check_bool("batch_first", batch_first)
        self.bidirectional = _check_bool("bidirectional", bidirectional)
        if (isinstance(dropout, bool) or not isinstance(dropout, numbers.Real)
                or not 0 <= dropout <= 1):
            raise ValueError(f"dropout should be a number in range [0, 1] representing the "
                             f"probability of an element being zeroed, got {dropout!r}")
        self.dropout = float(dropout)
        if dropout > 0 and num_layers == 1:
            warnings.warn(f"dropout option adds dropout after all but last recurrent layer, so "
                          f"non-zero dropout expects num_layers greater than 1, but got "
                          f"dropout={dropout} and num_layers={num_layers}", stacklevel=3)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity {nonlinearity!r}. Select from 'tanh' or "
                             f"'relu'.")
        self.nonlinearity = nonlinearity
        if proj_size != 0:
            raise NotImplementedError(f"rnnkern.torch.{self.torch_name}: proj_size={proj_size} "
                                      f"is not supported (rnnkern's kernels have no projection); "
                                      f"use torch.nn.LSTM for projections")
        self.proj_size = 0
        if not bias:
            raise NotImplementedError(f"rnnkern.torch.{self.torch_name}: bias=False is not "
                                      f"supported; use torch.nn.{self.torch_name} or bias=True")
        if backend != "auto":
            backends._check_name(backend)
        self.backend = backend
        if dtype is not None and dtype not in _DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64 (rnnkern's kernels), "
                            f"got {dtype}")
        self._stack_config = stack_config(self.kind, nonlinearity, self.num_layers,
                                          self.bidirectional, backend)
        shapes = _param_shapes(self.kind, self.input_size, self.hidden_size, self.num_layers,
                               self.num_directions)
        self._flat_weights_names = list(shapes)
        for name, shape in shapes.items():
            self.register_parameter(
                name, torch.nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters
    @property
    def num_directions(self):
        """D: 2 when bidirectional, else 1."""
        return 2 if self.bidirectional else 1

    def reset_parameters(self):
        """U(-1/sqrt(H), 1/sqrt(H)) for every parameter in registration order: torch.nn's
        draws, so the same seed gives the same weights as ``torch.nn``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            torch.nn.init.uniform_(weight, -bound, bound)

    @property
    def all_weights(self):
        """Parameters grouped per layer and direction, as ``torch.nn.RNNBase.all_weights``."""
        names = self._flat_weights_names
        return [[getattr(self, n) for n in names[i:i + 4]] for i in range(0, len(names), 4)]

    def flatten_parameters(self):
        """No-op (torch.nn's compacts weights for cuDNN; rnnkern reads them where they are)."""

    def _weights(self):
        ws = [getattr(self, n) for n in self._flat_weights_names]
        return [w if w.is_contiguous() else w.contiguous() for w in ws]

    # ------------------------------------------------------------------ checks
    def _check_input(self, x, name):
        """x [B,T,I] (batch-major view of the user's input)."""
        w = self.weight_ih_l0
        if not x.is_floating_point() or x.dtype != w.dtype:
            raise TypeError(f"{name} must have the dtype of the module's parameters, {w.dtype}, "
                            f"got {x.dtype}")
        if x.device != w.device:
            raise ValueError(f"{name} must be on the module's device, {w.device}, "
                             f"got {x.device}")
        on_gpu = x.device.type == "cuda"
        if self.backend != "auto" and (self.backend == "cuda") != on_gpu:
            raise ValueError(f"backend {self.backend!r} cannot run {name} on {x.device}: CUDA "
                             f"tensors run on 'cuda', CPU tensors on 'numpy', 'numba' or 'cpp'")
        if x.shape[2] != self.input_size:
            raise ValueError(f"{name}.size(-1) must be equal to input_size. "
                             f"Expected {self.input_size}, got {x.shape[2]}")

    def _state(self, value, name, B, x, unbatched):
        """A [D*L,B,H] state tensor ([D*L,H] for unbatched input), checked."""
        shape = (self.num_directions * self.num_layers, B, self.hidden_size)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
        if unbatched:
            if value.dim() != 2:
                raise ValueError(f"For unbatched 2-D input, {name} should also be 2-D "
                                 f"[D*L,H] = {(shape[0], shape[2])} but got a "
                                 f"{value.dim()}-D tensor")
            value = value.unsqueeze(1)
        if tuple(value.shape) != shape:
            raise ValueError(f"Expected {name} size {shape} ([D*L,B,H]), "
                             f"got {list(value.shape)}")
        if value.dtype != x.dtype or value.device != x.device:
            raise TypeError(f"{name} must have the input's dtype and device ({x.dtype}, "
                            f"{x.device}), got ({value.dtype}, {value.device})")
        return value.contiguous()

    def _initial_state(self, hx, B, x, unbatched):
        """(h0, c0 or None), each [D*L,B,H]; (None, None) for zeros."""
        if hx is None:
            return None, None
        if self.kind != "lstm":
            if isinstance(hx, (tuple, list)):
                raise TypeError(f"hx of a {self.torch_name} must be one tensor [D*L,B,H], "
                                f"got a {type(hx).__name__}")
            return self._state(hx, "hx", B, x, unbatched), None
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("hx of an LSTM must be a tuple (h_0, c_0), each [D*L,B,H]")
        return (self._state(hx[0], "hx[0] (h_0)", B, x, unbatched),
                self._state(hx[1], "hx[1] (c_0)", B, x, unbatched))

    # ------------------------------------------------------------------ dropout
    def _dropout_masks(self, B, T, x, packed):
        """L-1 inverted-dropout masks [B,T,D*H], or None outside training or without dropout.
        Drawn as torch's CPU kernels draw theirs (``bernoulli_(1-p)`` on the layer output in
        its own layout: [T,B,D*H], or the packed rows of a PackedSequence), so one
        ``torch.manual_seed`` gives torch.nn's masks."""
        p = self.dropout
        if not (self.training and p > 0 and self.num_layers > 1):
            return None
        DH = self.num_directions * self.hidden_size
        masks = []
        for _ in range(self.num_layers - 1):
            rows = (packed.data.shape[0], DH) if packed is not None else (T, B, DH)
            if p == 1:
                noise = torch.zeros(rows, dtype=x.dtype, device=x.device)
            else:
                noise = torch.empty(rows, dtype=x.dtype, device=x.device).bernoulli_(1 - p)
                noise.div_(1 - p)
            if packed is not None:
                noise, _ = pad_packed_sequence(
                    PackedSequence(noise, packed.batch_sizes, packed.sorted_indices,
                                   packed.unsorted_indices), batch_first=True)
            else:
                noise = noise.transpose(0, 1)
            masks.append(noise.contiguous())
        return masks

    # ------------------------------------------------------------------ forward
    def forward(self, input, hx=None):
        """See the class docstring."""
        packed = input if isinstance(input, PackedSequence) else None
        lengths, unbatched = None, False
        if packed is not None:
            x, lengths = pad_packed_sequence(packed, batch_first=True)   # rows in user order
            name = "input.data"
        else:
            if not isinstance(input, torch.Tensor):
                raise TypeError(f"input must be a tensor or a PackedSequence, "
                                f"got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"{self.torch_name}: Expected input to be 2D or 3D, got "
                                 f"{input.dim()}D instead")
            unbatched = input.dim() == 2
            x = input.unsqueeze(0) if unbatched else (
                input if self.batch_first else input.transpose(0, 1))
            name = "input"
        self._check_input(x, name)
        B, T = x.shape[0], x.shape[1]
        h0, c0 = self._initial_state(hx, B, x, unbatched)
        out, h_n, c_n = recurrent_stack(
            self._stack_config, x.contiguous(), h0, c0, lengths,
            self._dropout_masks(B, T, x, packed), self._weights())
        if packed is not None:
            output = _pack_like(out, lengths, packed)
        elif unbatched:
            output, h_n = out.squeeze(0), h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        else:
            output = out if self.batch_first else out.transpose(0, 1)
        return output, (h_n if c_n is None else (h_n, c_n))

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.kind == "rnn" and self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


def _pack_like(out, lengths, packed):
    """out [B,T,D*H] (rows in the user's order) as a PackedSequence laid out as ``packed``."""
    if packed.sorted_indices is not None:
        out, lengths = out.index_select(0, packed.sorted_indices), \
            lengths.index_select(0, packed.sorted_indices.cpu())
    # batch_sizes[t] rows are valid at step t; rows are sorted by decreasing length
    data = torch.nn.utils.rnn.pack_padded_sequence(out, lengths, batch_first=True).data
    return PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                          packed.unsorted_indices)


def _document(cls, math_text, extra_args):
    cls.__doc__ = f"""``torch.nn.{cls.torch_name}`` running rnnkern's kernels.

    {math_text}

    Args (``torch.nn.{cls.torch_name}``'s):
        input_size:    I, features of each input step
        hidden_size:   H, units of each layer
        num_layers:    L, layers stacked (layer k > 0 reads layer k-1's D*H outputs)
{extra_args}        bias:          must be True (False raises NotImplementedError)
        batch_first:   True: input/output [B,T,*]; False (default): [T,B,*]
        dropout:       probability of zeroing each output of every layer but the last, in
                       training (masks from torch's RNG)
        bidirectional: True adds a reverse direction per layer (D = 2)
        device, dtype: where the parameters live; float32 or float64
        backend:       keyword only, rnnkern's extra: "auto" (the fastest CPU backend; CUDA
                       tensors run on "cuda") or one of "numpy", "numba", "cpp", "cuda"

    Inputs ``input, hx``: input [T,B,I] ([B,T,I] if batch_first), [T,I] unbatched, or a
    PackedSequence; hx {"a tuple (h_0, c_0)" if cls.kind == "lstm" else "h_0"}, each [D*L,B,H]
    ([D*L,H] unbatched), None for zeros.

    Outputs ``output, {"(h_n, c_n)" if cls.kind == "lstm" else "h_n"}``: output [T,B,D*H]
    ([B,T,D*H] if batch_first; a PackedSequence for one), the final states [D*L,B,H] (each
    row's state after its last valid step for packed input).

    Parameters: ``weight_ih_l{{k}}`` [G*H, I or D*H], ``weight_hh_l{{k}}`` [G*H,H],
    ``bias_ih_l{{k}}``, ``bias_hh_l{{k}}`` [G*H] (G = {cls.gates}), ``_reverse`` for direction 1.

    Example::

        >>> import rnnkern.torch as rkt
        >>> m = rkt.{cls.torch_name}(10, 20, num_layers=2, batch_first=True)
        >>> m.load_state_dict(torch.nn.{cls.torch_name}(10, 20, 2, batch_first=True).state_dict())
        >>> output, state = m(torch.randn(3, 5, 10))       # output [3,5,20]
    """
    return cls


class LSTM(_RecurrentModule):
    kind, torch_name, gates = "lstm", "LSTM", 4

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None, *,
                 backend="auto"):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, proj_size=proj_size, backend=backend)


class GRU(_RecurrentModule):
    kind, torch_name, gates = "gru", "GRU", 3

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, *, backend="auto"):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, backend=backend)


class RNN(_RecurrentModule):
    kind, torch_name, gates = "rnn", "RNN", 1

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None,
                 *, backend="auto"):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device, dtype, nonlinearity=nonlinearity,
                         backend=backend)


_document(LSTM, "i, f, g, o = sigmoid/sigmoid/tanh/sigmoid of ``x W_ih^T + b_ih + h W_hh^T + "
                "b_hh`` (gate blocks in that order); ``c' = f c + i g``, ``h' = o tanh(c')``.",
          "        proj_size:     must be 0 (projections raise NotImplementedError)\n")
_document(GRU, "r, z = sigmoid(...); ``n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn))`` "
               "(reset-after); ``h' = (1 - z) n + z h``.", "")
_document(RNN, "``h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)``.",
          "        nonlinearity:  'tanh' (default) or 'relu', the ``act`` above\n")
