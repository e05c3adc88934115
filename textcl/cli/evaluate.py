"""`textcl eval`: STS correlations, BEIR retrieval metrics and retrieval on (anchor, positive) pairs of a model;
it names the model and data it measured."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from textcl.cli.options import (
    add_encoding_options,
    add_fusion_options,
    add_quantize_options,
    defaults_of,
    encode_options_of,
    fusion_of,
)
from textcl.errors import TextclError
from textcl.evaluation.hybrid import evaluate_hybrid, format_comparison
from textcl.evaluation.pairs import evaluate_pairs
from textcl.evaluation.retrieval import evaluate_retrieval
from textcl.evaluation.suite import evaluate, format_table
from textcl.io.pairs import read_evaluation_pairs
from textcl.model.encoder import Encoder


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = defaults_of(evaluate) | defaults_of(evaluate_retrieval)
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument("--sts", nargs="+", default=[], metavar="FILE",
                        help="STS tables (sentence1, sentence2, score): .tsv/.csv/.jsonl/.parquet files or Hub ids")
    parser.add_argument("--sts_columns", nargs=3, default=list(defaults["sts_columns"]),
                        metavar=("FIRST", "SECOND", "SCORE"))
    parser.add_argument("--beir", default=None, metavar="DIR", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    parser.add_argument("--split", default=defaults["split"], help="qrels split of the BEIR folder")
    parser.add_argument("--pairs", default=None, metavar="FILE",
                        help="(anchor, positive[, negative...]) table: each anchor searches all positives and negatives "
                             "(as a training run's eval_split measures its held-out rows)")
    parser.add_argument("--k_values", nargs="+", type=int, default=list(defaults["k_values"]))
    parser.add_argument("--allow_missing", action="store_true", help="drop qrels naming unknown documents/queries")
    add_encoding_options(parser)
    add_quantize_options(parser, evaluate_retrieval)
    add_fusion_options(parser, dev_folder=False)
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")


def measured(args: argparse.Namespace) -> str:
    """`textcl: MODEL on STS a.tsv; BEIR scifact (test); pairs p.tsv`: what `eval` measured."""
    parts = ([f"STS {', '.join(args.sts)}"] if args.sts else []) + ([f"BEIR {args.beir} ({args.split})"] if args.beir
                                                                     else []) + ([f"pairs {args.pairs}"] if args.pairs else [])
    return f"textcl: {args.model} on {'; '.join(parts)}"


def run(args: argparse.Namespace) -> None:
    if not args.sts and not args.beir and not args.pairs:
        raise TextclError("nothing to evaluate: give STS files (--sts FILE), a BEIR folder (--beir DIR) and/or a "
                          "pairs file (--pairs FILE)")
    fusion = fusion_of(args)
    if args.hybrid and not args.beir:
        raise TextclError("--hybrid compares dense, BM25 and fused retrieval on a BEIR folder; pass --beir DIR")
    pairs = read_evaluation_pairs(args.pairs) if args.pairs else None
    encoder = Encoder.load(args.model, max_seq_length=args.max_seq_length, device=args.device, backend=args.backend,
                           onnx_file=args.onnx_file)
    options = encode_options_of(args)
    print(measured(args))
    if args.hybrid:
        results = evaluate(encoder, sts=args.sts, sts_columns=args.sts_columns,
                           encode_options=options) if args.sts else {}
        if results:
            print(format_table(results) + "\n")
        results |= evaluate_hybrid(
            encoder, args.beir, args.split, args.k_values, fusion, args.fusion_dev_split, args.fusion_dev_queries,
            args.fusion_dev_seed, allow_missing=args.allow_missing, quantize=args.quantize, rescore=args.rescore,
            encode_options=options,
        )
        print(format_comparison(results))
    else:
        results = evaluate(encoder, sts=args.sts, beir=args.beir, split=args.split, sts_columns=args.sts_columns,
                           encode_options=options, k_values=args.k_values, allow_missing=args.allow_missing,
                           quantize=args.quantize, rescore=args.rescore) if args.sts or args.beir else {}
        if pairs is not None:  # each anchor searches all positives and negatives, as eval_split in training
            results["pairs"] = evaluate_pairs(encoder, *pairs, k_values=args.k_values, quantize=args.quantize,
                                              rescore=args.rescore, encode_options=options)
        print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
