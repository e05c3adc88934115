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
from collections.abc import Sequence
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


def model_fingerprint(encoder: Encoder | OnnxEncoder) -> str:
    """sha256 of every weight and of the settings that change embeddings (pooling, Dense activation, tokenizer);
    for the ONNX backend, of the graph file and the tokenizer (`OnnxEncoder.fingerprint`)."""
    if isinstance(encoder, OnnxEncoder):
        return encoder.fingerprint()
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
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
    state = distributed_state()
    options = dict(batch_size=batch_size, prefix=prefix, max_length=max_length, normalize=normalize,
                   precision=precision)
    if (state is None and path is None) or not texts:
        out = np.empty((len(texts), encoder.dim), dtype=np.float32)
        fill(encoder, texts, out, range(0, len(texts), chunk_size), show_progress_bar, **options)
        return out
    return encode_to_file(encoder, texts, path, state, chunk_size, show_progress_bar, options)


def fill(
    encoder: Encoder,
    texts: list[str],
    out: np.ndarray,
    starts: range,
    show_progress_bar: bool,
    batch_size: int,
    prefix: str,
    max_length: int,
    normalize: bool,
    precision: str,
) -> None:
    """Encode rows `starts.start` to `starts.stop` of `texts` into the same rows of `out`, `starts.step` at a time."""
    with tqdm(total=starts.stop - starts.start, desc="encode", unit="text", disable=not show_progress_bar) as bar:
        for start in starts:
            stop = min(start + starts.step, starts.stop)
            out[start:stop] = encoder.encode(
                texts[start:stop], batch_size=batch_size, prompt=prefix, normalize=normalize, max_seq_length=max_length,
                precision=precision,
            )
            bar.update(stop - start)


def encode_to_file(
    encoder: Encoder,
    texts: list[str],
    path: Path | None,
    state: Any,
    chunk_size: int,
    show_progress_bar: bool,
    options: dict[str, Any],
) -> np.ndarray:
    """Encode into a `.npy` memory map, each process its own contiguous rows; `path` None means a temporary file."""
    processes, rank = (state.num_processes, state.process_index) if state else (1, 0)

    def barrier() -> None:
        if state is not None:
            state.wait_for_everyone()

    temporary = path is None
    parent = Path(tempfile.gettempdir()) if temporary else path.parent
    parent.mkdir(parents=True, exist_ok=True)
    work = [tempfile.mkdtemp(prefix="textcl-", dir=parent) if rank == 0 else None]
    if state is not None:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(work, from_process=0)
    partial = Path(work[0]) / "embeddings.npy"
    if rank == 0:
        np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(len(texts), encoder.dim)).flush()
    barrier()
    out = np.lib.format.open_memmap(partial, mode="r+")
    lo, hi = rank * len(texts) // processes, (rank + 1) * len(texts) // processes
    fill(encoder, texts, out, range(lo, hi, chunk_size), show_progress_bar and rank == 0, **options)
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
