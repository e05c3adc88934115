"""`textcl export`: write a model as one ONNX graph from token ids to the final embedding (optionally int8).

With `--quantize int8` it also says whether the int8 graph passed, against two thresholds: its lowest cosine to
the torch model on sample texts, and its retrieval quality (nDCG@10) against the fp32 graph's on a small
evaluation set (`--eval_pairs FILE`, or 200 built-in pairs: fragments of the demo's held-out sentences).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from textcl.cli.options import add_overwrite_option, defaults_of
from textcl.demo.run import demo_rows, query_document_pairs, split_rows
from textcl.evaluation.pairs import evaluate_pairs
from textcl.io.pairs import read_evaluation_pairs
from textcl.model.encoder import Encoder
from textcl.model.onnx_export import INT8_FILE, MODEL_FILE, QUANTIZATIONS, export_onnx

INT8_MIN_COSINE = 0.95  # lowest cosine of an int8 embedding to the torch one on the sample texts
INT8_MAX_DROP = 0.02  # largest fall of nDCG@10 from the fp32 graph to the int8 one on the evaluation pairs
BUILT_IN_PAIRS = 200


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = defaults_of(export_onnx)
    parser.add_argument("model", help="model folder (a LoRA adapter folder is merged first: give --out)")
    parser.add_argument("--out", default=defaults["out"],
                        help="write a copy of the model folder with its onnx/ here (default: into the model folder)")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=defaults["quantize"],
                        help="also write onnx/model_qint8.onnx with int8 weights (faster on CPUs), and measure it")
    parser.add_argument("--eval_pairs", default=None, metavar="FILE",
                        help=f"(anchor, positive) pairs the int8 graph's retrieval is measured on against the fp32 "
                             f"graph's (default: {BUILT_IN_PAIRS} built-in pairs)")
    parser.add_argument("--opset", type=int, default=defaults["opset"], help="ONNX opset (14 to 20)")
    parser.add_argument("--no_optimize", dest="optimize", action="store_false",
                        help="skip onnxruntime's fusions: standard ONNX ops only, for other runtimes (slower)")
    parser.set_defaults(optimize=defaults["optimize"])
    add_overwrite_option(parser)


def evaluation_pairs(path: str | None) -> tuple[list[str], list[str], list[list[str]], str]:
    """(anchors, positives, negatives, what they are) of `path`, or the built-in pairs (the demo's bundled
    public-domain sentences)."""
    if path:
        return (*read_evaluation_pairs(path), path)
    pairs = query_document_pairs(split_rows(demo_rows())[1][:BUILT_IN_PAIRS])
    return [q for q, _ in pairs], [d for _, d in pairs], [], f"{len(pairs)} built-in pairs"


def int8_quality(folder: Path, path: str | None) -> tuple[float, float, str]:
    """(nDCG@10 of the fp32 graph, of the int8 graph, the pairs measured) on `evaluation_pairs(path)`."""
    anchors, positives, negatives, what = evaluation_pairs(path)
    scores = [evaluate_pairs(Encoder.load(folder, backend="onnx", onnx_file=name), anchors, positives, negatives,
                             k_values=(10,))["ndcg@10"] for name in (MODEL_FILE, INT8_FILE)]
    return scores[0], scores[1], what


def run(args: argparse.Namespace) -> None:
    result = export_onnx(args.model, out=args.out, quantize=args.quantize, opset=args.opset, optimize=args.optimize,
                         overwrite=args.overwrite)
    for path in result.files:
        print(f"wrote {path} (lowest cosine to the torch model on sample texts: {result.cosines[path.name]:.6f})")
    if INT8_FILE not in result.cosines:
        return
    cosine = result.cosines[INT8_FILE]
    fp32, int8, what = int8_quality(result.folder, args.eval_pairs)
    passed = cosine >= INT8_MIN_COSINE and fp32 - int8 <= INT8_MAX_DROP
    print(f"int8 {'passed' if passed else 'FAILED'}: lowest cosine {cosine:.4f} (threshold {INT8_MIN_COSINE}); "
          f"nDCG@10 {fp32:.4f} (fp32 graph) -> {int8:.4f} (int8) on {what}, a drop of {fp32 - int8:+.4f} "
          f"(threshold {INT8_MAX_DROP})" + ("" if passed else "; serve the fp32 graph (--onnx_file onnx/model.onnx)"))
