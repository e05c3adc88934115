"""Semantic search: a FAISS index over a model's embeddings, with the ids and texts it returns.

Folder layout (ARCHITECTURE.md, "Search index folder"): `index.faiss`, `ids.jsonl` (one {"id", "text"} a line,
in index order) and `meta.json` (model path, dimension, metric, index factory, normalize, prompts, max
lengths, precision, search parameters: the index's `EncodeOptions` are read back from it). Scores are inner
products; with normalize (the default) they are cosines. A quantized index (`quantize="int8"` or `"binary"`,
`textcl.retrieval.quantization`) records its scheme and rescore factor in meta.json, and keeps
`float_embeddings.npy` (memory-mapped on load) when it rescores.
A hybrid index (`hybrid=True`) adds a BM25 index of the same documents (`textcl.retrieval.lexical`, its files
`bm25_*`), records its settings ("lexical") and how the two rankings are fused ("fusion",
`textcl.retrieval.fusion`) in meta.json, and searches with both by default.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import faiss
import numpy as np
import torch

from textcl.errors import TextclError
from textcl.model.encode_options import EncodeOptions, Role
from textcl.model.encoder import Encoder
from textcl.model.text_encoder import TextEncoder
from textcl.model.text_inputs import ENCODE_BATCH_SIZE
from textcl.retrieval.corpus_embeddings import encode_corpus
from textcl.retrieval.faiss_index import build_faiss_index, set_search_params
from textcl.retrieval.fusion import FusionSettings, fuse
from textcl.retrieval.index_folder import (
    INDEX_FILES,  # noqa: F401  (re-exported)
    check_finite,
    check_queries,
    model_location,
    read_index_folder,
    save_index_folder,
)
from textcl.retrieval.lexical import LexicalIndex, LexicalSettings
from textcl.retrieval.quantization import (
    add_vectors as add_quantized,
)
from textcl.retrieval.quantization import (
    build_quantized_index,
    check_quantization,
    quantized_search,
)

logger = logging.getLogger(__name__)

SEARCH_MODES = ("dense", "bm25", "hybrid")


class Hits(NamedTuple):
    """Search results, best first: `ids` and `texts` are object arrays `[n_queries, k]` (None where an
    approximate index found fewer than k), `scores` float32 `[n_queries, k]`. A hybrid or BM25 search also
    gives each side's score, float32 `[n_queries, k]`, NaN where that side did not return the document:
    `dense_scores` (cosine) and `lexical_scores` (BM25); `scores` is then the fused score."""

    ids: np.ndarray
    scores: np.ndarray
    texts: np.ndarray
    dense_scores: np.ndarray | None = None
    lexical_scores: np.ndarray | None = None


def check_ids(ids: list[str], texts: list[str], existing: Sequence[str] = ()) -> None:
    """One id per text, none repeated and none already in `existing`."""
    if len(ids) != len(texts):
        raise TextclError(f"got {len(ids)} ids for {len(texts)} texts")
    seen = set(existing)
    for key in ids:
        if key in seen:
            raise TextclError(f"doc id {key!r} appears twice; ids must be unique")
        seen.add(key)


def with_sentinel(values: Sequence[str | None]) -> np.ndarray:
    """An object array of `values` plus a trailing None: faiss's row -1 ("no result") then reads as None."""
    return np.array([*values, None], dtype=object)


@dataclass
class SearchIndex:
    """A FAISS index, the id and text of each vector, the settings to encode queries, and the encoder."""

    index: faiss.Index
    meta: dict[str, Any]
    encoder: TextEncoder | None = field(default=None, repr=False)
    id_lookup: np.ndarray = field(default_factory=lambda: with_sentinel([]), repr=False)
    text_lookup: np.ndarray = field(default_factory=lambda: with_sentinel([]), repr=False)
    float_vectors: np.ndarray | None = field(default=None, repr=False)  # `[n, dim]`, kept to rescore
    lexical: LexicalIndex | None = field(default=None, repr=False)  # BM25 of the same rows (hybrid indexes)

    @property
    def ids(self) -> np.ndarray:
        """Doc id of each indexed vector, in index order (object array `[n]`)."""
        return self.id_lookup[:-1]

    @property
    def texts(self) -> np.ndarray:
        """Text of each indexed vector, in index order (object array `[n]`)."""
        return self.text_lookup[:-1]

    @classmethod
    def build(
        cls,
        encoder: TextEncoder,
        texts: Sequence[str],
        ids: Sequence[str] | None = None,
        factory: str = "Flat",
        *,
        model_path: str | Path | None = None,
        normalize: bool = True,
        search_params: str = "",
        quantize: str | None = None,
        rescore: int = 0,
        hybrid: bool = False,
        fusion: FusionSettings | None = None,
        lexical: LexicalSettings | None = None,
        encode_options: EncodeOptions = EncodeOptions(),
    ) -> SearchIndex:
        """Encode `texts` (ids default to "0", "1", ...) and index them with `faiss.index_factory(factory)`.

        `model_path` is written to meta.json so `load` can rebuild the encoder (default: the path the
        transformers model was loaded from). `encode_options` encode the documents now and, as meta.json records
        them (prompt names and max lengths resolved: the model's "query"/"document" prompts and its
        max_seq_length by default; precision), every later query and added document; its batch size, cache
        and progress bar apply to this build only. `quantize` "int8" or "binary" stores quantized vectors
        instead of `factory`'s index; `rescore` K >= 1 then rescores K*k candidates with the float vectors
        (`textcl.retrieval.quantization`).
        `hybrid` also builds a BM25 index (`lexical` settings) searched with the dense one and fused as `fusion`
        says (default: reciprocal rank fusion).
        """
        texts = list(texts)
        if not texts:
            raise TextclError("cannot build a search index from an empty corpus")
        options = encode_options.resolved(encoder)
        meta = {
            "model": str(model_path or encoder.name_or_path),
            "dim": encoder.dim,
            "metric": "cosine" if normalize else "dot",
            "factory": factory,
            "normalize": normalize,
            "query_prompt_name": options.query_prompt_name,
            "document_prompt_name": options.document_prompt_name,
            "max_seq_length": options.document_max_length,
            "query_max_length": options.query_max_length,
            "search_params": search_params,
            "precision": options.precision,
            "backend": encoder.backend,
        }
        if encoder.backend == "onnx":
            meta["onnx_file"] = encoder.onnx_file
        check_quantization(quantize, rescore, encoder.dim)
        if quantize:
            if factory != "Flat":
                raise TextclError(f"quantize={quantize!r} builds its own flat index; drop factory {factory!r}")
            meta |= {"quantize": quantize, "rescore": rescore}
        if hybrid:
            meta |= {"lexical": (lexical or LexicalSettings()).as_dict(),
                     "fusion": (fusion or FusionSettings()).as_dict()}
        ids = [str(i) for i in range(len(texts))] if ids is None else [str(i) for i in ids]
        check_ids(ids, texts)
        embeddings = encode_corpus(encoder, texts, "document", options, normalize=normalize)
        check_finite(embeddings, "documents", ids)
        index = build_quantized_index([embeddings], quantize) if quantize else build_faiss_index([embeddings], factory)
        set_search_params(index, search_params)
        self = cls(index, meta, encoder, float_vectors=embeddings if rescore else None,
                   lexical=LexicalIndex.build(texts, lexical) if hybrid else None)
        self.append(ids, texts)
        return self

    @property
    def encode_options(self) -> EncodeOptions:
        """How this index encodes queries and documents, as meta.json records it (prompts, max lengths,
        precision)."""
        meta = self.meta
        return EncodeOptions(query_prompt_name=meta["query_prompt_name"],
                             document_prompt_name=meta["document_prompt_name"],
                             query_max_length=meta["query_max_length"], document_max_length=meta["max_seq_length"],
                             precision=meta["precision"])

    def encode(self, texts: Sequence[str], role: Role = "query", batch_size: int = ENCODE_BATCH_SIZE) -> np.ndarray:
        """Embeddings `[n, dim]` of `texts` encoded as this index encodes its queries or documents (`role`),
        `batch_size` texts per forward."""
        options = dataclasses.replace(self.encode_options, batch_size=batch_size)
        return options.encode(self.require_encoder(), texts, role, normalize=self.meta["normalize"])

    def append(self, ids: list[str], texts: list[str]) -> None:
        """Record the ids and texts of vectors added to the index, in order."""
        self.id_lookup = with_sentinel([*self.ids, *ids])
        self.text_lookup = with_sentinel([*self.texts, *texts])

    def add(self, texts: Sequence[str], ids: Sequence[str] | None = None, batch_size: int = ENCODE_BATCH_SIZE) -> None:
        """Encode and append more documents (ids default to continuing "0", "1", ...)."""
        texts = list(texts)
        start = len(self.ids)
        ids = [str(start + i) for i in range(len(texts))] if ids is None else [str(i) for i in ids]
        check_ids(ids, texts, self.ids.tolist())
        embeddings = self.encode(texts, "document", batch_size)
        check_finite(embeddings, "documents", ids)
        self.add_vectors(ids, texts, embeddings)

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the folder layout of the module docstring atomically (`textcl.retrieval.index_folder`): readers
        see the previous index until the new one is complete. An existing index is replaced only with
        `overwrite`; a concurrent writer of the same folder is waited for, then refused."""
        save_index_folder(Path(path), self.index, self.ids.tolist(), self.texts.tolist(), self.meta, overwrite,
                          None if self.float_vectors is None else np.asarray(self.float_vectors), self.lexical)

    @classmethod
    def load(
        cls, path: str | Path, encoder: TextEncoder | None = None, device: str | torch.device | None = None,
        backend: str | None = None, onnx_file: str | None = None,
    ) -> SearchIndex:
        """Read a saved index (verified: a damaged file is one line naming it); the encoder defaults to the model
        named in meta.json (a relative path is relative to the index folder), loaded onto `device` (default:
        the GPU when torch sees one) with `backend` (default: the one the index was built with), and must have
        the index's dimension."""
        root = Path(path)
        index, meta, ids, texts, float_vectors = read_index_folder(root)
        meta.pop("count", None)
        meta.pop("files", None)
        if "doc_prompt_name" in meta:  # folders written before textcl named the document side one way
            meta["document_prompt_name"] = meta.pop("doc_prompt_name")
        meta.setdefault("precision", "fp32")
        if encoder is None:
            backend = backend or meta.get("backend", "torch")
            onnx_file = onnx_file or (meta.get("onnx_file") if backend == "onnx" else None)
            encoder = Encoder.load(model_location(meta["model"], root), max_seq_length=meta["max_seq_length"],
                                   device=device, backend=backend, onnx_file=onnx_file)
        if encoder.dim != index.d:
            raise TextclError(
                f"the index in {str(root)!r} holds {index.d}-dimensional vectors but the model gives {encoder.dim}; "
                f"search with the model it was built with ({meta['model']})"
            )
        set_search_params(index, meta.get("search_params", ""))
        lexical = LexicalIndex.load(root, meta["lexical"], len(ids)) if "lexical" in meta else None
        self = cls(index, meta, encoder, float_vectors=float_vectors, lexical=lexical)
        self.append(ids, texts)
        return self

    def require_encoder(self) -> TextEncoder:
        if self.encoder is None:
            raise TextclError("this SearchIndex has no encoder; pass one to SearchIndex.load")
        return self.encoder

    def search(
        self, queries: str | Sequence[str], k: int = 10, batch_size: int = ENCODE_BATCH_SIZE,
        rescore: int | None = None, mode: str | None = None,
    ) -> Hits:
        """Encode `queries` (with the index's query prompt) and return their top `k` documents. `mode`: "dense",
        "bm25" or "hybrid" (default: "hybrid" for an index built with `hybrid=True`, else "dense")."""
        queries = [queries] if isinstance(queries, str) else list(queries)
        check_queries(queries)
        mode = self.search_mode(mode)
        vectors = None if mode == "bm25" else self.encode(queries, "query", batch_size)
        if vectors is not None:
            check_finite(vectors, "queries")
        return self.search_encoded(queries, vectors, k, rescore, mode)

    def search_mode(self, mode: str | None) -> str:
        """The mode a search runs in: `mode`, or the index's default; BM25 needs an index built with it."""
        if mode is None:
            return "hybrid" if self.lexical is not None else "dense"
        if mode not in SEARCH_MODES:
            raise TextclError(f"search mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
        if mode != "dense" and self.lexical is None:
            raise TextclError(f"a {mode} search needs BM25, and this index was built without it; rebuild it with "
                              "`textcl index MODEL --corpus CORPUS --out INDEX --hybrid` (SearchIndex.build(..., "
                              "hybrid=True))")
        return mode

    def search_encoded(
        self, queries: Sequence[str], vectors: np.ndarray | None, k: int = 10, rescore: int | None = None,
        mode: str | None = None,
    ) -> Hits:
        """`search` for queries already encoded (`vectors` `[n_queries, dim]`; None in "bm25" mode)."""
        mode = self.search_mode(mode)
        if mode == "dense":
            assert vectors is not None
            return self.search_vectors(vectors, k, rescore)
        assert self.lexical is not None
        k = self.clamp_k(k)
        fusion = FusionSettings.of(self.meta.get("fusion", {}))
        lexical_scores, lexical_rows = self.lexical.search(queries, k if mode == "bm25" else max(k, fusion.depth))
        if mode == "bm25":
            nan = np.full(lexical_scores.shape, np.nan, dtype=np.float32)
            return Hits(self.id_lookup[lexical_rows], lexical_scores, self.text_lookup[lexical_rows], nan,
                        np.where(lexical_rows >= 0, lexical_scores, np.nan).astype(np.float32))
        assert vectors is not None
        dense_scores, dense_rows = self.search_rows(vectors, min(max(k, fusion.depth), len(self.ids)), rescore)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        parts = np.full((3, len(queries), k), np.nan, dtype=np.float32)
        parts[0] = -np.inf
        for query in range(len(queries)):
            dense = {int(r): float(s) for r, s in zip(dense_rows[query], dense_scores[query]) if r >= 0}
            lexical = {int(r): float(s) for r, s in zip(lexical_rows[query], lexical_scores[query]) if r >= 0}
            for rank, hit in enumerate(fuse(dense, lexical, fusion, k)):
                rows[query, rank] = hit.key
                parts[:, query, rank] = (hit.score, np.nan if hit.dense is None else hit.dense,
                                         np.nan if hit.lexical is None else hit.lexical)
        return Hits(self.id_lookup[rows], parts[0], self.text_lookup[rows], parts[1], parts[2])

    def clamp_k(self, k: int) -> int:
        """k, at most the index's size (with a warning)."""
        size = len(self.ids)
        if not 1 <= k <= size:
            if k < 1:
                raise TextclError(f"k must be at least 1, got {k}")
            logger.warning("k=%d is larger than the index (%d documents); returning %d", k, size, size)
            k = size
        return k

    def search_vectors(self, vectors: np.ndarray, k: int = 10, rescore: int | None = None) -> Hits:
        """Top `k` documents for query embeddings `[n_queries, dim]`; k larger than the index is clamped.
        `rescore` overrides a quantized index's saved rescore factor (0: off)."""
        scores, rows = self.search_rows(vectors, self.clamp_k(k), rescore)
        return Hits(self.id_lookup[rows], scores, self.text_lookup[rows])

    def search_rows(self, vectors: np.ndarray, k: int, rescore: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Dense scores `[n_queries, k]` and rows `[n_queries, k]` (-1: none) of the top `k` (1 <= k <= size)."""
        if np.shape(vectors)[-1] != self.meta["dim"]:
            raise TextclError(
                f"the queries have {np.shape(vectors)[-1]} dimensions but this index holds {self.meta['dim']}; "
                f"search with the model it was built with ({self.meta['model']})"
            )
        if self.meta.get("quantize"):
            rescore = self.meta.get("rescore", 0) if rescore is None else rescore
            check_quantization(self.meta["quantize"], rescore)
            return quantized_search(self.index, self.meta["quantize"], vectors, k, rescore, self.float_vectors)
        return self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)

    # What `textcl.serving` needs besides `encode`: pre-encoded adds, and removal by id.
    def add_vectors(self, ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray) -> None:
        """Append documents already encoded with `encode(texts, "document")` (`vectors` `[n, dim]`); ids must be
        new."""
        ids, texts = [str(i) for i in ids], list(texts)
        check_ids(ids, texts, self.ids.tolist())
        if vectors.shape != (len(ids), self.meta["dim"]):
            raise TextclError(f"got vectors of shape {vectors.shape} for {len(ids)} documents of dimension "
                              f"{self.meta['dim']}")
        if self.lexical is not None:
            self.lexical.add(texts, self.texts.tolist())
        self.append(ids, texts)
        if self.meta.get("quantize"):
            add_quantized(self.index, vectors, self.meta["quantize"])
            if self.float_vectors is not None:
                self.float_vectors = np.concatenate([self.float_vectors, vectors])
            return
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    @property
    def removable(self) -> bool:
        """Whether `remove` works here: faiss renumbers the rows of flat-code indexes (Flat, SQ, PQ) when it
        removes some, which keeps them aligned with `ids` (so does the binary flat index of `quantize="binary"`);
        IVF indexes keep stale numbers and HNSW cannot remove."""
        if isinstance(self.index, faiss.IndexBinary):
            return isinstance(self.index, faiss.IndexBinaryFlat)
        return isinstance(faiss.downcast_index(self.index), faiss.IndexFlatCodes)

    def remove(self, ids: Sequence[str]) -> None:
        """Drop the documents with these ids (each must be indexed); the others keep their order."""
        position = {key: row for row, key in enumerate(self.ids)}
        unknown = [key for key in ids if key not in position]
        if unknown:
            raise TextclError(f"no document has the id {unknown[0]!r}")
        if not self.removable:
            raise TextclError(f"a {self.meta['factory']} index cannot remove documents; rebuild it without them, "
                              "or use a Flat, SQ or PQ index")
        rows = np.array(sorted({position[key] for key in ids}), dtype=np.int64)
        self.index.remove_ids(rows)
        keep = np.ones(len(position), dtype=bool)
        keep[rows] = False
        if self.float_vectors is not None:
            self.float_vectors = np.asarray(self.float_vectors)[keep]
        if self.lexical is not None:
            self.lexical.remove(keep, self.texts.tolist())
        self.id_lookup = with_sentinel(self.ids[keep].tolist())
        self.text_lookup = with_sentinel(self.texts[keep].tolist())
