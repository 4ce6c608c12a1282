"""The time and batch axes of an exported graph: padding, lengths, the valid-step mask, the
in-length reversal.

The graph runs time-major (``[T', B', F]``) on ``T' = max(T, 1)`` steps of ``B' = max(B, 1)``
rows: an input with T = 0 gets one padding step and one with B = 0 one padding row (of length
0), because ONNX runtimes do not all take empty tensors (onnxruntime's GRU operator aborts the
process when T = 0, its LSTM and GRU operators when B = 0). Every row of length 0 (all of them
when T = 0) keeps its state and outputs zeros through the masks below, and the padding is
sliced off the outputs, so the graph gives what ``model.forward`` gives: outputs
``[B, 0, ...]`` and the initial state for T = 0, empty outputs and states for B = 0.

``L`` is each row's length, int64 [B']: the ``lengths`` input clipped to [0, T] (as rnnkern's
kernels treat a length outside it), or T for every row.
"""
from __future__ import annotations

import numpy as np

from .graph import TensorProto


class Steps:
    """Tensors about the time (and batch) axes, each built once, on first use."""

    def __init__(self, g, x_tb, rank, lengths=None):
        """``x_tb``: the time-major model input ([T,B] ids or [T,B,I]); ``rank``: its rank;
        ``lengths``: the name of the lengths input, or None. :attr:`x` is the padded input."""
        self.g = g
        self.with_lengths = lengths is not None
        self.T = g.shape_dim(x_tb, 0)          # [1] int64, before padding
        self.B = g.shape_dim(x_tb, 1)
        one, zero = g.ints(1), g.ints(0)
        self._missing_b = g.op("Max", [g.op("Sub", [one, self.B]), zero], hint="pad_rows")
        missing_t = g.op("Max", [g.op("Sub", [one, self.T]), zero], hint="pad_steps")
        pads = g.op("Concat", [g.ints(*([0] * rank)), missing_t, self._missing_b]
                    + ([g.ints(0)] if rank == 3 else []), axis=0, hint="pads")
        self.x = g.op("Pad", [x_tb, pads], hint="padded")
        self.Bp = g.shape_dim(self.x, 1)        # B' = max(B, 1)
        if lengths is None:
            self.L = g.op("Expand", [self.T, self.Bp], hint="lengths")
        else:
            lengths = g.op("Pad", [lengths, g.op("Concat", [zero, self._missing_b], axis=0)])
            self.L = g.op("Min", [g.op("Max", [lengths, g.const(np.int64(0))]), self.T],
                          hint="lengths")
        self._cache = {}

    def pad_state(self, state):
        """A [N,B,H] state input with the padding row of B = 0 (zeros)."""
        g = self.g
        pads = g.op("Concat", [g.ints(0, 0, 0, 0), self._missing_b, g.ints(0)], axis=0)
        return g.op("Pad", [state, pads], hint="state")

    def unpad(self, y, per_step):
        """``y`` without the padding: [T',B',F] -> [T,B,F] (``per_step``), [B',F] -> [B,F]."""
        g = self.g
        if per_step:
            ends, axes = g.op("Concat", [self.T, self.B], axis=0), g.ints(0, 1)
            return g.op("Slice", [y, g.ints(0, 0), ends, axes], hint="unpadded")
        return g.op("Slice", [y, g.ints(0), self.B, g.ints(0)], hint="unpadded")

    def unpad_state(self, state, name):
        """A final state [N,B',H] -> the output ``name`` [N,B,H]."""
        g = self.g
        return g.op("Slice", [state, g.ints(0), self.B, g.ints(1)], [name])[0]

    def _once(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def steps_index(self):
        """[T',1] int64: 0..T'-1."""
        g = self.g
        return self._once("t", lambda: g.unsqueeze(g.op(
            "Range", [g.const(np.int64(0)), g.scalar_dim(self.x, 0), g.const(np.int64(1))],
            hint="t"), 1))

    def mask(self):
        """[T',B',1] bool: step t of row b is valid (t < L[b])."""
        g = self.g
        return self._once("mask", lambda: g.unsqueeze(
            g.op("Less", [self.steps_index(), g.unsqueeze(self.L, 0)], hint="valid"), 2))

    def positive(self):
        """[1,B',1] bool: the row has at least one valid step."""
        g = self.g
        return self._once("positive", lambda: g.unsqueeze(
            g.op("Greater", [self.L, g.const(np.int64(0))], hint="nonempty"), 0, 2))

    def seq_lens(self):
        """int32 [B']: the ``sequence_lens`` of the ONNX recurrent operators, ``max(L, 1)`` (rows
        of length 0 run one step whose output and state the graph then discards)."""
        g = self.g
        return self._once("seq_lens", lambda: g.op(
            "Cast", [g.op("Max", [self.L, g.const(np.int64(1))])], hint="seq_lens",
            to=TensorProto.INT32))

    def reversal(self):
        """[T',B',1] int64: ``L[b]-1-t`` for t < L[b], else t: reverses each row within its
        length (padding stays in place; its own inverse), as rnnkern's reverse direction."""
        g = self.g

        def build():
            t = self.steps_index()
            n = g.unsqueeze(self.L, 0)
            back = g.op("Sub", [g.op("Sub", [n, g.const(np.int64(1))]), t])
            return g.unsqueeze(g.op("Where", [g.op("Less", [t, n]), back,
                                              g.op("Expand", [t, g.op("Shape", [back])])],
                                    hint="reversal"), 2)
        return self._once("reversal", build)

    def reverse(self, x):
        """``x`` [T',B',F] with every row reversed within its length."""
        g = self.g
        idx = g.op("Expand", [self.reversal(), g.op("Shape", [x])])
        return g.op("GatherElements", [x, idx], axis=0, hint="reversed")

