"""Building the pieces of a run from its config: encoder, loss, helpers (momentum encoder, guide, distillation
teacher), optimizer, and
the training options that change how the encoder computes (gradient checkpointing, torch.compile).
The data is built by `textcl.data.loader.build_training_data`."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from textcl.config import DataArguments, LossArguments, ModelArguments, TrainingArguments, instruction_prompt
from textcl.errors import TextclError
from textcl.losses.distillation import DISTILLATION_LOSSES, DistilledLoss
from textcl.losses.infonce import InfoNCELoss
from textcl.losses.matryoshka import MatryoshkaLoss
from textcl.losses.queue import MomentumEncoder
from textcl.model.decoder import append_eos_token, make_bidirectional
from textcl.model.encoder import Encoder
from textcl.model.lora import is_adapter

# Backbones with more parameters than this train a LoRA adapter unless the recipe sets `lora` (decoder LLMs:
# full fine-tuning a 1.5B model in AdamW takes ~24 GB of weights, gradients and moments before activations).
LORA_AUTO_PARAMETERS = 1_000_000_000


def build_encoder(args: ModelArguments) -> Encoder:
    """Load the model; `pooling: cls_mlp` is SimCSE's cls pooling with a training-only MLP head; `lora` trains
    a LoRA adapter (`textcl.model.lora`) instead of all weights."""
    mlp_head = args.pooling == "cls_mlp"
    query_prompt = instruction_prompt(args.instruction_template, args.query_instruction) if args.query_instruction \
        else args.query_prompt
    prompts = {name: text for name, text in (("query", query_prompt), ("document", args.document_prompt)) if text}
    encoder = Encoder.load(
        args.model_name_or_path,
        pooling="cls" if mlp_head else args.pooling,
        normalize=args.normalize,
        max_seq_length=args.max_seq_length,
        prompts=prompts or None,
        mlp_head=mlp_head,
        trust_remote_code=args.trust_remote_code,
        device="cpu",  # accelerate moves it to the run's device
    )
    if args.include_prompt is not None:
        encoder.include_prompt = args.include_prompt
    if args.append_eos_token:
        append_eos_token(encoder.tokenizer)
    if args.bidirectional:
        make_bidirectional(encoder.model)
    args.lora = resolve_lora(args.lora, encoder)
    if args.bidirectional and args.lora and not args.lora_merge:
        raise TextclError("bidirectional with LoRA: an adapter folder loads its base model, which is causal, so set "
                          "lora_merge: true to save a full bidirectional model (or lora: false)")
    if is_adapter(encoder.model) and not args.lora:  # full fine-tuning from an adapter folder: merge it first
        encoder.model = encoder.model.merge_and_unload().requires_grad_(True)
    # Decoder checkpoints are stored in bf16, which transformers 5 keeps on load: training holds fp32 weights
    # (bf16 runs go through autocast, as for every model), so optimizer updates are not rounded to bf16.
    encoder.model.float()
    if args.dense_dim and encoder.dense is None:
        encoder.add_dense(args.dense_dim)
    if args.dropout is not None:
        set_dropout(encoder.model, args.dropout)
    pooler = getattr(encoder.model, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)  # unused by pooling; trainable it would leave DDP waiting for its gradient
    if args.lora:
        encoder.add_lora(args.model_name_or_path, args.lora_r, args.lora_alpha, args.lora_dropout,
                         args.lora_target_modules)  # after set_dropout, which would otherwise also reset lora_dropout
    # The transformer's layer classes, which accelerate's FSDP shards one by one (fsdp_auto_wrap_policy:
    # TRANSFORMER_BASED_WRAP reads them from the wrapped model, here the Encoder).
    base = encoder.model.get_base_model() if is_adapter(encoder.model) else encoder.model
    encoder._no_split_modules = list(getattr(base, "_no_split_modules", None) or [])
    return encoder


def source_query_prompts(model: ModelArguments, data: DataArguments, prompts: dict[str, str]) -> tuple[str, ...]:
    """The query prompt of each train_data source from `source_instructions` (its '' entries: the model's own
    "query" prompt); () when the recipe sets none."""
    default = prompts.get("query", "")
    template = model.instruction_template
    return tuple(instruction_prompt(template, task) if task else default for task in data.source_instructions)


def resolve_lora(lora: bool | None, encoder: Encoder) -> bool:
    """`lora` as set, else LoRA for backbones over LORA_AUTO_PARAMETERS parameters (said on stderr)."""
    if lora is not None:
        return lora
    count = sum(parameter.numel() for parameter in encoder.model.parameters())
    if count > LORA_AUTO_PARAMETERS:
        print(f"textcl: training a LoRA adapter: the model has {count / 1e9:.1f}B parameters (over "
              f"{LORA_AUTO_PARAMETERS / 1e9:.0f}B); set lora: false to train every weight", file=sys.stderr)
        return True
    return False


def apply_training_options(encoder: Encoder, args: TrainingArguments) -> None:
    """Turn on `gradient_checkpointing` and `torch_compile` on the encoder's transformer (in place).

    Checkpointing is transformers' own, non-reentrant: it works with frozen inputs (LoRA) and restores the
    RNG before recomputing, so dropout draws the same masks and the gradients are those of plain backprop.
    Compiling uses `nn.Module.compile`, which keeps the module, its class and its state_dict keys, so DDP,
    saving and checkpoints see the plain model; shapes are compiled dynamic (every chunk has its own length).
    """
    if args.gradient_checkpointing:
        encoder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.torch_compile:
        encoder.model.compile(dynamic=True, backend=args.torch_compile_backend)


def set_dropout(model: nn.Module, p: float) -> None:
    """Set every dropout probability of a transformers model (modules and the config it saves)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, p)


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
    if args.distill_loss != "none":
        options = {"temperature": args.distill_temperature} if args.distill_loss == "kl" else {}
        loss = DistilledLoss(loss, DISTILLATION_LOSSES[args.distill_loss](**options), args.distill_weight)
    return loss


def build_teacher(args: LossArguments, student: Encoder, device: torch.device) -> Encoder | None:
    """The frozen teacher of distill_loss mse, or None. It embeds the student's tokenized batches, so both must
    share a tokenizer, and its embeddings must be as wide as the student's."""
    if args.distill_loss != "mse":
        return None
    teacher = Encoder.load(args.teacher_model, device=device).eval().requires_grad_(False)
    if teacher.tokenizer.get_vocab() != student.tokenizer.get_vocab():
        raise TextclError(f"teacher_model {args.teacher_model!r} has another tokenizer than the student; distill_loss "
                          "mse needs the same one (a `textcl shrink` student keeps its teacher's)")
    if teacher.dim != student.dim:
        raise TextclError(f"teacher_model gives {teacher.dim}-dimensional embeddings, the student {student.dim}; set "
                          f"dense_dim: {teacher.dim} to project the student")
    return teacher


def build_helpers(args: LossArguments, encoder: Encoder, device: torch.device) -> tuple[Any, Encoder | None]:
    """The momentum encoder (when a negative queue is asked for) and the frozen guide model, if any.

    Built before `accelerator.prepare`, so the momentum copy never inherits the mixed-precision wrapper.
    """
    momentum = MomentumEncoder(encoder, args.momentum).to(device) if args.queue_size > 0 else None
    guide = None
    if args.guide_model:
        guide = Encoder.load(args.guide_model, device=device).eval().requires_grad_(False)
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
