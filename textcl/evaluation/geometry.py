"""The geometry of an embedding space: alignment and uniformity (Wang & Isola 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from textcl.errors import TextclError
from textcl.model.text_encoder import TextEncoder
from textcl.model.text_inputs import ENCODE_BATCH_SIZE


def alignment_uniformity(
    encoder: TextEncoder, pairs: Sequence[tuple[str, str]], batch_size: int = ENCODE_BATCH_SIZE, t: float = 2.0
) -> dict[str, float]:
    """Wang & Isola (2020) on normalized embeddings f: alignment = mean ||f(x) - f(y)||^2 over the pairs;
    uniformity = log mean exp(-t ||f(u) - f(v)||^2) over all pairs u != v of distinct texts (O(n^2) memory)."""
    if not pairs:
        raise TextclError("alignment and uniformity need at least one pair")
    first, second = (list(side) for side in zip(*pairs))
    unique = list(dict.fromkeys([*first, *second]))
    if len(unique) < 2:
        raise TextclError("uniformity needs at least two distinct texts")
    position = {text: i for i, text in enumerate(unique)}
    embeddings = encoder.encode(unique, batch_size=batch_size, normalize=True, convert_to_tensor=True).double()
    a = embeddings[[position[text] for text in first]]
    b = embeddings[[position[text] for text in second]]
    alignment = (a - b).pow(2).sum(dim=1).mean()
    uniformity = torch.pdist(embeddings).pow(2).mul(-t).exp().mean().log()
    return {"alignment": float(alignment), "uniformity": float(uniformity)}
