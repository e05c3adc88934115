"""FAISS indexes from embedding arrays: any `index_factory` string, trained on a sample, filled block by block."""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from textcl.errors import TextclError


def build_faiss_index(
    parts: Sequence[np.ndarray], factory: str = "Flat", train_size: int = 100_000, seed: int = 0
) -> faiss.Index:
    """An inner-product `faiss.index_factory(dim, factory)` index holding `parts` `[n_i, dim]` in order.

    Indexes that need training (IVF, PQ) are trained on a random sample of at most `train_size` rows;
    rows are added in blocks, so memory-mapped parts are never loaded whole.
    """
    dim = parts[0].shape[1]
    total = sum(len(part) for part in parts)
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError:
        raise TextclError(f"faiss cannot build index factory {factory!r}; try Flat, IVF256,Flat or HNSW32") from None
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(total, size=min(train_size, total), replace=False))
        sample = take_rows(parts, rows)
        try:
            index.train(sample)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1]
            message = f"index {factory!r} cannot train on {len(sample)} vectors ({reason}); use fewer lists"
            raise TextclError(message) from None
    for part in parts:
        for start in range(0, len(part), 65_536):
            index.add(np.ascontiguousarray(part[start : start + 65_536], dtype=np.float32))
    return index


def take_rows(parts: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of the concatenation of `parts` -> float32 `[len(rows), dim]`, without concatenating."""
    out = np.empty((len(rows), parts[0].shape[1]), dtype=np.float32)
    offset = 0
    for part in parts:
        inside = (rows >= offset) & (rows < offset + len(part))
        out[inside] = part[rows[inside] - offset]
        offset += len(part)
    return out


def set_search_params(index: faiss.Index, params: str) -> None:
    """Apply faiss search parameters such as "nprobe=16" or "efSearch=64"."""
    if params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError:
            raise TextclError(f"faiss search parameters {params!r} do not apply to this index") from None
