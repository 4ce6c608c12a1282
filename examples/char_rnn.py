"""char-rnn: a character-level (or, with ``--level word``, word-level) language model on any
text file, then sampled.

    python examples/char_rnn.py train [--text PATH] [--epochs N] [--max-batches N] [--time-limit S]
    python examples/char_rnn.py sample [--checkpoint save/char_rnn.npz] [-n 500] [--prime "def "]

(also ``python -m rnnkern train|sample``). Defaults are char-rnn-tensorflow's: embedding 128 ->
2-layer LSTM 128 (forget bias 1.0; ``--model gru|rnn`` for the other cells) -> dense to the
vocabulary, sequences of 50, batches of 50,
Adam 2e-3 decayed by 0.97 per epoch, gradients clipped to global norm 5, the state carried
from batch to batch within an epoch (truncated BPTT over contiguous rows).

Corpus: tiny-shakespeare, packaged in :mod:`rnnkern.datasets`, or any UTF-8 text file given with
``--text PATH`` (``.gz`` files are decompressed). The last 5% of the text is held out; each
epoch prints its train and validation loss (nats/char). The checkpoint
(params, optimizer, level, vocabulary, config) is written atomically after every epoch;
``--resume`` continues from it exactly, and ``sample`` reads the level and vocabulary from it.

``--level word`` trains the same model on words and punctuation marks instead of characters
(rk.WordVocab; ``--max-vocab``, ``--min-count``, ``--keep-case``; see examples/_levels.py and
examples/word_rnn.py, which is this script with ``--level word`` as its default); each epoch
then also prints the validation perplexity, exp(val loss).

Bad input (a missing, empty, binary or too-short text, a checkpoint that cannot be read or was
written for another corpus, characters outside the vocabulary, out-of-range numbers) stops with
one line ``char_rnn train: error: ...`` on stderr and exit status 2, before any training.
At the word level a ``--prime`` word outside the vocabulary is no error: it is read as ``<unk>``,
with a note on stderr.

``mpiexec -n N python -m rnnkern train --distributed ...`` trains data-parallel on N MPI ranks
(``pip install "rnnkern[mpi]"``): each rank takes its share of every batch's rows (the batches and
the results are one process's, up to rounding), the ranks on a machine share its CPUs, and only
rank 0 prints, writes the checkpoint and samples. Every rank reads ``--text`` and, with
``--resume``, ``--checkpoint``: give paths that every rank sees.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import zipfile

import numpy as np

import rnnkern as rk
import rnnkern.config
from rnnkern.backends import numba_runtime
from rnnkern.examples._common import add_common_args, parse, tf1_glorot_init
from rnnkern.examples._levels import LEVELS, level_of, level_of_checkpoint, note
from rnnkern.labs import CliParser, readable_file, run_cli


CELLS = {"lstm": rk.LSTM, "gru": rk.GRU, "rnn": rk.RNN}
DEFAULTS = dict(model="lstm", rnn_size=128, num_layers=2, seq_length=50, batch_size=50,
                learning_rate=2e-3,
                decay_rate=0.97, grad_clip=5.0,   # char-rnn-tensorflow's train.py defaults
                dropout=0.0)                      # its output_keep_prob=1.0


# ---------------------------------------------------------------------- corpus
def load_corpus(args):
    """(text, where it came from): ``--text``, else the packaged tiny-shakespeare."""
    if args.text is not None:
        readable_file(args.text, "--text")   # missing, a directory, empty: say which
    text = rk.datasets.tiny_shakespeare(args.text)
    source = args.text or "tiny-shakespeare (rnnkern.datasets)"
    return (text[:args.max_chars] if args.max_chars else text), source


def corpus_name(args):
    return f"--text {args.text}" if args.text else "tiny-shakespeare"


def check_long_enough(n_chars, args, unit="characters"):
    """ValueError unless the training part of ``n_chars`` tokens (after holding out
    ``--val-fraction``) fills one batch: StreamBatches needs B*T ids plus one target."""
    B, T = args.batch_size, args.seq_length
    n_train = n_chars - int(n_chars * args.val_fraction)   # as split_ids cuts it
    if n_train < B * T + 1:
        cut = f" (--max-chars {args.max_chars})" if args.max_chars else ""
        raise ValueError(f"{corpus_name(args)}{cut}: {n_chars} {unit} are too short: one batch of "
                         f"--batch-size {B} x --seq-length {T} needs {B * T + 1} for training "
                         f"(after holding out --val-fraction {args.val_fraction}); give a longer "
                         f"text or smaller sizes")


def split_ids(ids, val_fraction, batch_size, seq_length):
    """Train on the first 1-val_fraction of the stream, validate on the rest (contiguous)."""
    n_val = int(len(ids) * val_fraction)
    train_ids, val_ids = ids[:len(ids) - n_val], ids[len(ids) - n_val:]
    train = rk.StreamBatches(train_ids, batch_size, seq_length)
    val = None
    if n_val > seq_length:
        # as many rows as the held-out text fills (up to batch_size), so small texts validate too
        vb = max(1, min(batch_size, (n_val - 1) // seq_length))
        val = rk.StreamBatches(val_ids, vb, seq_length)
    return train, val


# ---------------------------------------------------------------------- model
def build_model(vocab_size, cfg, seed, backend="auto", output_bias=None):
    """Embedding(V, H) -> LSTM(H, H, L) -> Dense(H, V), TF1-style init (glorot, zero biases);
    ``cfg["model"]`` "gru" or "rnn" puts that cell in the LSTM's place. ``output_bias`` [V]:
    the dense layer's initial bias instead of zeros (the word level's log unigram frequencies,
    examples/_levels.py).

    ``cfg["dropout"] = p > 0`` drops each recurrent layer's outputs with probability p in
    training (char-rnn's ``DropoutWrapper(output_keep_prob=1-p)``): between the layers and
    before the dense.
    """
    H, p = cfg["rnn_size"], cfg.get("dropout", 0.0)
    emb = rk.Embedding(vocab_size, H, seed=seed)
    bound = np.sqrt(6.0 / (vocab_size + H))   # TF get_variable's default glorot_uniform
    emb.params["weight"][...] = np.random.default_rng(seed).uniform(-bound, bound,
                                                                    (vocab_size, H))
    cell = CELLS[cfg.get("model", "lstm")]
    rnn = tf1_glorot_init(cell(H, H, cfg["num_layers"], backend=backend, dropout=p,
                               seed=seed + 3), seed + 1)
    fc = rk.Dense(H, vocab_size, init="glorot", seed=seed + 2)
    if output_bias is not None:
        fc.params["bias"][...] = output_bias
    return rk.Sequential([emb, rnn] + ([rk.Dropout(p, seed=seed + 4)] if p else []) + [fc])


class Limited:
    """The first ``n`` batches of a batch sequence (``--max-batches``), indexable."""

    def __init__(self, batches, n):
        self.batches, self.n = batches, min(n, len(batches))

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        if not 0 <= k < self.n:
            raise IndexError(k)
        return self.batches[k]


def sample_text(model, vocab, prime, length, temperature, top_k, seed, where="the model"):
    """``prime`` and ``length`` tokens sampled after it, as text (a CharVocab or a WordVocab)."""
    level = level_of(vocab)
    prime_ids, message = level.encode_prime(prime, vocab, where)
    note(message)
    ids = rk.generate(model, prime_ids, length, temperature=temperature, top_k=top_k, rng=seed)
    return level.join(vocab, prime, prime_ids, ids)


# ---------------------------------------------------------------------- train
def plan_run(args, text, vocab, cfg, source):
    """(prime, resume): what ``train`` samples from at the end and whether it continues
    ``--checkpoint``, both checked before any training so that bad input costs no epoch."""
    level = level_of(vocab)
    prime = args.prime
    if prime is None:
        prime = level.default_prime(text, vocab)
    if args.sample_length:
        level.encode_prime(prime, vocab, source)
    if args.checkpoint and os.path.isdir(args.checkpoint):
        raise IsADirectoryError(f"--checkpoint {args.checkpoint}: is a directory, not a file")
    resume = bool(args.resume and args.checkpoint and os.path.exists(args.checkpoint))
    if resume:
        check_resumable(args.checkpoint, vocab, cfg)
    return prime, resume


def perplexity(loss):
    """exp(mean cross-entropy in nats per token), or None."""
    return None if loss is None else float(np.exp(min(loss, 700.0)))


def default_checkpoint(level):
    return os.path.join("save", f"{level}_rnn.npz")


def ranks_of(args):
    """(the MPIGroup, whether this rank prints) for ``--distributed``, else (None, True); the
    ranks on one machine divide its CPUs among their C++ and Numba threads."""
    if not args.distributed:
        return None, True
    group = rk.distributed.MPIGroup()
    threads = max(1, numba_runtime._cpus() // group.ranks_on_this_node())
    rk.config.NUMBA_THREADS = threads
    if rk.available_backends()["cpp"][0]:
        rk.config.CPP_THREADS = threads
    return group, group.is_root


def train(args):
    level = LEVELS[args.level]
    group, root = ranks_of(args)
    if args.checkpoint is None:
        args.checkpoint = default_checkpoint(level.name)
    if args.epochs is None:
        args.epochs = level.default_epochs
    for name in set(LEVELS["word"].options) - set(level.options):
        if getattr(args, name):
            raise ValueError(f"--{name.replace('_', '-')} is for --level word only")
    text, source = load_corpus(args)
    vocab = level.build(text, args, corpus_name(args))
    ids = vocab.encode(text)
    check_long_enough(len(ids), args, level.unit)
    cfg = {k: getattr(args, k) for k in DEFAULTS}
    prime, resume = plan_run(args, text, vocab, cfg, source)
    train_b, val_b = split_ids(ids, args.val_fraction, cfg["batch_size"], cfg["seq_length"])
    data = Limited(train_b, args.max_batches) if args.max_batches else train_b
    n_train = len(ids) - int(len(ids) * args.val_fraction)   # as split_ids cuts it
    model = build_model(len(vocab), cfg, args.seed, args.backend,
                        level.output_bias(ids[:n_train], len(vocab)))
    opt = rk.Adam(lr=cfg["learning_rate"], clip_norm=cfg["grad_clip"])
    user = {**level.meta(vocab), "config": cfg, "seed": args.seed, "source": source}
    ppl = (lambda loss: "" if loss is None or level.name == "char" else
           f" (perplexity {perplexity(loss):.1f})")

    def log(msg):
        if not args.quiet and root:
            print(msg, flush=True)

    log(f"corpus: {source}, {len(text):,} chars"
        + (f", {len(ids):,} tokens" if level.name != "char" else "")
        + f", vocabulary {len(vocab)}; "
        f"{len(data)} batches of {cfg['batch_size']}x{cfg['seq_length']} per epoch, "
        f"{0 if val_b is None else len(val_b)} validation batches; "
        f"model {model.num_params():,} params"
        + ("" if group is None else f"; MPI ranks {group.size}, threads per rank "
                                    f"{rk.config.NUMBA_THREADS}"))

    t_start = time.perf_counter()

    class Report(rk.Callback):
        steps = 0

        def on_step_end(self, trainer):
            if args.time_limit:
                self.steps += 1
                over = time.perf_counter() - t_start > args.time_limit
                if group is not None:      # the ranks stop together, when any is over: asked
                    if self.steps % 16:    # every 16 steps (a collective of its own each time)
                        return
                    over = group.sum(float(over)) > 0
                if over:
                    trainer.stop_training = True

        def on_epoch_end(self, trainer):
            h = trainer.history
            val = h["val_loss"][-1]
            if root:
                print(f"epoch {trainer.epoch}/{args.epochs}: train loss {h['loss'][-1]:.4f}, "
                      f"val loss {'n/a' if val is None else f'{val:.4f}'}{ppl(val)}, "
                      f"lr {h['lr'][-1]:.6f}, "
                      f"{trainer.epoch_time:.1f} s ({1e3 * trainer.epoch_time / len(data):.1f} "
                      f"ms/batch)", flush=True)
            if args.checkpoint:
                trainer.save(args.checkpoint, user=user)

    if args.checkpoint:
        os.makedirs(os.path.dirname(os.path.abspath(args.checkpoint)), exist_ok=True)
    trainer = rk.Trainer(model, rk.sequence_loss, opt, stateful=True, seed=args.seed,
                         lr_schedule=rk.ExponentialDecay(cfg["learning_rate"], cfg["decay_rate"]),
                         progress=args.progress, callbacks=[Report()], distributed=group)
    if resume:
        trainer.load(args.checkpoint)
        log(f"resumed from {args.checkpoint} at epoch {trainer.epoch}, step {trainer.global_step}")
    trainer.fit(data, epochs=args.epochs, val_data=val_b)

    val_loss = trainer.history["val_loss"][-1] if trainer.history["val_loss"] else None
    if trainer.stop_training:   # stopped by --time-limit mid-epoch: measure and save here
        val_loss = trainer.evaluate(val_b) if val_b is not None else None
        if root:
            print(f"time limit reached after {trainer.global_step} steps "
                  f"({time.perf_counter() - t_start:.0f} s): val loss "
                  f"{'n/a' if val_loss is None else f'{val_loss:.4f}'}{ppl(val_loss)}",
                  flush=True)
        if args.checkpoint:
            trainer.save(args.checkpoint, user=user)
    sample = sample_text(model, vocab, prime, args.sample_length, args.temperature,
                         args.top_k, args.seed, source) if args.sample_length and root else ""
    if sample:
        print("---- sample ----")
        print(sample)
    return {"history": trainer.history, "val_loss": val_loss,
            "val_perplexity": perplexity(val_loss), "level": level.name, "vocab": vocab,
            "model": model,
            "steps": trainer.global_step, "sample": sample, "checkpoint": args.checkpoint,
            "seconds": time.perf_counter() - t_start}


# ---------------------------------------------------------------------- checkpoints
def read_checkpoint(path):
    """``(checkpoint, user data)`` of a checkpoint written by ``train``; ValueError when it
    cannot be read or has no vocabulary/config."""
    try:
        ck = rk.load_checkpoint(path)
    except (ValueError, zipfile.BadZipFile, EOFError) as exc:
        # BadZipFile/EOFError (truncated files) are no ValueError until rnnkern.checkpoint
        # raises its CheckpointError for every unreadable file; say which file either way
        raise ValueError(f"--checkpoint {path}: not a readable rnnkern checkpoint "
                         f"({type(exc).__name__}: {exc})") from exc
    user = ck["meta"].get("user") or {}
    if "vocab" not in user or "config" not in user:
        raise ValueError(f"--checkpoint {path}: has no vocabulary/config: not a char_rnn "
                         f"checkpoint")
    return ck, user


def check_resumable(path, vocab, cfg):
    """ValueError unless the checkpoint at ``path`` was trained at this level, on this
    vocabulary and config (checked before anything is loaded into the model)."""
    _, user = read_checkpoint(path)
    level, written = level_of(vocab), level_of_checkpoint(user, path)
    if written is not level:
        raise ValueError(f"--resume: {path} was written at --level {written.name}, not "
                         f"{level.name}; give --level {written.name}, or another --checkpoint")
    if user["vocab"] != vocab.to_list() or user.get("lower", True) != getattr(vocab, "lower",
                                                                               True):
        differ = (level.difference(user["vocab"], vocab) if user["vocab"] != vocab.to_list()
                  else "case (--keep-case)")
        raise ValueError(f"--resume: {path} was written for another corpus (its vocabulary of "
                         f"{len(user['vocab'])} {level.unit} and this text's {len(vocab)} differ "
                         f"in {differ}); give its --text and vocabulary options, or another "
                         f"--checkpoint")
    changed = sorted(k for k in cfg if user["config"].get(k) != cfg[k])
    if changed:
        raise ValueError(f"--resume: {path} was written with other settings ("
                         + ", ".join(f"{k} {user['config'].get(k)!r}, here {cfg[k]!r}"
                                     for k in changed)
                         + "); give the same, or another --checkpoint")


# ---------------------------------------------------------------------- sample
def load_model(path, backend="auto"):
    """(model, vocab, user data) from a checkpoint written by ``train``."""
    ck, user = read_checkpoint(path)
    vocab = level_of_checkpoint(user, path).from_meta(user)
    model = build_model(len(vocab), user["config"], 0, backend)
    model.load_params(ck["params"])
    return model, vocab, user


def check_checkpoint(path):
    """FileNotFoundError (train first) or readable_file's error for ``--checkpoint path``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint {path}: checkpoint not found (train first: "
                                f"python -m rnnkern train --checkpoint {path})")
    readable_file(path, "--checkpoint")   # a directory, an empty file


def sample(args):
    check_checkpoint(args.checkpoint)
    model, vocab, _ = load_model(args.checkpoint, args.backend)
    text = sample_text(model, vocab, args.prime, args.length, args.temperature, args.top_k,
                       args.seed, args.checkpoint)
    print(text)
    return {"sample": text}


# ---------------------------------------------------------------------- CLI
def number(kind, low, high=None):
    """argparse type: a ``kind`` number in [low, high), so that a bad value stops at parse
    time in one line instead of deep in the training or sampling."""
    def convert(text):
        value = kind(text)   # ValueError: argparse says "invalid <kind> value"
        if not low <= value < (float("inf") if high is None else high):   # NaN fails too
            bound = f">= {low}" if high is None else f"in [{low}, {high})"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    convert.__name__ = kind.__name__
    return convert


def nonempty(text):
    """argparse type for --prime: generation starts from at least one character."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def parser(prog="char_rnn", level="char"):
    """The command line; ``level`` is the default of ``train --level`` and names ``sample``'s
    default checkpoint, ``save/<level>_rnn.npz`` (``train``'s follows its ``--level``)."""
    p = CliParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    count, positive = number(int, 0), number(int, 1)

    t = sub.add_parser("train", help="train on a text file and sample from the result")
    t.add_argument("--text", default=None, metavar="PATH",
                   help="training text, UTF-8 (default: the packaged tiny-shakespeare)")
    t.add_argument("--max-chars", type=count, default=0,
                   help="use only the first N characters (0: all)")
    t.add_argument("--val-fraction", type=number(float, 0, 1), default=0.05)
    t.add_argument("--level", choices=list(LEVELS), default=level,
                   help="a token is a character (char) or a word or punctuation mark (word); "
                        "default %(default)s")
    t.add_argument("--max-vocab", type=count, default=None, metavar="N",
                   help="word level: keep the N most frequent tokens, <unk> included (default "
                        "10000; 0: all)")
    t.add_argument("--min-count", type=positive, default=None, metavar="N",
                   help="word level: keep only tokens seen at least N times (default 1)")
    t.add_argument("--keep-case", action="store_true",
                   help="word level: keep upper case (default: lowercase the text)")
    t.add_argument("--model", choices=list(CELLS), default=DEFAULTS["model"],
                   help="recurrent cell (default %(default)s)")
    t.add_argument("--rnn-size", dest="rnn_size", type=positive,
                   default=DEFAULTS["rnn_size"])
    t.add_argument("--num-layers", dest="num_layers", type=positive,
                   default=DEFAULTS["num_layers"])
    t.add_argument("--seq-length", dest="seq_length", type=positive,
                   default=DEFAULTS["seq_length"])
    t.add_argument("--batch-size", dest="batch_size", type=positive,
                   default=DEFAULTS["batch_size"])
    t.add_argument("--lr", dest="learning_rate", type=float, default=DEFAULTS["learning_rate"])
    t.add_argument("--decay-rate", dest="decay_rate", type=float, default=DEFAULTS["decay_rate"])
    t.add_argument("--grad-clip", dest="grad_clip", type=float, default=DEFAULTS["grad_clip"])
    t.add_argument("--dropout", type=number(float, 0, 1), default=DEFAULTS["dropout"],
                   help="drop LSTM outputs with this probability in training (default 0)")
    t.add_argument("--epochs", type=count, default=None,
                   help="(default 50, char-rnn's; 8 at the word level, where the validation "
                        "perplexity of tiny-shakespeare stops falling)")
    t.add_argument("--max-batches", type=count, default=0, help="batches per epoch (0: all)")
    t.add_argument("--time-limit", type=number(float, 0), default=0, metavar="SECONDS",
                   help="stop training after this long (0: no limit; with --distributed the ranks "
                        "look every 16 steps)")
    t.add_argument("--checkpoint", default=None,
                   help="checkpoint file, written every epoch ('' for none; default "
                        "save/char_rnn.npz, or save/word_rnn.npz with --level word)")
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    t.add_argument("--progress", action="store_true", help="show a tqdm progress bar")
    t.add_argument("--distributed", action="store_true",
                   help="data-parallel over MPI: mpiexec -n N python -m rnnkern train "
                        "--distributed ... (pip install \"rnnkern[mpi]\")")
    t.add_argument("--prime", default=None, type=nonempty,
                   help="sample prefix (default 'The ', or the text's first character when "
                        "'The ' is not in its vocabulary; word level: 'The', or its most "
                        "frequent token)")
    t.add_argument("--sample-length", type=count, default=500)
    t.add_argument("--temperature", type=number(float, 0), default=1.0)
    t.add_argument("--top-k", type=positive, default=None)
    add_common_args(t)

    s = sub.add_parser("sample", help="sample from a checkpoint")
    s.add_argument("--checkpoint", default=default_checkpoint(level),
                   help="written by train, at either level (default %(default)s)")
    s.add_argument("-n", "--length", type=count, default=500)
    s.add_argument("--prime", default="The ", type=nonempty,
                   help="sample prefix (default %(default)r); at the word level, words outside "
                        "the vocabulary are read as <unk>")
    s.add_argument("--temperature", type=number(float, 0), default=1.0)
    s.add_argument("--top-k", type=positive, default=None)
    add_common_args(s)
    return p


def main(argv=None, prog="char_rnn", level="char"):
    """Run ``train`` or ``sample`` and return its results; bad input raises (see :func:`cli`).
    ``level``: the default of ``--level`` (word_rnn.py: "word")."""
    args = parse(parser(prog, level), argv)
    return train(args) if args.command == "train" else sample(args)


def cli(argv=None, prog="char_rnn", level="char"):
    """The command line (``python examples/char_rnn.py``, ``python -m rnnkern train|sample``):
    exit status 0, or 2 with one line on stderr for bad input; other errors keep their
    traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = f"{prog} {argv[0]}" if argv and argv[0] in ("train", "sample") else prog
    return run_cli(command, lambda: main(argv, prog, level))


if __name__ == "__main__":
    sys.exit(cli())
