"""Hard-negative mining: for each (anchor, positive) pair, corpus texts the model ranks close to the anchor
that are not known positives, kept by a rank window and NV-Retriever's positive-aware threshold.

1. Candidates are the corpus texts plus the positives missing from it (one anchor's positive can be
   another's negative). Identical texts count as one candidate.
2. Corpus, extra positives and distinct anchors are encoded once through `encode_corpus` (normalized;
   cached on disk with the `EncodeOptions`' `cache_dir`, so a second run encodes nothing).
3. FAISS returns the top candidates of every distinct anchor (Flat: exact search; any index_factory
   string otherwise), deep enough to leave `range_max` candidates after the exclusions below.
4. For each anchor: drop its known positives (the positive of every row with that anchor, texts identical
   to them, and the anchor's own text), keep retrieval ranks [range_min, range_max) of what remains, then
   keep a candidate only if score < p - (1 - max_score_ratio) * |p| and score < p - margin, where p is the
   anchor's lowest positive score (TopK-PercPos; with p > 0 the first test is score < max_score_ratio * p).
5. Take the first `num_negatives` survivors ("top") or a random sample of them ("random"); rows whose
   anchor has fewer than `min_negatives` survivors (default: all `num_negatives`) are dropped and counted,
   the other short rows are written with empty negatives (textcl's trainer takes rows with fewer).
sentence-transformers' `mine_hard_negatives` differs in step 4: it thresholds first and then skips the
`range_min` best survivors; with range_min=0 both agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from textcl.errors import TextclError
from textcl.model.encode_options import EncodeOptions
from textcl.model.text_encoder import TextEncoder
from textcl.retrieval.corpus_embeddings import encode_corpus
from textcl.retrieval.exact_search import exact_search
from textcl.retrieval.faiss_index import build_faiss_index, set_search_params, take_rows

SAMPLING = ("top", "random")


@dataclass
class MiningStats:
    """What mining found. Scores are cosines; "candidates" are those inside the rank window."""

    rows: int
    rows_kept: int
    rows_too_few_negatives: int
    rows_short: int
    anchors: int
    mean_positive_score: float
    mean_negative_score: float
    candidates: int
    dropped_false_negatives: int
    known_positives_excluded: int

    def summary(self) -> str:
        dropped = self.dropped_false_negatives / max(self.candidates, 1)
        return "\n".join([
            f"kept {self.rows_kept:,} of {self.rows:,} rows ({self.anchors:,} distinct anchors); "
            f"{self.rows_too_few_negatives:,} rows had too few negatives and were dropped; "
            f"{self.rows_short:,} kept rows have fewer than the asked number",
            f"mean score: positive {self.mean_positive_score:.4f}, negative {self.mean_negative_score:.4f}",
            f"candidates in the rank window: {self.candidates:,}; dropped as likely false negatives: "
            f"{self.dropped_false_negatives:,} ({dropped:.1%})",
            f"known positives excluded from the search results: {self.known_positives_excluded:,}",
        ])


@dataclass
class MinedNegatives:
    """`columns`: anchor, positive, negative_1..n, positive_score, negative_1_score..n (one entry a kept row);
    `settings`: every setting that decided them (resolved prompts and lengths, the model's fingerprint), for
    the mined file's sidecar."""

    columns: dict[str, list]
    stats: MiningStats
    settings: dict[str, Any]


def check_options(
    num_negatives: int, range_min: int, range_max: int, max_score_ratio: float | None, sampling: str
) -> None:
    if num_negatives < 1:
        raise TextclError(f"num_negatives must be at least 1, got {num_negatives}")
    if not 0 <= range_min < range_max:
        raise TextclError(f"need 0 <= range_min < range_max, got range_min={range_min}, range_max={range_max}")
    if num_negatives > range_max - range_min:
        raise TextclError(f"num_negatives={num_negatives} does not fit in ranks [{range_min}, {range_max}); widen them")
    if max_score_ratio is not None and not 0 < max_score_ratio <= 1:
        raise TextclError(f"max_score_ratio must be in (0, 1], got {max_score_ratio}")
    if sampling not in SAMPLING:
        raise TextclError(f"sampling must be one of {', '.join(SAMPLING)}, got {sampling!r}")


def later_repeats(values: np.ndarray) -> np.ndarray:
    """Bool `[rows, cols]`: True where a value already appeared earlier in its row."""
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    repeat_in_order = np.zeros(values.shape, dtype=bool)
    repeat_in_order[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    repeats = np.zeros(values.shape, dtype=bool)
    np.put_along_axis(repeats, order, repeat_in_order, axis=1)
    return repeats


def choose(keep: np.ndarray, count: int, sampling: str, seed: int) -> np.ndarray:
    """Bool mask of at most `count` kept entries per row: the first ones, or a uniform random sample."""
    if sampling == "top":
        return keep & (np.cumsum(keep, axis=1) <= count)
    priority = np.random.default_rng(seed).random(keep.shape)
    priority[~keep] = 2.0
    chosen = np.zeros(keep.shape, dtype=bool)
    np.put_along_axis(chosen, np.argsort(priority, axis=1)[:, :count], True, axis=1)
    return chosen & keep


@dataclass
class Candidates:
    """Every candidate text (corpus, then positives missing from it) and, for each, the index of its first copy."""

    texts: list[str]
    extra: list[str]
    first: dict[str, int]
    canonical: np.ndarray  # [len(texts)] int64

    @classmethod
    def of(cls, corpus: list[str], positives: Sequence[str]) -> Candidates:
        first: dict[str, int] = {}
        for i, text in enumerate(corpus):
            first.setdefault(text, i)
        extra = [text for text in dict.fromkeys(positives) if text not in first]
        first.update((text, i) for i, text in enumerate(extra, start=len(corpus)))
        texts = corpus + extra
        return cls(texts, extra, first, np.array([first[text] for text in texts], dtype=np.int64))


def mine_hard_negatives(
    encoder: TextEncoder,
    anchors: Sequence[str],
    positives: Sequence[str],
    corpus: Sequence[str] = (),
    *,
    num_negatives: int = 5,
    min_negatives: int | None = None,
    range_min: int = 10,
    range_max: int = 100,
    max_score_ratio: float | None = 0.95,
    margin: float | None = 0.0,
    sampling: str = "top",
    factory: str = "Flat",
    search_params: str = "",
    seed: int = 0,
    encode_options: EncodeOptions = EncodeOptions(),
) -> MinedNegatives:
    """Mine `num_negatives` hard negatives for each pair (anchors[i], positives[i]); see the module docstring.

    `max_score_ratio` or `margin` None turns that test off; `min_negatives` (default `num_negatives`) is
    the fewest negatives a kept row may have. Anchors are encoded as queries, candidates as documents, with
    `encode_options`. Returns the output columns and `MiningStats`.
    """
    check_options(num_negatives, range_min, range_max, max_score_ratio, sampling)
    if len(anchors) != len(positives) or not anchors:
        raise TextclError(f"need one positive per anchor (and a pair at least), got {len(anchors)}, {len(positives)}")
    corpus = list(corpus)  # step 1
    candidates = Candidates.of(corpus, positives)
    distinct = list(dict.fromkeys(anchors))
    anchor_row = {text: i for i, text in enumerate(distinct)}
    row_anchor = np.array([anchor_row[text] for text in anchors], dtype=np.int64)
    row_positive = np.array([candidates.first[text] for text in positives], dtype=np.int64)

    options = encode_options.resolved(encoder)  # step 2
    parts = [encode_corpus(encoder, part, "document", options) for part in (corpus, candidates.extra) if part]
    anchor_embeddings = encode_corpus(encoder, distinct, "query", options)
    positive_scores = np.einsum("nd,nd->n", anchor_embeddings[row_anchor], take_rows(parts, row_positive))
    lowest = np.full(len(distinct), np.inf)
    np.minimum.at(lowest, row_anchor, positive_scores)
    threshold = np.full(len(distinct), np.inf)
    if max_score_ratio is not None:
        threshold = np.minimum.reduce([threshold, max_score_ratio * lowest, (2 - max_score_ratio) * lowest])
    if margin is not None:
        threshold = np.minimum(threshold, lowest - margin)

    size = len(candidates.texts)  # step 3; an anchor's known positives are codes anchor * size + candidate
    own_text = [a * size + candidates.first[text] for a, text in enumerate(distinct) if text in candidates.first]
    known = np.unique(np.concatenate([row_anchor * size + row_positive, np.array(own_text, dtype=np.int64)]))
    copies = np.bincount(candidates.canonical, minlength=size)
    known_per_anchor = np.bincount(known // size, weights=copies[known % size], minlength=len(distinct))
    depth = min(size, range_max + int(known_per_anchor.max()) + min(size - len(candidates.first), range_max))
    if factory == "Flat":
        scores, indices = exact_search(anchor_embeddings, parts, depth)
    else:
        index = build_faiss_index(parts, factory, seed=seed)
        set_search_params(index, search_params)
        scores, indices = index.search(np.ascontiguousarray(anchor_embeddings, dtype=np.float32), depth)

    found = indices >= 0  # step 4
    candidate = np.where(found, candidates.canonical[np.maximum(indices, 0)], -1)
    known_hit = found & np.isin(np.arange(len(distinct))[:, None] * size + candidate, known)
    usable = found & ~known_hit & ~later_repeats(candidate)
    rank = np.cumsum(usable, axis=1) - 1
    window = usable & (rank >= range_min) & (rank < range_max)
    keep = window & (scores < threshold[:, None])
    chosen = choose(keep, num_negatives, sampling, seed)  # step 5
    picked = np.argsort(~chosen, axis=1, kind="stable")[:, :num_negatives]
    counts = chosen.sum(axis=1)[row_anchor]
    rows = np.flatnonzero(counts >= (num_negatives if min_negatives is None else min_negatives))
    negatives = np.take_along_axis(indices, picked, axis=1)[row_anchor[rows]]
    negative_scores = np.take_along_axis(scores, picked, axis=1)[row_anchor[rows]]
    filled = np.take_along_axis(chosen, picked, axis=1)[row_anchor[rows]]

    columns: dict[str, list] = {"anchor": [anchors[r] for r in rows], "positive": [positives[r] for r in rows]}
    for j in range(num_negatives):
        columns[f"negative_{j + 1}"] = [
            candidates.texts[i] if ok else "" for i, ok in zip(negatives[:, j], filled[:, j])
        ]
    columns["positive_score"] = positive_scores[rows].tolist()
    for j in range(num_negatives):
        columns[f"negative_{j + 1}_score"] = [
            float(v) if ok else None for v, ok in zip(negative_scores[:, j], filled[:, j])
        ]
    stats = MiningStats(
        rows=len(anchors),
        rows_kept=len(rows),
        rows_too_few_negatives=len(anchors) - len(rows),
        rows_short=int((counts[rows] < num_negatives).sum()),
        anchors=len(distinct),
        mean_positive_score=float(positive_scores[rows].mean()) if len(rows) else float("nan"),
        mean_negative_score=float(negative_scores[filled].mean()) if filled.any() else float("nan"),
        candidates=int(window.sum()),
        dropped_false_negatives=int((window & ~keep).sum()),
        known_positives_excluded=int(known_hit.sum()),
    )
    settings = {
        "model_fingerprint": encoder.fingerprint(), "num_negatives": num_negatives,
        "min_negatives": num_negatives if min_negatives is None else min_negatives, "range_min": range_min,
        "range_max": range_max, "max_score_ratio": max_score_ratio, "margin": margin, "sampling": sampling,
        "seed": seed, "factory": factory, "search_params": search_params, "precision": options.precision,
        "query_prompt": encoder.resolve_prompt(None, options.query_prompt_name),
        "document_prompt": encoder.resolve_prompt(None, options.document_prompt_name),
        "query_max_length": options.query_max_length, "document_max_length": options.document_max_length,
        "corpus_texts": len(corpus), "pairs": len(anchors),
    }
    return MinedNegatives(columns, stats, settings)
