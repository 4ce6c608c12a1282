"""The lab 12 reproductions, char-rnn and word-rnn, installed with the package as ``rnnkern.examples``.

Each script runs on its own (``python examples/lab12_1_hello_rnn.py`` in a checkout,
``python -m rnnkern.examples.lab12_1_hello_rnn`` anywhere) and exposes ``main(argv) -> outcome``,
which ``python -m rnnkern labs`` calls and checks.
"""
