"""Quantized search indexes: int8 and binary recall against exact float search, rescoring, saved folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SENTENCES

from textcl.errors import TextclError
from textcl.evaluation.retrieval import evaluate_retrieval
from textcl.model.encoder import Encoder
from textcl.retrieval.exact_search import exact_search
from textcl.retrieval.quantization import build_quantized_index, index_bytes, quantized_search
from textcl.retrieval.search_index import SearchIndex


def clustered_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 500 fixed random centres: a corpus whose neighbours are meaningful, as embeddings'
    are; `seed` draws the points (documents and queries come from the same centres)."""
    centres = np.random.default_rng(1234).normal(size=(500, dim))
    rng = np.random.default_rng(seed)
    vectors = centres[rng.integers(0, 500, n)] + 0.6 * rng.normal(size=(n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def recall_at(rows: np.ndarray, exact_rows: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(rows, exact_rows)]))


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, np.ndarray]:
    documents = clustered_vectors(5000, 128, seed=0)
    queries = clustered_vectors(200, 128, seed=1)
    return documents, queries


def test_quantized_recall_against_exact_search(corpus):
    documents, queries = corpus
    _, exact_rows = exact_search(queries, documents, 10)
    recalls = {}
    for quantize, rescore in [("int8", 0), ("int8", 4), ("binary", 0), ("binary", 4)]:
        index = build_quantized_index([documents], quantize)
        scores, rows = quantized_search(index, quantize, queries, 10, rescore, documents)
        assert rows.shape == (200, 10) and (np.diff(scores, axis=1) <= 1e-6).all()  # best first
        recalls[quantize, rescore] = recall_at(rows, exact_rows)
    assert recalls["int8", 0] >= 0.95
    assert recalls["int8", 4] >= 0.99
    assert recalls["binary", 0] < recalls["binary", 4]  # rescoring recovers what the bits lose
    assert recalls["binary", 4] >= 0.85
    sizes = {quantize: index_bytes(build_quantized_index([documents], quantize)) for quantize in ("int8", "binary")}
    assert sizes["int8"] < documents.nbytes / 3.5 and sizes["binary"] < documents.nbytes / 25


def test_rescored_scores_are_float_inner_products(corpus):
    documents, queries = corpus
    index = build_quantized_index([documents], "binary")
    scores, rows = quantized_search(index, "binary", queries, 5, 3, documents)
    assert np.allclose(scores, np.einsum("qd,qkd->qk", queries, documents[rows]), atol=1e-5)
    with pytest.raises(TextclError, match="no float vectors"):
        quantized_search(index, "binary", queries, 5, 3, None)


@pytest.fixture(scope="module")
def tiny_encoder(tiny_model_dir) -> Encoder:
    return Encoder.load(tiny_model_dir, device="cpu")


@pytest.mark.parametrize("quantize", ["int8", "binary"])
def test_search_index_quantized_save_load_round_trip(tmp_path, tiny_encoder, quantize):
    index = SearchIndex.build(tiny_encoder, SENTENCES, quantize=quantize, rescore=3)
    before = index.search(SENTENCES[:4], k=3)
    assert [row[0] for row in before.texts] == SENTENCES[:4]  # each sentence finds itself first
    index.save(tmp_path / "index")
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert meta["quantize"] == quantize and meta["rescore"] == 3
    assert (tmp_path / "index" / "float_embeddings.npy").is_file()
    loaded = SearchIndex.load(tmp_path / "index", encoder=tiny_encoder)
    assert isinstance(loaded.float_vectors, np.memmap)  # floats stay on disk
    after = loaded.search(SENTENCES[:4], k=3)
    assert (after.ids == before.ids).all() and np.allclose(after.scores, before.scores, atol=1e-6)
    loaded.add(["A brand new document about frogs."], ids=["new"])
    assert loaded.search("A brand new document about frogs.", k=1).ids[0, 0] == "new"
    no_rescore = loaded.search(SENTENCES[:4], k=3, rescore=0)
    assert no_rescore.scores.shape == (4, 3)


def test_quantized_index_bad_input(tmp_path, tiny_encoder, tiny_model_dir):
    with pytest.raises(TextclError, match="unknown quantization"):
        SearchIndex.build(tiny_encoder, SENTENCES, quantize="int4")
    with pytest.raises(TextclError, match="rescore applies to a quantized index"):
        SearchIndex.build(tiny_encoder, SENTENCES, rescore=4)
    with pytest.raises(TextclError, match="drop factory"):
        SearchIndex.build(tiny_encoder, SENTENCES, factory="HNSW32", quantize="int8")
    index = SearchIndex.build(tiny_encoder, SENTENCES, quantize="binary")
    with pytest.raises(TextclError, match="no float vectors"):
        index.search(SENTENCES[0], rescore=2)
    with pytest.raises(TextclError, match="the queries have 16 dimensions but this index holds 32"):
        index.search_vectors(np.ones((1, 16), dtype=np.float32))
    index.save(tmp_path / "index")
    other = Encoder.load(tiny_model_dir, device="cpu")
    other.add_dense(24)
    with pytest.raises(TextclError, match="holds 32-dimensional vectors but the model gives 24") as error:
        SearchIndex.load(tmp_path / "index", encoder=other)
    assert "\n" not in str(error.value)
    odd = Encoder.load(tiny_model_dir, device="cpu")
    odd.add_dense(12)
    with pytest.raises(TextclError, match="not divisible by 8"):
        SearchIndex.build(odd, SENTENCES, quantize="binary")


def test_evaluate_retrieval_honours_quantization(tmp_path, tiny_encoder):
    """BEIR evaluation through a quantized index: binary + rescore over the whole (tiny) corpus is exact."""
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as handle:
        for i, text in enumerate(SENTENCES):
            handle.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    with (folder / "queries.jsonl").open("w") as handle:
        for i, text in enumerate(SENTENCES[:6]):
            handle.write(json.dumps({"_id": f"q{i}", "text": text.lower()}) + "\n")
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(6))
    )
    exact = evaluate_retrieval(tiny_encoder, folder, k_values=(3,))
    rescored = evaluate_retrieval(tiny_encoder, folder, k_values=(3,), quantize="binary", rescore=len(SENTENCES))
    assert rescored["ndcg@3"] == pytest.approx(exact["ndcg@3"])
    int8 = evaluate_retrieval(tiny_encoder, folder, k_values=(3,), quantize="int8")
    assert 0 <= int8["ndcg@3"] <= 1
