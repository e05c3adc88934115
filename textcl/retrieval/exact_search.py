"""Exact top-k inner-product search over arrays larger than memory (memory maps), block by block."""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

SEARCH_BLOCK_BYTES = 2**28


def exact_search(
    queries: np.ndarray, corpus: np.ndarray | Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of `queries` `[nq, dim]` against `corpus` `[n, dim]` -> scores, row indices `[nq, k]`.

    `corpus` may be a memory map, or a list of arrays searched as if concatenated. It is read in blocks of
    about 256 MiB, so it never loads whole; `k` is clamped to n. Rows are best first.
    """
    parts = [corpus] if isinstance(corpus, np.ndarray) else list(corpus)
    k = min(k, sum(len(part) for part in parts))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    block_rows = max(1, SEARCH_BLOCK_BYTES // (4 * queries.shape[1]))
    offset = 0
    for part in parts:
        for start in range(0, len(part), block_rows):
            block = np.ascontiguousarray(part[start : start + block_rows], dtype=np.float32)
            scores, indices = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(scores, indices + (offset + start))
        offset += len(part)
    heap.finalize()
    return heap.D, heap.I
