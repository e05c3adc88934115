"""`textcl demo`: the bundled data, its split, the fragment-to-sentence task and its BEIR folder, the checks, a run
on a tiny model, and one run on the real all-MiniLM-L6-v2 that must improve the task without hurting general
similarity."""

from __future__ import annotations

import random
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from textcl.demo.run import (
    BATCH_SIZE,
    HELD_OUT,
    SANITY_ANSWERS,
    SANITY_QUERIES,
    check,
    crop,
    demo_rows,
    query_document_pairs,
    run,
    split_rows,
    write_beir,
)
from textcl.io.beir import load_beir
from textcl.io.corpus import read_corpus


def test_bundled_data_is_public_domain_small_and_splits_without_overlap() -> None:
    assert Path(str(resources.files("textcl.demo").joinpath("data/speeches.tsv"))).stat().st_size < 1_000_000
    rows = demo_rows()
    assert set(Counter(row["source"] for row in rows)) == {"inaugural", "state_union"}  # US government works
    train_rows, held_out = split_rows(rows)
    assert len(held_out) == HELD_OUT and len(train_rows) == len(rows) - HELD_OUT >= 2000
    assert not {row["text"] for row in train_rows} & {row["text"] for row in held_out}


def test_a_fragment_is_a_contiguous_third_of_its_sentence() -> None:
    sentence = " ".join(f"w{i}" for i in range(20))
    rng = random.Random(0)
    fragments = [crop(sentence, rng) for _ in range(50)]
    for fragment in fragments:
        words = fragment.split()
        assert len(words) == 7 and f" {fragment} " in f" {sentence} "
        assert [int(w[1:]) for w in words] == list(range(int(words[0][1:]), int(words[0][1:]) + 7))
    assert len(set(fragments)) > 1  # the start is random
    assert crop("one two three", rng) == "one two three"  # never longer than the sentence
    rows = split_rows(demo_rows())[0][:20]
    assert query_document_pairs(rows) == query_document_pairs(rows)  # seeded


def test_beir_folder_pairs_each_fragment_with_its_own_sentence(tmp_path: Path) -> None:
    _, held_out = split_rows(demo_rows())
    write_beir(held_out, tmp_path)
    data = load_beir(tmp_path, "test")
    assert len(data.queries) == len(data.corpus) == HELD_OUT
    for query_id, relevant in data.qrels.items():
        (doc_id, grade), = relevant.items()
        assert grade == 1 and doc_id == "d" + query_id[1:]
        assert data.queries[query_id] in data.corpus[doc_id][-1]


def general(sanity: dict[str, str], cosine: float = 0.2, uniformity: float = -2.0) -> dict:
    return {"random_pair_cosine": cosine, "uniformity": uniformity, "sanity": sanity}


def test_checks_flag_each_kind_of_damage() -> None:
    before = {"task": {"mrr@10": 0.8}, "general": general(dict(SANITY_ANSWERS))}
    assert check(before, {"task": {"mrr@10": 0.85}, "general": general(dict(SANITY_ANSWERS), 0.24, -1.96)})["passed"]
    changed = dict(SANITY_ANSWERS) | {SANITY_QUERIES[0]: "something else"}
    for after, word in [({"task": {"mrr@10": 0.8}, "general": general(dict(SANITY_ANSWERS))}, "did not improve"),
                        ({"task": {"mrr@10": 0.9}, "general": general(dict(SANITY_ANSWERS), 0.26)}, "random pairs"),
                        ({"task": {"mrr@10": 0.9}, "general": general(dict(SANITY_ANSWERS), 0.2, -1.9)}, "uniformity"),
                        ({"task": {"mrr@10": 0.9}, "general": general(changed)}, "top answer changed")]:
        result = check(before, after)
        assert not result["passed"] and len(result["warnings"]) == 1 and word in result["warnings"][0]


def test_demo_runs_end_to_end_on_a_tiny_model(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = demo_rows()[:HELD_OUT + 2 * BATCH_SIZE]  # two training steps keep this test fast; the real run is below
    monkeypatch.setattr("textcl.demo.run.demo_rows", lambda: rows)
    results = run(str(tiny_model_dir), str(tmp_path / "model"))
    printed = capsys.readouterr().out
    assert "mrr@10" in printed and "random-pair cosine" in printed and "estimated time:" in printed
    assert "min of evaluations" in printed and "no evaluation" not in printed  # the lines agree with each other
    ndcg = [line.split() for line in printed.splitlines() if line.startswith(("ndcg@10", "  retrieval.ndcg@10"))]
    assert ndcg[0][1] == ndcg[1][-2] and ndcg[0][5] == ndcg[1][-1]  # the run's summary is the table's evaluation
    assert "min in all" in printed and "peak memory" in printed
    assert "= 2 steps of batch" in printed and "textcl: training in" in printed
    assert (tmp_path / "model" / "modules.json").exists()
    assert results["before"]["task"]["n_queries"] == results["after"]["task"]["n_queries"] == HELD_OUT
    ids, texts = read_corpus(results["documents"])
    assert len(ids) == HELD_OUT and texts == [row["text"] for row in split_rows(demo_rows())[1]]
    assert f"textcl index {tmp_path / 'model'} --corpus {results['documents']}" in printed
    assert set(results["after"]["general"]["sanity"]) == set(SANITY_QUERIES)


@pytest.mark.slow
def test_demo_on_the_real_model_improves_the_task_and_keeps_general_similarity(
    minilm_path: str, tmp_path: Path
) -> None:
    results = run(minilm_path, str(tmp_path / "model"))
    before, after = results["before"], results["after"]
    assert before["general"]["sanity"] == SANITY_ANSWERS  # the sanity questions mean something on the base model
    assert after["task"]["mrr@10"] > before["task"]["mrr@10"] and after["task"]["recall@1"] > before["task"]["recall@1"]
    assert after["general"]["random_pair_cosine"] - before["general"]["random_pair_cosine"] <= 0.05
    assert after["general"]["sanity"] == before["general"]["sanity"]
    assert results["checks"] == {"passed": True, "warnings": []}
