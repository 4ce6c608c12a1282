"""Bad input on the command line: one line on stderr, exit status 2, no traceback (issue 19).

Each case runs ``python -m rnnkern ...`` in its own process, in a temporary directory, on tiny
files, as a user would; the checkpoints come from one tiny training run (also the happy path).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import rnnkern as rk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one batch of 4x10 per step, 3 steps, one epoch: a training run of well under a second
TINY = ["--rnn-size", "8", "--num-layers", "1", "--seq-length", "10", "--batch-size", "4",
        "--max-batches", "3", "--epochs", "1", "--sample-length", "5", "--quiet"]


def run(*args, cwd, script=None):
    """``python -m rnnkern args`` (or ``python script args``) in ``cwd``."""
    env = dict(os.environ, NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR",
                                                          "/tmp/numba-cache"))
    head = [script] if script else ["-m", "rnnkern"]
    return subprocess.run([sys.executable, *head, *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def words(n_lines, vocab):
    rng = np.random.default_rng(0)
    return "\n".join(" ".join(rng.choice(vocab, 8)) + "." for _ in range(n_lines))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with the inputs of every case, and a checkpoint trained on ``tiny.txt``."""
    d = tmp_path_factory.mktemp("cli")
    (d / "tiny.txt").write_text(words(100, ["the", "quick", "brown", "fox", "jumps", "over"]))
    (d / "other.txt").write_text(words(100, ["xyz", "XYZ", "123", "w"]))
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("hello world")
    (d / "spaces.txt").write_text("  \t  " * 20)          # text, but no word-level token
    (d / "binary.txt").write_bytes(bytes(range(256)) * 4)
    (d / "a_dir").mkdir()
    proc = run("train", "--text", "tiny.txt", "--checkpoint", "ck.npz", "--prime", "the", *TINY,
               cwd=d)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    proc = run("train", "--level", "word", "--text", "tiny.txt", "--checkpoint", "word_ck.npz",
               "--prime", "the", *TINY, cwd=d)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    raw = (d / "ck.npz").read_bytes()
    (d / "truncated.npz").write_bytes(raw[:len(raw) // 2])
    (d / "other_ck.npz").write_bytes(raw)                   # to resume on other.txt
    (d / "text.npz").write_text("not a checkpoint\n")
    np.savez(d / "plain.npz", a=np.zeros(3))                # an npz, not an rnnkern checkpoint
    rk.save_checkpoint(d / "novocab.npz", params={"w": np.zeros(2)})   # no vocabulary
    return d


def assert_one_line_error(proc, *names, prog):
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    assert lines[0].startswith(f"{prog}: error: "), err
    for name in names:                       # it says which argument / file is wrong
        assert name in lines[0], (name, err)


# (argv, what the line must name); each printed a traceback (or exited 0/1 quietly) before
CASES = {
    "train-missing-text": (["train", "--text", "absent.txt"], ["--text", "absent.txt",
                                                                "not found"]),
    "train-empty-text": (["train", "--text", "empty.txt"], ["--text", "empty.txt", "empty"]),
    "train-binary-text": (["train", "--text", "binary.txt"], ["binary.txt", "UTF-8"]),
    "train-short-text": (["train", "--text", "short.txt"], ["--text", "short.txt", "too short"]),
    "train-directory-text": (["train", "--text", "a_dir"], ["--text", "a_dir", "directory"]),
    "train-resume-other-corpus": (["train", "--text", "other.txt", "--checkpoint",
                                   "other_ck.npz", "--resume"],
                                  ["--resume", "other_ck.npz", "another corpus"]),
    "train-resume-other-settings": (["train", "--text", "tiny.txt", "--checkpoint", "ck.npz",
                                     "--resume", "--rnn-size", "16"],
                                    ["--resume", "ck.npz", "rnn_size"]),
    "train-resume-unreadable": (["train", "--text", "tiny.txt", "--checkpoint",
                                 "truncated.npz", "--resume"], ["truncated.npz"]),
    "train-prime-outside-vocab": (["train", "--text", "tiny.txt", "--prime", "Q"],
                                  ["--prime", "tiny.txt"]),
    "train-checkpoint-directory": (["train", "--text", "tiny.txt", "--checkpoint", "a_dir"],
                                   ["--checkpoint", "a_dir"]),
    "train-batch-size-0": (["train", "--text", "tiny.txt", "--batch-size", "0"],
                           ["--batch-size"]),
    "sample-missing-checkpoint": (["sample", "--checkpoint", "absent.npz"],
                                  ["--checkpoint", "absent.npz", "train first"]),
    "sample-truncated-checkpoint": (["sample", "--checkpoint", "truncated.npz"],
                                    ["--checkpoint", "truncated.npz"]),
    "sample-text-file-checkpoint": (["sample", "--checkpoint", "text.npz"],
                                    ["--checkpoint", "text.npz"]),
    "sample-plain-npz-checkpoint": (["sample", "--checkpoint", "plain.npz"],
                                    ["--checkpoint", "plain.npz"]),
    "sample-checkpoint-without-vocab": (["sample", "--checkpoint", "novocab.npz"],
                                        ["--checkpoint", "novocab.npz", "vocabulary"]),
    "sample-directory-checkpoint": (["sample", "--checkpoint", "a_dir"],
                                    ["--checkpoint", "a_dir"]),
    "sample-prime-outside-vocab": (["sample", "--checkpoint", "ck.npz", "--prime", "QZ"],
                                   ["--prime", "ck.npz", "QZ"]),
    "sample-negative-temperature": (["sample", "--checkpoint", "ck.npz", "--prime", "the",
                                     "--temperature", "-1"], ["--temperature", ">= 0"]),
    "sample-top-k-0": (["sample", "--checkpoint", "ck.npz", "--prime", "the", "--top-k", "0"],
                       ["--top-k", ">= 1"]),
    # word level (issue 20): a prime word outside the vocabulary is no error (read as <unk>:
    # tests/test_word.py), a prime without any token is
    "train-word-short-text": (["train", "--level", "word", "--text", "short.txt"],
                              ["--text", "short.txt", "2 tokens", "too short"]),
    "train-word-no-tokens": (["train", "--level", "word", "--text", "spaces.txt"],
                             ["--text", "spaces.txt", "no tokens"]),
    "train-word-min-count-too-high": (["train", "--level", "word", "--text", "tiny.txt",
                                       "--min-count", "100000"],
                                      ["tiny.txt", "--min-count 100000"]),
    "train-word-option-at-char-level": (["train", "--text", "tiny.txt", "--max-vocab", "5"],
                                        ["--max-vocab", "--level word only"]),
    "train-unknown-level": (["train", "--level", "sentence"], ["--level", "sentence"]),
    "train-resume-word-checkpoint-at-char-level": (["train", "--text", "tiny.txt",
                                                    "--checkpoint", "word_ck.npz", "--resume"],
                                                   ["--resume", "word_ck.npz",
                                                    "give --level word"]),
    "train-resume-char-checkpoint-at-word-level": (["train", "--level", "word", "--text",
                                                    "tiny.txt", "--checkpoint", "ck.npz",
                                                    "--resume"], ["ck.npz", "give --level char"]),
    "train-word-resume-other-vocabulary": (["train", "--level", "word", "--text", "tiny.txt",
                                            "--checkpoint", "word_ck.npz", "--resume",
                                            "--max-vocab", "4"],
                                           ["--resume", "word_ck.npz", "another corpus"]),
    "train-word-prime-without-tokens": (["train", "--level", "word", "--text", "tiny.txt",
                                         "--prime", " "], ["--prime", "no word"]),
    "sample-word-prime-without-tokens": (["sample", "--checkpoint", "word_ck.npz", "--prime",
                                          "\t"], ["--prime", "no word", "punctuation mark"]),
    "labs-missing-csv": (["labs", "--csv", "absent.csv"], ["--csv", "absent.csv", "not found"]),
    "labs-directory-csv": (["labs", "--csv", "a_dir"], ["--csv", "a_dir", "directory"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(work, case):
    argv, names = CASES[case]
    small = TINY if argv[0] == "train" and "--batch-size" not in argv else []
    proc = run(argv[0], *small, *argv[1:], cwd=work)   # the case's own options win
    assert_one_line_error(proc, *names, prog=f"rnnkern {argv[0]}")
    assert not (work / "save").exists()      # no default checkpoint written on the way


@pytest.mark.parametrize("argv, names", [
    (["sample", "--checkpoint", "absent.npz"], ["absent.npz", "train first"]),
    (["train", "--text", "short.txt", *TINY], ["short.txt", "too short"]),
])
def test_the_script_itself_reports_the_same_way(work, argv, names):
    """`python examples/char_rnn.py` (its `__name__` is "__main__") and `python -m rnnkern`
    share one error path."""
    proc = run(*argv, cwd=work, script=os.path.join(REPO, "examples", "char_rnn.py"))
    assert_one_line_error(proc, *names, prog=f"char_rnn {argv[0]}")


def test_the_word_rnn_script_reports_the_same_way(work):
    proc = run("train", "--text", "short.txt", *TINY, cwd=work,
               script=os.path.join(REPO, "examples", "word_rnn.py"))
    assert_one_line_error(proc, "short.txt", "tokens", "too short", prog="word_rnn train")


def test_valid_input_trains_resumes_and_samples(work):
    proc = run("train", "--text", "tiny.txt", "--checkpoint", "ck.npz", "--resume",
               "--prime", "the", *TINY[:-5], "--epochs", "2", "--sample-length", "5", cwd=work)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "resumed from ck.npz at epoch 1" in proc.stdout and "epoch 2/2" in proc.stdout
    proc = run("sample", "--checkpoint", "ck.npz", "--prime", "the", "-n", "20", "--top-k", "3",
               "--temperature", "0.5", cwd=work)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    out = proc.stdout.strip()
    assert out.startswith("the") and len(out) >= 20


def test_an_unexpected_error_keeps_its_traceback(work):
    """Only bad input is shortened to one line: a bug (here a TypeError) still shows where."""
    code = ("import sys, rnnkern.labs as L\n"
            "def bug(): raise TypeError('a bug')\n"
            "sys.exit(L.run_cli('rnnkern x', bug))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=work, timeout=60)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "a bug" in proc.stderr
