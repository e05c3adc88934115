"""Data sources -> rows, the collator, and the no-duplicates batch sampler."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from textcl.config import DataArguments, TrainConfig
from textcl.data.collator import ContrastiveCollator, augment, text_id
from textcl.data.rows import load_rows, max_negatives
from textcl.data.sampler import NoDuplicatesBatchSampler, greedy_batches, planned_batches, row_ids, row_index
from textcl.errors import TextclError
from textcl.training.plan import plan_run


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> str:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def rows_of(**kwargs) -> list[dict]:
    return list(load_rows(DataArguments(**{**kwargs, "train_data": [kwargs["train_data"]]})))


def test_txt_lines_become_dropout_rows(tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("first line\n\n  \nsecond line\n")
    rows = rows_of(train_data=str(tmp_path / "s.txt"))
    assert [(r["anchor"], r["positive"], r["negatives"]) for r in rows] == [
        ("first line", None, []), ("second line", None, [])
    ]


def test_tsv_pairs_with_quotes_and_negatives_in_natural_order(tmp_path: Path) -> None:
    header = ["anchor", "positive", "negative_10", "negative_2", "negative_2_score", "source"]
    path = write_tsv(tmp_path / "p.tsv", header, [['say "hi"', "b", "n10", "n2", "0.5", "x"]])
    (row,) = rows_of(train_data=path)
    assert row["anchor"] == 'say "hi"' and row["positive"] == "b" and row["negatives"] == ["n2", "n10"]
    (row,) = rows_of(train_data=path, num_negatives=1)
    assert row["negatives"] == ["n2"]


def test_blank_negatives_are_skipped_and_sources_concatenate(tmp_path: Path) -> None:
    triplets = write_tsv(tmp_path / "t.tsv", ["anchor", "positive", "negative"], [["a", "b", "c"], ["d", "e", ""]])
    pairs = write_tsv(tmp_path / "p.tsv", ["anchor", "positive", "source"], [["f", "g", "x"]])
    rows = list(load_rows(DataArguments(train_data=[triplets, pairs])))
    assert [(r["anchor"], r["negatives"]) for r in rows] == [("a", ["c"]), ("d", []), ("f", [])]
    assert max_negatives(load_rows(DataArguments(train_data=[pairs, triplets]))) == 1


def test_jsonl_and_parquet_with_mapped_columns_and_labels(tmp_path: Path) -> None:
    records = [{"q": "a", "d": "b", "y": 1}, {"q": "c", "d": "", "y": 0}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    rows = rows_of(train_data=str(tmp_path / "x.jsonl"), anchor_column="q", positive_column="d", label_column="y",
                   missing_positive="drop")
    assert [(r["anchor"], r["positive"], r["label"]) for r in rows] == [("a", "b", 1)]  # empty positive dropped
    import pandas as pd

    pd.DataFrame(records).to_parquet(tmp_path / "x.parquet")
    rows = rows_of(train_data=str(tmp_path / "x.parquet"), anchor_column="q", label_column="y",
                   positive_column="positive")
    assert [(r["anchor"], r["positive"], r["label"]) for r in rows] == [("a", None, 1), ("c", None, 0)]


def test_beir_folder_gives_every_relevant_document(shared_data: Path) -> None:
    folder = shared_data / "scifact"
    with (folder / "corpus.jsonl").open() as handle:
        docs = {d["_id"]: f"{d['title']} {d['text']}".strip() for d in map(json.loads, handle)}
    with (folder / "queries.jsonl").open() as handle:
        queries = {q["_id"]: q["text"] for q in map(json.loads, handle)}
    with (folder / "qrels" / "train.tsv").open() as handle:
        qrels = list(csv.DictReader(handle, delimiter="\t"))
    expected = sorted((queries[r["query-id"]], docs[r["corpus-id"]]) for r in qrels if int(r["score"]) > 0)
    rows = load_rows(DataArguments(train_data=[str(folder)], train_split="train"))
    assert sorted(zip(rows["anchor"], rows["positive"])) == expected and len(expected) == 919


def test_streaming_reads_lazily(tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("".join(f"line {i}\n" for i in range(50)))
    rows = load_rows(DataArguments(train_data=[str(tmp_path / "s.txt")], streaming=True))
    assert not hasattr(rows, "__len__")
    assert [r["anchor"] for r in rows.take(3)] == ["line 0", "line 1", "line 2"]


@pytest.mark.parametrize(
    ("setup", "kwargs", "message"),
    [
        (lambda p: write_tsv(p / "a.tsv", ["query", "doc"], [["x", "y"]]), {},
         "anchor column 'anchor' not in .*columns found: query, doc"),
        (lambda p: write_tsv(p / "a.tsv", ["anchor", "doc"], [["x", "y"]]), {},
         "positive column 'positive' .*positive_column: null"),
        (lambda p: write_tsv(p / "a.tsv", ["anchor", "positive"], [["", "y"]]), {}, "all 1 rows .* were filtered out"),
        (lambda p: (p / "e.tsv").write_text("") or str(p / "e.tsv"), {}, "is empty"),
        (lambda p: write_tsv(p / "h.tsv", ["anchor", "positive"], []), {}, "has no rows"),
        (lambda p: str(p / "missing.tsv"), {}, "does not exist"),
        (lambda p: str(p), {}, "not a BEIR folder"),
        (lambda p: (p / "x.xml").write_text("<a/>") and str(p / "x.xml"), {}, "unsupported file type"),
    ],
)
def test_bad_data_is_a_one_line_error(tmp_path: Path, setup, kwargs: dict, message: str) -> None:
    with pytest.raises(TextclError, match=message):
        load_rows(DataArguments(train_data=[setup(tmp_path)], **kwargs))


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_collator_prompts_lengths_and_ids(tokenizer) -> None:
    collator = ContrastiveCollator(tokenizer, query_max_length=6, document_max_length=12, num_negatives=3,
                                   query_prompt="query: ", document_prompt="passage: ")
    rows = [
        {"anchor": "a man is playing a guitar loudly tonight", "positive": "the cat sits on the mat",
         "negatives": ["two dogs run", "a plane"], "label": None},
        {"anchor": "the stock market fell", "positive": "scientists found a frog", "negatives": ["x"], "label": None},
    ]
    batch = collator(rows)
    assert batch["anchor"]["input_ids"].shape == (2, 6)
    assert batch["positive"]["input_ids"].shape[1] <= 12 and batch["negatives"]["input_ids"].shape[0] == 3
    expected = tokenizer(["query: " + rows[0]["anchor"]], truncation=True, max_length=6)["input_ids"][0]
    assert batch["anchor"]["input_ids"][0].tolist() == expected
    assert batch["negative_ids"].tolist() == [[text_id("two dogs run"), text_id("a plane"), 0], [text_id("x"), 0, 0]]
    assert batch["negative_mask"].tolist() == [[True, True, False], [True, False, False]]
    assert batch["positive_ids"].tolist() == [text_id(rows[0]["positive"]), text_id(rows[1]["positive"])]


def test_collator_dropout_and_deterministic_augmentation(tokenizer) -> None:
    rows = [{"anchor": f"sentence number {i} with a few more words", "positive": None, "negatives": [], "label": None}
            for i in range(4)]
    plain = ContrastiveCollator(tokenizer, 16, 16)(rows)
    assert plain["positive"] is None and plain["negatives"] is None
    assert plain["positive_ids"].tolist() == plain["anchor_ids"].tolist()
    augmented = ContrastiveCollator(tokenizer, 16, 16, augment=("word_deletion", "span_crop"), seed=3)
    again = ContrastiveCollator(tokenizer, 16, 16, augment=("word_deletion", "span_crop"), seed=3)
    assert augmented(rows)["positive"]["input_ids"].tolist() == again(rows)["positive"]["input_ids"].tolist()
    again.epoch = 1
    assert augmented(rows)["positive"]["input_ids"].tolist() != again(rows)["positive"]["input_ids"].tolist()


def test_augmentations_change_the_words_as_named() -> None:
    rng = random.Random(0)
    text = " ".join(f"w{i}" for i in range(40))
    deleted = augment(text, "word_deletion", rng, rate=0.2).split()
    assert 20 < len(deleted) < 40 and set(deleted) < set(text.split())
    cropped = augment(text, "span_crop", rng, rate=0.2)
    assert cropped in text and len(cropped.split()) == 24
    repeated = augment(text, "word_repetition", rng, rate=0.2).split()
    assert len(repeated) > 40 and list(dict.fromkeys(repeated)) == text.split()


def sampler_rows(n: int, vocabulary: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [sorted(set(ids)) for ids in rng.integers(0, vocabulary, size=(n, 3)).tolist()]


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_never_repeats_a_text_in_a_batch(drop_last: bool) -> None:
    ids = sampler_rows(20_000, 30_000)
    sampler = NoDuplicatesBatchSampler(ids, 4096, drop_last=drop_last, seed=1)
    batches = list(sampler)
    assert len(sampler) == len(batches)
    for batch in batches:
        texts = [t for i in batch for t in ids[i]]
        assert len(texts) == len(set(texts))
    used = [i for batch in batches for i in batch]
    assert len(used) == len(set(used))
    assert len(batches) == planned_batches(20_000, 4096, drop_last) and all(len(b) >= 2 for b in batches)
    # ids repeat often here: the rows that fit in none of the batches are counted, not lost silently
    assert len(used) + sampler.left_out == 20_000 and sampler.left_out > 0


def test_sampler_is_reproducible_and_reshuffles_every_epoch() -> None:
    ids = sampler_rows(500, 100_000)
    first, second = NoDuplicatesBatchSampler(ids, 32, seed=7), NoDuplicatesBatchSampler(ids, 32, seed=7)
    assert list(first) == list(second)
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0 and sorted(sum(list(first), [])) == sorted(sum(epoch0, []))


def test_length_grouping_reduces_length_spread() -> None:
    ids = [[i] for i in range(3200)]
    lengths = np.random.default_rng(0).integers(1, 200, size=3200)
    grouped = NoDuplicatesBatchSampler(ids, 32, seed=0, lengths=lengths)
    plain = NoDuplicatesBatchSampler(ids, 32, seed=0)
    spread = lambda sampler: np.mean([np.ptp(lengths[b]) for b in sampler])
    assert spread(grouped) < spread(plain) / 3


def test_greedy_batches_defers_clashes_and_keeps_order() -> None:
    items = ["a", "b", "a2", "c", "d"]
    ids = {"a": {1}, "b": {2}, "a2": {1}, "c": {3}, "d": {4}}
    assert list(greedy_batches(items, ids.__getitem__, 2, False)) == [["a", "b"], ["a2", "c"], ["d"]]
    assert row_ids({"anchor": "x", "positive": None, "negatives": ["y"]}) == {text_id("x"), text_id("y")}


def test_batch_per_source_keeps_each_batch_to_one_source_and_mixes_their_order(tmp_path: Path) -> None:
    pairs, triplets = tmp_path / "pairs.tsv", tmp_path / "triplets.tsv"
    pairs.write_text("anchor\tpositive\n" + "".join(f"p{i}\tq{i}\n" for i in range(200)))
    triplets.write_text("anchor\tpositive\tnegative\n" + "".join(f"a{i}\tb{i}\tc{i}\n" for i in range(100)))
    rows = load_rows(DataArguments(train_data=[str(pairs), str(triplets)], batch_per_source=True))
    ids, _, sources = row_index(rows, with_lengths=False)
    assert sources.tolist() == [0] * 200 + [1] * 100
    sampler = NoDuplicatesBatchSampler(ids, 16, seed=3, sources=sources)
    batches = list(sampler)
    assert all(len(set(sources[batch])) == 1 for batch in batches)
    assert sorted(i for batch in batches for i in batch) == list(range(300))
    kinds = [int(sources[batch[0]]) for batch in batches]
    assert kinds != sorted(kinds) and kinds != sorted(kinds, reverse=True)
    mixed = NoDuplicatesBatchSampler(ids, 16, seed=3)
    assert any(len(set(sources[batch])) == 2 for batch in mixed)
    with pytest.raises(TextclError, match="streaming: false"):
        config = TrainConfig.from_dict({"train_data": [str(pairs)], "batch_per_source": True, "streaming": True,
                                        "model_name_or_path": "unused", "max_steps": 1, "output_dir": str(tmp_path / "o")})
        plan_run(config)  # the run plan refuses it before any data is read
