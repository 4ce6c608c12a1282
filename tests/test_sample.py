"""Sampling: argmax, temperature, top-k, seeding, distribution, and generate() with carried state."""
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
