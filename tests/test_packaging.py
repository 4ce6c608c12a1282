"""The package as users install it: every subpackage is listed for the wheel, the examples and
data come along, and a source tree whose compiled extension is missing or stale says so.

The wheel itself is built and inspected by CI (.ci/check_wheel.py), which also runs the labs
from a non-editable install outside the checkout.
"""
import os
import shutil
import subprocess
import sys
import types

import pytest

import rnnkern as rk
from rnnkern._source_tree import source_digest, source_files
from rnnkern.backends.cpp import build_problem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_subpackage_is_listed_for_the_wheel():
    setup = _pyproject()["tool"]["setuptools"]
    listed = set(setup["packages"])
    on_disk = {os.path.relpath(d, REPO).replace(os.sep, ".")
               for d, _, files in os.walk(os.path.join(REPO, "rnnkern"))
               if "__init__.py" in files}
    assert on_disk | {"rnnkern.examples"} == listed
    assert setup["package-dir"] == {"rnnkern.examples": "examples"}
    data = _pyproject()["tool"]["setuptools"]["package-data"]["rnnkern.datasets"]
    shipped = sorted(f for f in os.listdir(os.path.join(REPO, "rnnkern", "datasets"))
                     if not f.endswith(".py") and f != "__pycache__")
    import fnmatch
    assert all(any(fnmatch.fnmatch(f, pat) for pat in data) for f in shipped), (shipped, data)
    assert _pyproject()["project"]["scripts"]["rnnkern"] == "rnnkern.__main__:main"


def test_every_example_script_is_a_module_of_the_examples_package():
    from rnnkern.labs import LABS, load_example
    scripts = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "examples"))
                     if f.endswith(".py") and f != "__init__.py")
    assert {name for name, _, _ in LABS} <= set(scripts)
    for name in scripts:
        mod = load_example(name)
        assert mod.__name__ == f"rnnkern.examples.{name}"
        assert os.path.dirname(mod.__file__) == os.path.join(REPO, "examples")


# ---------------------------------------------------------------------- source-tree checks
def test_source_digest_covers_the_cpp_build_inputs_only():
    files = source_files(REPO)
    assert "CMakeLists.txt" in files and "csrc/bindings/module.cpp" in files
    assert "csrc/cpu/lstm.cpp" in files and "csrc/include/rnnkern/cells.h" in files
    assert not any(f.startswith("csrc/cuda") or f.endswith(".py") for f in files)


def test_the_built_extension_carries_the_digest_of_its_sources():
    _C = pytest.importorskip("rnnkern._C", reason="rnnkern._C is not built (pip install -e .)")
    if os.path.dirname(os.path.dirname(_C.__file__)) != REPO:
        pytest.skip("rnnkern._C is not this checkout's build")
    assert _C.__source_digest__ == source_digest(REPO)
    assert rk.available_backends()["cpp"][0]


def test_build_problem_names_missing_and_stale_builds(tmp_path):
    root = str(tmp_path)
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "CMakeLists.txt").write_text("project(x)\n")
    (tmp_path / "csrc" / "bindings").mkdir()
    (tmp_path / "csrc" / "bindings" / "module.cpp").write_text("// one\n")
    (tmp_path / "rnnkern").mkdir()
    here = str(tmp_path / "rnnkern" / "_C.so")
    fresh = types.SimpleNamespace(__source_digest__=source_digest(root), __file__=here)
    assert build_problem(root, fresh) == ""
    assert build_problem(None, types.SimpleNamespace()) == ""   # installed: nothing to compare
    elsewhere = types.SimpleNamespace(__source_digest__=source_digest(root),
                                      __file__=os.path.join(REPO, "rnnkern", "_C.so"))
    lent = build_problem(root, elsewhere)    # another checkout's editable install lends its _C
    assert "not built" in lent and os.path.join(REPO, "rnnkern") in lent
    missing = build_problem(root, None, ImportError("No module named 'rnnkern._C'"))
    assert "not built" in missing and "pip install -e ." in missing and root in missing
    assert "reinstall" in build_problem(None, None, ImportError("gone"))
    (tmp_path / "csrc" / "cpu" / "new.cpp").write_text("int x;\n")
    stale = build_problem(root, fresh)
    assert "stale" in stale and "pip install -e ." in stale
    assert "stale" in build_problem(root, types.SimpleNamespace(__file__=here))   # no digest


def _tree_copy(dest, with_extension):
    """A copy of this checkout's package, examples and C++ sources (optionally its _C)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so") if not with_extension else \
        shutil.ignore_patterns("__pycache__")
    for d in ("rnnkern", "examples", "csrc"):
        shutil.copytree(os.path.join(REPO, d), dest / d, ignore=ignore)
    for f in ("setup.py", "CMakeLists.txt", "pyproject.toml"):
        shutil.copy2(os.path.join(REPO, f), dest / f)


def _cli(cwd, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "rnnkern", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_an_unbuilt_source_tree_says_so_and_still_runs_its_labs(tmp_path):
    _tree_copy(tmp_path, with_extension=False)
    proc = _cli(tmp_path, "backends")
    assert proc.returncode == 0, proc.stderr
    cpp = next(line for line in proc.stdout.splitlines() if line.startswith("cpp"))
    assert cpp.startswith("cpp    no") and "not built" in cpp and "pip install -e ." in cpp
    assert f"imported from {tmp_path / 'rnnkern'}" in proc.stdout
    # the labs run from that tree's own examples/, on the backends it has, and say why not cpp
    proc = _cli(tmp_path, "labs", "--only", "1", "--backend", "numpy")
    assert proc.returncode == 0, proc.stderr
    assert "cpp unavailable: rnnkern is imported from the source tree" in proc.stdout
    assert "1 of 1 labs reproduced" in proc.stdout


def test_a_stale_extension_in_a_source_tree_is_not_run(tmp_path):
    if not rk.available_backends()["cpp"][0]:
        pytest.skip("rnnkern._C is not built here (pip install -e .)")
    _tree_copy(tmp_path, with_extension=True)
    proc = _cli(tmp_path, "backends")
    assert proc.stdout.splitlines()[2].startswith("cpp    yes"), proc.stdout   # as built
    with open(tmp_path / "csrc" / "cpu" / "lstm.cpp", "a") as f:
        f.write("\n// an edit after the build\n")
    proc = _cli(tmp_path, "backends")
    cpp = proc.stdout.splitlines()[2]
    assert cpp.startswith("cpp    no") and "stale" in cpp and "pip install -e ." in cpp
