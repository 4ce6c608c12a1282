"""Lab 12-1, hello RNN: learn to map "hihell" to "ihello", one character ahead.

    python examples/lab12_1_hello_rnn.py [--steps 50] [--seed 0] [--every N] [--quiet]

One-hot input (5 characters, the lab's order h i e l o) -> LSTM(5) -> fully connected 5 ->
``sequence_loss``, Adam 0.1 for 50 full-batch steps. Each step prints the lab's two lines
(``i loss: ... prediction: ... true Y: ...`` and ``Prediction str: ...``); it ends with
``Prediction str:  ihello``.
"""
from __future__ import annotations

import argparse

import rnnkern as rk
from rnnkern.examples._common import add_common_args, parse, should_print, tf1_glorot_init


IDX2CHAR = ["h", "i", "e", "l", "o"]   # the lab's order, not sorted
X_TEXT, Y_TEXT = "hihell", "ihello"


def build(vocab_size, hidden_size, seed, backend):
    """One-hot -> LSTM(H) -> Dense(C): the lab's BasicLSTMCell + fully_connected, TF1 init."""
    lstm = tf1_glorot_init(rk.LSTM(vocab_size, hidden_size, backend=backend), seed)
    fc = rk.Dense(hidden_size, vocab_size, init="glorot", seed=seed + 1)
    return rk.Sequential([rk.OneHot(vocab_size), lstm, fc])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.1)
    add_common_args(p, every=1)
    args = parse(p, argv)

    vocab = rk.CharVocab(IDX2CHAR)
    x_data = vocab.encode(X_TEXT)[None]     # [B=1,T=6] ids
    y_data = vocab.encode(Y_TEXT)[None]
    model = build(len(vocab), len(vocab), args.seed, args.backend)
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(lr=args.lr))

    for i in range(args.steps):
        loss = step(x_data, y_data)      # forward, sequence_loss, backward, Adam
        if should_print(args, i, args.steps - 1):
            result = rk.argmax(model(x_data))   # prediction after the update, as the lab
            print(i, "loss:", f"{loss:.6f}", "prediction: ", result, "true Y: ", y_data.tolist())
            print("\tPrediction str: ", vocab.decode(result[0]))

    prediction = vocab.decode(rk.argmax(model(x_data))[0])
    if args.quiet:  # otherwise the last step's lines already said it
        print(f"lab12-1 hihello: {args.steps} steps, loss {loss:.4f}")
        print("Prediction str: ", prediction)
    return {"loss": loss, "prediction": prediction}


if __name__ == "__main__":
    main()
