"""`eval_split`: rows held out of the training data, chosen by seed, to measure a run on its own data.

Every text of a held-out row (anchor, positive, negatives) stays out of training: a training row that holds
any of them, in any role, is left out of training too (counted), so the evaluation never sees a text the model
was trained on. The held-out rows are measured by `textcl.evaluation.pairs.evaluate_pairs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from textcl.errors import TextclError


@dataclass
class HeldOut:
    """The held-out rows' texts (`negatives`: per row, its hard negatives) and how many training rows were left out
    because they share one of them (`dropped`)."""

    anchors: list[str]
    positives: list[str]
    negatives: list[list[str]]
    dropped: int = 0


def held_out_count(eval_split: float, rows: int) -> int:
    """Rows to hold out: a share of `rows` (0 < eval_split < 1) or a count (eval_split >= 1)."""
    count = round(eval_split * rows) if eval_split < 1 else int(eval_split)
    if eval_split <= 0 or eval_split != int(eval_split) and eval_split > 1 or not 1 <= count <= rows - 2:
        raise TextclError(f"eval_split {eval_split:g} holds out {count} of {rows} rows; give a share (0 < x < 1) or a "
                          "row count that leaves at least 2 rows to train on")
    return count


def split_held_out(rows: Any, eval_split: float, seed: int) -> tuple[Any, HeldOut]:
    """(training rows, held-out rows) of a map-style rows Dataset (`textcl.data.rows`); the same `seed` holds out
    the same rows."""
    count = held_out_count(eval_split, len(rows))
    chosen = np.sort(np.random.default_rng(seed).permutation(len(rows))[:count])
    held = rows.select(chosen)
    if any(positive is None for positive in held["positive"]):
        raise TextclError("eval_split measures retrieval of each held-out anchor's positive: it needs (anchor, "
                          "positive) pairs, not dropout positives (a text file)")
    negatives = [list(row) for row in held["negatives"]]
    texts = set(held["anchor"]) | set(held["positive"]) | {text for row in negatives for text in row}
    chosen_set = set(chosen.tolist())
    training = [
        index for index, (anchor, positive, row_negatives) in
        enumerate(zip(rows["anchor"], rows["positive"], rows["negatives"]))
        if index not in chosen_set and texts.isdisjoint([anchor, positive or anchor, *row_negatives])
    ]
    dropped = len(rows) - count - len(training)
    if len(training) < 2:
        raise TextclError(f"eval_split {eval_split:g}: every training row shares a text with the held-out rows; "
                          "deduplicate the data or hold out fewer rows")
    return rows.select(training), HeldOut(held["anchor"], held["positive"], negatives, dropped)
