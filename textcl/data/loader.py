"""The batches of a training run: rows -> no-duplicate batches -> tokenized batches, and one `set_epoch`.

`build_training_data` is what the trainer calls; it knows nothing of the model or of accelerate (it is
given the tokenizer, the process count and this process's index).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from textcl.config import DataArguments
from textcl.data.collator import ContrastiveCollator
from textcl.data.holdout import HeldOut, split_held_out
from textcl.data.rows import has_dropout_positives, load_rows, max_negatives
from textcl.data.sampler import NoDuplicatesBatchSampler, StreamBatches, row_index
from textcl.errors import TextclError


@dataclass
class TrainingData:
    """A DataLoader of tokenized batches (see `ContrastiveCollator`) and what the run's summary needs to know.

    `rows` is None for streamed data (no length); `dropout_positives`: some rows are their own positive;
    `num_negatives`: the most hard negatives a row has (0: in-batch negatives only); `held_out`: the rows
    `eval_split` keeps out of training.
    """

    loader: DataLoader
    batcher: NoDuplicatesBatchSampler | StreamBatches
    collator: ContrastiveCollator
    rows: int | None
    dropout_positives: bool
    num_negatives: int
    held_out: HeldOut | None = None

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the batches and re-draw the augmentations of `epoch` (deterministic, so resumable)."""
        self.batcher.set_epoch(epoch)
        self.collator.epoch = epoch


def repeated_texts(rows: Any) -> str:
    """`11 rows repeat another row's positive (289 distinct positives in 300 rows)`, for each role whose texts
    repeat, joined by "; " ("" when none does)."""
    import pyarrow.compute as pc  # datasets' own dependency

    table, said = rows.with_format("arrow"), []
    for role in ("positive", "anchor"):
        values = table[role]
        present = len(values) - values.null_count
        distinct = pc.count_distinct(values, mode="only_valid").as_py()
        if distinct < present:
            said.append(f"{present - distinct} rows repeat another row's {role} ({distinct} distinct {role}s in "
                        f"{present} rows)")
    return "; ".join(said)


def warn_about_duplicates(rows: Any, sampler: NoDuplicatesBatchSampler, batch_size: int) -> None:
    """Say so, naming the repeated texts and how often, when repeats leave rows out of an epoch's batches or
    batches at less than half their size: a batch never holds a text twice (it would be its own negative)."""
    sizes = [len(batch) for batch in sampler.batches]
    average = sum(sizes) / max(1, len(sizes))
    if not sampler.left_out and average >= batch_size / 2:
        return
    cause = repeated_texts(rows) or "the rows share texts (anchors, positives or negatives)"
    effect = (f"{sampler.left_out} rows fit in no batch of the epoch without a duplicate and are left out of it"
              if sampler.left_out else f"batches hold {average:.1f} rows on average instead of {batch_size}")
    print(f"textcl: warning: {cause}: {effect} (a batch never holds a text twice: it would be its own negative); "
          "deduplicate the data or lower per_device_train_batch_size", file=sys.stderr)


def build_training_data(
    data: DataArguments,
    *,
    tokenizer: Any,
    max_seq_length: int,
    prompts: dict[str, str],
    batch_size: int,
    seed: int,
    drop_last: bool = False,
    num_processes: int = 1,
    process_index: int = 0,
    teacher_scores: bool = False,
    source_query_prompts: tuple[str, ...] = (),
    prompt_length: Callable[[str], int] | None = None,
) -> TrainingData:
    """Load the rows of `data` and batch them `batch_size` rows per process; errors name the fix before any
    training starts. `teacher_scores`: read the data's `<column>_score` columns (distillation) into the batches.
    `source_query_prompts` and `prompt_length`: see `ContrastiveCollator`. Streams are split between processes
    here; map-style batches are split by the caller (accelerate's prepared loader)."""
    rows = load_rows(data, report=process_index == 0, teacher_scores=teacher_scores)
    held_out = None
    if data.eval_split:
        if data.streaming:
            raise TextclError("eval_split holds rows out of map-style data: set streaming: false (or drop eval_split)")
        total = len(rows)
        rows, held_out = split_held_out(rows, data.eval_split, seed)
        if process_index == 0:
            shared = (f"; {held_out.dropped} more rows share a held-out text and are left out of training"
                      if held_out.dropped else "")
            print(f"textcl: holding out {len(held_out.anchors)} of {total} rows to evaluate on (eval_split "
                  f"{data.eval_split:g}, seed {seed}){shared}", file=sys.stderr)
    collator = ContrastiveCollator(
        tokenizer=tokenizer,
        query_max_length=data.query_max_length or max_seq_length,
        document_max_length=data.document_max_length or max_seq_length,
        num_negatives=max_negatives(rows),
        query_prompt=prompts.get("query", ""),
        document_prompt=prompts.get("document", ""),
        augment=tuple(data.augment),
        seed=seed,
        source_query_prompts=tuple(source_query_prompts),
        prompt_length=prompt_length,
    )
    generator = torch.Generator().manual_seed(seed)  # keeps DataLoader seeding off the global RNG
    summary = dict(dropout_positives=has_dropout_positives(rows), num_negatives=collator.num_negatives,
                   held_out=held_out)
    if data.streaming:
        from datasets.distributed import split_dataset_by_node  # streaming only

        shard = split_dataset_by_node(rows, rank=process_index, world_size=num_processes)
        batches = StreamBatches(shard, batch_size, seed, drop_last)
        loader = DataLoader(batches, batch_size=None, collate_fn=collator, generator=generator)
        return TrainingData(loader, batches, collator, None, **summary)
    global_batch = batch_size * num_processes
    if global_batch > len(rows):
        raise TextclError(
            f"batch of {global_batch} rows ({batch_size} per device x {num_processes}) is larger than "
            f"the {len(rows)} training rows: lower per_device_train_batch_size"
        )
    ids, lengths, sources = row_index(rows, data.group_by_length)
    sampler = NoDuplicatesBatchSampler(ids, batch_size, drop_last, seed, lengths,
                                       sources if data.batch_per_source else None)
    if not sampler.batches:
        raise TextclError(f"no batch of 2 rows can be made without a text twice in it ("
                          f"{repeated_texts(rows) or 'every row shares a text with every other'}); deduplicate the data")
    if process_index == 0:
        warn_about_duplicates(rows, sampler, batch_size)
    loader = DataLoader(rows, batch_sampler=sampler, collate_fn=collator, generator=generator)
    return TrainingData(loader, sampler, collator, len(rows), **summary)
