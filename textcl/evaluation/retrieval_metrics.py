"""Retrieval metrics with trec_eval's conventions (the reference that BEIR and MTEB report through pytrec_eval).

- Ranking: documents by score descending, ties broken by doc id descending (trec_eval's `comp_sim_docno`).
- nDCG@k uses graded gains (the qrels grade; grades <= 0 gain nothing) with log2(rank + 1) discounts;
  the ideal ranking is every judged grade of the query, best first, cut at k.
- MRR@k, Recall@k, MAP@k and Precision@k count a document relevant when its grade is >= 1.
  Precision@k divides by k even when fewer documents were retrieved; MAP@k divides by all relevant documents.
- Queries with no relevant document are skipped (trec_eval would score them 0) and counted.

Written by hand, not called through pytrec_eval: the formulas are a few lines of numpy, pytrec_eval is a
compiled extension needed only to check them (tests/test_evaluation.py compares every metric to it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from textcl.errors import TextclError

METRIC_NAMES = ("ndcg", "mrr", "recall", "map", "precision")


def trec_ranking(scores: Mapping[str, float]) -> list[str]:
    """Doc ids in trec_eval's order: score descending, then doc id descending."""
    return [doc_id for doc_id, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]


def query_metrics(relevance: Mapping[str, int], ranking: Sequence[str], k_values: Sequence[int]) -> dict[str, float]:
    """Every metric at every k for one query; `ranking` is best first."""
    depth = max(k_values)
    grades = np.zeros(depth)
    top = [relevance.get(doc_id, 0) for doc_id in ranking[:depth]]
    grades[: len(top)] = top
    relevant = (grades >= 1).astype(float)
    num_relevant = sum(grade >= 1 for grade in relevance.values())
    discounts = 1.0 / np.log2(np.arange(2, depth + 2))
    ideal = np.zeros(depth)
    best = sorted((grade for grade in relevance.values() if grade > 0), reverse=True)[:depth]
    ideal[: len(best)] = best
    dcg = np.cumsum(np.maximum(grades, 0) * discounts)
    idcg = np.cumsum(ideal * discounts)
    hits = np.cumsum(relevant)
    precision_at_rank = hits / np.arange(1, depth + 1)
    average_precision = np.cumsum(relevant * precision_at_rank) / num_relevant
    first_hit = int(np.argmax(relevant)) if relevant.any() else depth
    values = {}
    for k in k_values:
        values[f"ndcg@{k}"] = float(dcg[k - 1] / idcg[k - 1])
        values[f"mrr@{k}"] = 1.0 / (first_hit + 1) if first_hit < k else 0.0
        values[f"recall@{k}"] = float(hits[k - 1] / num_relevant)
        values[f"map@{k}"] = float(average_precision[k - 1])
        values[f"precision@{k}"] = float(hits[k - 1] / k)
    return values


def retrieval_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    k_values: Sequence[int] = (1, 3, 5, 10, 100),
) -> dict[str, float | int]:
    """Mean of every metric over the queries of `qrels` that have a relevant document.

    run: query id -> {doc id: score}; a query missing from the run scores 0.
    Returns "ndcg@k", "mrr@k", "recall@k", "map@k", "precision@k" for each k, "n_queries" (evaluated)
    and "n_skipped_queries" (no relevant document).
    """
    k_values = sorted({int(k) for k in k_values})
    if not k_values or k_values[0] < 1:
        raise TextclError(f"k values must be positive integers, got {k_values}")
    per_query = [
        query_metrics(relevance, trec_ranking(run.get(query_id, {})), k_values)
        for query_id, relevance in qrels.items()
        if any(grade >= 1 for grade in relevance.values())
    ]
    names = [f"{metric}@{k}" for metric in METRIC_NAMES for k in k_values]
    means = {name: float(np.mean([values[name] for values in per_query])) if per_query else 0.0 for name in names}
    return means | {"n_queries": len(per_query), "n_skipped_queries": len(qrels) - len(per_query)}
