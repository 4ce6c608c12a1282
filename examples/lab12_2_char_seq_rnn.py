"""Lab 12-2, char-seq RNN: predict each next character of " if you want you".

    python examples/lab12_2_char_seq_rnn.py [--steps 50] [--seed 0] [--every N] [--quiet]

The lab's recipe on a longer string: x = sample[:-1], y = sample[1:] (15 steps), one-hot ->
LSTM(C) -> fully connected C (C = 10 distinct characters), ``sequence_loss``, Adam 0.1, 50
full-batch steps, printing ``i loss: ... Prediction: ...``; the last prediction is
``if you want you``. The vocabulary is sorted (the lab used ``set()`` order, which varies).
"""
from __future__ import annotations

import argparse

import rnnkern as rk
from rnnkern.examples._common import add_common_args, parse, should_print
from rnnkern.examples.lab12_1_hello_rnn import build


SAMPLE = " if you want you"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sample", default=SAMPLE, help="the string to learn (default %(default)r)")
    add_common_args(p, every=1)
    args = parse(p, argv)

    vocab = rk.CharVocab.from_text(args.sample)
    ids = vocab.encode(args.sample)
    x_data, y_data = ids[None, :-1], ids[None, 1:]        # [B=1,T=len-1]
    model = build(len(vocab), len(vocab), args.seed, args.backend)
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(lr=args.lr))

    for i in range(args.steps):
        loss = step(x_data, y_data)      # forward, sequence_loss, backward, Adam
        if should_print(args, i, args.steps - 1):
            result = rk.argmax(model(x_data))
            print(i, "loss:", f"{loss:.6f}", "Prediction:", vocab.decode(result[0]))

    prediction = vocab.decode(rk.argmax(model(x_data))[0])
    if args.quiet:
        print(f"lab12-2 char-seq: {args.steps} steps, loss {loss:.4f}, Prediction: {prediction}")
    return {"loss": loss, "prediction": prediction, "target": args.sample[1:]}


if __name__ == "__main__":
    main()
