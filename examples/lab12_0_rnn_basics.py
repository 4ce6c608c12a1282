"""Lab 12-0, RNN basics: what a recurrent cell returns, for one-hot "hello" characters.

    python examples/lab12_0_rnn_basics.py [--seed 0] [--quiet]

Walks the TF lab's cells with rnnkern: one step and five steps of an RNN(4 -> 2), a batch of
three words through an LSTM(4 -> 2), the same batch with ``lengths=[5, 3, 4]`` (outputs past each
length are exactly zero), a stack of three LSTM layers, and ``sequence_loss`` on the slides'
hand-made logits (0.596759, then 0.513015 and 0.371101 as the right class gains margin).
Weights are random (TF1 glorot init, seeded), so the printed cell outputs vary with ``--seed``;
the shapes, the zeros and the losses do not.
"""
from __future__ import annotations

import argparse

import numpy as np

import rnnkern as rk
from rnnkern.examples._common import add_common_args, parse, tf1_glorot_init


# one-hot characters, as in the lab
h = [1, 0, 0, 0]
e = [0, 1, 0, 0]
l = [0, 0, 1, 0]  # noqa: E741  (the lab's name)
o = [0, 0, 0, 1]

# slides' sequence_loss examples: targets [[1, 1, 1]], logits [1, 3, 2], weights ones
LOSS_CASES = [
    ("Loss: ", [[[0.2, 0.7], [0.6, 0.2], [0.2, 0.9]]]),
    ("Loss1:", [[[0.3, 0.7], [0.3, 0.7], [0.3, 0.7]]]),
    ("Loss2:", [[[0.1, 0.9], [0.1, 0.9], [0.1, 0.9]]]),
    ("Loss3:", [[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]]),
    ("Loss4:", [[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]]),
]


def _show(args, title, arr):
    if not args.quiet:
        print(title)
        print(np.array2string(np.asarray(arr), precision=5, suppress_small=True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p)
    args = parse(p, argv)
    seed, be = args.seed, args.backend
    result = {}

    # 1. one cell, one step: input 4 (one-hot) -> hidden 2
    cell = tf1_glorot_init(rk.RNN(4, 2, backend=be), seed)
    x_data = np.array([[h]], dtype=np.float32)                  # [B=1,T=1,I=4]
    outputs, _ = cell(x_data)
    print("one step:      x", x_data.shape, "-> outputs", outputs.shape)
    _show(args, "outputs", outputs)
    result["one_step_shape"] = outputs.shape

    # 2. the same cell over "hello": five steps
    x_data = np.array([[h, e, l, l, o]], dtype=np.float32)      # [1,5,4]
    outputs, _ = cell(x_data)
    print("hello:         x", x_data.shape, "-> outputs", outputs.shape)
    _show(args, "outputs", outputs)
    result["hello_shape"] = outputs.shape

    # 3. a batch of three words through an LSTM cell ('hello', 'eolll', 'lleel')
    x_data = np.array([[h, e, l, l, o],
                       [e, o, l, l, l],
                       [l, l, e, e, l]], dtype=np.float32)      # [3,5,4]
    lstm = tf1_glorot_init(rk.LSTM(4, 2, backend=be), seed + 1)
    outputs, (h_n, c_n) = lstm(x_data)
    print("batch of 3:    x", x_data.shape, "-> outputs", outputs.shape,
          "state h", h_n.shape, "c", c_n.shape)
    _show(args, "outputs", outputs)
    result["batch_shape"] = outputs.shape

    # 4. variable lengths: TF dynamic_rnn(sequence_length=[5, 3, 4])
    lengths = np.array([5, 3, 4])
    outputs, (h_n, _) = lstm(x_data, lengths=lengths)
    past = np.arange(5)[None, :] >= lengths[:, None]            # [B,T] steps past each length
    zeros_past = bool(np.all(outputs[past] == 0.0))
    last_valid = outputs[np.arange(3), lengths - 1]              # h_n is the last valid output
    print("lengths [5, 3, 4]: outputs", outputs.shape,
          "zeros past each length:", zeros_past,
          "h_n == last valid output:", bool(np.allclose(h_n[0], last_valid)))
    _show(args, "outputs", outputs)
    result["lengths_zeros"] = zeros_past
    result["lengths_outputs"] = outputs

    # 5. stacked cells: three LSTM(5) layers on x = arange(45) [3,5,3]
    x_data = np.arange(45, dtype=np.float32).reshape(3, 5, 3)
    stacked = tf1_glorot_init(rk.LSTM(3, 5, num_layers=3, backend=be), seed + 2)
    outputs, (h_n, c_n) = stacked(x_data)
    print("stacked x3:    x", x_data.shape, "-> outputs", outputs.shape,
          "state h", h_n.shape, "c", c_n.shape)
    _show(args, "outputs", outputs)
    result["stacked_shape"] = outputs.shape
    result["stacked_state_shape"] = h_n.shape

    # 6. sequence_loss on the slides' logits
    y_data = np.array([[1, 1, 1]])
    weights = np.ones((1, 3), dtype=np.float32)
    losses = []
    for label, logits in LOSS_CASES:
        value = rk.sequence_loss(np.array(logits, dtype=np.float32), y_data, weights)
        losses.append(value)
        print(label, f"{value:.6f}")
    result["losses"] = losses
    return result


if __name__ == "__main__":
    main()
