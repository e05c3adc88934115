"""Building the pieces of a run from its config: encoder, data loader, loss and optimizer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from textcl.collator import AUGMENTATIONS, ContrastiveCollator
from textcl.config import LossArguments, ModelArguments, TrainConfig, TrainingArguments
from textcl.data import load_rows, max_negatives
from textcl.errors import TextclError
from textcl.lora import add_lora, is_adapter
from textcl.losses import InfoNCELoss, MatryoshkaLoss
from textcl.modeling import Encoder
from textcl.queue import MomentumEncoder
from textcl.sampler import NoDuplicatesBatchSampler, StreamBatches, row_ids


def build_encoder(args: ModelArguments) -> Encoder:
    """Load the model; `pooling: cls_mlp` is SimCSE's cls pooling with a training-only MLP head; `lora` trains
    a LoRA adapter (`textcl.lora`) instead of all weights."""
    mlp_head = args.pooling == "cls_mlp"
    prompts = {name: text for name, text in (("query", args.query_prompt), ("document", args.document_prompt)) if text}
    encoder = Encoder.load(
        args.model_name_or_path,
        pooling="cls" if mlp_head else args.pooling,
        normalize=args.normalize,
        max_seq_length=args.max_seq_length,
        prompts=prompts or None,
        mlp_head=mlp_head,
        trust_remote_code=args.trust_remote_code,
    )
    if is_adapter(encoder.model) and not args.lora:  # full fine-tuning from an adapter folder: merge it first
        encoder.model = encoder.model.merge_and_unload().requires_grad_(True)
    if args.dense_dim and encoder.dense is None:
        encoder.add_dense(args.dense_dim)
    if args.dropout is not None:
        set_dropout(encoder.model, args.dropout)
    pooler = getattr(encoder.model, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)  # unused by pooling; trainable it would leave DDP waiting for its gradient
    if args.lora:
        add_lora(encoder, args)  # after set_dropout, which would otherwise also reset lora_dropout
    return encoder


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability of a transformers model (modules and the config it saves)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, p)


def row_index(rows: Any, with_lengths: bool) -> tuple[list[list[int]], np.ndarray | None, np.ndarray | None]:
    """Per row, the ids of its texts (for the no-duplicates sampler), optionally the anchor length, and
    the source index when the rows carry one."""

    def index(batch: dict[str, list]) -> dict[str, list]:
        rows_of_batch = [dict(zip(batch, values)) for values in zip(*batch.values())]
        return {"ids": [sorted(row_ids(row)) for row in rows_of_batch], "length": [len(a) for a in batch["anchor"]]}

    table = rows.map(index, batched=True, remove_columns=[c for c in rows.column_names if c != "source"])
    lengths = np.asarray(table["length"]) if with_lengths else None
    return table["ids"], lengths, np.asarray(table["source"]) if "source" in table.column_names else None


def build_loader(config: TrainConfig, encoder: Encoder, accelerator: Accelerator) -> tuple[DataLoader, Any, Any]:
    """(DataLoader, its batcher (anything with `set_epoch`), collator). Streaming loaders have no length."""
    data, args = config.data, config.training
    unknown = set(data.augment) - set(AUGMENTATIONS)
    if unknown:
        raise TextclError(f"unknown augmentation {sorted(unknown)[0]!r}; valid: {', '.join(AUGMENTATIONS)}")
    if data.batch_per_source and data.streaming:
        raise TextclError("batch_per_source needs map-style data: set streaming: false")
    rows = load_rows(data)
    collator = ContrastiveCollator(
        tokenizer=encoder.tokenizer,
        query_max_length=data.query_max_length or encoder.max_seq_length,
        passage_max_length=data.passage_max_length or encoder.max_seq_length,
        num_negatives=max_negatives(rows),
        query_prompt=encoder.prompts.get("query", ""),
        document_prompt=encoder.prompts.get("document", ""),
        augment=tuple(data.augment),
        seed=args.seed,
    )
    batch_size = args.per_device_train_batch_size
    generator = torch.Generator().manual_seed(args.seed)  # keeps DataLoader seeding off the global RNG
    if data.streaming:
        from datasets.distributed import split_dataset_by_node

        shard = split_dataset_by_node(rows, rank=accelerator.process_index, world_size=accelerator.num_processes)
        batches = StreamBatches(shard, batch_size, args.seed, args.dataloader_drop_last)
        return DataLoader(batches, batch_size=None, collate_fn=collator, generator=generator), batches, collator
    global_batch = batch_size * accelerator.num_processes
    if args.dataloader_drop_last and global_batch > len(rows):
        raise TextclError(
            f"batch of {global_batch} rows ({batch_size} per device x {accelerator.num_processes}) is larger than "
            f"the {len(rows)} training rows with dataloader_drop_last: lower per_device_train_batch_size"
        )
    ids, lengths, sources = row_index(rows, data.group_by_length)
    sampler = NoDuplicatesBatchSampler(ids, batch_size, args.dataloader_drop_last, args.seed, lengths, sources)
    loader = DataLoader(rows, batch_sampler=sampler, collate_fn=collator, generator=generator)
    return loader, sampler, collator


def build_loss(args: LossArguments) -> nn.Module:
    loss: nn.Module = InfoNCELoss(
        temperature=args.temperature,
        symmetric=args.symmetric,
        anchor_negatives=args.anchor_negatives,
        learnable_temperature=args.learnable_temperature,
        false_negative_margin=args.false_negative_margin,
        tau_plus=args.tau_plus,
    )
    if args.matryoshka_dims:
        loss = MatryoshkaLoss(loss, list(args.matryoshka_dims), list(args.matryoshka_weights) or None)
    return loss


def build_helpers(args: LossArguments, encoder: Encoder, device: torch.device) -> tuple[Any, Encoder | None]:
    """The momentum encoder (when a negative queue is asked for) and the frozen guide model, if any.

    Built before `accelerator.prepare`, so the momentum copy never inherits the mixed-precision wrapper.
    """
    momentum = MomentumEncoder(encoder, args.momentum).to(device) if args.queue_size > 0 else None
    guide = None
    if args.guide_model:
        guide = Encoder.load(args.guide_model).to(device).eval().requires_grad_(False)
    return momentum, guide


def build_optimizer(encoder: Encoder, loss: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (1-d tensors), the transformers convention.

    The fused kernel updates each parameter in one pass over memory instead of several: on CPU, where
    AdamW over MiniLM's 22.7M parameters is memory-bound, that alone is several percent of a step.
    """
    params = [p for p in [*encoder.parameters(), *loss.parameters()] if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate, fused=True)
