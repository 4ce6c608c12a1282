"""``python -m rnnkern export --checkpoint X --onnx model.onnx``: a checkpoint of
``python -m rnnkern train`` (either level) as an ONNX model.

The model is rebuilt from the checkpoint's config as ``sample`` rebuilds it
(examples/char_rnn.py ``load_model``); the checkpoint's vocabulary, level and config go into
the ONNX model's metadata (``rnnkern.checkpoint``, JSON), so ids can be mapped back to text.
Bad input (a missing or unreadable checkpoint, an --onnx that is a directory, a bad --opset,
onnx not installed) stops with one line ``rnnkern export: error: ...`` and exit status 2.
"""
from __future__ import annotations

import json
import os

from ..labs import CliParser, load_example, run_cli
from . import signature


def parser(prog):
    p = CliParser(prog=prog, description="Export a checkpoint of `python -m rnnkern train` "
                                         "to ONNX.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint written by train (either level)")
    p.add_argument("--onnx", required=True, metavar="PATH", help="ONNX file to write")
    p.add_argument("--with-lengths", action="store_true",
                   help="add the input 'lengths' (int64 [batch])")
    p.add_argument("--with-state", action="store_true",
                   help="add the recurrent state as inputs and outputs (step-by-step use)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    return p


def export_checkpoint(args):
    """Load the checkpoint, export it, say what was written; returns the ModelProto."""
    char_rnn = load_example("char_rnn")
    char_rnn.check_checkpoint(args.checkpoint)
    if os.path.isdir(args.onnx):
        raise IsADirectoryError(f"--onnx {args.onnx}: is a directory, not a file")
    try:
        from ._deps import require
        require()
    except ImportError as exc:                     # one line, as every other bad setup here
        raise ValueError(str(exc)) from exc
    from .exporter import build_model, save
    model, _, user = char_rnn.load_model(args.checkpoint)
    model.eval()
    proto = build_model(model, with_lengths=args.with_lengths, with_state=args.with_state,
                        opset=args.opset)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "rnnkern.checkpoint", json.dumps(user)
    save(proto, args.onnx)
    ins = signature.input_names(model, with_lengths=args.with_lengths,
                                with_state=args.with_state)
    outs = signature.output_names(model, with_state=args.with_state)
    print(f"wrote {args.onnx} (opset {proto.opset_import[0].version}): inputs "
          f"{', '.join(ins)}; outputs {', '.join(outs)}")
    return proto


def main(argv, prog="rnnkern export"):
    """Exit status: 0, or 2 with one line on stderr for bad input."""
    args = parser(prog).parse_args(argv)
    return run_cli(prog, lambda: export_checkpoint(args))
