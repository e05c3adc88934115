"""One training step: embed the batch, compute the loss, backward (plainly or with GradCache).

Two things make a step cheaper without changing what is computed:
- Dropout positives (unsupervised SimCSE) take ONE forward over the anchors stacked twice: the two
  halves get independent dropout masks, and the batch pays one call's overhead instead of two.
- Each group is sorted by length and embedded in chunks of `forward_chunk_size` rows, each padded only
  to its own longest text (with GradCache, its chunks are sorted the same way). A text's embedding
  does not depend on its batch-mates, so only the padding work disappears (a quarter of all tokens
  in batches of short sentences); the loss still sees the whole batch, in its original order.

Every process makes the same collectives in the same order, whatever its batch holds. A forward of the
wrapped model is a collective (DDP broadcasts the buffers; FSDP and ZeRO-3 gather the weights), and how many
forwards a batch takes depends on local data: chunks of `forward_chunk_size` or GradCache, a negatives group
only when the batch has negatives, the anchors twice for dropout positives, a short last batch. So
`StepRunner.batches` agrees on it once per batch, with one all-reduce of two integers (the most forwards any
process needs, and whether any process ran out of data); a process that needs fewer embeds padding chunks of
one row, whose outputs join the loss with weight zero (zero gradients, the same collectives in backward).
The loss's own collectives (gathering embeddings, ids and masks) depend only on the run's settings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import Tensor, nn

from textcl.losses.distributed import max_over_processes
from textcl.losses.gradcache import gradcache_backward, split_batch
from textcl.losses.queue import MomentumEncoder, NegativeQueue
from textcl.model.encoder import Encoder
from textcl.training.plan import StepOptions
from textcl.training.statistics import contrastive_stats

Features = dict[str, Tensor]


def stacked(features: Features) -> Features:
    """The same tokenized batch twice, `[2B, T]`."""
    return {key: torch.cat([value, value]) for key, value in features.items()}


def groups_of(batch: dict[str, Any]) -> list[Features]:
    """The tokenized groups to embed: anchors (stacked twice for dropout positives), positives, negatives."""
    anchors = batch["anchor"] if batch["positive"] is not None else stacked(batch["anchor"])
    return [group for group in (anchors, batch["positive"], batch["negatives"]) if group is not None]


def group_rows(batch: dict[str, Any]) -> list[int]:
    """Rows of each group that `groups_of(batch)` returns, without building them."""
    anchors = batch["anchor"]["input_ids"].shape[0]
    rows = [2 * anchors if batch["positive"] is None else anchors]
    return rows + [batch[key]["input_ids"].shape[0] for key in ("positive", "negatives") if batch[key] is not None]


def forwards_needed(batch: dict[str, Any], rows_per_forward: int) -> int:
    """How many forwards of the model `batch` takes in chunks of `rows_per_forward` rows (0: whole groups)."""
    size = rows_per_forward
    return sum(math.ceil(rows / size) if size else 1 for rows in group_rows(batch))


def padding_chunk(batch: dict[str, Any]) -> Features:
    """The batch's first anchor alone, trimmed of padding: the cheapest forward any model accepts."""
    return split_batch({key: value[:1] for key, value in batch["anchor"].items()}, 1)[0]


def by_length(features: Features) -> tuple[Features, Tensor]:
    """Rows sorted longest first, and the permutation that puts embeddings back in the original order."""
    order = features["attention_mask"].sum(dim=1).argsort(descending=True, stable=True)
    return {key: value[order] for key, value in features.items()}, order.argsort()


def split_views(embeddings: list[Tensor], batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
    """Group embeddings -> anchor `[B, d]`, positive `[B, d]`, negatives `[B, k, d]` (zeros where
    `negative_mask` marks padding) or None."""
    size = batch["anchor_ids"].shape[0]
    first, *rest = embeddings
    if batch["positive"] is None:
        anchor, positive = first[:size], first[size:]
    else:
        anchor, positive = first, rest.pop(0)
    mask = batch["negative_mask"]
    if mask is None:
        return anchor, positive, None
    # Without real negatives in this batch, an empty slice of the graph (not a fresh tensor): the negatives then
    # require grad on every process alike, so every process joins the backward of gathering them.
    real = rest[0] if rest else first[:0]
    slots = mask.flatten().nonzero().squeeze(1)
    negatives = first.new_zeros(mask.numel(), first.shape[1]).index_copy(0, slots, real)
    return anchor, positive, negatives.view(*mask.shape, -1)


def optimizer_step(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> bool:
    """`optimizer.step()`; False when it left the weights as they were (an fp16 overflow: inf or NaN gradients).

    accelerate's `step_was_skipped` misses the skips of a fused optimizer (our AdamW), which takes the step call
    and skips inside its kernel; the loss scale tells instead, as in transformers: it falls only after an
    overflow. DeepSpeed scales the loss itself and reports its skips on the optimizer.
    """
    scaler = accelerator.scaler
    before = scaler.get_scale() if scaler is not None else None
    optimizer.step()
    overflowed = scaler is not None and scaler.get_scale() < before
    return not (overflowed or getattr(optimizer, "step_was_skipped", False))


class StepRunner:
    """Computes the loss of a batch and runs its backward; keeps what the logger reports.

    Optional helpers: a negative queue filled by a momentum encoder (MoCo / ESimCSE), a frozen
    guide model whose similarities decide which candidates are false negatives, and a frozen teacher whose
    embeddings of the batch a distillation loss (`DistilledLoss`, distill_loss: mse) matches. Teacher scores
    that came with the data (`batch["teacher_scores"]`) go to the loss as they are. Per optimizer step (which
    may span several micro-batches with gradient accumulation): `backward` for each batch from `batches`,
    then `end_step` once the optimizer had its turn.
    """

    def __init__(
        self,
        options: StepOptions,
        model: nn.Module,
        loss: nn.Module,
        accelerator: Accelerator,
        momentum: MomentumEncoder | None = None,
        guide: Encoder | None = None,
        teacher: Encoder | None = None,
    ) -> None:
        self.model, self.loss, self.accelerator = model, loss, accelerator
        self.chunk_size = options.gradcache_chunk_size
        self.forward_chunk_size = options.forward_chunk_size  # the plan's: 32 rows on CPU, whole groups on GPUs
        self.mask_duplicates = options.mask_duplicate_texts
        self.momentum, self.guide, self.teacher = momentum, guide, teacher
        self.queue = None
        if momentum is not None:
            # Built before accelerate.prepare; DDP has since broadcast rank 0's weights, which differ from this
            # process's own wherever a head was initialised fresh (Dense, MLP head, LoRA): start from those.
            momentum.copy_from(accelerator.unwrap_model(model))
            self.queue = NegativeQueue(options.queue_size, accelerator.unwrap_model(model).dim)
            self.queue.to(accelerator.device)
        self.losses: list[Tensor] = []  # this process's loss of each micro-batch since the last optimizer step
        self.keys: list[Tensor] = []  # the momentum encoder's keys of each of those micro-batches
        self.last_views: tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None = None

    def stateful(self) -> list[Any]:
        """Objects whose state belongs in checkpoints."""
        return [module for module in (self.momentum, self.queue) if module is not None]

    def rows_per_forward(self) -> int:
        """Rows a forward embeds: the GradCache chunk, else `forward_chunk_size`; 0 for whole groups."""
        return self.chunk_size or self.forward_chunk_size

    def batches(self, loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The batches of `loader` while every process still has one, each with `forwards`: the forwards every
        process makes for it (the most any process needs). Ends for all processes when one runs out of data
        (accelerate evens map-style data out; a stream split between processes may not be even)."""
        iterator = iter(loader)
        while True:
            batch = next(iterator, None)
            need = [1, 0] if batch is None else [0, forwards_needed(batch, self.rows_per_forward())]
            exhausted, forwards = max_over_processes(need, self.accelerator.device)
            if exhausted:
                return
            yield batch | {"forwards": forwards}

    def extras(self, batch: dict[str, Any], groups: list[Features]) -> dict[str, Any]:
        """Loss keyword arguments besides the embeddings: ids, labels, queue, guide embeddings."""
        extras: dict[str, Any] = {"labels": batch["labels"], "negative_mask": batch["negative_mask"]}
        if self.mask_duplicates:
            extras |= {"positive_ids": batch["positive_ids"], "negative_ids": batch["negative_ids"]}
        if self.queue is not None:
            keys_from = batch["positive"] if batch["positive"] is not None else batch["anchor"]
            self.keys.append(self.momentum(**keys_from))
            extras["queue"] = self.queue.negatives
        if self.guide is not None:
            with torch.no_grad():
                extras["guide"] = split_views([self.guide.embed(**group) for group in groups], batch)
        if batch.get("teacher_scores") is not None:
            extras["teacher_scores"] = batch["teacher_scores"]
        if self.teacher is not None:
            with torch.no_grad():
                extras["teacher_embeddings"] = split_views([self.teacher.embed(**group) for group in groups], batch)
        return extras

    def backward(self, batch: dict[str, Any]) -> Tensor:
        """Backward of the loss of `batch` (from `batches`) into the parameters' .grad; returns this process's
        loss, detached."""
        batch = send_to_device(batch, self.accelerator.device)
        groups = groups_of(batch)
        extras = self.extras(batch, groups)
        groups, restore = zip(*(by_length(group) for group in groups))
        size = self.rows_per_forward()
        chunks = [split_batch(group, size) if size else [group] for group in groups]
        padding = [padding_chunk(batch)] * (batch["forwards"] - sum(map(len, chunks)))

        def compute(embeddings: list[Tensor]) -> Tensor:
            embeddings = [embedding[order] for embedding, order in zip(embeddings, restore)]
            anchor, positive, negatives = split_views(embeddings, batch)
            detached = None if negatives is None else negatives.detach()
            self.last_views = (anchor.detach(), positive.detach(), detached, batch["negative_mask"])
            return self.loss(anchor, positive, negatives, **extras)

        if self.chunk_size:
            loss = gradcache_backward(
                self.model, list(groups), compute, self.chunk_size, backward=self.accelerator.backward,
                no_sync=lambda: self.accelerator.no_sync(self.model), padding=padding,
            )
        else:
            embeddings = [torch.cat([self.model(**chunk) for chunk in group]) for group in chunks]
            padded = [self.model(**chunk) for chunk in padding]
            loss = compute(embeddings)
            self.accelerator.backward(sum((0 * output.sum() for output in padded), loss))
            loss = loss.detach()
        self.losses.append(loss)
        return loss

    def end_step(self, skipped: bool) -> float:
        """Close an optimizer step; returns its loss: the mean over its micro-batches and the processes.

        Unless the optimizer `skipped` its update (an fp16 overflow), move the momentum encoder towards the
        online one and queue the keys of every micro-batch of the step, each micro-batch's in rank order (the
        order one process with the global batch would queue them in).
        """
        loss = self.accelerator.reduce(torch.stack(self.losses).mean(), reduction="mean")
        if self.queue is not None and not skipped:
            self.momentum.update(self.accelerator.unwrap_model(self.model))
            for keys in self.keys:
                self.queue.enqueue(keys)
        self.losses, self.keys = [], []
        return loss.item()

    def statistics(self) -> dict[str, float]:
        """Similarity statistics of the last batch (local rows); with distillation, the last batch's two loss
        terms on this process (`contrastive_loss`, `distill_loss`, before `distill_weight`)."""
        stats = contrastive_stats(*self.last_views) if self.last_views is not None else {}
        parts = getattr(self.loss, "parts", None) or {}
        return stats | {name: value.item() for name, value in parts.items()}
