"""Training data: any source -> rows `{anchor, positive, negatives, label}` (ARCHITECTURE.md, "Rows").

`positive` None means a dropout positive (the anchor encoded a second time, unsupervised SimCSE).
Sources: whatever the one table reader reads (`textcl.io.tables.load_table`: a .txt file, one text a
line; csv/tsv/jsonl/parquet files; Hub dataset ids) and BEIR folders (every relevant document of a
query is a positive). Rows stay in a `datasets.Dataset` (Arrow, memory-mapped) or stream as an
`IterableDataset`.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import datasets

from textcl.config import DataArguments
from textcl.errors import TextclError
from textcl.io.beir import beir_pairs
from textcl.io.tables import load_table, natural_order, negative_column_names, score_column


def load_source(source: str, args: DataArguments) -> datasets.Dataset | datasets.IterableDataset:
    """The raw table of one `train_data` source, before column mapping."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "qrels").is_dir():
            raise TextclError(f"train_data {source!r} is a folder but not a BEIR folder (no qrels/); pass a data file")
        anchors, positives, _ = beir_pairs(path, args.train_split)
        return datasets.Dataset.from_dict({"anchor": anchors, "positive": positives})
    return load_table(source, split=args.train_split, streaming=args.streaming, what="train_data",
                      delimiter=args.delimiter)


def negative_columns(columns: list[str], args: DataArguments) -> list[str]:
    """Configured negative columns, else every column named negative*, in natural order (negative_2 < negative_10)."""
    chosen = natural_order(args.negative_columns) if args.negative_columns else negative_column_names(columns)
    return chosen[: args.num_negatives] if args.num_negatives is not None else chosen


def column_plan(columns: list[str], args: DataArguments, source: str, teacher_scores: bool = False) -> dict[str, Any]:
    """Which source column feeds which row field; a one-line error names the columns found. With
    `teacher_scores`, also the `<column>_score` column of the positive and of each negative column."""
    if columns == ["text"] and Path(source).suffix == ".txt":
        if teacher_scores:
            raise missing_scores(source, "positive_score", "a text file has no teacher scores")
        return {"anchor": "text", "positive": None, "negatives": [], "label": None, "scores": []}
    found = f"columns found: {', '.join(columns)}"
    plan = {"anchor": args.anchor_column, "positive": args.positive_column or None, "label": args.label_column}
    plan["negatives"] = negative_columns(columns, args)
    if plan["positive"] not in columns and args.label_column and args.positive_column == "positive":
        plan["positive"] = None
    for role in ("anchor", "positive", "label"):
        if plan[role] is not None and plan[role] not in columns:
            hint = " (or positive_column: null for dropout positives)" if role == "positive" else ""
            raise TextclError(f"{role} column {plan[role]!r} not in {source}; {found}; set {role}_column{hint}")
    for column in plan["negatives"]:
        if column not in columns:
            raise TextclError(f"negative column {column!r} not in {source}; {found}; set negative_columns")
    plan["scores"] = []
    if teacher_scores:
        plan["scores"] = [score_column(c) for c in [plan["positive"] or "positive", *plan["negatives"]]]
        for column in plan["scores"]:
            if column not in columns:
                raise missing_scores(source, column, found)
    return plan


def missing_scores(source: str, column: str, found: str) -> TextclError:
    return TextclError(
        f"distill_loss kl and margin_mse read teacher scores from the data, but {source} has no {column!r} column "
        f"({found}); write them with `textcl score TEACHER --data FILE --out FILE` (or `textcl mine MODEL --teacher "
        "TEACHER ...`) and train on that file"
    )


def score_of(value: Any, column: str, source: str, index: int) -> float:
    """A teacher score cell as a float (CSV cells are text); a missing or unreadable one is a TextclError."""
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = math.nan
    if math.isnan(score):
        raise TextclError(f"row {index + 1} of {source!r} has a text without a teacher score ({column}: {value!r}); "
                          "score the file again with `textcl score`")
    if math.isinf(score):  # inf, "1e999" (overflows to inf), -inf: a non-finite loss for its whole batch
        raise TextclError(f"row {index + 1} of {source!r} has an infinite teacher score ({column}: {value!r}); "
                          "score the file again with `textcl score`")
    return score


BLANK_LINE = "a blank line"


def as_text(value: Any) -> str | None:
    """A cell as text: strings as they are, numbers and booleans as they read in the file (`3`, `1.5`, `true`);
    None for a missing value (None, NaN) and for anything that is not text (a list, a dict)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return None if isinstance(value, float) and math.isnan(value) else str(value)  # NaN: a missing cell
    return None


def present(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip())


def problem_of(value: Any, role: str) -> str | None:
    """Why a row's `role` cell cannot be used ("an empty anchor", ...), or None when it is text."""
    if present(as_text(value)):
        return None
    if value is None or isinstance(value, (str, int, float)):
        return f"an empty {role}" if role == "anchor" else "no positive"
    return f"an {role} that is not text" if role == "anchor" else "a positive that is not text"


def to_rows(table: Any, args: DataArguments, source: str, report: bool = True, teacher_scores: bool = False) -> Any:
    """Map a raw table to rows. Cells that are numbers or booleans become text. Blank negatives are skipped (a
    row may have fewer); rows with an empty anchor, or an empty or null positive (`missing_positive`: error,
    drop or dropout), are dropped, counted and reported by reason and row number (`report`: print it).
    With `teacher_scores`, rows also hold `teacher_scores`: the positive's score, then each kept negative's."""
    columns = list(table.column_names or next(iter(table)).keys())
    plan = column_plan(columns, args, source, teacher_scores)
    streaming = isinstance(table, datasets.IterableDataset)
    lines = Path(source).suffix == ".txt"  # a text file's blank lines separate texts: dropped unreported

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows: dict[str, list] = {"anchor": [], "positive": [], "negatives": [], "label": [], "dropped": []}
        if plan["scores"]:
            rows["teacher_scores"] = []
        for i, index in enumerate(indices):
            anchor = batch[plan["anchor"]][i]
            positive = batch[plan["positive"]][i] if plan["positive"] else None
            reason = problem_of(anchor, "anchor")
            reason = BLANK_LINE if reason and lines else reason
            if plan["positive"] and reason is None:
                reason = problem_of(positive, "positive")
                if reason == "no positive" and args.missing_positive == "dropout":
                    reason, positive = None, None
                elif reason == "no positive" and args.missing_positive == "error" and streaming:
                    raise missing_positives(source, 1, [index])
            negatives = [as_text(batch[c][i]) for c in plan["negatives"]]
            rows["anchor"].append(as_text(anchor) or "")
            rows["positive"].append(None if positive is None else as_text(positive))
            rows["negatives"].append([n for n in negatives if present(n)])
            if plan["scores"]:  # the positive's score, then those of the negatives kept above
                kept = [True] + [present(n) for n in negatives]
                rows["teacher_scores"].append([
                    score_of(batch[c][i], c, source, index) if not reason else 0.0
                    for c, keep in zip(plan["scores"], kept) if keep
                ])
            rows["label"].append(batch[plan["label"]][i] if plan["label"] else None)
            rows["dropped"].append(reason or "")
            if reason and streaming and report and reason not in reported and reason != BLANK_LINE:
                reported.add(reason)
                print(f"textcl: warning: dropping rows of {source!r} with {reason} (the first: row {index + 1}); "
                      "a stream is not counted ahead", file=sys.stderr)
        return rows

    reported: set[str] = set()
    converted = table.map(convert, batched=True, with_indices=True, remove_columns=columns,
                          features=row_features(table, plan))
    if not streaming:
        check_dropped(converted, args, source, report)
    return converted.filter(lambda batch: [not reason for reason in batch["dropped"]], batched=True,
                            ).remove_columns("dropped")


def row_features(table: Any, plan: dict[str, Any]) -> datasets.Features | None:
    """Text columns typed as text: a source column read as JSON values (numbers and strings mixed) would turn
    the text "1" back into the number 1. The label keeps its source type."""
    source = table.features
    if source is None:
        return None
    label = source[plan["label"]] if plan["label"] else datasets.Value("null")
    text = datasets.Value("string")
    features = {"anchor": text, "positive": text, "negatives": datasets.List(text), "label": label, "dropped": text}
    if plan["scores"]:
        features["teacher_scores"] = datasets.List(datasets.Value("float32"))
    return datasets.Features(features)


def missing_positives(source: str, count: int, rows: list[int]) -> TextclError:
    counted = f"1 row of {source!r} has" if count == 1 else f"{count} rows of {source!r} have"
    return TextclError(
        f"{counted} no positive ({row_numbers(rows)}); fill them, or set missing_positive: drop (leave them out) "
        "or dropout (each is its own positive, as in unsupervised SimCSE)"
    )


def row_numbers(indices: list[int], shown: int = 10) -> str:
    """`rows 4, 8` (1-based; the first data row is row 1), at most `shown` of them."""
    numbers = ", ".join(str(i + 1) for i in indices[:shown]) + (", ..." if len(indices) > shown else "")
    return f"row {numbers}" if len(indices) == 1 else f"rows {numbers}"


def check_dropped(rows: datasets.Dataset, args: DataArguments, source: str, report: bool) -> None:
    """Raise for missing positives under `missing_positive: error`; report every other dropped row."""
    reasons = rows["dropped"]
    by_reason: dict[str, list[int]] = {}
    for index, reason in enumerate(reasons):
        if reason:
            by_reason.setdefault(reason, []).append(index)
    blank = len(by_reason.pop(BLANK_LINE, []))
    if "no positive" in by_reason and args.missing_positive == "error":
        missing = by_reason["no positive"]
        raise missing_positives(source, len(missing), missing)
    dropped = sum(len(indices) for indices in by_reason.values())
    summary = ", ".join(f"{len(indices)} with {reason} ({row_numbers(indices)})" for reason, indices in by_reason.items())
    if dropped + blank == len(reasons):
        raise TextclError(f"all {len(reasons)} rows of {source!r} were filtered out ({summary or 'blank lines'})")
    if dropped and report:
        print(f"textcl: warning: dropped {dropped} of {len(reasons)} rows of {source!r}: {summary}", file=sys.stderr)


def tag_source(batch: dict[str, list], index: int) -> dict[str, list]:
    """The `source` column: which `train_data` source (its position in the list) the rows came from."""
    return {"source": [index] * len(batch["anchor"])}


def load_rows(args: DataArguments, report: bool = True, teacher_scores: bool = False) -> Any:
    """Rows of every source in `args.train_data`, concatenated (see module docstring), with a `source`
    column (the source's index) when `batch_per_source` or `source_instructions` needs it, and `teacher_scores`
    when asked (every source must have them); errors name the fix before any training starts, and dropped rows
    are reported (`report`) by reason."""
    parts = []
    for source in args.train_data:
        table = load_source(source, args)
        if not args.streaming and len(table) == 0:
            raise TextclError(f"train_data {source!r} has no rows")
        rows = to_rows(table, args, source, report, teacher_scores)
        if args.batch_per_source or args.source_instructions:
            rows = rows.map(tag_source, fn_kwargs={"index": len(parts)}, batched=True)
        parts.append(rows)
    rows = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if args.max_train_samples is not None:
        rows = rows.take(args.max_train_samples)
    return rows


def max_negatives(rows: Any) -> int:
    """The largest number of negatives of any row (of the first 10,000 when streaming)."""
    sample = rows.take(10_000) if isinstance(rows, datasets.IterableDataset) else rows
    lengths = sample.map(lambda batch: {"k": [len(n) for n in batch["negatives"]]}, batched=True,
                         remove_columns=sample.column_names)
    return max(lengths["k"] if not isinstance(lengths, datasets.IterableDataset) else (r["k"] for r in lengths),
               default=0)


def has_dropout_positives(rows: Any) -> bool:
    """Some row is its own positive (`positive` None; of the first 10,000 when streaming)."""
    if isinstance(rows, datasets.IterableDataset):
        return any(row["positive"] is None for row in rows.take(10_000))
    return rows.with_format("arrow")["positive"].null_count > 0
