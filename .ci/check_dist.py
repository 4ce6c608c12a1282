"""Check what the sdist and the wheel built from it hold (CI runs this after `python -m build`).

    python .ci/check_dist.py DIST_DIR

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
    names = ["CMakeLists.txt", "setup.py", "pyproject.toml", "csrc/bindings.cpp",
             "csrc/include/rnnkern/cells.h"]
    names += [str(p.relative_to(ROOT)) for p in sorted((ROOT / "csrc").rglob("*"))
              if p.is_file() and "__pycache__" not in p.parts]
    names += [f"examples/{p.name}" for p in sorted((ROOT / "examples").glob("*.py"))]
    names += [f"rnnkern/datasets/{f}" for f in DATA]
    return names


def main(dist):
    dist = pathlib.Path(dist)
    wheels, sdists = sorted(dist.glob("rnnkern-*.whl")), sorted(dist.glob("rnnkern-*.tar.gz"))
    if len(wheels) != 1 or len(sdists) != 1:
        sys.exit(f"{dist}: expected one wheel and one sdist, found {wheels + sdists}")
    problems = []
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        problems += [f"wheel lacks {n}" for n in expected_wheel_entries() if n not in names]
        if not any(n.startswith("rnnkern/_C") and n.endswith(".so") for n in names):
            problems.append("wheel lacks the compiled extension rnnkern/_C*.so")
        problems += [f"wheel holds {n}" for n in names
                     if n.startswith(("tests/", "benchmarks/", "examples/"))]
        entry_points = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        if not entry_points or "rnnkern = rnnkern.__main__:main" not in \
                whl.read(entry_points[0]).decode():
            problems.append("wheel lacks the console script rnnkern = rnnkern.__main__:main")
    with tarfile.open(sdists[0]) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
        problems += [f"sdist lacks {n}" for n in expected_sdist_entries() if n not in names]
    for line in problems:
        print(line)
    if problems:
        sys.exit(f"{len(problems)} problem(s) in {dist}")
    print(f"dist OK: {wheels[0].name} ({wheels[0].stat().st_size / 1e6:.2f} MB), "
          f"{sdists[0].name} ({sdists[0].stat().st_size / 1e6:.2f} MB; top folder {top})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dist")
