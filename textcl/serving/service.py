"""What the server does, without HTTP: search, embed, add and delete on a `DurableIndex`, in one model thread.

Every use of the index and its encoder runs on a single worker thread: searches and embeddings through
the micro-batcher, writes directly. So a search never sees half a write, writes apply in the order they
arrive, and the event loop only ever waits on futures.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from textcl.model.text_inputs import ENCODE_BATCH_SIZE
from textcl.retrieval.search_index import Hits, SearchIndex
from textcl.serving.batcher import MicroBatcher
from textcl.serving.store import DurableIndex

Side = Literal["query", "document"]


@dataclass
class EncodeJob:
    """Texts to encode with the index's `side` settings; with `k`, queries to search for their top k."""

    texts: list[str]
    side: Side
    k: int | None = None


class SearchService:
    """A `DurableIndex` served by one model thread; `max_batch_size` texts per forward at most (1: batching
    off), the first query of a batch waiting up to `batch_wait_ms` for others."""

    def __init__(self, store: DurableIndex, max_batch_size: int, batch_wait_ms: float) -> None:
        self.store = store
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textcl-model")
        self.batcher = MicroBatcher(self.run_batch, self.executor, max_batch_size, batch_wait_ms / 1000)

    @property
    def index(self) -> SearchIndex:
        return self.store.index

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        """Finish the work in flight, snapshot the index and close its log."""
        await self.batcher.stop()
        await asyncio.get_running_loop().run_in_executor(self.executor, self.store.close)
        self.executor.shutdown()

    async def search(self, queries: list[str], k: int) -> Hits:
        """Top-k hits of each query, as `SearchIndex.search` gives them (`[n_queries, k]` arrays)."""
        return await self.batcher.submit(EncodeJob(queries, "query", k), len(queries))

    async def embed(self, texts: list[str], side: Side) -> np.ndarray:
        """Embeddings `[n, dim]` of `texts` with the index's query or document settings."""
        return await self.batcher.submit(EncodeJob(texts, side), len(texts))

    async def add(self, ids: list[str], texts: list[str]) -> int:
        """Encode, log and index new documents; returns the number of documents after."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.add_now, ids, texts)

    async def delete(self, doc_id: str) -> int:
        """Log and apply the removal of a document; returns the number of documents after."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.delete_now, doc_id)

    # Everything below runs on the model thread.

    def add_now(self, ids: list[str], texts: list[str]) -> int:
        self.store.check_new(ids)  # before encoding, so a duplicate costs nothing
        self.store.add(ids, texts, self.encode(texts, "document"))
        return len(self.index.ids)

    def delete_now(self, doc_id: str) -> int:
        self.store.remove(doc_id)
        return len(self.index.ids)

    def encode(self, texts: list[str], side: Side, batch_size: int = ENCODE_BATCH_SIZE) -> np.ndarray:
        """`[n, dim]` embeddings with the index's `EncodeOptions` for `side`, `batch_size` texts per forward."""
        return self.index.encode(texts, side, batch_size)

    def run_batch(self, jobs: list[EncodeJob]) -> list[np.ndarray | Hits]:
        """One forward per side for all the jobs' texts, then one faiss search per distinct k; one result per job
        (vectors `[n_texts, dim]`, or the `Hits` of its queries)."""
        results: list[np.ndarray | Hits] = [np.empty(0)] * len(jobs)
        for side in ("query", "document"):
            members = [i for i, job in enumerate(jobs) if job.side == side]
            if members:
                texts = [text for i in members for text in jobs[i].texts]
                vectors = self.encode(texts, side, batch_size=len(texts))
                for i, rows in zip(members, slices([len(jobs[i].texts) for i in members])):
                    results[i] = vectors[rows]
        for k in {job.k for job in jobs if job.k is not None}:
            members = [i for i, job in enumerate(jobs) if job.k == k]
            hits = self.search_vectors(np.concatenate([results[i] for i in members]), k)
            for i, rows in zip(members, slices([len(jobs[i].texts) for i in members])):
                results[i] = Hits(hits.ids[rows], hits.scores[rows], hits.texts[rows])
        return results

    def search_vectors(self, vectors: np.ndarray, k: int) -> Hits:
        """`SearchIndex.search_vectors` with k clamped to the index's size (quietly: a server sees that often)."""
        size = len(self.index.ids)
        if size == 0:
            empty = np.empty((len(vectors), 0))
            return Hits(empty.astype(object), empty.astype(np.float32), empty.astype(object))
        return self.index.search_vectors(vectors, min(k, size))


def slices(sizes: list[int]) -> list[slice]:
    """Consecutive slices of these sizes: [2, 3] -> [0:2, 2:5]."""
    ends = np.cumsum(sizes).tolist()
    return [slice(end - size, end) for size, end in zip(sizes, ends)]
