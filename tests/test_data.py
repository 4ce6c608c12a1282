"""Data helpers: vocabulary determinism (also across processes with different PYTHONHASHSEED),
windows in the labs' layouts, contiguous stream batches, the lab's MinMaxScaler, splits."""
import os
import re
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


# ---------------------------------------------------------------------- bad input (issue 19)
def test_encode_refuses_bytes_and_other_non_str_with_a_type_error():
    v = rk.CharVocab.from_text("hihello")
    with pytest.raises(TypeError, match=r"text must be a str, got bytes.*decode"):
        v.encode(b"hi")
    for bad in (5, None, [1, 2], ["h", 1], ("h", "i"), np.array(["h", "i"])):
        with pytest.raises(TypeError, match=r"text must be a str, got "):
            v.encode(bad)
    assert v.encode(np.str_("hi")).tolist() == [1, 2]         # a str subclass is a str


def test_encode_names_every_unknown_character_and_where():
    v = rk.CharVocab.from_text("hihello")
    with pytest.raises(ValueError, match=r"characters 'x', 'y', 'z' are not in the vocabulary "
                                         r"\(first at index 2\)"):
        v.encode("hixyzxh")
    with pytest.raises(ValueError, match=r"'z' is not in the vocabulary \(first at index 0\)"):
        v.encode("z")
    with pytest.raises(ValueError, match=r"and 16 more"):
        v.encode("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def test_encode_a_lone_surrogate_that_is_in_the_vocabulary():
    # a str may hold a lone surrogate (e.g. from os.fsdecode); the vocabulary accepts one, so
    # encode must too
    v = rk.CharVocab(["a", "\ud800"])
    assert v.encode("a\ud800a").tolist() == [0, 1, 0]
    assert v.decode([1, 0]) == "\ud800a"
    with pytest.raises(ValueError, match=r"'\\udfff' is not in the vocabulary"):
        v.encode("\udfff")


def test_decode_wrong_types_shapes_and_ranges():
    v = rk.CharVocab.from_text("hihello")
    for bad in (None, "hi", [1.0], [True, False], np.array([1.5])):
        with pytest.raises(TypeError, match=r"ids must be integers, got "):
            v.decode(bad)
    with pytest.raises(ValueError, match=r"ids must be 1-D, got shape \(2, 2\)"):
        v.decode([[1, 2], [0, 1]])
    with pytest.raises(ValueError, match=r"ids must be in \[0, 5\), got min -1 and max 9"):
        v.decode([-1, 2, 9])
    assert v.decode(1) == "h" and v.decode(np.uint8(2)) == "i" and v.decode([]) == ""


def test_from_text_refuses_bytes_with_a_type_error():
    with pytest.raises(TypeError, match="text must be a str, got bytes.*decode"):
        rk.CharVocab.from_text(b"abc")
    with pytest.raises(ValueError, match="non-empty"):
        rk.CharVocab.from_text("")


def fitted_3_columns():
    return rk.MinMaxScaler().fit(np.arange(12.0).reshape(4, 3))


@pytest.mark.parametrize("method", ["transform", "inverse_transform"])
@pytest.mark.parametrize("shape,got", [((4, 1), 1), ((4, 2), 2), ((4, 4), 4), ((5,), 5),
                                       ((2, 6, 2), 2)])
def test_scaler_refuses_another_feature_count(method, shape, got):
    s = fitted_3_columns()
    with pytest.raises(ValueError, match=rf"data has {got} feature\(s\) \(last axis of shape "
                                         rf"{re.escape(str(shape))}\); the scaler was fitted on 3 "
                                         rf"features"):
        getattr(s, method)(np.ones(shape))


@pytest.mark.parametrize("method", ["transform", "inverse_transform"])
def test_scaler_feature_checks_keep_the_valid_layouts(method):
    s = fitted_3_columns()
    f = getattr(s, method)
    assert f(np.ones((4, 3))).shape == (4, 3) and f(np.ones(3)).shape == (3,)
    assert f(np.ones((2, 5, 3))).shape == (2, 5, 3)           # windows [N,T,F]
    assert f(np.ones((4, 2)), columns=[0, 2]).shape == (4, 2)
    assert f(np.ones((4, 5)), columns=-1).shape == (4, 5)     # one column: elementwise
    with pytest.raises(ValueError, match=r"data has 3 feature\(s\) .*; columns=\[0, 1\] selects 2"):
        f(np.ones((4, 3)), columns=[0, 1])
    with pytest.raises(ValueError, match=r"data is a scalar; the scaler was fitted on 3 features"):
        f(2.0)
    with pytest.raises(ValueError, match=r"columns must index the 3 fitted features, got \[5\]"):
        f(np.ones((4, 1)), columns=[5])
    with pytest.raises(ValueError, match=r"columns needs a scaler fitted on \[N, F\]"):
        rk.MinMaxScaler().fit(np.arange(3.0)).transform(np.ones(2), columns=[0])
    one = rk.MinMaxScaler().fit(np.arange(10.0))              # [N]: one feature, any shape
    assert getattr(one, method)(np.ones((4, 7))).shape == (4, 7)
    assert np.ndim(getattr(one, method)(3.0)) == 0


def test_scaler_before_fit_and_bad_fit_data():
    for method in ("transform", "inverse_transform"):
        with pytest.raises(RuntimeError, match=r"not fitted: call fit\(data\) first"):
            getattr(rk.MinMaxScaler(), method)(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"NaN or infinity in column\(s\) \[1, 2\]"):
        rk.MinMaxScaler().fit(np.array([[1.0, np.nan, 0.0], [2.0, 3.0, np.inf]]))
    with pytest.raises(ValueError, match=r"NaN or infinity"):
        rk.MinMaxScaler().fit(np.array([1.0, -np.inf]))
    with pytest.raises(ValueError, match=r"NaN or infinity"):
        rk.MinMaxScaler().fit(np.array([1.0, None]))          # None -> NaN
    with pytest.raises(ValueError, match=r"\[N, F\] or \[N\] data, got shape \(2, 3, 4\)"):
        rk.MinMaxScaler().fit(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="at least one row"):
        rk.MinMaxScaler().fit(np.ones((0, 3)))
    with pytest.raises(ValueError, match="at least one feature"):
        rk.MinMaxScaler().fit(np.ones((3, 0)))
    for bad in (np.array([1j, 2]), np.array(["a", "b"])):
        with pytest.raises(TypeError, match=r"data must be real numbers, got dtype"):
            rk.MinMaxScaler().fit(bad)
    with pytest.raises(TypeError, match=r"data must be real numbers"):
        fitted_3_columns().transform(np.array([[1j, 2, 3]]))
    for eps in (-1e-7, float("nan"), float("inf"), "1e-7", True):
        with pytest.raises(ValueError, match=r"eps must be a finite number >= 0"):
            rk.MinMaxScaler(eps=eps)
    with pytest.raises(ValueError, match=r"constant column\(s\) \[0\] with eps=0"):
        rk.MinMaxScaler(eps=0).fit(np.array([[1.0, 2.0], [1.0, 3.0]]))
    # NaN in transform is elementwise (a missing value stays missing), never spread to other cells
    out = fitted_3_columns().transform(np.array([[np.nan, 3.0, 5.0]]))
    assert np.isnan(out[0, 0]) and np.isfinite(out[0, 1:]).all()


def test_windows_and_splits_refuse_scalars_and_empty_splits():
    with pytest.raises(ValueError, match=r"seq must be an array with at least one axis"):
        rk.shifted_windows(5, 2)
    with pytest.raises(ValueError, match=r"data must be an array with at least one axis"):
        rk.next_step_windows(np.float64(1.0), 2)
    with pytest.raises(ValueError, match=r"target must be an array with at least one axis"):
        rk.next_step_windows(np.arange(5.0), 2, target=3.0)
    with pytest.raises(ValueError, match=r"train_fraction 0.1 of 5 rows leaves the train split "
                                         r"empty"):
        rk.train_test_split(np.arange(5), train_fraction=0.1)
    with pytest.raises(ValueError, match=r"arrays\[1\] must be an array with at least one axis"):
        rk.train_test_split(np.arange(5), 3)


def test_stream_batches_index_must_be_an_int():
    sb = rk.StreamBatches(np.arange(103), batch_size=4, seq_length=5)
    for bad in (1.0, "1", None, True, slice(0, 2)):
        with pytest.raises(TypeError, match=r"batch index must be an int"):
            sb[bad]
    np.testing.assert_array_equal(sb[np.int64(2)][0], sb[2][0])
