"""Dynamic micro-batching: queries that arrive together share one encoder forward.

On a CPU, one forward of 16 short queries costs a few times one forward of a single query, so a server
that encodes each request on its own spends most of its time on per-forward overhead. The batcher
queues the jobs of concurrent requests and hands them to `run_batch` together, in a worker thread, so
the event loop keeps accepting requests while the model runs.

Written by hand because the serving libraries that batch (Triton, Ray Serve, TorchServe) are servers of
their own; this is the one loop they share, on asyncio.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    """One request's work: `payload` for `run_batch`, `size` texts to encode, and where its result goes."""

    payload: Any
    size: int
    future: asyncio.Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Batches jobs submitted on the event loop and runs `run_batch(payloads) -> results` (one result per
    payload, in order) on `executor`.

    A batch starts with the oldest waiting job and takes the jobs queued behind it, up to `max_batch_size`
    texts; when fewer are waiting it waits for more until `max_wait` seconds after its first job arrived.
    Jobs that arrive while a batch runs form the next one. A job larger than `max_batch_size` runs alone;
    `max_batch_size=1` runs one job per call (batching off). `on_batch(texts)` (optional) hears of every batch.
    """

    def __init__(
        self, run_batch: Callable[[list[Any]], Sequence[Any]], executor: Executor, max_batch_size: int,
        max_wait: float, on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait
        self.on_batch = on_batch
        self.pending: deque[Job] = deque()
        self.waiting = 0  # texts in `pending`
        self.wakeup: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None
        self.batches = 0  # batches run, the texts they held (for /health) and the seconds they took
        self.batched_texts = 0
        self.busy_seconds = 0.0

    def seconds_per_text(self) -> float:
        """Mean time a text has taken in the batches so far (0 before the first)."""
        return self.busy_seconds / max(self.batched_texts, 1)

    def start(self) -> None:
        """Start the worker task (call on the event loop that will submit)."""
        self.wakeup = asyncio.Event()
        self.worker = asyncio.get_running_loop().create_task(self.work())

    async def stop(self) -> None:
        """Stop the worker; jobs still queued fail with `RuntimeError`."""
        if self.worker is not None:
            self.worker.cancel()
            await asyncio.gather(self.worker, return_exceptions=True)
        while self.pending:
            job = self.pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is stopping"))

    async def submit(self, payload: Any, size: int) -> Any:
        """Queue a job of `size` texts and wait for its result (or the exception its batch raised)."""
        if self.worker is None or self.wakeup is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        job = Job(payload, size, asyncio.get_running_loop().create_future())
        self.pending.append(job)
        self.waiting += size
        self.wakeup.set()
        return await job.future

    async def work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wait_for_batch()
            batch = self.take_batch()
            if not batch:
                continue
            texts = sum(job.size for job in batch)
            self.batches += 1
            self.batched_texts += texts
            if self.on_batch is not None:
                self.on_batch(texts)
            start = time.monotonic()
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [job.payload for job in batch])
            except Exception as error:  # noqa: BLE001 - the batch's requests get the error; the worker goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            finally:
                self.busy_seconds += time.monotonic() - start
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)

    async def wait_for_batch(self) -> None:
        """Return when a job waits and either the batch is full or the window of the oldest job has passed."""
        assert self.wakeup is not None
        while not self.pending:
            self.wakeup.clear()
            await self.wakeup.wait()
        deadline = self.pending[0].arrived + self.max_wait
        while self.waiting < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
            self.wakeup.clear()
            try:
                await asyncio.wait_for(self.wakeup.wait(), remaining)
            except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
                break

    def take_batch(self) -> list[Job]:
        """Dequeue the oldest job and those behind it while they fit in `max_batch_size` texts; drop jobs whose
        requests were cancelled (the client went away)."""
        batch: list[Job] = []
        total = 0
        while self.pending and (not batch or total + self.pending[0].size <= self.max_batch_size):
            job = self.pending.popleft()
            self.waiting -= job.size
            if job.future.cancelled():
                continue
            batch.append(job)
            total += job.size
        return batch
