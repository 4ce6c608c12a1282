"""Word-level models (issue 20, part 2): rk.WordVocab -- what a token is, the id order, <unk>,
encode/decode round trips and spacing, checkpoints' to_list/from_list, errors -- and the word
level of the char_rnn/word_rnn example and its CLI on a tiny text."""
import os
import subprocess
import sys

import numpy as np
import pytest

import rnnkern as rk
from rnnkern.labs import load_example

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tok = rk.WordVocab.tokenize


# ---------------------------------------------------------------------- tokens
def test_tokens_are_words_marks_and_newlines():
    assert tok("Don't -- O'er the hills!\n") == ["don't", "-", "-", "o'er", "the", "hills", "!",
                                                  "\n"]
    assert tok("Don't", lower=False) == ["Don't"]
    # an apostrophe at a word's edge is a mark of its own; ’ works as ' does
    assert tok("'Tis o' the lords' ne’er") == ["'", "tis", "o", "'", "the", "lords", "'",
                                               "ne’er"]
    # digits are word characters, "_" and symbols are marks, each mark one token
    assert tok("a_b 3.5 & x$...") == ["a", "_", "b", "3", ".", "5", "&", "x", "$", ".", ".", "."]
    # whitespace other than "\n" only separates; every "\n" is a token; \r\n reads as \n
    assert tok(" a\t\tb \r\n\n c  ") == ["a", "b", "\n", "\n", "c"]
    assert tok("naïve CAFÉ, Straße") == ["naïve", "café", ",", "straße"]
    assert tok("<unk> <UNK> <unk>s") == ["<unk>", "<unk>", "<unk>", "s"]
    assert tok("<UNK>", lower=False) == ["<", "UNK", ">"]
    assert tok("") == [] and tok("   ") == []


def test_id_order_frequency_then_first_appearance_and_unk():
    v = rk.WordVocab.from_text("b a c a, c. d")   # a:2 c:2 (a first), then b , . d once each
    assert v.to_list() == ["<unk>", "a", "c", "b", ",", ".", "d"]
    assert len(v) == v.size == 7 and v.unk_id == 0 and v.UNK == "<unk>"
    ids = v.encode("A dog, b!")
    assert ids.dtype == np.int64 and ids.tolist() == [1, 0, 4, 3, 0]
    assert v.unknown_tokens("A dog, b! dog") == ["dog", "!"]
    assert v.encode("").dtype == np.int64 and v.encode("").shape == (0,)
    # min_count and max_size (<unk> counts towards max_size)
    assert rk.WordVocab.from_text("b a c a, c. d", min_count=2).to_list() == ["<unk>", "a", "c"]
    assert rk.WordVocab.from_text("b a c a, c. d", max_size=3).to_list() == ["<unk>", "a", "c"]
    assert rk.WordVocab.from_text("x", max_size=1).to_list() == ["<unk>"]
    # lower=False keeps case; "<unk>" in the text is never a second entry
    w = rk.WordVocab.from_text("The the THE <unk> <unk>", lower=False)
    assert w.to_list() == ["<unk>", "The", "the", "THE"] and w.encode("the tHe").tolist() == [2, 0]


def test_the_order_does_not_depend_on_the_hash_seed():
    code = ("import rnnkern as rk, sys\n"
            "print(rk.WordVocab.from_text(sys.argv[1]).to_list())\n")
    text = "to be or not to be, that is the question: whether 'tis nobler in the mind " * 3
    outs = {subprocess.run([sys.executable, "-c", code, text], capture_output=True, text=True,
                           check=True, cwd=REPO,
                           env=dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=REPO)).stdout
            for seed in ("0", "1", "77")}
    assert len(outs) == 1


# ---------------------------------------------------------------------- decode
SPACING = [   # text -> decode(encode(text)): what a reader expects, lowercased
    ("Hello,  world!  How are you?", "hello, world! how are you?"),
    ("First Citizen:\nBefore we proceed; hear me.\n\nAll:\nSpeak.",
     "first citizen:\nbefore we proceed; hear me.\n\nall:\nspeak."),
    ("a market-place, a soft-conscienced man--of what", "a market-place, a soft-conscienced "
                                                        "man--of what"),
    ("I'll go o' the way; lords' swords", "i'll go o' the way; lords' swords"),
    ("'Tis true.\n'Twas so", "'tis true.\n'twas so"),
    ("('Tis so) [sic]--'twas", "('tis so) [sic]--'twas"),
    ('he said "go home" and "stay"', 'he said "go home" and "stay"'),
    ("100% sure… «oui»", "100% sure… «oui»"),
    ("my good friends,'--this says", "my good friends,'--this says"),
]


@pytest.mark.parametrize("text, expected", SPACING)
def test_decode_spaces_as_a_reader_expects(text, expected):
    v = rk.WordVocab.from_text(text)
    assert v.decode(v.encode(text)) == expected


def test_decode_of_a_mid_line_leading_apostrophe_is_documented_not_restored():
    text = "and 'tis so, say 'ay'"
    v = rk.WordVocab.from_text(text)
    assert v.decode(v.encode(text)) == "and' tis so, say' ay'"   # (the docstring says so)


def test_encode_of_decode_gives_the_ids_back():
    text = rk.datasets.tiny_shakespeare()[:60_000]
    v = rk.WordVocab.from_text(text, max_size=500)
    ids = v.encode(text)
    assert 0 < (ids == 0).mean() < 0.5 and (v.encode(v.decode(ids)) == ids).all()
    rng = np.random.default_rng(0)
    for _ in range(20):                       # any id sequence, <unk> included
        r = rng.integers(0, len(v), 200)
        assert (v.encode(v.decode(r)) == r).all()
    assert v.decode([]) == "" and v.decode(np.array([], dtype=float)) == ""
    assert v.decode(0) == "<unk>" and v.decode(np.int32(v.encode("the")[0])) == "the"


def test_tiny_shakespeare_at_10k_words():
    text = rk.datasets.tiny_shakespeare()
    v = rk.WordVocab.from_text(text, max_size=10_000)
    assert len(v) == 10_000 and v.to_list()[:6] == ["<unk>", "\n", ",", ":", ".", "the"]
    ids = v.encode(text)
    assert len(ids) == 293_593 and (ids == 0).sum() == 2_386   # the tokens seen once, cut
    assert len(rk.WordVocab.from_text(text)) == 1 + 12_385      # <unk> + every distinct token


# ---------------------------------------------------------------------- checkpoints
def test_to_list_from_list_round_trip():
    v = rk.WordVocab.from_text("The cat sat.\nThe cat ran!")
    assert rk.WordVocab.from_list(v.to_list()) == v == rk.WordVocab(v.to_list())
    w = rk.WordVocab.from_text("The cat sat.", lower=False)
    back = rk.WordVocab.from_list(w.to_list(), lower=w.lower)
    assert back == w and back.encode("The").tolist() == [1] and back.encode("the").tolist() == [0]
    assert back != v and rk.WordVocab(["<unk>", "a"], lower=False) != rk.WordVocab(["<unk>", "a"])
    import json
    assert json.loads(json.dumps(v.to_list())) == v.to_list()
    assert v != rk.CharVocab("ab")
    assert "WordVocab(8 tokens: '<unk>', 'the'" in repr(v)


# ---------------------------------------------------------------------- errors
def test_errors_name_what_is_wrong():
    v = rk.WordVocab.from_text("a b")
    for bad in (b"a b", bytearray(b"a"), None, 3, ["a"]):
        with pytest.raises(TypeError, match="text must be a str"):
            rk.WordVocab.from_text(bad)
        with pytest.raises(TypeError, match="text must be a str"):
            v.encode(bad)
    with pytest.raises(TypeError, match="decode it first"):
        v.encode(b"a")
    with pytest.raises(ValueError, match="non-empty"):
        rk.WordVocab.from_text("")
    with pytest.raises(ValueError, match="no tokens"):
        rk.WordVocab.from_text("  \t ")
    with pytest.raises(ValueError, match=r"min_count=3 times \(the most frequent, 'a', 2\)"):
        rk.WordVocab.from_text("a a b", min_count=3)
    for kw in (dict(min_count=0), dict(min_count=1.5), dict(max_size=0), dict(max_size=True)):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be an integer >= 1"):
            rk.WordVocab.from_text("a", **kw)
    with pytest.raises(TypeError, match="lower must be True or False"):
        rk.WordVocab.from_text("a", lower="yes")
    # from_list
    with pytest.raises(ValueError, match=r"must start with '<unk>' \(id 0\), got 'a'"):
        rk.WordVocab.from_list(["a", "<unk>"])
    with pytest.raises(ValueError, match="must start with '<unk>'.*empty"):
        rk.WordVocab.from_list([])
    with pytest.raises(ValueError, match="distinct; repeated: 'a'"):
        rk.WordVocab.from_list(["<unk>", "a", "b", "a"])
    with pytest.raises(ValueError, match=r"single tokens .*'a b', 'The' are not"):
        rk.WordVocab.from_list(["<unk>", "a b", "The", "x"])
    with pytest.raises(ValueError, match="'-,' is not"):
        rk.WordVocab.from_list(["<unk>", "-,"], lower=False)
    with pytest.raises(TypeError, match="str tokens, got int 3"):
        rk.WordVocab.from_list(["<unk>", 3])
    with pytest.raises(TypeError, match="sequence of str tokens, got str"):
        rk.WordVocab("<unk> a")
    # decode, as CharVocab's
    with pytest.raises(ValueError, match=r"ids must be in \[0, 3\), got min 0 and max 3"):
        v.decode([0, 3])
    with pytest.raises(ValueError, match="decode each row"):
        v.decode([[1, 2]])
    with pytest.raises(TypeError, match="ids must be integers, got dtype float64"):
        v.decode([1.0])
    with pytest.raises(TypeError, match="ids must be integers, got str"):
        v.decode("a")


# ---------------------------------------------------------------------- the example and CLI
def _text(path):
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "don't", "o'er"]
    text = "\n".join(" ".join(rng.choice(words, 6)) + rng.choice([".", ",", "!"])
                     for _ in range(300))
    path.write_text(text)
    return text


SMALL = ["--rnn-size", "16", "--num-layers", "1", "--seq-length", "10", "--batch-size", "4",
         "--lr", "0.01", "--max-batches", "30", "--quiet"]


def test_word_rnn_trains_reports_perplexity_checkpoints_and_samples(tmp_path, capsys):
    wr = load_example("word_rnn")
    txt = tmp_path / "tiny.txt"
    _text(txt)
    ck = tmp_path / "ck.npz"
    r = wr.main(["train", "--text", str(txt), "--epochs", "2", "--checkpoint", str(ck),
                 "--sample-length", "12", "--prime", "The quick", *SMALL])
    out = capsys.readouterr().out
    assert r["level"] == "word" and isinstance(r["vocab"], rk.WordVocab)
    assert r["vocab"].to_list()[0] == "<unk>"
    assert len(r["vocab"]) == 15                    # <unk>, 10 words, 3 marks, "\n"
    h = r["history"]
    assert h["val_loss"][1] < h["val_loss"][0] < np.log(len(r["vocab"]))
    assert r["val_perplexity"] == pytest.approx(np.exp(h["val_loss"][1]))
    assert f"(perplexity {r['val_perplexity']:.1f})" in out
    assert r["sample"].startswith("The quick") and len(r["vocab"].encode(r["sample"])) == 14
    # the checkpoint records the level and the vocabulary; sample reads both
    model, vocab, user = load_example("char_rnn").load_model(str(ck))
    assert user["level"] == "word" and user["lower"] is True and vocab == r["vocab"]
    s1 = wr.main(["sample", "--checkpoint", str(ck), "-n", "30", "--prime", "Over the",
                  "--seed", "4"])["sample"]
    s2 = wr.main(["sample", "--checkpoint", str(ck), "-n", "30", "--prime", "Over the",
                  "--seed", "4"])["sample"]
    assert s1 == s2 and s1.startswith("Over the")
    assert len(vocab.encode(s1)) == 32 and "<unk>" not in s1   # (no <unk> in the text)


def test_cli_word_level_train_resume_and_sample(tmp_path):
    """`python -m rnnkern train --level word`, resumed, then `sample` of that checkpoint, with
    prime words outside the vocabulary read as <unk> (a note, exit 0)."""
    _text(tmp_path / "tiny.txt")

    def cli(*args):
        env = dict(os.environ, NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR",
                                                              "/tmp/numba-cache"))
        proc = subprocess.run([sys.executable, "-m", "rnnkern", *args], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=120)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        return proc

    train = ["train", "--level", "word", "--text", "tiny.txt", *SMALL[:-3], "--max-batches", "5",
             "--sample-length", "8", "--prime", "the"]
    proc = cli(*train, "--epochs", "1")
    assert "vocabulary 15" in proc.stdout and "(perplexity " in proc.stdout
    assert (tmp_path / "save" / "word_rnn.npz").is_file()       # the word level's default name
    proc = cli(*train, "--epochs", "2", "--resume")
    assert "resumed from save/word_rnn.npz at epoch 1" in proc.stdout and "epoch 2/2" in proc.stdout
    proc = cli("sample", "--checkpoint", "save/word_rnn.npz", "-n", "20", "--prime",
               "Zebras and unicorns", "--top-k", "3")
    assert proc.stdout.startswith("Zebras and unicorns")
    assert proc.stderr.startswith("note: --prime 'Zebras and unicorns': 'zebras', 'and', "
                                  "'unicorns' not in the vocabulary of save/word_rnn.npz, "
                                  "read as <unk>")


def test_word_rnn_is_char_rnn_at_the_word_level():
    wr, cr = load_example("word_rnn"), load_example("char_rnn")
    args, char_args = wr.parser().parse_args(["train"]), cr.parser().parse_args(["train"])
    assert args.level == "word" and char_args.level == "char"
    assert args.checkpoint is None and char_args.checkpoint is None   # save/<level>_rnn.npz
    assert wr.parser().parse_args(["sample"]).checkpoint == os.path.join("save", "word_rnn.npz")
    same = {k: getattr(args, k) for k in cr.DEFAULTS}
    assert same == {k: getattr(char_args, k) for k in cr.DEFAULTS} == cr.DEFAULTS


def test_the_word_level_starts_the_output_bias_at_the_log_unigram():
    """(examples/_levels.py: from zeros, training stalled at the unigram's perplexity.)"""
    from rnnkern.examples._levels import LEVELS
    bias = LEVELS["word"].output_bias(np.array([1, 1, 2, 1]), 4)   # add-one: counts 1, 4, 2, 1
    np.testing.assert_allclose(bias, np.log(np.array([1, 4, 2, 1]) / 8))
    assert LEVELS["char"].output_bias(np.array([0, 1]), 2) is None      # char-rnn's zeros
    cr = load_example("char_rnn")
    model = cr.build_model(4, dict(cr.DEFAULTS, rnn_size=8, num_layers=1), 0, output_bias=bias)
    np.testing.assert_allclose(model.params["2.bias"], bias, rtol=1e-6)
