"""Launch planning for the CUDA backend: which time-loop strategy runs a layer, and the launch
shape of the persistent kernels. Pure Python (no CuPy), so the rule is tested anywhere.

Size rule (:func:`choose_strategy`), for ``H <= rnnkern.config.CUDA_PERSISTENT_MAX_H`` (256):
``cluster`` where the device has clusters, its plan fits on chip and
``B*H <= CUDA_CLUSTER_MAX_BH`` (32768), else ``persistent`` where its plan fits and
``B*H <= CUDA_PERSISTENT_MAX_BH`` (8192); otherwise ``stepwise``. Measured on an H200 with
``benchmarks/gpu_check.sh`` (benchmarks/README.md): cluster beat stepwise at every shape up to
B*H = 32768 (256,50,65,128: 2.3 vs 7.0 ms fwd+bwd), and persistent lost to stepwise above 8192
(64,100,128,256: 14.7 vs 11.3 ms). Force a strategy with ``rnnkern.config.CUDA_STRATEGY``
(default from the environment variable ``RNNKERN_CUDA_STRATEGY``): ``"stepwise"`` |
``"persistent"`` | ``"cluster"`` | ``"auto"`` (the rule).

Shape legend: B batch, H hidden, G gates (RNN 1, LSTM 4, GRU 3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ... import config
from .runtime import CLUSTER_SIZE

STRATEGIES = ("stepwise", "persistent", "cluster")


def forced_strategy():
    """The strategy ``rnnkern.config.CUDA_STRATEGY`` forces, or None for ``"auto"`` (the size
    rule). Read at every call, so assigning the config takes effect at the next layer call."""
    value = config.CUDA_STRATEGY
    if value in (None, "", "auto"):  # None or an empty RNNKERN_CUDA_STRATEGY: as "auto"
        return None
    if value not in STRATEGIES:
        raise ValueError(f"rnnkern.config.CUDA_STRATEGY must be one of "
                         f"{('auto',) + STRATEGIES}, got {value!r}")
    return value


def device_limits(rt):
    """``(n_sm, smem_limit)`` the plans use: the device's, unless ``CUDA_N_SM`` /
    ``CUDA_SMEM_LIMIT`` say otherwise."""
    n_sm, smem = rt.props()
    return config.CUDA_N_SM or n_sm, config.CUDA_SMEM_LIMIT or smem


@dataclass(frozen=True)
class PersistentPlan:
    """Launch shape of the persistent kernels (either team kind) for one layer.

    team  "grid" (strategy persistent) or "cluster";  blocks  grid size (grid team: <= SMs, one
    resident block per SM; cluster: teams * CLUSTER_SIZE);  hb  hidden units per block;
    bc  batch rows per team (grid: B);  nbc_fwd, nbc_bwd  batch rows staged in shared memory at
    once by each kernel;  smem_fwd, smem_bwd  their dynamic shared memory, bytes per block
    """

    team: str
    blocks: int
    threads: int
    hb: int
    bc: int
    nbc_fwd: int
    nbc_bwd: int
    smem_fwd: int
    smem_bwd: int


def persistent_plan(spec, B, H, itemsize, n_sm, smem_limit, threads=None, max_batch_chunk=None,
                    team="grid"):
    """The :class:`PersistentPlan` for these sizes, or None when W_hh does not fit on chip.

    ``team="grid"``: units are spread over as many blocks as there are SMs (``hb = ceil(H /
    n_sm)``, or fewer blocks with ``CUDA_MAX_BLOCKS``), every block sees the whole batch.
    ``team="cluster"``: units over the CLUSTER_SIZE blocks of a cluster, the batch over
    ``min(B, n_sm // CLUSTER_SIZE)`` clusters, or half as many when a block needs more than half
    of ``smem_limit`` (see below; ``CUDA_MAX_TEAMS`` overrides). Each kernel's batch chunk
    (at most ``CUDA_MAX_BATCH_CHUNK`` rows) halves until its shared memory (persistent.cuh's
    layouts) fits ``smem_limit``. ``threads``: per block (None: ``CUDA_THREADS``).
    """
    if team not in ("grid", "cluster"):
        raise ValueError(f"team must be 'grid' or 'cluster', got {team!r}")
    threads = threads or config.CUDA_THREADS
    max_batch_chunk = max_batch_chunk or config.CUDA_MAX_BATCH_CHUNK
    G = spec.gates
    ldw, ldc = H | 1, (G * H) | 1  # persistent.cuh's odd row strides (ldh = ldw, ldg = ldc)

    def plan(hb, bc, blocks):
        layouts = (lambda nbc: (G * hb * ldw + nbc * ldw + nbc * G * hb) * itemsize,  # fwd
                   lambda nbc: (hb * ldc + nbc * ldc + nbc * hb) * itemsize)          # bwd
        chunks = []  # (fwd, bwd)
        for size in layouts:
            nbc = max(1, min(bc, max_batch_chunk))
            while size(nbc) > smem_limit and nbc > 1:
                nbc = (nbc + 1) // 2
            if size(nbc) > smem_limit:
                return None
            chunks.append(nbc)
        return PersistentPlan(team, blocks, threads, hb, bc, chunks[0], chunks[1],
                              layouts[0](chunks[0]), layouts[1](chunks[1]))

    if team == "grid":
        hb = math.ceil(H / max(1, min(n_sm, config.CUDA_MAX_BLOCKS or n_sm, H)))
        return plan(hb, B, math.ceil(H / hb))
    hb = math.ceil(H / CLUSTER_SIZE)
    max_teams = config.CUDA_MAX_TEAMS
    most = max(1, min(B, n_sm // CLUSTER_SIZE, max_teams or B))
    best = None
    # Blocks that need over half an SM's shared memory run one per SM, and then not all
    # n_sm / CLUSTER_SIZE clusters find their SMs free together: half as many teams, each with
    # twice the rows, ran faster (H200, LSTM B,T,I,H = 32,100,128,256: fwd+bwd 2.58 ms with 8
    # teams, 4.09 ms with 16).
    for teams in (most,) if max_teams else (most, max(1, most // 2)):
        bc = max(1, math.ceil(B / teams))
        best = plan(hb, bc, math.ceil(B / bc) * CLUSTER_SIZE if B else CLUSTER_SIZE)
        if best is None or max(best.smem_fwd, best.smem_bwd) <= smem_limit // 2:
            break
    return best


def choose_strategy(spec, B, H, itemsize, n_sm, smem_limit, clusters=False):
    """``(strategy, plan)`` by the size rule or ``CUDA_STRATEGY``; plan is None for
    ``stepwise``. ``clusters``: the device has thread-block clusters (compute capability 9.0+).
    A forced strategy that cannot run at these sizes raises ValueError instead of falling back."""
    forced = forced_strategy()
    if forced == "stepwise":
        return "stepwise", None
    if forced == "cluster" and not clusters:
        raise ValueError("the cluster strategy needs thread-block clusters (compute capability "
                         "9.0 or later); use persistent or stepwise")
    candidates = [forced] if forced else (["cluster"] if clusters else []) + ["persistent"]
    max_bh = {"cluster": config.CUDA_CLUSTER_MAX_BH, "persistent": config.CUDA_PERSISTENT_MAX_BH}
    for strategy in candidates:
        team = "cluster" if strategy == "cluster" else "grid"
        plan = persistent_plan(spec, B, H, itemsize, n_sm, smem_limit, team=team)
        if forced:
            if plan is None:
                raise ValueError(f"the {strategy} strategy cannot hold W_hh of H={H} on chip "
                                 f"({n_sm} SMs x {smem_limit} bytes); use stepwise")
            return strategy, plan
        if plan is not None and H <= config.CUDA_PERSISTENT_MAX_H and B * H <= max_bh[strategy]:
            return strategy, plan
    return "stepwise", None
