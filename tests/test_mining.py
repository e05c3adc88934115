"""Hard-negative mining against references: a plain loop over the documented rules, sentence-transformers'
`mine_hard_negatives`, exact vs IVF search, the embedding cache, and the SciFact acceptance checks."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scifact_fixtures import minilm, scifact  # noqa: F401

from textcl import Encoder
from textcl.errors import TextclError
from textcl.io.beir import doc_text, load_beir
from textcl.io.pairs import read_pairs
from textcl.model.encode_options import EncodeOptions
from textcl.retrieval.mining import mine_hard_negatives


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


@pytest.fixture(scope="module")
def small_set(shared_data: Path) -> tuple[list[str], list[str], list[str]]:
    """30 pairs (two anchors with a second positive), and a corpus of STS-B test sentences that also holds
    a copy of one positive, a duplicate sentence and one anchor's own text."""
    pairs = read_tsv(shared_data / "pairs" / "positive_pairs.tsv")[:28]
    anchors = [row["anchor"] for row in pairs] + [pairs[0]["anchor"], pairs[1]["anchor"]]
    positives = [row["positive"] for row in pairs] + [pairs[5]["positive"], pairs[6]["positive"]]
    taken = set(anchors) | set(positives)
    sts = read_tsv(shared_data / "stsb" / "test.tsv")
    corpus = list(dict.fromkeys(t for row in sts[:160] for t in (row["sentence1"], row["sentence2"]) if t not in taken))
    corpus += [positives[3], corpus[10], anchors[2]]
    return anchors, positives, corpus


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One embedding cache for this module's mining calls, so the small corpus is encoded once."""
    return tmp_path_factory.mktemp("mining-cache")


@pytest.fixture(scope="module")
def vectors(minilm: Encoder, small_set) -> dict[str, np.ndarray]:  # noqa: F811
    """Every text of `small_set` encoded with plain `Encoder.encode` (the reference's own embeddings)."""
    texts = list(dict.fromkeys(text for column in small_set for text in column))
    return dict(zip(texts, minilm.encode(texts, normalize=True).astype(np.float64)))


def reference_negatives(
    vectors: dict[str, np.ndarray], anchors: list[str], positives: list[str], corpus: list[str],
    range_min: int, range_max: int, ratio: float, margin: float,
) -> dict[str, list[tuple[str, float]]]:
    """The module docstring's rules, one anchor at a time with plain Python: anchor -> eligible (text, score)."""
    candidates = list(dict.fromkeys(corpus + positives))
    eligible = {}
    for anchor in dict.fromkeys(anchors):
        known = {p for a, p in zip(anchors, positives) if a == anchor} | {anchor}
        lowest = min(vectors[anchor] @ vectors[p] for p in known - {anchor})
        scored = sorted(((vectors[anchor] @ vectors[t], t) for t in candidates if t not in known), reverse=True)
        window = scored[range_min:range_max]
        limit = min(ratio * lowest, (2 - ratio) * lowest, lowest - margin)
        eligible[anchor] = [(t, s) for s, t in window if s < limit]
    return eligible


def negatives_of(columns: dict[str, list], n: int) -> list[list[str]]:
    return [list(row) for row in zip(*(columns[f"negative_{j}"] for j in range(1, n + 1)))]


def test_top_negatives_follow_the_rules(minilm: Encoder, small_set, vectors, cache: Path) -> None:  # noqa: F811
    anchors, positives, corpus = small_set
    expected = reference_negatives(vectors, anchors, positives, corpus, 3, 40, 0.9, 0.02)
    mined = mine_hard_negatives(
        minilm, anchors, positives, corpus, num_negatives=4, range_min=3, range_max=40, max_score_ratio=0.9,
        margin=0.02, encode_options=EncodeOptions(cache_dir=cache),
    )
    complete = [(a, p) for a, p in zip(anchors, positives) if len(expected[a]) >= 4]
    assert list(zip(mined.columns["anchor"], mined.columns["positive"])) == complete
    assert mined.stats.rows_too_few_negatives == len(anchors) - len(complete) > 0, "the example should drop rows"
    for anchor, negatives in zip(mined.columns["anchor"], negatives_of(mined.columns, 4)):
        assert negatives == [t for t, _ in expected[anchor][:4]]
    scores = np.array([mined.columns[f"negative_{j}_score"] for j in range(1, 5)]).T
    reference_scores = np.array([[s for _, s in expected[a][:4]] for a in mined.columns["anchor"]])
    assert np.allclose(scores, reference_scores, atol=1e-5)
    assert mined.stats.dropped_false_negatives > 0


def test_min_negatives_keeps_short_rows_with_empty_slots(minilm: Encoder, small_set, vectors, cache: Path) -> None:  # noqa: F811
    anchors, positives, corpus = small_set
    expected = reference_negatives(vectors, anchors, positives, corpus, 3, 40, 0.9, 0.02)
    mined = mine_hard_negatives(
        minilm, anchors, positives, corpus, num_negatives=4, min_negatives=0, range_min=3, range_max=40,
        max_score_ratio=0.9, margin=0.02, encode_options=EncodeOptions(cache_dir=cache),
    )
    assert mined.columns["anchor"] == anchors and mined.stats.rows_too_few_negatives == 0
    assert mined.stats.rows_short == sum(len(expected[a]) < 4 for a in anchors) > 0
    for anchor, negatives in zip(anchors, negatives_of(mined.columns, 4)):
        real = [t for t, _ in expected[anchor][:4]]
        assert negatives == real + [""] * (4 - len(real))


def test_random_sampling_draws_from_the_eligible_candidates(
    minilm: Encoder, small_set, vectors, cache: Path  # noqa: F811
) -> None:
    anchors, positives, corpus = small_set
    expected = reference_negatives(vectors, anchors, positives, corpus, 0, 60, 0.95, 0.0)
    options = dict(num_negatives=3, range_min=0, range_max=60, encode_options=EncodeOptions(cache_dir=cache))
    mined = mine_hard_negatives(minilm, anchors, positives, corpus, sampling="random", seed=7, **options)
    top = mine_hard_negatives(minilm, anchors, positives, corpus, **options)
    for anchor, negatives in zip(mined.columns["anchor"], negatives_of(mined.columns, 3)):
        assert len(set(negatives)) == 3 and set(negatives) <= {t for t, _ in expected[anchor]}
    assert negatives_of(mined.columns, 3) != negatives_of(top.columns, 3)
    again = mine_hard_negatives(minilm, anchors, positives, corpus, sampling="random", seed=7, **options)
    assert again.columns == mined.columns, "the seed makes sampling reproducible"


def test_equals_sentence_transformers_when_range_min_is_zero(
    minilm_path: str, minilm: Encoder, small_set, cache: Path  # noqa: F811
) -> None:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as st_mine

    anchors, positives, corpus = small_set
    corpus = [text for text in corpus if text not in set(anchors)]  # textcl also excludes an anchor's own text
    peer = st_mine(
        Dataset.from_dict({"anchor": anchors, "positive": positives}), SentenceTransformer(minilm_path, device="cpu"),
        corpus=corpus, range_max=500, relative_margin=0.05, num_negatives=3, output_format="n-tuple",
        output_scores=True, verbose=False,
    )
    ours = mine_hard_negatives(minilm, anchors, positives, corpus, num_negatives=3, range_min=0, range_max=500,
                               encode_options=EncodeOptions(cache_dir=cache))
    ours_pairs = sorted(zip(ours.columns["anchor"], ours.columns["positive"]))
    assert ours_pairs == sorted(zip(peer["anchor"], peer["positive"]))
    peer_rows = {(a, p): (n1, n2, n3, s) for a, p, n1, n2, n3, s in zip(
        peer["anchor"], peer["positive"], peer["negative_1"], peer["negative_2"], peer["negative_3"], peer["scores"])}
    for i, key in enumerate(zip(ours.columns["anchor"], ours.columns["positive"])):
        *peer_negatives, peer_scores = peer_rows[key]
        ours_scores = [ours.columns["positive_score"][i]] + [ours.columns[f"negative_{j}_score"][i] for j in (1, 2, 3)]
        assert np.allclose(ours_scores, peer_scores, atol=1e-5)
        assert [ours.columns[f"negative_{j}"][i] for j in (1, 2, 3)] == peer_negatives


def test_ivf_probing_every_list_equals_flat(minilm: Encoder, small_set, cache: Path) -> None:  # noqa: F811
    anchors, positives, corpus = small_set
    options = dict(num_negatives=3, range_min=2, range_max=30, encode_options=EncodeOptions(cache_dir=cache))
    flat = mine_hard_negatives(minilm, anchors, positives, corpus, **options)
    ivf = mine_hard_negatives(minilm, anchors, positives, corpus, factory="IVF4,Flat", search_params="nprobe=4",
                              **options)
    assert ivf.columns["anchor"] == flat.columns["anchor"]
    assert negatives_of(ivf.columns, 3) == negatives_of(flat.columns, 3)


def test_second_run_reuses_the_embedding_cache(tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from conftest import SENTENCES

    encoder = Encoder.load(tiny_model_dir, pooling="mean")
    anchors, positives = SENTENCES[:4], SENTENCES[4:8]
    options = dict(num_negatives=2, range_min=0, range_max=4, max_score_ratio=None, margin=None,
                   encode_options=EncodeOptions(cache_dir=tmp_path))
    first = mine_hard_negatives(encoder, anchors, positives, SENTENCES[8:], **options)
    assert len(list(tmp_path.glob("*.npy"))) == 3, "corpus, extra positives and anchors"
    monkeypatch.setattr(encoder.model, "forward", lambda *a, **k: pytest.fail("embeddings should come from the cache"))
    second = mine_hard_negatives(encoder, anchors, positives, SENTENCES[8:], **options)
    assert second.columns == first.columns and first.stats.rows_kept > 0


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_negatives=0), "num_negatives must be at least 1"),
        (dict(range_min=50, range_max=50), "range_min < range_max"),
        (dict(num_negatives=20, range_min=0, range_max=10), "does not fit in ranks"),
        (dict(max_score_ratio=1.5), r"max_score_ratio must be in \(0, 1\]"),
        (dict(sampling="best"), "sampling must be one of top, random"),
    ],
)
def test_bad_options_are_clear(tiny_model_dir: Path, options: dict, message: str) -> None:
    with pytest.raises(TextclError, match=message):
        mine_hard_negatives(Encoder.load(tiny_model_dir, pooling="mean"), ["a"], ["b"], ["c"], **options)


@pytest.mark.slow
def test_scifact_train_negatives(scifact, monkeypatch) -> None:  # noqa: F811
    anchors, positives, corpus = read_pairs(scifact.folder, "train")
    assert corpus == scifact.texts, "same texts, so the session cache holds the corpus embeddings"
    cached = EncodeOptions(cache_dir=scifact.cache_dir)
    mined = mine_hard_negatives(scifact.encoder, anchors, positives, corpus, encode_options=cached)
    print(mined.stats.summary())
    train = load_beir(scifact.folder, "train")
    relevant: dict[str, set[str]] = {}
    for query_id, relevance in train.qrels.items():
        docs = {doc_text(*train.corpus[d]) for d, grade in relevance.items() if grade >= 1}
        relevant.setdefault(train.queries[query_id], set()).update(docs)
    columns = mined.columns
    assert mined.stats.rows_kept > 0.8 * len(anchors)
    for i, anchor in enumerate(columns["anchor"]):
        for j in range(1, 6):
            assert columns[f"negative_{j}"][i] not in relevant[anchor]
            assert columns[f"negative_{j}_score"][i] < 0.95 * columns["positive_score"][i]
    monkeypatch.setattr(scifact.encoder.model, "forward", lambda *a, **k: pytest.fail("embeddings must be cached"))
    again = mine_hard_negatives(scifact.encoder, anchors, positives, corpus, encode_options=cached)
    assert again.columns == columns
