"""Batches without in-batch duplicates, reshuffled every epoch, for map-style and streaming data.

A text that appears twice in one batch becomes its own negative (a false negative the loss cannot
tell apart), so a row whose anchor, positive or negatives already occur in the open batch waits for
a later one. Written by hand because neither torch nor datasets offers a constraint-aware batcher;
one pass with a waiting list keeps it linear in the number of rows (fast at batch 4096).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from textcl.data.collator import text_id

T = TypeVar("T")


def greedy_batches(
    items: Iterable[T], ids_of: Callable[[T], set[int]], batch_size: int, drop_last: bool
) -> Iterator[list[T]]:
    """Group `items` in order into batches whose id sets are disjoint; clashing items wait for the next batch."""
    batch: list[T] = []
    seen: set[int] = set()
    waiting: deque[tuple[T, set[int]]] = deque()

    def place(item: T, ids: set[int]) -> bool:
        if len(batch) < batch_size and seen.isdisjoint(ids):
            batch.append(item)
            seen.update(ids)
            return True
        return False

    def next_batch() -> list[T]:
        """Close the open batch, then give every waiting item one chance at the new one."""
        nonlocal batch, seen
        closed, batch, seen = batch, [], set()
        for _ in range(len(waiting)):
            item, ids = waiting.popleft()
            if not place(item, ids):
                waiting.append((item, ids))
        return closed

    for item in items:
        ids = ids_of(item)
        if not place(item, ids):
            waiting.append((item, ids))
        while len(batch) == batch_size:
            yield next_batch()
    while waiting:  # the last items all clash with the open batch: close it early
        closed = next_batch()
        if closed and (len(closed) == batch_size or not drop_last):
            yield closed
    if batch and (len(batch) == batch_size or not drop_last):
        yield batch


class NoDuplicatesBatchSampler:
    """Batch sampler (lists of row indices) with no text id twice in a batch.

    Args:
        text_ids: per row, the ids of its texts (anchor, positive, negatives; see `row_ids`).
        batch_size: rows per batch.
        drop_last: drop partial batches.
        seed: the epoch's order is `default_rng([seed, epoch]).permutation`, so it is reproducible.
        lengths: optional `[rows]` text lengths; when given, rows are sorted by length inside windows
            of 50 batches (less padding), and the batch order is shuffled.
        sources: optional `[rows]` source index (which `train_data` a row came from); when given, every
            batch holds rows of one source (its in-batch negatives come from the same task and domain,
            sentence-transformers' multi-dataset batches) and the batches of all sources are shuffled
            together, so each source is drawn in proportion to its size.
    """

    def __init__(
        self,
        text_ids: list[list[int]],
        batch_size: int,
        drop_last: bool = False,
        seed: int = 0,
        lengths: np.ndarray | None = None,
        sources: np.ndarray | None = None,
    ) -> None:
        self.row_ids = [set(ids) for ids in text_ids]
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed = seed
        self.lengths = lengths
        self.sources = np.zeros(len(text_ids), dtype=np.int64) if sources is None else np.asarray(sources)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Fix the batches of `epoch`, so `len` is exact before iterating."""
        self.epoch = epoch
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.row_ids))
        if self.lengths is not None:
            window = self.batch_size * 50
            chunks = np.split(order, range(window, len(order), window))
            order = np.concatenate([chunk[np.argsort(-self.lengths[chunk], kind="stable")] for chunk in chunks])
        self.batches = []
        kinds = np.unique(self.sources)
        for source in kinds:
            rows = order[self.sources[order] == source].tolist()
            self.batches += greedy_batches(rows, self.row_ids.__getitem__, self.batch_size, self.drop_last)
        if self.lengths is not None or len(kinds) > 1:
            self.batches = [self.batches[i] for i in rng.permutation(len(self.batches))]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def row_ids(row: dict[str, Any]) -> set[int]:
    """Ids of a row's texts; a dropout positive (None) is its anchor."""
    return {text_id(row["anchor"]), text_id(row["positive"] or row["anchor"]), *map(text_id, row["negatives"])}


class StreamBatches(torch.utils.data.IterableDataset):
    """Batches (lists of rows) drawn from a streaming dataset through a shuffle buffer, no duplicates."""

    def __init__(self, rows: Any, batch_size: int, seed: int, drop_last: bool, buffer_size: int = 10_000) -> None:
        self.rows = rows.shuffle(seed=seed, buffer_size=buffer_size)
        self.batch_size, self.drop_last = batch_size, drop_last

    def set_epoch(self, epoch: int) -> None:
        self.rows.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return greedy_batches(self.rows, row_ids, self.batch_size, self.drop_last)


def row_index(rows: Any, with_lengths: bool) -> tuple[list[list[int]], np.ndarray | None, np.ndarray | None]:
    """Per row, the ids of its texts (for `NoDuplicatesBatchSampler`), optionally the anchor length, and
    the source index when the rows carry one."""

    def index(batch: dict[str, list]) -> dict[str, list]:
        rows_of_batch = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {"ids": [sorted(row_ids(row)) for row in rows_of_batch], "length": [len(a) for a in batch["anchor"]]}

    table = rows.map(index, batched=True, remove_columns=[c for c in rows.column_names if c != "source"])
    lengths = np.asarray(table["length"]) if with_lengths else None
    return table["ids"], lengths, np.asarray(table["source"]) if "source" in table.column_names else None
