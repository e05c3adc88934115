"""Dense, BM25 and hybrid retrieval of a BEIR split side by side, and the fusion weight chosen on a dev split.

The dense side is `evaluate_retrieval`'s exact search, the BM25 side `textcl.retrieval.lexical` over the same
document texts (title, a space, text), fused as `textcl.retrieval.fusion` says; the metrics of all three
follow trec_eval's conventions. With "weighted" fusion and a dev split, the weight of the dense side is the
one of `WEIGHT_GRID` with the best dev nDCG@10; the evaluated split only reports.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from textcl.errors import TextclError
from textcl.evaluation.retrieval import K_VALUES, dense_run, judged_queries
from textcl.evaluation.retrieval_metrics import METRIC_NAMES, retrieval_metrics
from textcl.io.beir import BeirData, doc_text, load_beir
from textcl.model.encoder import Encoder
from textcl.retrieval.fusion import FusionSettings, fuse
from textcl.retrieval.lexical import LexicalIndex, LexicalSettings

Run = dict[str, dict[str, float]]
WEIGHT_GRID = tuple(round(step * 0.05, 2) for step in range(21))
TUNED_METRIC = "ndcg@10"


def lexical_run(data: BeirData, depth: int, settings: LexicalSettings | None = None) -> Run:
    """query id -> {doc id: BM25 score} of the top `depth` documents sharing a term with each judged query."""
    doc_ids = list(data.corpus)
    index = LexicalIndex.build([doc_text(*data.corpus[doc_id]) for doc_id in doc_ids], settings)
    query_ids = judged_queries(data)
    if not query_ids:
        return {}
    scores, rows = index.search([data.queries[query_id] for query_id in query_ids], depth)
    return {query_id: {doc_ids[row]: score for score, row in zip(row_scores.tolist(), row_rows.tolist()) if row >= 0}
            for query_id, row_scores, row_rows in zip(query_ids, scores, rows)}


def fused_run(dense: Run, lexical: Run, fusion: FusionSettings, depth: int) -> Run:
    """The top `depth` of each query's fused dense and lexical candidates (query id -> {doc id: fused score})."""
    return {query_id: {hit.key: hit.score for hit in fuse(dense.get(query_id, {}), lexical.get(query_id, {}),
                                                         fusion, depth)}
            for query_id in dense.keys() | lexical.keys()}


def choose_fusion_weight(
    dense: Run, lexical: Run, qrels: dict[str, dict[str, int]], fusion: FusionSettings, depth: int,
    grid: Sequence[float] = WEIGHT_GRID,
) -> tuple[float, dict[float, float]]:
    """The weight of `grid` whose weighted fusion of the two runs (its top `depth`, as the evaluation that reports
    uses: cut at 10, documents tied at the cut would be dropped and scored otherwise) scores the best nDCG@10 on
    `qrels` (ties: the one nearest 0.5), and the nDCG@10 of every weight."""
    values = {}
    for weight in grid:
        run = fused_run(dense, lexical, dataclasses.replace(fusion, method="weighted", weight=weight), depth)
        values[weight] = retrieval_metrics(qrels, run, [10])[TUNED_METRIC]
    best = max(values.values())
    return min((weight for weight, value in values.items() if value == best), key=lambda w: abs(w - 0.5)), values


def sample_queries(data: BeirData, count: int, seed: int) -> BeirData:
    """`data` with `count` of its judged queries, drawn with `seed` (all when count is 0 or at least their number)."""
    query_ids = judged_queries(data)
    if count <= 0 or count >= len(query_ids):
        return data
    chosen = sorted(random.Random(seed).sample(sorted(query_ids), count))
    return dataclasses.replace(data, queries={q: data.queries[q] for q in chosen},
                               qrels={q: data.qrels[q] for q in chosen})


def merged(test: BeirData, dev: BeirData) -> BeirData:
    """One BeirData holding both splits' queries (dev ids prefixed "dev:"), so the corpus is encoded once."""
    return dataclasses.replace(
        test, queries=test.queries | {f"dev:{q}": text for q, text in dev.queries.items()},
        qrels=test.qrels | {f"dev:{q}": relevance for q, relevance in dev.qrels.items()},
    )


def split_run(run: Run) -> tuple[Run, Run]:
    """(test run, dev run) of a run over `merged` queries."""
    return ({q: docs for q, docs in run.items() if not q.startswith("dev:")},
            {q[4:]: docs for q, docs in run.items() if q.startswith("dev:")})


def evaluate_hybrid(
    encoder: Encoder,
    beir_dir: str | Path,
    split: str = "test",
    k_values: Sequence[int] = K_VALUES,
    fusion: FusionSettings | None = None,
    fusion_dev_split: str | None = None,
    fusion_dev_queries: int = 0,
    seed: int = 0,
    lexical: LexicalSettings | None = None,
    allow_missing: bool = False,
    **dense_options: Any,
) -> dict[str, dict[str, Any]]:
    """{"dense", "bm25", "hybrid"}: the metrics of each on `split` (as `evaluate_retrieval` gives them); "hybrid"
    also holds "fusion" (its settings) and, when the weight was chosen on `fusion_dev_split` (`fusion_dev_queries`
    of its queries, drawn with `seed`; 0: all), "fusion_dev" (that split, its queries and nDCG@10 by weight).
    `dense_options` go to `textcl.evaluation.retrieval.dense_run`."""
    fusion = fusion or FusionSettings()
    if fusion_dev_split and fusion.method != "weighted":
        raise TextclError("a fusion dev split chooses the weight of weighted fusion; pass --fusion weighted")
    data = load_beir(beir_dir, split, allow_missing=allow_missing)
    depth = max(max(k_values), fusion.depth)
    dev = None
    if fusion_dev_split:
        dev = sample_queries(load_beir(beir_dir, fusion_dev_split, allow_missing=allow_missing), fusion_dev_queries,
                             seed)
        if not judged_queries(dev):
            raise TextclError(f"the {fusion_dev_split!r} split of {str(beir_dir)!r} has no judged query to choose "
                              "the fusion weight on")
    dense_all = dense_run(encoder, merged(data, dev) if dev else data, depth, **dense_options)
    lexical_all = lexical_run(merged(data, dev) if dev else data, depth, lexical)
    dense, dense_dev = split_run(dense_all)
    bm25, bm25_dev = split_run(lexical_all)
    tuning: dict[str, Any] = {}
    if dev is not None:
        weight, values = choose_fusion_weight(dense_dev, bm25_dev, dev.qrels, fusion, max(k_values))
        fusion = dataclasses.replace(fusion, weight=weight)
        tuning = {"fusion_dev": {"split": fusion_dev_split, "n_queries": len(judged_queries(dev)), "seed": seed,
                                 "query_ids": sorted(dev.qrels),
                                 f"{TUNED_METRIC}_by_weight": {str(w): v for w, v in values.items()}}}
    n_docs = {"n_docs": len(data.corpus)}
    return {
        "dense": retrieval_metrics(data.qrels, dense, k_values) | n_docs,
        "bm25": retrieval_metrics(data.qrels, bm25, k_values) | n_docs,
        "hybrid": retrieval_metrics(data.qrels, fused_run(dense, bm25, fusion, max(k_values)), k_values) | n_docs
        | {"fusion": fusion.as_dict()} | tuning,
    }


def format_comparison(results: dict[str, dict[str, Any]]) -> str:
    """The three result sets of `evaluate_hybrid` as one text table: a row per metric@k, a column per method."""
    sides = ("dense", "bm25", "hybrid")
    first = results["dense"]
    k_values = sorted(int(name.split("@")[1]) for name in first if name.startswith("ndcg@"))
    fusion = results["hybrid"]["fusion"]
    how = (f"weighted, dense weight {fusion['weight']}" if fusion["method"] == "weighted"
           else f"rrf, k={fusion['rrf_k']}")
    if "fusion_dev" in results["hybrid"]:
        dev = results["hybrid"]["fusion_dev"]
        how += f", chosen on {dev['n_queries']} queries of split {dev['split']!r}"
    lines = [(f"retrieval: {first['n_queries']} queries ({first['n_skipped_queries']} skipped: no relevant "
              f"document), {first['n_docs']} documents; hybrid = {how}"),
             f"{'metric':>14s} " + " ".join(f"{side:>9s}" for side in sides)]
    for name in METRIC_NAMES:
        for k in k_values:
            lines.append(f"{f'{name}@{k}':>14s} " + " ".join(f"{results[side][f'{name}@{k}']:9.4f}" for side in sides))
    return "\n".join(lines)
