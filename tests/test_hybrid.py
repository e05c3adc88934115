"""Hybrid search: BM25 scores equal bm25s's own, fusion equals the formulas computed here by hand, writes keep the
BM25 side equal to a fresh build (also across a SIGKILL under `textcl serve`), clear errors, eval --hybrid.

The independent side of each comparison uses bm25s, PyStemmer and numpy directly, never textcl's fusion code.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import bm25s
import numpy as np
import pytest
import Stemmer
from conftest import SENTENCES
from scifact_fixtures import tiny_beir

from textcl import Encoder
from textcl.cli import main
from textcl.errors import TextclError
from textcl.evaluation.hybrid import lexical_run
from textcl.evaluation.retrieval import evaluate_retrieval
from textcl.evaluation.retrieval_metrics import retrieval_metrics
from textcl.io.beir import doc_text, load_beir
from textcl.retrieval.fusion import FusionSettings
from textcl.retrieval.search_index import SearchIndex

QUERIES = ["a man plays the guitar", "dogs running in snow", "stock market news", "children playing football"]
IDS = [f"doc-{i}" for i in range(len(SENTENCES))]


@pytest.fixture(scope="module")
def encoder(tiny_model_dir: Path) -> Encoder:
    return Encoder.load(tiny_model_dir, pooling="mean")


def bm25_by_library(texts: list[str], queries: list[str]) -> np.ndarray:
    """BM25 scores `[n_queries, n_docs]` from bm25s alone (its retrieve API, every document ranked)."""
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, show_progress=False)
    rows, scores = retriever.retrieve(tokens, k=len(texts), show_progress=False)
    full = np.zeros((len(queries), len(texts)), dtype=np.float32)
    np.put_along_axis(full, rows, scores, axis=1)
    return full


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def fused_by_hand(dense: np.ndarray, lexical: np.ndarray, method: str, weight: float, depth: int,
                  k: int) -> list[list[tuple[int, float]]]:
    """Per query, (row, fused score) of the top k, from full score matrices `[n_queries, n_docs]`: each side's top
    `depth` (BM25: only documents with a positive score), RRF with k=60 or min-max normalised weighted sum."""
    results = []
    for dense_row, lexical_row in zip(dense, lexical):
        dense_top = list(np.argsort(-dense_row, kind="stable")[:depth])
        lexical_top = [r for r in np.argsort(-lexical_row, kind="stable")[:depth] if lexical_row[r] > 0]
        fused: dict[int, float] = {}
        if method == "rrf":
            for top in (dense_top, lexical_top):
                for rank, row in enumerate(top, start=1):
                    fused[int(row)] = fused.get(int(row), 0.0) + 1 / (60 + rank)
        else:
            for top, scores, share in ((dense_top, dense_row, weight), (lexical_top, lexical_row, 1 - weight)):
                values = scores[top]
                span = values.max() - values.min() if len(values) else 0.0
                for row, value in zip(top, values):
                    part = 1.0 if span == 0 else (value - values.min()) / span
                    fused[int(row)] = fused.get(int(row), 0.0) + share * part
        results.append(sorted(fused.items(), key=lambda item: -item[1])[:k])
    return results


@pytest.mark.parametrize("method, weight, depth", [("rrf", 0.5, 100), ("weighted", 0.3, 100), ("weighted", 0.7, 4)])
def test_hybrid_search_equals_bm25s_and_fusion_by_hand(encoder: Encoder, tmp_path: Path, method: str, weight: float,
                                                       depth: int) -> None:
    fusion = FusionSettings(method=method, weight=weight, depth=depth)
    SearchIndex.build(encoder, SENTENCES, IDS, hybrid=True, fusion=fusion).save(tmp_path / "index")
    index = SearchIndex.load(tmp_path / "index")
    lexical = bm25_by_library(SENTENCES, QUERIES)
    dense = unit(encoder.encode(QUERIES)) @ unit(encoder.encode(SENTENCES)).T  # the index's cosines

    bm25 = index.search(QUERIES, k=3, mode="bm25")
    for row, (ids, scores) in enumerate(zip(bm25.ids, bm25.scores)):
        expected = [r for r in np.argsort(-lexical[row], kind="stable")[:3] if lexical[row, r] > 0]
        assert [key for key in ids if key is not None] == [IDS[r] for r in expected]
        assert np.allclose(scores[: len(expected)], lexical[row, expected], rtol=1e-5)

    hits = index.search(QUERIES, k=5)  # a hybrid index searches hybrid by default
    for row, expected in enumerate(fused_by_hand(dense, lexical, method, weight, max(depth, 5), 5)):  # depth >= k
        assert hits.ids[row].tolist() == [IDS[r] for r, _ in expected]
        # min-max over close cosines magnifies float32 rounding (faiss vs numpy) 20-fold
        assert np.allclose(hits.scores[row], [score for _, score in expected], atol=1e-4)
        rows = [r for r, _ in expected]
        dense_top = np.argsort(-dense[row], kind="stable")[: max(depth, 5)]
        dense_part = np.where(np.isin(rows, dense_top), dense[row, rows], np.nan)
        assert np.allclose(hits.dense_scores[row], dense_part, atol=1e-5, equal_nan=True)
        bm25_part = np.where(lexical[row, rows] > 0, lexical[row, rows], np.nan)
        assert np.allclose(hits.lexical_scores[row], bm25_part, rtol=1e-5, equal_nan=True)


def test_writes_keep_bm25_equal_to_a_fresh_build(encoder: Encoder, tmp_path: Path) -> None:
    """add and remove (as the serve log replays them), saved and loaded, equal an index built from the final
    documents; int8 quantization underneath changes nothing on the BM25 side."""
    index = SearchIndex.build(encoder, SENTENCES[:8], IDS[:8], hybrid=True, quantize="int8", rescore=2)
    new = ["A zebra grazes near the river.", "The zebra and the dog are friends."]
    index.add_vectors(["z1", "z2"], new, index.encode(new, "document", 8))
    index.remove(["doc-1", "doc-4"])
    index.save(tmp_path / "index")
    loaded = SearchIndex.load(tmp_path / "index")
    texts = [*(SENTENCES[i] for i in (0, 2, 3, 5, 6, 7)), *new]
    fresh = SearchIndex.build(encoder, texts, [*(IDS[i] for i in (0, 2, 3, 5, 6, 7)), "z1", "z2"], hybrid=True,
                              quantize="int8", rescore=2)
    queries = [*QUERIES, "zebra"]
    for mode in ("bm25", "hybrid"):
        got, want = loaded.search(queries, k=4, mode=mode), fresh.search(queries, k=4, mode=mode)
        assert got.ids.tolist() == want.ids.tolist()
        assert np.allclose(got.lexical_scores, want.lexical_scores, rtol=1e-5, equal_nan=True)
    assert sorted(loaded.search("zebra", k=2, mode="bm25").ids[0]) == ["z1", "z2"]
    lexical = bm25_by_library(texts, queries)
    assert np.allclose(np.nan_to_num(got.lexical_scores), np.take_along_axis(
        lexical, np.array([[loaded.ids.tolist().index(key) for key in row] for row in got.ids]), axis=1), rtol=1e-5)


def test_hybrid_search_on_an_index_without_bm25_is_one_clear_line(encoder: Encoder, tiny_model_dir: Path,
                                                                   tmp_path: Path, capsys) -> None:
    index = SearchIndex.build(encoder, SENTENCES, IDS)
    for mode in ("hybrid", "bm25"):
        with pytest.raises(TextclError, match=f"a {mode} search needs BM25, and this index was built without it; "
                                              "rebuild it with `textcl index .* --hybrid`"):
            index.search("guitar", mode=mode)
    assert index.search("guitar", k=2).lexical_scores is None  # a dense index still searches as before
    index.save(tmp_path / "dense")
    assert main(["search", str(tmp_path / "dense"), "guitar", "--hybrid"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("textcl: error: a hybrid search needs BM25") and "Traceback" not in "\n".join(err)
    hybrid = SearchIndex.build(encoder, SENTENCES, IDS, hybrid=True)
    hybrid.save(tmp_path / "hybrid")
    (tmp_path / "hybrid" / "bm25_vocab.json").unlink()
    with pytest.raises(TextclError, match="hybrid index without its BM25 file bm25_vocab.json"):
        SearchIndex.load(tmp_path / "hybrid")


def test_eval_hybrid_json_holds_dense_bm25_and_hybrid(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """The dense part equals plain `textcl eval`'s retrieval, the BM25 part equals bm25s's ranking scored by
    trec_eval's conventions; a dev split chooses the weight of weighted fusion."""
    folder = tiny_beir(tmp_path / "beir")
    (folder / "qrels" / "dev.tsv").write_text((folder / "qrels" / "test.tsv").read_text())
    out = tmp_path / "hybrid.json"
    assert main(["eval", str(tiny_model_dir), "--beir", str(folder), "--hybrid", "--fusion", "weighted",
                 "--fusion_dev_split", "dev", "--json", str(out)]) == 0
    assert "metric     dense      bm25    hybrid" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert set(results) == {"dense", "bm25", "hybrid"}
    dense = evaluate_retrieval(Encoder.load(tiny_model_dir), folder)
    assert results["dense"] == pytest.approx(dense)
    data = load_beir(folder)
    texts = [doc_text(*data.corpus[key]) for key in data.corpus]
    query_ids = [q for q, rel in data.qrels.items() if max(rel.values()) >= 1]
    lexical = bm25_by_library(texts, [data.queries[q] for q in query_ids])
    run = {q: {key: float(s) for key, s in zip(data.corpus, row) if s > 0} for q, row in zip(query_ids, lexical)}
    assert results["bm25"] == pytest.approx(retrieval_metrics(data.qrels, run, [1, 3, 5, 10, 100]) | {"n_docs": 12})
    ours = lexical_run(data, 100)
    assert all(ours[q] == pytest.approx(run[q], rel=1e-5) for q in query_ids)
    tuning = results["hybrid"]["fusion_dev"]
    weight = results["hybrid"]["fusion"]["weight"]
    assert tuning["ndcg@10_by_weight"][str(weight)] == max(tuning["ndcg@10_by_weight"].values())
    assert tuning["ndcg@10_by_weight"]["0.0"] <= results["hybrid"]["ndcg@10"] + 1e-9  # dev = test here


def test_bm25_alone_reaches_beir_scifact(shared_data: Path) -> None:
    """Tokenization is sane: BM25 alone on SciFact test scores at least BEIR's published 0.665 - 0.01."""
    folder = shared_data / "scifact"
    if not folder.is_dir():
        pytest.skip("SciFact is not in the shared data")
    data = load_beir(folder, "test")
    assert retrieval_metrics(data.qrels, lexical_run(data, 100), [10])["ndcg@10"] >= 0.655


@pytest.mark.slow
def test_hybrid_writes_survive_sigkill_under_serve(encoder: Encoder, tmp_path: Path) -> None:
    """Adds and deletes acknowledged by `textcl serve` over a hybrid index (a snapshot every 4 writes, so some
    are in the snapshot and some only in the log) survive a SIGKILL: the folder then loads with BM25 and fused
    results equal to an index built from the acknowledged documents."""
    pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
    from test_serve import call, start_process

    model = tmp_path / "model"
    encoder.save(model)
    folder = tmp_path / "index"
    SearchIndex.build(Encoder.load(model), SENTENCES, IDS, hybrid=True).save(folder)
    process, url = start_process([str(folder), "--snapshot_every", "4"], tmp_path / "serve.log")
    added = {f"z{n}": f"zebra number {n} walks by the river" for n in range(4)}
    writes = ["z0", "z1", "z2", "doc-2", "z3", "z1"]  # a snapshot after the 4th; the last two only in the log
    try:
        for n, key in enumerate(writes):
            if n in (3, 5):
                assert call(f"{url}/documents/{key}", "DELETE")[0] == 200
            else:
                assert call(f"{url}/documents", "POST", [{"id": key, "text": added[key]}])[0] == 201
        status, body, _ = call(f"{url}/search", "POST", {"query": "zebra river", "k": 3})
        assert status == 200 and {"dense_score", "bm25_score"} <= set(body["results"][0]["hits"][0])
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        process.kill()
    ids = [key for key in IDS if key != "doc-2"] + ["z0", "z2", "z3"]
    texts = [SENTENCES[IDS.index(key)] if key in IDS else added[key] for key in ids]
    expected = SearchIndex.build(Encoder.load(model), texts, ids, hybrid=True)
    from textcl.serving.store import DurableIndex

    store = DurableIndex.open(folder)
    assert store.index.ids.tolist() == ids
    got, want = store.index.search([*QUERIES, "zebra river"], k=4), expected.search([*QUERIES, "zebra river"], k=4)
    assert got.ids.tolist() == want.ids.tolist()
    assert np.allclose(got.scores, want.scores, atol=1e-5)
    assert np.allclose(got.lexical_scores, want.lexical_scores, rtol=1e-5, equal_nan=True)
    store.close()


def test_hybrid_search_with_the_onnx_backend_and_binary_vectors_equals_torch(tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    """The BM25 side and the fusion do not depend on how the dense side is computed: an ONNX encoder over a binary
    index with rescoring fuses to the same results as torch over the same index type."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from textcl.model.onnx_export import export_onnx

    folder = tmp_path / "model"
    Encoder.load(tiny_model_dir, pooling="mean", normalize=True).save(folder)
    export_onnx(folder)
    built = {backend: SearchIndex.build(Encoder.load(folder, backend=backend), SENTENCES, IDS, hybrid=True,
                                        quantize="binary", rescore=4) for backend in ("torch", "onnx")}
    built["onnx"].save(tmp_path / "index")
    onnx = SearchIndex.load(tmp_path / "index")
    assert onnx.encoder.backend == "onnx"
    got, want = onnx.search(QUERIES, k=4), built["torch"].search(QUERIES, k=4)
    assert got.ids.tolist() == want.ids.tolist()
    assert np.allclose(got.scores, want.scores, atol=1e-5)
    assert np.allclose(got.lexical_scores, want.lexical_scores, rtol=1e-5, equal_nan=True)



def test_a_hybrid_search_over_http_on_a_dense_index_is_a_400(tmp_path: Path, tiny_model_dir: Path) -> None:
    pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
    from test_serve import call, running

    SearchIndex.build(Encoder.load(tiny_model_dir, pooling="mean"), SENTENCES, IDS).save(tmp_path / "index")
    with running(tmp_path / "index") as (url, _):
        status, body, _ = call(f"{url}/search", "POST", {"query": "guitar", "mode": "hybrid"})
        assert status == 400 and body["detail"].startswith("a hybrid search needs BM25, and this index was built")
        status, body, _ = call(f"{url}/search", "POST", {"query": "guitar", "k": 2})
        assert status == 200 and set(body["results"][0]["hits"][0]) == {"id", "score", "text"}
