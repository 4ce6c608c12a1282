"""End-to-end training benchmark: the examples' recipes in rnnkern and in PyTorch, one process.

    python benchmarks/bench_e2e.py                         # hihello, lab12-4, char-rnn, word-rnn
    python benchmarks/bench_e2e.py --only hihello lab12-4 --repeats 5
    python benchmarks/bench_e2e.py --only char-rnn --max-batches 100
    python benchmarks/bench_e2e.py --only word-rnn --word-epochs 2   # + validation perplexities
    python benchmarks/bench_e2e.py --cells lstm gru rnn      # each workload with each cell

Workloads (float32, full training steps: forward, loss, backward, optimizer update):

* ``hihello``:  one-hot(5) -> LSTM(5) -> dense 5, batch 1 x 6 steps, Adam 0.1, 2000 steps
* ``lab12-4``:  one-hot(25) -> 2-layer LSTM(25) -> dense 25, 170 windows x 10, Adam 0.1, 500 steps
* ``char-rnn``: embedding 128 -> 2-layer LSTM(128) -> dense 65 on tiny-shakespeare, batches
  50 x 50 with the state carried between batches, Adam 2e-3, clip-by-global-norm 5, one epoch
  over the 95% training part (``--max-batches`` shortens it), as examples/char_rnn.py trains.
* ``word-rnn``: the same recipe on words (examples/word_rnn.py): rk.WordVocab of tiny-shakespeare
  with ``--word-vocab`` 10,000 entries (<unk> included; 293,593 tokens, 111 batches of 50 x 50
  per epoch), embedding 128 -> 2-layer LSTM(128) -> dense 10,000 (its bias starting at the log
  unigram frequencies, as word_rnn's) -- the head (``[2500,128] x [128,10000]`` GEMMs and a
  softmax over 10,000) is most of the work. Both sides
  start from the same weights (rnnkern's TF1-style init, copied into the torch modules with
  ``rk.interop.to_torch``), train ``--word-epochs`` timed epochs (lr decayed by 0.97 between
  them) on the same batches, then report the validation perplexity, exp(mean cross-entropy over
  the held-out 5%, state carried), which should agree within 5%.

``--cells gru rnn`` runs the same workloads with GRU (reset_after, as torch.nn.GRU) or tanh-RNN
cells in the LSTM's place, on both sides.

rnnkern runs the examples' own model builders and loop (``backend="auto"``: the fastest CPU
backend) with the examples' single-thread OpenBLAS (``--blas-threads``); PyTorch runs ``nn.LSTM`` + ``nn.Linear`` (+ ``nn.Embedding``), ``F.cross_entropy``,
``torch.optim.Adam`` and ``clip_grad_norm_`` with ``torch.set_num_threads(--threads)`` (several
counts: one PyTorch contestant each). Each repeat runs all, alternating which goes first, after
one untimed warm-up step each (Numba's compile or cache load, oneDNN's primitive creation). Reported: min and median seconds over repeats, and the
speed-up (PyTorch min / rnnkern min). Final losses are printed to show comparable work.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rnnkern as rk  # noqa: E402
from rnnkern.labs import load_example  # noqa: E402

TARGETS = {"hihello": 20.0, "lab12-4": 5.0, "char-rnn": 1.5, "word-rnn": 1.3}


# ---------------------------------------------------------------------- workloads: data
def hihello_data():
    lab = load_example("lab12_1_hello_rnn")
    vocab = rk.CharVocab(lab.IDX2CHAR)
    return vocab.encode(lab.X_TEXT)[None], vocab.encode(lab.Y_TEXT)[None], len(vocab)


def lab12_4_data():
    lab = load_example("lab12_4_rnn_long_char")
    vocab = rk.CharVocab.from_text(lab.SENTENCE)
    x, y = rk.shifted_windows(vocab.encode(lab.SENTENCE), 10)
    return x, y, len(vocab)


def char_rnn_data(path, max_batches):
    """char-rnn's training batches of ``path`` (None: the packaged tiny-shakespeare)."""
    cr = load_example("char_rnn")
    text = rk.datasets.tiny_shakespeare(path)
    vocab = rk.CharVocab.from_text(text)
    train, _ = cr.split_ids(vocab.encode(text), 0.05, 50, 50)
    n = min(len(train), max_batches) if max_batches else len(train)
    return [train[k] for k in range(n)], len(vocab)


def word_rnn_data(path, max_batches, max_vocab):
    """word_rnn's training batches of ``path`` (None: the packaged tiny-shakespeare), its
    validation batches, the vocabulary size and the initial output bias (the log unigram
    frequencies of the training part, as word_rnn starts)."""
    cr = load_example("char_rnn")
    from rnnkern.examples._levels import LEVELS
    text = rk.datasets.tiny_shakespeare(path)
    vocab = rk.WordVocab.from_text(text, max_size=max_vocab)
    ids = vocab.encode(text)
    train, val = cr.split_ids(ids, 0.05, 50, 50)
    bias = LEVELS["word"].output_bias(ids[:len(ids) - int(len(ids) * 0.05)], len(vocab))
    n = min(len(train), max_batches) if max_batches else len(train)
    return [train[k] for k in range(n)], [val[k] for k in range(len(val))], len(vocab), bias


# ---------------------------------------------------------------------- rnnkern
CELLS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def rk_lab_model(kind, C, L, seed=0):
    """one-hot(C) -> L layers of the cell with C units -> Dense(C): the labs' build (lab12_1's
    and lab12_4's ``build``, TF1 glorot init) with any cell."""
    from rnnkern.examples._common import tf1_glorot_init
    cell = getattr(rk, CELLS[kind])(C, C, L)
    return rk.Sequential([rk.OneHot(C), tf1_glorot_init(cell, seed),
                          rk.Dense(C, C, init="glorot", seed=seed + 1)])


def rk_full_batch(build, x, y, steps, lr):
    """The labs' loop: one rk.TrainStep (forward, sequence_loss, backward, Adam) per step."""
    step = rk.TrainStep(build(), rk.sequence_loss, rk.Adam(lr=lr))
    step(x, y)  # warm-up (compile / cache load), untimed, on the same model

    def run():
        for _ in range(steps):
            loss = step(x, y)
        return loss
    return run


def rk_hihello(steps, kind):
    x, y, C = hihello_data()
    return rk_full_batch(lambda: rk_lab_model(kind, C, 1), x, y, steps, 0.1)


def rk_lab12_4(steps, kind):
    x, y, C = lab12_4_data()
    return rk_full_batch(lambda: rk_lab_model(kind, C, 2), x, y, steps, 0.1)


def rk_lm_model(C, kind, output_bias=None):
    """examples/char_rnn.py's (and word_rnn.py's) model for C classes, as it starts training."""
    cr = load_example("char_rnn")
    return cr.build_model(C, dict(cr.DEFAULTS, model=kind), 0, output_bias=output_bias)


def rk_char_rnn(batches, C, kind, val=None, output_bias=None, device="cpu"):
    """One epoch per call, as examples/char_rnn.py trains; ``run.evaluate()``: the mean
    validation loss over ``val`` (state carried), untimed. With ``val`` (the perplexity
    comparison), training starts from the model's initial weights after the warm-up, and Adam
    puts eps where torch.optim.Adam does (``eps_mode="torch"``; the examples' TF form differs
    from it early on, on rarely seen embedding rows): the same updates on both sides.
    ``device``: where the model trains ("cuda": the batches are copied there first)."""
    cr = load_example("char_rnn")
    cfg = dict(cr.DEFAULTS, model=kind)
    model = rk_lm_model(C, kind, output_bias).to(device)
    if device != "cpu":
        batches = [tuple(rk.device.to_device(a, device) for a in b) for b in batches]
    start = {k: v.copy() for k, v in model.params.items()}

    def make_trainer():
        return rk.Trainer(model, rk.sequence_loss,
                          rk.Adam(lr=cfg["learning_rate"], clip_norm=cfg["grad_clip"],
                                  eps_mode="tf" if val is None else "torch"),
                          stateful=True, progress=False,
                          lr_schedule=rk.ExponentialDecay(cfg["learning_rate"], cfg["decay_rate"]))
    trainer = make_trainer()
    trainer.train_step(batches[0])   # warm-up
    trainer._state = None
    if val is not None:              # measured: start again from the same weights, a fresh Adam
        model.load_params(start)
        trainer = make_trainer()

    def run():
        trainer.fit(batches, epochs=trainer.epoch + 1)
        return trainer.history["loss"][-1]
    run.evaluate = lambda: trainer.evaluate(val)
    return run


# ---------------------------------------------------------------------- PyTorch
class TorchCharModel:
    """one-hot or embedding input -> nn.LSTM/GRU/RNN (batch_first) -> nn.Linear, float32."""

    def __init__(self, torch, C, H, L, embed, kind="lstm"):
        nn = torch.nn
        torch.manual_seed(0)
        self.embed = nn.Embedding(C, H) if embed else None
        self.lstm = getattr(nn, CELLS[kind])(H if embed else C, H, L, batch_first=True)
        self.fc = nn.Linear(H, C)
        self.modules = [m for m in (self.embed, self.lstm, self.fc) if m is not None]

    def parameters(self):
        return [p for m in self.modules for p in m.parameters()]

    def __call__(self, x, state=None):
        h = self.embed(x) if self.embed is not None else x
        out, state = self.lstm(h, state)
        return self.fc(out), state


def torch_full_batch(torch, x_ids, y_ids, C, H, L, steps, lr, kind):
    F = torch.nn.functional
    model = TorchCharModel(torch, C, H, L, embed=False, kind=kind)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = F.one_hot(torch.from_numpy(x_ids), C).float()   # tf.one_hot of the lab's graph
    y = torch.from_numpy(y_ids).reshape(-1)

    def step():
        opt.zero_grad(set_to_none=True)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, C), y)
        loss.backward()
        opt.step()
        return loss

    step()

    def run():
        for _ in range(steps):
            loss = step()
        return float(loss.detach())
    return run


def load_rk_weights(torch, model, rk_model):
    """Copy an rnnkern Embedding -> LSTM/GRU/RNN -> Dense model's weights into ``model``."""
    with torch.no_grad():
        model.embed.weight.copy_(torch.from_numpy(rk_model.layers[0].params["weight"]))
        model.lstm.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                                    rk.interop.to_torch(rk_model.layers[1]).items()})
        model.fc.weight.copy_(torch.from_numpy(rk_model.layers[-1].params["weight"]))
        model.fc.bias.copy_(torch.from_numpy(rk_model.layers[-1].params["bias"]))


def torch_char_rnn(torch, batches, C, kind, val=None, init=None, device="cpu"):
    """PyTorch's side of :func:`rk_char_rnn`; ``init``: an rnnkern model to start from (its
    weights), else PyTorch's own init; ``device``: a torch device (the batches go there first)."""
    F = torch.nn.functional
    model = TorchCharModel(torch, C, 128, 2, embed=True, kind=kind)
    for m in model.modules:
        m.to(device)
    params = model.parameters()
    data = [(torch.from_numpy(x).to(device), torch.from_numpy(y).reshape(-1).to(device))
            for x, y in batches]
    epoch = [0]

    def step(x, y, state):
        opt.zero_grad(set_to_none=True)
        logits, state = model(x, state)
        loss = F.cross_entropy(logits.reshape(-1, C), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        state = tuple(s.detach() for s in state) if kind == "lstm" else state.detach()
        return float(loss.detach()), state   # truncated BPTT

    opt = torch.optim.Adam(params, lr=2e-3)
    step(*data[0], None)                     # warm-up
    if init is not None:                     # start (again) from those weights, a fresh Adam
        load_rk_weights(torch, model, init)
        opt = torch.optim.Adam(params, lr=2e-3)

    def evaluate():
        total, state = 0.0, None
        with torch.no_grad():
            for x, y in val:
                logits, state = model(torch.from_numpy(x).to(device), state)
                total += float(F.cross_entropy(logits.reshape(-1, C),
                                               torch.from_numpy(y).reshape(-1).to(device)))
        return total / len(val)

    def run():
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.97 ** epoch[0]
        state, total = None, 0.0
        for x, y in data:
            loss, state = step(x, y, state)
            total += loss
        epoch[0] += 1
        return total / len(data)
    run.evaluate = evaluate
    return run


# ---------------------------------------------------------------------- driver
def _timed(run, threads, torch):
    if threads is not None:
        torch.set_num_threads(threads)
    time.sleep(0.2)   # let the other contestants' BLAS/OpenMP threads go idle
    t0 = time.perf_counter()
    loss = run()
    return loss, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--cells", nargs="+", choices=list(CELLS), default=["lstm"],
                   help="recurrent cells to run each workload with (default lstm)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs of hihello/lab12-4 per contestant (default %(default)s)")
    p.add_argument("--char-repeats", type=int, default=1, help="char-rnn epochs per contestant")
    p.add_argument("--hihello-steps", type=int, default=2000)
    p.add_argument("--lab4-steps", type=int, default=500)
    p.add_argument("--text", default=None, metavar="PATH",
                   help="char-rnn text (default: the packaged tiny-shakespeare)")
    p.add_argument("--max-batches", type=int, default=0,
                   help="char-rnn and word-rnn batches per epoch (0: a full epoch)")
    p.add_argument("--word-epochs", type=int, default=1,
                   help="word-rnn epochs per contestant, each timed; the validation perplexities "
                        "are compared after the last (default %(default)s)")
    p.add_argument("--word-vocab", type=int, default=10_000,
                   help="word-rnn vocabulary size, <unk> included (default %(default)s)")
    p.add_argument("--threads", type=int, nargs="+", default=[2],
                   help="torch.set_num_threads for each PyTorch contestant (default 2; e.g. "
                        "'2 1' also runs a 1-thread PyTorch: on a loaded machine OpenMP's "
                        "2-thread barriers can cost 10x). Targets are checked against the first.")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="set NumPy's and SciPy's OpenBLAS pools (rnnkern's GEMMs) to N threads, "
                        "as the examples do (default 1; 0: leave them as they are)")
    args = p.parse_args(argv)
    if args.blas_threads:
        from rnnkern.labs import limit_blas_threads
        limit_blas_threads(args.blas_threads)

    import torch
    torch.set_num_threads(args.threads[0])
    from rnnkern.backends import resolve
    backend = resolve("auto", np.zeros(1)).name
    print(f"# rnnkern {rk.__version__} (auto -> {backend}) vs torch {torch.__version__} "
          f"(threads {args.threads}); {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}; "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
          f"--blas-threads {args.blas_threads or 'unchanged'}; "
          f"load avg {os.getloadavg()[0]:.1f}", flush=True)
    tnames = [f"torch {n}t" for n in args.threads]

    rows, perplexities = [], []
    for name, kind in [(n, k) for n in args.only for k in args.cells]:
        cell = "" if kind == "lstm" else f" [{CELLS[kind]}]"
        if name == "hihello":
            x, y, C = hihello_data()
            label = f"hihello, {args.hihello_steps} Adam steps{cell}"
            make_rk = lambda: rk_hihello(args.hihello_steps, kind)  # noqa: E731
            make_th = lambda: torch_full_batch(torch, x, y, C, C, 1, args.hihello_steps, 0.1, kind)  # noqa: E731
            reps = args.repeats
        elif name == "lab12-4":
            x, y, C = lab12_4_data()
            label = f"lab12-4, {args.lab4_steps} Adam steps (170x10, 2 layers){cell}"
            make_rk = lambda: rk_lab12_4(args.lab4_steps, kind)  # noqa: E731
            make_th = lambda: torch_full_batch(torch, x, y, C, C, 2, args.lab4_steps, 0.1, kind)  # noqa: E731
            reps = args.repeats
        elif name == "word-rnn":
            batches, val, C, bias = word_rnn_data(args.text, args.max_batches, args.word_vocab)
            label = (f"word-rnn epoch, {len(batches)} batches 50x50, V={C} "
                     f"({args.text or 'tiny-shakespeare'}){cell}")
            init = rk_lm_model(C, kind, bias)   # both sides start from these weights
            make_rk = lambda: rk_char_rnn(batches, C, kind, val, bias)  # noqa: E731
            make_th = lambda: torch_char_rnn(torch, batches, C, kind, val, init)  # noqa: E731
            reps = args.word_epochs
        else:
            batches, C = char_rnn_data(args.text, args.max_batches)
            label = (f"char-rnn epoch, {len(batches)} batches 50x50 "
                     f"({args.text or 'tiny-shakespeare'}){cell}")
            make_rk = lambda: rk_char_rnn(batches, C, kind)  # noqa: E731
            make_th = lambda: torch_char_rnn(torch, batches, C, kind)  # noqa: E731
            reps = args.char_repeats
        contestants = {"rnnkern": (make_rk(), None)}
        for n, tn in zip(args.threads, tnames):
            torch.set_num_threads(n)
            contestants[tn] = (make_th(), n)   # its own model: each contestant trains alone
        times = {k: [] for k in contestants}
        losses = {}
        order = list(contestants)
        for r in range(reps):
            for k in (order if r % 2 == 0 else order[::-1]):   # alternate who goes first
                run, n = contestants[k]
                losses[k], dt = _timed(run, n, torch)
                times[k].append(dt)
            print(f"# {name} repeat {r + 1}/{reps}: "
                  + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
        if name == "word-rnn":   # validation perplexity after the same epochs, untimed
            ppl = {k: float(np.exp(run.evaluate())) for k, (run, _) in contestants.items()}
            print(f"# word-rnn validation perplexity after {reps} epoch(s) of {len(batches)} "
                  f"batches: " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())
                  + f"; rnnkern / {tnames[0]} {ppl['rnnkern'] / ppl[tnames[0]]:.4f}", flush=True)
            perplexities.append((label, reps, ppl))
        rows.append((label, times, losses, TARGETS[name]))

    print()
    print("| workload | rnnkern s (min / median) | "
          + " | ".join(f"PyTorch {n} thr s (min / median)" for n in args.threads)
          + f" | speed-up vs {args.threads[0]} thr | vs fastest PyTorch | target | final loss "
            "rnnkern / PyTorch |")
    print("|---" * (6 + len(args.threads)) + "|")
    for label, times, losses, target in rows:
        t_rk = min(times["rnnkern"])
        ratio = min(times[tnames[0]]) / t_rk
        best = min(min(times[t]) for t in tnames) / t_rk
        cells = " | ".join(f"{min(times[t]):.3f} / {np.median(times[t]):.3f}" for t in tnames)
        print(f"| {label} | {t_rk:.3f} / {np.median(times['rnnkern']):.3f} | {cells} | "
              f"{ratio:.1f}x | {best:.1f}x | >= {target:g}x {'met' if ratio >= target else 'NOT met'}"
              f" | {losses['rnnkern']:.4f} / {losses[tnames[0]]:.4f} |")
    if perplexities:
        print()
        print("| workload | epochs | validation perplexity rnnkern | "
              + " | ".join(f"PyTorch {n} thr" for n in args.threads)
              + " | rnnkern / PyTorch | within 5% |")
        print("|---" * (5 + len(args.threads)) + "|")
        for label, epochs, ppl in perplexities:
            rel = ppl["rnnkern"] / ppl[tnames[0]]
            print(f"| {label} | {epochs} | {ppl['rnnkern']:.2f} | "
                  + " | ".join(f"{ppl[t]:.2f}" for t in tnames)
                  + f" | {rel:.4f} | {'yes' if abs(rel - 1) <= 0.05 else 'NO'} |")
    return rows


if __name__ == "__main__":
    main()
