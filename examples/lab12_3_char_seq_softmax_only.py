"""Lab 12-3, softmax only: the same task as lab 12-2 without the RNN, to see why memory matters.

    python examples/lab12_3_char_seq_softmax_only.py [--steps 3000] [--seed 0] [--every N] [--quiet]

One-hot character -> softmax layer (no recurrence), ``sequence_loss``, Adam 0.1, 3000 steps.
Without memory the model can only learn bigram statistics. After a space the next character
is ``i``, ``y``, ``w``, ``y`` at the four spaces, so the best it can do there is
``-(1/2 ln 1/2 + 2 * 1/4 ln 1/4) = 1.5 ln 2`` nats per space, and every other position is
deterministic: the loss floor is ``4 * 1.5 ln 2 / 15 = 6 ln 2 / 15 = 0.277259``, and the argmax
after a space is always ``y``, so the prediction ends as ``yf you yant you``.
"""
from __future__ import annotations

import argparse
import math

import rnnkern as rk
from rnnkern.examples._common import add_common_args, parse, should_print
from rnnkern.examples.lab12_2_char_seq_rnn import SAMPLE


BIGRAM_FLOOR = 6 * math.log(2) / 15   # 0.277259 for " if you want you" (see the docstring)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=0.1)
    add_common_args(p, every=100)
    args = parse(p, argv)

    vocab = rk.CharVocab.from_text(SAMPLE)
    ids = vocab.encode(SAMPLE)
    x_data, y_data = ids[None, :-1], ids[None, 1:]
    C = len(vocab)
    # the lab's softmax_w [C,C] and softmax_b [C] on the one-hot input (glorot, as get_variable)
    model = rk.Sequential([rk.OneHot(C), rk.Dense(C, C, init="glorot", seed=args.seed)])
    step = rk.TrainStep(model, rk.sequence_loss, rk.Adam(lr=args.lr))

    for i in range(args.steps):
        loss = step(x_data, y_data)      # forward, sequence_loss, backward, Adam
        if should_print(args, i, args.steps - 1):
            result = rk.argmax(model(x_data))
            print(i, "loss:", f"{loss:.6f}", "Prediction:", vocab.decode(result[0]))

    prediction = vocab.decode(rk.argmax(model(x_data))[0])
    if args.quiet:
        print(f"lab12-3 softmax only: {args.steps} steps, loss {loss:.6f} "
              f"(bigram floor 6 ln2/15 = {BIGRAM_FLOOR:.6f}), Prediction: {prediction}")
    return {"loss": loss, "prediction": prediction, "floor": BIGRAM_FLOOR}


if __name__ == "__main__":
    main()
