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


@dataclass
class Pairs:
    """Step 1: the pairs laid out over the candidates: the distinct anchors, each pair's anchor row `[pairs]` and its
    positive's candidate index `[pairs]`, and the known positives as codes anchor * len(candidates) + candidate."""

    candidates: Candidates
    distinct: list[str]
    row_anchor: np.ndarray  # [pairs] int64
    row_positive: np.ndarray  # [pairs] int64
    known: np.ndarray  # sorted int64 codes

    @classmethod
    def of(cls, anchors: Sequence[str], positives: Sequence[str], corpus: list[str]) -> Pairs:
        candidates = Candidates.of(corpus, positives)
        distinct = list(dict.fromkeys(anchors))
        anchor_row = {text: i for i, text in enumerate(distinct)}
        row_anchor = np.array([anchor_row[text] for text in anchors], dtype=np.int64)
        row_positive = np.array([candidates.first[text] for text in positives], dtype=np.int64)
        size = len(candidates.texts)
        own_text = [a * size + candidates.first[text] for a, text in enumerate(distinct) if text in candidates.first]
        known = np.unique(np.concatenate([row_anchor * size + row_positive, np.array(own_text, dtype=np.int64)]))
        return cls(candidates, distinct, row_anchor, row_positive, known)

    def search_depth(self, range_max: int) -> int:
        """How deep to search so that `range_max` candidates are left after the known positives and the copies."""
        size = len(self.candidates.texts)
        copies = np.bincount(self.candidates.canonical, minlength=size)
        known_per_anchor = np.bincount(self.known // size, weights=copies[self.known % size],
                                       minlength=len(self.distinct))
        return min(size, range_max + int(known_per_anchor.max()) + min(size - len(self.candidates.first), range_max))


def thresholds(pairs: Pairs, positive_scores: np.ndarray, max_score_ratio: float | None,
               margin: float | None) -> np.ndarray:
    """Step 4's score bound of each distinct anchor `[anchors]`, from its lowest positive score (inf: no bound)."""
    lowest = np.full(len(pairs.distinct), np.inf)
    np.minimum.at(lowest, pairs.row_anchor, positive_scores)
    threshold = np.full(len(pairs.distinct), np.inf)
    if max_score_ratio is not None:
        threshold = np.minimum.reduce([threshold, max_score_ratio * lowest, (2 - max_score_ratio) * lowest])
    if margin is not None:
        threshold = np.minimum(threshold, lowest - margin)
    return threshold


@dataclass
class Selection:
    """Steps 4-5 over the search results `[anchors, depth]`: the rank window, what passed the threshold, the
    known positives hit, and the chosen negatives."""

    window: np.ndarray
    keep: np.ndarray
    known_hit: np.ndarray
    chosen: np.ndarray


def select(pairs: Pairs, indices: np.ndarray, scores: np.ndarray, threshold: np.ndarray, range_min: int,
           range_max: int, num_negatives: int, sampling: str, seed: int) -> Selection:
    """Drop known positives and repeated texts, keep ranks [range_min, range_max) under the threshold, choose."""
    size = len(pairs.candidates.texts)
    found = indices >= 0
    candidate = np.where(found, pairs.candidates.canonical[np.maximum(indices, 0)], -1)
    known_hit = found & np.isin(np.arange(len(pairs.distinct))[:, None] * size + candidate, pairs.known)
    usable = found & ~known_hit & ~later_repeats(candidate)
    rank = np.cumsum(usable, axis=1) - 1
    window = usable & (rank >= range_min) & (rank < range_max)
    keep = window & (scores < threshold[:, None])
    return Selection(window, keep, known_hit, choose(keep, num_negatives, sampling, seed))


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
    corpus = list(corpus)
    pairs = Pairs.of(anchors, positives, corpus)  # step 1

    options = encode_options.resolved(encoder)  # step 2
    parts = [encode_corpus(encoder, part, "document", options) for part in (corpus, pairs.candidates.extra) if part]
    anchor_embeddings = encode_corpus(encoder, pairs.distinct, "query", options)
    positive_scores = np.einsum("nd,nd->n", anchor_embeddings[pairs.row_anchor], take_rows(parts, pairs.row_positive))

    depth = pairs.search_depth(range_max)  # step 3
    if factory == "Flat":
        scores, indices = exact_search(anchor_embeddings, parts, depth)
    else:
        index = build_faiss_index(parts, factory, seed=seed)
        set_search_params(index, search_params)
        scores, indices = index.search(np.ascontiguousarray(anchor_embeddings, dtype=np.float32), depth)

    threshold = thresholds(pairs, positive_scores, max_score_ratio, margin)  # steps 4-5
    selection = select(pairs, indices, scores, threshold, range_min, range_max, num_negatives, sampling, seed)
    counts = selection.chosen.sum(axis=1)[pairs.row_anchor]
    rows = np.flatnonzero(counts >= (num_negatives if min_negatives is None else min_negatives))
    picked = np.argsort(~selection.chosen, axis=1, kind="stable")[:, :num_negatives][pairs.row_anchor[rows]]
    negatives = np.take_along_axis(indices[pairs.row_anchor[rows]], picked, axis=1)
    negative_scores = np.take_along_axis(scores[pairs.row_anchor[rows]], picked, axis=1)
    filled = np.take_along_axis(selection.chosen[pairs.row_anchor[rows]], picked, axis=1)

    columns = output_columns(anchors, positives, pairs.candidates.texts, rows, positive_scores[rows], negatives,
                             negative_scores, filled)
    stats = MiningStats(
        rows=len(anchors), rows_kept=len(rows), rows_too_few_negatives=len(anchors) - len(rows),
        rows_short=int((counts[rows] < num_negatives).sum()), anchors=len(pairs.distinct),
        mean_positive_score=float(positive_scores[rows].mean()) if len(rows) else float("nan"),
        mean_negative_score=float(negative_scores[filled].mean()) if filled.any() else float("nan"),
        candidates=int(selection.window.sum()),
        dropped_false_negatives=int((selection.window & ~selection.keep).sum()),
        known_positives_excluded=int(selection.known_hit.sum()))
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


def output_columns(anchors: Sequence[str], positives: Sequence[str], texts: list[str], rows: np.ndarray,
                   positive_scores: np.ndarray, negatives: np.ndarray, negative_scores: np.ndarray,
                   filled: np.ndarray) -> dict[str, list]:
    """The mined table's columns for the kept `rows`; `negatives`, `negative_scores`, `filled` are `[kept, n]`
    (candidate index, score, whether a negative was found: an empty text and a None score where not)."""
    columns: dict[str, list] = {"anchor": [anchors[r] for r in rows], "positive": [positives[r] for r in rows]}
    for j in range(negatives.shape[1]):
        columns[f"negative_{j + 1}"] = [texts[i] if ok else "" for i, ok in zip(negatives[:, j], filled[:, j])]
    columns["positive_score"] = positive_scores.tolist()
    for j in range(negatives.shape[1]):
        columns[f"negative_{j + 1}_score"] = [float(v) if ok else None
                                              for v, ok in zip(negative_scores[:, j], filled[:, j])]
    return columns
