"""Matryoshka representation learning (Kusupati et al. 2022): one loss over several truncated widths."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from textcl.errors import TextclError
from textcl.losses.infonce import InfoNCELoss


class MatryoshkaLoss(nn.Module):
    """`sum_j weights[j] * loss(embeddings[..., :dims[j]])`: one loss over several truncated widths."""

    def __init__(self, loss: InfoNCELoss, dims: Sequence[int], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        weights = [1.0] * len(dims) if weights is None else list(weights)
        if not dims or len(weights) != len(dims) or min(dims) < 1:
            raise TextclError(f"Matryoshka needs positive dims and one weight per dim; got {dims} and {weights}")
        self.loss, self.dims, self.weights = loss, list(dims), weights

    def forward(self, anchor: Tensor, positive: Tensor, negatives: Tensor | None = None, **kwargs: object) -> Tensor:
        """Same arguments as `InfoNCELoss.forward`; inputs are gathered once for all dims."""
        if max(self.dims) > anchor.shape[-1]:
            raise TextclError(f"Matryoshka dims {self.dims} exceed the embedding width {anchor.shape[-1]}")
        pool = self.loss.prepare(anchor, positive, negatives, **kwargs)
        return sum(weight * self.loss.compute(pool.truncate(dim)) for dim, weight in zip(self.dims, self.weights))
