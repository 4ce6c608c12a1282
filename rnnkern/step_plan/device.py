"""The GPU form of a training step: no host round trip in it.

For a model on the device (``model.to("cuda")``) whose layers keep ``params`` / ``grads`` dicts
of one float dtype (a :class:`rnnkern.Sequential` of any layers), any loss, and an optimizer of
:mod:`rnnkern.optim`, :class:`rnnkern.TrainStep` runs

    forward   ``model.forward``: every module on the device (CuPy), recurrent layers on the
              cuda backend
    loss      the loss as a 0-d device array (never read on the host)
    backward  ``model.backward``; the gradients land in one flat device buffer
    update    the optimizer's fused kernel, ONE launch over the flat parameters in place, after
              the gate kernel that looks at the loss on the device: NaN/inf updates nothing

The parameters and gradients are views of one flat device buffer each (:class:`.flat.
FlatParameters`, as the host plans keep them), so the update needs no concatenation and no
copy back; the only copies are of gradients a backward made as new arrays, device to device.
What is not read in the step -- the loss, whether it was finite, the step count -- is read
when asked: ``float(loss)``, ``TrainStep.read()`` (the Trainer's, every few steps),
``optimizer.iterations``.

Shape legend: P parameters in all.
"""
from __future__ import annotations

from ..optim import Optimizer
from .flat import FlatParameters


def gates_on_device(optimizer):
    """Whether ``optimizer`` takes a step's loss to its device gate (those of rnnkern.optim,
    whose ``step`` / ``step_flat`` are the base class's)."""
    return (isinstance(optimizer, Optimizer) and type(optimizer).step is Optimizer.step
            and type(optimizer).step_flat is Optimizer.step_flat)


def device_plan_reason(model):
    """None when :class:`DevicePlan` can keep ``model``'s parameters flat, else why not."""
    layers = getattr(model, "layers", None)
    if layers is None or not all(isinstance(getattr(m, "params", None), dict)
                                 and isinstance(getattr(m, "grads", None), dict) for m in layers):
        return "the model has no layers with params/grads dicts (a Sequential)"
    dtypes = {v.dtype for m in layers for v in m.params.values()}
    if len(dtypes) != 1:
        return ("the parameters have different dtypes" if dtypes else
                "the model has no parameters")
    return None


class DevicePlan:
    """The flat parameters of a model on the device and the update over them.

    ``flat``: the model's :class:`.flat.FlatParameters` (device buffers [P]); ``layers``: the
    model's layer list when the plan was made (a new list makes a new plan); ``stages``: what
    runs each stage, in words (``str(plan)``)."""

    def __init__(self, model, loss, optimizer):
        self.optimizer = optimizer
        self.layers = list(model.layers)
        dtype = next(v.dtype for m in model.layers for v in m.params.values())
        self.flat = FlatParameters(model, dtype)
        kernel = type(optimizer).__name__
        self.stages = {
            "forward": "model.forward, every module on the device (recurrent layers: cuda "
                       "backend)",
            "loss": f"{getattr(loss, '__name__', type(loss).__name__)} as a 0-d device array, "
                    f"not read",
            "backward": "model.backward; gradients gathered into the flat device buffer",
            "update": f"{kernel}'s fused kernel (csrc/cuda/optim.cu), one launch over the flat "
                      f"parameters in place, after the gate on the loss (NaN/inf: nothing "
                      f"updated) -- no host read",
        }

    def still_current(self, model):
        """Whether the plan still serves ``model``: the same layers, still holding the flat
        views (``to()`` or ``load_params`` of a recurrent layer replaces them)."""
        return getattr(model, "layers", None) == self.layers and self.flat.still_bound()

    def update(self, loss, tally):
        """The update stage: gradients into the flat buffer, then the gated fused update."""
        self.flat.collect_grads()
        self.optimizer.step_flat(self.flat.params, self.flat.grads, self.flat.layout, loss=loss,
                                 tally=tally)

    def __str__(self):
        P = self.flat.params.size
        lines = [(f"step plan on the device, {P} parameters in one flat "
                  f"{self.flat.params.dtype.name} buffer:")]
        lines += [f"  {stage:8s} {what}" for stage, what in self.stages.items()]
        return "\n".join(lines)
