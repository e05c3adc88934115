"""`textcl eval|mine|index|search`: the CLI writes what the library computes, and bad input is one line, exit 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES
from scifact_fixtures import tiny_beir, write_beir

from textcl import Encoder
from textcl.cli import main
from textcl.evaluation.suite import evaluate
from textcl.retrieval.mining import mine_hard_negatives
from textcl.retrieval.search_index import SearchIndex


def textcl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textcl", *args], capture_output=True, text=True, timeout=300)


def error_line(capsys: pytest.CaptureFixture) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("textcl: error:")]
    assert len(errors) == 1, errors
    return errors[0]


def write_sts(path: Path) -> Path:
    rows = [(SENTENCES[i], SENTENCES[(i * 5 + 3) % 12], (i * 7) % 5 + 0.5) for i in range(12)]
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows))
    return path


def test_eval_prints_a_table_and_writes_the_contract_json(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    sts, beir = write_sts(tmp_path / "sts.tsv"), tiny_beir(tmp_path / "beir")
    out = tmp_path / "o.json"
    assert main(["eval", str(tiny_model_dir), "--sts", str(sts), "--beir", str(beir), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "spearman" in table and "retrieval: 4 queries (1 skipped: no relevant document), 12 documents" in table
    written = json.loads(out.read_text())
    expected = evaluate(Encoder.load(tiny_model_dir, pooling="mean"), sts=[sts], beir=beir)
    assert set(written) == {"sts", "retrieval"}
    contract = {
        "sts": ("spearman", "pearson", "n"),
        "retrieval": ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100", "n_queries", "n_docs"),
    }
    for section, keys in contract.items():
        for key in keys:
            assert written[section][key] == pytest.approx(expected[section][key], abs=1e-6), key


def test_mine_writes_the_library_result_and_prints_statistics(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("anchor\tpositive\n" + "".join(f"{SENTENCES[i]}\t{SENTENCES[i + 6]}\n" for i in range(6)))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{text} again" for text in SENTENCES) + "\n")
    options = ["--num_negatives", "2", "--range_min", "1", "--range_max", "8", "--max_score_ratio", "none",
               "--margin", "none"]
    out = tmp_path / "mined.jsonl"
    code = main(["mine", str(tiny_model_dir), "--data", str(pairs), "--corpus", str(corpus), "--out", str(out),
                 "--cache_dir", str(tmp_path / "cache"), *options])
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean score: positive" in printed and "dropped as likely false negatives" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = mine_hard_negatives(
        Encoder.load(tiny_model_dir, pooling="mean"), SENTENCES[:6], SENTENCES[6:],
        [f"{text} again" for text in SENTENCES], num_negatives=2, range_min=1, range_max=8, max_score_ratio=None,
        margin=None,
    ).columns
    assert list(rows[0]) == ["anchor", "positive", "negative_1", "negative_2", "positive_score", "negative_1_score",
                             "negative_2_score"]
    for name, values in expected.items():
        assert np.allclose([row[name] for row in rows], values, atol=1e-6) if "score" in name else \
            [row[name] for row in rows] == values


def test_mine_reads_a_beir_folder(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mined.tsv"
    code = main(["mine", str(tiny_model_dir), "--data", str(tiny_beir(tmp_path / "beir")), "--split", "test",
                 "--out", str(out), "--num_negatives", "1", "--range_min", "0", "--range_max", "5",
                 "--max_score_ratio", "none", "--margin", "none", "--no_cache"])
    assert code == 0, capsys.readouterr().err
    assert out.read_text().startswith("anchor\tpositive\tnegative_1\tpositive_score\tnegative_1_score\n")
    assert "kept 7 of 7 rows (4 distinct anchors)" in capsys.readouterr().out


def test_index_then_search_returns_the_library_hits(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"s{i}", "text": text}) + "\n" for i, text in enumerate(SENTENCES)))
    assert main(["index", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(tmp_path / "idx")]) == 0
    queries = tmp_path / "queries.txt"
    queries.write_text("music\nthe weather\n")
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "a dog", "--queries", str(queries), "-k", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = SearchIndex.build(Encoder.load(tiny_model_dir, pooling="mean"), SENTENCES, [f"s{i}" for i in range(12)])
    hits = expected.search(["a dog", "music", "the weather"], k=3)
    assert [result["query"] for result in printed] == ["a dog", "music", "the weather"]
    assert [[hit["id"] for hit in result["hits"]] for result in printed] == hits.ids.tolist()
    assert main(["search", str(tmp_path / "idx"), "a dog", "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "query: a dog" and re.match(r"\s+1\. \d\.\d{4}  s\d+  ", table[1]) and len(table) == 3


def test_k_larger_than_the_corpus_is_clamped_and_said(tiny_model_dir: Path, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES[:5]) + "\n")
    assert main(["index", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(tmp_path / "idx")]) == 0
    result = textcl("search", str(tmp_path / "idx"), "a dog", "-k", "50", "--json")
    assert result.returncode == 0, result.stderr
    assert "k=50 is larger than the index (5 documents); returning 5" in result.stderr
    assert len(json.loads(result.stdout)[0]["hits"]) == 5


def bad_inputs(tmp: Path, model: str) -> list[tuple[list[str], str]]:
    docs, queries = {"a": ("", "first"), "b": ("", "second")}, {"q": "query"}
    no_queries = write_beir(tmp / "no-queries", docs, queries, [("q", "a", 1)])
    (no_queries / "queries.jsonl").unlink()
    unknown = write_beir(tmp / "unknown", docs, queries, [("q", "a", 1), ("q", "zz", 1), ("q", "yy", 1)])
    empty = write_beir(tmp / "empty", {}, queries, [("q", "a", 1)])
    duplicate = write_beir(tmp / "duplicate", docs, queries, [("q", "a", 1)])
    with (duplicate / "corpus.jsonl").open("a") as handle:
        handle.write(json.dumps({"_id": "b", "text": "again"}) + "\n")
    (tmp / "latin1.txt").write_bytes("fine\ncaf\xe9\n".encode("latin-1"))
    (tmp / "empty.txt").write_text("\n \n")
    (tmp / "dup.tsv").write_text("id\ttext\n1\tone\n2\ttwo\n1\tthree\n")
    (tmp / "pairs.tsv").write_text("anchor\tpositive\nx\ty\n")
    return [
        (["eval", model, "--beir", str(no_queries)], r"BEIR folder is missing .*queries\.jsonl"),
        (["eval", model, "--beir", str(unknown)], r"2 qrels rows name 0 unknown queries and 2 unknown documents"),
        (["eval", model, "--beir", str(empty)], r"corpus\.jsonl holds no documents"),
        (["eval", model, "--beir", str(duplicate)], r"corpus\.jsonl:3: duplicate id 'b'"),
        (["index", model, "--corpus", str(tmp / "latin1.txt"), "--out", str(tmp / "i")], r"latin1\.txt:2: not UTF-8"),
        (["index", model, "--corpus", str(tmp / "empty.txt"), "--out", str(tmp / "i")], r"empty\.txt' is empty"),
        (["index", model, "--corpus", str(tmp / "dup.tsv"), "--out", str(tmp / "i")], r"repeats doc id '1'"),
        (["eval", model], r"nothing to evaluate"),
        (["mine", model, "--data", str(tmp / "pairs.tsv"), "--out", str(tmp / "o.xlsx")], r"unsupported file type"),
        (["mine", model, "--data", str(tmp / "pairs.tsv"), "--out", str(tmp / "o.tsv"), "--anchor_column", "q"],
         r"column 'q' not in .*columns found: anchor, positive; set --anchor_column"),
        (["search", str(tmp), "query"], r"is not a search index folder"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_bad_input_is_one_line_and_exit_code_2(tiny_model_dir: Path, tmp_path: Path, capsys, case: int) -> None:
    args, message = bad_inputs(tmp_path, str(tiny_model_dir))[case]
    assert main(args) == 2
    assert re.search(message, error_line(capsys))


def test_allow_missing_continues_without_the_unknown_qrels(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    docs, qrels = {"a": ("", "first"), "b": ("", "second")}, [("q", "a", 1), ("q", "zz", 1)]
    folder = write_beir(tmp_path, docs, {"q": "query"}, qrels)
    assert main(["eval", str(tiny_model_dir), "--beir", str(folder), "--allow_missing"]) == 0
    assert "1 queries" in capsys.readouterr().out


def test_the_process_exits_2_without_a_traceback(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = textcl("eval", str(tiny_model_dir), "--beir", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("textcl: error: BEIR folder")


def test_bf16_flag_encodes_in_bf16_and_caches_apart_from_fp32(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`--bf16` really changes the arithmetic (embeddings close to fp32, not equal) and gets its own cache entry."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    cache = tmp_path / "cache"
    for flag in ([], ["--bf16"]):
        out = tmp_path / f"index{len(flag)}"
        assert main(["index", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(out),
                     "--cache_dir", str(cache), *flag]) == 0
    fp32, bf16 = (np.load(path) for path in sorted(cache.glob("*.npy"), key=lambda p: p.stat().st_mtime))
    assert fp32.shape == bf16.shape == (len(SENTENCES), Encoder.load(tiny_model_dir).dim)
    assert not np.array_equal(fp32, bf16) and np.allclose(fp32, bf16, atol=0.05)
