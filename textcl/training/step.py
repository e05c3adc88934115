"""One training step: embed the batch, compute the loss, backward (plainly or with GradCache).

Two things make a step cheaper without changing what is computed:
- Dropout positives (unsupervised SimCSE) take ONE forward over the anchors stacked twice: the two
  halves get independent dropout masks, and the batch pays one call's overhead instead of two.
- Each group is sorted by length and embedded in chunks of `forward_chunk_size` rows, each padded only
  to its own longest text (with GradCache, its chunks are sorted the same way). A text's embedding
  does not depend on its batch-mates, so only the padding work disappears (a quarter of all tokens
  in batches of short sentences); the loss still sees the whole batch, in its original order.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import Tensor, nn

from textcl.config import TrainConfig
from textcl.losses.gradcache import gradcache_backward, split_batch
from textcl.losses.queue import MomentumEncoder, NegativeQueue
from textcl.model.encoder import Encoder
from textcl.training.statistics import contrastive_stats

Features = dict[str, Tensor]


def stacked(features: Features) -> Features:
    """The same tokenized batch twice, `[2B, T]`."""
    return {key: torch.cat([value, value]) for key, value in features.items()}


def groups_of(batch: dict[str, Any]) -> list[Features]:
    """The tokenized groups to embed: anchors (stacked twice for dropout positives), positives, negatives."""
    anchors = batch["anchor"] if batch["positive"] is not None else stacked(batch["anchor"])
    return [group for group in (anchors, batch["positive"], batch["negatives"]) if group is not None]


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
    real = rest[0] if rest else first.new_zeros(0, first.shape[1])
    slots = mask.flatten().nonzero().squeeze(1)
    negatives = first.new_zeros(mask.numel(), first.shape[1]).index_copy(0, slots, real)
    return anchor, positive, negatives.view(*mask.shape, -1)


def forward_chunk_size(config: TrainConfig, accelerator: Accelerator) -> int:
    """Rows per forward: the recipe's `forward_chunk_size`, else 32 on CPU (less padding beats bigger
    matrix products there) and whole groups on accelerators (0)."""
    chosen = config.training.forward_chunk_size
    if chosen is not None:
        return chosen
    return 32 if accelerator.device.type == "cpu" else 0


class StepRunner:
    """Computes the loss of a batch and runs its backward; keeps what the logger reports.

    Optional helpers: a negative queue filled by a momentum encoder (MoCo / ESimCSE), and a frozen
    guide model whose similarities decide which candidates are false negatives.
    """

    def __init__(
        self,
        config: TrainConfig,
        model: nn.Module,
        loss: nn.Module,
        accelerator: Accelerator,
        momentum: MomentumEncoder | None = None,
        guide: Encoder | None = None,
    ) -> None:
        self.model, self.loss, self.accelerator = model, loss, accelerator
        self.chunk_size = config.loss.gradcache_chunk_size
        self.forward_chunk_size = forward_chunk_size(config, accelerator)
        self.mask_duplicates = config.loss.mask_duplicate_texts
        self.momentum, self.guide = momentum, guide
        self.queue = NegativeQueue(config.loss.queue_size, accelerator.unwrap_model(model).dim) if momentum else None
        if self.queue is not None:
            self.queue.to(accelerator.device)
        self.keys: Tensor | None = None
        self.last_views: tuple[Tensor, Tensor, Tensor | None, Tensor | None] | None = None

    def stateful(self) -> list[Any]:
        """Objects whose state belongs in checkpoints."""
        return [module for module in (self.momentum, self.queue) if module is not None]

    def extras(self, batch: dict[str, Any], groups: list[Features]) -> dict[str, Any]:
        """Loss keyword arguments besides the embeddings: ids, labels, queue, guide embeddings."""
        extras: dict[str, Any] = {"labels": batch["labels"], "negative_mask": batch["negative_mask"]}
        if self.mask_duplicates:
            extras |= {"positive_ids": batch["positive_ids"], "negative_ids": batch["negative_ids"]}
        if self.queue is not None:
            keys_from = batch["positive"] if batch["positive"] is not None else batch["anchor"]
            self.keys = self.momentum(**keys_from)
            extras["queue"] = self.queue.negatives
        if self.guide is not None:
            with torch.no_grad():
                extras["guide"] = split_views([self.guide.embed(**group) for group in groups], batch)
        return extras

    def backward(self, batch: dict[str, Any]) -> Tensor:
        """Backward of the batch's loss into the parameters' .grad; returns the loss averaged over processes."""
        batch = send_to_device(batch, self.accelerator.device)
        groups = groups_of(batch)
        extras = self.extras(batch, groups)
        groups, restore = zip(*(by_length(group) for group in groups))

        def compute(embeddings: list[Tensor]) -> Tensor:
            embeddings = [embedding[order] for embedding, order in zip(embeddings, restore)]
            anchor, positive, negatives = split_views(embeddings, batch)
            detached = None if negatives is None else negatives.detach()
            self.last_views = (anchor.detach(), positive.detach(), detached, batch["negative_mask"])
            return self.loss(anchor, positive, negatives, **extras)

        if self.chunk_size:
            loss = gradcache_backward(
                self.model, list(groups), compute, self.chunk_size,
                backward=self.accelerator.backward, no_sync=lambda: self.accelerator.no_sync(self.model),
            )
        else:
            loss = compute([self.embed(group) for group in groups])
            self.accelerator.backward(loss)
        return self.accelerator.reduce(loss.detach(), reduction="mean")

    def embed(self, group: Features) -> Tensor:
        """Embeddings `[rows, dim]` of a length-sorted group, chunk by chunk."""
        if not self.forward_chunk_size:
            return self.model(**group)
        return torch.cat([self.model(**chunk) for chunk in split_batch(group, self.forward_chunk_size)])

    def after_optimizer_step(self) -> None:
        """Move the momentum encoder towards the online one and queue this step's keys."""
        if self.queue is not None:
            self.momentum.update(self.accelerator.unwrap_model(self.model))
            self.queue.enqueue(self.keys)

    def statistics(self) -> dict[str, float]:
        """Similarity statistics of the last batch (local rows)."""
        return contrastive_stats(*self.last_views) if self.last_views is not None else {}
