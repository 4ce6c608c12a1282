"""Lab 12-5, stock prediction: the next day's closing price from the last 7 days, many-to-one.

    python examples/lab12_5_rnn_stock_prediction.py [--csv PATH] [--plot PNG] [--seed 0] [--every N] [--quiet]

The lab's exact pipeline on its GOOG daily prices (columns Open, High, Low, Volume, Close, newest
first): reverse to chronological order, split 70/30 (the test part starts 7 rows early so its
first window has history), min-max scale train and test EACH WITH ITS OWN min/max (as the lab
does; it leaks the test range, but it is the recipe being reproduced), windows of 7 days of all
5 columns -> next day's Close, LSTM(10) -> fully connected 1 on the last step, sum-of-squares
loss, Adam 0.01, 500 full-batch steps, ``[step: i] loss: ...`` lines. Prints ``RMSE:`` on the
scaled test set (PyTorch with the same recipe: about 0.048) and, as the lab's ``plt.plot`` did,
draws the test prediction against the truth into a PNG (``--plot``, default
``lab12_5_stock_prediction.png`` when matplotlib is installed; ``--plot ''`` for none). The
prices are the copy packaged in :mod:`rnnkern.datasets` unless ``--csv`` names another file.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import rnnkern as rk
from rnnkern.examples._common import add_common_args, parse, should_print, tf1_glorot_init
from rnnkern.plotting import INSTALL_HINT, have_matplotlib, new_figure


DEFAULT_PLOT = "lab12_5_stock_prediction.png"


def load_prices(path=None):
    """[N,5] prices in chronological order: the packaged file, or ``path`` in its layout (both
    newest first, '#' lines skipped)."""
    return rk.datasets.stock_daily(path)[::-1]


def build_datasets(xy, seq_length, train_fraction=0.7):
    """The lab's split, per-split scaling and windows: (trainX, trainY, testX, testY)."""
    train_set, test_set = rk.train_test_split(xy, train_fraction=train_fraction,
                                              overlap=seq_length)
    train_set = rk.MinMaxScaler().fit_transform(train_set)
    test_set = rk.MinMaxScaler().fit_transform(test_set)    # scaled on its own, as the lab
    trainX, trainY = rk.next_step_windows(train_set, seq_length, target=train_set[:, [-1]])
    testX, testY = rk.next_step_windows(test_set, seq_length, target=test_set[:, [-1]])
    return (trainX.astype(np.float32), trainY.astype(np.float32),
            testX.astype(np.float32), testY.astype(np.float32))


def save_plot(path, testY, test_predict):
    """The lab's figure: the scaled test Close and the prediction against the day."""
    fig = new_figure((8, 4))
    ax = fig.add_subplot()
    ax.plot(testY, label="test (scaled Close)")
    ax.plot(test_predict, label="predicted")
    ax.set_xlabel("Time Period")
    ax.set_ylabel("Stock Price")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", default=None,
                   help="prices CSV in the lab's layout (default: the packaged "
                        "data-02-stock_daily.csv)")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help=f"PNG file for the test-vs-predicted plot ('' for none; default "
                        f"{DEFAULT_PLOT} when matplotlib is installed)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seq-length", type=int, default=7)
    p.add_argument("--hidden", type=int, default=10)
    add_common_args(p, every=50)
    args = parse(p, argv)

    plot = args.plot
    if plot is None:
        plot = DEFAULT_PLOT if have_matplotlib() else ""
        if not plot and not args.quiet:
            print(f"(no plot: matplotlib is not installed; {INSTALL_HINT})")
    elif plot and not have_matplotlib():   # asked for by name: fail before training
        new_figure()

    try:
        prices = load_prices(args.csv)
    except (OSError, ValueError) as exc:
        if __name__ == "__main__":
            sys.exit(f"lab12-5 stock prediction: {exc}")
        raise
    trainX, trainY, testX, testY = build_datasets(prices, args.seq_length)
    data_dim = trainX.shape[2]
    lstm = tf1_glorot_init(rk.LSTM(data_dim, args.hidden, backend=args.backend), args.seed)
    model = rk.Sequential([lstm, rk.LastStep(),
                           rk.Dense(args.hidden, 1, init="glorot", seed=args.seed + 1)])
    opt = rk.Adam(lr=args.lr)

    for i in range(args.steps):
        pred = model(trainX)                                   # [N,1]
        step_loss, d_pred = rk.sum_squares(pred, trainY, return_grad=True)
        model.backward(d_pred)
        opt.step(model.params, model.grads)
        if should_print(args, i, args.steps - 1):
            print(f"[step: {i}] loss: {step_loss:.6f}")

    test_predict = model(testX)
    rmse = float(np.sqrt(np.mean(np.square(testY.astype(np.float64) - test_predict))))
    if args.quiet:
        print(f"lab12-5 stock: {len(trainX)} train / {len(testX)} test windows, "
              f"{args.steps} steps, final train loss {step_loss:.4f}")
    print(f"RMSE: {rmse:.6f}")
    if plot:
        save_plot(plot, testY, test_predict)
        if not args.quiet:
            print(f"plot saved to {plot}")
    return {"rmse": rmse, "loss": step_loss, "plot": plot or None,
            "n_train": len(trainX), "n_test": len(testX)}


if __name__ == "__main__":
    main()
