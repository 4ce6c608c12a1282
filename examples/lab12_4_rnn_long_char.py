"""Lab 12-4, long char RNN: learn a whole sentence from overlapping windows of 10 characters.

    python examples/lab12_4_rnn_long_char.py [--steps 500] [--seed 0] [--every N] [--all-windows] [--quiet]

Windows ``x = s[i:i+10]``, ``y = s[i+1:i+11]`` of the sentence below (170 windows, one full
batch), one-hot -> 2-layer LSTM(C) -> fully connected C (C = 25 distinct characters),
``sequence_loss``, Adam 0.1, 500 steps. The lab prints ``i j prediction loss`` for every window
j at every step; here ``--every N`` prints every N-th step and only window 0 unless
``--all-windows``. At the end, window 0's prediction plus the last predicted character of every
other window spell the sentence from its second character on (``f you want to build ...``), and
every character of it matches except the first: it follows a lone ``i`` with no context, and
``i`` is followed by ``f``, ``p``, ``g``, ``t``, ``m`` ... elsewhere in the sentence.
"""
from __future__ import annotations

import argparse

import rnnkern as rk
from rnnkern.examples._common import add_common_args, parse, should_print, tf1_glorot_init


SENTENCE = ("if you want to build a ship, don't drum up people together to "
            "collect wood and don't assign them tasks and work, but rather "
            "teach them to long for the endless immensity of the sea.")


def build(vocab_size, hidden_size, num_layers, seed, backend):
    """One-hot -> LSTM(H, L layers) -> Dense(C): MultiRNNCell of BasicLSTMCells + fully_connected."""
    lstm = tf1_glorot_init(rk.LSTM(vocab_size, hidden_size, num_layers, backend=backend), seed)
    fc = rk.Dense(hidden_size, vocab_size, init="glorot", seed=seed + 1)
    return rk.Sequential([rk.OneHot(vocab_size), lstm, fc])


def reconstruct(vocab, pred_ids):
    """Window 0's whole prediction, then the last predicted character of each later window."""
    return vocab.decode(pred_ids[0]) + vocab.decode(pred_ids[1:, -1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seq-length", type=int, default=10)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--all-windows", action="store_true",
                   help="print every window's prediction at each printed step (the lab's output)")
    add_common_args(p, every=50)
    args = parse(p, argv)

    vocab = rk.CharVocab.from_text(SENTENCE)
    C = len(vocab)
    x_data, y_data = rk.shifted_windows(vocab.encode(SENTENCE), args.seq_length)   # [170,10]
    if not args.quiet:
        print(f"{len(x_data)} windows of {args.seq_length}, vocabulary of {C}: "
              f"{''.join(vocab.chars)!r}")
    model = build(C, C, args.layers, args.seed, args.backend)
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(lr=args.lr))

    for i in range(args.steps):
        show = should_print(args, i, args.steps - 1)
        if show:
            logits = model(x_data)      # the lab prints these pre-update outputs with the loss
        loss = step(x_data, y_data)     # forward, sequence_loss, backward, Adam
        if show:
            index = rk.argmax(logits)
            for j in range(len(index) if args.all_windows else 1):
                print(i, j, vocab.decode(index[j]), f"{loss:.6f}")

    logits = model(x_data)
    final_loss = rk.sequence_loss(logits, y_data)
    text = reconstruct(vocab, rk.argmax(logits))
    exact = text[1:] == SENTENCE[2:]   # the first character has no context (see docstring)
    if args.quiet:
        print(f"lab12-4 long char: {len(x_data)} windows, {args.steps} steps, loss "
              f"{final_loss:.4f}, sentence reconstructed exactly after its first character: {exact}")
    print(text)
    return {"loss": final_loss, "text": text, "exact": exact, "windows": len(x_data)}


if __name__ == "__main__":
    main()
