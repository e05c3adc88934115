"""BEIR folder reading: what a valid folder gives, SciFact's known counts, and one clear line per mistake."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from scifact_fixtures import tiny_beir, write_beir

from textcl.errors import TextclError
from textcl.io.beir import doc_text, load_beir


def test_tiny_folder_fields_and_qrels(tmp_path: Path) -> None:
    data = load_beir(tiny_beir(tmp_path))
    assert len(data.corpus) == 12 and data.corpus["d0"][0] == "Title" and data.corpus["d1"][0] == ""
    assert set(data.queries) == {"q1", "q2", "q3", "q4", "q5"}, "queries are those named in the split's qrels"
    assert data.qrels["q2"] == {"d3": 1, "d2": 2, "d5": 1}
    assert data.qrels["q4"] == {"d6": 1, "d8": 0}
    assert data.dropped_qrels == 0


def test_doc_text_joins_title_and_text_like_beir() -> None:
    assert doc_text("A title.", "Body text.") == "A title. Body text."
    assert doc_text("", "Body text.") == "Body text."
    assert doc_text("Only title", "") == "Only title"


def test_scifact_counts_match_sources_md(shared_data: Path) -> None:
    test = load_beir(shared_data / "scifact", "test")
    assert len(test.corpus) == 5183
    assert len(test.queries) == 300 and sum(map(len, test.qrels.values())) == 339
    train = load_beir(shared_data / "scifact", "train")
    assert len(train.queries) == 809 and sum(map(len, train.qrels.values())) == 919


def broken_folders(root: Path) -> list[tuple[Path, str, str]]:
    """(folder, split, expected message) for each mistake the reader must name."""
    docs = {"a": ("", "first"), "b": ("", "second")}
    queries = {"q": "query"}
    cases = []

    def folder(name: str, qrels: list | None = None, **changes: object) -> Path:
        path = write_beir(root / name, changes.get("docs", docs), queries, qrels or [("q", "a", 1)])
        return path

    missing = folder("missing-corpus")
    (missing / "corpus.jsonl").unlink()
    cases.append((missing, "test", r"BEIR folder is missing .*corpus\.jsonl"))
    cases.append((folder("no-split"), "dev", r"missing .*qrels/dev\.tsv; splits found: test"))
    cases.append((root / "nowhere", "test", r"BEIR folder .*nowhere' does not exist"))
    unknown = folder("unknown", qrels=[("q", "a", 1), ("q", "zz", 1), ("q", "yy", 1), ("nope", "a", 1)])
    cases.append((unknown, "test", r"3 qrels rows name 1 unknown queries and 2 unknown documents.*allow_missing"))
    cases.append((folder("empty", docs={}), "test", r"corpus\.jsonl holds no documents"))
    duplicate = folder("duplicate")
    with (duplicate / "corpus.jsonl").open("a") as handle:
        handle.write(json.dumps({"_id": "a", "text": "again"}) + "\n")
    cases.append((duplicate, "test", r"corpus\.jsonl:3: duplicate id 'a' \(first on line 1\)"))
    latin = folder("latin1")
    with (latin / "queries.jsonl").open("ab") as handle:
        handle.write('{"_id": "x", "text": "caf\xe9"}\n'.encode("latin-1"))
    cases.append((latin, "test", r"queries\.jsonl:2: not UTF-8"))
    bad_json = folder("bad-json")
    with (bad_json / "corpus.jsonl").open("a") as handle:
        handle.write('{"_id": "c", "text": \n')
    cases.append((bad_json, "test", r"corpus\.jsonl:3: not valid JSON"))
    bad_score = folder("bad-score")
    with (bad_score / "qrels" / "test.tsv").open("a") as handle:
        handle.write("q\tb\thigh\n")
    cases.append((bad_score, "test", r"test\.tsv:3: relevance score 'high' is not a number"))
    return cases


@pytest.mark.parametrize("case", range(9))
def test_each_mistake_is_one_clear_line(tmp_path: Path, case: int) -> None:
    folder, split, message = broken_folders(tmp_path)[case]
    with pytest.raises(TextclError) as error:
        load_beir(folder, split)
    assert "\n" not in str(error.value)
    assert re.search(message, str(error.value)), str(error.value)


def test_allow_missing_drops_unknown_qrels_and_counts_them(tmp_path: Path) -> None:
    qrels = [("q", "a", 1), ("q", "zz", 1), ("nope", "a", 1)]
    folder = write_beir(tmp_path, {"a": ("", "first"), "b": ("", "second")}, {"q": "query"}, qrels)
    data = load_beir(folder, allow_missing=True)
    assert data.qrels == {"q": {"a": 1}} and data.dropped_qrels == 2
