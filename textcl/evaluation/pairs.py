"""Retrieval on (anchor, positive[, negatives]) pairs: the measure of `eval_split` (rows held out of a run's own
training data) and of `textcl eval --pairs FILE`.

Each distinct anchor is a query whose relevant documents are its rows' positives; the corpus is every positive and every
negative (each distinct text once, so rows that share a positive share its document). The same ranking and
metrics as BEIR retrieval (`textcl.evaluation.retrieval.rank_and_measure`), as sentence-transformers'
InformationRetrievalEvaluator does for a user's own pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from textcl.errors import TextclError
from textcl.evaluation.retrieval import dense_run
from textcl.evaluation.retrieval_metrics import retrieval_metrics
from textcl.io.beir import BeirData
from textcl.model.text_encoder import TextEncoder


def evaluate_pairs(
    encoder: TextEncoder,
    anchors: Sequence[str],
    positives: Sequence[str],
    negatives: Sequence[Sequence[str]] = (),
    k_values: Sequence[int] = (1, 3, 5, 10),
    **options: Any,
) -> dict[str, float | int]:
    """nDCG, MRR, Recall, MAP and Precision at every k of finding each anchor's positive among all positives and
    negatives, plus "n_queries", "n_skipped_queries" and "n_docs"; `options` go to `dense_run` (prompts default
    to the model's "query" / "document" prompts).
    `negatives`: per row, its hard negatives (may be empty)."""
    if not anchors or len(anchors) != len(positives):
        raise TextclError("pair evaluation needs as many positives as anchors, and at least one pair")
    doc_ids: dict[str, str] = {}
    for text in [*positives, *(n for row in negatives for n in row)]:
        doc_ids.setdefault(text, f"d{len(doc_ids)}")
    query_ids: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for anchor, positive in zip(anchors, positives):
        query_id = query_ids.setdefault(anchor, f"q{len(query_ids)}")
        qrels.setdefault(query_id, {})[doc_ids[positive]] = 1
    data = BeirData(corpus={i: ("", text) for text, i in doc_ids.items()},
                    queries={query_id: anchor for anchor, query_id in query_ids.items()}, qrels=qrels)
    run = dense_run(encoder, data, max(k_values), **options)
    return retrieval_metrics(qrels, run, k_values) | {"n_docs": len(doc_ids)}
