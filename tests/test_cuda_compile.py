"""The CUDA sources compile without a GPU: nvcc (when installed) for sm_90 in float and double,
NVRTC (CuPy's compiler, when its library is found) on the exact text the backend hands to CuPy,
and a preprocessor check that that text reaches no host header (NVRTC has none).
"""
import ctypes
import ctypes.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rnnkern.backends.cuda import runtime

MODULES = runtime.MODULES
REALS = ["float", "double"]


def test_sources_are_found_and_includes_inlined():
    root = runtime.source_root()
    assert sorted(p.stem for p in (root / "cuda").glob("*.cu")) == sorted(MODULES)
    for module in MODULES:
        text = runtime.kernel_source(module, "double")
        assert text.startswith("#define RK_REAL double\n")
        assert '#include "' not in text and "namespace rk {" in text
        assert text.count("namespace rk {") == 1  # cells.h inlined once
        assert 'extern "C" __global__' in text


def test_source_root_follows_the_environment(tmp_path, monkeypatch):
    (tmp_path / "cuda").mkdir()
    with pytest.raises(FileNotFoundError):
        runtime.kernel_source("stepwise", root=tmp_path)  # no .cu there
    shutil.copytree(runtime.source_root(), tmp_path / "csrc")
    monkeypatch.setenv(runtime.ENV_CSRC, str(tmp_path / "csrc"))
    assert runtime.source_root() == tmp_path / "csrc"
    with pytest.raises(ValueError, match="real must be"):
        runtime.kernel_source("stepwise", "half")


@pytest.mark.parametrize("layout", ["wheel", "checkout"])
def test_source_root_of_a_wheel_and_of_a_checkout(layout, tmp_path, monkeypatch):
    """A wheel carries the sources as rnnkern/csrc (setup.py's build_py); a checkout has them
    beside the package, two levels above rnnkern/backends/cuda/."""
    module = tmp_path / "rnnkern" / "backends" / "cuda" / "runtime.py"
    root = tmp_path / "rnnkern" / "csrc" if layout == "wheel" else tmp_path / "csrc"
    (root / "cuda").mkdir(parents=True)
    (root / "cuda" / "stepwise.cu").write_text("")
    monkeypatch.delenv(runtime.ENV_CSRC, raising=False)
    monkeypatch.setattr(runtime, "__file__", str(module))
    assert runtime.source_root() == root


@pytest.mark.parametrize("module", MODULES)
def test_no_host_header_under_nvrtc(module):
    cpp = shutil.which("g++") or shutil.which("cpp")
    if cpp is None:
        pytest.skip("no C preprocessor (g++) found")
    res = subprocess.run([cpp, "-E", "-P", "-nostdinc", "-x", "c++", "-D__CUDACC_RTC__",
                          "-D__CUDACC__", "-D__CUDA_ARCH__=900", "-"],
                         input=runtime.kernel_source(module, "float"), capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("real", REALS)
@pytest.mark.parametrize("module", MODULES)
def test_nvcc_compiles(module, real, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    root = runtime.source_root()
    res = subprocess.run([nvcc, "-std=c++17", "-arch=sm_90", "-I", str(root / "include"),
                          f"-DRK_REAL={real}", "-c", str(root / "cuda" / f"{module}.cu"),
                          "-o", str(tmp_path / f"{module}.o")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "warning" not in res.stderr.lower(), res.stderr[-4000:]


def _find_nvrtc():
    candidates = [os.environ.get("RNNKERN_NVRTC_LIB")]
    try:  # the pip wheel nvidia-cuda-nvrtc-cu12 / -cu13
        import nvidia.cuda_nvrtc as pkg
        candidates += sorted(str(p) for d in pkg.__path__ for p in Path(d, "lib").glob("libnvrtc.so*"))
    except ImportError:
        pass
    candidates.append(ctypes.util.find_library("nvrtc"))
    for c in candidates:
        if c:
            try:
                return ctypes.CDLL(c)
            except OSError:
                continue
    return None


@pytest.fixture(scope="module")
def nvrtc():
    lib = _find_nvrtc()
    if lib is None:
        pytest.skip("NVRTC library not found (pip install nvidia-cuda-nvrtc-cu12, or set "
                    "RNNKERN_NVRTC_LIB)")
    return lib


@pytest.mark.parametrize("real", REALS)
@pytest.mark.parametrize("module", MODULES)
def test_nvrtc_compiles_what_cupy_gets(nvrtc, module, real):
    src = runtime.kernel_source(module, real).encode()
    prog = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, f"{module}.cu".encode(), 0,
                                    None, None) == 0
    # the oldest architecture each module is for (cluster.cu needs thread-block clusters)
    opts = [b"--std=c++17", b"-arch=compute_90" if module == "cluster" else b"-arch=compute_80"]
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    assert rc == 0, log.value.decode(errors="replace")[-4000:]
