"""Layer-reduced students: keep some of a BERT-like encoder's transformer layers (sentence-transformers'
layer reduction; DistilBERT's initialisation from every other teacher layer).

The student keeps the embeddings, the chosen layers in their order, the tokenizer, pooling, Dense,
normalisation, max length and prompts; only `num_hidden_layers` (or DistilBERT's `n_layers`) changes.
A few thousand steps of distillation then recover most of the teacher's quality at a fraction of its cost.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
from torch import nn

from textcl.errors import TextclError
from textcl.model.decoder import is_decoder
from textcl.model.encoder import Encoder
from textcl.model.lora import is_adapter

# Where the stack of transformer layers lives, per family (BERT, RoBERTa, XLM-R, ELECTRA, MPNet, DeBERTa:
# encoder.layer; DistilBERT: transformer.layer), and the config key that counts them.
LAYER_STACKS = ("encoder.layer", "transformer.layer")
LAYER_COUNTS = ("num_hidden_layers", "n_layers")


def layer_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module holding the layer list, the list's attribute name) of a BERT-like transformers model."""
    for path in LAYER_STACKS:
        parent_path, name = path.rsplit(".", 1)
        parent = model
        for part in parent_path.split("."):
            parent = getattr(parent, part, None)
        if isinstance(getattr(parent, name, None), nn.ModuleList):
            return parent, name
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise TextclError(
        f"shrink supports BERT-like encoders whose layers are encoder.layer or transformer.layer (BERT, RoBERTa, "
        f"XLM-R, ELECTRA, MPNet, DistilBERT); this model ({model_type}) has neither"
    )


def evenly_spaced(total: int, keep: int) -> list[int]:
    """`keep` layer indices out of `total`, evenly spaced, first and last included: (6, 3) -> [0, 2, 5]."""
    if not 1 <= keep <= total:
        raise TextclError(f"num_layers must be between 1 and the model's {total} layers, got {keep}")
    return sorted({int(i) for i in np.linspace(0, total - 1, keep).round()}) if keep > 1 else [0]


def shrink(encoder: Encoder, layers: Sequence[int]) -> Encoder:
    """A copy of `encoder` whose transformer keeps only `layers` (indices into its layer stack, kept in the given
    order); `encoder` is unchanged."""
    if is_adapter(encoder.model):
        raise TextclError("this model is a LoRA adapter; merge it first (textcl merge ADAPTER OUT), then shrink")
    if is_decoder(encoder.model):
        raise TextclError(f"shrink supports BERT-like encoders, not decoder LLMs ({encoder.model.config.model_type}); "
                          "distil into a smaller model of the family instead (textcl score + distill_loss)")
    parent, name = layer_stack(encoder.model)
    total = len(getattr(parent, name))
    layers = list(layers)
    if not layers or len(set(layers)) != len(layers) or not all(0 <= i < total for i in layers):
        raise TextclError(f"layers must be distinct indices in 0..{total - 1} (the model has {total}); got {layers}")
    student = copy.deepcopy(encoder)
    parent, name = layer_stack(student.model)
    setattr(parent, name, nn.ModuleList(getattr(parent, name)[i] for i in layers))
    for key in LAYER_COUNTS:
        if hasattr(student.model.config, key):
            setattr(student.model.config, key, len(layers))
    return student
