"""Bits shared by the example scripts: TF1-style initialisation and the common arguments.

The scripts are installed with the package as ``rnnkern.examples`` (setup: pyproject.toml maps
this folder to that subpackage), so they import each other and this module by that name,
whether they run as ``python examples/<script>.py``, ``python -m rnnkern.examples.<script>`` or
through ``python -m rnnkern labs``.
"""
from __future__ import annotations

import numpy as np


def tf1_glorot_init(layer, seed):
    """Initialise a recurrent layer as TF1's ``BasicLSTMCell``/``BasicRNNCell`` do.

    TF1 keeps one kernel ``[I+H, G*H]`` per layer, drawn from glorot_uniform
    (``U(+-sqrt(6 / (fan_in + fan_out)))``, fan_in = I+H, fan_out = G*H), and zero biases. The
    distribution is the same for every element, so drawing PyTorch's two blocks
    ``weight_ih [G*H, I]`` and ``weight_hh [G*H, H]`` with that bound is the same init.
    """
    rng = np.random.default_rng(seed)
    shapes = layer.param_shapes()
    params = {}
    for k in range(layer.num_layers):
        gh, n_in = shapes[f"weight_ih_l{k}"]
        H = layer.hidden_size
        bound = np.sqrt(6.0 / (n_in + H + gh))
        params[f"weight_ih_l{k}"] = rng.uniform(-bound, bound, (gh, n_in))
        params[f"weight_hh_l{k}"] = rng.uniform(-bound, bound, (gh, H))
        params[f"bias_ih_l{k}"] = np.zeros(gh)
        params[f"bias_hh_l{k}"] = np.zeros(gh)
    layer.load_params(params)
    return layer


def add_common_args(parser, *, seed=0, every=None):
    """--seed, --backend, --quiet (and --every N when the lab prints per-step lines)."""
    parser.add_argument("--seed", type=int, default=seed, help="random seed (default %(default)s)")
    parser.add_argument("--backend", default="auto",
                        help="rnnkern backend: auto (default), numba, cpp, numpy, cuda")
    parser.add_argument("--blas-threads", type=int, default=1, metavar="N",
                        help="OpenBLAS threads (default 1: the labs' GEMMs are tiny; 0 = as is)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the final outcome, not the per-step lines")
    if every is not None:
        parser.add_argument("--every", type=int, default=every, metavar="N",
                            help="print the per-step line every N steps (default %(default)s)")
    return parser


def parse(parser, argv):
    """Parse the arguments and apply --blas-threads (see rnnkern.labs.limit_blas_threads)."""
    args = parser.parse_args(argv)
    if getattr(args, "blas_threads", 0):
        from rnnkern.labs import limit_blas_threads
        limit_blas_threads(args.blas_threads)
    return args


def should_print(args, step, last):
    """Per-step printing rule: never with --quiet; else every N steps and the last one."""
    if args.quiet:
        return False
    every = max(1, getattr(args, "every", 1))
    return step % every == 0 or step == last
