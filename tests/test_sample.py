"""Sampling: argmax, temperature, top-k, seeding, distribution, and generate() with carried state."""
import re

import numpy as np
import pytest

import rnnkern as rk


def test_argmax_shapes_and_ties():
    assert rk.argmax(np.array([0.1, 3.0, 3.0])) == 1               # first of equal maxima
    ids = rk.argmax(np.array([[0.0, 1.0], [2.0, -1.0]]))
    assert ids.tolist() == [1, 0] and ids.dtype == np.int64
    assert rk.argmax(np.zeros((2, 3, 4))).shape == (2, 3)
    with pytest.raises(ValueError, match="logits"):
        rk.argmax(np.array([1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        rk.argmax(np.array([np.nan, 1.0]))


def test_sampling_is_seeded_and_temperature_zero_is_argmax():
    logits = np.random.default_rng(0).standard_normal((50, 6))
    a = rk.sample_logits(logits, rng=3)
    b = rk.sample_logits(logits, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, rk.sample_logits(logits, rng=4))
    np.testing.assert_array_equal(rk.sample_logits(logits, temperature=0), rk.argmax(logits))
    np.testing.assert_array_equal(rk.sample_logits(logits, top_k=1, rng=0), rk.argmax(logits))
    assert isinstance(rk.sample_logits(logits[0], rng=0), int)
    assert rk.sample_logits(np.zeros((2, 3, 4)), rng=0).shape == (2, 3)


def test_empirical_distribution_matches_softmax_with_temperature():
    logits = np.array([1.0, 0.0, -1.0, 2.0])
    N = 40000
    for temperature in (1.0, 0.5, 2.0):
        draws = rk.sample_logits(np.tile(logits, (N, 1)), temperature=temperature, rng=1)
        freq = np.bincount(draws, minlength=4) / N
        p = np.exp(logits / temperature)
        p /= p.sum()
        # 5 standard errors: fails for a wrong temperature, passes by chance essentially always
        assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / N) + 1e-12), (temperature, freq, p)


def test_top_k_restricts_support_and_renormalises():
    logits = np.array([0.0, 3.0, 1.0, 2.9, -5.0])
    N = 20000
    draws = rk.sample_logits(np.tile(logits, (N, 1)), top_k=2, rng=2)
    assert set(np.unique(draws)) == {1, 3}
    p1 = np.exp(3.0) / (np.exp(3.0) + np.exp(2.9))
    assert abs((draws == 1).mean() - p1) < 5 * np.sqrt(p1 * (1 - p1) / N)
    tie = rk.sample_logits(np.tile([1.0, 1.0, 1.0], (1000, 1)), top_k=2, rng=0)
    assert set(np.unique(tie)) == {0, 1}                # ties: lower ids kept
    with pytest.raises(ValueError, match="top_k"):
        rk.sample_logits(logits, top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        rk.sample_logits(logits, temperature=-1.0)


def toy_model():
    return rk.Sequential([rk.Embedding(6, 4, seed=0, dtype="float64"),
                          rk.LSTM(4, 8, num_layers=2, seed=1, dtype="float64", backend="numpy",
                                  dropout=0.5),
                          rk.Dense(8, 6, seed=2, dtype="float64")])


def test_generate_greedy_equals_rerunning_the_prefix():
    model = toy_model()
    prime = np.array([3, 1, 4])
    out = rk.generate(model, prime, 8, temperature=0)
    assert model.training                     # mode restored (was training)
    model.eval()
    seq = list(prime)
    for _ in range(8):                        # the slow way: full forward over the whole prefix
        seq.append(rk.argmax(model(np.array([seq]))[0, -1]))
    assert out.tolist() == seq[3:]


def test_generate_is_seeded_and_single_char_prime():
    model = toy_model()
    a = rk.generate(model, np.array([2]), 20, rng=5, temperature=1.0, top_k=3)
    b = rk.generate(model, np.array([2]), 20, rng=np.random.default_rng(5), temperature=1.0, top_k=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (20,) and a.min() >= 0 and a.max() < 6
    assert rk.generate(model, np.array([2]), 0).shape == (0,)
    with pytest.raises(ValueError, match="prime"):
        rk.generate(model, np.array([], dtype=np.int64), 5)


# ---------------------------------------------------------------------- bad input (issue 19)
@pytest.mark.filterwarnings("error")      # no overflow / invalid-value warnings on the way
@pytest.mark.parametrize("scale", [1.0, 1e10, 1e300])
@pytest.mark.parametrize("temperature", [1e-30, 1e-300, 5e-324])
def test_tiny_temperature_is_the_argmax_limit(scale, temperature):
    logits = np.array([0.5, -2.0, 3.0, 1.0]) * scale
    draws = rk.sample_logits(np.tile(logits, (200, 1)), temperature=temperature, rng=0)
    assert set(draws.tolist()) == {2}
    tie = rk.sample_logits(np.tile([3.0, -1.0, 3.0], (400, 1)) * scale, temperature=temperature,
                           rng=0)
    assert set(tie.tolist()) == {0, 2}                # the limit: uniform over the tied maxima


@pytest.mark.filterwarnings("error")
def test_extreme_logit_spans_and_infinite_temperature():
    big = np.array([-1.7e308, 1.7e308, 1.0])           # max - min overflows float64
    assert set(rk.sample_logits(np.tile(big, (100, 1)), rng=0).tolist()) == {1}
    assert set(rk.sample_logits(np.tile(big, (100, 1)), temperature=0.5, rng=0).tolist()) == {1}
    assert rk.sample_logits(np.array([0.0, 1.0], dtype=np.float16), temperature=1e-30, rng=0) == 1
    # temperature=inf: uniform over the kept ids (the other limit), also past an overflowing span
    draws = rk.sample_logits(np.tile(big, (4000, 1)), temperature=float("inf"), top_k=2, rng=0)
    assert set(draws.tolist()) == {1, 2} and abs((draws == 1).mean() - 0.5) < 0.05


def test_masked_logits_minus_inf_are_never_drawn():
    # as torch.softmax / multinomial users mask: -inf means "never"; +inf and NaN are errors
    logits = np.array([-np.inf, 0.0, 1.0, -np.inf])
    assert set(rk.sample_logits(np.tile(logits, (500, 1)), rng=0).tolist()) == {1, 2}
    assert rk.sample_logits(logits, temperature=0) == 2 and rk.argmax(logits) == 2
    assert rk.sample_logits(logits, top_k=3, rng=0) in (1, 2)
    with pytest.raises(ValueError, match=r"logits contain NaN or \+infinity"):
        rk.sample_logits(np.array([0.0, np.inf]))
    with pytest.raises(ValueError, match=r"logits contain NaN or \+infinity"):
        rk.sample_logits(np.array([[0.0, 1.0], [np.nan, 1.0]]), rng=0)
    with pytest.raises(ValueError, match=r"every logit of a row is -inf"):
        rk.sample_logits(np.array([[0.0, 1.0], [-np.inf, -np.inf]]), rng=0)


@pytest.mark.parametrize("bad", [-1.0, -1e-300, float("nan"), float("-inf"), True, "1", None])
def test_bad_temperature_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match=rf"temperature must be a number >= 0 \(0: greedy\), "
                                         rf"got {re.escape(repr(bad))}"):
        rk.sample_logits(np.array([0.0, 1.0]), temperature=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, True, "2"])
def test_bad_top_k_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match=rf"top_k must be None \(no limit\) or an int >= 1, "
                                         rf"got {re.escape(repr(bad))}"):
        rk.sample_logits(np.array([0.0, 1.0]), top_k=bad, temperature=0)
    assert rk.sample_logits(np.array([0.0, 1.0]), top_k=np.int64(5), rng=0) in (0, 1)


class CountingModel:
    """Records calls: generate must validate its arguments before running the model."""
    training = True

    def __init__(self):
        self.calls = 0

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def forward(self, x, initial_state=None, return_state=False):
        self.calls += 1
        return np.zeros(x.shape + (3,)), None

    def step(self, ids, state):
        self.calls += 1
        return np.zeros((len(ids), 3)), state


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -0.5}, r"temperature must be a number >= 0 \(0: greedy\), got -0.5"),
    ({"temperature": float("nan")}, r"temperature .* got nan"),
    ({"top_k": 0}, r"top_k must be None \(no limit\) or an int >= 1, got 0"),
    ({"length": -1}, r"length must be an int >= 0, got -1"),
    ({"length": 2.0}, r"length must be an int >= 0, got 2.0"),
    ({"prime": "hi"}, (r"prime must be a non-empty array of integer ids, \[P\] or \[B,P\], "
                       r"got str: encode text with CharVocab.encode first")),
    ({"prime": [1.0, 2.0]}, r"prime must be .*, got dtype float64"),
    ({"prime": []}, r"prime must be a non-empty"),
    ({"prime": [[[1, 2]]]}, r"prime must be .* got shape \(1, 1, 2\)"),
    ({"prime": [1, -1]}, r"prime ids must be >= 0, got -1"),
])
@pytest.mark.parametrize("length", [0, 5])
def test_generate_validates_every_argument_before_running_the_model(kwargs, match, length):
    model = CountingModel()
    args = {"prime": [1, 2], "length": length}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rk.generate(model, args.pop("prime"), args.pop("length"), **args)
    assert model.calls == 0
