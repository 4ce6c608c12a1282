"""Run the CUDA kernels of ``csrc/cuda`` on the CPU, for tests on machines without a GPU.

Each ``.cu`` file is compiled by g++ as C++20 with ``cuda_emu_host.h`` standing in for the CUDA
runtime (every CUDA thread becomes a host thread), once per element type, into a shared
library with one ``emu_<kernel>(grid, block, smem, args...)`` launcher per ``extern "C"``
kernel. :class:`EmuRuntime` offers the methods of ``rnnkern.backends.cuda.runtime.CupyRuntime``
over NumPy arrays, so the backend's own time loops, GEMMs and buffer handling run unchanged.

What this checks: kernel logic, indexing, masking, the persistent kernels' work split, staging,
grid barrier and cluster teams, and the host orchestration. What it cannot: NVRTC/CuPy
specifics, GPU memory ordering and caches, launch limits, speed.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from rnnkern import config
from rnnkern.backends.cuda import runtime

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_emu_host.h"
_KERNEL = re.compile(r'extern\s+"C"\s+void\s+(rk_\w+)\s*\(([^)]*)\)\s*\{')


def compiler():
    return shutil.which("g++")


def _ctype(param, real):
    decl = " ".join(param.replace("__restrict__", "").split())
    if "*" in decl:
        return ctypes.c_void_p
    typ = decl.rsplit(" ", 1)[0]
    if typ == "int":
        return ctypes.c_int
    if typ == "long long":
        return ctypes.c_longlong
    if typ == "real":
        return ctypes.c_double if real == "double" else ctypes.c_float
    if typ in ("float", "double"):      # spelled out: that type in either build
        return ctypes.c_double if typ == "double" else ctypes.c_float
    raise TypeError(f"emulator: unsupported kernel parameter {param!r}")


def build(module, real, outdir):
    """Compile csrc/cuda/<module>.cu for ``real``; returns (CDLL, {kernel: argtypes})."""
    root = runtime.source_root()
    src = root / "cuda" / f"{module}.cu"
    flags = ["-std=c++20", "-O1", "-pthread", f"-DRK_REAL={real}", "-DRK_EXACT_MATH",
             f"-DRK_CLUSTER_SIZE={runtime.CLUSTER_SIZE}",
             "-I", str(root / "include"), "-include", str(HEADER)]
    expanded = subprocess.run(["g++", "-E", "-P", "-x", "c++", *flags, str(src)], check=True,
                              capture_output=True, text=True).stdout
    kernels, wrappers = {}, []
    for m in _KERNEL.finditer(expanded):
        kname, params = m.group(1), [p.strip() for p in m.group(2).split(",")]
        names = [p.replace("*", " ").split()[-1] for p in params]
        # the cluster kernels' __cluster_dims__ (a no-op macro here) becomes a launch argument
        cluster = "RK_CLUSTER_SIZE" if "_cluster_" in kname else "1"
        kernels[kname] = [_ctype(p, real) for p in params]
        wrappers.append(
            f'extern "C" void emu_{kname}(unsigned int grid, unsigned int block, '
            f'unsigned long smem, {", ".join(params)}) {{\n'
            f'  rk_emu::launch(grid, block, smem, {cluster}, '
            f'[=] {{ {kname}({", ".join(names)}); }});\n}}\n')
    wrappers.append('extern "C" int emu_smem_overrun() { return rk_emu::take_smem_overrun(); }\n')
    tu = Path(outdir) / f"{module}_{real}.cpp"
    tu.write_text(f'#include "{src}"\n' + "".join(wrappers))
    key = hashlib.sha1(expanded.encode() + tu.read_bytes()).hexdigest()[:12]
    lib = Path(outdir) / f"{module}_{real}_{key}.so"
    subprocess.run(["g++", "-x", "c++", *flags, "-shared", "-fPIC", str(tu), "-o", str(lib)],
                   check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(lib)), kernels


class EmuKernel:
    def __init__(self, lib, kname, argtypes):
        self.fn = getattr(lib, f"emu_{kname}")
        self.fn.restype = None
        self.fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.c_ulong] + argtypes
        self.overrun = lib.emu_smem_overrun
        self.overrun.restype = ctypes.c_int
        self.name = kname
        self.argtypes = argtypes
        self.nargs = len(argtypes)


class EmuRuntime:
    """NumPy arrays + emulated kernels, with the interface of ``runtime.CupyRuntime``."""

    xp = np

    def __init__(self, n_sm=3, smem_limit=48 * 1024, outdir=None):
        self._n_sm, self._smem = n_sm, smem_limit
        self._dir = outdir or tempfile.mkdtemp(prefix="rk_cuda_emu_")
        self._libs = {}
        self.cache = {}
        self.launches = []  # (kernel name, grid, block, smem) of every launch, for tests
        self.max_resident = None  # blocks that fit at once (None: any number), for tests
        self.refuse_clusters = False  # launches of cluster kernels fail, for tests
        self.refuse_capture = False  # graph captures fail, for tests
        self.captures = self.replays = 0
        self.side_blocks = 0  # on_side_stream blocks entered, for tests
        self._recording = None  # the ops of the capture under way, or None

    def props(self):
        return self._n_sm, self._smem

    def supports_clusters(self):
        return True

    def stream_key(self):
        return 0, 0

    def kernel(self, module, fname, dtype):
        real = "double" if np.dtype(dtype) == np.float64 else "float"
        if (module, real) not in self._libs:
            self._libs[(module, real)] = build(module, real, self._dir)
        lib, kernels = self._libs[(module, real)]
        if fname not in kernels:
            raise AttributeError(f"{module}.cu has no kernel {fname!r}")
        return EmuKernel(lib, fname, kernels[fname])

    def launch(self, kern, grid, block, args, smem=0, resident=False, cluster=False):
        if resident and self.max_resident is not None and grid > self.max_resident:
            raise runtime.NotResident(f"{grid} blocks > {self.max_resident} (emulated limit)")
        if cluster and self.refuse_clusters:
            raise runtime.NotResident("cluster launch refused (emulated)")
        if len(args) != kern.nargs:
            raise TypeError(f"{kern.name}: {len(args)} arguments, the kernel takes {kern.nargs}")
        conv = []
        for i, (a, ctype) in enumerate(zip(args, kern.argtypes)):
            # CuPy packs arguments by their own type: insist on the exact one, as a GPU would
            # silently misread a float64 given for a float parameter
            want = {ctypes.c_void_p: np.ndarray, ctypes.c_int: np.int32,
                    ctypes.c_longlong: np.int64, ctypes.c_float: np.float32,
                    ctypes.c_double: np.float64}[ctype]
            if type(a) is not want:
                raise TypeError(f"{kern.name}: argument {i} is {type(a).__name__}, "
                                f"the kernel wants {want.__name__}")
            if isinstance(a, np.ndarray):
                if not a.flags.c_contiguous:
                    raise ValueError(f"{kern.name}: non-contiguous array argument {i}")
                conv.append(a.ctypes.data)
            else:
                conv.append(a.item())
        if smem > self._smem:
            raise ValueError(f"{kern.name}: {smem} bytes of shared memory > limit {self._smem}")
        self.launches.append((kern.name, grid, block, smem))

        def run():
            kern.fn(grid, block, smem, *conv)
            if kern.overrun():
                raise AssertionError(f"{kern.name} wrote past its {smem} bytes of shared memory")

        self._run_or_record(run)

    def _run_or_record(self, op):
        if self._recording is None:
            op()
        else:
            self._recording.append(op)

    def capture(self, body):
        """What ``CupyRuntime.capture`` does: ``body``'s launches and GEMMs are recorded, with
        the arrays (pointers) they were given, and run only when the graph is replayed. So a
        loop that read an array it does not own, or did array work outside launch and matmul,
        gives wrong results here as it would on a GPU."""
        if self.refuse_capture:
            raise RuntimeError("stream capture refused (emulated)")
        self._recording = []
        try:
            body()
            graph = EmuGraph(self._recording)
        finally:
            self._recording = None
        self.captures += 1
        return graph

    def replay(self, graph):
        self.replays += 1
        for op in graph.ops:
            op()

    @contextlib.contextmanager
    def on_side_stream(self):
        """One stream here: the side stream's work runs (or is recorded) in program order,
        which is an order the GPU may also choose."""
        self.side_blocks += 1
        yield

    def join_side(self):
        pass

    def new_event(self):  # one stream: an event orders nothing here
        return None

    def record(self, event):
        pass

    def wait(self, event):
        pass

    def matmul(self, a, b, out, accumulate=False):
        """What ``CupyRuntime.matmul`` does: the cuBLAS call :func:`runtime.gemm_args` describes,
        here read from memory the way cuBLAS reads it, so every stepwise GEMM of the emulated
        tests checks the operand mapping (``np.matmul`` where the GPU takes ``cupy.matmul``)."""
        spec = runtime.gemm_args(a, b, out) if config.CUDA_DIRECT_GEMM else None
        if spec is None:
            if self._recording is not None:
                raise AssertionError("cupy.matmul inside a graph capture")
            if accumulate:
                out += a @ b
            else:
                np.matmul(a, b, out=out)
        elif spec == "empty":
            if not accumulate:
                self._run_or_record(lambda: out.fill(0))
        else:
            op_b, op_a, m, n, k, ld_b, ld_a, ld_c = spec
            self._run_or_record(lambda: colmajor_gemm(op_b, op_a, m, n, k, b, ld_b, a, ld_a,
                                                      out, ld_c, accumulate))


class EmuGraph:
    """A recorded capture: the launches and GEMMs to run, in order, at each replay."""

    def __init__(self, ops):
        self.ops = ops


def colmajor_gemm(op_a, op_b, m, n, k, A, lda, B, ldb, C, ldc, accumulate=False):
    """cuBLAS's GEMM on host memory: C[m,n] = op(A)[m,k] op(B)[k,n] (beta = 1 with
    ``accumulate``: C +=), every matrix column-major from its view's first element with the
    given leading dimension."""
    def read(X, op, rows, cols, ld):
        shape = (rows, cols) if op == "N" else (cols, rows)
        stored = np.lib.stride_tricks.as_strided(X, shape, (X.itemsize, ld * X.itemsize))
        return stored if op == "N" else stored.T
    c_view = np.lib.stride_tricks.as_strided(C, (m, n), (C.itemsize, ldc * C.itemsize))
    product = read(A, op_a, m, k, lda) @ read(B, op_b, k, n, ldb)
    if accumulate:
        c_view += product
    else:
        c_view[...] = product
