"""Lexical search: BM25 through `bm25s` (Snowball English stemmer from PyStemmer, English stop words).

The scoring, the sparse index and its files are bm25s's own; this module only keeps them in step with a
`SearchIndex` (same documents, same order) and saves them as flat files in the index folder
(`LEXICAL_FILES`, each size recorded in meta.json like the FAISS files).

Adding or removing documents changes every document's BM25 score (the IDF and the mean length move), so
bm25s has no incremental update; the index is rebuilt from each document's tokens instead. The tokens are
kept in memory once a write first needs them (tokenizing is most of the cost: SciFact's 5,183 abstracts take
about 0.7 s to tokenize and 0.4 s to index on one core), and the rebuild waits for the next search, so a burst
of writes costs one rebuild.

Settings differ from BEIR's Elasticsearch BM25 (English analyzer, Porter stemmer, title and text as two fields
searched with multi_match, k1 = 1.2, b = 0.75): one field (title, a space, text), Snowball (Porter2) stemming,
bm25s's English stop-word list, and Lucene's BM25 with k1 = 1.5, b = 0.75 (bm25s's defaults).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from textcl.errors import TextclError

LEXICAL_NAMES = {
    "data_name": "bm25_data.npy", "indices_name": "bm25_indices.npy", "indptr_name": "bm25_indptr.npy",
    "vocab_name": "bm25_vocab.json", "params_name": "bm25_params.json",
}
LEXICAL_FILES = tuple(LEXICAL_NAMES.values())


@dataclass(frozen=True)
class LexicalSettings:
    """How documents and queries are tokenized and scored (recorded in meta.json under "lexical")."""

    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stemmer: str = "english"
    stopwords: str = "en"

    def as_dict(self) -> dict[str, Any]:
        return {"library": "bm25s", "k1": self.k1, "b": self.b, "method": self.method, "stemmer": self.stemmer,
                "stopwords": self.stopwords}

    @classmethod
    def of(cls, record: dict[str, Any]) -> LexicalSettings:
        return cls(**{key: record[key] for key in ("k1", "b", "method", "stemmer", "stopwords") if key in record})


def bm25s_module() -> Any:
    """bm25s, imported on first use (it pulls scipy: kept out of `import textcl`)."""
    import bm25s

    return bm25s


def tokenize(texts: Sequence[str], settings: LexicalSettings) -> list[list[str]]:
    """Each text's stemmed tokens, stop words removed, as bm25s tokenizes them."""
    import Stemmer  # PyStemmer: deferred with bm25s

    stemmer = Stemmer.Stemmer(settings.stemmer)
    return bm25s_module().tokenize(list(texts), stopwords=settings.stopwords, stemmer=stemmer, return_ids=False,
                                   show_progress=False)


@dataclass
class LexicalIndex:
    """A bm25s index over `size` documents (rows as in the `SearchIndex`). `tokens` holds each document's
    tokens once a write needed them; `stale` says the bm25s model must be rebuilt from them before scoring."""

    settings: LexicalSettings
    model: Any = field(repr=False)
    size: int
    tokens: list[list[str]] | None = field(default=None, repr=False)
    stale: bool = False

    @classmethod
    def build(cls, texts: Sequence[str], settings: LexicalSettings | None = None) -> LexicalIndex:
        settings = settings or LexicalSettings()
        self = cls(settings, None, len(texts), tokenize(texts, settings), stale=True)
        self.refresh()
        return self

    def refresh(self) -> None:
        """Rebuild the bm25s model from the kept tokens when writes made it stale."""
        if not self.stale:
            return
        assert self.tokens is not None
        model = bm25s_module().BM25(k1=self.settings.k1, b=self.settings.b, method=self.settings.method)
        # An empty corpus, or one with no token at all, still gets bm25s's empty token so it can be saved.
        model.index(self.tokens if any(self.tokens) else [[""]] * max(len(self.tokens), 1), show_progress=False)
        self.model, self.stale = model, False

    def keep_tokens(self, texts: Sequence[str]) -> None:
        """Tokenize the current documents (`texts`, in row order) once, before the first write."""
        if self.tokens is None:
            self.tokens = tokenize(texts, self.settings)

    def add(self, texts: Sequence[str], current: Sequence[str]) -> None:
        """Append documents `texts`; `current` are the texts already indexed (tokenized on the first write)."""
        self.keep_tokens(current)
        assert self.tokens is not None
        self.tokens.extend(tokenize(texts, self.settings))
        self.size += len(texts)
        self.stale = True

    def remove(self, keep: np.ndarray, current: Sequence[str]) -> None:
        """Keep the rows where the bool mask `keep` `[size]` is true, in order."""
        self.keep_tokens(current)
        assert self.tokens is not None
        self.tokens = [tokens for tokens, kept in zip(self.tokens, keep.tolist()) if kept]
        self.size = len(self.tokens)
        self.stale = True

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """BM25 score of every document for each query, `[n_queries, size]` float32 (0: no query term occurs)."""
        self.refresh()
        result = np.zeros((len(queries), self.size), dtype=np.float32)
        if self.size == 0:
            return result
        for row, tokens in enumerate(tokenize(queries, self.settings)):
            ids = self.model.get_tokens_ids(tokens)
            if ids:
                result[row] = self.model.get_scores_from_ids(ids)
        return result

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k documents of each query that share a term with it -> scores `[nq, k]` float32 and rows `[nq, k]`
        int64, best first; rows past the matching documents are -1 (scores -inf). Ties go to the lower row."""
        scores = self.scores(queries)
        k = min(k, self.size)
        order = np.stack([top_rows(row, k) for row in scores]) if len(scores) else np.empty((0, k), np.int64)
        top = np.take_along_axis(scores, order, axis=1)
        return np.where(top > 0, top, -np.inf).astype(np.float32), np.where(top > 0, order, -1).astype(np.int64)

    def save(self, root: Path) -> list[str]:
        """Write bm25s's files into folder `root` (flat, named `LEXICAL_FILES`); returns their names."""
        self.refresh()
        self.model.save(str(root), show_progress=False, **LEXICAL_NAMES)
        return list(LEXICAL_FILES)

    @classmethod
    def load(cls, root: Path, record: dict[str, Any], size: int) -> LexicalIndex:
        """Read the bm25s files of index folder `root`; they must hold `size` documents."""
        missing = [name for name in LEXICAL_FILES if not (root / name).is_file()]
        if missing:
            raise TextclError(f"{str(root)!r} is a hybrid index without its BM25 files ({', '.join(missing)}); "
                              "rebuild it with `textcl index --hybrid`")
        try:
            model = bm25s_module().BM25.load(str(root), show_progress=False, load_corpus=False, **LEXICAL_NAMES)
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as error:
            raise TextclError(f"the BM25 files in {str(root)!r} are damaged ({str(error)[:160]}); rebuild the "
                              "index with `textcl index --hybrid`") from None
        if int(model.scores["num_docs"]) != size and size > 0:
            raise TextclError(f"the BM25 files in {str(root)!r} hold {model.scores['num_docs']} documents but the "
                              f"index holds {size}; rebuild it with `textcl index --hybrid`")
        return cls(LexicalSettings.of(record), model, size)


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Rows of the k best of `scores` `[n]`, best first, ties in row order: what a stable sort of all n gives,
    sorting only the rows at or above the k-th best score."""
    if k == 0:
        return np.empty(0, dtype=np.int64)
    threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
    rows = np.flatnonzero(scores >= threshold)
    return rows[np.lexsort((rows, -scores[rows]))][:k]
