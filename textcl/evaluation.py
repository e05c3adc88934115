"""Measuring an encoder: STS correlations, BEIR retrieval metrics, alignment and uniformity.

Every function returns plain dicts of floats, shaped as DESIGN.md's "Eval output" contract; the trainer
calls `evaluate` every eval_steps. Similarity is the cosine: embeddings are L2-normalized here, and
retrieval is exact inner-product search with FAISS (`textcl.corpus.exact_search`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

from textcl.beir import doc_text, load_beir
from textcl.corpus import default_prompt_name, encode_corpus, exact_search
from textcl.errors import TextclError
from textcl.metrics import METRIC_NAMES, retrieval_metrics
from textcl.modeling import Encoder
from textcl.tables import column, read_table

logger = logging.getLogger(__name__)

STS_COLUMNS = ("sentence1", "sentence2", "score")
K_VALUES = (1, 3, 5, 10, 100)


def read_sts(path: str | Path, columns: Sequence[str] = STS_COLUMNS) -> tuple[list[str], list[str], np.ndarray]:
    """(first sentences, second sentences, gold scores `[n]`) of a .tsv/.csv/.jsonl STS file."""
    rows = read_table(path, "STS file")
    first, second, raw = (column(rows, name, path, "the STS columns (--sts_columns)") for name in columns)
    gold = np.empty(len(raw))
    for row, value in enumerate(raw):
        try:
            gold[row] = float(value)
        except ValueError:
            raise TextclError(f"{path}: score {value!r} in data row {row + 1} is not a number") from None
    if len(gold) < 2:
        raise TextclError(f"STS file {str(path)!r} needs at least 2 rows to correlate")
    return first, second, gold


def pair_cosines(
    encoder: Encoder, first: Sequence[str], second: Sequence[str], batch_size: int, max_seq_length: int | None
) -> np.ndarray:
    """Cosine similarity `[n]` of each (first[i], second[i]); every distinct text is encoded once."""
    unique = list(dict.fromkeys([*first, *second]))
    position = {text: i for i, text in enumerate(unique)}
    embeddings = encoder.encode(unique, batch_size=batch_size, normalize=True, max_seq_length=max_seq_length)
    a = embeddings[[position[text] for text in first]]
    b = embeddings[[position[text] for text in second]]
    return np.einsum("nd,nd->n", a, b)


def evaluate_sts(
    encoder: Encoder,
    path_or_paths: str | Path | Sequence[str | Path],
    columns: Sequence[str] = STS_COLUMNS,
    batch_size: int = 64,
    max_seq_length: int | None = None,
) -> dict[str, Any]:
    """Spearman and Pearson correlation of cosine similarity with gold scores.

    Returns {"spearman", "pearson", "n", "files"}: the first two averaged over the files, "n" the total
    number of pairs, "files" the same three figures for each file.
    """
    paths = [path_or_paths] if isinstance(path_or_paths, (str, Path)) else list(path_or_paths)
    if not paths:
        raise TextclError("no STS file given")
    files = {}
    for path in paths:
        first, second, gold = read_sts(path, columns)
        cosines = pair_cosines(encoder, first, second, batch_size, max_seq_length)
        files[str(path)] = {
            "spearman": float(spearmanr(gold, cosines).statistic),
            "pearson": float(pearsonr(gold, cosines).statistic),
            "n": len(gold),
        }
    means = {name: float(np.mean([figures[name] for figures in files.values()])) for name in ("spearman", "pearson")}
    return means | {"n": sum(figures["n"] for figures in files.values()), "files": files}


def evaluate_retrieval(
    encoder: Encoder,
    beir_dir: str | Path,
    split: str = "test",
    k_values: Sequence[int] = K_VALUES,
    query_prompt_name: str | None = None,
    doc_prompt_name: str | None = None,
    query_max_length: int | None = None,
    doc_max_length: int | None = None,
    batch_size: int = 64,
    allow_missing: bool = False,
    cache_dir: str | Path | None = None,
    show_progress_bar: bool = False,
) -> dict[str, float | int]:
    """nDCG, MRR, Recall, MAP and Precision at every k (trec_eval conventions, see `textcl.metrics`).

    Prompts default to the model's "query" / "document" prompts when it has them. Returns the metrics plus
    "n_queries" (evaluated), "n_skipped_queries" (no relevant document) and "n_docs". `cache_dir` keeps
    the corpus embeddings on disk (memory-mapped) for corpora larger than memory and for reuse.
    """
    data = load_beir(beir_dir, split, allow_missing=allow_missing)
    doc_ids = list(data.corpus)
    query_ids = [query_id for query_id, relevance in data.qrels.items() if max(relevance.values()) >= 1]
    options = dict(batch_size=batch_size, cache_dir=cache_dir, show_progress_bar=show_progress_bar)
    queries = encode_corpus(
        encoder,
        [data.queries[query_id] for query_id in query_ids],
        prompt_name=default_prompt_name(encoder, query_prompt_name, "query"),
        max_seq_length=query_max_length,
        **options,
    )
    docs = encode_corpus(
        encoder,
        [doc_text(*data.corpus[doc_id]) for doc_id in doc_ids],
        prompt_name=default_prompt_name(encoder, doc_prompt_name, "document"),
        max_seq_length=doc_max_length,
        **options,
    )
    depth = max(k_values)
    if depth > len(doc_ids):
        logger.warning("k=%d is larger than the corpus (%d documents); ranking all of them", depth, len(doc_ids))
    run = {}
    if query_ids:
        scores, indices = exact_search(queries, docs, depth)
        for query_id, row_scores, row_indices in zip(query_ids, scores.tolist(), indices.tolist()):
            run[query_id] = {doc_ids[i]: score for score, i in zip(row_scores, row_indices) if i >= 0}
    return retrieval_metrics(data.qrels, run, k_values) | {"n_docs": len(doc_ids)}


def alignment_uniformity(
    encoder: Encoder, pairs: Sequence[tuple[str, str]], batch_size: int = 64, t: float = 2.0
) -> dict[str, float]:
    """Wang & Isola (2020) on normalized embeddings f: alignment = mean ||f(x) - f(y)||^2 over the pairs;
    uniformity = log mean exp(-t ||f(u) - f(v)||^2) over all pairs u != v of distinct texts (O(n^2) memory)."""
    if not pairs:
        raise TextclError("alignment and uniformity need at least one pair")
    first, second = (list(side) for side in zip(*pairs))
    unique = list(dict.fromkeys([*first, *second]))
    if len(unique) < 2:
        raise TextclError("uniformity needs at least two distinct texts")
    position = {text: i for i, text in enumerate(unique)}
    embeddings = encoder.encode(unique, batch_size=batch_size, normalize=True, convert_to_tensor=True).double()
    a = embeddings[[position[text] for text in first]]
    b = embeddings[[position[text] for text in second]]
    alignment = (a - b).pow(2).sum(dim=1).mean()
    uniformity = torch.pdist(embeddings).pow(2).mul(-t).exp().mean().log()
    return {"alignment": float(alignment), "uniformity": float(uniformity)}


def evaluate(
    encoder: Encoder,
    sts: str | Path | Sequence[str | Path] | None = None,
    beir: str | Path | None = None,
    split: str = "test",
    sts_columns: Sequence[str] = STS_COLUMNS,
    **retrieval_options: Any,
) -> dict[str, dict[str, Any]]:
    """{"sts": evaluate_sts(...), "retrieval": evaluate_retrieval(...)}, each key present when asked for."""
    if not sts and not beir:
        raise TextclError("nothing to evaluate: give STS files (--sts FILE) and/or a BEIR folder (--beir DIR)")
    results = {}
    batch_size = retrieval_options.get("batch_size", 64)
    if sts:
        results["sts"] = evaluate_sts(encoder, sts, sts_columns, batch_size=batch_size)
    if beir:
        results["retrieval"] = evaluate_retrieval(encoder, beir, split, **retrieval_options)
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The results of `evaluate` as aligned text tables."""
    lines = []
    if "sts" in results:
        sts = results["sts"]
        lines.append(f"{'STS file':40s} {'spearman':>9s} {'pearson':>9s} {'pairs':>7s}")
        for name, figures in sts["files"].items():
            lines.append(f"{name[-40:]:40s} {figures['spearman']:9.4f} {figures['pearson']:9.4f} {figures['n']:7d}")
        if len(sts["files"]) > 1:
            lines.append(f"{'mean':40s} {sts['spearman']:9.4f} {sts['pearson']:9.4f} {sts['n']:7d}")
    if "retrieval" in results:
        figures = results["retrieval"]
        if lines:
            lines.append("")
        lines.append(
            f"retrieval: {figures['n_queries']} queries ({figures['n_skipped_queries']} skipped: no relevant "
            f"document), {figures['n_docs']} documents"
        )
        k_values = sorted(int(name.split("@")[1]) for name in figures if name.startswith("ndcg@"))
        lines.append(f"{'k':>5s} " + " ".join(f"{name:>9s}" for name in METRIC_NAMES))
        for k in k_values:
            lines.append(f"{k:5d} " + " ".join(f"{figures[f'{name}@{k}']:9.4f}" for name in METRIC_NAMES))
    return "\n".join(lines)
