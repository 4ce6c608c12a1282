"""Training-step plans: one step of a recurrent model built once from four stages.

For a model of the form ``Sequential([OneHot | Embedding (optional), LSTM/GRU/RNN layers ...,
Dropout (optional), Dense])`` with :func:`rnnkern.sequence_loss` and an optimizer of
:mod:`rnnkern.optim` (:mod:`.form`), :class:`rnnkern.TrainStep` builds a plan per (model, loss,
optimizer, batch shape, dtype, backend) whose stages are

    input    ids -> table rows / one-hot / floats
    stack    the recurrent layers, on the backend they resolve to when called directly
    head     Dense + sequence_loss
    update   the optimizer's rule over the parameters in one flat array (:mod:`.flat`)

with one implementation per backend: :mod:`.cpp` runs input, stack, head (and a plain Adam)
as one call; :mod:`.seam` runs the layers through any other backend's seam, a cell at a time.
``str(plan)`` says which ran where. Other models take the generic loop. A model on the GPU
takes the GPU form instead (:mod:`.device`): its own modules on the device, the parameters flat
there, the update gated on the device by the loss, nothing read back in the step.
"""
from __future__ import annotations

from .. import backends
from .cpp import CppPlan
from .flat import FlatParameters
from .form import ModelForm, model_form
from .seam import SeamPlan

__all__ = ["build_plan", "FlatParameters", "ModelForm", "model_form"]

PLANS = {"cpp": CppPlan, "numba": SeamPlan, "numpy": SeamPlan}


def plan_backend(form, x):
    """(the backend module every recurrent layer resolves to for input ``x``, None), or
    (None, reason) when they differ or no plan serves theirs."""
    names = {backends.resolve(r.backend, x).name for r in form.recurrent}
    if len(names) > 1:
        return None, f"recurrent layers on different backends ({', '.join(sorted(names))})"
    name = names.pop()
    if name not in PLANS:
        return None, f"recurrent layers on the {name} backend (no step plan there yet)"
    return backends.get_backend(name), None


def build_plan(form, flat, optimizer, backend, shape):
    """The plan of ``backend`` for batches of ``shape`` (B, T)."""
    return PLANS[backend.name](form, flat, optimizer, backend, shape)
