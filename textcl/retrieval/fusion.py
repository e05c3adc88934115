"""Fusing a dense and a lexical (BM25) ranking of the same documents into one.

Each side gives its top `depth` candidates of a query. Two fusions:

- "rrf", reciprocal rank fusion (Cormack et al., 2009): sum over the sides of 1 / (rrf_k + rank), ranks from 1;
  a side that did not return a document adds nothing. Needs no tuning.
- "weighted", a convex combination of min-max normalised scores (Bruch et al., 2023, "An Analysis of Fusion
  Functions for Hybrid Retrieval", who found it beats RRF once its weight is tuned): each side's scores are
  mapped to [0, 1] over that side's candidates (the best 1, the last 0; all equal: 1), a side that did not
  return a document gives it 0, and fused = weight * dense + (1 - weight) * lexical. The weight is chosen on a
  dev split (`textcl.evaluation.hybrid.choose_fusion_weight`).

Written by hand because neither FAISS nor bm25s fuses rankings, and the two formulas are a few lines each.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from textcl.errors import TextclError

FUSION_METHODS = ("rrf", "weighted")
Key = TypeVar("Key", bound=Hashable)


@dataclass(frozen=True)
class FusionSettings:
    """`method` ("rrf" or "weighted"), `weight` of the dense side in "weighted" (in [0, 1]), `rrf_k` of RRF,
    and `depth`: how many candidates each side contributes (at least k)."""

    method: str = "rrf"
    weight: float = 0.5
    rrf_k: int = 60
    depth: int = 100

    def __post_init__(self) -> None:
        if self.method not in FUSION_METHODS:
            raise TextclError(f"fusion must be one of {', '.join(FUSION_METHODS)}, got {self.method!r}")
        if not 0.0 <= self.weight <= 1.0:
            raise TextclError(f"fusion_weight must be between 0 and 1, got {self.weight}")
        if self.rrf_k < 0 or self.depth < 1:
            raise TextclError(f"rrf_k must be >= 0 and depth >= 1, got {self.rrf_k} and {self.depth}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, record: dict[str, Any]) -> FusionSettings:
        return cls(**{key: record[key] for key in ("method", "weight", "rrf_k", "depth") if key in record})


@dataclass(frozen=True)
class Fused:
    """One fused result: the document `key`, its fused score, and each side's score (None: not a candidate)."""

    key: Any
    score: float
    dense: float | None
    lexical: float | None


def ranked(candidates: dict[Key, float]) -> list[Key]:
    """Keys best first (ties keep the order given)."""
    return sorted(candidates, key=lambda key: -candidates[key])


def normalised(candidates: dict[Key, float]) -> dict[Key, float]:
    """Min-max over the candidates: the best 1, the worst 0; all equal (or one): 1."""
    if not candidates:
        return {}
    low, high = min(candidates.values()), max(candidates.values())
    if high == low:
        return dict.fromkeys(candidates, 1.0)
    return {key: (score - low) / (high - low) for key, score in candidates.items()}


def fuse(dense: dict[Key, float], lexical: dict[Key, float], settings: FusionSettings, k: int) -> list[Fused]:
    """The top `k` of the union of one query's dense and lexical candidates (key -> score), best first; ties
    keep the dense order, then the lexical order."""
    order = ranked(dense) + [key for key in ranked(lexical) if key not in dense]
    if settings.method == "rrf":
        fused = dict.fromkeys(order, 0.0)
        for side in (dense, lexical):
            for rank, key in enumerate(ranked(side), start=1):
                fused[key] += 1.0 / (settings.rrf_k + rank)
    else:
        dense_norm, lexical_norm = normalised(dense), normalised(lexical)
        fused = {key: settings.weight * dense_norm.get(key, 0.0) + (1 - settings.weight) * lexical_norm.get(key, 0.0)
                 for key in order}
    best = sorted(order, key=lambda key: -fused[key])[:k]
    return [Fused(key, fused[key], dense.get(key), lexical.get(key)) for key in best]
