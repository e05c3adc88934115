"""`textcl shrink`: a layer-reduced copy of a BERT-like model, the starting point of a distilled student."""

from __future__ import annotations

import argparse
from pathlib import Path

from textcl.cli.options import add_overwrite_option, save_model
from textcl.errors import TextclError
from textcl.io.targets import check_model_target
from textcl.model.encoder import Encoder
from textcl.model.shrink import evenly_spaced, layer_stack, shrink


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model folder or Hub id (a BERT-like encoder)")
    chosen = parser.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--layers", nargs="+", type=int, metavar="I", help="indices of the layers to keep, e.g. 0 2 4")
    chosen.add_argument("--num_layers", type=int, help="keep this many layers, evenly spaced (first and last kept)")
    parser.add_argument("--out", required=True, help="where to write the smaller model")
    add_overwrite_option(parser)


def run(args: argparse.Namespace) -> None:
    check_model_target(args.out, args.overwrite)
    encoder = Encoder.load(args.model, device="cpu")
    parent, name = layer_stack(encoder.model)
    total = len(getattr(parent, name))
    layers = args.layers if args.layers is not None else evenly_spaced(total, args.num_layers)
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise TextclError("--out is the model's own folder; write the smaller model somewhere else")
    student = shrink(encoder, layers)
    save_model(student, args.out)
    print(f"wrote {args.out}: layers {layers} of {total} ({sum(p.numel() for p in student.parameters()):,} "
          f"parameters, from {sum(p.numel() for p in encoder.parameters()):,})")
