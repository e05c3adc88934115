"""What the server does, without HTTP: search, embed, add and delete on a `DurableIndex`, in one model thread.

Every use of the index and its encoder runs on a single worker thread: searches and embeddings through
the micro-batcher, writes directly. So a search never sees half a write, writes apply in the order they
arrive, and the event loop only ever waits on futures.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from textcl.model.text_inputs import ENCODE_BATCH_SIZE
from textcl.retrieval.search_index import Hits, SearchIndex
from textcl.serving.batcher import MicroBatcher
from textcl.serving.store import DurableIndex

Side = Literal["query", "document"]
# On a CPU a batch is encoded in length-sorted forwards of at most this many texts: there batching gains nothing
# past ~8-16 texts a forward (bench/RESULTS.md, issue 14: 6.40 ms a query in forwards of 8, 6.32 in 16), while one
# forward of 64 pads every text to the longest of 64 (a SciFact claim averages 22 tokens, the longest of 64
# twice that). On a GPU the whole batch is one forward.
CPU_FORWARD_TEXTS = 16


@dataclass
class EncodeJob:
    """Texts to encode with the index's `side` settings; with `k`, queries to search for their top k."""

    texts: list[str]
    side: Side
    k: int | None = None
    mode: str = "dense"


class ServerBusyError(Exception):
    """The queue is full (HTTP 429); `retry_after` (whole seconds, at least 1) estimates when it has room."""

    def __init__(self, queued: int, retry_after: int) -> None:
        super().__init__(f"the server is busy ({queued} texts queued); retry after {retry_after} s")
        self.retry_after = retry_after


class SearchService:
    """A `DurableIndex` served by one model thread; `max_batch_size` texts per batch at most (1: batching
    off; on a CPU a batch runs in forwards of at most CPU_FORWARD_TEXTS), the first query of a batch waiting up to `batch_wait_ms` for others. At most `max_queued_texts`
    texts (queries, texts to embed, documents to add) wait for the model thread: a request that would queue
    more gets `ServerBusyError`, unless nothing waits (so one large request is never refused forever).
    `on_batch(texts)` (optional) hears of every batch."""

    def __init__(self, store: DurableIndex, max_batch_size: int, batch_wait_ms: float, max_queued_texts: int = 4096,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textcl-model")
        self.batcher = MicroBatcher(self.run_batch, self.executor, max_batch_size, batch_wait_ms / 1000, on_batch)
        self.max_queued_texts = max_queued_texts
        device = getattr(store.index.require_encoder(), "device", "cpu")  # an ONNX encoder runs on the CPU
        self.forward_texts = CPU_FORWARD_TEXTS if torch.device(device).type == "cpu" else None
        self.queued_writes = 0  # documents in add requests not yet applied

    @property
    def queued(self) -> int:
        """Texts waiting for the model thread (not counting the batch it runs)."""
        return self.batcher.waiting + self.queued_writes

    def admit(self, size: int) -> None:
        """Raise `ServerBusyError` if `size` more texts would overfill the queue."""
        queued = self.queued
        if queued and queued + size > self.max_queued_texts:
            wait = queued * self.batcher.seconds_per_text()
            raise ServerBusyError(queued, max(1, min(60, math.ceil(wait))))

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

    async def search(self, queries: list[str], k: int, mode: str | None = None) -> Hits:
        """Top-k hits of each query, as `SearchIndex.search` gives them in `mode` (`[n_queries, k]` arrays)."""
        self.admit(len(queries))
        job = EncodeJob(queries, "query", k, self.index.search_mode(mode))
        return await self.batcher.submit(job, len(queries))

    async def embed(self, texts: list[str], side: Side) -> np.ndarray:
        """Embeddings `[n, dim]` of `texts` with the index's query or document settings."""
        self.admit(len(texts))
        return await self.batcher.submit(EncodeJob(texts, side), len(texts))

    async def add(self, ids: list[str], texts: list[str]) -> int:
        """Encode, log and index new documents; returns the number of documents after."""
        self.admit(len(ids))
        self.queued_writes += len(ids)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self.add_now, ids, texts)
        finally:
            self.queued_writes -= len(ids)

    async def delete(self, doc_id: str) -> int:
        """Log and apply the removal of a document; returns the number of documents after."""
        self.admit(1)
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
        """The jobs' texts of each side encoded together, in length-sorted forwards of at most `forward_texts` (on
        a GPU the whole batch, but never more than max(max_batch_size, ENCODE_BATCH_SIZE) texts, so memory stays
        bounded for a large job), then one faiss search per distinct k; one result per job (vectors
        `[n_texts, dim]`, or the `Hits` of its queries)."""
        results: list[np.ndarray | Hits] = [np.empty(0)] * len(jobs)
        forward = self.forward_texts or max(self.batcher.max_batch_size, ENCODE_BATCH_SIZE)
        for side in ("query", "document"):
            members = [i for i, job in enumerate(jobs) if job.side == side]
            if members:
                texts = [text for i in members for text in jobs[i].texts]
                vectors = self.encode(texts, side, batch_size=min(len(texts), forward))
                for i, rows in zip(members, slices([len(jobs[i].texts) for i in members])):
                    results[i] = vectors[rows]
        for k, mode in {(job.k, job.mode) for job in jobs if job.k is not None}:
            members = [i for i, job in enumerate(jobs) if (job.k, job.mode) == (k, mode)]
            texts = [text for i in members for text in jobs[i].texts]
            hits = self.search_vectors(texts, np.concatenate([results[i] for i in members]), k, mode)
            for i, rows in zip(members, slices([len(jobs[i].texts) for i in members])):
                results[i] = Hits(*(None if part is None else part[rows] for part in hits))
        return results

    def search_vectors(self, queries: list[str], vectors: np.ndarray, k: int, mode: str = "dense") -> Hits:
        """`SearchIndex.search_encoded` with k clamped to the index's size (quietly: a server sees that often)."""
        size = len(self.index.ids)
        if size == 0:
            empty = np.empty((len(vectors), 0))
            parts = (empty.astype(np.float32),) * 2 if mode != "dense" else (None, None)
            return Hits(empty.astype(object), empty.astype(np.float32), empty.astype(object), *parts)
        return self.index.search_encoded(queries, vectors, min(k, size), mode=mode)


def slices(sizes: list[int]) -> list[slice]:
    """Consecutive slices of these sizes: [2, 3] -> [0:2, 2:5]."""
    ends = np.cumsum(sizes).tolist()
    return [slice(end - size, end) for size, end in zip(sizes, ends)]
