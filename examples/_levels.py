"""What the language-model examples' tokens are: characters or words (``--level char|word``).

char_rnn.py and word_rnn.py share one training, checkpoint and sampling path; what differs with
the level is only here: how the vocabulary is built from the text (:class:`rnnkern.CharVocab`
or :class:`rnnkern.WordVocab`), what a checkpoint records to rebuild it, how a ``--prime`` is
read and how the sampled ids are written after it.

* ``char``: a token is one character; a ``--prime`` with a character the vocabulary lacks is an
  error (the model has no input for it).
* ``word``: a token is a word, a punctuation mark or a newline (rk.WordVocab's definition); the
  vocabulary keeps the ``--max-vocab`` most frequent (default 10,000, ``<unk>`` included) seen at
  least ``--min-count`` times, lowercased unless ``--keep-case``. A ``--prime`` word outside the
  vocabulary is read as ``<unk>`` -- the input the model was trained on for every rare word --
  with a note on stderr naming it; a ``--prime`` with no token at all is an error. The
  output layer's bias starts at the log unigram frequencies of the training tokens (add-one
  smoothed) instead of zeros (Karpathy's "init well"): from zeros, the 2-layer LSTM's top layer
  saturated to a constant that carried the unigram distribution to the head within the first
  100 steps (|h| ~0.94), and training stalled there: validation perplexity ~340, worse than
  an add-one unigram model of the training tokens (303.0 on the same validation tokens), for
  6+ epochs (PyTorch from the same start: the same for the 2 epochs
  measured). With this init: 132 after 3 epochs, 116 after 8. The benchmark's word-rnn workload
  (benchmarks/bench_e2e.py) starts both rnnkern and PyTorch this way.
"""
from __future__ import annotations

import sys

import numpy as np

import rnnkern as rk

DEFAULT_MAX_VOCAB = 10_000


def _shown(tokens, limit=8):
    shown = ", ".join(repr(t) for t in tokens[:limit])
    return shown + (f" and {len(tokens) - limit} more" if len(tokens) > limit else "")


class CharLevel:
    name = "char"
    unit = "characters"
    default_epochs = 50             # char-rnn-tensorflow's
    options = ()                    # the word level's vocabulary options are refused here

    def build(self, text, args, where):
        return rk.CharVocab.from_text(text)

    def from_meta(self, user):
        return rk.CharVocab(user["vocab"])

    def meta(self, vocab):
        """What a checkpoint's user data records to rebuild ``vocab`` (:meth:`from_meta`)."""
        return {"level": self.name, "vocab": vocab.to_list()}

    def default_prime(self, text, vocab):
        return "The " if set("The ") <= set(vocab.chars) else text[0]

    def encode_prime(self, prime, vocab, where):
        """(ids, a note for stderr or None); ValueError naming what ``vocab`` lacks."""
        missing = sorted(set(prime) - set(vocab.chars))
        if missing:
            raise ValueError(f"--prime {prime!r} has characters not in the vocabulary of {where}: "
                             f"{''.join(missing)!r}")
        return vocab.encode(prime), None

    def join(self, vocab, prime, prime_ids, ids):
        """The text of a sample: ``prime`` as given, then the new ``ids``."""
        return prime + vocab.decode(ids)

    def difference(self, old, vocab):
        return repr("".join(sorted(set(old) ^ set(vocab.chars))))

    def output_bias(self, train_ids, vocab_size):
        """The dense layer's initial bias [V], or None for zeros (char-rnn's TF1 init)."""
        return None


class WordLevel(CharLevel):
    name = "word"
    unit = "tokens (words and punctuation marks)"
    default_epochs = 8              # tiny-shakespeare's validation perplexity: 116 at 8, then up
    options = ("max_vocab", "min_count", "keep_case")

    def build(self, text, args, where):
        max_vocab = DEFAULT_MAX_VOCAB if args.max_vocab is None else args.max_vocab
        try:
            return rk.WordVocab.from_text(text, min_count=args.min_count or 1,
                                          max_size=max_vocab or None, lower=not args.keep_case)
        except ValueError as exc:     # no tokens, or none seen --min-count times
            message = str(exc).replace("min_count=", "--min-count ").replace(
                "smaller min_count", "smaller --min-count")
            raise ValueError(f"{where}: {message}") from None

    def from_meta(self, user):
        return rk.WordVocab.from_list(user["vocab"], lower=user.get("lower", True))

    def meta(self, vocab):
        return {"level": self.name, "vocab": vocab.to_list(), "lower": vocab.lower}

    def default_prime(self, text, vocab):
        return "The" if not vocab.unknown_tokens("The") else vocab.decode([1 % len(vocab)])

    def encode_prime(self, prime, vocab, where):
        ids = vocab.encode(prime)
        if not ids.size:
            raise ValueError(f"--prime {prime!r} has no word or punctuation mark to start from")
        unknown = vocab.unknown_tokens(prime)
        note = (f"note: --prime {prime!r}: {_shown(unknown)} not in the vocabulary of {where}, "
                f"read as {vocab.UNK}" if unknown else None)
        return ids, note

    def join(self, vocab, prime, prime_ids, ids):
        """``prime`` as given, then the new ids with decode's spacing after its last token (decode
        spaces each token by the ones before it, so the decoded prime is a prefix of the whole)."""
        head = vocab.decode(prime_ids)
        whole = vocab.decode(np.concatenate([prime_ids, ids]))
        return prime.rstrip(" \t") + whole[len(head):]

    def output_bias(self, train_ids, vocab_size):
        """log((count + 1) / (N + V)): the log unigram frequencies of ``train_ids``."""
        counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
        return np.log(counts / counts.sum())

    def difference(self, old, vocab):
        new = vocab.to_list()
        differ = sorted(set(old) ^ set(new))
        return _shown(differ) if differ else "their order (the same tokens, other frequencies)"


LEVELS = {level.name: level for level in (CharLevel(), WordLevel())}


def level_of(vocab):
    """The level whose vocabulary ``vocab`` is."""
    return LEVELS["word" if isinstance(vocab, rk.WordVocab) else "char"]


def level_of_checkpoint(user, path):
    """The level a checkpoint's user data was written at (before issue 20: char)."""
    name = user.get("level", "char")
    if name not in LEVELS:
        raise ValueError(f"--checkpoint {path}: unknown level {name!r} (this version knows "
                         f"{', '.join(LEVELS)})")
    return LEVELS[name]


def note(message):
    if message:
        print(message, file=sys.stderr, flush=True)
