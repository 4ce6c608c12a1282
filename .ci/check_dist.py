"""Check what a wheel or an sdist of rnnkern holds (CI runs this on what it builds).

    python .ci/check_dist.py FILE...      # rnnkern-*.whl and/or rnnkern-*.tar.gz

The wheel must carry the compiled extension, every example script, both data files with their
sources note, the CUDA sources CuPy compiles at run time, and the `rnnkern` console script; the
sdist must carry what building elsewhere needs (csrc/, CMakeLists.txt, setup.py, the examples
and the data). Exits non-zero with the missing entries listed.
"""
import pathlib
import sys
import tarfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ["data-02-stock_daily.csv", "tinyshakespeare.txt.gz", "SOURCES.md"]


def expected_wheel_entries():
    names = [f"rnnkern/examples/{p.name}" for p in sorted((ROOT / "examples").glob("*.py"))]
    names += [f"rnnkern/datasets/{f}" for f in DATA + ["__init__.py"]]
    names += [f"rnnkern/csrc/cuda/{p.name}" for p in sorted((ROOT / "csrc/cuda").glob("*.cu"))]
    names += ["rnnkern/csrc/include/rnnkern/cells.h", "rnnkern/__main__.py", "rnnkern/labs.py"]
    return names


def expected_sdist_entries():
    names = ["CMakeLists.txt", "setup.py", "pyproject.toml", "csrc/bindings/module.cpp",
             "csrc/include/rnnkern/cells.h"]
    names += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").rglob("*"))
              if p.is_file() and "__pycache__" not in p.parts]
    names += [f"examples/{p.name}" for p in sorted((ROOT / "examples").glob("*.py"))]
    names += [f"rnnkern/datasets/{f}" for f in DATA]
    return names


def wheel_problems(path):
    with zipfile.ZipFile(path) as whl:
        names = set(whl.namelist())
        problems = [f"lacks {n}" for n in expected_wheel_entries() if n not in names]
        if not any(n.startswith("rnnkern/_C") and n.endswith(".so") for n in names):
            problems.append("lacks the compiled extension rnnkern/_C*.so")
        problems += [f"holds {n}" for n in names
                     if n.startswith(("tests/", "benchmarks/", "examples/"))]
        entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        if not entry_points or "rnnkern = rnnkern.__main__:main" not in \
                whl.read(entry_points[0]).decode():
            problems.append("lacks the console script rnnkern = rnnkern.__main__:main")
    return problems


def sdist_problems(path):
    with tarfile.open(path) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    return [f"lacks {n}" for n in expected_sdist_entries() if n not in names]


def main(paths):
    if not paths:
        sys.exit(__doc__)
    failed = 0
    for path in map(pathlib.Path, paths):
        if path.name.endswith(".whl"):
            problems = wheel_problems(path)
        elif path.name.endswith(".tar.gz"):
            problems = sdist_problems(path)
        else:
            problems = ["neither a wheel nor an sdist"]
        for line in problems:
            print(f"{path.name}: {line}")
        failed += bool(problems)
        if not problems:
            print(f"{path.name}: OK ({path.stat().st_size / 1e6:.2f} MB)")
    if failed:
        sys.exit(f"{failed} of {len(paths)} file(s) incomplete")


if __name__ == "__main__":
    main(sys.argv[1:])
