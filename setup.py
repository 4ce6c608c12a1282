"""Build the C++ extension ``rnnkern._C`` with CMake (the pybind11 ``cmake_example`` pattern).

Metadata lives in pyproject.toml; this file only adds what setuptools cannot declare:

* ``build_ext`` runs CMake (Release, -O3, portable baseline) and puts ``_C*.so`` where setuptools
  expects the extension, which is the source tree's ``rnnkern/`` for ``pip install -e .``.
  Every CMake failure stops the build loudly (``check=True``); there is no silent fallback here.
  The runtime fallback is ``rnnkern.backends.cpp.available()`` reporting why ``_C`` is missing.
* The extension carries a digest of its C++ sources (``rnnkern/_source_tree.py``), so a
  source tree whose ``_C`` no longer matches ``csrc/`` says so (``python -m rnnkern backends``).
* ``build_py`` copies ``csrc/cuda/*.cu`` and ``csrc/include/**/*.h`` into the wheel as
  ``rnnkern/csrc/...``, so an installed package finds the CUDA sources that CuPy compiles at run
  time. In a source checkout or an editable install they are read from ``<repo>/csrc`` instead
  (look in ``rnnkern/csrc`` first, then ``rnnkern/../csrc``).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"  # keep in step with pyproject.toml


def _source_digest():
    """rnnkern._source_tree.source_digest(ROOT), loaded by path: the package itself needs
    NumPy, which the build environment does not have."""
    spec = importlib.util.spec_from_file_location("_rk_source_tree",
                                                  ROOT / "rnnkern" / "_source_tree.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_digest(str(ROOT))


class CMakeExtension(Extension):
    def __init__(self, name, sourcedir=ROOT):
        super().__init__(name, sources=[])
        self.sourcedir = str(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11  # a build requirement (pyproject.toml)

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        cfg = "Debug" if os.environ.get("RNNKERN_DEBUG") else "Release"
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{cfg.upper()}={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DRK_VERSION={VERSION}",
            f"-DRK_SOURCE_DIGEST={_source_digest()}",
        ]
        if os.environ.get("RNNKERN_SANITIZE"):  # scratch sanitizer builds only
            args.append("-DRK_SANITIZE=ON")
        args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        if "CMAKE_GENERATOR" not in os.environ:
            try:
                import ninja  # noqa: F401  (a build requirement; falls back to make without it)
                args.append("-GNinja")
            except ImportError:
                pass
        build_args = ["--config", cfg]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build_args.append(f"-j{os.cpu_count() or 1}")

        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        # pip builds in the checkout's build/ but in a new isolated environment each time: a
        # cache from the last build names that environment's cmake and ninja, which pip has
        # deleted since, and CMake would fail. Configure afresh; unchanged objects are reused.
        (build_temp / "CMakeCache.txt").unlink(missing_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", *build_args], cwd=build_temp, check=True)


class BuildPyWithCsrc(build_py):
    """Ship the CUDA kernel sources and the shared header inside the package."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "rnnkern" / "csrc"
        for pattern in ("cuda/*.cu", "cuda/*.cuh", "include/**/*.h"):
            for src in (ROOT / "csrc").glob(pattern):
                target = dest / src.relative_to(ROOT / "csrc")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)


setup(
    ext_modules=[CMakeExtension("rnnkern._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithCsrc},
    zip_safe=False,
)
