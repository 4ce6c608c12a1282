"""The examples reproduce their documented outcomes (reduced where the outcome still holds), and
the ``python -m rnnkern`` CLI runs them.

Each lab's ``main(argv)`` returns its outcome; the assertions are the ones each script's
docstring (and issue 6) documents: loss values, prediction strings, loss thresholds, RMSE.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import rnnkern as rk
from rnnkern import plotting
from rnnkern.labs import limit_blas_threads, load_example, restore_blas_threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def _single_thread_blas():
    """As `python -m rnnkern labs` does: the labs' GEMMs are tiny, and NumPy's and SciPy's
    OpenBLAS pools spinning against each other on 2 cores made lab 12-4 several times slower."""
    previous = limit_blas_threads(1)
    yield
    restore_blas_threads(previous)


def lab(name):
    return load_example(name)


# ---------------------------------------------------------------------- lab 12-0
def test_lab12_0_shapes_lengths_and_slide_losses(capsys):
    r = lab("lab12_0_rnn_basics").main(["--seed", "3"])
    out = capsys.readouterr().out
    assert r["one_step_shape"] == (1, 1, 2)
    assert r["hello_shape"] == (1, 5, 2)
    assert r["batch_shape"] == (3, 5, 2)
    assert r["stacked_shape"] == (3, 5, 5) and r["stacked_state_shape"] == (3, 3, 5)
    # lengths [5, 3, 4]: exactly zero past each length, nonzero before
    o = r["lengths_outputs"]
    assert r["lengths_zeros"]
    assert np.all(o[1, 3:] == 0) and np.all(o[2, 4:] == 0)
    assert np.all(np.abs(o[0]).sum(-1) > 0) and np.all(np.abs(o[1, :3]).sum(-1) > 0)
    np.testing.assert_allclose(r["losses"][:3], [0.596759, 0.513015, 0.371101], atol=5e-7)
    np.testing.assert_allclose(r["losses"][3:], [1.313262, 0.646595], atol=5e-7)
    assert "Loss:  0.596759" in out and "Loss1: 0.513015" in out and "Loss2: 0.371101" in out


# ---------------------------------------------------------------------- labs 12-1 .. 12-3
def test_lab12_1_hihello_predicts_ihello(capsys):
    r = lab("lab12_1_hello_rnn").main(["--every", "49"])
    out = capsys.readouterr().out
    assert r["prediction"] == "ihello"
    assert r["loss"] < 0.05
    assert out.rstrip().splitlines()[-1] == "\tPrediction str:  ihello"   # the lab's last line
    assert out.startswith("0 loss: ")


def test_lab12_2_char_seq_predicts_the_sentence(capsys):
    r = lab("lab12_2_char_seq_rnn").main(["--quiet", "--seed", "1"])
    assert r["prediction"] == "if you want you" == r["target"]
    assert r["loss"] < 0.05
    assert "Prediction: if you want you" in capsys.readouterr().out


def test_lab12_3_softmax_only_stops_at_the_bigram_floor(capsys):
    r = lab("lab12_3_char_seq_softmax_only").main(["--quiet"])
    assert r["floor"] == pytest.approx(0.277259, abs=1e-6)
    # the floor is a lower bound: the loss approaches it from above within 0.001
    assert r["floor"] <= r["loss"] < r["floor"] + 1e-3
    assert r["prediction"] == "yf you yant you"
    assert "Prediction: yf you yant you" in capsys.readouterr().out


# ---------------------------------------------------------------------- lab 12-4
def test_lab12_4_reconstructs_the_sentence():
    mod = lab("lab12_4_rnn_long_char")
    r = mod.main(["--quiet"])   # the lab's full 500 steps: ~3 s with single-thread BLAS
    assert r["windows"] == 170
    assert r["exact"] and r["text"][1:] == mod.SENTENCE[2:]
    assert r["loss"] < 0.25


# ---------------------------------------------------------------------- lab 12-5
def test_lab12_5_stock_rmse_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "stock.png"
    # the full recipe (500 steps) on the packaged prices: RMSE 0.049-0.056 over seeds 0-5
    # (PyTorch ~0.048)
    r = lab("lab12_5_rnn_stock_prediction").main(["--quiet", "--plot", str(png)])
    assert (r["n_train"], r["n_test"]) == (505, 220)   # 732 rows: int(0.7*732)-7, 732-512+7-7
    assert r["rmse"] < 0.07
    assert r["plot"] == str(png)
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lab12_5_csv_override_reads_that_file(tmp_path):
    """--csv replaces the packaged prices: the same file reversed gives other windows."""
    prices = rk.datasets.stock_daily()
    csv = tmp_path / "prices.csv"
    np.savetxt(csv, prices[:300], delimiter=",", header="Open,High,Low,Volume,Close")
    r = lab("lab12_5_rnn_stock_prediction").main(
        ["--quiet", "--csv", str(csv), "--plot", "", "--steps", "2"])
    assert (r["n_train"], r["n_test"]) == (int(0.7 * 300) - 7, 300 - int(0.7 * 300))
    assert r["plot"] is None


def test_lab12_5_plot_default_and_missing_matplotlib(tmp_path, monkeypatch, capsys):
    """The script draws its plot by default when matplotlib is there; without it the default
    plot is skipped with a note, and a plot asked for by name is an error naming the extra."""
    mod = lab("lab12_5_rnn_stock_prediction")
    monkeypatch.chdir(tmp_path)
    if plotting.have_matplotlib():
        r = mod.main(["--steps", "2", "--every", "1"])
        assert r["plot"] == mod.DEFAULT_PLOT and (tmp_path / mod.DEFAULT_PLOT).is_file()
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib fails
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    capsys.readouterr()
    r = mod.main(["--steps", "2"])
    assert r["plot"] is None and "rnnkern[plot]" in capsys.readouterr().out
    with pytest.raises(ImportError, match=r"matplotlib.*rnnkern\[plot\]"):
        mod.main(["--steps", "2", "--plot", str(tmp_path / "asked.png")])
    assert not (tmp_path / "asked.png").exists()


def test_lab12_5_pipeline_matches_the_lab_by_hand(tmp_path):
    """Reverse, split with 7 rows of overlap, scale each split on its own, windows -> Close."""
    mod = lab("lab12_5_rnn_stock_prediction")
    rng = np.random.default_rng(0)
    xy = rng.uniform(1, 100, (40, 5))
    csv = tmp_path / "prices.csv"
    np.savetxt(csv, xy[::-1], delimiter=",", header="Open,High,Low,Volume,Close")
    chrono = mod.load_prices(str(csv))
    np.testing.assert_allclose(chrono, xy)
    trainX, trainY, testX, testY = mod.build_datasets(chrono, 7)
    n = int(40 * 0.7)
    train, test = xy[:n], xy[n - 7:]
    scale = lambda d: (d - d.min(0)) / (d.max(0) - d.min(0) + 1e-7)  # noqa: E731
    train, test = scale(train), scale(test)
    np.testing.assert_allclose(trainX[3], train[3:10], rtol=1e-6)
    np.testing.assert_allclose(trainY[3], train[10, [-1]], rtol=1e-6)
    np.testing.assert_allclose(testX[0], test[0:7], rtol=1e-6)
    assert len(trainX) == n - 7 and len(testX) == 40 - n


def test_lab12_5_missing_csv_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.csv"):
        lab("lab12_5_rnn_stock_prediction").main(["--csv", missing, "--plot", ""])
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples",
                                                        "lab12_5_rnn_stock_prediction.py"),
                           "--csv", missing], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "data file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------- char-rnn
def _tiny_text(path):
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "cat"]
    text = "\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(400))
    path.write_text(text)
    return text


TINY = ["--rnn-size", "32", "--seq-length", "20", "--batch-size", "8", "--lr", "0.01",
        "--max-batches", "40", "--sample-length", "60", "--prime", "the ", "--quiet"]


def test_char_rnn_trains_checkpoints_resumes_and_samples(tmp_path, capsys):
    cr = lab("char_rnn")
    txt = tmp_path / "tiny.txt"
    _tiny_text(txt)
    ck = tmp_path / "save" / "ck.npz"
    r = cr.main(["train", "--text", str(txt), "--epochs", "2", "--checkpoint", str(ck), *TINY])
    h = r["history"]
    assert len(h["loss"]) == 2 and h["loss"][1] < h["loss"][0]
    assert h["val_loss"][1] < h["val_loss"][0] < np.log(len(r["vocab"]))  # below uniform guessing
    assert h["lr"] == pytest.approx([0.01, 0.01 * 0.97])                 # decay per epoch
    assert ck.exists() and r["sample"].startswith("the ") and len(r["sample"]) == 64
    # resume runs only the missing epoch and continues from the saved history
    r2 = cr.main(["train", "--text", str(txt), "--epochs", "3", "--checkpoint", str(ck),
                  "--resume", *TINY])
    assert r2["history"]["loss"][:2] == h["loss"] and len(r2["history"]["loss"]) == 3
    assert r2["steps"] == 3 * 40
    # sampling from the checkpoint: the model loads and the sample is seeded
    capsys.readouterr()
    s1 = cr.main(["sample", "--checkpoint", str(ck), "-n", "50", "--prime", "the ",
                  "--seed", "5"])["sample"]
    s2 = cr.main(["sample", "--checkpoint", str(ck), "-n", "50", "--prime", "the ",
                  "--seed", "5"])["sample"]
    assert s1 == s2 and len(s1) == 54 and set(s1) <= set(r["vocab"].chars)
    model, vocab, user = cr.load_model(str(ck))
    assert user["config"]["rnn_size"] == 32 and vocab == r["vocab"]
    np.testing.assert_array_equal(model.params["1.weight_hh_l1"],
                                  r2["model"].params["1.weight_hh_l1"])


def test_char_rnn_defaults_are_char_rnn_tensorflows():
    cr = lab("char_rnn")
    args = cr.parser().parse_args(["train"])
    assert (args.rnn_size, args.num_layers, args.seq_length, args.batch_size) == (128, 2, 50, 50)
    assert (args.learning_rate, args.decay_rate, args.grad_clip) == (2e-3, 0.97, 5.0)
    assert args.val_fraction == 0.05 and args.text is None


def test_char_rnn_default_corpus_is_the_packaged_tiny_shakespeare(tmp_path):
    cr = lab("char_rnn")
    text, source = cr.load_corpus(cr.parser().parse_args(["train"]))
    assert text == rk.datasets.tiny_shakespeare() and "tiny-shakespeare" in source
    text, _ = cr.load_corpus(cr.parser().parse_args(["train", "--max-chars", "100"]))
    assert text == rk.datasets.tiny_shakespeare()[:100]
    own = tmp_path / "own.txt"
    own.write_text("abc abc\n")
    assert cr.load_corpus(cr.parser().parse_args(["train", "--text", str(own)])) == \
        ("abc abc\n", str(own))
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        cr.load_corpus(cr.parser().parse_args(["train", "--text", str(tmp_path / "absent.txt")]))


def test_char_rnn_sample_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train first"):
        lab("char_rnn").main(["sample", "--checkpoint", str(tmp_path / "none.npz")])


# ---------------------------------------------------------------------- CLI
def _run_cli(*args, timeout=120, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "rnnkern", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def test_cli_labs_prints_documented_outcomes(tmp_path):
    proc = _run_cli("labs", cwd=tmp_path)
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr
    for line in ("Loss:  0.596759", "Loss1: 0.513015", "Loss2: 0.371101",
                 "Prediction str:  ihello", "Prediction: if you want you",
                 "Prediction: yf you yant you", "RMSE: 0.0",
                 lab("lab12_4_rnn_long_char").SENTENCE[2:]):   # all but the first character
        assert line in out, line
    assert "6 of 6 labs reproduced their documented outcome" in out
    assert "MISMATCH" not in out
    assert list(tmp_path.iterdir()) == []       # no plot unless asked for


def test_cli_labs_stock_plot_and_a_failing_lab(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "stock.png"
    proc = _run_cli("labs", "--only", "5", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert f"plot: {png}" in proc.stdout and png.read_bytes()[:4] == b"\x89PNG"
    # a lab that fails is reported as a mismatch with its reason, and the exit status says so
    # (a --csv that cannot be read at all is a usage error instead: tests/test_cli_errors.py)
    bad = tmp_path / "words.csv"
    bad.write_text("open,high,low,volume,close\n")
    proc = _run_cli("labs", "--only", "0", "5", "--csv", str(bad))
    assert proc.returncode == 1
    assert "MISMATCH: ValueError: " in proc.stdout and "not a CSV of numbers" in proc.stdout
    assert "1 of 2 labs reproduced their documented outcome, MISMATCH: lab12_5" in proc.stdout


def test_example_script_runs_standalone(tmp_path):
    """`python examples/x.py` and `python -m rnnkern.examples.x` run from any directory."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "lab12_1_hello_rnn.py"),
                           "--quiet"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("Prediction str:  ihello")
    proc = subprocess.run([sys.executable, "-m", "rnnkern.examples.lab12_2_char_seq_rnn",
                           "--quiet"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith("Prediction: if you want you")


def test_cli_usage_and_unknown_command():
    assert "python -m rnnkern labs" in _run_cli().stdout
    proc = _run_cli("frobnicate")
    assert proc.returncode == 2 and "unknown command" in proc.stderr
    proc = _run_cli("labs", "--only", "9")
    assert proc.returncode == 2 and "no such lab" in proc.stderr


def test_cli_backends_lists_numpy():
    proc = _run_cli("backends")
    assert proc.returncode == 0 and proc.stdout.startswith("numpy  yes")


def test_limit_blas_threads_sets_and_restores():
    from rnnkern.labs import _openblas_libs
    libs = _openblas_libs()
    if not libs:
        pytest.skip("no OpenBLAS found in /proc/self/maps (not Linux, or another BLAS)")
    before = [get() for _, get in libs]
    previous = limit_blas_threads(1)
    assert [get() for _, get in libs] == [1] * len(libs)
    restore_blas_threads(previous)
    assert [get() for _, get in libs] == before


def test_cli_bench_e2e_runs_a_tiny_table():
    pytest.importorskip("torch")
    proc = _run_cli("bench", "e2e", "--only", "hihello", "--repeats", "1", "--hihello-steps", "5",
                    "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "| hihello, 5 Adam steps |" in proc.stdout and "speed-up" in proc.stdout


def test_cli_bench_e2e_word_rnn_reports_both_perplexities():
    pytest.importorskip("torch")
    proc = _run_cli("bench", "e2e", "--only", "word-rnn", "--max-batches", "2", "--word-epochs",
                    "1", "--word-vocab", "300", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "| word-rnn epoch, 2 batches 50x50, V=300 (tiny-shakespeare) |" in proc.stdout
    row = next(line for line in proc.stdout.splitlines()
               if line.startswith("| word-rnn") and line.endswith(" | yes |"))
    rk_ppl, torch_ppl = (float(c) for c in row.split(" | ")[2:4])
    assert rk_ppl == pytest.approx(torch_ppl, rel=1e-3)   # same start, same updates


def _bench_cpu():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "bench_cpu_under_test", os.path.join(REPO, "benchmarks", "bench_cpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_cpu_plots_speed_up_against_size(tmp_path):
    pytest.importorskip("matplotlib")
    bench = _bench_cpu()
    lab, char = bench.SIZES["lab"], bench.SIZES["char-rnn"]
    med = lambda t: {"fwd": t / 2, "fwdbwd": t}   # noqa: E731
    results = [("lstm", lab, "cpp", med(1.0), med(1.0)), ("lstm", lab, "torch", med(10.0), None),
               ("lstm", char, "cpp", med(2.0), med(2.0)), ("lstm", char, "torch", med(3.0), None),
               ("gru", lab, "numba", med(1.0), med(1.0))]   # no torch row: not drawn
    png = tmp_path / "speedup.png"
    bench.plot_speedups(results, png)
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no PyTorch contestant"):
        bench.plot_speedups([r for r in results if r[2] != "torch"], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_cli_bench_outside_a_checkout_says_where_the_benchmarks_are(tmp_path, monkeypatch,
                                                                    capsys):
    """An installed package has no benchmarks/: the message says to run from a checkout."""
    import rnnkern.__main__ as cli
    monkeypatch.setattr(cli, "source_tree_root", lambda: None)   # as installed
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "cpu"]) == 2
    assert "run `python -m rnnkern bench` inside a source checkout" in capsys.readouterr().err
