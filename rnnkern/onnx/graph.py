"""A small builder for ONNX graphs: unique names, constants as initializers, one call per node.

:class:`Graph` collects nodes, initializers and value infos; :meth:`Graph.body` opens a
subgraph (a Scan body) that shares the name counter and puts its constants in the main graph,
where the body reads them from the outer scope.
"""
from __future__ import annotations

import itertools

import numpy as np

from ._deps import require

onnx = require()
from onnx import TensorProto, helper, numpy_helper  # noqa: E402  (after the clear check)

ELEM_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
             np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
             np.dtype(np.bool_): TensorProto.BOOL}


def elem_type(dtype):
    return ELEM_TYPE[np.dtype(dtype)]


class Graph:
    """Nodes and initializers of one graph (or a subgraph sharing ``root``'s names)."""

    def __init__(self, root=None):
        self.root = root or self
        self.nodes = []
        self.inputs = []
        self.outputs = []
        if root is None:
            self.initializers = []
            self._counter = itertools.count()
            self._consts = {}

    def name(self, hint):
        """A fresh tensor name starting with ``hint``."""
        return f"{hint}_{next(self.root._counter)}"

    def const(self, value, dtype=None, hint="const"):
        """The name of an initializer holding ``value`` (equal small constants shared)."""
        a = np.array(value, dtype=dtype, order="C")   # (ascontiguousarray makes 0-d 1-d)
        root = self.root
        key = (a.dtype.str, a.shape, a.tobytes()) if a.size <= 16 else None
        if key is not None and key in root._consts:
            return root._consts[key]
        name = root.name(hint)
        root.initializers.append(numpy_helper.from_array(a, name))
        if key is not None:
            root._consts[key] = name
        return name

    def ints(self, *values):
        """A 1-D int64 constant."""
        return self.const(np.array(values, dtype=np.int64), hint="ints")

    def op(self, op_type, inputs, outputs=1, hint=None, **attrs):
        """Add a node; return its output name, or the list of its output names when
        ``outputs`` is a count other than 1 or a list of names (None: a fresh one)."""
        hint = hint or op_type.lower()
        if isinstance(outputs, int):
            names = [self.name(hint) for _ in range(outputs)]
        else:
            names = [self.name(hint) if n is None else n for n in outputs]
        self.nodes.append(helper.make_node(op_type, list(inputs), names,
                                           name=self.name(f"{op_type}"), **attrs))
        return names[0] if isinstance(outputs, int) and outputs == 1 else names

    def input(self, name, dtype, shape):
        self.inputs.append(helper.make_tensor_value_info(name, elem_type(dtype), shape))
        return name

    def output(self, name, dtype, shape):
        self.outputs.append(helper.make_tensor_value_info(name, elem_type(dtype), shape))
        return name

    def body(self):
        """A subgraph builder sharing this graph's names and initializers."""
        return Graph(root=self.root)

    def make_graph(self, name):
        init = self.initializers if self.root is self else []
        return helper.make_graph(self.nodes, name, self.inputs, self.outputs, init)

    # ------------------------------------------------------------------ shorthand
    def shape_dim(self, x, axis):
        """Dimension ``axis`` of ``x`` as a 1-D int64 tensor of one element."""
        return self.op("Gather", [self.op("Shape", [x]), self.ints(axis)], hint="dim", axis=0)

    def scalar_dim(self, x, axis):
        """Dimension ``axis`` of ``x`` as an int64 scalar."""
        return self.op("Gather", [self.op("Shape", [x]), self.const(np.int64(axis))],
                       hint="dim", axis=0)

    def unsqueeze(self, x, *axes):
        return self.op("Unsqueeze", [x, self.ints(*axes)])

    def squeeze(self, x, *axes):
        return self.op("Squeeze", [x, self.ints(*axes)])

    def zero(self, dtype):
        """A scalar zero of ``dtype``."""
        return self.const(np.zeros((), dtype=dtype), hint="zero")

    def zeros(self, shape, dtype):
        """Zeros of a run-time ``shape`` (a 1-D int64 tensor)."""
        value = numpy_helper.from_array(np.zeros(1, dtype=dtype), self.name("zero_value"))
        return self.op("ConstantOfShape", [shape], hint="zeros", value=value)
