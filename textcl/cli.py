"""The `textcl` command line: each subcommand parses its arguments and calls the library.

Heavy imports (torch, transformers) happen inside the command functions so `textcl --help` is instant.
A `TextclError` becomes one line on stderr and exit code 2; argparse mistakes also exit with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from textcl import __version__
from textcl.errors import TextclError

Command = Callable[[argparse.Namespace], int | None]


def add_encode_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("encode", help="embed a text file (one text a line) into a .npy array [n, dim]")
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument("--input", required=True, help="UTF-8 text file, one text a line")
    parser.add_argument("--output", required=True, help="where to write the .npy array")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--prompt_name", default=None, help="a prompt saved with the model, e.g. query")
    parser.add_argument("--prompt", default=None, help="a literal prefix for every text")
    parser.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    parser.add_argument("--truncate_dim", type=int, default=None, help="keep the first N dimensions")
    parser.add_argument("--max_seq_length", type=int, default=None)
    parser.add_argument("--pooling", default=None, help="override the model's pooling mode")
    add_device_option(parser)
    parser.set_defaults(run=run_encode)


def run_encode(args: argparse.Namespace) -> None:
    import numpy as np

    from textcl.modeling import Encoder
    from textcl.textfiles import read_lines

    texts = read_lines(args.input)
    encoder = Encoder.load(args.model, pooling=args.pooling, max_seq_length=args.max_seq_length).to(args.device)
    embeddings = encoder.encode(
        texts,
        batch_size=args.batch_size,
        prompt=args.prompt,
        prompt_name=args.prompt_name,
        normalize=args.normalize or None,
        truncate_dim=args.truncate_dim,
        show_progress_bar=True,
    )
    np.save(args.output, embeddings)
    print(f"wrote {args.output}: {embeddings.shape[0]} x {embeddings.shape[1]} float32")


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from textcl.config import FIELDS

    parser = subparsers.add_parser(
        "train",
        help="train a model from a YAML recipe (also under `accelerate launch -m textcl train`)",
        description="Train from a YAML recipe; any setting can be overridden as --key value after the recipe. "
        f"Settings: {', '.join(FIELDS)}.",
    )
    parser.usage = "textcl train [RECIPE.yaml] [--setting value ...]"
    parser.set_defaults(run=run_train, takes_overrides=True)


def run_train(args: argparse.Namespace) -> None:
    from textcl.config import load_config
    from textcl.trainer import train

    overrides = list(args.overrides)
    recipe = overrides.pop(0) if overrides and not overrides[0].startswith("-") else None
    metrics = train(load_config(recipe, overrides))
    if metrics:
        print(json.dumps(metrics, indent=2))


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the embedded default on bundled data (no network)")
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the shipped MiniLM)")
    parser.add_argument("--output_dir", default="textcl-demo", help="where the trained model goes")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from textcl.demo import run

    run(args.model, args.output_dir)


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="STS correlations and BEIR retrieval metrics of a model")
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument("--sts", nargs="+", default=[], metavar="FILE", help="STS .tsv/.csv/.jsonl files")
    parser.add_argument("--sts_columns", nargs=3, default=["sentence1", "sentence2", "score"],
                        metavar=("FIRST", "SECOND", "SCORE"))
    parser.add_argument("--beir", default=None, metavar="DIR", help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    parser.add_argument("--split", default="test", help="qrels split of the BEIR folder")
    parser.add_argument("--k_values", nargs="+", type=int, default=[1, 3, 5, 10, 100])
    parser.add_argument("--allow_missing", action="store_true", help="drop qrels naming unknown documents/queries")
    add_encoding_options(parser)
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    parser.set_defaults(run=run_eval)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="where the model runs: cpu, cuda, cuda:N, mps (default: cuda if available, else cpu)")


def resolve_device(name: str | None) -> Any:
    """The checked `--device` as a `torch.device`; by default the GPU when torch sees one (as
    `SentenceTransformer`; under `accelerate launch` each process takes the GPU of its LOCAL_RANK), else the CPU."""
    import os

    import torch

    if name is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TextclError(f"unknown --device {name!r}; use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise TextclError(f"--device {name}: this torch ({torch.__version__}) sees no such device; "
                          "use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TextclError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def add_encoding_options(parser: argparse.ArgumentParser, cache_by_default: bool = False) -> None:
    """Options shared by eval, mine and index: truncation, prompts, batch size, device, embedding cache."""
    parser.add_argument("--max_seq_length", type=int, default=None, help="truncation length (default: the model's)")
    parser.add_argument("--query_max_length", type=int, default=None, help="truncation length of queries/anchors")
    parser.add_argument("--query_prompt_name", default=None, help="default: the model's 'query' prompt, if any")
    parser.add_argument("--doc_prompt_name", default=None, help="default: the model's 'document' prompt, if any")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--bf16", action="store_true",
                        help="encode under bf16 autocast: about 2x faster on AMX CPUs and GPUs, scores move slightly")
    add_device_option(parser)
    if cache_by_default:
        parser.add_argument("--cache_dir", default=None, help="embedding cache (default: ~/.cache/textcl/embeddings)")
        parser.add_argument("--no_cache", action="store_true", help="encode without reading or writing the cache")
    else:
        parser.add_argument("--cache_dir", default=None,
                            help="keep the corpus embeddings here (memory-mapped; reused by later runs)")
    parser.set_defaults(cache_by_default=cache_by_default, no_cache=False)


def cache_dir_of(args: argparse.Namespace) -> str | None:
    """--cache_dir; else the default cache for commands that cache by default (mine), unless --no_cache."""
    from textcl.corpus import default_cache_dir

    if args.no_cache:
        return None
    return args.cache_dir or (str(default_cache_dir()) if args.cache_by_default else None)


def run_eval(args: argparse.Namespace) -> None:
    from pathlib import Path

    from textcl.evaluation import evaluate, format_table
    from textcl.modeling import Encoder

    if not args.sts and not args.beir:
        raise TextclError("nothing to evaluate: give STS files (--sts FILE) and/or a BEIR folder (--beir DIR)")
    encoder = Encoder.load(args.model, max_seq_length=args.max_seq_length).to(args.device)
    results = evaluate(
        encoder, sts=args.sts, beir=args.beir, split=args.split, sts_columns=args.sts_columns,
        k_values=args.k_values, query_prompt_name=args.query_prompt_name, doc_prompt_name=args.doc_prompt_name,
        query_max_length=args.query_max_length, batch_size=args.batch_size, allow_missing=args.allow_missing,
        cache_dir=cache_dir_of(args), show_progress_bar=True,
    )
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")


def add_mine_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("mine", help="mine hard negatives for (anchor, positive) pairs with FAISS")
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument("--data", required=True, help="pairs file (.tsv/.csv/.jsonl) or BEIR folder")
    parser.add_argument("--split", default="train", help="qrels split when --data is a BEIR folder")
    parser.add_argument("--anchor_column", default="anchor")
    parser.add_argument("--positive_column", default="positive")
    parser.add_argument("--corpus", default=None,
                        help="candidate texts: text file, .jsonl/.tsv/.csv with 'text', or BEIR folder "
                        "(default: the BEIR corpus of --data, else the positives)")
    parser.add_argument("--out", required=True, help="output dataset (.jsonl, .tsv, .csv or .parquet)")
    parser.add_argument("--num_negatives", type=int, default=5)
    parser.add_argument("--min_negatives", type=int, default=None,
                        help="keep rows with at least this many negatives, the missing ones empty "
                             "(default: --num_negatives; 0 keeps every row)")
    parser.add_argument("--range_min", type=int, default=10, help="skip this many best-ranked candidates")
    parser.add_argument("--range_max", type=int, default=100, help="consider candidates up to this rank")
    parser.add_argument("--max_score_ratio", type=optional_float, default=0.95,
                        help="keep a negative only if its score < ratio x the positive's score ('none': off)")
    parser.add_argument("--margin", type=optional_float, default=0.0,
                        help="... and < the positive's score - margin ('none': off)")
    parser.add_argument("--sampling", choices=["top", "random"], default="top")
    parser.add_argument("--factory", default="Flat", help="faiss index_factory string, e.g. IVF1024,Flat")
    parser.add_argument("--search_params", default="", help="faiss search parameters, e.g. nprobe=32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow_missing", action="store_true", help="drop qrels naming unknown documents/queries")
    add_encoding_options(parser, cache_by_default=True)
    parser.set_defaults(run=run_mine)


def optional_float(value: str) -> float | None:
    return None if value.lower() == "none" else float(value)


def run_mine(args: argparse.Namespace) -> None:
    from textcl.mining import check_options, mine_hard_negatives, read_pairs
    from textcl.modeling import Encoder
    from textcl.tables import check_output, read_corpus, write_table

    check_output(args.out)
    check_options(args.num_negatives, args.range_min, args.range_max, args.max_score_ratio, args.sampling)
    anchors, positives, corpus = read_pairs(
        args.data, args.split, args.anchor_column, args.positive_column, args.allow_missing
    )
    if args.corpus:
        corpus = read_corpus(args.corpus)[1]
    encoder = Encoder.load(args.model, max_seq_length=args.max_seq_length).to(args.device)
    mined = mine_hard_negatives(
        encoder, anchors, positives, corpus, num_negatives=args.num_negatives, min_negatives=args.min_negatives,
        range_min=args.range_min,
        range_max=args.range_max, max_score_ratio=args.max_score_ratio, margin=args.margin, sampling=args.sampling,
        factory=args.factory, search_params=args.search_params, query_prompt_name=args.query_prompt_name,
        doc_prompt_name=args.doc_prompt_name, query_max_length=args.query_max_length, batch_size=args.batch_size,
        cache_dir=cache_dir_of(args), seed=args.seed, show_progress_bar=True,
    )
    print(mined.stats.summary())
    write_table(mined.columns, args.out)
    print(f"wrote {args.out}: {mined.stats.rows_kept} rows")


def add_index_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("index", help="build a FAISS search index of a corpus")
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument("--corpus", required=True,
                        help="text file (one document a line), .jsonl/.tsv/.csv with 'text' (and 'id'), or BEIR folder")
    parser.add_argument("--out", required=True, help="index folder to write")
    parser.add_argument("--factory", default="Flat", help="faiss index_factory string, e.g. IVF1024,Flat or HNSW32")
    parser.add_argument("--search_params", default="", help="faiss search parameters saved with the index")
    add_encoding_options(parser)
    parser.set_defaults(run=run_index)


def run_index(args: argparse.Namespace) -> None:
    from pathlib import Path

    from textcl.modeling import Encoder
    from textcl.search import SearchIndex
    from textcl.tables import read_corpus

    ids, texts = read_corpus(args.corpus)
    model = Path(args.model).resolve() if Path(args.model).exists() else args.model
    encoder = Encoder.load(args.model, max_seq_length=args.max_seq_length).to(args.device)
    index = SearchIndex.build(
        encoder, texts, ids, args.factory, model_path=model, query_max_length=args.query_max_length,
        query_prompt_name=args.query_prompt_name, doc_prompt_name=args.doc_prompt_name,
        search_params=args.search_params, batch_size=args.batch_size, cache_dir=cache_dir_of(args),
        show_progress_bar=True,
    )
    index.save(args.out)
    print(f"wrote {args.out}: {len(ids)} documents, {encoder.dim} dimensions, {args.factory}")


def add_search_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("search", help="query a search index built by `textcl index`")
    parser.add_argument("index", help="index folder")
    parser.add_argument("query", nargs="*", help="one or more queries")
    parser.add_argument("--queries", default=None, metavar="FILE", help="text file with one query a line")
    parser.add_argument("-k", type=int, default=10, help="results per query")
    parser.add_argument("--search_params", default=None, help="override the saved faiss search parameters")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_device_option(parser)
    parser.set_defaults(run=run_search)


def run_search(args: argparse.Namespace) -> None:
    from textcl.search import SearchIndex, set_search_params
    from textcl.textfiles import read_lines

    queries = list(args.query) + (read_lines(args.queries, "queries file") if args.queries else [])
    if not queries:
        raise TextclError("no query: pass one as an argument or a file with --queries FILE")
    index = SearchIndex.load(args.index, device=args.device)
    if args.search_params is not None:
        set_search_params(index.index, args.search_params)
    hits = index.search(queries, args.k)
    results = [
        {"query": query, "hits": [{"id": i, "score": float(s), "text": t}
                                  for i, s, t in zip(ids, scores, texts) if i is not None]}
        for query, ids, scores, texts in zip(queries, hits.ids, hits.scores, hits.texts)
    ]
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return
    for result in results:
        print(f"query: {result['query']}")
        for rank, hit in enumerate(result["hits"], start=1):
            text = hit["text"] if len(hit["text"]) <= 100 else hit["text"][:97] + "..."
            print(f"{rank:4d}. {hit['score']:.4f}  {hit['id']}  {text}")


def add_push_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("push", help="upload a model folder to the Hugging Face Hub",
                                   description="Upload a model folder (checkpoints excluded) to the Hugging Face Hub. "
                                   "The token comes from HF_TOKEN or `hf auth login`.")
    parser.add_argument("model", help="model folder (written by textcl train, Encoder.save or textcl merge)")
    parser.add_argument("repo_id", help="repository, e.g. your-name/my-model (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--commit_message", default="Upload model trained with textcl")
    parser.set_defaults(run=run_push)


def run_push(args: argparse.Namespace) -> None:
    from textcl.hub import push_to_hub

    url = push_to_hub(args.model, args.repo_id, private=args.private or None, revision=args.revision,
                      commit_message=args.commit_message)
    print(f"pushed {args.model} to {url}")


def add_merge_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("merge", help="merge a LoRA adapter folder into a full model folder")
    parser.add_argument("adapter", help="adapter folder (a model trained with lora: true)")
    parser.add_argument("output", help="where to write the merged model")
    parser.set_defaults(run=run_merge)


def run_merge(args: argparse.Namespace) -> None:
    from pathlib import Path

    from textcl.lora import is_adapter_folder, merged
    from textcl.modeling import Encoder

    if not is_adapter_folder(Path(args.adapter)):
        raise TextclError(f"{args.adapter!r} holds no LoRA adapter (no adapter_config.json); "
                          "it is already a full model")
    merged(Encoder.load(args.adapter)).save(args.output)
    print(f"wrote {args.output}: {args.adapter} merged into its base model")


PARSERS = (
    add_encode_parser,
    add_train_parser,
    add_demo_parser,
    add_eval_parser,
    add_mine_parser,
    add_index_parser,
    add_search_parser,
    add_push_parser,
    add_merge_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textcl", description="Train, evaluate and serve text embedding models.")
    parser.add_argument("--version", action="version", version=f"textcl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in PARSERS:
        add_parser(subparsers)
    return parser


def mixed_precision(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """bf16 autocast on the command's device when given `--bf16` (eval, mine, index), else nothing."""
    if not getattr(args, "bf16", False):
        return contextlib.nullcontext()
    import torch

    return torch.autocast(args.device.type, dtype=torch.bfloat16)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `textcl` console script; returns the process exit code."""
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    if overrides and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    args.overrides = overrides
    try:
        if hasattr(args, "device"):
            args.device = resolve_device(args.device)
        with mixed_precision(args):
            return args.run(args) or 0
    except TextclError as error:
        print(f"textcl: error: {error}", file=sys.stderr)
        return 2
