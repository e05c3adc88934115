"""`textcl index` builds a FAISS search index of a corpus; `textcl search` queries it."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from textcl.cli.options import (
    add_backend_options,
    add_device_option,
    add_encoding_options,
    add_fusion_options,
    add_overwrite_option,
    add_quantize_options,
    defaults_of,
    encode_options_of,
    fusion_of,
)
from textcl.errors import TextclError
from textcl.evaluation.hybrid import choose_fusion_weight, sample_queries
from textcl.evaluation.retrieval import judged_queries
from textcl.io.atomic import exclusive_lock
from textcl.io.beir import load_beir
from textcl.io.corpus import read_corpus
from textcl.model.encoder import Encoder
from textcl.retrieval.faiss_index import set_search_params
from textcl.retrieval.fusion import FusionSettings
from textcl.retrieval.index_folder import check_index_target
from textcl.retrieval.search_index import SEARCH_MODES, Hits, SearchIndex


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
    add_fusion_options(parser, dev_folder=True)


def run_index(args: argparse.Namespace) -> None:
    out = Path(args.out)
    fusion = fusion_of(args)
    if args.fusion_dev_split and not args.fusion_dev:
        raise TextclError("--fusion_dev_split names a split of --fusion_dev DIR, a BEIR folder of queries on this "
                          "corpus; pass it too")
    check_index_target(out, args.overwrite)  # before the slow part
    with exclusive_lock(out, what="the search index"):  # a second `textcl index` to --out is refused now
        ids, texts = read_corpus(args.corpus)
        model = Path(args.model).resolve() if Path(args.model).exists() else args.model
        encoder = Encoder.load(args.model, max_seq_length=args.max_seq_length, device=args.device,
                               backend=args.backend, onnx_file=args.onnx_file)
        index = SearchIndex.build(
            encoder, texts, ids, args.factory, model_path=model, search_params=args.search_params,
            quantize=args.quantize, rescore=args.rescore, hybrid=args.hybrid, fusion=fusion,
            encode_options=encode_options_of(args),
        )
        if args.fusion_dev:
            choose_index_fusion(index, args)
        index.save(out, overwrite=args.overwrite)
    kind = f"{args.quantize} (rescore {args.rescore})" if args.quantize else args.factory
    if args.hybrid:
        used = FusionSettings.of(index.meta["fusion"])
        kind += f" + BM25, {used.method} fusion" + (f" (dense weight {used.weight})" if used.method == "weighted" else "")
    print(f"wrote {args.out}: {len(ids)} documents, {encoder.dim} dimensions, {kind}")


def choose_index_fusion(index: SearchIndex, args: argparse.Namespace) -> None:
    """Set the weight of a weighted-fusion hybrid index to the best on the dev queries of `args.fusion_dev`."""
    fusion = FusionSettings.of(index.meta["fusion"])
    if fusion.method != "weighted":
        raise TextclError("--fusion_dev chooses the weight of weighted fusion; add --fusion weighted")
    dev = sample_queries(load_beir(args.fusion_dev, args.fusion_dev_split or "dev"), args.fusion_dev_queries,
                         args.fusion_dev_seed)
    query_ids = judged_queries(dev)
    indexed = set(index.ids.tolist())
    if not query_ids or not any(doc in indexed for q in query_ids for doc in dev.qrels[q]):
        raise TextclError(f"the dev queries of {args.fusion_dev!r} judge no document of this corpus; give a BEIR "
                          "folder whose qrels name the indexed ids")
    texts = [dev.queries[q] for q in query_ids]
    runs = [index.search(texts, fusion.depth, mode=mode, batch_size=args.batch_size) for mode in ("dense", "bm25")]
    dense, lexical = ({q: {key: float(score) for key, score in zip(ids, scores) if key is not None}
                       for q, ids, scores in zip(query_ids, hits.ids, hits.scores)} for hits in runs)
    weight, values = choose_fusion_weight(dense, lexical, dev.qrels, fusion, fusion.depth)
    index.meta["fusion"] = fusion.as_dict() | {"weight": weight}
    print(f"fusion weight {weight} (dense) chosen on {len(query_ids)} dev queries: nDCG@10 "
          f"{values[weight]:.4f} (dense alone {values[1.0]:.4f}, BM25 alone {values[0.0]:.4f})")


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
    parser.add_argument("--mode", choices=SEARCH_MODES, default=None,
                        help="dense, bm25 or hybrid (default: hybrid for an index built with --hybrid, else dense)")
    parser.add_argument("--hybrid", dest="mode", action="store_const", const="hybrid", help="the same as --mode hybrid")
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
    hits = index.search(queries, args.k, rescore=args.rescore, mode=args.mode)
    results = [{"query": query, "hits": hit_records(hits, row)} for row, query in enumerate(queries)]
    if args.json:
        print(json.dumps(results, indent=2, ensure_ascii=False))
        return
    for result in results:
        print(f"query: {result['query']}")
        for rank, hit in enumerate(result["hits"], start=1):
            text = hit["text"] if len(hit["text"]) <= 100 else hit["text"][:97] + "..."
            parts = ""
            if "dense_score" in hit:
                parts = "  (dense {}, bm25 {})".format(*(
                    "-" if hit[name] is None else f"{hit[name]:.4f}" for name in ("dense_score", "bm25_score")))
            print(f"{rank:4d}. {hit['score']:.4f}  {hit['id']}  {text}{parts}")


def hit_records(hits: Hits, row: int) -> list[dict[str, Any]]:
    """The hits of query `row` as JSON records; a hybrid or BM25 search adds each side's score (None: that side
    did not return the document)."""
    records = []
    for column, key in enumerate(hits.ids[row]):
        if key is None:
            continue
        record = {"id": key, "score": float(hits.scores[row, column]), "text": hits.texts[row, column]}
        if hits.lexical_scores is not None:
            assert hits.dense_scores is not None
            for name, part in (("dense_score", hits.dense_scores), ("bm25_score", hits.lexical_scores)):
                value = float(part[row, column])
                record[name] = None if math.isnan(value) else value
        records.append(record)
    return records
