"""Evaluation against trusted references: pytrec_eval (trec_eval) for retrieval metrics, scipy for STS,
the paper's formulas for alignment/uniformity, plain `Encoder.encode` + numpy for corpus encoding and search,
and the published all-MiniLM-L6-v2 figures on SciFact and STS-B."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
from conftest import SENTENCES
from scifact_fixtures import minilm, scifact, tiny_beir  # noqa: F401
from scipy.stats import pearsonr, spearmanr

from textcl import Encoder
from textcl.errors import TextclError
from textcl.evaluation.geometry import alignment_uniformity
from textcl.evaluation.retrieval import evaluate_retrieval
from textcl.evaluation.retrieval_metrics import retrieval_metrics
from textcl.evaluation.sts import evaluate_sts
from textcl.evaluation.suite import evaluate
from textcl.io.beir import doc_text, load_beir
from textcl.model.encode_options import EncodeOptions
from textcl.retrieval import exact_search as exact_search_module
from textcl.retrieval.corpus_embeddings import encode_corpus
from textcl.retrieval.exact_search import exact_search

K_VALUES = (1, 3, 5, 10, 20)
CUTOFFS = ",".join(map(str, K_VALUES))
MEASURES = {f"{name}.{CUTOFFS}" for name in ("ndcg_cut", "recall", "map_cut", "P")} | {"recip_rank"}


def reference_metrics(qrels: dict, run: dict, k_values: tuple[int, ...] = K_VALUES) -> dict[str, float]:
    """pytrec_eval's figures, averaged over queries with a relevant document (a query absent from its output
    retrieved nothing: 0). MRR@k is trec_eval's recip_rank when the first relevant rank 1/rr is <= k."""
    results = pytrec_eval.RelevanceEvaluator(qrels, MEASURES).evaluate(run)
    valid = [q for q, relevance in qrels.items() if max(relevance.values()) >= 1]
    names = {"ndcg": "ndcg_cut_{}", "recall": "recall_{}", "map": "map_cut_{}", "precision": "P_{}"}
    figures = {}
    for k in k_values:
        for ours, theirs in names.items():
            figures[f"{ours}@{k}"] = np.mean([results.get(q, {}).get(theirs.format(k), 0.0) for q in valid])
        reciprocal = [results.get(q, {}).get("recip_rank", 0.0) for q in valid]
        figures[f"mrr@{k}"] = np.mean([rr if rr >= 1 / k else 0.0 for rr in reciprocal])
    return figures


def random_judgements(rng: np.random.Generator) -> tuple[dict, dict]:
    """Graded qrels (grades -1..3) and runs on a coarse score grid, so many scores tie."""
    docs = [f"d{i:02d}" for i in range(40)]
    qrels, run = {}, {}
    for q in range(10):
        judged = rng.choice(docs, size=rng.integers(1, 9), replace=False)
        qrels[f"q{q}"] = {d: int(rng.integers(-1, 4)) for d in judged}
        retrieved = rng.choice(docs, size=rng.integers(0, 30), replace=False)
        run[f"q{q}"] = {d: float(rng.integers(0, 6)) / 5 for d in retrieved}
    return qrels, run


@pytest.mark.parametrize("seed", range(30))
def test_metrics_equal_pytrec_eval_with_ties_and_grades(seed: int) -> None:
    qrels, run = random_judgements(np.random.default_rng(seed))
    ours = retrieval_metrics(qrels, run, K_VALUES)
    reference = reference_metrics(qrels, run)
    for name, value in reference.items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    valid = sum(max(r.values()) >= 1 for r in qrels.values())
    assert ours["n_queries"] == valid and ours["n_skipped_queries"] == len(qrels) - valid


def test_ties_are_broken_by_doc_id_descending_like_trec_eval() -> None:
    qrels = {"q": {"a": 1}}
    run = {"q": {"a": 0.5, "b": 0.5, "c": 0.9}}
    ours = retrieval_metrics(qrels, run, (1, 2, 3))
    assert ours["mrr@3"] == pytest.approx(reference_metrics(qrels, run, (3,))["mrr@3"]) == pytest.approx(1 / 3)


def test_bad_k_is_a_clear_error() -> None:
    with pytest.raises(TextclError, match="positive integers"):
        retrieval_metrics({"q": {"a": 1}}, {"q": {"a": 1.0}}, (0, 10))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> Encoder:
    return Encoder.load(tiny_model_dir, pooling="mean")


def test_retrieval_equals_pytrec_eval_on_a_brute_force_run(tiny: Encoder, tmp_path: Path) -> None:
    folder = tiny_beir(tmp_path)
    data = load_beir(folder)
    doc_ids = list(data.corpus)
    docs = tiny.encode([doc_text(*data.corpus[d]) for d in doc_ids], normalize=True)
    run = {}
    for query_id, text in data.queries.items():
        scores = docs @ tiny.encode(text, normalize=True)
        run[query_id] = {doc_id: float(score) for doc_id, score in zip(doc_ids, scores)}
    ours = evaluate_retrieval(tiny, folder, k_values=K_VALUES)
    for name, value in reference_metrics(data.qrels, run).items():
        assert ours[name] == pytest.approx(value, abs=1e-6), name
    assert (ours["n_queries"], ours["n_skipped_queries"], ours["n_docs"]) == (4, 1, 12)


def write_sts(path: Path, rows: list[tuple[str, str, float]], header: str = "sentence1\tsentence2\tscore") -> Path:
    path.write_text(header + "\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows))
    return path


def sts_rows(seed: int) -> list[tuple[str, str, float]]:
    """20 distinct sentence pairs (a repeated pair would tie in cosine up to float noise, and Spearman's
    ranks of near-ties depend on batch padding) with random gold scores."""
    rng = np.random.default_rng(seed)
    pairs = [(i, j) for i in range(12) for j in range(i + 1, 12)]
    chosen = rng.choice(len(pairs), size=20, replace=False)
    return [(SENTENCES[pairs[c][0]], SENTENCES[pairs[c][1]], float(rng.uniform(0, 5))) for c in chosen]


def test_sts_equals_scipy_on_independent_cosines(minilm_path: str, tmp_path: Path) -> None:
    """On the real MiniLM: the tiny random model maps every sentence to nearly the same vector, so its
    cosines tie up to float noise and Spearman's ranks would depend on batch padding."""
    model = Encoder.load(minilm_path)
    rows_a, rows_b = sts_rows(0), sts_rows(1)
    file_a = write_sts(tmp_path / "a.tsv", rows_a)
    file_b = write_sts(tmp_path / "b.tsv", rows_b, header="s1\ts2\tgold")
    result = evaluate_sts(model, [file_a], columns=("sentence1", "sentence2", "score"))
    figures = []
    for rows in (rows_a, rows_b):
        first = model.encode([a for a, _, _ in rows], normalize=True)
        second = model.encode([b for _, b, _ in rows], normalize=True)
        cosines, gold = (first * second).sum(axis=1), [s for _, _, s in rows]
        figures.append((spearmanr(gold, cosines).statistic, pearsonr(gold, cosines).statistic))
    assert result["spearman"] == pytest.approx(figures[0][0], abs=1e-6)
    assert result["pearson"] == pytest.approx(figures[0][1], abs=1e-6)
    assert result["n"] == 20
    write_sts(tmp_path / "c.tsv", rows_b)
    averaged = evaluate_sts(model, [file_a, tmp_path / "c.tsv"])
    assert averaged["spearman"] == pytest.approx((figures[0][0] + figures[1][0]) / 2, abs=1e-6)
    assert averaged["pearson"] == pytest.approx((figures[0][1] + figures[1][1]) / 2, abs=1e-6)
    assert averaged["n"] == 40 and set(averaged["files"]) == {str(file_a), str(tmp_path / "c.tsv")}
    mapped = evaluate_sts(model, file_b, columns=("s1", "s2", "gold"))
    assert mapped["spearman"] == pytest.approx(figures[1][0], abs=1e-6)


def test_sts_mistakes_are_clear(tiny: Encoder, tmp_path: Path) -> None:
    file = write_sts(tmp_path / "a.tsv", [("x", "y", 1.0), ("x", "z", 2.0)])
    with pytest.raises(TextclError, match=r"column 'similarity' not in .*columns found: sentence1, sentence2, score"):
        evaluate_sts(tiny, file, columns=("sentence1", "sentence2", "similarity"))
    bad = write_sts(tmp_path / "bad.tsv", [("x", "y", 1.0), ("x", "z", "high")])  # type: ignore[list-item]
    with pytest.raises(TextclError, match=r"score 'high' in data row 2 is not a number"):
        evaluate_sts(tiny, bad)


def test_alignment_and_uniformity_follow_the_formulas(tiny: Encoder) -> None:
    pairs = [(SENTENCES[i], SENTENCES[i + 1]) for i in range(0, 10, 2)]
    result = alignment_uniformity(tiny, pairs)
    texts = list(dict.fromkeys([t for pair in pairs for t in pair]))
    vectors = {t: v.astype(np.float64) for t, v in zip(texts, tiny.encode(texts, normalize=True))}
    alignment = np.mean([np.sum((vectors[a] - vectors[b]) ** 2) for a, b in pairs])
    distances = [np.sum((vectors[u] - vectors[v]) ** 2) for i, u in enumerate(texts) for v in texts[i + 1 :]]
    uniformity = np.log(np.mean(np.exp(-2 * np.array(distances))))
    assert result["alignment"] == pytest.approx(alignment, abs=1e-5)
    assert result["uniformity"] == pytest.approx(uniformity, abs=1e-5)


def test_evaluate_has_the_eval_output_shape(tiny: Encoder, tmp_path: Path) -> None:
    sts = write_sts(tmp_path / "a.tsv", sts_rows(2))
    results = evaluate(tiny, sts=[sts], beir=tiny_beir(tmp_path / "beir"), split="test")
    assert set(results) == {"sts", "retrieval"}
    assert {"spearman", "pearson", "n"} <= set(results["sts"])
    contract = {"ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100", "n_queries", "n_docs"}
    assert contract <= set(results["retrieval"])
    assert all(0 <= results["retrieval"][k] <= 1 for k in contract - {"n_queries", "n_docs"})
    assert set(evaluate(tiny, sts=[sts])) == {"sts"}
    with pytest.raises(TextclError, match="nothing to evaluate"):
        evaluate(tiny)


def test_chunked_cached_encoding_equals_encode_and_is_reused(tiny: Encoder, tmp_path: Path, monkeypatch) -> None:
    texts = [f"{SENTENCES[i % 12]} number {i}" for i in range(50)]
    expected = tiny.encode(texts, normalize=True)
    in_memory = encode_corpus(tiny, texts, chunk_size=7)
    cached = encode_corpus(tiny, texts, encode_options=EncodeOptions(cache_dir=tmp_path), chunk_size=7)
    assert isinstance(cached, np.memmap) and len(list(tmp_path.glob("*.npy"))) == 1
    assert np.allclose(in_memory, expected, atol=1e-6) and np.allclose(cached, expected, atol=1e-6)
    with monkeypatch.context() as patch:
        patch.setattr(tiny.model, "forward", lambda *a, **k: pytest.fail("the cache should have been used"))
        assert np.array_equal(encode_corpus(tiny, texts, encode_options=EncodeOptions(cache_dir=tmp_path)), cached)
    encode_corpus(tiny, texts, encode_options=EncodeOptions(cache_dir=tmp_path, document_max_length=8))
    assert len(list(tmp_path.glob("*.npy"))) == 2, "another max length is another cache entry"


def test_exact_search_over_blocks_and_parts_equals_numpy(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    monkeypatch.setattr(exact_search_module, "SEARCH_BLOCK_BYTES", 40 * 16 * 4)
    scores, indices = exact_search(queries, [corpus[:130], corpus[130:]], 25)
    full = queries @ corpus.T
    assert np.array_equal(indices, np.argsort(-full, axis=1)[:, :25])
    assert np.allclose(scores, np.take_along_axis(full, indices, axis=1), atol=1e-5)
    assert exact_search(queries, corpus, 1000)[1].shape == (7, 300), "k is clamped to the corpus"


SHARD_SCRIPT = """
import sys, numpy as np
from textcl import Encoder
from textcl.model.encode_options import EncodeOptions
from textcl.retrieval.corpus_embeddings import distributed_state, encode_corpus
encoder = Encoder.load(sys.argv[1], pooling="mean")
texts = [f"text {i} " * (i % 7 + 1) for i in range(45)]
for name, cache in (("cached", sys.argv[2]), ("temporary", None)):
    out = encode_corpus(encoder, texts, encode_options=EncodeOptions(cache_dir=cache), chunk_size=4)
    np.save(f"{sys.argv[3]}-{name}-{distributed_state().process_index}.npy", np.asarray(out))
"""


@pytest.mark.slow
def test_two_processes_encode_one_shard_each(tiny: Encoder, tiny_model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    expected = tiny.encode([f"text {i} " * (i % 7 + 1) for i in range(45)], normalize=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
               str(tiny_model_dir), str(tmp_path / "cache"), str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("cached", "temporary"):
        for rank in (0, 1):
            assert np.allclose(np.load(tmp_path / f"out-{name}-{rank}.npy"), expected, atol=1e-6), (name, rank)
    assert len(list((tmp_path / "cache").iterdir())) == 1, "one finished file, no leftovers"


@pytest.mark.slow
def test_scifact_ndcg_matches_the_published_minilm_figure(scifact) -> None:  # noqa: F811
    result = evaluate_retrieval(scifact.encoder, scifact.folder, "test",
                                encode_options=EncodeOptions(cache_dir=scifact.cache_dir))
    print({k: round(v, 4) for k, v in result.items()})
    assert result["ndcg@10"] == pytest.approx(0.6451, abs=0.005)
    assert result["mrr@10"] == pytest.approx(0.6047, abs=0.005)
    assert result["recall@100"] == pytest.approx(0.9250, abs=0.005)
    assert (result["n_queries"], result["n_docs"]) == (300, 5183)


@pytest.mark.slow
def test_stsb_test_spearman_matches_the_peer(minilm, shared_data: Path) -> None:  # noqa: F811
    result = evaluate_sts(minilm, shared_data / "stsb" / "test.tsv")
    print({k: v for k, v in result.items() if k != "files"})
    assert result["spearman"] == pytest.approx(0.8203, abs=0.0005)
    assert result["n"] == 1379


def test_only_the_shipped_evaluate_modules_import_evaluate() -> None:
    """Hugging Face `evaluate` is optional: textcl's own code never imports it; only the metric modules shipped
    for `evaluate.load` (textcl/evaluation/metrics/) do."""
    import ast

    package = Path(__file__).resolve().parents[1] / "textcl"
    metrics = package / "evaluation" / "metrics"
    sources = [source for source in package.rglob("*.py") if metrics not in source.parents]
    assert len(sources) > 40
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                assert all(alias.name.split(".")[0] != "evaluate" for alias in node.names), source
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "evaluate" or node.level > 0, source


@pytest.mark.parametrize("seed", range(5))
def test_the_evaluate_retrieval_module_equals_textcl_and_pytrec_eval(seed: int) -> None:
    """`evaluate.load(textcl.evaluation.RETRIEVAL_METRIC)` works offline and gives textcl's figures, which equal
    pytrec_eval's (graded qrels, ties)."""
    evaluate = pytest.importorskip("evaluate")
    from textcl.evaluation import RETRIEVAL_METRIC

    qrels, run = random_judgements(np.random.default_rng(100 + seed))
    metric = evaluate.load(RETRIEVAL_METRIC)
    predictions = [{"query_id": q, "doc_ids": list(docs), "scores": list(docs.values())} for q, docs in run.items()]
    references = [{"query_id": q, "doc_ids": list(docs), "relevance": list(docs.values())} for q, docs in qrels.items()]
    half = len(predictions) // 2  # batches added one by one give the same result
    metric.add_batch(predictions=predictions[:half], references=references[:half])
    metric.add_batch(predictions=predictions[half:], references=references[half:])
    loaded = metric.compute(k_values=K_VALUES)
    assert loaded == pytest.approx(retrieval_metrics(qrels, run, K_VALUES), abs=1e-12)
    for name, value in reference_metrics(qrels, run).items():
        assert loaded[name] == pytest.approx(value, abs=1e-6), name


def test_the_evaluate_sts_module_equals_textcl_and_scipy() -> None:
    evaluate = pytest.importorskip("evaluate")
    from scipy.stats import pearsonr, spearmanr

    from textcl.evaluation import STS_METRIC
    from textcl.evaluation.sts import correlations

    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 200).round(1)
    predicted = np.tanh(gold / 5 + rng.normal(0, 0.3, 200))
    loaded = evaluate.load(STS_METRIC).compute(predictions=predicted.tolist(), references=gold.tolist())
    assert loaded == pytest.approx(correlations(gold, predicted), abs=1e-12)
    assert loaded["spearman"] == pytest.approx(spearmanr(gold, predicted).statistic, abs=1e-12)
    assert loaded["pearson"] == pytest.approx(pearsonr(gold, predicted).statistic, abs=1e-12)
