"""(anchor, positive) pairs for mining and scoring: from a table or a BEIR folder."""

from __future__ import annotations

from pathlib import Path

from textcl.errors import TextclError
from textcl.io.beir import beir_pairs
from textcl.io.tables import column, negative_column_names, read_records


def read_pairs(
    path: str | Path,
    split: str = "train",
    anchor_column: str = "anchor",
    positive_column: str = "positive",
    allow_missing: bool = False,
) -> tuple[list[str], list[str], list[str]]:
    """(anchors, positives, default corpus) of a pairs table (any `load_table` source) or a BEIR folder.

    A BEIR folder gives one (query, document) pair per relevant document of `split` and its corpus;
    a pairs file gives an empty default corpus (the positives themselves are the candidates).
    """
    if Path(path).is_dir():
        return beir_pairs(path, split, allow_missing)
    rows = read_records(path, "pairs file", split)
    anchors = column(rows, anchor_column, path, "--anchor_column")
    positives = column(rows, positive_column, path, "--positive_column")
    kept = [(a, p) for a, p in zip(anchors, positives) if a.strip() and p.strip()]
    if not kept:
        raise TextclError(f"pairs file {str(path)!r} has no row with both an anchor and a positive")
    return [a for a, _ in kept], [p for _, p in kept], []


def read_evaluation_pairs(
    path: str | Path, anchor_column: str = "anchor", positive_column: str = "positive"
) -> tuple[list[str], list[str], list[list[str]]]:
    """(anchors, positives, per row its negatives: the non-empty cells of the negative* columns) of a pairs table,
    rows without both an anchor and a positive left out; for `textcl eval --pairs`."""
    rows = read_records(path, "pairs file")
    anchors = column(rows, anchor_column, path, "--anchor_column")
    positives = column(rows, positive_column, path, "--positive_column")
    columns = [column(rows, name, path, "--negative_columns") for name in negative_column_names(list(rows[0]))]
    negatives = [[cells[i] for cells in columns if cells[i].strip()] for i in range(len(rows))]
    kept = [i for i, (a, p) in enumerate(zip(anchors, positives)) if a.strip() and p.strip()]
    if not kept:
        raise TextclError(f"pairs file {str(path)!r} has no row with both an anchor and a positive")
    return [anchors[i] for i in kept], [positives[i] for i in kept], [negatives[i] for i in kept]
