"""rnnkern: compiled-kernel LSTM/GRU/RNN for Python.

    >>> import rnnkern as rk
    >>> lstm = rk.LSTM(5, 8, num_layers=2, forget_bias=0.0, seed=0)
    >>> outputs, (h_n, c_n) = lstm(x)            # x [B,T,I] -> outputs [B,T,H]
    >>> dx, (dh0, dc0) = lstm.backward(d_outputs)  # fills lstm.grads
"""
from .backends import available_backends, set_backend
from .cellspec import CellSpec
from .layers import GRU, LSTM, RNN
from .losses import mse, one_hot, sequence_loss, sum_squares
from . import datasets, device, interop   # device: to_device, array_module (CPU/GPU)
from .modules import Dense, Dropout, Embedding, LastStep, OneHot
from .model import Sequential
from .optim import SGD, Adagrad, Adam, ExponentialDecay, RMSprop, clip_grad_norm, clip_grad_value
from .trainer import Callback, LambdaCallback, TerminateOnNaN, Trainer
from .train_step import NonFiniteLossError, TrainStep
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from . import distributed   # data-parallel over MPI; mpi4py is imported only when used
from .distributed import DistributedError
from .data import (CharVocab, MinMaxScaler, StreamBatches, WordVocab, next_step_windows,
                   shifted_windows, train_test_split)
from .sample import argmax, generate, sample_logits

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "RNN", "CellSpec", "available_backends", "set_backend", "__version__",
           "sequence_loss", "mse", "sum_squares", "one_hot", "interop", "datasets",
           "device"]
__all__ += ["Dense", "Dropout", "Embedding", "LastStep", "OneHot", "Sequential", "SGD", "Adagrad",
            "Adam", "ExponentialDecay", "RMSprop", "clip_grad_norm", "clip_grad_value", "Callback",
            "LambdaCallback", "TerminateOnNaN", "Trainer", "TrainStep", "NonFiniteLossError",
            "CheckpointError", "load_checkpoint", "save_checkpoint", "DistributedError",
            "CharVocab", "WordVocab",
            "MinMaxScaler", "StreamBatches", "next_step_windows", "shifted_windows",
            "train_test_split", "argmax", "generate", "sample_logits"]
