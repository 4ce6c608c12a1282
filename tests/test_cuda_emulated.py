"""The CUDA backend without a GPU: its kernels run on host threads (``cuda_emu``), its host code
(time loops, GEMMs, buffers, strategy choice) runs on NumPy, and everything is compared with the
reference. The same sweep runs on a real GPU in ``test_cuda.py``.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import rnnkern as rk
from rnnkern import backends, config, reference
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
    split over threads (parts of >= 2 terms) or not at all; the size rule unless a test forces
    a strategy."""
    monkeypatch.setattr(cuda.runtime, "_runtime", emu_runtime)
    monkeypatch.setattr(cuda, "available", lambda: (True, "emulated on host threads"))
    tunables(monkeypatch, CUDA_THREADS=32, CUDA_MAX_BATCH_CHUNK=2,
             CUDA_DOT_MIN_CHUNK=request.param, CUDA_STRATEGY="auto")
    cuda.graphs.pool(emu_runtime).clear()  # every test starts with no shape seen
    return emu_runtime


def tunables(monkeypatch, **values):
    """Set ``rnnkern.config`` names for one test."""
    for name, value in values.items():
        monkeypatch.setattr(config, name, value)


@pytest.mark.parametrize("strategy", cuda.plan.STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("shape", cuda_cases.SHAPES.values(), ids=cuda_cases.SHAPES.keys())
@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_kernels_match_reference(emulated, spec, shape, dtype, strategy, monkeypatch):
    tunables(monkeypatch, CUDA_STRATEGY=strategy)
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


@pytest.mark.parametrize("strategy", cuda.plan.STRATEGIES)
def test_persistent_grid_has_several_blocks_and_chunks(emulated, strategy, monkeypatch):
    """H=7 on 3 'SMs' -> 3 blocks of up to 3 units; B=5 in chunks of 2."""
    tunables(monkeypatch, CUDA_STRATEGY=strategy)
    cuda_cases.check_against_reference(cuda, cuda_cases.SPECS["gru-before"],
                                       (5, 4, 3, 7, [4, 2, 0, 3, 1], True), np.float64)
    if strategy == "persistent":
        assert [(g, b) for _, g, b, _ in emulated.launches[-2:]] == [(3, 32), (3, 32)]


@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_cluster_teams_split_the_batch(emulated, spec, monkeypatch):
    """24 'SMs' -> 3 cluster teams of 8 blocks; B=7 -> rows 3+3+1; H=11 -> 2 units per rank and
    the last ranks with fewer or none; batch chunks of 2 inside a team; 2 warps a block."""
    cluster = cuda.runtime.CLUSTER_SIZE
    # two warps share the per-warp dots
    tunables(monkeypatch, CUDA_N_SM=3 * cluster, CUDA_THREADS=64, CUDA_STRATEGY="cluster")
    n_before = len(emulated.launches)
    out, _ = cuda_cases.check_against_reference(
        cuda, spec, (7, 5, 3, 11, [5, 0, 3, 5, 1, 4, 2], True), np.float64)
    plan = out[3]["plan"]
    assert (plan.team, plan.bc, plan.hb, plan.blocks) == ("cluster", 3, 2, 3 * cluster)
    assert [g for _, g, _, _ in emulated.launches[n_before:]] == [plan.blocks] * 2


@pytest.mark.parametrize("strategy", ["persistent", "cluster"])
@pytest.mark.parametrize("spec", [cuda_cases.SPECS["lstm-fb1"], cuda_cases.SPECS["gru-before"]],
                         ids=["lstm", "gru-before"])
def test_staging_passes_of_many_elements(emulated, spec, strategy, monkeypatch):
    """H=40: the backward stages 2 rows of G*H = 120-160 d_gh columns with 32 threads, so every
    one of the four loads in flight per thread of rk_stage_rows carries data."""
    tunables(monkeypatch, CUDA_STRATEGY=strategy)
    cuda_cases.check_against_reference(cuda, spec, (3, 4, 5, 40, [4, 2, 3], True), np.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("spec", [cuda_cases.SPECS["lstm-fb1"], cuda_cases.SPECS["gru-before"],
                                  cuda_cases.SPECS["rnn-tanh"]], ids=["lstm", "gru-before", "rnn"])
def test_lane_groups_of_every_size(emulated, spec, dtype, monkeypatch):
    """B=1, H=40 on 64 'SMs' with 64 threads: one unit a block, so the dots run on lane groups
    of 2 up to 32 (the forward's few dots of 40 terms, the backward's one of G*40)."""
    tunables(monkeypatch, CUDA_THREADS=64, CUDA_DOT_MIN_CHUNK=2, CUDA_N_SM=64,
             CUDA_STRATEGY="persistent")
    cuda_cases.check_against_reference(cuda, spec, (1, 3, 2, 40, None, True), dtype)


def test_refused_cluster_launch_falls_back_to_stepwise(emulated, monkeypatch):
    spec, shape = cuda_cases.SPECS["lstm-fb0"], cuda_cases.SHAPES["odd-lengths"]
    monkeypatch.setattr(emulated, "refuse_clusters", True)
    out, _ = cuda_cases.check_against_reference(cuda, spec, shape, np.float64)
    assert out[3]["strategy"] == "stepwise"
    tunables(monkeypatch, CUDA_STRATEGY="cluster")  # forced: the error surfaces instead
    with pytest.raises(cuda.runtime.NotResident, match="refused"):
        cuda_cases.check_against_reference(cuda, spec, shape, np.float64)


def test_emulator_catches_writes_past_shared_memory(emulated, monkeypatch):
    """A host plan that gives a kernel less shared memory than its layout uses is caught."""
    import dataclasses
    real_plan = cuda.plan.persistent_plan
    monkeypatch.setattr(cuda.plan, "persistent_plan", lambda *a, **k: dataclasses.replace(
        real_plan(*a, **k), smem_fwd=real_plan(*a, **k).smem_fwd - 8))
    tunables(monkeypatch, CUDA_STRATEGY="cluster")
    with pytest.raises(AssertionError, match="wrote past its"):
        cuda_cases.check_against_reference(cuda, cuda_cases.SPECS["rnn-tanh"],
                                           cuda_cases.SHAPES["B5-odd"], np.float64)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_multilayer_layer_through_cuda_backend(emulated, kind, bidirectional, monkeypatch):
    """The layer API with backend='cuda': 2 layers, one or two directions, lengths, initial
    state, every gradient; and infer in runs of 2-3 steps."""
    cls = getattr(rk, kind)
    x = np.random.default_rng(1).standard_normal((3, 5, 4))
    lengths = np.array([5, 2, 0])
    layers = {b: cls(4, 6, 2, dtype="float64", seed=3, backend=b, bidirectional=bidirectional)
              for b in ("numpy", "cuda")}
    D = 2 if bidirectional else 1
    h0 = np.random.default_rng(2).standard_normal((2 * D, 3, 6))
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
    monkeypatch.setattr(config, "INFER_CHUNK_BYTES", 2 * 3 * 7 * 6 * 8)   # runs of 2-3 steps
    out, state = layers["cuda"].infer(x, state0, lengths)
    for r, g in zip((ref[0],) + (ref[1] if kind == "LSTM" else (ref[1],)),
                    (out,) + (state if kind == "LSTM" else (state,))):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("strategy", cuda.plan.STRATEGIES)
def test_returned_arrays_belong_to_the_caller(emulated, strategy, monkeypatch):
    """Later calls leave returned arrays alone, and scribbling on them leaves backward alone."""
    tunables(monkeypatch, CUDA_STRATEGY=strategy)
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


I64 = np.iinfo(np.int64)


@pytest.mark.parametrize("strategy", cuda.plan.STRATEGIES)
@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_lengths_outside_0_T_act_as_the_nearest_end(emulated, spec, strategy, monkeypatch):
    """Device lengths reach the kernels unchecked (config.CHECK_FINITE_ON_DEVICE): below 0 they
    must run as 0 and above T as T, touching nothing outside the buffers."""
    tunables(monkeypatch, CUDA_STRATEGY=strategy)
    cuda_cases.check_against_reference(cuda, spec, (4, 5, 3, 7, [5, 0, 5, 0], True), np.float64,
                                       backend_lengths=[6, -1, I64.max, I64.min])


def test_lengths_are_used_in_place(emulated):
    """The seam keeps the lengths array it is given (no copy, no host round trip) and, for
    lengths=None, one cached all-T array per device and shape."""
    spec, shape = cuda_cases.SPECS["gru-after"], cuda_cases.SHAPES["odd-lengths"]
    fwd, _ = cuda_cases.make_case(spec, shape, np.float64)
    assert cuda.forward(spec, *fwd)[3]["bufs"].lengths is fwd[-1]
    first, second = (cuda.forward(spec, *fwd[:-1], None)[3]["bufs"].lengths for _ in range(2))
    assert first is second and first.tolist() == [shape[1]] * shape[0]


def test_falls_back_to_stepwise_when_blocks_cannot_be_resident(emulated, monkeypatch):
    spec, shape = cuda_cases.SPECS["gru-after"], cuda_cases.SHAPES["B5-odd"]
    monkeypatch.setattr(emulated, "supports_clusters", lambda: False)  # a pre-Hopper device
    monkeypatch.setattr(emulated, "max_resident", 1)  # H=9 on 3 'SMs' needs 3 blocks
    out, _ = cuda_cases.check_against_reference(cuda, spec, shape, np.float64)
    assert out[3]["strategy"] == "stepwise"
    tunables(monkeypatch, CUDA_STRATEGY="persistent")  # forced: the error surfaces instead
    with pytest.raises(cuda.runtime.NotResident):
        cuda_cases.check_against_reference(cuda, spec, shape, np.float64)


@pytest.mark.parametrize("tile_min", [1, 20], ids=["all-tiled", "some-tiled"])
@pytest.mark.parametrize("strategy", ["persistent", "cluster"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(7, 4, 3, 9, [4, 0, 2, 4, 1, 3, 4], True),
                                   (5, 3, 2, 13, None, False), (1, 2, 2, 1, None, True)],
                         ids=["B7-H9", "B5-H13", "B1-H1"])
@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_dots_in_tiles(emulated, spec, shape, dtype, strategy, tile_min, monkeypatch):
    """Blocks with at least CUDA_TILE_MIN_DOTS dot products in a step form them in 4 x 4 tiles
    per thread: ragged tiles at both edges (5-row batch chunks, 3 or 5 units a block), every
    dot product of the step (forward, GRU candidate, backward, GRU reset)."""
    tunables(monkeypatch, CUDA_STRATEGY=strategy, CUDA_TILE_MIN_DOTS=tile_min,
             CUDA_MAX_BATCH_CHUNK=5)
    cuda_cases.check_against_reference(cuda, spec, shape, dtype)


# ----------------------------------------------------------------------------------------------
# the stepwise time loop as a CUDA graph (rnnkern/backends/cuda/graphs.py)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("shape", ["odd-lengths", "B5-odd", "T1-B1-H1"])
@pytest.mark.parametrize("spec", cuda_cases.SPECS.values(), ids=cuda_cases.SPECS.keys())
def test_stepwise_graphs_replay_with_new_inputs(emulated, spec, shape, dtype, monkeypatch):
    tunables(monkeypatch, CUDA_STRATEGY="stepwise")
    pool = cuda.graphs.pool(emulated)
    captures = pool.captures
    instances = cuda_cases.check_graph_reuse(cuda, spec, cuda_cases.SHAPES[shape], dtype)
    assert instances[0] is None                       # the first call of a shape: eager
    assert all(i is not None for i in instances[1:])
    assert instances[2] is instances[1]               # reused once the record was gone
    assert instances[4] is not instances[3]           # two records alive: two instances
    assert len({id(i) for i in instances[1:]}) == 2
    # one forward graph per instance, one backward graph (with d_outputs) per instance
    assert pool.captures - captures == 4
    assert emulated.replays > 0


def test_a_replayed_call_launches_nothing_from_python(emulated, monkeypatch):
    """Once captured, a call's time loop is one graph replay: no per-step launch or GEMM."""
    tunables(monkeypatch, CUDA_STRATEGY="stepwise")
    spec, shape = cuda_cases.SPECS["lstm-fb1"], (3, 7, 4, 5, None, True)
    for seed in range(2):
        cuda_cases.check_against_reference(cuda, spec, shape, np.float64, seed=seed)
    n_launches, n_replays = len(emulated.launches), emulated.replays
    cuda_cases.check_against_reference(cuda, spec, shape, np.float64, seed=2)
    assert len(emulated.launches) == n_launches
    assert emulated.replays == n_replays + 2          # forward and backward


@pytest.mark.parametrize("chunks,ranges", [(1, 1), (3, 3), (100, 7)])
@pytest.mark.parametrize("spec", [cuda_cases.SPECS["lstm-fb0"], cuda_cases.SPECS["gru-before"]],
                         ids=["lstm", "gru-before"])
def test_dw_hh_summed_by_step_ranges_on_the_side_stream(emulated, spec, chunks, ranges,
                                                         monkeypatch):
    """T=7 steps in CUDA_WGRAD_CHUNKS ranges (of ceil(7 / chunks) steps), each range's dW_hh
    GEMM queued on the side stream once the backward loop has left it; eager and replayed."""
    tunables(monkeypatch, CUDA_STRATEGY="stepwise", CUDA_WGRAD_CHUNKS=chunks)
    shape = (3, 7, 4, 5, [7, 2, 5], True)
    before = emulated.side_blocks
    cuda_cases.check_against_reference(cuda, spec, shape, np.float64, seed=0)   # eager
    assert emulated.side_blocks - before == ranges
    for seed in (1, 2):                                                          # graphs
        cuda_cases.check_against_reference(cuda, spec, shape, np.float64, seed=seed)


def test_graphs_off_runs_every_call_eagerly(emulated, monkeypatch):
    tunables(monkeypatch, CUDA_STRATEGY="stepwise", CUDA_GRAPHS=False)
    captures = cuda.graphs.pool(emulated).captures
    instances = cuda_cases.check_graph_reuse(cuda, cuda_cases.SPECS["gru-before"],
                                             cuda_cases.SHAPES["odd-lengths"], np.float32)
    assert instances == [None] * len(instances)
    assert cuda.graphs.pool(emulated).captures == captures


def test_a_refused_capture_warns_once_and_runs_eagerly(emulated, monkeypatch):
    tunables(monkeypatch, CUDA_STRATEGY="stepwise")
    monkeypatch.setattr(emulated, "refuse_capture", True)
    pool = cuda.graphs.pool(emulated)
    monkeypatch.setattr(pool, "broken", None)
    captures = pool.captures
    spec, shape = cuda_cases.SPECS["rnn-relu"], cuda_cases.SHAPES["odd-lengths"]
    with pytest.warns(RuntimeWarning, match="could not capture") as caught:
        for seed in range(4):
            cuda_cases.check_against_reference(cuda, spec, shape, np.float64, seed=seed)
    assert len(caught) == 1 and "refused (emulated)" in pool.broken
    assert pool.captures == captures


def test_the_pool_keeps_at_most_its_idle_instances(emulated, monkeypatch):
    tunables(monkeypatch, CUDA_STRATEGY="stepwise", CUDA_GRAPH_POOL=2, CUDA_GRAPH_MIN_CALLS=1)
    spec = cuda_cases.SPECS["rnn-tanh"]
    for T in range(1, 6):
        cuda_cases.check_against_reference(cuda, spec, (2, T, 3, 4, None, False), np.float64)
    pool = cuda.graphs.pool(emulated)
    assert [key[4] for key in pool.idle] == [4, 5]  # the latest two T
    cuda.graphs.clear()
    assert not pool.idle


def test_layers_train_through_graphs(emulated, monkeypatch):
    """A 2-layer bidirectional LSTM's forward and backward, called again and again with new
    inputs as a training loop does, equals the numpy backend's each time."""
    tunables(monkeypatch, CUDA_STRATEGY="stepwise")
    captures = cuda.graphs.pool(emulated).captures
    kw = dict(num_layers=2, bidirectional=True, dtype="float64")
    ref, dev = (rk.LSTM(3, 4, backend=b, seed=1, **kw) for b in ("numpy", "cuda"))
    rng = np.random.default_rng(0)
    for _ in range(4):
        x = rng.standard_normal((5, 6, 3))
        lengths = np.array([6, 2, 0, 5, 6])
        d = rng.standard_normal((5, 6, 8))
        want, got = ref(x, lengths=lengths), dev(x, lengths=lengths)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dev.backward(d)[0], ref.backward(d)[0], rtol=1e-10, atol=1e-12)
        for name in ref.grads:
            np.testing.assert_allclose(dev.grads[name], ref.grads[name], rtol=1e-10, atol=1e-12)
    # the 4 layer-directions share one shape key and are alive at once: 4 instances, each
    # captured once forward and once backward, then replayed (the layer drops its last record
    # before the next forward, so no fifth instance is made)
    assert cuda.graphs.pool(emulated).captures - captures == 8


# ----------------------------------------------------------------------------------------------
# the size rule and the override (pure Python)

H200 = dict(n_sm=132, smem_limit=227 * 1024)
BENCH_SHAPES = {(1, 6, 5, 5, 1): "persistent", (1, 100, 64, 128, 1): "persistent",
                (32, 100, 128, 256, 1): "persistent", (50, 50, 65, 128, 2): "persistent",
                (64, 100, 512, 512, 1): "stepwise", (128, 100, 1024, 1024, 1): "stepwise"}


@pytest.fixture
def no_override(monkeypatch):
    tunables(monkeypatch, CUDA_STRATEGY="auto")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("shape,expected", BENCH_SHAPES.items(), ids=str)
def test_size_rule_on_the_benchmark_shapes(no_override, kind, shape, expected):
    B, T, I, H, L = shape
    strategy, plan = cuda.plan.choose_strategy(rk.CellSpec(kind), B, H, 4, **H200)
    assert strategy == expected
    if plan is not None:
        assert plan.team == "grid" and plan.bc == B
        assert plan.blocks <= H200["n_sm"] and plan.hb * plan.blocks >= H
        assert max(plan.smem_fwd, plan.smem_bwd) <= H200["smem_limit"]
    # a device with clusters runs the small shapes as cluster teams
    strategy, plan = cuda.plan.choose_strategy(rk.CellSpec(kind), B, H, 4, **H200,
                                               clusters=True)
    assert strategy == {"persistent": "cluster"}.get(expected, expected)
    if plan is not None:
        cluster = cuda.runtime.CLUSTER_SIZE
        teams = plan.blocks // cluster
        assert plan.blocks % cluster == 0 and teams <= H200["n_sm"] // 8
        assert plan.hb * cluster >= H and plan.bc * teams >= B > plan.bc * (teams - 1)
        assert max(plan.smem_fwd, plan.smem_bwd) <= H200["smem_limit"]


def test_cluster_plan_halves_the_teams_when_blocks_fill_an_sm(no_override, monkeypatch):
    lstm, gru = rk.CellSpec("lstm"), rk.CellSpec("gru")
    plan, choose, cluster = cuda.plan.persistent_plan, cuda.plan.choose_strategy, \
        cuda.runtime.CLUSTER_SIZE
    big = plan(lstm, 32, 256, 4, team="cluster", **H200)  # 131 KB a block
    small = plan(gru, 50, 128, 4, team="cluster", **H200)  # 29 KB a block
    assert (big.blocks // cluster, big.bc) == (8, 4)
    assert max(big.smem_fwd, big.smem_bwd) > H200["smem_limit"] // 2
    assert (small.blocks // cluster, small.bc) == (13, 4)  # 16 teams of 4 rows -> 13
    tunables(monkeypatch, CUDA_MAX_TEAMS=16)  # an explicit cap is taken as it is
    assert plan(lstm, 32, 256, 4, team="cluster", **H200).bc == 2
    # the cut-off: cluster up to B*H = 32768, then stepwise
    assert choose(lstm, 256, 128, 4, **H200, clusters=True)[0] == "cluster"
    assert choose(lstm, 257, 128, 4, **H200, clusters=True)[0] == "stepwise"
    assert choose(lstm, 256, 128, 4, **H200)[0] == "stepwise"  # grid team: 8192


def test_plan_shrinks_batch_chunk_then_gives_up():
    spec, plan = rk.CellSpec("lstm"), cuda.plan.persistent_plan
    roomy = plan(spec, 64, 128, 4, 132, 227 * 1024)
    tight = plan(spec, 64, 128, 4, 132, 12 * 1024)
    assert roomy.nbc_fwd == roomy.nbc_bwd == 64
    assert 1 <= tight.nbc_bwd < tight.nbc_fwd < 64  # backward stages G*H per batch row
    assert max(tight.smem_fwd, tight.smem_bwd) <= 12 * 1024
    assert plan(spec, 1, 1024, 8, 4, 48 * 1024) is None  # W_hh too big


def test_strategy_forced_by_config(no_override, monkeypatch):
    spec, choose = rk.CellSpec("lstm"), cuda.plan.choose_strategy
    assert choose(spec, 1, 5, 4, **H200)[0] == "persistent"
    tunables(monkeypatch, CUDA_STRATEGY="stepwise")
    assert choose(spec, 1, 5, 4, **H200)[0] == "stepwise"
    tunables(monkeypatch, CUDA_STRATEGY="persistent")
    assert choose(spec, 128, 1024, 4, **H200)[0] == "persistent"
    with pytest.raises(ValueError, match="persistent strategy cannot hold"):
        choose(spec, 1, 4096, 8, n_sm=4, smem_limit=48 * 1024)
    tunables(monkeypatch, CUDA_STRATEGY="cluster")
    with pytest.raises(ValueError, match="compute capability 9.0"):
        choose(spec, 1, 5, 4, **H200)
    assert choose(spec, 1, 5, 4, **H200, clusters=True)[0] == "cluster"
    with pytest.raises(ValueError, match="cluster strategy cannot hold"):
        choose(spec, 1, 4096, 8, n_sm=4, smem_limit=48 * 1024, clusters=True)
    tunables(monkeypatch, CUDA_STRATEGY="fast")
    with pytest.raises(ValueError, match=r"rnnkern\.config\.CUDA_STRATEGY must be one of "
                                         r"\('auto', 'stepwise', 'persistent', 'cluster'\), "
                                         r"got 'fast'"):
        choose(spec, 1, 5, 4, **H200)


def test_bad_strategy_is_named_by_a_layer_call(emulated, monkeypatch):
    tunables(monkeypatch, CUDA_STRATEGY="Stepwise")
    with pytest.raises(ValueError, match=r"rnnkern\.config\.CUDA_STRATEGY .* got 'Stepwise'"):
        rk.LSTM(2, 3, dtype="float64", backend="cuda")(np.zeros((1, 2, 2)))


def test_importing_the_backend_leaves_cupy_alone():
    code = "import sys, rnnkern.backends.cuda; print('cupy' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (res.returncode, res.stdout.strip()) == (0, "False"), res.stderr[-2000:]


@pytest.mark.parametrize("value,forced", [("cluster", "cluster"), ("auto", None), ("", None)])
def test_environment_sets_the_default_strategy(value, forced):
    code = "from rnnkern.backends.cuda import plan; print(plan.forced_strategy())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, RNNKERN_CUDA_STRATEGY=value))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(forced)


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
        spec = cuda.runtime.gemm_args(a, b, out)
        assert spec not in (None, "empty"), (a.strides, b.strides)
        op_b, op_a, m, n, k, ld_b, ld_a, ld_c = spec
        cuda_emu.colmajor_gemm(op_b, op_a, m, n, k, b, ld_b, a, ld_a, out, ld_c)
        np.testing.assert_allclose(out, a @ b, rtol=1e-12, atol=1e-12)


def test_gemm_args_refuse_layouts_cublas_cannot_read():
    a, b, gemm_args = np.ones((4, 6)), np.ones((3, 5)), cuda.runtime.gemm_args
    assert gemm_args(a[:, ::2], b, np.empty((4, 5))) is None    # no unit stride
    assert gemm_args(a[:, :3], b, np.empty((5, 4)).T) is None   # out not C-contiguous
    assert gemm_args(a[:, :0], b[:0], np.empty((4, 5))) == "empty"
    with pytest.raises(ValueError, match="gemm: shapes"):
        gemm_args(a, b, np.empty((4, 5)))


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
    monkeypatch.setattr(cuda.runtime, "_available", None)
    ok, reason = cuda.available()
    assert ok is False
    assert "cudaErrorInsufficientDriver" in reason and "CuPy 0.fake" in reason
    assert "CUDA runtime 12.4" in reason and "could not be detected" in reason
