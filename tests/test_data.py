"""Data helpers: vocabulary determinism (also across processes with different PYTHONHASHSEED),
windows in the labs' layouts, contiguous stream batches, the lab's MinMaxScaler, splits."""
import os
import subprocess
import sys

import numpy as np
import pytest

import rnnkern as rk

SHIP = ("if you want to build a ship, don't drum up people together to "
        "collect wood and don't assign them tasks and work, but rather "
        "teach them to long for the endless immensity of the sea.")


def test_vocab_sorted_and_frequency_orders():
    v = rk.CharVocab.from_text("hihello")
    assert v.chars == ("e", "h", "i", "l", "o") and len(v) == 5
    f = rk.CharVocab.from_text("hihello", order="frequency")
    assert f.chars == ("h", "l", "e", "i", "o")    # h:2, l:2 (tie by code point), then e, i, o
    ids = v.encode("hihell")
    assert ids.dtype == np.int64 and ids.tolist() == [1, 2, 1, 0, 3, 3]
    assert v.decode(ids) == "hihell" and v.decode([]) == ""
    assert rk.CharVocab(v.to_list()) == v


def test_vocab_unicode_and_errors():
    text = "naïve café — ünïcödé ☃ \n\t"
    v = rk.CharVocab.from_text(text)
    assert v.decode(v.encode(text)) == text
    assert list(v.chars) == sorted(set(text))
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        v.encode("caz")
    with pytest.raises(ValueError, match="ids must be"):
        v.decode([len(v)])
    with pytest.raises(ValueError, match="distinct"):
        rk.CharVocab("aa")
    with pytest.raises(ValueError, match="order"):
        rk.CharVocab.from_text("ab", order="set")


_PROBE = (
    "import rnnkern as rk, sys\n"
    "t = sys.argv[1]\n"
    "print(repr(rk.CharVocab.from_text(t).chars))\n"
    "print(repr(rk.CharVocab.from_text(t, 'frequency').chars))\n"
    "print(repr(tuple(set(t))))\n"
)


def test_vocab_is_identical_across_processes_with_different_hash_seeds():
    text = SHIP + "QZXJK!?;:"
    outs, set_orders = set(), set()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for seed in ("0", "1", "2", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=root)
        out = subprocess.run([sys.executable, "-c", _PROBE, text], env=env, cwd=root,
                             capture_output=True, text=True, check=True).stdout.splitlines()
        outs.add((out[0], out[1]))
        set_orders.add(out[2])
    assert len(set_orders) > 1, "the probe should see set() order change with the hash seed"
    assert len(outs) == 1


def test_shifted_windows_lab12_4():
    v = rk.CharVocab.from_text(SHIP)
    x, y = rk.shifted_windows(v.encode(SHIP), 10)
    assert x.shape == y.shape == (170, 10)
    assert v.decode(x[0]) == SHIP[:10] and v.decode(y[0]) == SHIP[1:11]
    assert v.decode(y[-1]) == SHIP[-10:]
    x2, y2 = rk.shifted_windows(np.arange(10), 3, stride=3)
    assert x2.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] and y2[-1].tolist() == [7, 8, 9]
    x[0, 0] = -1
    assert v.encode(SHIP)[0] != -1        # copies, not views
    with pytest.raises(ValueError, match="at least 11"):
        rk.shifted_windows(np.arange(10), 10)


def test_next_step_windows_lab12_5():
    data = np.arange(40.0).reshape(10, 4)
    x, y = rk.next_step_windows(data, 7, target=data[:, [-1]])
    assert x.shape == (3, 7, 4) and y.shape == (3, 1)
    np.testing.assert_array_equal(x[1], data[1:8])
    np.testing.assert_array_equal(y[:, 0], data[7:, -1])     # next row's last column
    x, y = rk.next_step_windows(np.arange(5), 2)
    assert x.tolist() == [[0, 1], [1, 2], [2, 3]] and y.tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="target"):
        rk.next_step_windows(data, 3, target=data[:5])


def test_stream_batches_are_contiguous_per_row():
    ids = np.arange(103)
    sb = rk.StreamBatches(ids, batch_size=4, seq_length=5)
    assert len(sb) == 5 and sb.num_batches == 5               # (103-1) // 20
    batches = list(sb)
    x0, y0 = batches[0]
    assert x0.shape == (4, 5) and x0.dtype == np.int64
    rows = np.concatenate([x for x, _ in batches], axis=1)    # [B, num_batches*T]
    np.testing.assert_array_equal(rows.reshape(-1), ids[:100])   # row b continues across batches
    for x, y in batches:
        np.testing.assert_array_equal(y, x + 1)               # next id (ids == positions here)
    assert batches[1][0][2, 0] == batches[0][0][2, -1] + 1
    np.testing.assert_array_equal(sb[-1][0], batches[-1][0])
    with pytest.raises(IndexError):
        sb[5]
    with pytest.raises(ValueError, match="too few"):
        rk.StreamBatches(np.arange(20), 4, 5)


def test_minmax_scaler_matches_lab_formula():
    rng = np.random.default_rng(0)
    data = rng.uniform(100, 900, (30, 5))
    data[:, 3] *= 1e4
    lab = (data - data.min(0)) / (data.max(0) - data.min(0) + 1e-7)
    s = rk.MinMaxScaler().fit(data)
    np.testing.assert_allclose(s.transform(data), lab, rtol=1e-14)
    np.testing.assert_allclose(rk.MinMaxScaler().fit_transform(data), lab, rtol=1e-14)
    np.testing.assert_allclose(s.inverse_transform(lab), data, rtol=1e-12)
    close_col = s.inverse_transform(lab[:, [-1]], columns=[-1])
    np.testing.assert_allclose(close_col[:, 0], data[:, -1], rtol=1e-12)
    assert s.transform(data).min() == 0 and s.transform(data).max() < 1
    with pytest.raises(RuntimeError, match="fit"):
        rk.MinMaxScaler().transform(data)


def test_train_test_split():
    a, b = np.arange(20), np.arange(20) * 10
    tr, te = rk.train_test_split(a, train_fraction=0.7)
    assert tr.tolist() == list(range(14)) and te.tolist() == list(range(14, 20))
    tr, te = rk.train_test_split(a, train_fraction=0.7, overlap=7)     # lab 12-5
    assert len(tr) == 14 and te[0] == 7 and len(te) == 13
    ta, sa, tb, sb = rk.train_test_split(a, b, shuffle=True, seed=1)
    np.testing.assert_array_equal(tb, ta * 10)
    assert sorted(ta.tolist() + sa.tolist()) == list(range(20)) and ta.tolist() != list(range(14))
    again = rk.train_test_split(a, b, shuffle=True, seed=1)
    np.testing.assert_array_equal(again[0], ta)
    with pytest.raises(ValueError, match="same length"):
        rk.train_test_split(a, b[:5])
    with pytest.raises(ValueError, match="overlap"):
        rk.train_test_split(a, overlap=15)
