"""Training data: any source -> rows `{anchor, positive, negatives, label}` (ARCHITECTURE.md, "Rows").

`positive` None means a dropout positive (the anchor encoded a second time, unsupervised SimCSE).
Sources: whatever the one table reader reads (`textcl.io.tables.load_table`: a .txt file, one text a
line; csv/tsv/jsonl/parquet files; Hub dataset ids) and BEIR folders (every relevant document of a
query is a positive). Rows stay in a `datasets.Dataset` (Arrow, memory-mapped) or stream as an
`IterableDataset`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import datasets

from textcl.config import DataArguments
from textcl.errors import TextclError
from textcl.io.beir import beir_pairs
from textcl.io.tables import load_table


def load_source(source: str, args: DataArguments) -> datasets.Dataset | datasets.IterableDataset:
    """The raw table of one `train_data` source, before column mapping."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "qrels").is_dir():
            raise TextclError(f"train_data {source!r} is a folder but not a BEIR folder (no qrels/); pass a data file")
        anchors, positives, _ = beir_pairs(path, args.train_split)
        return datasets.Dataset.from_dict({"anchor": anchors, "positive": positives})
    return load_table(source, split=args.train_split, streaming=args.streaming, what="train_data")


def negative_columns(columns: list[str], args: DataArguments) -> list[str]:
    """Configured negative columns, else every column named negative*, in natural order (negative_2 < negative_10)."""
    chosen = list(args.negative_columns) or [
        c for c in columns if c.startswith("negative") and "score" not in c
    ]
    chosen.sort(key=lambda c: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", c)])
    return chosen[: args.num_negatives] if args.num_negatives is not None else chosen


def column_plan(columns: list[str], args: DataArguments, source: str) -> dict[str, Any]:
    """Which source column feeds which row field; a one-line error names the columns found."""
    if columns == ["text"] and Path(source).suffix == ".txt":
        return {"anchor": "text", "positive": None, "negatives": [], "label": None}
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
    return plan


def to_rows(table: Any, args: DataArguments, source: str) -> Any:
    """Map a raw table to rows; blank negatives are skipped (a row may have fewer), and rows with an empty
    anchor or positive are dropped."""
    columns = list(table.column_names or next(iter(table)).keys())
    plan = column_plan(columns, args, source)

    def convert(batch: dict[str, list]) -> dict[str, list]:
        size = len(batch[plan["anchor"]])
        return {
            "anchor": batch[plan["anchor"]],
            "positive": batch[plan["positive"]] if plan["positive"] else [None] * size,
            "negatives": [[n for n in values if present(n)] for values in zip(*(batch[c] for c in plan["negatives"]))]
            or [[]] * size,
            "label": batch[plan["label"]] if plan["label"] else [None] * size,
        }

    return table.map(convert, batched=True, remove_columns=columns).filter(complete, batched=True)


def present(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip())


def complete(batch: dict[str, list]) -> list[bool]:
    """Keep rows whose anchor and positive (unless a dropout positive) are non-blank."""
    return [present(a) and (p is None or present(p)) for a, p in zip(batch["anchor"], batch["positive"])]


def tag_source(batch: dict[str, list], index: int) -> dict[str, list]:
    """The `source` column: which `train_data` source (its position in the list) the rows came from."""
    return {"source": [index] * len(batch["anchor"])}


def load_rows(args: DataArguments) -> Any:
    """Rows of every source in `args.train_data`, concatenated (see module docstring), with a `source`
    column (the source's index) when `batch_per_source` needs it; errors name the fix before any training
    starts."""
    parts = []
    for source in args.train_data:
        table = load_source(source, args)
        if not args.streaming and len(table) == 0:
            raise TextclError(f"train_data {source!r} has no rows")
        rows = to_rows(table, args, source)
        if not args.streaming and len(rows) == 0:
            raise TextclError(f"all {len(table)} rows of {source!r} were filtered out (empty anchor or positive)")
        if args.batch_per_source:
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
