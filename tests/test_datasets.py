"""The data sets packaged in ``rnnkern.datasets``: contents as published, the ``path`` override,
and a clear error for every unreadable file."""
import gzip
import hashlib

import numpy as np
import pytest

import rnnkern as rk
from rnnkern import datasets

# SHA-256 of the files as published (rnnkern/datasets/SOURCES.md)
STOCK_SHA256 = "a0ebd202da621b20c04253178714ca05147ffd8f712f8adafd38cee78e38a334"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def test_packaged_files_are_the_published_ones():
    assert hashlib.sha256(datasets.packaged_file(datasets.STOCK_DAILY_FILE)).hexdigest() \
        == STOCK_SHA256
    text = gzip.decompress(datasets.packaged_file(datasets.TINY_SHAKESPEARE_FILE))
    assert hashlib.sha256(text).hexdigest() == SHAKESPEARE_SHA256
    assert b"licen" in datasets.packaged_file("SOURCES.md")   # the note on sources and licences


def test_stock_daily_is_the_labs_table():
    xy = rk.datasets.stock_daily()
    assert xy.shape == (732, 5) and xy.dtype == np.float64
    # newest first: the first row is the file's first data line
    np.testing.assert_array_equal(xy[0], [828.659973, 833.450012, 828.349976, 1247700,
                                          831.659973])
    assert np.all(xy[:, 1] >= xy[:, 2])                   # High >= Low every day
    assert datasets.STOCK_COLUMNS == ("Open", "High", "Low", "Volume", "Close")


def test_tiny_shakespeare_is_the_corpus():
    text = rk.datasets.tiny_shakespeare()
    assert isinstance(text, str) and len(text) == 1_115_394
    assert len(set(text)) == 65 and text.startswith("First Citizen:\n")


def test_path_overrides_read_that_file(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("# a comment\n1,2,0.5,10,1.5\n3,4,2,20,3.5\n")
    np.testing.assert_array_equal(rk.datasets.stock_daily(csv),
                                  [[1, 2, 0.5, 10, 1.5], [3, 4, 2, 20, 3.5]])
    one_row = tmp_path / "one.csv"
    one_row.write_text("1,2,0.5,10,1.5\n")
    assert rk.datasets.stock_daily(str(one_row)).shape == (1, 5)
    txt = tmp_path / "t.txt"
    txt.write_text("to be, or not to be\n", encoding="utf-8")
    assert rk.datasets.tiny_shakespeare(txt) == "to be, or not to be\n"
    gz = tmp_path / "t.txt.gz"
    gz.write_bytes(gzip.compress("ünïcode\n".encode()))
    assert rk.datasets.tiny_shakespeare(gz) == "ünïcode\n"


@pytest.mark.parametrize("content, match", [
    ("1,2,3\n4,5,6\n", r"expected rows of 5 comma-separated columns.*shape \(2, 3\)"),
    ("# only a comment\n", r"expected rows of 5 .*got shape"),
    ("", r"expected rows of 5 .*got shape"),
    ("1,2,x,4,5\n", "not a CSV of numbers"),
    ("1,2,3,4,5\n1,2,3\n", "not a CSV of numbers"),
])
def test_bad_stock_files_raise_value_error_naming_the_file(tmp_path, content, match):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        rk.datasets.stock_daily(bad)
    assert "bad.csv" in str(info.value)


def test_bad_text_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*absent.txt"):
        rk.datasets.tiny_shakespeare(tmp_path / "absent.txt")
    with pytest.raises(FileNotFoundError, match="absent.csv"):
        rk.datasets.stock_daily(tmp_path / "absent.csv")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="b.txt: not UTF-8 text"):
        rk.datasets.tiny_shakespeare(binary)
    fake_gz = tmp_path / "f.txt.gz"
    fake_gz.write_bytes(b"plain text, not gzip")
    with pytest.raises(ValueError, match="f.txt.gz: not a readable gzip file"):
        rk.datasets.tiny_shakespeare(fake_gz)
    truncated = tmp_path / "t.txt.gz"
    truncated.write_bytes(gzip.compress(b"x" * 1000)[:-12])
    with pytest.raises(ValueError, match="not a readable gzip file"):
        rk.datasets.tiny_shakespeare(truncated)


def test_a_missing_packaged_file_says_the_install_is_incomplete():
    with pytest.raises(FileNotFoundError, match="reinstall rnnkern"):
        datasets.packaged_file("no-such-file.csv")


def test_the_lab_pipeline_on_the_packaged_prices():
    xy = rk.datasets.stock_daily()[::-1]
    train, test = rk.train_test_split(xy, train_fraction=0.7, overlap=7)
    tx, ty = rk.next_step_windows(rk.MinMaxScaler().fit_transform(train), 7)
    assert tx.shape == (len(train) - 7, 7, 5) and len(train) == int(0.7 * 732)
