"""word-rnn: a word-level language model on tiny-shakespeare (or any text), then sampled.

    python examples/word_rnn.py train [--text PATH] [--epochs N] [--max-batches N] [--time-limit S]
    python examples/word_rnn.py sample [--checkpoint save/word_rnn.npz] [-n 200] [--prime "The"]

(also ``python -m rnnkern train --level word`` and ``python -m rnnkern sample``, which reads the
level from the checkpoint). The model is char_rnn.py's, on words: embedding 128 -> 2-layer
LSTM 128 -> dense to the vocabulary and softmax, trained on batches of 50 x 50 tokens with the
state carried from batch to batch, Adam 2e-3 decayed by 0.97 per epoch, gradients clipped to
global norm 5 -- every option and default of ``char_rnn.py train`` except ``--level``, whose
default here is ``word``, the checkpoint, ``save/word_rnn.npz``, 8 epochs instead of 50, and the
output bias, which starts at the log unigram frequencies (examples/_levels.py says why).

Tokens are words, punctuation marks and newlines (:class:`rnnkern.WordVocab`: ``don't`` and
``o'er`` are one word each, ``"\\n"`` a token of its own so that lines survive), lowercased
(``--keep-case`` keeps case); the vocabulary keeps the 10,000 most frequent (``--max-vocab``,
``<unk>`` included; ``--min-count N`` drops the tokens seen fewer than N times), and every other
token is read as ``<unk>``. tiny-shakespeare has 293,593 tokens, 12,385 of them distinct; at
10,000 the 2,386 tokens seen once are cut (0.8% of the text is ``<unk>``).

The last 5% of the tokens are held out; each epoch prints the train and validation loss
(nats/token) and the **validation perplexity**, exp(mean validation cross-entropy). Measured
(2-core VM, ~16-18 s an epoch): 165.5, 143.8, 132.4, 123.7, 120.1, 117.8, 117.2, **116.3** after
epochs 1-8, then 117.5 and 117.2 (an add-one unigram model of the training tokens gets 303.0 on
the same validation tokens; the train loss keeps falling:
it overfits from there). PyTorch with the same recipe and start reaches the same perplexity
(benchmarks/bench_e2e.py --only word-rnn). Sampling
writes the prime as given, then the sampled tokens with a reader's spacing
(:meth:`rnnkern.WordVocab.decode`); prime words outside the vocabulary are read as ``<unk>``,
with a note on stderr.

The code is char_rnn.py's (one training, checkpoint and sampling path); what the level changes
lives in examples/_levels.py.
"""
from __future__ import annotations

import sys

from rnnkern.examples import char_rnn

LEVEL = "word"


def parser(prog="word_rnn"):
    return char_rnn.parser(prog, level=LEVEL)


def main(argv=None, prog="word_rnn"):
    """``train`` or ``sample`` (char_rnn.main with ``--level word`` by default); ``train``
    returns its results, ``val_perplexity`` among them."""
    return char_rnn.main(argv, prog, level=LEVEL)


def cli(argv=None, prog="word_rnn"):
    """The command line: exit status 0, or 2 with one line on stderr for bad input."""
    return char_rnn.cli(argv, prog, level=LEVEL)


if __name__ == "__main__":
    sys.exit(cli())
