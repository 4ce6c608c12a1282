"""The CUDA runtime's GPU-only host code (rnnkern/backends/cuda/runtime.py: graph capture, the
side stream, the direct cuBLAS calls) driven against a stand-in CuPy that logs every call, so
the order of calls a capture depends on is checked without a GPU: the cuBLAS handles are bound
to their streams before a capture begins and never inside one, nothing is created inside one,
a capture always ends, and the side stream forks from and joins the current stream.
"""
import sys
import types

import numpy as np
import pytest

from rnnkern.backends.cuda import runtime


class DevArray(np.ndarray):
    """A host array with CuPy's ``.data.ptr``."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def dev(a):
    return np.ascontiguousarray(a).view(DevArray)


class FakeCuda:
    """The parts of ``cupy.cuda`` the runtime uses; ``log`` holds (what, detail) in order."""

    def __init__(self):
        self.log = []
        self.capturing = None  # the stream under capture
        self.null = FakeCuda._Stream(self, ptr=0)
        self.current = self.null
        self.handles = 0
        fake = self

        class Device:
            id = 0

        self.Device = Device
        self.device = types.SimpleNamespace(get_cublas_handle=lambda: 1000)
        self.Event = lambda disable_timing=False: FakeCuda._Event(fake)
        self.Stream = lambda non_blocking=False: FakeCuda._Stream(fake)

    class _Stream:
        count = 0

        def __init__(self, cuda, ptr=None):
            FakeCuda._Stream.count += 1
            self.cuda, self.ptr = cuda, ptr if ptr is not None else 100 + FakeCuda._Stream.count
            cuda.forbid_in_capture("stream created")

        def __enter__(self):
            self.outer, self.cuda.current = self.cuda.current, self
            return self

        def __exit__(self, *exc):
            self.cuda.current = self.outer

        def begin_capture(self):
            self.cuda.log.append(("begin_capture", self.ptr))
            self.cuda.capturing = self

        def end_capture(self):
            self.cuda.log.append(("end_capture", self.ptr))
            self.cuda.capturing = None
            return types.SimpleNamespace(launch=lambda: self.cuda.log.append(("launch", None)))

        def wait_event(self, event):
            self.cuda.log.append(("wait", (self.ptr, event.stream)))

    class _Event:
        def __init__(self, cuda):
            cuda.forbid_in_capture("event created")
            self.cuda, self.stream = cuda, None

        def record(self, stream):
            self.stream = stream.ptr
            self.cuda.log.append(("record", stream.ptr))

    def get_current_stream(self):
        return self.current

    def forbid_in_capture(self, what):
        if self.capturing is not None:
            raise AssertionError(f"{what} inside a capture")


class FakeBlas:
    def __init__(self, cuda):
        self.cuda = cuda
        self.bound = {}  # handle -> stream ptr

    def set_stream(self, handle, stream_ptr):
        self.cuda.forbid_in_capture("cublasSetStream")
        self.bound[handle] = stream_ptr
        self.cuda.log.append(("bind", (handle, stream_ptr)))

    def set_pointer_mode_host(self, handle):
        self.cuda.forbid_in_capture("cublasSetPointerMode")

    def gemm(self, double, handle, *args):
        self.cuda.log.append(("gemm", (handle, self.bound.get(handle))))


@pytest.fixture
def rt(monkeypatch):
    cuda = FakeCuda()
    cupy = types.ModuleType("cupy")
    cupy.cuda = cuda

    def matmul(a, b, out=None):
        cuda.log.append(("cupy.matmul", cuda.current.ptr))
        return np.matmul(a, b, out=out)

    cupy.matmul = matmul
    libs = types.ModuleType("cupy_backends.cuda.libs")
    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")

    def create():
        cuda.forbid_in_capture("cublasCreate")
        cuda.handles += 1
        return 2000 + cuda.handles

    cublas.create = create
    libs.cublas = cublas
    for name, mod in (("cupy", cupy), ("cupy_backends", types.ModuleType("cupy_backends")),
                      ("cupy_backends.cuda", types.ModuleType("cupy_backends.cuda")),
                      ("cupy_backends.cuda.libs", libs),
                      ("cupy_backends.cuda.libs.cublas", cublas)):
        monkeypatch.setitem(sys.modules, name, mod)
    r = runtime.CupyRuntime()
    r._blas = FakeBlas(cuda)
    return r


def loop(rt, h, w, gh, ranges=2):
    """A stepwise-like body: per step a GEMM, per range a side-stream GEMM, then the join."""
    for t in range(h.shape[0]):
        rt.matmul(h[t], w.T, gh)
        if t % ranges == 0:
            with rt.on_side_stream():
                rt.matmul(h[t], w.T, gh, accumulate=True)
    rt.join_side()


def test_a_capture_binds_handles_before_it_begins_and_creates_nothing_inside(rt):
    cuda = rt.xp.cuda
    h, w, gh = dev(np.ones((4, 2, 3))), dev(np.ones((6, 3))), dev(np.zeros((2, 6)))
    graph = rt.capture(lambda: loop(rt, h, w, gh))
    begin = next(i for i, (what, _) in enumerate(cuda.log) if what == "begin_capture")
    cap = cuda.log[begin][1]
    before, inside = cuda.log[:begin], cuda.log[begin:]
    assert ("bind", (1000, cap)) in before                 # the main handle on the capture
    side_binds = [d for what, d in before if what == "bind" and d[0] != 1000]
    assert len(side_binds) == 1                            # the side handle, made beforehand
    side_handle, side_ptr = side_binds[0]
    gemms = [d for what, d in inside if what == "gemm"]
    assert gemms.count((1000, cap)) == 4 and gemms.count((side_handle, side_ptr)) == 2
    assert inside[-1] == ("end_capture", cap) and cuda.capturing is None
    # every side GEMM starts after the capture stream's fork record, and the join waits on it
    assert ("wait", (side_ptr, cap)) in inside and ("wait", (cap, side_ptr)) in inside
    assert cuda.current is cuda.null                       # the current stream is restored
    rt.replay(graph)
    assert cuda.log[-1] == ("launch", None)


def test_a_capture_ends_when_its_body_raises(rt):
    cuda = rt.xp.cuda

    def body():
        raise ValueError("body failed")

    with pytest.raises(ValueError, match="body failed"):
        rt.capture(body)
    assert cuda.log[-1][0] == "end_capture" and cuda.capturing is None
    # outside a capture, a GEMM binds the main handle to the current stream again
    a = dev(np.ones((2, 2)))
    rt.matmul(a, a, dev(np.empty((2, 2))))
    assert cuda.log[-2:] == [("bind", (1000, 0)), ("gemm", (1000, 0))]


def test_eager_gemms_follow_the_current_stream(rt):
    cuda = rt.xp.cuda
    a = dev(np.ones((2, 2)))
    with cuda.Stream(non_blocking=True) as s:
        rt.matmul(a, a, dev(np.empty((2, 2))))
        with rt.on_side_stream():
            rt.matmul(a, a, dev(np.empty((2, 2))), accumulate=True)
        rt.join_side()
    gemms = [d for what, d in cuda.log if what == "gemm"]
    side = rt._side_of(s)
    assert gemms == [(1000, s.ptr), (side[1], side[0].ptr)]


def test_no_direct_cublas_means_no_capture(rt):
    rt._blas = False
    with pytest.raises(RuntimeError, match="not found for direct calls"):
        rt.capture(lambda: None)


def test_without_direct_cublas_gemms_go_through_cupy_matmul(rt):
    """No libcublas entry points found: every GEMM, the side stream's too, is cupy.matmul on
    the current stream (it sets its handle's stream itself), and no side handle is made."""
    cuda = rt.xp.cuda
    rt._blas = False
    a = dev(np.arange(4.0).reshape(2, 2))
    out = dev(np.ones((2, 2)))
    with rt.on_side_stream():
        rt.matmul(a, a, out, accumulate=True)
    rt.join_side()
    np.testing.assert_array_equal(out, 1 + a @ a)
    side, handle = rt._side_of(cuda.null)[:2]
    assert handle is None and cuda.handles == 0
    assert [e for e in cuda.log if e[0] in ("gemm", "bind", "cupy.matmul")] == [
        ("cupy.matmul", side.ptr)]
