"""Cheap training statistics from one batch's embeddings (no gradient), logged every step.

`alignment` and `uniformity` follow Wang & Isola (2020) on L2-normalized embeddings:
alignment = E ||a_i - p_i||^2 (lower is better), uniformity = log E_{x != y} exp(-2 ||x - y||^2)
over the anchors and positives of the batch (lower is more uniform).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from textcl.errors import TextclError


@torch.no_grad()
def contrastive_stats(
    anchor: Tensor, positive: Tensor, negatives: Tensor | None = None, negative_mask: Tensor | None = None
) -> dict[str, float]:
    """Statistics of `anchor`, `positive` `[B, d]` and optional hard `negatives` `[B, k, d]` (with a `[B, k]`
    `negative_mask`, False marking padding, only the real ones count).

    Keys: `positive_similarity` (mean cosine of the pairs), `negative_similarity` (mean cosine of each
    anchor to every other row's positive and to all hard negatives; NaN when there are none),
    `hard_row_share` (share of rows where some negative outscores the positive), `alignment`, `uniformity`.
    """
    if anchor.ndim != 2 or anchor.shape[0] == 0 or positive.shape != anchor.shape:
        raise TextclError(f"stats need anchor and positive of the same [batch, dim] shape; got "
                          f"{tuple(anchor.shape)} and {tuple(positive.shape)}")
    a, p = F.normalize(anchor.float(), dim=-1), F.normalize(positive.float(), dim=-1)
    batch = a.shape[0]
    if negatives is not None:
        negatives = negatives.flatten(0, 1) if negative_mask is None else negatives[negative_mask]
    candidates = p if negatives is None else torch.cat([p, F.normalize(negatives.float(), dim=-1)])
    sim = a @ candidates.T
    positive_sim = sim.diagonal()
    is_negative = torch.ones_like(sim, dtype=torch.bool)
    is_negative[:, :batch].fill_diagonal_(False)
    negative_sim = sim.masked_fill(~is_negative, float("-inf"))
    points = torch.cat([a, p])
    distances = torch.pdist(points).pow(2)
    return {
        "positive_similarity": positive_sim.mean().item(),
        "negative_similarity": sim[is_negative].mean().item() if is_negative.any() else float("nan"),
        "hard_row_share": (negative_sim.max(dim=1).values > positive_sim).float().mean().item(),
        "alignment": (a - p).pow(2).sum(dim=1).mean().item(),
        "uniformity": distances.mul(-2).exp().mean().log().item(),
    }
