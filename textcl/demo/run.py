"""`textcl demo`: the embedded default, offline, on the 1,500 sentences bundled in `textcl/demo/data/`.

The sentences come from five collections (inaugural addresses, State of the Union addresses, and three
sets of movie-review sentences; see README's data credits). The demo fine-tunes the shipped
all-MiniLM-L6-v2 for two epochs with supervised contrastive learning (rows sharing a collection are
positives, plus a dropout view of each sentence), and measures retrieval of same-collection sentences
on held-out queries before and after: a task the base model only half solves.
"""

from __future__ import annotations

import csv
import json
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from textcl.config import TrainConfig
from textcl.evaluation.retrieval import evaluate_retrieval
from textcl.model.encoder import Encoder
from textcl.model.location import packaged_copy
from textcl.training.trainer import train

HUB_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
EVAL_PER_SOURCE, QUERIES_PER_SOURCE = 100, 20
METRICS = ("ndcg@10", "mrr@10", "recall@100")


def default_model() -> str:
    """The shipped all-MiniLM-L6-v2 (the `demo` extra) when installed, else its Hub id."""
    copy = packaged_copy(HUB_MODEL)
    return str(copy[1]) if copy else HUB_MODEL


def demo_rows() -> list[dict[str, str]]:
    """The bundled sentences: `text` and `source` (see README's data credits)."""
    with resources.files("textcl.demo").joinpath("data/sentences.tsv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def split_rows(rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, held-out rows): the first EVAL_PER_SOURCE sentences of each source are held out."""
    seen: dict[str, int] = {}
    train_rows, held_out = [], []
    for row in rows:
        seen[row["source"]] = seen.get(row["source"], 0) + 1
        (held_out if seen[row["source"]] <= EVAL_PER_SOURCE else train_rows).append(row)
    return train_rows, held_out


def write_beir(held_out: list[dict[str, str]], folder: Path) -> None:
    """A BEIR folder: the first QUERIES_PER_SOURCE held-out sentences of each source are queries, the rest
    the corpus; a document is relevant to a query when both come from the same source."""
    counts: dict[str, int] = {}
    queries, docs = [], []
    for i, row in enumerate(held_out):
        counts[row["source"]] = counts.get(row["source"], 0) + 1
        (queries if counts[row["source"]] <= QUERIES_PER_SOURCE else docs).append((f"s{i}", row))
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w") as handle:
        handle.writelines(json.dumps({"_id": i, "title": "", "text": r["text"]}) + "\n" for i, r in docs)
    with (folder / "queries.jsonl").open("w") as handle:
        handle.writelines(json.dumps({"_id": i, "text": r["text"]}) + "\n" for i, r in queries)
    with (folder / "qrels" / "test.tsv").open("w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for qid, query in queries:
            handle.writelines(f"{qid}\t{did}\t1\n" for did, doc in docs if doc["source"] == query["source"])


def write_train(rows: list[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["anchor", "source"])
        writer.writerows((row["text"], row["source"]) for row in rows)


def demo_config(model: str, train_file: Path, output_dir: str) -> TrainConfig:
    return TrainConfig.from_dict({
        "model_name_or_path": model, "max_seq_length": 48,
        "train_data": str(train_file), "positive_column": None, "label_column": "source",
        "temperature": 0.1, "output_dir": output_dir, "overwrite_output_dir": True,
        "per_device_train_batch_size": 32, "num_train_epochs": 2, "learning_rate": 5e-5,
        "warmup_ratio": 0.1, "logging_steps": 5, "bf16": "auto",
    })


def run(model: str | None = None, output_dir: str = "textcl-demo") -> dict[str, Any]:
    """Evaluate, train, evaluate again; print the comparison and return both results."""
    model = model or default_model()
    train_rows, held_out = split_rows(demo_rows())
    with tempfile.TemporaryDirectory() as scratch:
        beir, train_file = Path(scratch) / "beir", Path(scratch) / "train.tsv"
        write_beir(held_out, beir)
        write_train(train_rows, train_file)
        print(f"textcl demo: {len(train_rows)} training sentences from 5 collections, {model}")
        before = evaluate_retrieval(Encoder.load(model), beir, k_values=(10, 100))
        train(demo_config(model, train_file, output_dir))
        after = evaluate_retrieval(Encoder.load(output_dir), beir, k_values=(10, 100))
    print(f"\nSame-collection retrieval, {before['n_queries']} held-out queries, {before['n_docs']} documents")
    print(f"{'metric':<12}{'before':>9}{'after':>9}")
    for name in METRICS:
        print(f"{name:<12}{before[name]:>9.4f}{after[name]:>9.4f}")
    print(f"\nThe trained model is in {output_dir}/ (a sentence-transformers folder). Try:\n"
          f"  textcl index {output_dir} --corpus YOUR_TEXTS.txt --out my-index && textcl search my-index \"a query\"\n"
          f"  textcl serve {output_dir} --corpus YOUR_TEXTS.txt   # a search API and page on http://127.0.0.1:8000 "
          f"(pip install \"textcl[serve]\")")
    return {"before": before, "after": after}
