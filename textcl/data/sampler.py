"""Batches without in-batch duplicates, reshuffled every epoch, for map-style and streaming data.

A text that appears twice in one batch becomes its own negative (a false negative the loss cannot
tell apart), so a row whose anchor, positive or negatives already occur in the open batch waits for
a later one. Written by hand because neither torch nor datasets offers a constraint-aware batcher;
one pass with a waiting list keeps it linear in the number of rows (fast at batch 4096).

An epoch always has `planned_batches(rows, batch_size)` batches of at least 2 rows (one row has no negative:
loss 0), so the steps a run plans are the steps it runs. Rows that fit in none of them without a duplicate (a
positive shared by more rows than there are batches) are left out of that epoch and counted (`left_out`); the
next epoch's order may place them.
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


def planned_batches(rows: int, batch_size: int, drop_last: bool = False) -> int:
    """Batches of an epoch of `rows` rows: the full ones, plus the short last one unless `drop_last` or it would
    hold a single row (no negative to contrast)."""
    full, rest = divmod(rows, batch_size)
    return full + (1 if rest >= 2 and not drop_last else 0)


def fit_batches(
    batches: list[list[T]], count: int, ids_of: Callable[[T], set[int]], batch_size: int
) -> tuple[list[list[T]], int]:
    """(`count` batches of at least 2 rows made from greedy `batches`, rows left out). The rows of batches past
    `count` join an earlier one with room and no shared text; a one-row batch takes a row from a batch of 3 or
    more; what still fits nowhere is left out (and a batch left with one row too, the epoch then being short)."""
    kept, surplus = [list(b) for b in batches[:count]], [item for b in batches[count:] for item in b]
    seen = [set().union(*map(ids_of, batch)) for batch in kept]
    left_out = 0

    def make_room(full: int) -> bool:
        """Move one row of batch `full` (of its first 64: bounded work on data where most rows clash) to another
        batch with room and none of its texts."""
        for row in kept[full][:64]:
            row_ids = ids_of(row)
            other = next((i for i in range(len(kept)) if i != full and fits(i, row_ids)), None)
            if other is not None:
                kept[full].remove(row)
                seen[full] -= row_ids
                move(row, row_ids, other)
                return True
        return False

    def fits(i: int, ids: set[int]) -> bool:
        return len(kept[i]) < batch_size and seen[i].isdisjoint(ids)

    def move(item: T, ids: set[int], i: int) -> None:
        kept[i].append(item)
        seen[i] |= ids

    for item in surplus:
        ids = ids_of(item)
        room = next((i for i in range(len(kept)) if fits(i, ids)), None)
        if room is None:  # a full batch without its texts may pass one of its rows on to a batch with room
            room = next((i for i in range(len(kept)) if seen[i].isdisjoint(ids) and make_room(i)), None)
        if room is None:
            left_out += 1
        else:
            move(item, ids, room)
    for lone in [i for i, batch in enumerate(kept) if len(batch) < 2]:
        ids = seen[lone]
        for donor in (d for d in range(len(kept)) if len(kept[d]) >= 3):
            moved = next((item for item in kept[donor] if ids_of(item).isdisjoint(ids)), None)
            if moved is not None:
                kept[donor].remove(moved)
                kept[lone].append(moved)
                break
    short = [batch for batch in kept if len(batch) < 2]
    return [batch for batch in kept if len(batch) >= 2], left_out + sum(map(len, short))


class NoDuplicatesBatchSampler:
    """Batch sampler (lists of row indices) with no text id twice in a batch.

    After `set_epoch`, `batches` holds the epoch's batches and `left_out` the rows that fit in none.

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
        self.batches, self.left_out = [], 0
        kinds = np.unique(self.sources)
        for source in kinds:
            rows = order[self.sources[order] == source].tolist()
            greedy = list(greedy_batches(rows, self.row_ids.__getitem__, self.batch_size, False))
            count = planned_batches(len(rows), self.batch_size, self.drop_last)
            batches, left_out = fit_batches(greedy, count, self.row_ids.__getitem__, self.batch_size)
            self.batches += batches
            self.left_out += left_out
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
        batches = greedy_batches(self.rows, row_ids, self.batch_size, self.drop_last)
        return (batch for batch in batches if len(batch) >= 2)  # one row: no negative to contrast


def row_index(rows: Any, with_lengths: bool) -> tuple[list[list[int]], np.ndarray | None, np.ndarray | None]:
    """Per row, the ids of its texts (for `NoDuplicatesBatchSampler`), optionally the anchor length, and
    the source index when the rows carry one."""

    def index(batch: dict[str, list]) -> dict[str, list]:
        rows_of_batch = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {"ids": [sorted(row_ids(row)) for row in rows_of_batch], "length": [len(a) for a in batch["anchor"]]}

    table = rows.map(index, batched=True, remove_columns=[c for c in rows.column_names if c != "source"])
    lengths = np.asarray(table["length"]) if with_lengths else None
    return table["ids"], lengths, np.asarray(table["source"]) if "source" in table.column_names else None
