"""Corpus-scale encoding with an on-disk embedding cache, shared by evaluation, mining and search.

`encode_corpus` turns texts into float32 embeddings `[n, dim]` chunk by chunk. With a `cache_dir`, the
array is written to a memory-mapped `.npy` named by a hash of the model weights, texts, prompt, max length,
normalization and precision, so a corpus larger than memory never sits in RAM and a second run reuses it.
Under `accelerate launch` each process encodes a contiguous shard into the same file.
"""

from __future__ import annotations

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

from textcl.model.encoder import ENCODE_BATCH_SIZE, Encoder
from textcl.model.onnx_backend import OnnxEncoder

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """Where the CLI caches embeddings: $TEXTCL_CACHE_DIR, else $XDG_CACHE_HOME/textcl/embeddings (~/.cache)."""
    if os.environ.get("TEXTCL_CACHE_DIR"):
        return Path(os.environ["TEXTCL_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "textcl" / "embeddings"


def default_prompt_name(encoder: Encoder, prompt_name: str | None, role: str) -> str | None:
    """`prompt_name` when given, else `role` ("query" or "document") if the model saved a prompt of that name."""
    if prompt_name is not None:
        return prompt_name
    return role if role in encoder.prompts else None


def hash_weights(digest: Any, module: torch.nn.Module) -> None:
    """Feed every weight of `module` (names and bytes) into `digest`."""
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def model_fingerprint(encoder: Encoder | OnnxEncoder) -> str:
    """sha256 of every weight and of the settings that change embeddings (pooling, Dense activation, tokenizer);
    for the ONNX backend, of the graph file and the tokenizer (`OnnxEncoder.fingerprint`)."""
    if isinstance(encoder, OnnxEncoder):
        return encoder.fingerprint()
    digest = hashlib.sha256()
    hash_weights(digest, encoder)
    tokenizer = encoder.tokenizer
    settings = [encoder.pooling, encoder.dense_activation, type(tokenizer).__name__, len(tokenizer)]
    digest.update(json.dumps(settings + [getattr(tokenizer, "name_or_path", "")]).encode())
    return digest.hexdigest()


def cache_key(
    encoder: Encoder, texts: Sequence[str], prefix: str, max_length: int, normalize: bool, precision: str
) -> str:
    """Names the cached embeddings of `texts` under this model, prompt prefix, max length, normalization and
    precision (bf16 gives other embeddings than fp32)."""
    digest = hashlib.sha256()
    header = [CACHE_FORMAT, model_fingerprint(encoder), prefix, max_length, normalize, len(texts),
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
    encoder: Encoder,
    texts: Sequence[str],
    *,
    batch_size: int = ENCODE_BATCH_SIZE,
    prompt_name: str | None = None,
    max_seq_length: int | None = None,
    normalize: bool = True,
    precision: str = "fp32",
    cache_dir: str | Path | None = None,
    chunk_size: int = 1024,
    show_progress_bar: bool = False,
) -> np.ndarray:
    """Embed `texts` -> float32 `[len(texts), dim]`, in chunks of `chunk_size` texts, at `precision` ("fp32" or
    "bf16", see `Encoder.encode`).

    With `cache_dir`: returns a read-only memory map of `<cache_dir>/<key>.npy`, encoding it first unless
    it exists. Under a multi-process `accelerate launch`, every process must call this with the same
    texts; each encodes its shard and all return the whole array.
    """
    texts = list(texts)
    max_length = max_seq_length or encoder.max_seq_length
    prefix = encoder.resolve_prompt(None, prompt_name)
    path = None
    if cache_dir is not None and texts:
        path = Path(cache_dir) / f"{cache_key(encoder, texts, prefix, max_length, normalize, precision)}.npy"
        if path.exists():
            try:
                cached = np.load(path, mmap_mode="r")
                if cached.shape == (len(texts), encoder.dim):
                    logger.info("reusing cached embeddings %s", path)
                    return cached
            except (ValueError, OSError):  # a truncated or damaged cache file: encode again
                pass
            logger.warning("the cached embeddings %s are damaged; encoding again", path)

    def compute(start: int, stop: int) -> np.ndarray:
        return encoder.encode(texts[start:stop], batch_size=batch_size, prompt=prefix, normalize=normalize,
                              max_seq_length=max_length, precision=precision)

    return computed_rows((len(texts), encoder.dim), compute, path, chunk_size, show_progress_bar, "encode")


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
