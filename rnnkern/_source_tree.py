"""What a source checkout means to this package: where it is, and a digest of the C++ sources
that build ``rnnkern._C``, so that a checkout can tell when its compiled extension no longer
matches them.

setup.py computes the digest at build time (it loads this file by path: standard library only)
and CMake compiles it into the extension as ``_C.__source_digest__``; ``rnnkern.backends.cpp``
recomputes it when the package is imported from a checkout and names a mismatch as the reason
the ``cpp`` backend is unavailable.
"""
from __future__ import annotations

import hashlib
import os

# what CMakeLists.txt compiles into _C (csrc/cuda is compiled by CuPy at run time, not here)
BUILD_INPUTS = ("CMakeLists.txt", "csrc/bindings", "csrc/cpu", "csrc/include")


def source_tree_root():
    """The checkout this package is imported from (``setup.py`` and ``csrc/`` beside the
    package folder), or None for an installed package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    is_tree = all(os.path.isfile(os.path.join(root, f))
                  for f in ("setup.py", "csrc/bindings/module.cpp"))
    return root if is_tree else None


def source_files(root):
    """The build inputs under ``root`` as sorted '/'-separated relative paths."""
    found = []
    for entry in BUILD_INPUTS:
        path = os.path.join(root, entry)
        if os.path.isfile(path):
            found.append(entry)
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def source_digest(root):
    """Hex SHA-256 (first 16 digits) over the build inputs' relative paths and bytes."""
    h = hashlib.sha256()
    for rel in source_files(root):
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]
