"""Quantized document embeddings for search: int8 or binary indexes, with optional float rescoring.

- int8: faiss's scalar quantizer (`index_factory` "SQ8"), whose per-dimension ranges are calibrated on the
  corpus's own embeddings (faiss's training step); a float query is compared with the decoded int8 documents.
  4x less memory than float32.
- binary: one bit per dimension (1 where the value is positive), faiss's `IndexBinaryFlat` with Hamming distance
  to the binarized query; 32x less memory. Scores are `1 - 2 * hamming / dim`, the cosine of the ±1 codes.
- rescore K: fetch K x k candidates from the quantized index, then score those by float query x float document
  vectors and keep the best k, as sentence-transformers' rescoring search does. The float vectors are read
  from a memory map (`float_embeddings.npy` in a saved index): only the candidates' rows are read, so memory
  holds the quantized index while the floats stay on disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from textcl.errors import TextclError
from textcl.retrieval.faiss_index import build_faiss_index

SCHEMES = ("int8", "binary")
RESCORE_BLOCK = 256  # queries rescored at once: bounds the gathered candidates to 256 x K*k x dim floats
FLOAT_FILE = "float_embeddings.npy"


def check_quantization(quantize: str | None, rescore: int, dim: int | None = None) -> None:
    """A known scheme (or None), a rescore factor >= 0 that needs a scheme, and a binary dim divisible by 8."""
    if quantize is not None and quantize not in SCHEMES:
        raise TextclError(f"unknown quantization {quantize!r}; use {' or '.join(SCHEMES)}")
    if rescore < 0:
        raise TextclError(f"rescore must be 0 (off) or a factor >= 1, got {rescore}")
    if rescore and quantize is None:
        raise TextclError("rescore applies to a quantized index; add --quantize int8 or binary")
    if quantize == "binary" and dim is not None and dim % 8:
        raise TextclError(f"binary quantization packs 8 dimensions a byte; this model gives {dim} (not divisible by 8)")


def binarize(vectors: np.ndarray) -> np.ndarray:
    """Float `[n, dim]` -> packed bits uint8 `[n, dim / 8]`, bit set where the value is positive."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


def build_quantized_index(parts: Sequence[np.ndarray], quantize: str) -> faiss.Index | faiss.IndexBinary:
    """An int8 or binary index holding `parts` `[n_i, dim]` in order (int8 calibrated on a sample of them)."""
    if quantize == "int8":
        return build_faiss_index(parts, "SQ8")
    index = faiss.IndexBinaryFlat(parts[0].shape[1])
    for part in parts:
        add_vectors(index, part, quantize)
    return index


def add_vectors(index: faiss.Index | faiss.IndexBinary, vectors: np.ndarray, quantize: str) -> None:
    """Append float `[n, dim]` vectors to a quantized index (int8 keeps its calibrated ranges)."""
    for start in range(0, len(vectors), 65_536):
        block = np.ascontiguousarray(vectors[start : start + 65_536], dtype=np.float32)
        index.add(binarize(block) if quantize == "binary" else block)


def index_bytes(index: faiss.Index | faiss.IndexBinary) -> int:
    """Size of the index as faiss serializes it (what it holds in memory, up to a small header)."""
    if isinstance(index, faiss.IndexBinary):
        return int(faiss.serialize_index_binary(index).size)
    return int(faiss.serialize_index(index).size)


def quantized_search(
    index: faiss.Index | faiss.IndexBinary,
    quantize: str,
    queries: np.ndarray,
    k: int,
    rescore: int = 0,
    float_vectors: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of float `queries` `[nq, dim]` in a quantized index -> scores float32, rows int64 `[nq, k]`
    (row -1 where fewer than k exist). With `rescore` K >= 1, K*k candidates are rescored by inner product
    with their `float_vectors` rows `[n, dim]` (may be a memory map)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    fetch = min(k * max(rescore, 1), index.ntotal)
    if quantize == "binary":
        distances, rows = index.search(binarize(queries), fetch)
        scores = 1.0 - 2.0 * distances.astype(np.float32) / queries.shape[1]
    else:
        scores, rows = index.search(queries, fetch)
    if not rescore:
        return scores, rows
    if float_vectors is None:
        raise TextclError("this index keeps no float vectors to rescore with; rebuild it with --rescore K")
    best_scores = np.full((len(queries), min(k, fetch)), -np.inf, dtype=np.float32)
    best_rows = np.full(best_scores.shape, -1, dtype=np.int64)
    for start in range(0, len(queries), RESCORE_BLOCK):
        block = slice(start, start + RESCORE_BLOCK)
        candidates = rows[block]
        valid = candidates >= 0
        order = np.argsort(np.where(valid, candidates, 0), axis=None)  # read the memory map in file order
        flat = np.where(valid, candidates, 0).reshape(-1)
        vectors = np.empty((flat.size, queries.shape[1]), dtype=np.float32)
        vectors[order] = float_vectors[flat[order]]
        exact = np.einsum("qd,qcd->qc", queries[block], vectors.reshape(*candidates.shape, -1))
        exact = np.where(valid, exact, -np.inf)
        top = np.argsort(-exact, axis=1, kind="stable")[:, : best_scores.shape[1]]
        best_scores[block] = np.take_along_axis(exact, top, axis=1)
        best_rows[block] = np.where(np.isfinite(best_scores[block]), np.take_along_axis(candidates, top, axis=1), -1)
    return best_scores, best_rows
