"""What several commands share: reading defaults from the library, device and precision, encoding options.

The CLI holds no defaults of its own: each option's default is read from the signature of the library
function the command calls (`defaults_of`), so `textcl mine --num_negatives` and
`mine_hard_negatives(num_negatives=...)` cannot drift apart; the encoding options come from `EncodeOptions`, and
`encode_options_of` turns them back into one.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textcl.errors import TextclError
from textcl.evaluation.hybrid import evaluate_hybrid
from textcl.hub.model_card import write_model_card
from textcl.io.targets import write_model_folder
from textcl.model.encode_options import EncodeOptions
from textcl.model.encoder import BACKENDS, Encoder
from textcl.model.precision import BF16_SETTINGS, resolve_precision
from textcl.retrieval.corpus_embeddings import default_cache_dir
from textcl.retrieval.fusion import FUSION_METHODS, FusionSettings
from textcl.retrieval.quantization import SCHEMES


def defaults_of(function: Callable[..., Any]) -> dict[str, Any]:
    """Parameter name -> default value, for every parameter of `function` that has one."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None,
                        help="where the model runs: cpu, cuda, cuda:N, mps (default: cuda if available, else cpu)")


def add_encoding_options(parser: argparse.ArgumentParser, cache_by_default: bool = False) -> None:
    """Options shared by eval, mine and index (defaults from `EncodeOptions`): truncation, prompts, batch size,
    precision, device, embedding cache."""
    defaults = defaults_of(EncodeOptions)
    parser.add_argument("--max_seq_length", type=int, default=None, help="truncation length (default: the model's)")
    parser.add_argument("--query_max_length", type=int, default=defaults["query_max_length"],
                        help="truncation length of queries/anchors")
    parser.add_argument("--query_prompt_name", default=defaults["query_prompt_name"],
                        help="default: the model's 'query' prompt, if any")
    parser.add_argument("--document_prompt_name", "--doc_prompt_name", default=defaults["document_prompt_name"],
                        help="default: the model's 'document' prompt, if any (--doc_prompt_name: the old name)")
    parser.add_argument("--batch_size", type=int, default=defaults["batch_size"])
    add_bf16_option(parser)
    add_device_option(parser)
    add_backend_options(parser)
    if cache_by_default:
        parser.add_argument("--cache_dir", default=None, help="embedding cache (default: ~/.cache/textcl/embeddings)")
        parser.add_argument("--no_cache", action="store_true", help="encode without reading or writing the cache")
    else:
        parser.add_argument("--cache_dir", default=None,
                            help="keep the corpus embeddings here (memory-mapped; reused by later runs)")
    parser.set_defaults(cache_by_default=cache_by_default, no_cache=False)


def add_backend_options(parser: argparse.ArgumentParser, function: Callable[..., Any] = Encoder.load) -> None:
    """--backend torch|onnx and --onnx_file, with the defaults of `function` (Encoder.load, or SearchIndex.load
    whose default is the backend the index was built with)."""
    defaults = defaults_of(function)
    parser.add_argument("--backend", choices=BACKENDS, default=defaults["backend"],
                        help="torch, or onnx: run the graph written by `textcl export` in onnxruntime")
    parser.add_argument("--onnx_file", default=defaults["onnx_file"],
                        help="with --backend onnx: the file in the model's onnx/ folder, e.g. model_qint8.onnx "
                        "(default: model.onnx)")


def add_quantize_options(parser: argparse.ArgumentParser, function: Callable[..., Any]) -> None:
    """--quantize int8|binary and --rescore K (defaults from `function`)."""
    defaults = defaults_of(function)
    parser.add_argument("--quantize", choices=SCHEMES, default=defaults["quantize"],
                        help="search quantized document vectors: int8 (4x smaller) or binary (32x smaller)")
    parser.add_argument("--rescore", type=int, default=defaults["rescore"], metavar="K",
                        help="with --quantize: fetch K x k candidates, rescore them with the float vectors")


def add_bf16_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bf16", nargs="?", const="true", default="false", choices=BF16_SETTINGS,
                        help="encode under bf16 autocast: about 2x faster on GPUs and AMX CPUs, many times slower on "
                        "CPUs without native bf16; 'auto' uses it only where native; scores move slightly")


def precision_of(args: argparse.Namespace) -> str:
    """"bf16" or "fp32" for `--bf16` on the command's device; says which on stderr when `auto` chose."""
    precision, why = resolve_precision(args.bf16, args.device)
    if args.bf16 == "auto":
        print(f"textcl: encoding in {precision} ({why})", file=sys.stderr)
    return precision


def cache_dir_of(args: argparse.Namespace) -> str | None:
    """--cache_dir; else the default cache for commands that cache by default (mine), unless --no_cache."""
    if args.no_cache:
        return None
    return args.cache_dir or (str(default_cache_dir()) if args.cache_by_default else None)


def encode_options_of(args: argparse.Namespace) -> EncodeOptions:
    """The `EncodeOptions` of a command's options (those it has; the others keep their defaults), with a progress
    bar: the CLI shows one."""
    names = ("query_prompt_name", "document_prompt_name", "query_max_length", "document_max_length", "batch_size")
    given = {name: getattr(args, name) for name in names if hasattr(args, name)}
    return EncodeOptions(**given, precision=precision_of(args), cache_dir=cache_dir_of(args), show_progress_bar=True)


OVERWRITE_HELP = "replace what the target folder holds (without it, an existing model or index there is refused)"


def add_overwrite_option(parser: argparse.ArgumentParser) -> None:
    """`--overwrite`, the same for every command that writes a model or index folder."""
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def save_model(encoder: Encoder, out: str | Path) -> None:
    """Write `encoder` with its model card into `out`, replacing its old content in one rename (the card names
    `out`, not the temporary folder it is written in)."""
    name = Path(out).resolve().name
    write_model_folder(out, lambda folder: encoder.save(folder, model_card=lambda enc, path: write_model_card(
        enc, path, model_id=name)))


def add_fusion_options(parser: argparse.ArgumentParser, dev_folder: bool) -> None:
    """--hybrid and how its dense and BM25 rankings are fused (`textcl.retrieval.fusion`); `dev_folder` adds
    --fusion_dev (a BEIR folder of dev queries) for commands not given one already."""
    defaults = defaults_of(FusionSettings) | defaults_of(evaluate_hybrid)
    parser.add_argument("--hybrid", action="store_true",
                        help="BM25 (bm25s, English stemmer and stop words) beside the dense search, fused")
    parser.add_argument("--fusion", choices=FUSION_METHODS, default=defaults["method"],
                        help="rrf: reciprocal rank fusion; weighted: fusion_weight x dense + (1 - fusion_weight) x "
                        "BM25, each min-max normalised (the weight chosen on --fusion_dev_split when given)")
    parser.add_argument("--fusion_weight", type=float, default=defaults["weight"], help="weight of the dense side")
    parser.add_argument("--fusion_depth", type=int, default=defaults["depth"],
                        help="candidates each side contributes to the fusion")
    if dev_folder:
        parser.add_argument("--fusion_dev", default=None, metavar="DIR",
                            help="BEIR folder whose queries and qrels (on this corpus) choose the fusion weight")
    parser.add_argument("--fusion_dev_split", default=None, metavar="SPLIT",
                        help="qrels split of the dev queries that choose the fusion weight (weighted fusion)")
    parser.add_argument("--fusion_dev_queries", type=int, default=defaults["fusion_dev_queries"], metavar="N",
                        help="choose on N of the split's queries, drawn with --fusion_dev_seed (0: all)")
    parser.add_argument("--fusion_dev_seed", type=int, default=defaults["seed"])


def fusion_of(args: argparse.Namespace) -> FusionSettings:
    if not args.hybrid and (args.fusion_dev_split or getattr(args, "fusion_dev", None)):
        raise TextclError("--fusion_dev_split chooses the fusion weight of a hybrid search; add --hybrid")
    return FusionSettings(method=args.fusion, weight=args.fusion_weight, depth=args.fusion_depth)
