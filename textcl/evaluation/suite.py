"""`evaluate`: STS and BEIR retrieval of one encoder in one call (what `textcl eval` and the trainer run),
and the text tables `textcl eval` prints.

Results are plain dicts of floats, shaped as ARCHITECTURE.md's "Eval output" contract. Similarity is the
cosine: embeddings are L2-normalized, and retrieval is exact inner-product search.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from textcl.errors import TextclError
from textcl.evaluation.evaluators import Evaluator, RetrievalEvaluator, STSEvaluator, run_evaluators
from textcl.evaluation.retrieval import K_VALUES
from textcl.evaluation.retrieval_metrics import METRIC_NAMES
from textcl.evaluation.sts import STS_COLUMNS
from textcl.model.encode_options import EncodeOptions
from textcl.model.text_encoder import TextEncoder


def evaluate(
    encoder: TextEncoder,
    sts: str | Path | Sequence[str | Path] | None = None,
    beir: str | Path | None = None,
    split: str = "test",
    sts_columns: Sequence[str] = STS_COLUMNS,
    *,
    encode_options: EncodeOptions = EncodeOptions(),
    **retrieval_options: Any,
) -> dict[str, dict[str, Any]]:
    """{"sts": evaluate_sts(...), "retrieval": evaluate_retrieval(...)}, each key present when asked for;
    STS takes the batch size and precision of `encode_options`, retrieval all of them and
    `retrieval_options`."""
    if not sts and not beir:
        raise TextclError("nothing to evaluate: give STS files (--sts FILE) and/or a BEIR folder (--beir DIR)")
    evaluators: list[Evaluator] = []
    if sts:
        evaluators.append(STSEvaluator(tuple(sts) if isinstance(sts, (list, tuple)) else (sts,), sts_columns,
                                       encode_options=encode_options))
    if beir:
        k_values = retrieval_options.pop("k_values", K_VALUES)
        evaluators.append(RetrievalEvaluator(beir, split, k_values, encode_options=encode_options,
                                             options=retrieval_options))
    return run_evaluators(evaluators, encoder)


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
    for group in ("retrieval", "pairs", "heldout"):  # pairs, heldout: retrieval on pairs (textcl.evaluation.pairs)
        if group not in results:
            continue
        figures = results[group]
        if lines:
            lines.append("")
        lines.append(
            f"{ {'heldout': 'held-out pairs'}.get(group, group)}: {figures['n_queries']} queries "
            f"({figures['n_skipped_queries']} skipped: no relevant document), {figures['n_docs']} documents"
        )
        k_values = sorted(int(name.split("@")[1]) for name in figures if name.startswith("ndcg@"))
        lines.append(f"{'k':>5s} " + " ".join(f"{name:>9s}" for name in METRIC_NAMES))
        for k in k_values:
            lines.append(f"{k:5d} " + " ".join(f"{figures[f'{name}@{k}']:9.4f}" for name in METRIC_NAMES))
    return "\n".join(lines)
