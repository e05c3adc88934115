"""`textcl demo` pieces: the bundled data split, the BEIR folder it builds, and a run on a tiny model."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from textcl.demo.run import QUERIES_PER_SOURCE, demo_rows, run, split_rows, write_beir
from textcl.io.beir import load_beir


def test_bundled_data_splits_evenly_by_source() -> None:
    rows = demo_rows()
    assert len(rows) == 1500 and len(Counter(r["source"] for r in rows)) == 5
    train_rows, held_out = split_rows(rows)
    assert len(train_rows) == 1000 and set(Counter(r["source"] for r in held_out).values()) == {100}
    assert not {r["text"] for r in train_rows} & {r["text"] for r in held_out}


def test_beir_folder_marks_same_source_documents_relevant(tmp_path: Path) -> None:
    _, held_out = split_rows(demo_rows())
    write_beir(held_out, tmp_path)
    data = load_beir(tmp_path, "test")
    assert len(data.queries) == 5 * QUERIES_PER_SOURCE and len(data.corpus) == 500 - 5 * QUERIES_PER_SOURCE
    source = {f"s{i}": row["source"] for i, row in enumerate(held_out)}
    for query_id, relevant in data.qrels.items():
        assert len(relevant) == 100 - QUERIES_PER_SOURCE
        assert {source[doc_id] for doc_id in relevant} == {source[query_id]}


def test_demo_runs_end_to_end_on_a_tiny_model(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    results = run(str(tiny_model_dir), str(tmp_path / "model"))
    printed = capsys.readouterr().out
    assert "ndcg@10" in printed and (tmp_path / "model" / "modules.json").exists()
    assert results["before"]["n_queries"] == results["after"]["n_queries"] == 5 * QUERIES_PER_SOURCE
