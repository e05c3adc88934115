"""BEIR fixtures for the eval, mining and search tests: a tiny BEIR folder writer, and SciFact encoded once.

SciFact's 5,183 documents take about 2.5 minutes to encode with all-MiniLM-L6-v2 on 2 CPUs, so the corpus
embeddings go to textcl's own embedding cache in a folder of this pytest session. Every later call that
encodes the same texts with the same model and settings (evaluate_retrieval, mine_hard_negatives,
SearchIndex.build with that cache_dir) reads them from there. Set TEXTCL_TEST_EMBEDDINGS to a folder to keep
that cache across pytest runs while developing. Test modules import the fixtures they use:
`from scifact_fixtures import minilm, scifact  # noqa: F401`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES

from textcl import Encoder
from textcl.io.beir import doc_text, load_beir
from textcl.model.encode_options import EncodeOptions
from textcl.retrieval.corpus_embeddings import encode_corpus

MAX_LENGTH = 256  # MTEB's SciFact figure for all-MiniLM-L6-v2 uses max length 256


def write_beir(
    root: Path,
    docs: dict[str, tuple[str, str]],
    queries: dict[str, str],
    qrels: list[tuple[str, str, int]],
    split: str = "test",
) -> Path:
    """Write a BEIR folder: corpus.jsonl, queries.jsonl and qrels/<split>.tsv (with its header)."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with (root / "corpus.jsonl").open("w") as handle:
        for key, (title, text) in docs.items():
            handle.write(json.dumps({"_id": key, "title": title, "text": text}) + "\n")
    with (root / "queries.jsonl").open("w") as handle:
        for key, text in queries.items():
            handle.write(json.dumps({"_id": key, "text": text, "metadata": {}}) + "\n")
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{grade}" for q, d, grade in qrels]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def tiny_beir(root: Path) -> Path:
    """12 documents (SENTENCES, some with titles), 5 queries with graded qrels, one query with none relevant."""
    docs = {f"d{i}": ("Title" if i % 3 == 0 else "", text) for i, text in enumerate(SENTENCES)}
    queries = {"q1": "a man plays music", "q2": "animals outside", "q3": "money and markets",
               "q4": "reading books", "q5": "nothing relevant here", "q6": "unused query"}
    qrels = [("q1", "d0", 2), ("q1", "d7", 1), ("q2", "d3", 1), ("q2", "d2", 2), ("q2", "d5", 1),
             ("q3", "d4", 1), ("q4", "d6", 1), ("q4", "d8", 0), ("q5", "d9", 0)]
    return write_beir(root, docs, queries, qrels)


@functools.cache
def load_minilm(path: str) -> Encoder:
    return Encoder.load(path, max_seq_length=MAX_LENGTH)


@dataclass
class SciFact:
    folder: Path
    encoder: Encoder
    cache_dir: Path
    ids: list[str]
    texts: list[str]
    embeddings: np.ndarray  # [5183, 384], normalized, memory-mapped from the cache


@functools.cache
def encode_scifact(model_path: str, folder: str, cache_dir: str) -> SciFact:
    encoder = load_minilm(model_path)
    corpus = load_beir(folder, "test").corpus
    ids, texts = list(corpus), [doc_text(*corpus[key]) for key in corpus]
    embeddings = encode_corpus(encoder, texts, "document", EncodeOptions(cache_dir=cache_dir, show_progress_bar=True))
    return SciFact(Path(folder), encoder, Path(cache_dir), ids, texts, embeddings)


@pytest.fixture(scope="session")
def minilm(minilm_path: str) -> Encoder:
    """The real all-MiniLM-L6-v2 at max length 256 (one instance per test process)."""
    return load_minilm(minilm_path)


@pytest.fixture(scope="session")
def scifact(minilm_path: str, shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> SciFact:
    """SciFact with its corpus encoded by all-MiniLM-L6-v2 into a session embedding cache."""
    cache_dir = os.environ.get("TEXTCL_TEST_EMBEDDINGS") or tmp_path_factory.getbasetemp() / "scifact-embeddings"
    return encode_scifact(minilm_path, str(shared_data / "scifact"), str(cache_dir))
