"""Evaluators: one evaluation each, with a headline metric.

An evaluator has a `name` (the key of its results in an evaluation, e.g. "sts"), a `primary_metric` (the key
of its headline figure in those results, e.g. "spearman"), `greater_is_better`, and `__call__(encoder) -> dict`.
The trainer's best-model choice, its closing summary and the model card read the headline through
`headline`, so a new evaluation (held-out pairs, MTEB, ...) is one class here and touches none of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from textcl.evaluation.pairs import evaluate_pairs
from textcl.evaluation.retrieval import K_VALUES, evaluate_retrieval
from textcl.evaluation.sts import STS_COLUMNS, evaluate_sts
from textcl.model.encode_options import EncodeOptions
from textcl.model.text_encoder import TextEncoder


@runtime_checkable
class Evaluator(Protocol):
    """One evaluation of an encoder, whose results hold a headline figure."""

    name: str
    primary_metric: str
    greater_is_better: bool

    def __call__(self, encoder: TextEncoder) -> dict[str, Any]: ...


@dataclass(frozen=True)
class STSEvaluator:
    """Spearman and Pearson correlations on STS files (`textcl.evaluation.sts.evaluate_sts`); headline: Spearman."""

    files: tuple[str | Path, ...]
    columns: Sequence[str] = STS_COLUMNS
    encode_options: EncodeOptions = EncodeOptions()  # STS reads its batch size and precision
    name: str = "sts"
    primary_metric: str = "spearman"
    greater_is_better: bool = True

    def __call__(self, encoder: TextEncoder) -> dict[str, Any]:
        return evaluate_sts(encoder, list(self.files), self.columns, batch_size=self.encode_options.batch_size,
                            precision=self.encode_options.precision)


@dataclass(frozen=True)
class RetrievalEvaluator:
    """BEIR retrieval metrics (`textcl.evaluation.retrieval.evaluate_retrieval`); headline: nDCG@10 (or nDCG at
    the first k when 10 is not among `k_values`)."""

    beir: str | Path
    split: str = "test"
    k_values: Sequence[int] = K_VALUES
    encode_options: EncodeOptions = EncodeOptions()
    options: dict[str, Any] = field(default_factory=dict)  # the other keyword arguments of evaluate_retrieval
    name: str = "retrieval"
    greater_is_better: bool = True

    @property
    def primary_metric(self) -> str:
        return f"ndcg@{10 if 10 in self.k_values else self.k_values[0]}"

    def __call__(self, encoder: TextEncoder) -> dict[str, Any]:
        return evaluate_retrieval(encoder, self.beir, self.split, self.k_values, encode_options=self.encode_options,
                                  **self.options)


@dataclass(frozen=True)
class PairsEvaluator:
    """Retrieval on (anchor, positive[, negatives]) pairs (`textcl.evaluation.pairs.evaluate_pairs`): a run's
    `eval_split` rows; headline: nDCG@10."""

    anchors: tuple[str, ...]
    positives: tuple[str, ...]
    negatives: tuple[tuple[str, ...], ...] = ()
    encode_options: EncodeOptions = EncodeOptions()
    name: str = "heldout"
    primary_metric: str = "ndcg@10"
    greater_is_better: bool = True

    @classmethod
    def of(cls, rows: Any, encode_options: EncodeOptions = EncodeOptions()) -> PairsEvaluator:
        """The evaluator of held-out rows (`textcl.data.holdout.HeldOut`: anchors, positives, negatives)."""
        return cls(tuple(rows.anchors), tuple(rows.positives), tuple(map(tuple, rows.negatives)), encode_options)

    def __call__(self, encoder: TextEncoder) -> dict[str, Any]:
        return evaluate_pairs(encoder, self.anchors, self.positives, self.negatives,
                              encode_options=self.encode_options)


def run_evaluators(evaluators: Sequence[Evaluator], encoder: TextEncoder) -> dict[str, dict[str, Any]]:
    """`{evaluator.name: evaluator(encoder)}` in order: the "Eval output" of ARCHITECTURE.md."""
    return {evaluator.name: evaluator(encoder) for evaluator in evaluators}


def headline(evaluator: Evaluator, evaluation: dict[str, Any]) -> float | None:
    """The headline figure of `evaluator` in `evaluation` (`run_evaluators`' output, or a metrics.jsonl record);
    None when the evaluation does not hold it."""
    values = evaluation.get(evaluator.name)
    value = values.get(evaluator.primary_metric) if isinstance(values, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def headline_name(evaluator: Evaluator) -> str:
    """`name.primary_metric`, e.g. "sts.spearman": how summaries and cards label the headline."""
    return f"{evaluator.name}.{evaluator.primary_metric}"


def evaluations_of(record: dict[str, Any], evaluators: Sequence[Evaluator]) -> dict[str, Any]:
    """The evaluators' results a metrics.jsonl `record` holds ({} for a record of training statistics)."""
    return {evaluator.name: record[evaluator.name] for evaluator in evaluators if evaluator.name in record}
