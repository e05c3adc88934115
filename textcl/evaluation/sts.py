"""STS evaluation: Spearman and Pearson correlation of cosine similarity with gold similarity scores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import pearsonr, spearmanr

from textcl.errors import TextclError
from textcl.io.tables import column, read_records
from textcl.model.text_encoder import TextEncoder
from textcl.model.text_inputs import ENCODE_BATCH_SIZE

STS_COLUMNS = ("sentence1", "sentence2", "score")


def correlations(gold: Sequence[float], predicted: Sequence[float]) -> dict[str, float]:
    """{"spearman", "pearson"} of `predicted` scores `[n]` against `gold` `[n]`."""
    return {
        "spearman": float(spearmanr(gold, predicted).statistic),
        "pearson": float(pearsonr(gold, predicted).statistic),
    }


def read_sts(
    path: str | Path, columns: Sequence[str] = STS_COLUMNS, split: str = "test"
) -> tuple[list[str], list[str], np.ndarray]:
    """(first sentences, second sentences, gold scores `[n]`) of an STS table (any `load_table` source; split
    `split` of a Hub dataset)."""
    rows = read_records(path, "STS file", split)
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
    encoder: TextEncoder,
    first: Sequence[str],
    second: Sequence[str],
    batch_size: int,
    max_seq_length: int | None,
    precision: str = "fp32",
) -> np.ndarray:
    """Cosine similarity `[n]` of each (first[i], second[i]); every distinct text is encoded once."""
    unique = list(dict.fromkeys([*first, *second]))
    position = {text: i for i, text in enumerate(unique)}
    embeddings = encoder.encode(
        unique, batch_size=batch_size, normalize=True, max_seq_length=max_seq_length, precision=precision
    )
    a = embeddings[[position[text] for text in first]]
    b = embeddings[[position[text] for text in second]]
    return np.einsum("nd,nd->n", a, b)


def evaluate_sts(
    encoder: TextEncoder,
    path_or_paths: str | Path | Sequence[str | Path],
    columns: Sequence[str] = STS_COLUMNS,
    batch_size: int = ENCODE_BATCH_SIZE,
    max_seq_length: int | None = None,
    precision: str = "fp32",
    split: str = "test",
) -> dict[str, Any]:
    """Spearman and Pearson correlation of cosine similarity with gold scores.

    STS tables are any `load_table` source (split `split` of a Hub dataset). Returns {"spearman", "pearson",
    "n", "files"}: the first two averaged over the files, "n" the total
    number of pairs, "files" the same three figures for each file.
    """
    paths = [path_or_paths] if isinstance(path_or_paths, (str, Path)) else list(path_or_paths)
    if not paths:
        raise TextclError("no STS file given")
    files = {}
    for path in paths:
        first, second, gold = read_sts(path, columns, split)
        cosines = pair_cosines(encoder, first, second, batch_size, max_seq_length, precision)
        files[str(path)] = correlations(gold, cosines) | {"n": len(gold)}
    means = {name: float(np.mean([figures[name] for figures in files.values()])) for name in ("spearman", "pearson")}
    return means | {"n": sum(figures["n"] for figures in files.values()), "files": files}
