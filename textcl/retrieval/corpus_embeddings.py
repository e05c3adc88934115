"""Corpus-scale encoding with an on-disk embedding cache, shared by evaluation, mining and search.

`encode_corpus` turns texts into float32 embeddings `[n, dim]` chunk by chunk, with the prompt and max length
of one side (query or document) of an `EncodeOptions`. With its `cache_dir`, the array is written to a
memory-mapped `.npy` named by a hash of the model weights, texts, prompt, max length, normalization and
precision, so a corpus larger than memory never sits in RAM and a second run reuses it.
Under `accelerate launch` each process encodes a contiguous shard into the same file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from textcl.model.encode_options import EncodeOptions, Role
from textcl.model.text_encoder import TextEncoder

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """Where the CLI caches embeddings: $TEXTCL_CACHE_DIR, else $XDG_CACHE_HOME/textcl/embeddings (~/.cache)."""
    if os.environ.get("TEXTCL_CACHE_DIR"):
        return Path(os.environ["TEXTCL_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "textcl" / "embeddings"


def cache_key(
    encoder: TextEncoder, texts: Sequence[str], prefix: str, max_length: int, normalize: bool, precision: str
) -> str:
    """Names the cached embeddings of `texts` under this model, prompt prefix, max length, normalization and
    precision (bf16 gives other embeddings than fp32)."""
    digest = hashlib.sha256()
    header = [CACHE_FORMAT, encoder.fingerprint(), prefix, max_length, normalize, len(texts),
              {"fp32": "float32", "bf16": "torch.bfloat16"}[precision]]
    digest.update(json.dumps(header).encode())
    for text in texts:
        data = text.encode("utf-8")
        digest.update(b"%d:" % len(data) + data)
    return digest.hexdigest()[:32]


def distributed_state() -> Any:
    """accelerate's `PartialState` when launched with several processes, else None (accelerate not imported)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState  # only under a multi-process launch: evaluation alone never loads it

    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=forced_cpu or not torch.cuda.is_available())
    return state if state.num_processes > 1 else None


def encode_corpus(
    encoder: TextEncoder,
    texts: Sequence[str],
    role: Role = "document",
    encode_options: EncodeOptions = EncodeOptions(),
    *,
    normalize: bool = True,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Embed `texts` -> float32 `[len(texts), dim]` with side `role`'s prompt and max length, the batch size and
    precision of `encode_options` ("fp32" or "bf16", see `TextEncoder.encode`), in chunks of `chunk_size` texts.

    With `encode_options.cache_dir`: returns a read-only memory map of `<cache_dir>/<key>.npy`, encoding it
    first unless it exists. Under a multi-process `accelerate launch`, every process must call this with the
    same texts; each encodes its shard and all return the whole array.
    """
    texts = list(texts)
    options = encode_options.resolved(encoder)
    max_length = options.max_length(role, encoder)
    prefix = encoder.resolve_prompt(None, options.prompt_name(role, encoder))
    path = None
    if options.cache_dir is not None and texts:
        key = cache_key(encoder, texts, prefix, max_length, normalize, options.precision)
        path = Path(options.cache_dir) / f"{key}.npy"
        if path.exists():
            try:
                cached = np.load(path, mmap_mode="r")
                if cached.shape == (len(texts), encoder.dim):
                    logger.info("reusing cached embeddings %s", path)
                    return cached
            except (ValueError, OSError):  # a truncated or damaged cache file: encode again
                pass
            logger.warning("the cached embeddings %s are damaged; encoding again", path)
    per_chunk = dataclasses.replace(options, show_progress_bar=False)  # the chunks have the progress bar

    def compute(start: int, stop: int) -> np.ndarray:
        return per_chunk.encode(encoder, texts[start:stop], role, normalize)

    return computed_rows((len(texts), encoder.dim), compute, path, chunk_size, options.show_progress_bar, "encode")


def computed_rows(
    shape: tuple[int, ...],
    compute: Callable[[int, int], np.ndarray],
    path: Path | None = None,
    chunk_size: int = 1024,
    show_progress_bar: bool = False,
    desc: str = "compute",
) -> np.ndarray:
    """A float32 array of `shape` whose rows `start:stop` are `compute(start, stop)`, `chunk_size` rows at a time.

    With `path`, the rows go into a `.npy` memory map that is renamed to `path` once complete (a cache entry
    is never half-written) and returned read-only. Under a multi-process `accelerate launch` every process
    must call this with the same arguments; each computes its own contiguous rows into one shared file and
    all return the whole array.
    """
    state = distributed_state()
    if (state is None and path is None) or not shape[0]:
        out = np.empty(shape, dtype=np.float32)
        fill(out, compute, range(0, shape[0], chunk_size), show_progress_bar, desc)
        return out
    processes, rank = (state.num_processes, state.process_index) if state else (1, 0)

    def barrier() -> None:
        if state is not None:
            state.wait_for_everyone()

    temporary = path is None
    parent = Path(tempfile.gettempdir()) if temporary else path.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = [tempfile.mkdtemp(prefix="textcl-", dir=parent) if rank == 0 else None]
    if state is not None:
        from accelerate.utils import broadcast_object_list  # only under a multi-process launch

        broadcast_object_list(work, from_process=0)
    partial = Path(work[0]) / "rows.npy"
    if rank == 0:
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape).flush()
    barrier()
    out = np.lib.format.open_memmap(partial, mode="r+")
    lo, hi = rank * shape[0] // processes, (rank + 1) * shape[0] // processes
    fill(out, compute, range(lo, hi, chunk_size), show_progress_bar and rank == 0, desc)
    out.flush()
    del out
    barrier()
    if temporary:
        result = np.load(partial)
    else:
        if rank == 0:
            with partial.open("rb+") as handle:  # on disk before the rename publishes it in the cache
                os.fsync(handle.fileno())
            os.replace(partial, path)
        barrier()
        result = np.load(path, mmap_mode="r")
    barrier()
    if rank == 0:
        shutil.rmtree(work[0], ignore_errors=True)
    return result


def fill(out: np.ndarray, compute: Callable[[int, int], np.ndarray], starts: range, progress: bool, desc: str) -> None:
    """Rows `starts.start` to `starts.stop` of `out` from `compute`, `starts.step` rows at a time."""
    with tqdm(total=starts.stop - starts.start, desc=desc, unit="row", disable=not progress) as bar:
        for start in starts:
            stop = min(start + starts.step, starts.stop)
            out[start:stop] = compute(start, stop)
            bar.update(stop - start)
