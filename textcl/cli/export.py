"""`textcl export`: write a model as one ONNX graph from token ids to the final embedding (optionally int8)."""

from __future__ import annotations

import argparse

from textcl.cli.options import add_overwrite_option, defaults_of
from textcl.model.onnx_export import QUANTIZATIONS, export_onnx


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = defaults_of(export_onnx)
    parser.add_argument("model", help="model folder (a LoRA adapter folder is merged first: give --out)")
    parser.add_argument("--out", default=defaults["out"],
                        help="write a copy of the model folder with its onnx/ here (default: into the model folder)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=defaults["quantize"],
                        help="also write onnx/model_qint8.onnx with int8 weights (faster on CPUs)")
    parser.add_argument("--opset", type=int, default=defaults["opset"], help="ONNX opset (14 to 20)")
    parser.add_argument("--no_optimize", dest="optimize", action="store_false",
                        help="skip onnxruntime's fusions: standard ONNX ops only, for other runtimes (slower)")
    parser.set_defaults(optimize=defaults["optimize"])
    add_overwrite_option(parser)


def run(args: argparse.Namespace) -> None:
    result = export_onnx(args.model, out=args.out, quantize=args.quantize, opset=args.opset, optimize=args.optimize,
                         overwrite=args.overwrite)
    for path in result.files:
        print(f"wrote {path} (lowest cosine to the torch model on sample texts: {result.cosines[path.name]:.6f})")
