"""Pooling: token embeddings `[batch, seq, dim]` + attention mask `[batch, seq]` -> `[batch, dim]`.

Every mode reads only the positions the mask marks as real tokens, so padding (left or right)
never changes a text's embedding. Conventions match sentence-transformers' `Pooling` module so
that a saved folder gives the same vectors in both libraries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from textcl.errors import TextclError


def mean_pooling(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens. `[B, T, D], [B, T] -> [B, D]`."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    summed = (tokens * weights).sum(dim=1, dtype=torch.float32)
    counts = weights.sum(dim=1, dtype=torch.float32).clamp(min=1e-9)
    return (summed / counts).to(tokens.dtype)


def cls_pooling(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The first real token (the [CLS] under right padding). `[B, T, D], [B, T] -> [B, D]`."""
    first = mask.to(torch.int32).argmax(dim=1)
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), first]


def max_pooling(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over the real tokens. `[B, T, D], [B, T] -> [B, D]`."""
    return tokens.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(dim=1).values


def last_token_pooling(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last real token, for left or right padding. `[B, T, D], [B, T] -> [B, D]`."""
    seq_len = mask.shape[1]
    last = seq_len - 1 - mask.to(torch.int32).flip(1).argmax(dim=1)
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]


def weighted_mean_pooling(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean with linearly growing weights 1, 2, ... counted from the first real token
    (SGPT's position weighting). `[B, T, D], [B, T] -> [B, D]`."""
    positions = torch.arange(1, mask.shape[1] + 1, device=tokens.device, dtype=torch.float32)
    start = mask.to(torch.int32).argmax(dim=1, keepdim=True)
    weights = (positions.unsqueeze(0) - start) * mask.to(torch.float32)
    summed = (tokens * weights.unsqueeze(-1).to(tokens.dtype)).sum(dim=1, dtype=torch.float32)
    return (summed / weights.sum(dim=1, keepdim=True).clamp(min=1e-9)).to(tokens.dtype)


POOLING_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mean": mean_pooling,
    "cls": cls_pooling,
    "max": max_pooling,
    "last_token": last_token_pooling,
    "weighted_mean": weighted_mean_pooling,
}
POOLING_MODES = tuple(POOLING_FUNCTIONS)


def check_pooling_mode(mode: str) -> str:
    """Return `mode` if it is a known pooling mode, else raise a one-line error naming the valid ones."""
    if mode not in POOLING_FUNCTIONS:
        raise TextclError(f"unknown pooling mode {mode!r}; valid modes: {', '.join(POOLING_MODES)}")
    return mode


def exclude_prompt(mask: torch.Tensor, prompt_length: int | torch.Tensor) -> torch.Tensor:
    """A copy of `mask` `[B, T]` without each row's first `prompt_length` real tokens (an int, or `[B]`), under
    left or right padding: what sentence-transformers' `Pooling(include_prompt=False)` pools over."""
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    first = mask.to(torch.int32).argmax(dim=1, keepdim=True)
    length = torch.as_tensor(prompt_length, device=mask.device).reshape(-1, 1)
    return mask.masked_fill(positions < first + length, 0)


def pool(tokens: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Apply pooling `mode` to `[B, T, D]` tokens under a `[B, T]` mask, giving `[B, D]`."""
    return POOLING_FUNCTIONS[check_pooling_mode(mode)](tokens, mask)
