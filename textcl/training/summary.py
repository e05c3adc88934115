"""The few lines `textcl train` ends with: where the model is, steps and time, the final loss, the evaluation
before and after, and the warnings that say a run did not help.

Everything is read from the run's own records (metrics.jsonl: the step-0 evaluation of the base model, the
logged losses, the final timing record), so the summary and the machine-readable files cannot disagree.
`run_warnings` adds "the evaluation got worse than the base model" to the guards' collapse and zero-loss
warnings (`textcl.training.guards.training_warnings`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from textcl.training.guards import training_warnings

# The headline figure of each evaluation, the one the summary compares before and after.
HEADLINES = (("sts", "spearman"), ("retrieval", "ndcg@10"), ("heldout", "ndcg@10"))
EVALUATIONS = tuple(group for group, _ in HEADLINES)  # the keys of a metrics.jsonl record that hold an evaluation
# A drop smaller than this is rounding noise in the printed figures, not a regression.
WORSE_BY = 1e-4


def headline_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """`{"sts.spearman": x, "retrieval.ndcg@10": y}` for the parts `evaluation` holds (an eval output
    dict); a retrieval evaluation without k=10 uses its first nDCG."""
    found = {}
    for group, name in HEADLINES:
        values = evaluation.get(group)
        if not isinstance(values, dict):
            continue
        key = name if name in values else next((k for k in values if k.startswith(name.split("@")[0])), None)
        if key is not None and isinstance(values[key], (int, float)):
            found[f"{group}.{key}"] = float(values[key])
    return found


def base_evaluation(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The evaluation of the base model: the metrics.jsonl record of step 0 ({} when none was logged)."""
    for record in records:
        if record.get("step") == 0 and any(key in record for key in EVALUATIONS):
            return {key: record[key] for key in EVALUATIONS if key in record}
    return {}


def worse_than_base(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """A warning for each headline metric the run lowered below the base model's."""
    old, new = headline_metrics(before), headline_metrics(after)
    return [f"{name} fell from {old[name]:.4f} (base model) to {new[name]:.4f}: the run made the model worse on "
            "its evaluation set; check the data and labels, or lower learning_rate"
            for name in old if name in new and new[name] < old[name] - WORSE_BY]


def run_warnings(records: list[dict[str, Any]], batch_size: int, after: dict[str, Any]) -> list[str]:
    """Everything that says the run did not help: collapse, a zero loss (guards), a worse evaluation."""
    return training_warnings(records, batch_size) + worse_than_base(base_evaluation(records), after)


def duration(seconds: float) -> str:
    """`42.1s`, `3m 05s` or `2h 01m`."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def summary_lines(output_dir: str | Path, records: list[dict[str, Any]], after: dict[str, Any]) -> list[str]:
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
    before, new = headline_metrics(base_evaluation(records)), headline_metrics(after)
    for name, value in new.items():
        if name in before:
            lines.append(f"  {name}: {before[name]:.4f} (base model) -> {value:.4f} ({value - before[name]:+.4f})")
        else:
            lines.append(f"  {name}: {value:.4f}")
    if not new:
        lines.append("  no evaluation: set eval_split: 0.1 to measure the run on held-out rows of its own data (or "
                     "eval_sts, eval_beir), the base model and the trained one compared")
    return lines
