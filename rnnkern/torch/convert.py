"""Swap ``torch.nn`` recurrent modules for their rnnkern twins inside a model, and back.

The twin holds the very same ``Parameter`` objects (not copies), so the model's weights,
their ``requires_grad`` flags and any optimizer already built over ``model.parameters()``
carry over untouched. Only modules of exactly ``torch.nn.LSTM``/``GRU``/``RNN`` (and, for
:func:`revert`, exactly rnnkern's) are replaced: a subclass may have its own ``forward``.
A module that appears twice in the tree is replaced by one twin in both places.
"""
from __future__ import annotations

import torch

from rnnkern.torch.modules import GRU, LSTM, RNN

_TO_RNNKERN = {torch.nn.LSTM: LSTM, torch.nn.GRU: GRU, torch.nn.RNN: RNN}
_TO_TORCH = {v: k for k, v in _TO_RNNKERN.items()}


def _options(module):
    """The constructor arguments that rebuild ``module`` (either family)."""
    opts = dict(input_size=module.input_size, hidden_size=module.hidden_size,
                num_layers=module.num_layers, bias=module.bias,
                batch_first=module.batch_first, dropout=module.dropout,
                bidirectional=module.bidirectional)
    if isinstance(module, (torch.nn.RNN, RNN)):
        opts["nonlinearity"] = module.nonlinearity
    if getattr(module, "proj_size", 0):
        opts["proj_size"] = module.proj_size
    return opts


def _twin(module, cls, path, extra):
    """A ``cls`` configured as ``module`` holding ``module``'s parameters."""
    first = next(module.parameters())
    try:
        twin = cls(**_options(module), device="meta", dtype=first.dtype, **extra)
    except (NotImplementedError, TypeError, ValueError) as exc:
        raise type(exc)(f"cannot replace {path} ({type(module).__name__}): {exc}") from exc
    for name in module._flat_weights_names:
        setattr(twin, name, getattr(module, name))   # the same Parameter, no copy
    return twin.train(module.training)


def _replace(model, table, extra, root_name):
    memo = {}

    def swap(module, path):
        cls = table.get(type(module))
        if cls is None:
            return None
        if id(module) not in memo:
            memo[id(module)] = _twin(module, cls, path, extra)
        return memo[id(module)]

    def walk(parent, prefix):
        # every slot, not named_children(): that skips a module's second appearance
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}"
            twin = swap(child, path)
            if twin is not None:
                setattr(parent, name, twin)
            else:
                walk(child, path)

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    whole = swap(model, root_name)
    if whole is not None:
        return whole
    walk(model, root_name)
    return model


def convert(model, *, backend="auto"):
    """Replace every ``torch.nn.LSTM``/``GRU``/``RNN`` inside ``model`` (recursively) by
    :mod:`rnnkern.torch`'s twin holding the same parameters; returns ``model`` (or the twin when
    ``model`` itself is one of those modules). ``backend`` is the twins' rnnkern backend.

    Convert before wrapping the model (DistributedDataParallel, torch.compile); modules with
    ``proj_size`` or ``bias=False`` raise NotImplementedError naming their path.

        >>> model = rnnkern.torch.convert(model)      # nn.LSTM -> rnnkern.torch.LSTM
    """
    return _replace(model, _TO_RNNKERN, {"backend": backend}, "model")


def revert(model):
    """The inverse of :func:`convert`: every :mod:`rnnkern.torch` LSTM/GRU/RNN inside ``model``
    becomes the ``torch.nn`` module holding the same parameters; returns ``model`` (or that
    module)."""
    return _replace(model, _TO_TORCH, {}, "model")
