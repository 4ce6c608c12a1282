"""The CUDA backend on a real GPU (CuPy arrays): every kernel of both strategies against the
NumPy reference, the layer API on CuPy input, streams. Skips without CuPy or a device; the same
sweep runs on the CPU through the kernel emulator in ``test_cuda_emulated.py``.
"""
import numpy as np
import pytest

import rnnkern as rk
from rnnkern import backends, config
from rnnkern.backends import cuda

import cuda_cases

pytestmark = pytest.mark.gpu

_ok, _reason = cuda.available()
if not _ok:
    pytest.skip(f"cuda backend unavailable: {_reason}", allow_module_level=True)

import cupy  # noqa: E402  (available() succeeded, so CuPy imports)

DTYPES = [np.float64, np.float32]
STRATEGIES = cuda.plan.STRATEGIES


def tunables(monkeypatch, **values):
    """Set ``rnnkern.config`` names for one test."""
    for name, value in values.items():
        monkeypatch.setattr(config, name, value)


@pytest.fixture(autouse=True)
def size_rule(monkeypatch):
    """Every test starts from the size rule, whatever RNNKERN_CUDA_STRATEGY says."""
    tunables(monkeypatch, CUDA_STRATEGY="auto")


@pytest.fixture
def strategy(request, monkeypatch):
    tunables(monkeypatch, CUDA_STRATEGY=request.param)
    return request.param


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("shape", cuda_cases.SHAPES.values(), ids=cuda_cases.SHAPES.keys())
@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_kernels_match_reference(spec, shape, dtype, strategy):
    out, back = cuda_cases.check_against_reference(cuda, spec, shape, dtype, cupy.asarray)
    assert out[3]["strategy"] == strategy
    assert isinstance(out[0], cupy.ndarray) and isinstance(back[0], cupy.ndarray)


@pytest.mark.parametrize("min_chunk", [2, 1000], ids=["split-dots", "serial-dots"])
@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_several_blocks_and_batch_chunks(spec, strategy, min_chunk, monkeypatch):
    """Few 'SMs' and small batch chunks: several units per block, barrier across blocks;
    dot products split over threads or not."""
    tunables(monkeypatch, CUDA_THREADS=64, CUDA_MAX_BATCH_CHUNK=3, CUDA_N_SM=4,
             CUDA_DOT_MIN_CHUNK=min_chunk)
    cuda_cases.check_against_reference(cuda, spec, (7, 9, 5, 33, [9, 0, 4, 9, 1, 8, 2], True),
                                       np.float64, cupy.asarray)


@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_cluster_teams_split_the_batch(spec, monkeypatch):
    """Three cluster teams (rows 3+3+1), ranks with 2, 1 or no units, batch chunks of 2."""
    if not cuda.runtime.get_runtime().supports_clusters():
        pytest.skip("no thread-block clusters on this device (compute capability < 9.0)")
    cluster = cuda.runtime.CLUSTER_SIZE
    tunables(monkeypatch, CUDA_THREADS=64, CUDA_MAX_BATCH_CHUNK=2, CUDA_N_SM=3 * cluster,
             CUDA_STRATEGY="cluster")
    out, _ = cuda_cases.check_against_reference(
        cuda, spec, (7, 5, 3, 11, [5, 0, 3, 5, 1, 4, 2], True), np.float64, cupy.asarray)
    assert (out[3]["plan"].bc, out[3]["plan"].blocks) == (3, 3 * cluster)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("spec", [cuda_cases.SPECS["lstm-fb1"], cuda_cases.SPECS["gru-before"],
                                  cuda_cases.SPECS["rnn-tanh"]], ids=["lstm", "gru-before", "rnn"])
def test_lane_groups_of_every_size(spec, dtype, monkeypatch):
    """B=1, H=40 on 64 'SMs' with 64 threads: one unit a block, so the dots run on lane groups
    of 2 up to 32 (the forward's few dots of 40 terms, the backward's one of G*40)."""
    tunables(monkeypatch, CUDA_THREADS=64, CUDA_DOT_MIN_CHUNK=2, CUDA_N_SM=64,
             CUDA_STRATEGY="persistent")
    cuda_cases.check_against_reference(cuda, spec, (1, 3, 2, 40, None, True), dtype,
                                       cupy.asarray)


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
@pytest.mark.parametrize("spec", [cuda_cases.SPECS["lstm-fb1"], cuda_cases.SPECS["gru-before"]],
                         ids=["lstm", "gru-before"])
def test_larger_sizes_float32(spec, strategy):
    """Sizes where float32 rounding and the real work split matter (H=128, B=32, T=20);
    weights U(-1/sqrt(H), 1/sqrt(H)) as the layers initialise them."""
    cuda_cases.check_against_reference(cuda, spec, (32, 20, 16, 128, None, True), np.float32,
                                       cupy.asarray, wscale=128 ** -0.5)


@pytest.mark.parametrize("strategy", ["persistent", "cluster"], indirect=True)
@pytest.mark.parametrize("tile_min", [1, 40], ids=["all-tiled", "some-tiled"])
@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_dots_in_tiles(spec, strategy, tile_min, monkeypatch):
    """4 x 4 tiles of dot products per thread (CUDA_TILE_MIN_DOTS), ragged at both edges: few
    'SMs' and 5-row batch chunks, float64; then a larger float32 layer with every block tiled."""
    if strategy == "cluster" and not cuda.runtime.get_runtime().supports_clusters():
        pytest.skip("no thread-block clusters on this device")
    tunables(monkeypatch, CUDA_TILE_MIN_DOTS=tile_min, CUDA_MAX_BATCH_CHUNK=5, CUDA_N_SM=4)
    cuda_cases.check_against_reference(cuda, spec, (7, 6, 3, 13, [6, 0, 2, 6, 1, 3, 6], True),
                                       np.float64, cupy.asarray)
    tunables(monkeypatch, CUDA_TILE_MIN_DOTS=1, CUDA_MAX_BATCH_CHUNK=64, CUDA_N_SM=None)
    cuda_cases.check_against_reference(cuda, spec, (64, 12, 16, 128, None, True), np.float32,
                                       cupy.asarray, wscale=128 ** -0.5)


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
def test_runs_on_the_current_stream(strategy):
    spec, shape = cuda_cases.SPECS["lstm-fb0"], cuda_cases.SHAPES["odd-lengths"]
    with cupy.cuda.Stream(non_blocking=True) as stream:
        cuda_cases.check_against_reference(cuda, spec, shape, np.float64, cupy.asarray)
        stream.synchronize()


@pytest.fixture
def graph_pool(monkeypatch):
    """The stepwise strategy forced, its CUDA graphs on, no shape seen yet."""
    tunables(monkeypatch, CUDA_STRATEGY="stepwise", CUDA_GRAPHS=True, CUDA_DIRECT_GEMM=True,
             CUDA_GRAPH_MIN_CALLS=2)
    pool = cuda.graphs.pool(cuda.runtime.get_runtime())
    pool.clear()
    return pool


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_stepwise_graphs_replay_with_new_inputs(spec, dtype, graph_pool):
    """Captured once (cuBLAS GEMMs and the pointwise kernels), replayed with new inputs and
    weights; two records alive at once; one record backpropagated twice."""
    before = graph_pool.captures
    instances = cuda_cases.check_graph_reuse(cuda, spec, cuda_cases.SHAPES["odd-lengths"], dtype,
                                             cupy.asarray)
    assert graph_pool.broken is None, graph_pool.broken
    assert instances[0] is None and instances[2] is instances[1]
    assert graph_pool.captures - before == 4


@pytest.mark.parametrize("spec", [cuda_cases.SPECS["lstm-fb1"], cuda_cases.SPECS["gru-before"]],
                         ids=["lstm", "gru-before"])
def test_stepwise_graphs_larger_float32_on_a_side_stream(spec, graph_pool):
    with cupy.cuda.Stream(non_blocking=True) as stream:
        cuda_cases.check_graph_reuse(cuda, spec, (32, 20, 16, 128, None, True), np.float32,
                                     cupy.asarray, wscale=128 ** -0.5)
        stream.synchronize()
    assert graph_pool.broken is None, graph_pool.broken


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_layer_auto_picks_cuda_for_cupy_input(kind, monkeypatch):
    monkeypatch.delenv("RNNKERN_BACKEND", raising=False)
    cls = getattr(rk, kind)
    x = np.random.default_rng(1).standard_normal((3, 5, 4))
    lengths = np.array([5, 2, 0])
    cpu, gpu = (cls(4, 6, 2, dtype="float64", seed=3, backend=b) for b in ("numpy", "auto"))
    gpu.to("cuda")                        # device input needs the parameters there too
    out_c, _ = cpu(x, lengths=lengths)
    out_g, _ = gpu(cupy.asarray(x), lengths=lengths)
    assert backends.resolve("auto", cupy.asarray(x)) is cuda
    assert isinstance(out_g, cupy.ndarray)
    np.testing.assert_allclose(out_g.get(), out_c, rtol=1e-10, atol=1e-12)
    dx_c, _ = cpu.backward(np.ones_like(out_c))
    dx_g, _ = gpu.backward(cupy.ones_like(out_g))
    np.testing.assert_allclose(dx_g.get(), dx_c, rtol=1e-10, atol=1e-12)
    for k in cpu.grads:
        np.testing.assert_allclose(cupy.asnumpy(gpu.grads[k]), cpu.grads[k], rtol=1e-10,
                                   atol=1e-12, err_msg=k)


I64 = np.iinfo(np.int64)


@pytest.mark.parametrize("strategy", STRATEGIES, indirect=True)
@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_lengths_outside_0_T_act_as_the_nearest_end(spec, strategy):
    """Device lengths reach the kernels unchecked (config.CHECK_FINITE_ON_DEVICE): below 0 they
    must run as 0 and above T as T, touching nothing outside the buffers."""
    cuda_cases.check_against_reference(cuda, spec, (4, 5, 3, 7, [5, 0, 5, 0], True), np.float64,
                                       cupy.asarray, backend_lengths=[6, -1, I64.max, I64.min])
    cupy.cuda.Device().synchronize()  # a fault would surface here


def test_device_lengths_are_used_in_place():
    """The seam keeps the device lengths it is given: no copy, no host round trip."""
    spec, shape = cuda_cases.SPECS["gru-after"], cuda_cases.SHAPES["odd-lengths"]
    fwd, _ = cuda_cases.make_case(spec, shape, np.float64)
    dev = [None if a is None else cupy.asarray(a) for a in fwd]
    assert cuda.forward(spec, *dev)[3]["bufs"].lengths is dev[-1]


def test_device_input_is_scanned_for_nan_only_when_asked(monkeypatch):
    """No device-to-host read per call by default (NaN propagates, as in PyTorch); with
    config.CHECK_FINITE_ON_DEVICE the layer names the bad argument."""
    from rnnkern import config
    lstm = rk.LSTM(3, 4, dtype="float64", seed=0, backend="cuda").to("cuda")
    x = cupy.zeros((2, 3, 3))
    x[0, 1, 2] = cupy.nan
    out, _ = lstm(x)
    assert bool(cupy.isnan(out[0, 1:]).all()) and not bool(cupy.isnan(out[1]).any())
    with pytest.raises(ValueError, match="initial_state"):  # NumPy state: scanned on the host
        lstm(cupy.zeros((2, 3, 3)), (np.full((1, 2, 4), np.nan), np.zeros((1, 2, 4))))
    monkeypatch.setattr(config, "CHECK_FINITE_ON_DEVICE", True)
    with pytest.raises(ValueError, match="x contains NaN"):
        lstm(x)
    with pytest.raises(ValueError, match="initial_state"):
        lstm(cupy.zeros((2, 3, 3)), (cupy.full((1, 2, 4), cupy.inf), cupy.zeros((1, 2, 4))))

