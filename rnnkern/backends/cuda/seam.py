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
loop and ``dx, dW_ih, dW_hh`` are single GEMMs after the backward loop.

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
from . import runtime
from .plan import choose_strategy, device_limits, forced_strategy
from .runtime import NotResident

_SAVED_PER_UNIT = {"rnn": 1, "lstm": 5, "gru": 4}  # S
# the persistent strategies' kernels are rk_<kind>_<stem>_fwd / _bwd
_KERNEL_STEM = {"persistent": "persist", "cluster": "cluster"}


def _grid(n):
    return max(1, math.ceil(n / config.CUDA_THREADS))


def forward(spec, x, w_ih, w_hh, b_ih, b_hh, h0, c0=None, lengths=None):
    """See :mod:`rnnkern.backends`. x [B,T,I], w_ih [G*H,I], w_hh [G*H,H], b_ih, b_hh [G*H],
    h0, c0 [B,H], lengths [B] or None: CuPy arrays on the current device."""
    rt = runtime.get_runtime()
    xp = rt.xp
    dtype = x.dtype
    B, T, I = x.shape
    H = w_hh.shape[1]
    G = spec.gates
    lstm, two_phase = spec.kind == "lstm", spec.kind == "gru" and not spec.reset_after
    flag = int(spec.nonlinearity == "relu") if spec.kind == "rnn" else int(spec.reset_after)
    if lengths is None:  # read-only, so one per device and shape serves every call
        lengths = runtime.cached(rt, ("lengths", rt.stream_key()[0], B, T),
                                 lambda: xp.full((B,), T, dtype=np.int64))
    gx = (x.reshape(B * T, I) @ w_ih.T).reshape(B, T, G * H)  # hoisted GEMM; b_ih: kernels
    h_all = xp.empty((T + 1, B, H), dtype=dtype)
    h_all[0] = h0
    c_all = xp.empty((T + 1, B, H) if lstm else (1,), dtype=dtype)
    if lstm:
        c_all[0] = c0
    outputs = xp.empty((B, T, H), dtype=dtype)
    acts = xp.empty((T, B, _SAVED_PER_UNIT[spec.kind] * H), dtype=dtype)
    rh = xp.empty((T, B, H) if two_phase else (1,), dtype=dtype)
    n_sm, smem_limit = device_limits(rt)
    strategy, plan = choose_strategy(spec, B, H, dtype.itemsize, n_sm, smem_limit,
                                     rt.supports_clusters())
    real = dtype.type
    i32 = np.int32
    if B and T and strategy in _KERNEL_STEM:
        kern = rt.kernel(strategy, f"rk_{spec.kind}_{_KERNEL_STEM[strategy]}_fwd", dtype)
        bar = _barrier(rt)
        args = (i32(B), i32(T), i32(H), i32(plan.hb), i32(plan.bc), i32(plan.nbc_fwd),
                i32(config.CUDA_DOT_MIN_CHUNK), i32(flag), real(spec.forget_bias), gx, w_hh,
                b_ih, b_hh, lengths, h_all, c_all, outputs, acts, rh, bar)
        if not _launch_persistent(rt, kern, plan, args, plan.smem_fwd, bar, "forward"):
            strategy, plan = "stepwise", None
    if B and T and strategy == "stepwise":
        _stepwise_forward(rt, spec, flag, real, gx, w_hh, b_ih, b_hh, lengths, h_all, c_all,
                          outputs, acts, rh)
    saved = dict(strategy=strategy, plan=plan, x=x, w_ih=w_ih, w_hh=w_hh, lengths=lengths,
                 h_all=h_all, c_all=c_all, acts=acts, rh=rh, flag=flag)
    # h_all[T] and c_all[T] are fresh per call and backward never reads them: safe to hand out
    return outputs, h_all[T], (c_all[T] if lstm else None), saved


def backward(spec, saved, d_outputs=None, d_h_n=None, d_c_n=None):
    """See :mod:`rnnkern.backends`. d_outputs [B,T,H], d_h_n, d_c_n [B,H] or None (zeros)."""
    rt = runtime.get_runtime()
    xp = rt.xp
    x, w_ih, w_hh = saved["x"], saved["w_ih"], saved["w_hh"]
    h_all, c_all, acts, rh = saved["h_all"], saved["c_all"], saved["acts"], saved["rh"]
    dtype = x.dtype
    B, T, I = x.shape
    H = w_hh.shape[1]
    G = spec.gates
    GH = G * H
    lstm, two_phase = spec.kind == "lstm", spec.kind == "gru" and not spec.reset_after

    def state(d):  # a fresh [B,H] buffer the kernels may update in place
        return xp.zeros((B, H), dtype=dtype) if d is None else d.copy()

    dh = state(d_h_n)
    dc = state(d_c_n) if lstm else xp.zeros((1,), dtype=dtype)
    has_dout = d_outputs is not None
    d_out = d_outputs if has_dout else xp.zeros((1,), dtype=dtype)
    d_gx = xp.empty((B, T, GH), dtype=dtype)
    d_gh = xp.empty((T, B, GH), dtype=dtype)
    i32 = np.int32
    flag, lengths = saved["flag"], saved["lengths"]
    strategy = saved["strategy"]
    if B and T and strategy in _KERNEL_STEM:
        plan = saved["plan"]
        kern = rt.kernel(strategy, f"rk_{spec.kind}_{_KERNEL_STEM[strategy]}_bwd", dtype)
        bar = _barrier(rt)
        args = (i32(B), i32(T), i32(H), i32(plan.hb), i32(plan.bc), i32(plan.nbc_bwd),
                i32(config.CUDA_DOT_MIN_CHUNK), i32(flag), w_hh, lengths, acts, h_all, c_all,
                d_out, i32(has_dout), dh, dc, d_gx, d_gh, bar)
        if not _launch_persistent(rt, kern, plan, args, plan.smem_bwd, bar, "backward"):
            strategy = "stepwise"
    if B and T and strategy == "stepwise":
        _stepwise_backward(rt, spec, flag, lengths, w_hh, acts, h_all, c_all, d_out, has_dout,
                           dh, dc, d_gx, d_gh)
    # the non-recurrent gradients, one GEMM each over all B*T rows
    d_gx2 = d_gx.reshape(B * T, GH)
    d_gh2 = d_gh.reshape(T * B, GH)
    h_prev = h_all[:T].reshape(T * B, H)
    dx = (d_gx2 @ w_ih).reshape(B, T, I)
    if two_phase:
        dw_hh = xp.concatenate([d_gh2[:, : 2 * H].T @ h_prev,
                                d_gh2[:, 2 * H:].T @ rh.reshape(T * B, H)], axis=0)
    else:
        dw_hh = d_gh2.T @ h_prev
    grads = dict(w_ih=d_gx2.T @ x.reshape(B * T, I), w_hh=dw_hh,
                 b_ih=d_gx2.sum(axis=0), b_hh=d_gh2.sum(axis=0))
    return dx, dh, (dc if lstm else None), grads


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


def _stepwise_forward(rt, spec, flag, real, gx, w_hh, b_ih, b_hh, lengths, h_all, c_all,
                      outputs, acts, rh):
    xp = rt.xp
    T, B, H = h_all.shape[0] - 1, h_all.shape[1], h_all.shape[2]
    G = spec.gates
    i32 = np.int32
    grid, threads = _grid(B * H), config.CUDA_THREADS

    def args(t, gh):
        return (i32(B), i32(T), i32(H), i32(t), i32(flag), real(spec.forget_bias), gx, gh,
                i32(gh.shape[1]), b_ih, b_hh, lengths, h_all, c_all, outputs, acts, rh)

    if spec.kind == "gru" and not spec.reset_after:
        gates = rt.kernel("stepwise", "rk_gru_fwd_gates_step", gx.dtype)
        cand = rt.kernel("stepwise", "rk_gru_fwd_cand_step", gx.dtype)
        w_rz_t, w_n_t = w_hh[: 2 * H].T, w_hh[2 * H:].T
        gh_rz = xp.empty((B, 2 * H), dtype=gx.dtype)
        gh_n = xp.empty((B, H), dtype=gx.dtype)
        for t in range(T):
            rt.matmul(h_all[t], w_rz_t, gh_rz)
            rt.launch(gates, grid, threads, args(t, gh_rz))
            rt.matmul(rh[t], w_n_t, gh_n)
            rt.launch(cand, grid, threads, args(t, gh_n))
        return
    step = rt.kernel("stepwise", f"rk_{spec.kind}_fwd_step", gx.dtype)
    gh = xp.empty((B, G * H), dtype=gx.dtype)
    w_t = w_hh.T
    for t in range(T):
        rt.matmul(h_all[t], w_t, gh)
        rt.launch(step, grid, threads, args(t, gh))


def _stepwise_backward(rt, spec, flag, lengths, w_hh, acts, h_all, c_all, d_out, has_dout, dh,
                       dc, d_gx, d_gh):
    """Fills d_gx, d_gh and leaves dL/dh0 in dh (and dL/dc0 in dc)."""
    xp = rt.xp
    T, B, H = h_all.shape[0] - 1, h_all.shape[1], h_all.shape[2]
    dtype = dh.dtype
    i32 = np.int32
    grid, threads = _grid(B * H), config.CUDA_THREADS
    dh_gemm = xp.zeros((B, H), dtype=dtype)  # the later step's d_gh W_hh

    def args(t, gemm):
        return (i32(B), i32(T), i32(H), i32(t), i32(flag), lengths, acts, h_all, c_all,
                d_out, i32(has_dout), gemm, dh, dc, d_gx, d_gh)

    step = rt.kernel("stepwise", f"rk_{spec.kind}_bwd_step", dtype)
    if spec.kind == "gru" and not spec.reset_after:
        reset = rt.kernel("stepwise", "rk_gru_bwd_reset_step", dtype)
        d_rh = xp.empty((B, H), dtype=dtype)
        w_rz, w_n = w_hh[: 2 * H], w_hh[2 * H:]
        for t in reversed(range(T)):
            rt.launch(step, grid, threads, args(t, dh_gemm))
            rt.matmul(d_gh[t][:, 2 * H:], w_n, d_rh)
            rt.launch(reset, grid, threads, args(t, d_rh))
            rt.matmul(d_gh[t][:, : 2 * H], w_rz, dh_gemm)
    else:
        for t in reversed(range(T)):
            rt.launch(step, grid, threads, args(t, dh_gemm))
            rt.matmul(d_gh[t], w_hh, dh_gemm)
    dh += dh_gemm
