"""SearchIndex: build -> save -> load -> search equals brute-force numpy cosine; IVF recall vs Flat; errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES, build_tiny_bert, build_tokenizer
from scifact_fixtures import scifact  # noqa: F401

from textcl import Encoder
from textcl.errors import TextclError
from textcl.io.beir import load_beir
from textcl.model.encode_options import EncodeOptions
from textcl.retrieval.faiss_index import set_search_params
from textcl.retrieval.search_index import SearchIndex

QUERIES = ["someone plays an instrument", "animals in the snow", "financial news", "a book"]


def brute_force(queries: np.ndarray, docs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows and cosines by numpy, from unnormalized or normalized vectors alike."""
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    docs = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    scores = queries @ docs.T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


def test_build_save_load_search_equals_numpy(tiny_model_dir: Path, tmp_path: Path) -> None:
    encoder = Encoder.load(tiny_model_dir, pooling="mean")
    ids = [f"doc-{i}" for i in range(len(SENTENCES))]
    SearchIndex.build(encoder, SENTENCES, ids).save(tmp_path / "index")
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["ids.jsonl", "index.faiss", "meta.json"]
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert meta["model"] == str(tiny_model_dir) and meta["dim"] == 32 and meta["metric"] == "cosine"
    assert meta["factory"] == "Flat" and meta["normalize"] is True and meta["count"] == 12
    loaded = SearchIndex.load(tmp_path / "index")
    hits = loaded.search(QUERIES, k=5)
    rows, scores = brute_force(encoder.encode(QUERIES), encoder.encode(SENTENCES), 5)
    assert hits.ids.tolist() == [[ids[r] for r in row] for row in rows]
    assert hits.texts.tolist() == [[SENTENCES[r] for r in row] for row in rows]
    assert np.allclose(hits.scores, scores, atol=1e-5)


def test_add_appends_searchable_documents_and_keeps_ids_unique(tiny_model_dir: Path) -> None:
    encoder = Encoder.load(tiny_model_dir, pooling="mean")
    index = SearchIndex.build(encoder, SENTENCES[:6])
    index.add(SENTENCES[6:])
    assert index.ids.tolist() == [str(i) for i in range(12)]
    hits = index.search(SENTENCES, k=1)
    assert hits.ids[:, 0].tolist() == index.ids.tolist(), "every text finds itself"
    with pytest.raises(TextclError, match="doc id '3' appears twice"):
        index.add(["another"], ids=["3"])


def test_k_larger_than_the_index_is_clamped_with_a_warning(tiny_model_dir: Path, caplog) -> None:
    index = SearchIndex.build(Encoder.load(tiny_model_dir, pooling="mean"), SENTENCES)
    with caplog.at_level(logging.WARNING, logger="textcl.retrieval.search_index"):
        hits = index.search("a query", k=50)
    assert hits.ids.shape == (1, 12)
    assert "k=50 is larger than the index (12 documents); returning 12" in caplog.text


def test_loading_with_a_model_of_another_dimension_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    SearchIndex.build(Encoder.load(tiny_model_dir, pooling="mean"), SENTENCES).save(tmp_path / "index")
    tokenizer = build_tokenizer(SENTENCES)
    wider = build_tiny_bert(len(tokenizer))
    wider.config.hidden_size = 48
    other = tmp_path / "wider"
    type(wider)(wider.config).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(TextclError, match=r"holds 32-dimensional vectors but the model gives 48"):
        SearchIndex.load(tmp_path / "index", Encoder.load(other, pooling="mean"))
    with pytest.raises(TextclError, match=r"not a search index folder \(missing index.faiss, ids.jsonl, meta.json\)"):
        SearchIndex.load(tmp_path)


def test_bad_factory_is_a_clear_error(tiny_model_dir: Path) -> None:
    with pytest.raises(TextclError, match="faiss cannot build index factory 'IVFx'"):
        SearchIndex.build(Encoder.load(tiny_model_dir, pooling="mean"), SENTENCES, factory="IVFx")


@pytest.mark.slow
def test_scifact_index_matches_numpy_and_ivf_recall(scifact, tmp_path: Path) -> None:  # noqa: F811
    flat = SearchIndex.build(scifact.encoder, scifact.texts, scifact.ids,
                             encode_options=EncodeOptions(cache_dir=scifact.cache_dir))
    flat.save(tmp_path / "flat")
    loaded = SearchIndex.load(tmp_path / "flat", scifact.encoder)
    queries = list(load_beir(scifact.folder, "test").queries.values())[:100]
    query_vectors = scifact.encoder.encode(queries, normalize=True)
    hits = loaded.search_vectors(query_vectors, k=10)
    rows, scores = brute_force(query_vectors, np.asarray(scifact.embeddings), 10)
    assert hits.ids.tolist() == [[scifact.ids[r] for r in row] for row in rows]
    assert np.allclose(hits.scores, scores, atol=1e-5)
    assert loaded.search(queries[:5], k=10).ids.tolist() == hits.ids[:5].tolist()
    ivf = SearchIndex.build(scifact.encoder, scifact.texts, scifact.ids, "IVF64,Flat",
                            encode_options=EncodeOptions(cache_dir=scifact.cache_dir))
    recalls = {}
    for nprobe in (1, 4, 16):
        set_search_params(ivf.index, f"nprobe={nprobe}")
        found = ivf.search_vectors(query_vectors, k=10).ids
        recalls[nprobe] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), hits.ids.tolist())])
        print(f"IVF64,Flat nprobe={nprobe}: recall@10 vs Flat = {recalls[nprobe]:.3f}")
    assert recalls[1] < recalls[4] < recalls[16] and recalls[16] >= 0.9
