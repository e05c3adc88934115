"""BEIR retrieval evaluation: encode queries and corpus, exact search, trec_eval-convention metrics."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from textcl.evaluation.retrieval_metrics import retrieval_metrics
from textcl.io.beir import BeirData, doc_text, load_beir
from textcl.model.encode_options import EncodeOptions
from textcl.model.text_encoder import TextEncoder
from textcl.retrieval.corpus_embeddings import encode_corpus
from textcl.retrieval.exact_search import exact_search
from textcl.retrieval.quantization import build_quantized_index, check_quantization, quantized_search

logger = logging.getLogger(__name__)

K_VALUES = (1, 3, 5, 10, 100)


def evaluate_retrieval(
    encoder: TextEncoder,
    beir_dir: str | Path,
    split: str = "test",
    k_values: Sequence[int] = K_VALUES,
    allow_missing: bool = False,
    quantize: str | None = None,
    rescore: int = 0,
    encode_options: EncodeOptions = EncodeOptions(),
) -> dict[str, float | int]:
    """nDCG, MRR, Recall, MAP and Precision at every k (trec_eval conventions, see
    `textcl.evaluation.retrieval_metrics`).

    Queries and documents are encoded with `encode_options` (prompts default to the model's "query" /
    "document" prompts when it has them). Returns the metrics plus "n_queries" (evaluated),
    "n_skipped_queries" (no relevant document) and "n_docs". The options' `cache_dir` keeps the corpus
    embeddings on disk (memory-mapped) for corpora larger than memory and for reuse. `quantize`
    ("int8" or "binary") and `rescore` search a quantized index of the documents instead, as `SearchIndex` does
    (`textcl.retrieval.quantization`), to measure what quantization costs.
    """
    check_quantization(quantize, rescore, encoder.dim)
    data = load_beir(beir_dir, split, allow_missing=allow_missing)
    run = dense_run(encoder, data, max(k_values), quantize=quantize, rescore=rescore, encode_options=encode_options)
    return retrieval_metrics(data.qrels, run, k_values) | {"n_docs": len(data.corpus)}


def judged_queries(data: BeirData) -> list[str]:
    """The queries of a split with at least one relevant document, in qrels order."""
    return [query_id for query_id, relevance in data.qrels.items() if max(relevance.values()) >= 1]


def dense_run(
    encoder: TextEncoder,
    data: BeirData,
    depth: int,
    quantize: str | None = None,
    rescore: int = 0,
    encode_options: EncodeOptions = EncodeOptions(),
) -> dict[str, dict[str, float]]:
    """query id -> {doc id: score} of the top `depth` documents of each judged query of `data` (exact search,
    or a quantized index with `quantize`); the options are `evaluate_retrieval`'s."""
    doc_ids = list(data.corpus)
    query_ids = judged_queries(data)
    queries = encode_corpus(encoder, [data.queries[query_id] for query_id in query_ids], "query", encode_options)
    docs = encode_corpus(encoder, [doc_text(*data.corpus[doc_id]) for doc_id in doc_ids], "document", encode_options)
    if depth > len(doc_ids):
        logger.warning("k=%d is larger than the corpus (%d documents); ranking all of them", depth, len(doc_ids))
    run = {}
    if query_ids:
        if quantize:
            index = build_quantized_index([docs], quantize)
            scores, indices = quantized_search(index, quantize, queries, depth, rescore, docs)
        else:
            scores, indices = exact_search(queries, docs, depth)
        for query_id, row_scores, row_indices in zip(query_ids, scores.tolist(), indices.tolist()):
            run[query_id] = {doc_ids[i]: score for score, i in zip(row_scores, row_indices) if i >= 0}
    return run
