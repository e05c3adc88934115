"""Does a tokenizer fit its model? Checked when a model loads (torch and ONNX), before any text meets it.

A tokenizer that can produce an id the model's embedding table does not have would fail deep inside torch
(`IndexError: index out of range in self`) or onnxruntime (`input index out of range`); one that allows more
tokens than the model has positions would fail with a shape mismatch on the first long text. The first is an
error naming both numbers; the second caps the length at the model's limit, with a warning.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from textcl.errors import TextclError

# architectures whose position ids start after the padding id (fairseq's convention): pad_token_id + 1 fewer usable
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "data2vec-text", "ibert", "luke")


def position_limit(config: Mapping[str, Any]) -> int | None:
    """The most tokens the model takes (`max_position_embeddings`, less the offset of RoBERTa-like models);
    None when the config does not say."""
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or limit <= 0:
        return None
    pad = config.get("pad_token_id")
    if config.get("model_type") in OFFSET_POSITIONS and isinstance(pad, int):
        limit -= pad + 1
    return limit


def check_vocabulary(tokenizer: Any, config: Mapping[str, Any], where: object) -> None:
    """Raise when `tokenizer` can produce an id at or beyond the model's `vocab_size`."""
    size = config.get("vocab_size")
    vocabulary = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if not isinstance(size, int) or not vocabulary:
        return
    highest = max(vocabulary.values())
    if highest >= size:
        token = next(text for text, index in vocabulary.items() if index == highest)
        raise TextclError(f"the tokenizer of {str(where)!r} can produce token id {highest} ({token!r}) but the model's "
                          f"vocabulary has {size} ids (0 to {size - 1}); use the tokenizer the model was trained with")


def fit_length(length: int, config: Mapping[str, Any], where: object) -> int:
    """`length` capped at the model's `position_limit`, with a warning when that cuts it."""
    limit = position_limit(config)
    if limit is None or length <= limit:
        return length
    print(f"textcl: warning: max_seq_length {length} of {str(where)!r} is more than the model's {limit} positions "
          f"(max_position_embeddings); texts are cut at {limit} tokens", file=sys.stderr)
    return limit
