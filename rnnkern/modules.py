"""Stateless-in-time building blocks that sit around the recurrent layers.

:class:`Dense` (per time step), :class:`Embedding`, :class:`OneHot`, :class:`Dropout` and
:class:`LastStep` (many-to-one: the output at each sequence's last valid step). Each one has
``forward(x, lengths=None) -> y``, ``backward(dy) -> dx`` (None when the input is integer ids),
``params``/``grads`` dicts and ``train()``/``eval()``. ``backward`` overwrites ``grads`` (it does
not accumulate, unlike PyTorch's ``.grad``), as the recurrent layers do.

Devices: ``to("cuda")``/``to("cpu")`` moves a module's parameters, gradients and fixed tables
(:mod:`rnnkern.device`); every module computes with the array module of its input (NumPy or
CuPy), and an input on another device than the module's arrays raises ValueError naming both.

Shape legend: B batch, T time steps, F features (``in_features``), O ``out_features``,
V vocabulary (``num_embeddings``), E ``embedding_dim``.
"""
from __future__ import annotations

import numbers

import numpy as np

from .device import (array_module, check_device, check_range, check_same_device, device_of,
                     is_device_array, to_device)
from .layers import _as_dtype, _positive_int, dropout_mask


def _as_array(x):
    """``x`` itself when it is an array (NumPy or CuPy), else ``np.asarray(x)``."""
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def _check_ids(x, limit, name):
    """Integer ids array, every id in [0, limit). Ids on the GPU are range-checked only when
    ``config.CHECK_FINITE_ON_DEVICE`` is set: the check is a device-to-host read."""
    x = _as_array(x)
    if x.dtype.kind not in "iu":
        raise TypeError(f"{name} input must be integer ids, got dtype {x.dtype}")
    check_range(x, f"{name} ids", 0, limit, f"[0, {limit})")
    return x


class Module:
    """Shared plumbing: params/grads dicts, training flag, ``__call__``."""

    def __init__(self):
        self.params = {}
        self.grads = {}
        self.training = True

    def __call__(self, x, lengths=None):
        return self.forward(x, lengths)

    def train(self, mode=True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def _need_forward(self, saved):
        if saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward() needs a forward() call first")

    # ------------------------------------------------------------------ device
    def _fixed(self):
        """``{attribute: array}`` the module keeps besides its parameters (OneHot's table)."""
        return {}

    @property
    def device(self):
        """Where the module's arrays live, "cpu" or "cuda"; None for a module with none
        (Dropout, LastStep), which runs wherever its input is."""
        for a in (*self.params.values(), *self._fixed().values()):
            return device_of(a)
        return None

    def to(self, device):
        """Move parameters, gradients and fixed tables to ``device`` ("cpu" or "cuda";
        copies); what the last forward kept for a backward is dropped. Returns the module."""
        device = check_device(device)
        self.params = {k: to_device(v, device) for k, v in self.params.items()}
        self.grads = {k: to_device(v, device) for k, v in self.grads.items()}
        for name, a in self._fixed().items():
            setattr(self, name, to_device(a, device))
        for attr in ("_saved", "_mask", "_x", "_ids"):
            if getattr(self, attr, None) is not None:
                setattr(self, attr, None)
        return self

    def _check_device(self, a, what):
        """ValueError unless ``a`` lives where this module's arrays do."""
        device = self.device
        if device is not None:
            check_same_device(a, device, what, type(self).__name__)


class Dense(Module):
    r"""Fully connected layer :math:`y = x W^T + b`, applied at every time step.

    Args:
        in_features (F), out_features (O)
        bias:  add a bias (default True)
        init:  "torch" (default): W and b ~ U(-1/sqrt(F), 1/sqrt(F)), as ``torch.nn.Linear``;
               "glorot": W ~ U(+-sqrt(6/(F+O))) and b = 0, as TF1 ``fully_connected``/Keras ``Dense``
        seed, dtype ("float32" | "float64")

    Inputs ``x [B,F]`` or ``[B,T,F]`` (any leading dimensions); output ``[..., O]``.
    Parameters ``weight [O,F]``, ``bias [O]`` (PyTorch layout).

    Example::

        >>> fc = Dense(8, 5, seed=0)
        >>> logits = fc(outputs)          # outputs [B,T,8] -> logits [B,T,5]
    """

    def __init__(self, in_features, out_features, *, bias=True, init="torch", seed=None,
                 dtype="float32"):
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.dtype = _as_dtype(dtype)
        rng = np.random.default_rng(seed)
        F, O = self.in_features, self.out_features
        if init == "torch":
            bound = 1.0 / np.sqrt(F)
            w = rng.uniform(-bound, bound, (O, F))
            b = rng.uniform(-bound, bound, O)
        elif init == "glorot":
            bound = np.sqrt(6.0 / (F + O))
            w = rng.uniform(-bound, bound, (O, F))
            b = np.zeros(O)
        else:
            raise ValueError(f"init must be 'torch' or 'glorot', got {init!r}")
        self.params["weight"] = w.astype(self.dtype)
        if bias:
            self.params["bias"] = b.astype(self.dtype)
        self.grads = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._x = None

    def forward(self, x, lengths=None):
        x = _as_array(x)
        if x.dtype.kind != "f":
            raise TypeError(f"Dense input must be a floating-point array, got dtype {x.dtype}")
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"Dense input.shape[-1] must be equal to in_features. "
                             f"Expected {self.in_features}, got {x.shape[-1] if x.ndim else None}")
        self._check_device(x, "x")
        x = x.astype(self.dtype, copy=False)
        self._x = x
        # one 2-D GEMM over all B*T rows (3-D matmul broadcasting is much slower in NumPy)
        y = x.reshape(-1, self.in_features) @ self.params["weight"].T
        if "bias" in self.params:
            y += self.params["bias"]
        return y.reshape(x.shape[:-1] + (self.out_features,))

    def backward(self, dy):
        self._need_forward(self._x)
        x = self._x
        dy = _as_array(dy)
        self._check_device(dy, "dy")
        dy = dy.astype(self.dtype, copy=False)
        expected = x.shape[:-1] + (self.out_features,)
        if dy.shape != expected:
            raise ValueError(f"Dense dy must have shape {expected}, got {dy.shape}")
        dy2 = dy.reshape(-1, self.out_features)
        self.grads["weight"] = dy2.T @ x.reshape(-1, self.in_features)   # [O,F], one GEMM
        if "bias" in self.params:
            self.grads["bias"] = dy2.sum(axis=0)
        return (dy2 @ self.params["weight"]).reshape(x.shape)

    def __repr__(self):
        return (f"Dense({self.in_features}, {self.out_features}, bias={'bias' in self.params}, "
                f"dtype={self.dtype.name!r})")


class Embedding(Module):
    """Lookup table: integer ids ``[B,T]`` (or ``[B]``) -> vectors ``[B,T,E]``.

    Args:
        num_embeddings (V), embedding_dim (E), seed, dtype
        init: "normal" (default; N(0,1) as ``torch.nn.Embedding``) or "uniform" (U(-0.05, 0.05),
              Keras)

    Parameter ``weight [V,E]``. ``backward`` returns None (ids have no gradient); repeated ids
    accumulate into the same row of ``grads["weight"]``.
    """

    def __init__(self, num_embeddings, embedding_dim, *, init="normal", seed=None,
                 dtype="float32"):
        super().__init__()
        self.num_embeddings = _positive_int("num_embeddings", num_embeddings)
        self.embedding_dim = _positive_int("embedding_dim", embedding_dim)
        self.dtype = _as_dtype(dtype)
        rng = np.random.default_rng(seed)
        shape = (self.num_embeddings, self.embedding_dim)
        if init == "normal":
            w = rng.standard_normal(shape)
        elif init == "uniform":
            w = rng.uniform(-0.05, 0.05, shape)
        else:
            raise ValueError(f"init must be 'normal' or 'uniform', got {init!r}")
        self.params["weight"] = w.astype(self.dtype)
        self.grads = {"weight": np.zeros_like(self.params["weight"])}
        self._ids = None

    def forward(self, x, lengths=None):
        ids = _check_ids(x, self.num_embeddings, "Embedding")
        self._check_device(ids, "ids")
        self._ids = ids
        return self.params["weight"][ids]

    def backward(self, dy):
        self._need_forward(self._ids)
        E = self.embedding_dim
        dy = _as_array(dy)
        self._check_device(dy, "dy")
        dy = dy.astype(self.dtype, copy=False)
        if dy.shape != self._ids.shape + (E,):
            raise ValueError(f"Embedding dy must have shape {self._ids.shape + (E,)}, got {dy.shape}")
        self.grads["weight"] = self.scatter_rows(self._ids, dy, out=None)
        return None

    def scatter_rows(self, ids, rows, out=None):
        """The table's gradient from its rows' gradients: ``out[v] = sum of rows[n] where
        ids[n] == v`` (zero for ids not present). ids [...] ints in [0, V), rows [..., E];
        out [V,E] (new when None). Returns out.

        On the GPU (CuPy arrays) the rows are added with ``cupyx.scatter_add`` (atomic adds:
        the summation order of repeated ids varies from run to run, within rounding)."""
        E = self.embedding_dim
        if out is None:
            out = array_module(self.params["weight"]).zeros_like(self.params["weight"])
        else:
            out.fill(0)
        if is_device_array(out):
            import cupyx
            ids = ids.reshape(-1)
            if ids.size:
                cupyx.scatter_add(out, ids, rows.reshape(-1, E))
            return out
        ids = np.asarray(ids).reshape(-1)
        if ids.size:
            # repeated ids add up. Sort, then sum each id's run of rows with reduceat: the sums
            # of np.add.at(out, ids, rows) (up to summation order), ~4x faster at char-rnn sizes.
            order = np.argsort(ids, kind="stable")
            sorted_ids = ids[order]
            starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
            out[sorted_ids[starts]] = np.add.reduceat(rows.reshape(-1, E)[order], starts, axis=0)
        return out

    def __repr__(self):
        return f"Embedding({self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype.name!r})"


class OneHot(Module):
    """Integer ids ``[B,T]`` (or ``[B]``) -> one-hot vectors ``[B,T,depth]``; no parameters.

    The lab's ``tf.one_hot`` input: ``OneHot(V)`` followed by ``LSTM(V, H)``. Same values as
    :func:`rnnkern.one_hot`; implemented as a lookup in a fixed identity table (an
    :class:`Embedding` that never trains) because that costs ~1 us per call at lab sizes, where
    building the array element by element dominated a whole training step.
    """

    def __init__(self, depth, *, dtype="float32"):
        super().__init__()
        self.depth = _positive_int("depth", depth)
        self.dtype = _as_dtype(dtype)
        self._table = np.eye(self.depth, dtype=self.dtype)

    def _fixed(self):
        return {"_table": self._table}

    def forward(self, x, lengths=None):
        ids = _check_ids(x, self.depth, "OneHot")
        self._check_device(ids, "ids")
        return self._table[ids]

    def backward(self, dy):
        return None

    def __repr__(self):
        return f"OneHot({self.depth}, dtype={self.dtype.name!r})"


class Dropout(Module):
    """Inverted dropout: in training, zero each element with probability ``p`` and scale the rest
    by ``1/(1-p)``; identity in eval mode. ``seed`` seeds its own generator."""

    def __init__(self, p=0.5, *, seed=None):
        super().__init__()
        if not (isinstance(p, numbers.Real) and 0.0 <= p < 1.0):
            raise ValueError(f"p must be a number in [0, 1), got {p!r}")
        self.p = float(p)
        self._rng = np.random.default_rng(seed)
        self._mask = None

    def forward(self, x, lengths=None):
        x = _as_array(x)
        if not self.training or self.p == 0.0:
            self._mask = 1.0
            return x
        # on the GPU: drawn there, keyed by one draw from self._rng (reproducible from the seed)
        self._mask = dropout_mask(self._rng, x.shape, self.p, x.dtype, device=device_of(x))
        return x * self._mask

    def backward(self, dy):
        self._need_forward(self._mask)
        return _as_array(dy) * self._mask

    def __repr__(self):
        return f"Dropout(p={self.p})"


class LastStep(Module):
    """Many-to-one: ``[B,T,F] -> [B,F]``, each row's output at its last valid step.

    With ``lengths`` (ints [B] in [0,T]) row ``b`` takes step ``lengths[b]-1``; a row with length 0
    gives zeros (the recurrent layers output zeros there too), as does every row when T = 0.
    Without lengths: step ``T-1``.
    Put it after a recurrent layer and before a :class:`Dense` (lab 12-5's ``outputs[:, -1]``).
    """

    def forward(self, x, lengths=None):
        x = _as_array(x)
        xp = array_module(x)
        if x.ndim != 3:
            raise ValueError(f"LastStep input must have 3 dimensions [B,T,F], got shape {x.shape}")
        B, T, _ = x.shape
        if lengths is None:
            idx = xp.full(B, T - 1, dtype=np.int64)
        else:
            idx = _as_array(lengths)
            if idx.dtype.kind not in "iu" or idx.shape != (B,):
                raise ValueError(f"lengths must be integers of shape [B] = ({B},), "
                                 f"got {idx.dtype} {idx.shape}")
            check_range(idx, "lengths", 0, T + 1, f"[0, T] = [0, {T}]")
            idx = xp.asarray(idx).astype(np.int64) - 1      # on x's device
        self._saved = (x.shape, x.dtype, idx)
        if T == 0:  # no step to take: every row is a length-0 row
            return xp.zeros((B, x.shape[2]), dtype=x.dtype)
        rows = xp.arange(B)
        y = x[rows, np.maximum(idx, 0)]
        y[idx < 0] = 0
        return y

    def backward(self, dy):
        self._need_forward(getattr(self, "_saved", None))
        shape, dtype, idx = self._saved
        dy = _as_array(dy)
        if dy.shape != (shape[0], shape[2]):
            raise ValueError(f"LastStep dy must have shape {(shape[0], shape[2])}, got {dy.shape}")
        xp = array_module(idx)
        dx = xp.zeros(shape, dtype=dtype)
        valid = idx >= 0
        dx[xp.arange(shape[0])[valid], idx[valid]] = dy[valid]
        return dx

    def __repr__(self):
        return "LastStep()"
