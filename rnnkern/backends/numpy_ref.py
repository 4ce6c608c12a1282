"""The NumPy reference (:mod:`rnnkern.reference`) as a backend: always available, slow."""
from .. import reference

name = "numpy"


def available():
    return True, "NumPy reference implementation"


forward = reference.forward
backward = reference.backward
