"""The CUDA backend's seam: :func:`forward` and :func:`backward` (one layer, one direction, whole
sequence; contract in :mod:`rnnkern.backends`) and the launches of each time-loop strategy.

Arguments arrive as the layer API hands them over, validated once there and not again here:
C-contiguous CuPy arrays of one float dtype on the current device, ``lengths`` None or int64
[B]. Device lengths are not value-checked unless ``rnnkern.config.CHECK_FINITE_ON_DEVICE`` asks
(reading them would stall the host); the kernels only ever compare ``t < lengths[b]``, so a
length below 0 acts as 0 and one above T as T, and no index is derived from it.

Shape legend: B batch, T time steps, I input, H hidden, G gates (RNN 1, LSTM 4, GRU 3), S saved
activations per unit (RNN 1, LSTM 5, GRU 4). Buffers (layouts in ``csrc/cuda/common.cuh``,
shared by every strategy, so backward may use any, whichever forward ran)::

    gx [B,T,G*H]  h_all, c_all [T+1,B,H]  acts [T,B,S*H]  rh [T,B,H]  d_gx [B,T,G*H]  d_gh [T,B,G*H]

What is not recurrent is hoisted: ``x W_ih^T`` is one GEMM over all ``B*T`` rows before the
loop and ``dx, dW_ih`` are single GEMMs after the backward loop; ``dW_hh`` is one GEMM after a
persistent kernel, and in the stepwise backward a GEMM per range of steps on a side stream,
overlapping the rest of the loop (``config.CUDA_WGRAD_CHUNKS`` ranges).

The stepwise loops launch two operations per step from Python; from a shape's second call on
they are captured once as CUDA graphs and replayed (:mod:`.graphs`), on buffers the graph owns:
:class:`LoopBuffers` holds every array a loop touches, fresh per call or owned by a graph
instance, so both routes run the same loop code.

The grid-team persistent kernels need every block resident at once for their grid barrier:
the grid is at most one block per SM, the occupancy calculator is asked before the launch (if
it says no, the call runs stepwise unless that strategy was forced), and a barrier that waits
too long sets an error flag, read after the launch (one small sync;
``rnnkern.config.CUDA_CHECK_BARRIER``), instead of hanging. CuPy's cooperative launch is not
used: it silently shrinks a grid that does not fit, and these kernels assign hidden units by
block. Cluster teams need neither (the hardware schedules a cluster's blocks together), but the
driver may refuse their launch, which falls back the same way.
"""
from __future__ import annotations

import math

import numpy as np

from ... import config
from . import graphs, runtime
from .plan import choose_strategy, device_limits, forced_strategy
from .runtime import NotResident

_SAVED_PER_UNIT = {"rnn": 1, "lstm": 5, "gru": 4}  # S
# the persistent strategies' kernels are rk_<kind>_<stem>_fwd / _bwd
_KERNEL_STEM = {"persistent": "persist", "cluster": "cluster"}


def _two_phase(spec):
    """A GRU with reset_after=False: its candidate's GEMM takes r * h, a second phase a step."""
    return spec.kind == "gru" and not spec.reset_after


def _grid(n):
    return max(1, math.ceil(n / config.CUDA_THREADS))


class LoopBuffers:
    """Every device array the time loops of one layer call read or write (layouts in
    ``csrc/cuda/common.cuh``). Fresh per call, with the caller's ``w_hh``, biases and
    ``lengths`` used as they are; or ``owned`` by a graph instance (:mod:`.graphs`), which holds
    copies of those too and keeps one set of backward buffers, since a graph replays on the
    pointers it was captured with.

    forward   gx [B,T,G*H], h_all [T+1,B,H], c_all [T+1,B,H] (LSTM; else [1]), outputs [B,T,H],
              acts [T,B,S*H], rh [T,B,H] (GRU reset-before; else [1]), w_hh [G*H,H],
              b_ih, b_hh [G*H], lengths int64 [B]; the stepwise loop's scratch
              (:meth:`add_step_scratch`): gh [B,G*H] (GRU reset-before: [B,2H], and
              gh_n [B,H]; else [1])
    backward  :class:`BackwardBuffers`
    """

    def __init__(self, xp, spec, dtype, B, T, H, owned=False):
        G, S = spec.gates, _SAVED_PER_UNIT[spec.kind]
        lstm, two_phase = spec.kind == "lstm", _two_phase(spec)
        self.xp, self.spec, self.owned = xp, spec, owned
        self.shape = (B, T, H)

        def new(*shape):
            return xp.empty(shape, dtype=dtype)

        self.gx = new(B, T, G * H)
        self.h_all = new(T + 1, B, H)
        self.c_all = new(T + 1, B, H) if lstm else new(1)
        self.outputs = new(B, T, H)
        self.acts = new(T, B, S * H)
        self.rh = new(T, B, H) if two_phase else new(1)
        self.stepwise = False
        if owned:  # (only the stepwise loop is captured)
            self.w_hh, self.b_ih, self.b_hh = new(G * H, H), new(G * H), new(G * H)
            self.lengths = xp.empty((B,), dtype=np.int64)
            self.add_step_scratch()
        self._backward = None

    def add_step_scratch(self):
        """The stepwise loops' per-step buffers (forward here, backward in its buffers)."""
        if not self.stepwise:
            B, _, H = self.shape
            two_phase, dtype = _two_phase(self.spec), self.gx.dtype
            self.gh = self.xp.empty((B, 2 * H if two_phase else self.spec.gates * H), dtype)
            self.gh_n = self.xp.empty((B, H) if two_phase else (1,), dtype)
            self.stepwise = True

    def load(self, x, w_ih, w_hh, b_ih, b_hh, lengths, h0, c0):
        """The hoisted input GEMM into gx, the initial state into h_all[0] and c_all[0], and
        the recurrent weights, biases and lengths (copied when owned)."""
        B, T, I = x.shape
        self.xp.matmul(x.reshape(B * T, I), w_ih.T, out=self.gx.reshape(B * T, self.gx.shape[2]))
        if self.owned:
            self.w_hh[...], self.b_ih[...], self.b_hh[...] = w_hh, b_ih, b_hh
            self.lengths[...] = lengths
        else:
            self.w_hh, self.b_ih, self.b_hh, self.lengths = w_hh, b_ih, b_hh, lengths
        self.h_all[0] = h0
        if self.spec.kind == "lstm":
            self.c_all[0] = c0

    def backward_buffers(self, d_outputs, d_h_n, d_c_n):
        """The :class:`BackwardBuffers` of one backward, loaded with the incoming gradients:
        one set kept when owned, a fresh set otherwise (the results of an earlier backward from
        the same record stay the caller's)."""
        if not self.owned:  # not kept: the record must not hold them after its backward
            bw = BackwardBuffers(self)
        else:
            if self._backward is None:
                self._backward = BackwardBuffers(self)
            bw = self._backward
        bw.load(d_outputs, d_h_n, d_c_n)
        return bw


class BackwardBuffers:
    """d_out [B,T,H] (owned buffers, or the caller's array; [1] zeros when absent), dh [B,H],
    dc [B,H] (LSTM; else [1]), d_gx [B,T,G*H], d_gh [T,B,G*H], dw_hh [G*H,H] (written by
    :func:`_dw_hh`); for the stepwise loop also dh_gemm [B,H] (the later step's d_gh W_hh)
    and d_rh [B,H] (GRU reset-before; else [1])."""

    def __init__(self, fwd):
        B, T, H = fwd.shape
        spec, xp, dtype = fwd.spec, fwd.xp, fwd.gx.dtype
        GH = spec.gates * H
        self.fwd, self.xp, self.owned = fwd, xp, fwd.owned
        self.dc_shape = (B, H) if spec.kind == "lstm" else (1,)
        self.d_gx = xp.empty((B, T, GH), dtype=dtype)
        self.d_gh = xp.empty((T, B, GH), dtype=dtype)
        self.dw_hh = xp.empty((GH, H), dtype=dtype)
        self.stepwise = False
        if fwd.owned:
            self.dh, self.dc = xp.empty((B, H), dtype), xp.empty(self.dc_shape, dtype)
            self._no_dout = xp.zeros((1,), dtype)
            self._own_dout = xp.empty((B, T, H), dtype)
            self.add_step_scratch()

    def add_step_scratch(self):
        if not self.stepwise:
            B, _, H = self.fwd.shape
            dtype = self.d_gx.dtype
            self.dh_gemm = self.xp.empty((B, H), dtype)
            self.d_rh = self.xp.empty((B, H) if _two_phase(self.fwd.spec) else (1,), dtype)
            self.stepwise = True

    def load(self, d_outputs, d_h_n, d_c_n):
        """The incoming gradients: into the kept buffers when owned, else fresh arrays (d_h_n
        and d_c_n copied: the kernels update dh and dc in place)."""
        xp, dtype = self.xp, self.d_gx.dtype
        B, _, H = self.fwd.shape
        if self.owned:
            for buf, d in ((self.dh, d_h_n), (self.dc, d_c_n)):
                if d is None:
                    buf.fill(0)
                else:
                    buf[...] = d
            if d_outputs is not None:
                self._own_dout[...] = d_outputs
            self.d_out = self._no_dout if d_outputs is None else self._own_dout
            return
        self.dh = xp.zeros((B, H), dtype) if d_h_n is None else d_h_n.copy()
        self.dc = xp.zeros(self.dc_shape, dtype) if d_c_n is None else d_c_n.copy()
        self.d_out = xp.zeros((1,), dtype) if d_outputs is None else d_outputs


def forward(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, lengths=None):
    """See :mod:`rnnkern.backends`. x [B,T,I], w_ih [G*H,I], w_hh [G*H,H], b_ih, b_hh [G*H],
    h0, c0 [B,H], lengths [B] or None: CuPy arrays on the current device."""
    rt = runtime.get_runtime()
    xp = rt.xp
    dtype = x.dtype
    B, T, _ = x.shape
    H = w_hh.shape[1]
    lstm = spec.kind == "lstm"
    flag = int(spec.nonlinearity == "relu") if spec.kind == "rnn" else int(spec.reset_after)
    if lengths is None:  # read-only, so one per device and shape serves every call
        lengths = runtime.cached(rt, ("lengths", rt.stream_key()[0], B, T),
                                 lambda: xp.full((B,), T, dtype=np.int64))
    n_sm, smem_limit = device_limits(rt)
    strategy, plan = choose_strategy(spec, B, H, dtype.itemsize, n_sm, smem_limit,
                                     rt.supports_clusters())
    graph_pool = graphs.pool(rt)
    instance = None
    if B and T and strategy == "stepwise":
        # the key holds what a captured loop bakes in: shapes, cell, stream and tunables
        instance = graph_pool.acquire(
            rt, (rt.stream_key(), spec, dtype.str, B, T, H, config.CUDA_THREADS,
                 config.CUDA_WGRAD_CHUNKS),
            lambda: LoopBuffers(xp, spec, dtype, B, T, H, owned=True))
    bufs = instance.buffers if instance else LoopBuffers(xp, spec, dtype, B, T, H)
    bufs.load(x, w_ih, w_hh, b_ih, b_hh, lengths, h0, c0)
    real = dtype.type
    i32 = np.int32
    if B and T and strategy in _KERNEL_STEM:
        kern = rt.kernel(strategy, f"rk_{spec.kind}_{_KERNEL_STEM[strategy]}_fwd", dtype)
        bar = _barrier(rt)
        args = (i32(B), i32(T), i32(H), i32(plan.hb), i32(plan.bc), i32(plan.nbc_fwd),
                i32(config.CUDA_DOT_MIN_CHUNK), i32(config.CUDA_TILE_MIN_DOTS), i32(flag),
                real(spec.forget_bias), bufs.gx, bufs.w_hh, bufs.b_ih, bufs.b_hh, bufs.lengths,
                bufs.h_all, bufs.c_all, bufs.outputs, bufs.acts, bufs.rh, bar)
        if not _launch_persistent(rt, kern, plan, args, plan.smem_fwd, bar, "forward"):
            strategy, plan = "stepwise", None
    if B and T and strategy == "stepwise":
        bufs.add_step_scratch()
        kernels = _stepwise_kernels(rt, spec, dtype, "fwd")  # fetched before any capture

        def body():
            _stepwise_forward(rt, spec, flag, real, bufs, kernels)
        if instance:
            instance.run(rt, graph_pool, "forward", body)
        else:
            body()
    saved = _Saved(strategy=strategy, plan=plan, x=x, w_ih=w_ih, bufs=bufs, flag=flag,
                   instance=instance)
    h_n, c_n = bufs.h_all[T], (bufs.c_all[T] if lstm else None)
    if not instance:  # h_all[T], c_all[T]: backward never reads them
        return bufs.outputs, h_n, c_n, saved
    outputs, h_n, c_n = bufs.outputs.copy(), h_n.copy(), (c_n.copy() if lstm else None)
    rt.record(instance.done)  # owned buffers are the next call's: copies go out
    graph_pool.hold(instance, saved)
    return outputs, h_n, c_n, saved


class _Saved(dict):
    """A forward's record for its backward (a dict that can be weakly referenced, so a graph
    instance is freed when the record is)."""


def backward(spec, saved, d_outputs=None, d_h_n=None, d_c_n=None):
    """See :mod:`rnnkern.backends`. d_outputs [B,T,H], d_h_n, d_c_n [B,H] or None (zeros)."""
    rt = runtime.get_runtime()
    x, w_ih, bufs = saved["x"], saved["w_ih"], saved["bufs"]
    B, T, I = x.shape
    H = bufs.w_hh.shape[1]
    GH = spec.gates * H
    lstm = spec.kind == "lstm"
    if saved["instance"]:  # an earlier backward of this record may still use its buffers
        rt.wait(saved["instance"].done)
    bw = bufs.backward_buffers(d_outputs, d_h_n, d_c_n if lstm else None)
    has_dout = d_outputs is not None
    i32 = np.int32
    flag = saved["flag"]
    strategy = saved["strategy"]
    if B and T and strategy in _KERNEL_STEM:
        plan = saved["plan"]
        kern = rt.kernel(strategy, f"rk_{spec.kind}_{_KERNEL_STEM[strategy]}_bwd", x.dtype)
        bar = _barrier(rt)
        args = (i32(B), i32(T), i32(H), i32(plan.hb), i32(plan.bc), i32(plan.nbc_bwd),
                i32(config.CUDA_DOT_MIN_CHUNK), i32(config.CUDA_TILE_MIN_DOTS), i32(flag),
                bufs.w_hh, bufs.lengths, bufs.acts, bufs.h_all, bufs.c_all, bw.d_out,
                i32(has_dout), bw.dh, bw.dc, bw.d_gx, bw.d_gh, bar)
        if _launch_persistent(rt, kern, plan, args, plan.smem_bwd, bar, "backward"):
            _dw_hh(rt, spec, bufs, bw, 0, T, accumulate=False)
        else:
            strategy = "stepwise"
    if not (B and T):
        bw.dw_hh.fill(0)
    if B and T and strategy == "stepwise":
        bw.add_step_scratch()
        bw.dh_gemm.fill(0)
        kernels = _stepwise_kernels(rt, spec, x.dtype, "bwd")  # fetched before any capture

        def body():
            _stepwise_backward(rt, spec, flag, bufs, bw, has_dout, kernels)
        if saved["instance"]:
            saved["instance"].run(rt, graphs.pool(rt), ("backward", has_dout), body)
        else:
            body()
        bw.dh += bw.dh_gemm
    # the non-recurrent gradients, one GEMM each over all B*T rows
    d_gx2 = bw.d_gx.reshape(B * T, GH)
    d_gh2 = bw.d_gh.reshape(T * B, GH)
    dx = (d_gx2 @ w_ih).reshape(B, T, I)
    grads = dict(w_ih=d_gx2.T @ x.reshape(B * T, I), w_hh=bw.dw_hh,
                 b_ih=d_gx2.sum(axis=0), b_hh=d_gh2.sum(axis=0))
    dh, dc = bw.dh, bw.dc
    if saved["instance"]:
        dh, dc, grads["w_hh"] = dh.copy(), dc.copy(), grads["w_hh"].copy()
        rt.record(saved["instance"].done)
    return dx, dh, (dc if lstm else None), grads


def _dw_hh(rt, spec, bufs, bw, t0, t1, accumulate):
    """bw.dw_hh = (or += with ``accumulate``) the W_hh gradient of steps t0..t1-1:
    d_gh^T h_prev over their (t1-t0)*B rows (GRU reset-before: its n block against rh). Only
    ``rt.matmul``."""
    B, _, H = bufs.shape
    n = (t1 - t0) * B
    d_gh = bw.d_gh[t0:t1].reshape(n, bw.d_gh.shape[2])
    h_prev = bufs.h_all[t0:t1].reshape(n, H)
    if _two_phase(spec):
        rt.matmul(d_gh[:, : 2 * H].T, h_prev, bw.dw_hh[: 2 * H], accumulate=accumulate)
        rt.matmul(d_gh[:, 2 * H:].T, bufs.rh[t0:t1].reshape(n, H), bw.dw_hh[2 * H:],
                  accumulate=accumulate)
    else:
        rt.matmul(d_gh.T, h_prev, bw.dw_hh, accumulate=accumulate)


# ----------------------------------------------------------------------------------------------
# persistent and cluster: one launch per layer and direction


def _barrier(rt):
    """The persistent kernels' barrier words for the current stream: [count, generation, error,
    spare]. The count is back to 0 after every complete barrier, so launches queued in order on
    one stream can share one buffer (it is zeroed again after an error)."""
    return runtime.cached(rt, ("barrier",) + tuple(rt.stream_key()),
                          lambda: rt.xp.zeros(4, dtype=np.uint32))


def _launch_persistent(rt, kern, plan, args, smem, bar, where):
    """Launch a persistent kernel of either team kind; False (nothing launched) when it cannot
    run here and its strategy was not forced, so the caller runs the stepwise path instead. A
    grid team must be resident at once, and its barrier's error flag is checked after the
    launch; a cluster team needs neither (the hardware schedules a cluster's blocks together),
    but the driver may refuse the launch."""
    cluster = plan.team == "cluster"
    try:
        rt.launch(kern, plan.blocks, plan.threads, args, smem, resident=not cluster,
                  cluster=cluster)
    except NotResident:
        if forced_strategy() == ("cluster" if cluster else "persistent"):
            raise
        return False
    if not cluster:
        _check_barrier(bar, where)
    return True


def _check_barrier(bar, where):
    if config.CUDA_CHECK_BARRIER and int(bar[2]) != 0:
        bar.fill(0)
        raise RuntimeError(f"persistent {where} kernel: blocks were not all resident at once "
                           f"(grid barrier timed out; {runtime.versions()}); set "
                           f"rnnkern.config.CUDA_STRATEGY = 'stepwise'")


# ----------------------------------------------------------------------------------------------
# stepwise: per step one cuBLAS GEMM and one fused pointwise kernel (two of each for a GRU with
# reset_after=False)


def _stepwise_kernels(rt, spec, dtype, direction):
    """The stepwise kernels of ``direction`` ("fwd" | "bwd") for this cell, in the order the
    loops take them: one, or two for a GRU with reset_after=False."""
    if _two_phase(spec):
        names = (("rk_gru_fwd_gates_step", "rk_gru_fwd_cand_step") if direction == "fwd"
                 else ("rk_gru_bwd_step", "rk_gru_bwd_reset_step"))
    else:
        names = (f"rk_{spec.kind}_{direction}_step",)
    return [rt.kernel("stepwise", name, dtype) for name in names]


def _stepwise_forward(rt, spec, flag, real, bufs, kernels):
    """The forward time loop over :class:`LoopBuffers`, with :func:`_stepwise_kernels` (only
    ``rt.launch`` and ``rt.matmul``: it may be captured as a graph)."""
    B, T, H = bufs.shape
    i32 = np.int32
    grid, threads = _grid(B * H), config.CUDA_THREADS

    def args(t, gh):
        return (i32(B), i32(T), i32(H), i32(t), i32(flag), real(spec.forget_bias), bufs.gx, gh,
                i32(gh.shape[1]), bufs.b_ih, bufs.b_hh, bufs.lengths, bufs.h_all, bufs.c_all,
                bufs.outputs, bufs.acts, bufs.rh)

    if _two_phase(spec):
        gates, cand = kernels
        w_rz_t, w_n_t = bufs.w_hh[: 2 * H].T, bufs.w_hh[2 * H:].T
        for t in range(T):
            rt.matmul(bufs.h_all[t], w_rz_t, bufs.gh)
            rt.launch(gates, grid, threads, args(t, bufs.gh))
            rt.matmul(bufs.rh[t], w_n_t, bufs.gh_n)
            rt.launch(cand, grid, threads, args(t, bufs.gh_n))
        return
    step, = kernels
    w_t = bufs.w_hh.T
    for t in range(T):
        rt.matmul(bufs.h_all[t], w_t, bufs.gh)
        rt.launch(step, grid, threads, args(t, bufs.gh))


def _stepwise_backward(rt, spec, flag, bufs, bw, has_dout, kernels):
    """The backward time loop: fills bw.d_gx, bw.d_gh and bw.dw_hh, leaves the last step's
    d_gh W_hh in bw.dh_gemm (dL/dh0 = bw.dh + bw.dh_gemm) and dL/dc0 in bw.dc. Only the
    runtime's launch, matmul and side-stream calls: it may be captured as a graph."""
    B, T, H = bufs.shape
    i32 = np.int32
    grid, threads = _grid(B * H), config.CUDA_THREADS

    def args(t, gemm):
        return (i32(B), i32(T), i32(H), i32(t), i32(flag), bufs.lengths, bufs.acts, bufs.h_all,
                bufs.c_all, bw.d_out, i32(has_dout), gemm, bw.dh, bw.dc, bw.d_gx, bw.d_gh)

    # dW_hh of each range of K steps is summed on a side stream as soon as the loop has
    # finished the range, overlapping the loop's remaining steps (the first range it finishes,
    # the last in time, writes dW_hh; the others add to it)
    K = -(-T // max(1, int(config.CUDA_WGRAD_CHUNKS)))

    def range_done(t):
        if t % K == 0:
            with rt.on_side_stream():
                _dw_hh(rt, spec, bufs, bw, t, min(T, t + K), accumulate=t + K < T)

    step = kernels[0]
    if _two_phase(spec):
        reset = kernels[1]
        w_rz, w_n = bufs.w_hh[: 2 * H], bufs.w_hh[2 * H:]
        for t in reversed(range(T)):
            rt.launch(step, grid, threads, args(t, bw.dh_gemm))
            rt.matmul(bw.d_gh[t][:, 2 * H:], w_n, bw.d_rh)
            rt.launch(reset, grid, threads, args(t, bw.d_rh))
            rt.matmul(bw.d_gh[t][:, : 2 * H], w_rz, bw.dh_gemm)
            range_done(t)
    else:
        for t in reversed(range(T)):
            rt.launch(step, grid, threads, args(t, bw.dh_gemm))
            rt.matmul(bw.d_gh[t], bufs.w_hh, bw.dh_gemm)
            range_done(t)
    rt.join_side()
