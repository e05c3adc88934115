"""What both encoders (torch and ONNX) do to texts before a forward: pick the prompt prefix, pad a batch, and the
default truncation length."""

from __future__ import annotations

from typing import Any

import numpy as np

from textcl.errors import TextclError

ENCODE_BATCH_SIZE = 32  # texts per forward in `encode` and everything built on it (sentence-transformers' default)


def resolve_prompt(prompts: dict[str, str], prompt: str | None, prompt_name: str | None) -> str:
    """The prefix to prepend: an explicit `prompt` string, or the saved prompt called `prompt_name`."""
    if prompt is not None:
        return prompt
    if prompt_name is None:
        return ""
    if prompt_name not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        raise TextclError(f"unknown prompt_name {prompt_name!r}; this model's prompts: {known}")
    return prompts[prompt_name]


def prompt_token_count(tokenizer: Any, prompt: str) -> int:
    """Tokens a prompt prefix takes at the start of a text: its own tokenization less a trailing special token
    (SEP, EOS), sentence-transformers' rule for `include_prompt=False`."""
    if not prompt:
        return 0
    ids = tokenizer(prompt)["input_ids"]
    return len(ids) - (1 if ids and ids[-1] in tokenizer.all_special_ids else 0)


def pad_arrays(encoded: Any, index: np.ndarray, tokenizer: Any) -> dict[str, np.ndarray]:
    """Gather rows `index` of pre-tokenized lists and pad them into int64 arrays `[len(index), longest]`.

    Written by hand because `tokenizer.pad` re-validates every row in Python, which cost more than
    the padding itself in profiles of short-sentence encoding.
    """
    rows = [encoded["input_ids"][i] for i in index]
    longest = max(len(row) for row in rows)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    pad_values = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": 0}
    batch = {}
    for key, pad_value in pad_values.items():
        if key not in encoded:
            continue
        array = np.full((len(index), longest), pad_value, dtype=np.int64)
        for row, i in enumerate(index):
            values = encoded[key][i]
            if left:
                array[row, longest - len(values) :] = values
            else:
                array[row, : len(values)] = values
        batch[key] = array
    return batch


def default_max_length(tokenizer: Any, max_position_embeddings: int | None) -> int:
    """The truncation length of a folder that saves none: the tokenizer's model_max_length when it is real (not
    transformers' 1e30 placeholder), else the model's position limit, at most 512. Both backends use it."""
    if 0 < getattr(tokenizer, "model_max_length", 0) < 100_000:
        return int(tokenizer.model_max_length)
    return min(512, max_position_embeddings or 512)
