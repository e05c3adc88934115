"""The few lines `textcl train` ends with: where the model is, steps and time, the final loss, the evaluation
before and after, and the warnings that say a run did not help.

Everything is read from the run's own records (metrics.jsonl: the step-0 evaluation of the base model, the
logged losses, the final timing record), so the summary and the machine-readable files cannot disagree.
Each evaluation is compared by its evaluator's headline (`textcl.evaluation.evaluators`).
`run_warnings` adds "the evaluation got worse than the base model" to the guards' collapse and zero-loss
warnings (`textcl.training.guards.training_warnings`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from textcl.evaluation.evaluators import Evaluator, evaluations_of, headline, headline_name
from textcl.training.guards import training_warnings

# A drop smaller than this is rounding noise in the printed figures, not a regression.
WORSE_BY = 1e-4


def headline_metrics(evaluation: dict[str, Any], evaluators: Sequence[Evaluator]) -> dict[str, float]:
    """`{"sts.spearman": x, ...}`: each evaluator's headline figure that `evaluation` holds."""
    found = {headline_name(evaluator): headline(evaluator, evaluation) for evaluator in evaluators}
    return {name: value for name, value in found.items() if value is not None}


def base_evaluation(records: list[dict[str, Any]], evaluators: Sequence[Evaluator]) -> dict[str, Any]:
    """The evaluation of the base model: the metrics.jsonl record of step 0 ({} when none was logged)."""
    for record in records:
        if record.get("step") == 0 and evaluations_of(record, evaluators):
            return evaluations_of(record, evaluators)
    return {}


def worse_than_base(before: dict[str, Any], after: dict[str, Any], evaluators: Sequence[Evaluator]) -> list[str]:
    """A warning for each headline metric the run moved the wrong way from the base model's."""
    warnings = []
    for evaluator in evaluators:
        old, new = headline(evaluator, before), headline(evaluator, after)
        sign = 1 if evaluator.greater_is_better else -1
        if old is not None and new is not None and sign * (new - old) < -WORSE_BY:
            warnings.append(f"{headline_name(evaluator)} fell from {old:.4f} (base model) to {new:.4f}: the run made "
                            "the model worse on its evaluation set; check the data and labels, or lower learning_rate")
    return warnings


def run_warnings(
    records: list[dict[str, Any]], batch_size: int, after: dict[str, Any], evaluators: Sequence[Evaluator]
) -> list[str]:
    """Everything that says the run did not help: collapse, a zero loss (guards), a worse evaluation."""
    before = base_evaluation(records, evaluators)
    return training_warnings(records, batch_size) + worse_than_base(before, after, evaluators)


def duration(seconds: float) -> str:
    """`42.1s`, `3m 05s` or `2h 01m`."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def summary_lines(
    output_dir: str | Path, records: list[dict[str, Any]], after: dict[str, Any], evaluators: Sequence[Evaluator]
) -> list[str]:
    """The summary of a finished run from its metrics.jsonl `records` and the saved model's evaluation `after`."""
    timing = next((r for r in reversed(records) if "train_runtime" in r), {})
    steps = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)
    losses = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    lines = [f"textcl: model saved to {output_dir} (metrics.jsonl and textcl.json beside it)"]
    took = f" in {duration(timing['train_runtime'])}" if "train_runtime" in timing else ""
    rate = (f" ({timing['train_samples_per_second']:.1f} samples/s)"
            if "train_samples_per_second" in timing else "")
    lines.append(f"  {steps} steps{took}{rate}")
    if timing.get("rows_left_out"):
        lines.append(f"  {timing['rows_left_out']} rows left out of their epoch's batches in all (each repeats a text "
                     "that every batch with room already holds: see the warning before training)")
    if losses:
        lines.append(f"  final loss {losses[-1]:.4f} (first logged {losses[0]:.4f})")
    before = headline_metrics(base_evaluation(records, evaluators), evaluators)
    new = headline_metrics(after, evaluators)
    for name, value in new.items():
        if name in before:
            lines.append(f"  {name}: {before[name]:.4f} (base model) -> {value:.4f} ({value - before[name]:+.4f})")
        else:
            lines.append(f"  {name}: {value:.4f}")
    if not new:
        lines.append("  no evaluation: set eval_split: 0.1 to measure the run on held-out rows of its own data (or "
                     "eval_sts, eval_beir), the base model and the trained one compared")
    return lines
