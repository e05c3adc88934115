"""Teacher scores of (query, document) pairs, the targets of distillation.

A teacher is a bi-encoder (textcl or sentence-transformers: the cosine of its query and document
embeddings, with its saved "query"/"document" prompts) or, where sentence-transformers is installed, a
sentence-transformers `CrossEncoder` (its raw logit for the pair, before any activation, so a softmax
temperature means the same thing for every cross-encoder). Scores are computed in batches and cached on
disk like corpus embeddings (`cache_dir`); under `accelerate launch` each process scores its own share.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textcl.errors import TextclError
from textcl.io.tables import (
    check_output,
    column,
    negative_column_names,
    read_provenance,
    read_records,
    score_column,
    write_table,
)
from textcl.model.encode_options import EncodeOptions
from textcl.model.encoder import Encoder, hash_weights
from textcl.model.fit import check_vocabulary, fit_length
from textcl.model.location import resolve_model_dir
from textcl.model.text_encoder import TextEncoder
from textcl.retrieval.corpus_embeddings import computed_rows, encode_corpus
from textcl.version import __version__


@dataclass
class Teacher:
    """A model that scores (query, document) pairs; `kind` is "bi-encoder" (`encoder`) or "cross-encoder"
    (`cross_encoder`, a sentence_transformers.CrossEncoder)."""

    name: str
    kind: str
    encoder: TextEncoder | None = None
    cross_encoder: Any = None


def is_cross_encoder(folder: Path) -> bool:
    """A folder saved by sentence-transformers' CrossEncoder, or a plain transformers sequence classifier."""
    st_config = folder / "config_sentence_transformers.json"
    if st_config.is_file() and json.loads(st_config.read_text()).get("model_type") == "CrossEncoder":
        return True
    config = folder / "config.json"
    architectures = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    return not (folder / "modules.json").is_file() and bool(architectures) and all(
        name.endswith("ForSequenceClassification") for name in architectures
    )


def load_teacher(model_name_or_path: str | Path, device: str | torch.device | None = None) -> Teacher:
    """The teacher in `model_name_or_path`: a cross-encoder when the folder is one (needs sentence-transformers),
    else a bi-encoder loaded with `Encoder.load`."""
    name = str(model_name_or_path)
    if not is_cross_encoder(resolve_model_dir(model_name_or_path)):
        return Teacher(name, "bi-encoder", encoder=Encoder.load(model_name_or_path, device=device))
    try:
        from sentence_transformers import CrossEncoder  # optional: only cross-encoder teachers need it
    except ImportError:
        raise TextclError(f"{name} is a cross-encoder; scoring with it needs sentence-transformers "
                          "(pip install sentence-transformers)") from None
    device = None if device is None else str(device)
    cross_encoder = CrossEncoder(str(resolve_model_dir(name)), device=device)
    config = cross_encoder.model.config.to_dict()  # the same fit check as Encoder.load: before any pair meets it
    check_vocabulary(cross_encoder.tokenizer, config, name)
    length = cross_encoder.max_length or getattr(cross_encoder.tokenizer, "model_max_length", 0)
    if 0 < length < 100_000:  # a tokenizer without a real limit says 1e30
        cross_encoder.max_length = fit_length(length, config, name)
    return Teacher(name, "cross-encoder", cross_encoder=cross_encoder)


def score_pairs(
    teacher: Teacher,
    queries: Sequence[str],
    documents: Sequence[str],
    encode_options: EncodeOptions = EncodeOptions(),
) -> np.ndarray:
    """The teacher's score of each pair (queries[i], documents[i]) -> float32 `[n]`. A bi-encoder encodes the
    queries and documents with `encode_options`; a cross-encoder takes its batch size, cache and progress bar."""
    if len(queries) != len(documents):
        raise TextclError(f"got {len(queries)} queries for {len(documents)} documents")
    if teacher.kind == "bi-encoder":
        return cosine_scores(teacher.encoder, list(queries), list(documents), encode_options)
    pairs = list(zip(queries, documents))
    path = None
    if encode_options.cache_dir is not None and pairs:
        path = Path(encode_options.cache_dir) / f"pairs-{pair_cache_key(teacher, pairs)}.npy"
        if path.exists():
            return np.asarray(np.load(path, mmap_mode="r")).reshape(-1)

    def compute(start: int, stop: int) -> np.ndarray:
        logits = teacher.cross_encoder.predict(pairs[start:stop], batch_size=encode_options.batch_size,
                                               activation_fn=torch.nn.Identity(), convert_to_numpy=True)
        return np.asarray(logits, dtype=np.float32).reshape(stop - start, 1)

    scores = computed_rows((len(pairs), 1), compute, path, show_progress_bar=encode_options.show_progress_bar,
                           desc="score")
    return np.asarray(scores).reshape(-1)


def score_table(
    teacher: Teacher, anchors: Sequence[str], candidates: dict[str, Sequence[str]],
    encode_options: EncodeOptions = EncodeOptions(),
) -> dict[str, list[float | None]]:
    """`<column>_score` -> the teacher's score of (anchor, text) for every row of each candidate column
    (None where the text is empty), as `score_pairs` scores them."""
    pairs = [(row, name) for name, texts in candidates.items() for row, text in enumerate(texts) if text.strip()]
    scores = score_pairs(teacher, [anchors[row] for row, _ in pairs], [candidates[name][row] for row, name in pairs],
                         encode_options)
    out: dict[str, list[float | None]] = {score_column(name): [None] * len(anchors) for name in candidates}
    for (row, name), score in zip(pairs, scores.tolist()):
        out[score_column(name)][row] = score
    return out


def score_file(
    teacher: Teacher,
    data: str | Path,
    out: str | Path,
    *,
    split: str = "train",
    anchor_column: str = "anchor",
    positive_column: str = "positive",
    negative_columns: Sequence[str] | None = None,
    provenance: dict[str, Any] | None = None,
    encode_options: EncodeOptions = EncodeOptions(),
) -> int:
    """Copy the table `data` to `out` with the teacher's `<column>_score` for the positive and every negative
    column (default: every column named negative*), replacing older scores; the sidecar records the teacher on
    top of `provenance` (e.g. how the table was mined). Scored as `score_pairs` scores. Returns the row count."""
    check_output(out)
    rows = read_records(data, "data", split)
    names = list(rows[0])
    candidates = [positive_column, *(negative_columns or negative_column_names(names))]
    table = {name: [row.get(name) for row in rows] for name in names}
    anchors = column(rows, anchor_column, data, "--anchor_column")
    texts = {name: column(rows, name, data, "--positive_column / --negative_columns") for name in candidates}
    table |= score_table(teacher, anchors, texts, encode_options)
    scores = {"model": teacher.name, "kind": teacher.kind, "columns": [score_column(name) for name in candidates],
              "precision": encode_options.precision, "query_max_length": encode_options.query_max_length}
    record = (provenance or read_provenance(data) or {"data": str(data)}) | {"textcl_version": __version__,
                                                                             "scores": scores}
    write_table(table, out, provenance=record)
    return len(rows)


def cosine_scores(
    encoder: TextEncoder, queries: list[str], documents: list[str], encode_options: EncodeOptions
) -> np.ndarray:
    """Cosine of each (query, document) pair; every distinct text is encoded once (and cached)."""
    distinct_queries, distinct_documents = list(dict.fromkeys(queries)), list(dict.fromkeys(documents))
    q = encode_corpus(encoder, distinct_queries, "query", encode_options)
    d = encode_corpus(encoder, distinct_documents, "document", encode_options)
    q_row = {text: i for i, text in enumerate(distinct_queries)}
    d_row = {text: i for i, text in enumerate(distinct_documents)}
    q_index = np.array([q_row[text] for text in queries], dtype=np.int64)
    d_index = np.array([d_row[text] for text in documents], dtype=np.int64)
    return np.einsum("nd,nd->n", np.asarray(q)[q_index], np.asarray(d)[d_index]).astype(np.float32)


def pair_cache_key(teacher: Teacher, pairs: list[tuple[str, str]]) -> str:
    """Names a cross-encoder's cached scores of `pairs`: its weights and the pairs, in order."""
    digest = hashlib.sha256(json.dumps(["cross-encoder", 1]).encode())
    hash_weights(digest, teacher.cross_encoder.model)
    for query, document in pairs:
        for text in (query, document):
            data = text.encode("utf-8")
            digest.update(b"%d:" % len(data) + data)
    return digest.hexdigest()[:32]
