"""The search index folder on disk: written atomically under a lock, read as one consistent, verified whole.

Writing (`save_index_folder`): the three files (plus a rescoring quantized index's float_embeddings.npy and a
hybrid index's BM25 files, `bm25_*`) go into a temporary sibling folder that replaces the old one in
one rename (`textcl.io.atomic.write_folder`), so a kill, a full disk or a second writer never leaves a torn
index and the previous index stays readable until the new one is complete. One writer at a time holds the
folder's lock; an existing index is replaced only with `overwrite`, and a folder that is not an index never.
meta.json records the size of the other two files and the model path relative to the index folder.

Reading (`read_index_folder`): the three files are opened through one handle on the folder, so a concurrent
save cannot mix an old meta.json with new vectors; a truncated or tampered file is one line that names it
and says to rebuild the index.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import faiss
import numpy as np

from textcl.errors import TextclError
from textcl.io.atomic import exclusive_lock, write_folder
from textcl.io.targets import refusal, serving_process
from textcl.retrieval.lexical import LEXICAL_FILES, LexicalIndex
from textcl.retrieval.quantization import FLOAT_FILE

INDEX_FILES = ("index.faiss", "ids.jsonl", "meta.json")
REQUIRED_META = ("model", "dim", "normalize", "query_prompt_name", "max_seq_length", "query_max_length")
REBUILD = "rebuild the index with `textcl index`"
LOCK_WAIT = 60.0  # seconds a save waits for another writer of the same folder (saves take seconds)


def is_index_folder(path: Path) -> bool:
    return any((path / name).exists() for name in INDEX_FILES)


def check_index_target(path: Path, overwrite: bool) -> None:
    """Refuse (before slow work) to write over an existing index without `overwrite`, or over anything that is
    not an index folder at all."""
    if path.exists() and not path.is_dir():
        raise TextclError(f"{str(path)!r} is a file; choose a folder for the search index")
    if path.is_dir() and any(path.iterdir()):
        if not is_index_folder(path):
            raise TextclError(f"{str(path)!r} exists and is not a search index folder; choose a new folder")
        if not overwrite:
            raise refusal(path, "a search index")
        if (server := serving_process(path)) is not None:  # its next snapshot would write over the new index
            raise TextclError(f"{str(path)!r} is served by process {server}; stop that server before replacing "
                              "the index")


def portable_model_path(model: str, root: Path) -> str:
    """The model as meta.json records it: a local folder relative to the index folder (both can move together),
    an absolute path or a Hub id as given."""
    path = Path(model)
    if path.is_absolute() or not path.exists():
        return model
    return os.path.relpath(path.absolute(), root.absolute())


def model_location(model: str, root: Path) -> str:
    """Where the model named in meta.json is: a relative path is relative to the index folder; a Hub id (or a
    path relative to the working directory, as indexes saved before textcl 0.2 recorded it) as written."""
    path = Path(model)
    if not path.is_absolute() and (root / path).exists():
        return str(root / path)
    return model


def write_index_files(root: Path, index: faiss.Index | faiss.IndexBinary, ids: Sequence[str], texts: Sequence[str],
                      meta: dict[str, Any], float_vectors: np.ndarray | None = None,
                      lexical: LexicalIndex | None = None) -> None:
    """index.faiss, ids.jsonl, float_embeddings.npy (`float_vectors` `[n, dim]`, when given), the BM25 files (with
    `lexical`), then meta.json (with the other files' sizes) into folder `root`."""
    if isinstance(index, faiss.IndexBinary):
        faiss.write_index_binary(index, str(root / "index.faiss"))
    else:
        faiss.write_index(index, str(root / "index.faiss"))
    with (root / "ids.jsonl").open("w", encoding="utf-8") as handle:
        for key, text in zip(ids, texts):
            handle.write(json.dumps({"id": key, "text": text}, ensure_ascii=False) + "\n")
    names = ["index.faiss", "ids.jsonl"]
    if float_vectors is not None:
        np.save(root / FLOAT_FILE, np.asarray(float_vectors, dtype=np.float32))
        names.append(FLOAT_FILE)
    if lexical is not None:
        names.extend(lexical.save(root))
    files = {name: (root / name).stat().st_size for name in names}
    (root / "meta.json").write_text(json.dumps(meta | {"count": len(ids), "files": files}, indent=2) + "\n")


def save_index_folder(path: Path, index: faiss.Index | faiss.IndexBinary, ids: Sequence[str], texts: Sequence[str],
                      meta: dict[str, Any], overwrite: bool, float_vectors: np.ndarray | None = None,
                      lexical: LexicalIndex | None = None) -> None:
    """Write the index folder `path` atomically, holding its lock (see the module docstring)."""
    meta = meta | {"model": portable_model_path(str(meta["model"]), path)}
    floats = 0 if float_vectors is None else float_vectors.size * 4
    text_bytes = sum(len(text.encode()) + len(key) + 24 for key, text in zip(ids, texts))
    needed = index.ntotal * index.d * 4 + floats + text_bytes * (2 if lexical is not None else 1)  # BM25: < the text
    def write(root: Path) -> None:
        write_index_files(root, index, ids, texts, meta, float_vectors, lexical)
        keep_other_files(path, root)

    with exclusive_lock(path, wait=LOCK_WAIT, what="the search index"):
        check_index_target(path, overwrite)
        write_folder(path, write, "the search index", needed)


def keep_other_files(old: Path, new: Path) -> None:
    """Carry what else the old folder holds (e.g. `textcl serve`'s write log, which then refuses to replay onto
    the rebuilt index instead of vanishing with the old folder) into the new one: hard links, copies where
    links fail. The index's own files, and hidden entries (locks, temporaries), are not carried."""
    if not old.is_dir():
        return
    own = {*INDEX_FILES, FLOAT_FILE, *LEXICAL_FILES}
    for item in old.iterdir():
        if item.name in own or item.name.startswith(".") or not item.is_file():
            continue
        try:
            os.link(item, new / item.name)
        except OSError:
            shutil.copy2(item, new / item.name)


def open_snapshot(root: Path) -> dict[str, IO[bytes]]:
    """The three index files opened through one handle on the folder: all from the same save, even if another
    writer swaps the folder meanwhile (retried when the swap removed the old folder between two opens)."""
    if os.open not in os.supports_dir_fd:
        return {name: (root / name).open("rb") for name in INDEX_FILES}
    for attempt in range(3):
        folder = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        handles: dict[str, IO[bytes]] = {}
        try:
            for name in INDEX_FILES:
                handles[name] = os.fdopen(os.open(name, os.O_RDONLY, dir_fd=folder), "rb")
            return handles
        except FileNotFoundError:
            for handle in handles.values():
                handle.close()
            if attempt == 2:
                raise
        finally:
            os.close(folder)
    raise AssertionError("unreachable")


def read_meta(handle: IO[bytes], path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(handle.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise TextclError(f"{path} is not JSON ({str(error).splitlines()[0]}); {REBUILD}") from None
    if not isinstance(meta, dict):
        raise TextclError(f"{path} is not a JSON object; {REBUILD}")
    for key in REQUIRED_META:
        if key not in meta:
            raise TextclError(f"{path} has no {key!r}; {REBUILD}")
    if not isinstance(meta["dim"], int) or isinstance(meta["dim"], bool):
        raise TextclError(f"{path}: 'dim' is {meta['dim']!r}, not a number; {REBUILD}")
    return meta


def check_size(handle: IO[bytes], path: Path, meta: dict[str, Any]) -> None:
    """The file is as large as meta.json recorded (folders saved before sizes were recorded are not checked)."""
    recorded = (meta.get("files") or {}).get(path.name)
    actual = os.fstat(handle.fileno()).st_size
    if isinstance(recorded, int) and actual != recorded:
        raise TextclError(f"{path} is truncated or damaged ({actual:,} bytes; meta.json records {recorded:,}); "
                          f"{REBUILD}")


def read_faiss(handle: IO[bytes], path: Path, binary: bool) -> faiss.Index | faiss.IndexBinary:
    read = faiss.read_index_binary if binary else faiss.read_index
    try:
        return read(faiss.PyCallbackIOReader(handle.read))
    except (RuntimeError, MemoryError) as error:
        reason = str(error).strip().splitlines()[-1][:160] if str(error).strip() else type(error).__name__
        raise TextclError(f"{path} is truncated or damaged (faiss: {reason}); {REBUILD}") from None


def read_ids(handle: IO[bytes], path: Path) -> tuple[list[str], list[str]]:
    ids, texts = [], []
    for number, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            record = None
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("text"), str):
            raise TextclError(f"{path} line {number} is not a JSON record with an id and a text; {REBUILD}")
        ids.append(str(record["id"]))
        texts.append(record["text"])
    return ids, texts


def read_index_folder(
    root: Path,
) -> tuple[faiss.Index | faiss.IndexBinary, dict[str, Any], list[str], list[str], np.ndarray | None]:
    """(faiss index, meta, ids, texts, float vectors `[n, dim]` memory-mapped or None) of an index folder,
    verified; every problem is one line naming the file."""
    missing = [name for name in INDEX_FILES if not (root / name).is_file()]
    if missing:
        raise TextclError(f"{str(root)!r} is not a search index folder (missing {', '.join(missing)})")
    handles = open_snapshot(root)
    try:
        meta = read_meta(handles["meta.json"], root / "meta.json")
        check_size(handles["index.faiss"], root / "index.faiss", meta)
        index = read_faiss(handles["index.faiss"], root / "index.faiss", meta.get("quantize") == "binary")
        ids, texts = read_ids(handles["ids.jsonl"], root / "ids.jsonl")  # a bad line is named before the size
        check_size(handles["ids.jsonl"], root / "ids.jsonl", meta)
    finally:
        for handle in handles.values():
            handle.close()
    if index.d != meta["dim"]:
        raise TextclError(f"{root / 'meta.json'} says {meta['dim']} dimensions but index.faiss holds "
                          f"{index.d}-dimensional vectors; {REBUILD}")
    if len(ids) != index.ntotal or meta.get("count", index.ntotal) != index.ntotal:
        raise TextclError(f"{root / 'ids.jsonl'} has {len(ids)} rows but index.faiss holds {index.ntotal} vectors; "
                          f"{REBUILD}")
    if "lexical" in meta:
        check_lexical_files(root, meta)
    return index, meta, ids, texts, read_float_vectors(root, meta, len(ids))


def check_lexical_files(root: Path, meta: dict[str, Any]) -> None:
    """A hybrid index's BM25 files are there, each of the size meta.json records."""
    for name in LEXICAL_FILES:
        path = root / name
        if not path.is_file():
            raise TextclError(f"{str(root)!r} is a hybrid index without its BM25 file {name}; rebuild the index "
                              "with `textcl index --hybrid`")
        with path.open("rb") as handle:
            check_size(handle, path, meta)


def read_float_vectors(root: Path, meta: dict[str, Any], rows: int) -> np.ndarray | None:
    """float_embeddings.npy `[rows, dim]` as a read-only memory map (rescoring reads only its candidates' rows),
    or None when the index keeps no float vectors."""
    path = root / FLOAT_FILE
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        check_size(handle, path, meta)
    try:
        vectors = np.load(path, mmap_mode="r")
    except ValueError as error:
        raise TextclError(f"{path} is truncated or damaged ({error}); {REBUILD}") from None
    if vectors.shape != (rows, meta["dim"]):
        raise TextclError(f"{path} holds {vectors.shape} vectors for {rows} documents of {meta['dim']} dimensions; "
                          f"{REBUILD}")
    return vectors


def check_queries(queries: Sequence[Any]) -> None:
    """Every query is non-blank text (an empty one would rank documents by nothing)."""
    for number, query in enumerate(queries, start=1):
        if not isinstance(query, str):
            raise TextclError(f"query {number} of {len(queries)} is a {type(query).__name__}, not text")
        if not query.strip():
            raise TextclError(f"query {number} of {len(queries)} is empty; pass text to search for")


def check_finite(vectors: np.ndarray, what: str, ids: Sequence[str] | None = None) -> None:
    """Refuse NaN or infinite embeddings `[n, dim]` (a model whose weights went NaN): they would find nothing."""
    bad = ~np.isfinite(vectors).all(axis=1)
    if bad.any():
        first = f" (the first: {ids[int(bad.argmax())]!r})" if ids is not None else ""
        raise TextclError(f"the model gives non-finite embeddings (NaN or inf) for {int(bad.sum())} of {len(bad)} "
                          f"{what}{first}; its weights are damaged: retrain it or pick another model")
