"""`textcl score`: a teacher's score of every (anchor, candidate) pair of a training table, next to the texts."""

from __future__ import annotations

import argparse

from textcl.cli.options import add_bf16_option, add_device_option, defaults_of, encode_options_of
from textcl.model.encode_options import EncodeOptions
from textcl.retrieval.scoring import load_teacher, score_file


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = defaults_of(score_file) | defaults_of(EncodeOptions)
    parser.description = ("Write the teacher's score of each (anchor, positive) and (anchor, negative) pair as "
                          "<column>_score columns next to the texts (positive_score, negative_1_score, ...), the "
                          "targets of distill_loss. The teacher is a bi-encoder (cosine) or a sentence-transformers "
                          "CrossEncoder (raw logit).")
    parser.add_argument("model", help="teacher: model folder or Hub id")
    parser.add_argument("--data", required=True, help="table with anchor, positive and negative columns")
    parser.add_argument("--out", required=True, help="output table (.jsonl, .tsv, .csv or .parquet)")
    parser.add_argument("--split", default=defaults["split"], help="split of a Hub dataset")
    parser.add_argument("--anchor_column", default=defaults["anchor_column"])
    parser.add_argument("--positive_column", default=defaults["positive_column"])
    parser.add_argument("--negative_columns", nargs="*", default=defaults["negative_columns"],
                        help="default: every column named negative*")
    parser.add_argument("--query_max_length", type=int, default=defaults["query_max_length"])
    parser.add_argument("--batch_size", type=int, default=defaults["batch_size"])
    add_bf16_option(parser)
    add_device_option(parser)
    parser.add_argument("--cache_dir", default=None, help="embedding/score cache (default: ~/.cache/textcl/embeddings)")
    parser.add_argument("--no_cache", action="store_true", help="score without reading or writing the cache")
    parser.set_defaults(cache_by_default=True)


def run(args: argparse.Namespace) -> None:
    teacher = load_teacher(args.model, device=args.device)
    rows = score_file(
        teacher, args.data, args.out, split=args.split, anchor_column=args.anchor_column,
        positive_column=args.positive_column, negative_columns=args.negative_columns,
        encode_options=encode_options_of(args),
    )
    print(f"wrote {args.out}: {rows} rows with {teacher.kind} scores of {args.model}")
