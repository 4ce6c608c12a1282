"""GPU timing: rnnkern's cuda backend (every strategy) vs torch.nn.LSTM/GRU on cuDNN, float32.

    python benchmarks/bench_gpu.py [--shapes "B,T,I,H,L;..."] [--kinds lstm,gru] [--budget 150]
                                   [--tf32] [--seam] [--max-blocks N] [--no-barrier-check]
                                   [--cupy-matmul] [--max-teams N] [--tile-min N]
                                   [--json out.json]

For each (B,T,I,H,L) and cell it prints forward and forward+backward milliseconds per call for
cuDNN, rnnkern stepwise (its time loop replayed as a CUDA graph), the same loop launched from
Python ("eager"), persistent and cluster (where the device has thread-block clusters), and which
strategy the size rule picks.
Forward means a training forward (activations saved for backward) on both sides.

Method: each implementation runs in the same process; after two warm-up calls (which include
rnnkern's one-off kernel compile) every repeat times ``n`` back-to-back calls between two CUDA
events on the implementation's current stream, with the calls of the different implementations
alternating repeat by repeat; the table gives the median over repeats. ``n`` is chosen so a
repeat lasts about 20 ms. cuDNN's TF32 is off unless ``--tf32`` (rnnkern's float32 GEMMs are full
FP32). rnnkern's persistent kernels read an error flag after each launch (one small host sync per
layer call, ``rnnkern.config.CUDA_CHECK_BARRIER``), which is counted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import rnnkern as rk  # noqa: E402
from rnnkern import config  # noqa: E402
from rnnkern.backends import cuda  # noqa: E402

DEFAULT_SHAPES = [(1, 6, 5, 5, 1), (1, 100, 64, 128, 1), (32, 100, 128, 256, 1),
                  (50, 50, 65, 128, 2), (64, 100, 512, 512, 1), (128, 100, 1024, 1024, 1)]
REPEATS = 7
TARGET_S = 0.02


def _parse_shapes(text):
    return [tuple(int(v) for v in s.split(",")) for s in text.split(";") if s.strip()]


class Timer:
    """Milliseconds per call of ``fn``, timed with CUDA events of one framework."""

    def __init__(self, label, fn, event, sync):
        self.label, self.fn, self.event, self.sync = label, fn, event, sync
        self.samples, self.n = [], 1

    def warm(self):
        for _ in range(2):
            self.fn()
        self.sync()
        t0 = time.perf_counter()
        self.fn()
        self.sync()
        one = max(time.perf_counter() - t0, 1e-6)
        self.n = max(1, min(200, int(TARGET_S / one)))

    def measure(self):
        start, end = self.event(), self.event()
        start.record()
        for _ in range(self.n):
            self.fn()
        end.record()
        end.synchronize()
        self.samples.append(self.elapsed(start, end) / self.n)

    def elapsed(self, start, end):
        raise NotImplementedError

    @property
    def ms(self):
        return statistics.median(self.samples) if self.samples else float("nan")


class CupyTimer(Timer):
    def __init__(self, label, fn):
        import cupy
        super().__init__(label, fn, lambda: cupy.cuda.Event(),
                         lambda: cupy.cuda.Device().synchronize())

    def elapsed(self, start, end):
        import cupy
        return cupy.cuda.get_elapsed_time(start, end)


class TorchTimer(Timer):
    def __init__(self, label, fn):
        import torch
        super().__init__(label, fn, lambda: torch.cuda.Event(enable_timing=True),
                         torch.cuda.synchronize)

    def elapsed(self, start, end):
        return start.elapsed_time(end)


def _rnnkern_fns(kind, B, T, I, H, L, strategy, seam=False, graphs=True):
    import cupy
    cls = rk.LSTM if kind == "lstm" else rk.GRU
    opts = dict(forget_bias=0.0) if kind == "lstm" else {}
    # weights live on the device for the whole run, as a training loop would keep them
    layer = cls(I, H, L, dtype="float32", backend="cuda", seed=0, **opts).to("cuda")
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((B, T, I)).astype(np.float32))
    d_out = cupy.asarray(rng.standard_normal((B, T, H)).astype(np.float32))
    if seam:
        return _seam_fns(layer, x, d_out, strategy, graphs)

    # the timers of the strategies alternate, so each call sets its own
    def fwd():
        config.CUDA_STRATEGY, config.CUDA_GRAPHS = strategy, graphs
        layer(x)

    def fwd_bwd():
        config.CUDA_STRATEGY, config.CUDA_GRAPHS = strategy, graphs
        layer(x)
        layer.backward(d_out)

    return fwd, fwd_bwd


def _seam_fns(layer, x, d_out, strategy, graphs):
    """The backend seam called directly, layer by layer: no input validation, no finite check."""
    import cupy
    spec, L, B, H = layer.spec, layer.num_layers, x.shape[0], layer.hidden_size
    weights = [layer._layer_weights(k, cupy) for k in range(L)]
    h0 = cupy.zeros((B, H), dtype=cupy.float32)
    c0 = h0 if spec.has_cell_state else None

    def fwd():
        config.CUDA_STRATEGY, config.CUDA_GRAPHS = strategy, graphs
        out, saved = x, []
        for w in weights:
            out, _, _, s = cuda.forward(spec, out, *w, h0, c0, None)
            saved.append(s)
        return saved

    def fwd_bwd():
        d = d_out
        for s in reversed(fwd()):
            d = cuda.backward(spec, s, d, None, None)[0]

    return fwd, fwd_bwd


def _torch_fns(kind, B, T, I, H, L):
    import torch
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    mod = cls(I, H, L, batch_first=True).cuda().float()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, T, I, generator=g).cuda()
    d_out = torch.randn(B, T, H, generator=g).cuda()

    def fwd():
        mod(x)

    def fwd_bwd():
        out, _ = mod(x)
        out.backward(d_out)

    return fwd, fwd_bwd


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", type=_parse_shapes, default=DEFAULT_SHAPES,
                    help='"B,T,I,H,L;B,T,I,H,L" (default: the six of issue 5)')
    ap.add_argument("--kinds", default="lstm,gru")
    ap.add_argument("--budget", type=float, default=150.0,
                    help="seconds; shapes not started by then are skipped")
    ap.add_argument("--tf32", action="store_true", help="let cuDNN use TF32 (off by default)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--seam", action="store_true",
                    help="time rnnkern through the backend seam (no layer validation)")
    ap.add_argument("--max-blocks", type=int, default=None,
                    help="cap on persistent blocks (config.CUDA_MAX_BLOCKS; default one per SM)")
    ap.add_argument("--no-barrier-check", action="store_true",
                    help="skip reading the persistent barrier's error flag (saves a sync)")
    ap.add_argument("--cupy-matmul", action="store_true",
                    help="stepwise GEMMs through cupy.matmul instead of straight to cuBLAS")
    ap.add_argument("--tile-min", type=int, default=None,
                    help="persistent/cluster: dots per block from which they go in 4x4 tiles "
                         "(config.CUDA_TILE_MIN_DOTS; 2147483647: never)")
    ap.add_argument("--max-teams", type=int, default=None,
                    help="cap on cluster teams (config.CUDA_MAX_TEAMS; default n_sm / 8)")
    args = ap.parse_args(argv)
    config.CUDA_MAX_TEAMS = args.max_teams
    if args.tile_min is not None:
        config.CUDA_TILE_MIN_DOTS = args.tile_min
    config.CUDA_DIRECT_GEMM = not args.cupy_matmul
    config.CUDA_MAX_BLOCKS = args.max_blocks
    config.CUDA_CHECK_BARRIER = not args.no_barrier_check

    import cupy
    import torch
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"# {gpu}; CuPy {cupy.__version__}; torch {torch.__version__} "
          f"(cuDNN {torch.backends.cudnn.version()}); float32; TF32 in cuDNN: {args.tf32}; "
          f"rnnkern through {'the backend seam' if args.seam else 'the layer API'}; "
          f"persistent max blocks: {args.max_blocks or 'one per SM'}; "
          f"cluster teams at most: {args.max_teams or 'n_sm / 8'}; "
          f"dots in 4x4 tiles from: {config.CUDA_TILE_MIN_DOTS} a block; "
          f"barrier flag read: {not args.no_barrier_check}; stepwise GEMMs: "
          f"{'cupy.matmul' if args.cupy_matmul else 'cuBLAS direct'}")
    print(f"# ms per call, median of {REPEATS} repeats; ratio = cuDNN / best rnnkern "
          f"(> 1: rnnkern faster)")
    print("# stepwise: its time loop replayed as a CUDA graph (the default); eager: the same "
          "loop launched from Python step by step (config.CUDA_GRAPHS = False)")
    head = (f"{'cell':5} {'B,T,I,H,L':>20} {'mode':7} {'cuDNN':>9} {'stepwise':>9} "
            f"{'eager':>9} {'persist':>9} {'cluster':>9} {'rule':>10} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    t_start = time.perf_counter()
    rows = []
    rt = cuda.runtime.get_runtime()
    n_sm, smem = cuda.plan.device_limits(rt)
    clusters = rt.supports_clusters()
    teams = {"persistent": "grid", "cluster": "cluster"}
    for shape in args.shapes:
        B, T, I, H, L = shape
        for kind in args.kinds.split(","):
            if time.perf_counter() - t_start > args.budget:
                print(f"{kind:5} {str(shape):>20} skipped: time budget of {args.budget:.0f} s spent")
                continue
            config.CUDA_STRATEGY = "auto"
            rule = cuda.plan.choose_strategy(rk.CellSpec(kind), B, H, 4, n_sm, smem, clusters)[0]
            timers = {"fwd": [], "fwd+bwd": []}
            tf, tfb = _torch_fns(kind, B, T, I, H, L)
            timers["fwd"].append(TorchTimer("cuDNN", tf))
            timers["fwd+bwd"].append(TorchTimer("cuDNN", tfb))
            for strategy in cuda.plan.STRATEGIES:
                if strategy == "cluster" and not clusters:
                    continue
                if strategy in teams and cuda.plan.persistent_plan(
                        rk.CellSpec(kind), B, H, 4, n_sm, smem, team=teams[strategy]) is None:
                    continue
                f, fb = _rnnkern_fns(kind, B, T, I, H, L, strategy, args.seam)
                timers["fwd"].append(CupyTimer(strategy, f))
                timers["fwd+bwd"].append(CupyTimer(strategy, fb))
                if strategy == "stepwise":
                    f, fb = _rnnkern_fns(kind, B, T, I, H, L, strategy, args.seam, graphs=False)
                    timers["fwd"].append(CupyTimer("eager", f))
                    timers["fwd+bwd"].append(CupyTimer("eager", fb))
            for mode, ts in timers.items():
                for t in ts:
                    t.warm()
                for _ in range(REPEATS):  # alternate implementations repeat by repeat
                    for t in ts:
                        t.measure()
                ms = {t.label: t.ms for t in ts}
                best = min(v for k, v in ms.items() if k not in ("cuDNN", "eager"))
                row = dict(cell=kind, shape=shape, mode=mode, rule=rule, **ms,
                           ratio=ms["cuDNN"] / best)
                rows.append(row)
                print(f"{kind:5} {str(shape):>20} {mode:7} {ms['cuDNN']:9.3f} "
                      f"{ms.get('stepwise', float('nan')):9.3f} "
                      f"{ms.get('eager', float('nan')):9.3f} "
                      f"{ms.get('persistent', float('nan')):9.3f} "
                      f"{ms.get('cluster', float('nan')):9.3f} {rule:>10} "
                      f"{row['ratio']:6.2f}", flush=True)
            config.CUDA_STRATEGY, config.CUDA_GRAPHS = "auto", True
    print(f"# total {time.perf_counter() - t_start:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
