"""`textcl mine`: hard negatives for (anchor, positive) pairs, written as a training table."""

from __future__ import annotations

import argparse
import dataclasses

import faiss
import torch
import transformers

from textcl.cli.options import add_encoding_options, defaults_of, encode_options_of
from textcl.io.corpus import read_corpus
from textcl.io.pairs import read_pairs
from textcl.io.tables import check_output, negative_column_names, provenance_path, write_table
from textcl.model.encoder import Encoder
from textcl.retrieval.mining import SAMPLING, check_options, mine_hard_negatives
from textcl.retrieval.mining_record import MiningRecord
from textcl.retrieval.scoring import load_teacher, score_table


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = defaults_of(mine_hard_negatives) | defaults_of(read_pairs)
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument("--data", required=True, help="pairs table (.tsv/.csv/.jsonl/.parquet or Hub id) or BEIR folder")
    parser.add_argument("--split", default=defaults["split"], help="qrels split of a BEIR folder, or Hub split")
    parser.add_argument("--anchor_column", default=defaults["anchor_column"])
    parser.add_argument("--positive_column", default=defaults["positive_column"])
    parser.add_argument("--corpus", default=None,
                        help="candidate texts: text file, table with 'text', or BEIR folder "
                        "(default: the BEIR corpus of --data, else the positives)")
    parser.add_argument("--out", required=True, help="output dataset (.jsonl, .tsv, .csv or .parquet)")
    parser.add_argument("--num_negatives", type=int, default=defaults["num_negatives"])
    parser.add_argument("--min_negatives", type=int, default=defaults["min_negatives"],
                        help="keep rows with at least this many negatives, the missing ones empty "
                             "(default: --num_negatives; 0 keeps every row)")
    parser.add_argument("--range_min", type=int, default=defaults["range_min"],
                        help="skip this many best-ranked candidates")
    parser.add_argument("--range_max", type=int, default=defaults["range_max"],
                        help="consider candidates up to this rank")
    parser.add_argument("--max_score_ratio", type=optional_float, default=defaults["max_score_ratio"],
                        help="keep a negative only if its score < ratio x the positive's score ('none': off)")
    parser.add_argument("--margin", type=optional_float, default=defaults["margin"],
                        help="... and < the positive's score - margin ('none': off)")
    parser.add_argument("--sampling", choices=SAMPLING, default=defaults["sampling"])
    parser.add_argument("--factory", default=defaults["factory"], help="faiss index_factory string, e.g. IVF1024,Flat")
    parser.add_argument("--search_params", default=defaults["search_params"],
                        help="faiss search parameters, e.g. nprobe=32")
    parser.add_argument("--seed", type=int, default=defaults["seed"])
    parser.add_argument("--allow_missing", action="store_true", help="drop qrels naming unknown documents/queries")
    parser.add_argument("--teacher", default=None,
                        help="score the pairs with this model instead (a bi-encoder or a sentence-transformers "
                        "CrossEncoder): the targets of distill_loss")
    add_encoding_options(parser, cache_by_default=True)


def optional_float(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def run(args: argparse.Namespace) -> None:
    check_output(args.out)
    check_options(args.num_negatives, args.range_min, args.range_max, args.max_score_ratio, args.sampling)
    anchors, positives, corpus = read_pairs(
        args.data, args.split, args.anchor_column, args.positive_column, args.allow_missing
    )
    if args.corpus:
        corpus = read_corpus(args.corpus)[1]
    encoder = Encoder.load(args.model, max_seq_length=args.max_seq_length, device=args.device, backend=args.backend,
                           onnx_file=args.onnx_file)
    options = encode_options_of(args)
    mined = mine_hard_negatives(
        encoder, anchors, positives, corpus, num_negatives=args.num_negatives, min_negatives=args.min_negatives,
        range_min=args.range_min, range_max=args.range_max, max_score_ratio=args.max_score_ratio,
        margin=args.margin, sampling=args.sampling, factory=args.factory, search_params=args.search_params,
        seed=args.seed, encode_options=options,
    )
    print(mined.stats.summary())
    columns, scores = mined.columns, {"model": str(args.model), "kind": "bi-encoder (the mining model)"}
    if args.teacher:
        teacher = load_teacher(args.teacher, device=args.device)
        texts = {name: columns[name] for name in ["positive", *negative_column_names(list(columns))]}
        teacher_options = dataclasses.replace(options, query_prompt_name=None, document_prompt_name=None)
        columns |= score_table(teacher, columns["anchor"], texts, teacher_options)  # with the teacher's own prompts
        scores = {"model": teacher.name, "kind": teacher.kind}
    provenance = MiningRecord(str(args.model), str(args.data), args.split, str(args.corpus) if args.corpus else None,
                              mined.settings, scores, environment(args.device)).to_dict()
    write_table(columns, args.out, provenance=provenance)
    print(f"wrote {args.out}: {mined.stats.rows_kept} rows (how they were mined: {provenance_path(args.out)})")


def environment(device: torch.device) -> dict[str, str]:
    """What else decides float results: the device, the CPU's vector instructions and library versions (the same
    command mined 821 rows with a negative on an AMX CPU and 829 on an AVX2 one: see bench/RESULTS.md)."""
    return {"device": str(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__, "transformers": transformers.__version__, "faiss": faiss.__version__}
