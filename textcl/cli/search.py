"""`textcl index` builds a FAISS search index of a corpus; `textcl search` queries it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from textcl.cli.options import (
    add_backend_options,
    add_device_option,
    add_encoding_options,
    add_overwrite_option,
    add_quantize_options,
    defaults_of,
    encode_options_of,
)
from textcl.errors import TextclError
from textcl.io.atomic import exclusive_lock
from textcl.io.corpus import read_corpus
from textcl.model.encoder import Encoder
from textcl.retrieval.faiss_index import set_search_params
from textcl.retrieval.index_folder import check_index_target
from textcl.retrieval.search_index import SearchIndex


def configure_index(parser: argparse.ArgumentParser) -> None:
    defaults = defaults_of(SearchIndex.build)
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument("--corpus", required=True,
                        help="text file (one document a line), table with 'text' (and 'id'), or BEIR folder")
    parser.add_argument("--out", required=True, help="index folder to write")
    add_overwrite_option(parser)
    parser.add_argument("--factory", default=defaults["factory"],
                        help="faiss index_factory string, e.g. IVF1024,Flat or HNSW32")
    parser.add_argument("--search_params", default=defaults["search_params"],
                        help="faiss search parameters saved with the index")
    add_encoding_options(parser)
    add_quantize_options(parser, SearchIndex.build)


def run_index(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_index_target(out, args.overwrite)  # before the slow part
    with exclusive_lock(out, what="the search index"):  # a second `textcl index` to --out is refused now
        ids, texts = read_corpus(args.corpus)
        model = Path(args.model).resolve() if Path(args.model).exists() else args.model
        encoder = Encoder.load(args.model, max_seq_length=args.max_seq_length, device=args.device,
                               backend=args.backend, onnx_file=args.onnx_file)
        index = SearchIndex.build(
            encoder, texts, ids, args.factory, model_path=model, search_params=args.search_params,
            quantize=args.quantize, rescore=args.rescore, encode_options=encode_options_of(args),
        )
        index.save(out, overwrite=args.overwrite)
    kind = f"{args.quantize} (rescore {args.rescore})" if args.quantize else args.factory
    print(f"wrote {args.out}: {len(ids)} documents, {encoder.dim} dimensions, {kind}")


def configure_search(parser: argparse.ArgumentParser) -> None:
    defaults = defaults_of(SearchIndex.search)
    parser.add_argument("index", help="index folder")
    parser.add_argument("query", nargs="*", help="one or more queries")
    parser.add_argument("--queries", default=None, metavar="FILE",
                        help="queries: a text file (one a line) or a table with a 'text' column")
    parser.add_argument("-k", type=int, default=defaults["k"], help="results per query")
    parser.add_argument("--search_params", default=None, help="override the saved faiss search parameters")
    parser.add_argument("--rescore", type=int, default=defaults["rescore"], metavar="K",
                        help="override a quantized index's rescore factor (0: off)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_device_option(parser)
    add_backend_options(parser, SearchIndex.load)


def run_search(args: argparse.Namespace) -> None:
    queries = list(args.query) + (read_corpus(args.queries, "queries file")[1] if args.queries else [])
    if not queries:
        raise TextclError("no query: pass one as an argument or a file with --queries FILE")
    index = SearchIndex.load(args.index, device=args.device, backend=args.backend, onnx_file=args.onnx_file)
    if args.search_params is not None:
        set_search_params(index.index, args.search_params)
    hits = index.search(queries, args.k, rescore=args.rescore)
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
