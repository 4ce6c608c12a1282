"""What distinguishes one recurrent cell from another, in one small frozen record.

Every backend receives a :class:`CellSpec` beside the weights, so the seam between the layer API
and the kernels carries no layer object and no flags scattered over keyword arguments.
"""
from __future__ import annotations

from dataclasses import dataclass

GATES = {"rnn": 1, "lstm": 4, "gru": 3}


@dataclass(frozen=True)
class CellSpec:
    """One recurrent cell's kind and options.

    kind          "rnn" | "lstm" | "gru"
    nonlinearity  rnn only: "tanh" | "relu"
    forget_bias   lstm only: added to the forget-gate pre-activation at run time
                  (TF1 ``BasicLSTMCell`` uses 1.0; 0.0 reproduces PyTorch)
    reset_after   gru only: True = PyTorch/cuDNN/Keras-2 (``r * (W_hn h + b_hn)``),
                  False = TF1 ``GRUCell`` (``W_hn (r * h)``)
    """

    kind: str
    nonlinearity: str = "tanh"
    forget_bias: float = 0.0
    reset_after: bool = True

    def __post_init__(self):
        if self.kind not in GATES:
            raise ValueError(f"cell kind must be one of {sorted(GATES)}, got {self.kind!r}")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {self.nonlinearity!r}")

    @property
    def gates(self) -> int:
        """G: number of gate blocks stacked in the weight rows (LSTM 4, GRU 3, RNN 1)."""
        return GATES[self.kind]

    @property
    def has_cell_state(self) -> bool:
        return self.kind == "lstm"
