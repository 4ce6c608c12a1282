"""Data helpers: deterministic character and word vocabularies, windows, stream batches,
scaling, splits.

Shape legend: N samples/windows, B batch, T time steps (``seq_length``), F features.
"""
from __future__ import annotations

import collections
import numbers
import re

import numpy as np


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _with_rows(name, value):
    """``np.asarray(value)`` with at least one axis: ``len()`` of a scalar is a bare TypeError."""
    value = np.asarray(value)
    if value.ndim == 0:
        raise ValueError(f"{name} must be an array with at least one axis (rows), got a scalar "
                         f"{value!r}")
    return value


def _text(name, text):
    """``text`` as a str. bytes are refused rather than decoded: the vocabulary holds characters,
    and only the caller knows the file's encoding (a latin-1 or cp1252 text decoded as UTF-8 would
    fail or, worse, give other characters), so it decodes first, as ``str`` APIs require."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}; decode it first, "
                        f"e.g. {name}.decode('utf-8')")
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    return text


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _quoted(chars, limit=10):
    """``'x', 'y', 'z'`` (the first ``limit``, then how many more)."""
    shown = ", ".join(repr(c) for c in chars[:limit])
    return shown + (f" and {len(chars) - limit} more" if len(chars) > limit else "")


# ---------------------------------------------------------------------- vocabulary
class CharVocab:
    """Characters <-> integer ids, in a deterministic order (never ``set()`` iteration order).

    Build with :meth:`from_text` (``order="sorted"``: by code point; ``"frequency"``: most
    frequent first, ties by code point) or directly from an ordered sequence of distinct
    characters (e.g. restored from a checkpoint via :meth:`to_list`).

        >>> v = CharVocab.from_text("hihello")      # chars ('e', 'h', 'i', 'l', 'o')
        >>> v.encode("hi"), v.decode([1, 2])          # (array([1, 2]), 'hi')
    """

    def __init__(self, chars):
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"vocabulary entries must be single characters, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("vocabulary characters must be distinct")
        if not chars:
            raise ValueError("vocabulary must not be empty")
        self.chars = tuple(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        # sorted code points -> ids, for a vectorised encode of long texts
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        order = np.argsort(codes, kind="stable")
        self._codes, self._ids = codes[order], order.astype(np.int64)

    @classmethod
    def from_text(cls, text, order="sorted"):
        if not _text("text", text):
            raise ValueError("text must be a non-empty str")
        if order == "sorted":
            return cls(sorted(set(text)))  # sorted(): the order no longer depends on hashing
        if order == "frequency":
            counts = collections.Counter(text)
            return cls(sorted(counts, key=lambda c: (-counts[c], c)))
        raise ValueError(f"order must be 'sorted' or 'frequency', got {order!r}")

    def __len__(self):
        return len(self.chars)

    @property
    def size(self):
        return len(self.chars)

    def __repr__(self):
        return f"CharVocab({''.join(self.chars)!r})"

    def __eq__(self, other):
        return isinstance(other, CharVocab) and self.chars == other.chars

    def to_list(self):
        """The characters in id order (JSON-friendly); ``CharVocab(v.to_list()) == v``."""
        return list(self.chars)

    def encode(self, text):
        """str -> int64 ids [len(text)].

        A non-str (bytes included: decode it first) raises TypeError; characters outside the
        vocabulary raise ValueError naming them all and where the first one is."""
        text = _text("text", text)
        # surrogatepass: a lone surrogate is a valid vocabulary entry (one str character)
        raw = text.encode("utf-32-le", "surrogatepass")
        codes = np.frombuffer(raw, dtype=np.uint32).astype(np.int64)
        pos = np.minimum(np.searchsorted(self._codes, codes), len(self._codes) - 1)
        bad = self._codes[pos] != codes
        if bad.any():
            self._unknown(codes[bad], int(np.argmax(bad)))
        return self._ids[pos]

    def _unknown(self, codes, first):
        chars = [chr(c) for c in np.unique(codes).tolist()]
        what = (f"character {chars[0]!r} is" if len(chars) == 1 else
                f"characters {_quoted(chars)} are")
        raise ValueError(f"{what} not in the vocabulary (first at index {first})")

    def decode(self, ids):
        """ids (an int or a 1-D int sequence) -> str. Non-integer ids raise TypeError; a batch
        ``[B,T]`` raises ValueError (decode each row) rather than running its rows together."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu" and not (ids.size == 0 and ids.dtype.kind == "f"):
            got = type(ids.item()).__name__ if ids.ndim == 0 else f"dtype {ids.dtype}"
            raise TypeError(f"ids must be integers, got {got}")
        if ids.ndim > 1:
            raise ValueError(f"ids must be 1-D, got shape {ids.shape}; decode each row of a batch")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise ValueError(f"ids must be in [0, {len(self)}), got min {ids.min()} and max "
                             f"{ids.max()}")
        return "".join(self.chars[i] for i in ids.reshape(-1).tolist())


# A token of :class:`WordVocab`, tried in this order at each position (whitespace other than
# "\n" separates tokens and is dropped):
#   "<unk>"  the unknown token itself, so that decode's output encodes back to the same ids;
#   a word   letters and digits (str.isalnum; not "_"), with "'" or "’" allowed *between* two of
#            them: "don't", "o'er", "ne'er" are one word; at a word's edge an apostrophe is a
#            mark of its own ("'tis" is "'" + "tis", "o'" is "o" + "'");
#   "\n"     a newline, so that line breaks survive (each one a token: "\n\n" is two);
#   a mark   any other single character that is not whitespace: punctuation, "_", symbols
#            ("--" is two tokens "-").
_TOKEN = re.compile(r"<unk>|[^\W_]+(?:['\u2019][^\W_]+)*|\n|[^\w\s]|_")
# decode's spacing classes for marks (everything else is spaced like a word)
_CLOSE = frozenset(",.;:!?)]}\u201d%\u2026\u00bb")     # no space before: , . ; : ! ? ) ] } ” % … »
_OPEN = frozenset("([{\u201c\u2018\u00bf\u00a1\u00ab")  # no space after: ( [ { “ ‘ ¿ ¡ «
_JOIN = frozenset("-\u2013\u2014/")                     # neither: - – — /  (market-place, a--b)
_APOSTROPHES = frozenset("'\u2019")                     # closes after a word or closer, else opens


class WordVocab:
    """Words and punctuation marks <-> integer ids, with ``<unk>`` (id 0) for the rest.

    What a token is (:meth:`tokenize`; whitespace other than ``"\\n"`` only separates tokens):

    * a **word**: letters and digits, with an apostrophe (``'`` or ``’``) allowed *between*
      two of them -- ``don't``, ``o'er`` and ``ne'er`` are one word each; at a word's edge an
      apostrophe is a mark of its own (``'tis`` is ``'`` + ``tis``, ``o'`` is ``o`` + ``'``);
    * a **newline** ``"\\n"``, so that line breaks (and blank lines: ``"\\n\\n"`` is two tokens)
      survive a round trip through the model;
    * a **mark**: any other single non-space character (``,`` ``.`` ``-`` ``_`` ``&`` ...;
      ``--`` is two tokens);
    * the text ``<unk>``, read as the unknown token, so that ``decode``'s output encodes back
      to the same ids.

    ``lower=True`` (the default) lowercases text before tokenizing it, in :meth:`from_text`
    and in :meth:`encode`. Ids are in a deterministic order: ``<unk>`` is 0, then the tokens
    by frequency in the text the vocabulary was built from, most frequent first, ties in
    order of first appearance. :meth:`encode` maps tokens outside the vocabulary to 0;
    :meth:`decode` joins tokens with the spacing a reader expects (see there).

        >>> v = WordVocab.from_text("The cat sat.\\nThe cat ran!")
        >>> v.to_list()       # ['<unk>', 'the', 'cat', 'sat', '.', '\\n', 'ran', '!']
        >>> v.encode("The dog sat."), v.decode([1, 2, 3, 4])   # ([1, 0, 3, 4], 'the cat sat.')

    A vocabulary is rebuilt from a checkpoint with ``WordVocab.from_list(v.to_list(),
    lower=v.lower)`` (``lower`` is not in the list: store it beside it).
    """

    UNK = "<unk>"
    unk_id = 0

    def __init__(self, tokens, lower=True):
        if isinstance(tokens, (str, bytes)):
            raise TypeError(f"tokens must be a sequence of str tokens, got {type(tokens).__name__}"
                            f" (a WordVocab is built from text with WordVocab.from_text)")
        self.lower = _flag("lower", lower)
        tokens = list(tokens)
        for t in tokens:
            if not isinstance(t, str):
                raise TypeError(f"vocabulary entries must be str tokens, got {type(t).__name__} "
                                f"{t!r}")
        if not tokens or tokens[0] != self.UNK:
            first = repr(tokens[0]) if tokens else "an empty list"
            raise ValueError(f"a word vocabulary must start with {self.UNK!r} (id 0), got {first}")
        counts = collections.Counter(tokens)
        repeated = [t for t, n in counts.items() if n > 1]
        if repeated:
            raise ValueError(f"vocabulary tokens must be distinct; repeated: {_quoted(repeated)}")
        bad = [t for t in tokens if self.tokenize(t, self.lower) != [t]]
        if bad:
            raise ValueError(f"vocabulary entries must be single tokens (a word, a mark or "
                             f"'\\n'{', lowercase' if self.lower else ''}); {_quoted(bad)} "
                             f"{'is' if len(bad) == 1 else 'are'} not")
        self.tokens = tuple(tokens)
        self.stoi = {t: i for i, t in enumerate(self.tokens)}

    @staticmethod
    def tokenize(text, lower=True):
        """The tokens of ``text`` (lowercased first when ``lower``), as :class:`WordVocab`
        defines them: ``tokenize("Don't -- O'er!\\n")`` is ``["don't", '-', '-', "o'er", '!',
        '\\n']``."""
        text = _text("text", text)
        return _TOKEN.findall(text.lower() if _flag("lower", lower) else text)

    @classmethod
    def from_text(cls, text, min_count=1, max_size=None, lower=True):
        """The vocabulary of ``text``: ``<unk>``, then every token seen at least ``min_count``
        times, most frequent first (ties: first appearance first), at most ``max_size``
        entries in all (``<unk>`` included; None: no limit)."""
        text = _text("text", text)
        min_count = _positive_int("min_count", min_count)
        if max_size is not None:
            max_size = _positive_int("max_size", max_size)
        if not text:
            raise ValueError("text must be a non-empty str")
        counts = collections.Counter(cls.tokenize(text, lower))   # insertion order: first seen
        if not counts:
            raise ValueError("text has no tokens (words, punctuation marks or newlines), only "
                             "spaces")
        counts.pop(cls.UNK, None)                                  # "<unk>" in the text: id 0
        kept = [t for t in sorted(counts, key=lambda t: -counts[t]) if counts[t] >= min_count]
        if not kept:
            raise ValueError(f"no token of the text occurs min_count={min_count} times (the most "
                             f"frequent, {max(counts, key=counts.get)!r}, {max(counts.values())}"
                             f"); use a smaller min_count")
        if max_size is not None:
            kept = kept[:max_size - 1]
        return cls([cls.UNK] + kept, lower=lower)

    @classmethod
    def from_list(cls, tokens, lower=True):
        """The vocabulary whose ids are ``tokens``' positions (``to_list()``'s output, from a
        checkpoint); ``lower`` as it was built."""
        return cls(tokens, lower=lower)

    def to_list(self):
        """The tokens in id order, ``<unk>`` first (JSON-friendly);
        ``WordVocab.from_list(v.to_list(), lower=v.lower) == v``."""
        return list(self.tokens)

    def __len__(self):
        return len(self.tokens)

    @property
    def size(self):
        return len(self.tokens)

    def __repr__(self):
        return f"WordVocab({len(self)} tokens: {_quoted(list(self.tokens), 8)}; lower={self.lower})"

    def __eq__(self, other):
        return (isinstance(other, WordVocab) and self.tokens == other.tokens
                and self.lower == other.lower)

    def encode(self, text):
        """str -> int64 ids [number of tokens]; tokens outside the vocabulary are ``<unk>``
        (id 0: see :meth:`unknown_tokens` for which). A non-str (bytes included: decode it
        first) raises TypeError."""
        tokens = self.tokenize(text, self.lower)
        get = self.stoi.get
        return np.fromiter((get(t, 0) for t in tokens), dtype=np.int64, count=len(tokens))

    def unknown_tokens(self, text):
        """The distinct tokens of ``text`` that :meth:`encode` maps to ``<unk>``, in order of
        first appearance."""
        return list(dict.fromkeys(t for t in self.tokenize(text, self.lower)
                                  if t not in self.stoi))

    def decode(self, ids):
        """ids (an int or a 1-D int sequence) -> str, the tokens joined as text is written.

        Tokens are separated by one space, except: none after a newline or at the start; none
        before ``, . ; : ! ? ) ] } ” % …`` or a newline; none after ``( [ { “ ‘ ¿ ¡``; none on
        either side of ``- – — /`` (``market-place``, ``a--b``). An apostrophe at a word's
        edge attaches to the token before it when that is a word or a closing mark (``o'
        the``, ``lords'``, ``friends,'``), else to the token after it (``'tis`` at a line's
        start or after ``(`` or ``--``); so a mid-line ``and 'tis`` or ``say 'ay'`` comes back
        as ``and' tis``, ``say' ay'`` (in tiny-shakespeare, 98.5% of the lines come back
        exactly, lowercased, and the rest are such). ``"`` opens and closes in turn within a
        line. Spacing and case are not restored (whitespace becomes one space,
        ``lower`` text stays lowercase), but ``encode(decode(ids))`` gives ``ids`` back.

        Non-integer ids raise TypeError; a batch ``[B,T]`` raises ValueError (decode each row).
        """
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu" and not (ids.size == 0 and ids.dtype.kind == "f"):
            got = type(ids.item()).__name__ if ids.ndim == 0 else f"dtype {ids.dtype}"
            raise TypeError(f"ids must be integers, got {got}")
        if ids.ndim > 1:
            raise ValueError(f"ids must be 1-D, got shape {ids.shape}; decode each row of a batch")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise ValueError(f"ids must be in [0, {len(self)}), got min {ids.min()} and max "
                             f"{ids.max()}")
        parts, prev, quotes = [], "start", 0   # prev: the spacing class of the last token
        for t in (self.tokens[i] for i in ids.reshape(-1).tolist()):
            if t == "\n":
                kind, quotes = "newline", 0
            elif t in _CLOSE:
                kind = "close"
            elif t in _OPEN:
                kind = "open"
            elif t in _JOIN:
                kind = "join"
            elif t in _APOSTROPHES:
                kind = "close" if prev in ("word", "close") else "open"
            elif t == '"':
                kind, quotes = ("open" if quotes % 2 == 0 else "close"), quotes + 1
            else:
                kind = "word"   # words, <unk>, other marks (& * # ...)
            if (prev not in ("start", "newline", "open", "join")
                    and kind not in ("newline", "close", "join")):
                parts.append(" ")
            parts.append(t)
            prev = kind
        return "".join(parts)


# ---------------------------------------------------------------------- windows
def shifted_windows(seq, seq_length, stride=1):
    """Many-to-many training pairs from one sequence (lab 12-4).

    ``x[n] = seq[s : s+T]``, ``y[n] = seq[s+1 : s+T+1]`` for ``s = 0, stride, ...`` while the target
    fits: N = ``(len(seq) - T - 1) // stride + 1`` windows. Returns copies ``x, y [N,T,...]``.
    """
    seq = _with_rows("seq", seq)
    T = _positive_int("seq_length", seq_length)
    stride = _positive_int("stride", stride)
    if len(seq) < T + 1:
        raise ValueError(f"seq has {len(seq)} items; windows of seq_length {T} need at least {T + 1}")
    starts = np.arange(0, len(seq) - T, stride)
    idx = starts[:, None] + np.arange(T)
    return seq[idx], seq[idx + 1]


def next_step_windows(data, seq_length, target=None):
    """Many-to-one pairs (lab 12-5): ``x[n] = data[n : n+T]``, ``y[n] = target[n+T]``.

    ``target`` defaults to ``data``; N = ``len(data) - T``. Returns copies ``x [N,T,...]``,
    ``y [N,...]``.
    """
    data = _with_rows("data", data)
    target = data if target is None else _with_rows("target", target)
    T = _positive_int("seq_length", seq_length)
    if len(target) != len(data):
        raise ValueError(f"target must have len(data) = {len(data)} rows, got {len(target)}")
    if len(data) < T + 1:
        raise ValueError(f"data has {len(data)} rows; seq_length {T} needs at least {T + 1}")
    N = len(data) - T
    idx = np.arange(N)[:, None] + np.arange(T)
    return data[idx], target[T:].copy()


class StreamBatches:
    """Contiguous batches from one long id stream, for truncated BPTT with carried state.

    The stream (minus a tail that does not fill a batch) is cut into B equal rows; batch ``k`` is
    columns ``[k*T, (k+1)*T)`` of every row, so row ``b`` of batch ``k+1`` continues row ``b`` of
    batch ``k`` (char-rnn's ``TextLoader``, with targets taken from the next id instead of
    wrapping around). Iterating yields ``(x [B,T], y [B,T])`` int64, ``y`` shifted by one.
    Use with ``Trainer(..., stateful=True)``.
    """

    def __init__(self, ids, batch_size, seq_length):
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        self.batch_size = B = _positive_int("batch_size", batch_size)
        self.seq_length = T = _positive_int("seq_length", seq_length)
        self.num_batches = (len(ids) - 1) // (B * T)
        if self.num_batches == 0:
            raise ValueError(f"{len(ids)} ids are too few for one batch of {B}x{T} (+1 target)")
        n = self.num_batches * B * T
        self._x = np.ascontiguousarray(ids[:n].reshape(B, -1), dtype=np.int64)
        self._y = np.ascontiguousarray(ids[1:n + 1].reshape(B, -1), dtype=np.int64)

    def __len__(self):
        return self.num_batches

    def __getitem__(self, k):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"batch index must be an int, got {type(k).__name__}")
        k = int(k)
        if not -self.num_batches <= k < self.num_batches:
            raise IndexError(f"batch index {k} out of range for {self.num_batches} batches")
        k %= self.num_batches
        cols = slice(k * self.seq_length, (k + 1) * self.seq_length)
        return self._x[:, cols], self._y[:, cols]

    def __iter__(self):
        for k in range(self.num_batches):
            yield self[k]

    def __repr__(self):
        return (f"StreamBatches(batch_size={self.batch_size}, seq_length={self.seq_length}, "
                f"num_batches={self.num_batches})")


# ---------------------------------------------------------------------- scaling and splits
def _real_array(name, data):
    """float64 copy of numeric data; complex and text are refused, not cast (complex would drop
    its imaginary part with only a warning)."""
    data = np.asarray(data)
    if data.dtype.kind not in "biufO":
        raise TypeError(f"{name} must be real numbers, got dtype {data.dtype}")
    try:
        return data.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be real numbers, got dtype {data.dtype}: {exc}") from None


def _indices(mask):
    return np.flatnonzero(np.atleast_1d(mask)).tolist()


class MinMaxScaler:
    """Per-column ``(x - min) / (max - min + 1e-7)``, the lab 12-5 ``MinMaxScaler``.

    ``fit`` on ``[N, F]`` data, then ``transform`` / ``inverse_transform`` any array whose last
    axis has the same F (``[N,F]``, one row ``[F]``, windows ``[N,T,F]``), or, with ``columns=``
    a list, that many of the fitted columns. A fit on ``[N]`` (one series) or an int ``columns``
    is one feature, applied to every element of any shape. Another feature count raises
    ValueError instead of broadcasting. ``fit`` refuses NaN and infinity (either would silently
    turn a whole column into NaN or 0); ``transform`` maps a NaN element to NaN, elementwise.
    """

    def __init__(self, eps=1e-7):
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < np.inf:
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.eps = float(eps)
        self.min_ = self.scale_ = None

    def fit(self, data):
        """Learn per-column min and scale; on error the previous fit (if any) is kept."""
        data = _real_array("data", data)
        if data.ndim not in (1, 2):
            raise ValueError(f"fit needs [N, F] or [N] data, got shape {data.shape}; reshape "
                             f"windows to (-1, F) first")
        if len(data) == 0:
            raise ValueError("fit needs at least one row")
        if data.ndim == 2 and data.shape[1] == 0:
            raise ValueError("fit needs at least one feature (column)")
        bad = ~np.isfinite(data).all(axis=0)
        if bad.any():
            raise ValueError(f"fit data contains NaN or infinity in column(s) {_indices(bad)}")
        lo = data.min(axis=0)
        scale = data.max(axis=0) - lo + self.eps
        if (scale == 0).any():
            raise ValueError(f"constant column(s) {_indices(scale == 0)} with eps=0 would divide "
                             f"by zero; use eps > 0")
        self.min_, self.scale_ = lo, scale
        return self

    def _params(self, columns):
        if self.min_ is None:
            raise RuntimeError("MinMaxScaler is not fitted: call fit(data) first")
        if columns is None:
            return self.min_, self.scale_
        if self.min_.ndim == 0:
            raise ValueError("columns needs a scaler fitted on [N, F] data; this one was fitted "
                             "on [N] (one feature)")
        try:
            lo = self.min_[columns]
        except (IndexError, TypeError):
            lo = None
        if lo is None or lo.ndim > 1:
            raise ValueError(f"columns must index the {self.min_.size} fitted features, "
                             f"got {columns!r}")
        return lo, self.scale_[columns]

    def _check(self, data, columns):
        """data as float64 and the min/scale for it; the feature counts must match."""
        lo, scale = self._params(columns)
        data = _real_array("data", data)
        if lo.ndim == 1 and (data.ndim == 0 or data.shape[-1] != lo.size):
            have = ("data is a scalar" if data.ndim == 0 else
                    f"data has {data.shape[-1]} feature(s) (last axis of shape {data.shape})")
            want = (f"the scaler was fitted on {lo.size} features" if columns is None else
                    f"columns={columns!r} selects {lo.size} features")
            raise ValueError(f"{have}; {want}")
        return data, lo, scale

    def transform(self, data, columns=None):
        data, lo, scale = self._check(data, columns)
        return (data - lo) / scale

    def fit_transform(self, data):
        return self.fit(data).transform(data)

    def inverse_transform(self, data, columns=None):
        data, lo, scale = self._check(data, columns)
        return data * scale + lo


def train_test_split(*arrays, train_fraction=0.7, overlap=0, shuffle=False, seed=None):
    """Split arrays along axis 0: ``train = a[:n]``, ``test = a[n - overlap:]``, n =
    ``int(len * train_fraction)`` (the lab's rule).

    ``overlap`` repeats the last rows of train at the start of test (lab 12-5 keeps
    ``seq_length`` rows so the first test window has its history). ``shuffle=True`` permutes the
    rows first with ``np.random.default_rng(seed)`` (not for time series). Returns
    ``train_0, test_0, train_1, test_1, ...``.
    """
    if not arrays:
        raise ValueError("train_test_split needs at least one array")
    if not (isinstance(train_fraction, numbers.Real) and 0.0 < train_fraction < 1.0):
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    arrays = [_with_rows(f"arrays[{i}]", a) for i, a in enumerate(arrays)]
    N = len(arrays[0])
    if any(len(a) != N for a in arrays):
        raise ValueError(f"arrays must have the same length, got {[len(a) for a in arrays]}")
    n = int(N * train_fraction)
    if n == 0:      # test is never empty: n < N for train_fraction < 1
        raise ValueError(f"train_fraction {train_fraction!r} of {N} rows leaves the train split "
                         f"empty; use more rows or a larger train_fraction")
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Integral) or not 0 <= overlap <= n:
        raise ValueError(f"overlap must be an int in [0, {n}], got {overlap!r}")
    if shuffle:
        order = np.random.default_rng(seed).permutation(N)
        arrays = [a[order] for a in arrays]
    out = []
    for a in arrays:
        out += [a[:n], a[n - overlap:]]
    return tuple(out)
