"""The CUDA backend without a GPU: its kernels run on host threads (``cuda_emu``), its host code
(time loops, GEMMs, buffers, strategy choice) runs on NumPy, and everything is compared with the
reference. The same sweep runs on a real GPU in ``test_cuda.py``.
"""
import numpy as np
import pytest

import rnnkern as rk
from rnnkern import backends, reference
from rnnkern.backends import cuda

import cuda_cases
import cuda_emu

if cuda_emu.compiler() is None:
    pytest.skip("g++ not found: cannot build the host emulation of the CUDA kernels",
                allow_module_level=True)

DTYPES = [np.float64, np.float32]


@pytest.fixture(scope="module")
def emu_runtime(tmp_path_factory):
    return cuda_emu.EmuRuntime(n_sm=3, smem_limit=48 * 1024,
                               outdir=str(tmp_path_factory.mktemp("cuda_emu")))


@pytest.fixture(params=[2, 1000], ids=["split-dots", "serial-dots"])
def emulated(emu_runtime, monkeypatch, request):
    """The cuda backend on the emulated runtime, small blocks, 3 'SMs' and batch chunks of 2,
    so multi-block barriers, several units per block and batch chunking all run; dot products
    split over threads (parts of >= 2 terms) or not at all."""
    monkeypatch.setattr(cuda, "_runtime", emu_runtime)
    monkeypatch.setattr(cuda, "available", lambda: (True, "emulated on host threads"))
    monkeypatch.setattr(cuda, "config", cuda.Config(threads=32, max_batch_chunk=2,
                                                    dot_min_chunk=request.param))
    monkeypatch.delenv(cuda.ENV_STRATEGY, raising=False)
    yield emu_runtime
    cuda.set_strategy(None)


@pytest.mark.parametrize("strategy", cuda.STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("shape", cuda_cases.SHAPES.values(), ids=cuda_cases.SHAPES.keys())
@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_kernels_match_reference(emulated, spec, shape, dtype, strategy):
    cuda.set_strategy(strategy)
    n_before = len(emulated.launches)
    out, _ = cuda_cases.check_against_reference(cuda, spec, shape, dtype)
    assert out[3]["strategy"] == strategy
    names = {n for n, *_ in emulated.launches[n_before:]}
    B, T = shape[0], shape[1]
    if B == 0 or T == 0:  # nothing to run: no kernel at all
        assert len(emulated.launches) == n_before
    elif strategy != "stepwise":  # one launch forward, one backward
        stem = {"persistent": "persist", "cluster": "cluster"}[strategy]
        assert names == {f"rk_{spec.kind}_{stem}_fwd", f"rk_{spec.kind}_{stem}_bwd"}
        assert len(emulated.launches) - n_before == 2
    else:
        assert all("_step" in n for n in names) and len(emulated.launches) - n_before >= 2 * T


@pytest.mark.parametrize("strategy", cuda.STRATEGIES)
def test_persistent_grid_has_several_blocks_and_chunks(emulated, strategy):
    """H=7 on 3 'SMs' -> 3 blocks of up to 3 units; B=5 in chunks of 2."""
    cuda.set_strategy(strategy)
    cuda_cases.check_against_reference(cuda, cuda_cases.SPECS["gru-before"],
                                       (5, 4, 3, 7, [4, 2, 0, 3, 1], True), np.float64)
    if strategy == "persistent":
        assert [(g, b) for _, g, b, _ in emulated.launches[-2:]] == [(3, 32), (3, 32)]


@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_cluster_teams_split_the_batch(emulated, spec, monkeypatch):
    """24 'SMs' -> 3 cluster teams of 8 blocks; B=7 -> rows 3+3+1; H=11 -> 2 units per rank and
    the last ranks with fewer or none; batch chunks of 2 inside a team; 2 warps a block."""
    monkeypatch.setattr(cuda.config, "n_sm", 3 * cuda.CLUSTER_SIZE)
    monkeypatch.setattr(cuda.config, "threads", 64)  # two warps share the per-warp dots
    cuda.set_strategy("cluster")
    n_before = len(emulated.launches)
    out, _ = cuda_cases.check_against_reference(
        cuda, spec, (7, 5, 3, 11, [5, 0, 3, 5, 1, 4, 2], True), np.float64)
    plan = out[3]["plan"]
    assert (plan.team, plan.bc, plan.hb, plan.blocks) == ("cluster", 3, 2, 3 * cuda.CLUSTER_SIZE)
    assert [g for _, g, _, _ in emulated.launches[n_before:]] == [plan.blocks] * 2


@pytest.mark.parametrize("strategy", ["persistent", "cluster"])
@pytest.mark.parametrize("spec", [cuda_cases.SPECS["lstm-fb1"], cuda_cases.SPECS["gru-before"]],
                         ids=["lstm", "gru-before"])
def test_staging_passes_of_many_elements(emulated, spec, strategy):
    """H=40: the backward stages 2 rows of G*H = 120-160 d_gh columns with 32 threads, so every
    one of the four loads in flight per thread of rk_stage_rows carries data."""
    cuda.set_strategy(strategy)
    cuda_cases.check_against_reference(cuda, spec, (3, 4, 5, 40, [4, 2, 3], True), np.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("spec", [cuda_cases.SPECS["lstm-fb1"], cuda_cases.SPECS["gru-before"],
                                  cuda_cases.SPECS["rnn-tanh"]], ids=["lstm", "gru-before", "rnn"])
def test_lane_groups_of_every_size(emulated, spec, dtype, monkeypatch):
    """B=1, H=40 on 64 'SMs' with 64 threads: one unit a block, so the dots run on lane groups
    of 2 up to 32 (the forward's few dots of 40 terms, the backward's one of G*40)."""
    monkeypatch.setattr(cuda, "config", cuda.Config(threads=64, dot_min_chunk=2, n_sm=64))
    cuda.set_strategy("persistent")
    cuda_cases.check_against_reference(cuda, spec, (1, 3, 2, 40, None, True), dtype)


def test_refused_cluster_launch_falls_back_to_stepwise(emulated, monkeypatch):
    spec, shape = cuda_cases.SPECS["lstm-fb0"], cuda_cases.SHAPES["odd-lengths"]
    monkeypatch.setattr(emulated, "refuse_clusters", True)
    out, _ = cuda_cases.check_against_reference(cuda, spec, shape, np.float64)
    assert out[3]["strategy"] == "stepwise"
    cuda.set_strategy("cluster")  # forced: the error surfaces instead
    with pytest.raises(cuda.NotResident, match="refused"):
        cuda_cases.check_against_reference(cuda, spec, shape, np.float64)


def test_emulator_catches_writes_past_shared_memory(emulated, monkeypatch):
    """A host plan that gives a kernel less shared memory than its layout uses is caught."""
    import dataclasses
    real_plan = cuda.persistent_plan
    monkeypatch.setattr(cuda, "persistent_plan", lambda *a, **k: dataclasses.replace(
        real_plan(*a, **k), smem_fwd=real_plan(*a, **k).smem_fwd - 8))
    cuda.set_strategy("cluster")
    with pytest.raises(AssertionError, match="wrote past its"):
        cuda_cases.check_against_reference(cuda, cuda_cases.SPECS["rnn-tanh"],
                                           cuda_cases.SHAPES["B5-odd"], np.float64)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_multilayer_layer_through_cuda_backend(emulated, kind):
    """The layer API with backend='cuda': 2 layers, lengths, initial state, every gradient."""
    cls = getattr(rk, kind)
    x = np.random.default_rng(1).standard_normal((3, 5, 4))
    lengths = np.array([5, 2, 0])
    layers = {b: cls(4, 6, 2, dtype="float64", seed=3, backend=b) for b in ("numpy", "cuda")}
    h0 = np.random.default_rng(2).standard_normal((2, 3, 6))
    state0 = (h0, -h0) if kind == "LSTM" else h0
    results = {}
    for b, layer in layers.items():
        out, state = layer(x, state0, lengths=lengths)
        dx, dstate = layer.backward(np.ones_like(out), state)
        results[b] = (out, state, dx, dstate, layer.grads)
    ref, got = results["numpy"], results["cuda"]
    for r, g in zip(ref[:4], got[:4]):
        for rr, gg in zip(r if isinstance(r, tuple) else (r,), g if isinstance(g, tuple) else (g,)):
            np.testing.assert_allclose(gg, rr, rtol=1e-10, atol=1e-12)
    for k in ref[4]:
        np.testing.assert_allclose(got[4][k], ref[4][k], rtol=1e-10, atol=1e-12, err_msg=k)


@pytest.mark.parametrize("strategy", cuda.STRATEGIES)
def test_returned_arrays_belong_to_the_caller(emulated, strategy):
    """Later calls leave returned arrays alone, and scribbling on them leaves backward alone."""
    cuda.set_strategy(strategy)
    spec, shape = cuda_cases.SPECS["lstm-fb1"], cuda_cases.SHAPES["odd-lengths"]
    fwd, bwd = cuda_cases.make_case(spec, shape, np.float64)
    out1, h1, c1, saved1 = cuda.forward(spec, *fwd)
    keep = [a.copy() for a in (out1, h1, c1)]
    saved2 = cuda.forward(spec, *cuda_cases.make_case(spec, shape, np.float64, seed=9)[0])[3]
    cuda.backward(spec, saved2, *bwd)
    for a, b in zip((out1, h1, c1), keep):
        np.testing.assert_array_equal(a, b)
    for a in (out1, h1, c1):
        a[...] = np.nan
    ref = reference.backward(spec, reference.forward(spec, *fwd)[3], *bwd)
    got = cuda.backward(spec, saved1, *bwd)
    for r, g in zip(ref[:3], got[:3]):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


def test_falls_back_to_stepwise_when_blocks_cannot_be_resident(emulated, monkeypatch):
    spec, shape = cuda_cases.SPECS["gru-after"], cuda_cases.SHAPES["B5-odd"]
    monkeypatch.setattr(emulated, "supports_clusters", lambda: False)  # a pre-Hopper device
    monkeypatch.setattr(emulated, "max_resident", 1)  # H=9 on 3 'SMs' needs 3 blocks
    out, _ = cuda_cases.check_against_reference(cuda, spec, shape, np.float64)
    assert out[3]["strategy"] == "stepwise"
    cuda.set_strategy("persistent")  # forced: the error surfaces instead
    with pytest.raises(cuda.NotResident):
        cuda_cases.check_against_reference(cuda, spec, shape, np.float64)


# ----------------------------------------------------------------------------------------------
# the size rule and the override (pure Python)

H200 = dict(n_sm=132, smem_limit=227 * 1024)
BENCH_SHAPES = {(1, 6, 5, 5, 1): "persistent", (1, 100, 64, 128, 1): "persistent",
                (32, 100, 128, 256, 1): "persistent", (50, 50, 65, 128, 2): "persistent",
                (64, 100, 512, 512, 1): "stepwise", (128, 100, 1024, 1024, 1): "stepwise"}


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv(cuda.ENV_STRATEGY, raising=False)
    cuda.set_strategy(None)
    yield
    cuda.set_strategy(None)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("shape,expected", BENCH_SHAPES.items(), ids=str)
def test_size_rule_on_the_benchmark_shapes(no_override, kind, shape, expected):
    B, T, I, H, L = shape
    strategy, plan = cuda.choose_strategy(rk.CellSpec(kind), B, H, 4, **H200)
    assert strategy == expected
    if plan is not None:
        assert plan.team == "grid" and plan.bc == B
        assert plan.blocks <= H200["n_sm"] and plan.hb * plan.blocks >= H
        assert max(plan.smem_fwd, plan.smem_bwd) <= H200["smem_limit"]
    # a device with clusters runs the small shapes as cluster teams
    strategy, plan = cuda.choose_strategy(rk.CellSpec(kind), B, H, 4, **H200, clusters=True)
    assert strategy == {"persistent": "cluster"}.get(expected, expected)
    if plan is not None:
        teams = plan.blocks // cuda.CLUSTER_SIZE
        assert plan.blocks % cuda.CLUSTER_SIZE == 0 and teams <= H200["n_sm"] // 8
        assert plan.hb * cuda.CLUSTER_SIZE >= H and plan.bc * teams >= B > plan.bc * (teams - 1)
        assert max(plan.smem_fwd, plan.smem_bwd) <= H200["smem_limit"]


def test_cluster_plan_halves_the_teams_when_blocks_fill_an_sm(no_override, monkeypatch):
    lstm, gru = rk.CellSpec("lstm"), rk.CellSpec("gru")
    big = cuda.persistent_plan(lstm, 32, 256, 4, team="cluster", **H200)  # 131 KB a block
    small = cuda.persistent_plan(gru, 50, 128, 4, team="cluster", **H200)  # 29 KB a block
    assert (big.blocks // cuda.CLUSTER_SIZE, big.bc) == (8, 4)
    assert max(big.smem_fwd, big.smem_bwd) > H200["smem_limit"] // 2
    assert (small.blocks // cuda.CLUSTER_SIZE, small.bc) == (13, 4)  # 16 teams of 4 rows -> 13
    monkeypatch.setattr(cuda.config, "max_teams", 16)  # an explicit cap is taken as it is
    assert cuda.persistent_plan(lstm, 32, 256, 4, team="cluster", **H200).bc == 2
    # the cut-off: cluster up to B*H = 32768, then stepwise
    assert cuda.choose_strategy(lstm, 256, 128, 4, **H200, clusters=True)[0] == "cluster"
    assert cuda.choose_strategy(lstm, 257, 128, 4, **H200, clusters=True)[0] == "stepwise"
    assert cuda.choose_strategy(lstm, 256, 128, 4, **H200)[0] == "stepwise"  # grid team: 8192


def test_plan_shrinks_batch_chunk_then_gives_up():
    spec = rk.CellSpec("lstm")
    roomy = cuda.persistent_plan(spec, 64, 128, 4, 132, 227 * 1024)
    tight = cuda.persistent_plan(spec, 64, 128, 4, 132, 12 * 1024)
    assert roomy.nbc_fwd == roomy.nbc_bwd == 64
    assert 1 <= tight.nbc_bwd < tight.nbc_fwd < 64  # backward stages G*H per batch row
    assert max(tight.smem_fwd, tight.smem_bwd) <= 12 * 1024
    assert cuda.persistent_plan(spec, 1, 1024, 8, 4, 48 * 1024) is None  # W_hh too big


def test_override_by_function_and_environment(no_override, monkeypatch):
    spec = rk.CellSpec("lstm")
    assert cuda.choose_strategy(spec, 1, 5, 4, **H200)[0] == "persistent"
    cuda.set_strategy("stepwise")
    assert cuda.choose_strategy(spec, 1, 5, 4, **H200)[0] == "stepwise"
    cuda.set_strategy("auto")
    monkeypatch.setenv(cuda.ENV_STRATEGY, "persistent")
    assert cuda.choose_strategy(spec, 128, 1024, 4, **H200)[0] == "persistent"
    with pytest.raises(ValueError, match="persistent strategy cannot hold"):
        cuda.choose_strategy(spec, 1, 4096, 8, n_sm=4, smem_limit=48 * 1024)
    monkeypatch.setenv(cuda.ENV_STRATEGY, "cluster")
    with pytest.raises(ValueError, match="compute capability 9.0"):
        cuda.choose_strategy(spec, 1, 5, 4, **H200)
    assert cuda.choose_strategy(spec, 1, 5, 4, **H200, clusters=True)[0] == "cluster"
    with pytest.raises(ValueError, match="cluster strategy cannot hold"):
        cuda.choose_strategy(spec, 1, 4096, 8, n_sm=4, smem_limit=48 * 1024, clusters=True)
    monkeypatch.setenv(cuda.ENV_STRATEGY, "fast")
    with pytest.raises(ValueError, match=cuda.ENV_STRATEGY):
        cuda.choose_strategy(spec, 1, 5, 4, **H200)
    with pytest.raises(ValueError, match="strategy must be one of"):
        cuda.set_strategy("fast")


# ----------------------------------------------------------------------------------------------
# the stepwise loops' direct cuBLAS GEMMs: operand layouts, checked against a column-major GEMM
# that reads memory the way cuBLAS does (pointer + leading dimension; the emulated runtime's
# matmul runs every stepwise GEMM through it too)


@pytest.mark.parametrize("B,H", [(3, 5), (1, 5), (3, 1), (1, 1)])
def test_gemm_args_cover_the_stepwise_operands(B, H):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * H, H))
    h = rng.standard_normal((B, H))
    d_gh = rng.standard_normal((2, B, 3 * H))
    cases = [(h, w.T), (h, w[: 2 * H].T), (h, w[2 * H:].T),          # forward: h W^T
             (d_gh[1], w), (d_gh[1][:, 2 * H:], w[2 * H:]),           # backward: d_gh W
             (d_gh[1][:, : 2 * H], w[: 2 * H])]
    for a, b in cases:
        out = np.full((a.shape[0], b.shape[1]), np.nan)
        spec = cuda.gemm_args(a, b, out)
        assert spec not in (None, "empty"), (a.strides, b.strides)
        op_b, op_a, m, n, k, ld_b, ld_a, ld_c = spec
        cuda_emu.colmajor_gemm(op_b, op_a, m, n, k, b, ld_b, a, ld_a, out, ld_c)
        np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)


def test_gemm_args_refuse_layouts_cublas_cannot_read():
    a, b = np.ones((4, 6)), np.ones((3, 5))
    assert cuda.gemm_args(a[:, ::2], b, np.empty((4, 5))) is None    # no unit stride
    assert cuda.gemm_args(a[:, :3], b, np.empty((5, 4)).T) is None   # out not C-contiguous
    assert cuda.gemm_args(a[:, :0], b[:0], np.empty((4, 5))) == "empty"
    with pytest.raises(ValueError, match="gemm: shapes"):
        cuda.gemm_args(a, b, np.empty((4, 5)))


def test_unavailable_without_cupy_names_the_reason():
    try:
        import cupy  # noqa: F401
    except ImportError:
        ok, reason = cuda.available()
        assert ok is False and "CuPy" in reason
        assert backends.available_backends()["cuda"] == (ok, reason)
        with pytest.raises(backends.BackendUnavailable, match="CuPy"):
            backends.get_backend("cuda")
    else:
        pytest.skip("CuPy is installed here")


def test_probe_reports_device_errors_and_cupy_warnings(monkeypatch):
    """A CuPy that warns and finds no driver: (False, reason with both), never an exception."""
    import sys
    import types
    import warnings

    def no_driver():
        warnings.warn("CUDA path could not be detected")
        raise RuntimeError("cudaErrorInsufficientDriver")

    runtime = types.SimpleNamespace(getDeviceCount=no_driver, runtimeGetVersion=lambda: 12040,
                                    driverGetVersion=lambda: 0)
    fake = types.SimpleNamespace(__version__="0.fake", cuda=types.SimpleNamespace(runtime=runtime))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cuda, "_available", None)
    ok, reason = cuda.available()
    assert ok is False
    assert "cudaErrorInsufficientDriver" in reason and "CuPy 0.fake" in reason
    assert "CUDA runtime 12.4" in reason and "could not be detected" in reason
