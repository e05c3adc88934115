"""A search index whose adds and deletes survive a crash: a write-ahead log beside the index, and snapshots.

Every write is one JSON line appended to `serve-log.jsonl` in the index folder and flushed to disk
(`fdatasync`) before it is applied and acknowledged; an add carries its vectors, so replaying it needs no
model and gives the same index. The log's first line names the saved index it continues (a hash of
meta.json), so a log left beside a rebuilt index is refused instead of replayed onto it. Every `snapshot_every` writes, and when the server stops, the whole index is
saved (`SearchIndex.save`) into `.snapshot/` and moved over the folder's files; meta.json then records the
last write it holds (`serve_log_seq`) and the log starts again. A crash can stop this at any point:

- in the middle of a log line: the line was never acknowledged, and `open` cuts it off;
- while `.snapshot/` is written: it has no `COMPLETE` marker, so `open` deletes it (the folder and the log
  still hold everything);
- while its files are moved: `COMPLETE` is there, so `open` finishes the move;
- before the log starts again: replaying skips the lines the snapshot already holds (by `seq`).

Written by hand because no library on our dependency list logs FAISS writes; the design is the usual
write-ahead log of databases, kept as small as it can be.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from textcl.errors import TextclError
from textcl.io.atomic import fsync_dir
from textcl.model.text_encoder import TextEncoder
from textcl.retrieval.search_index import SearchIndex

LOG_NAME = "serve-log.jsonl"
SNAPSHOT_DIR = ".snapshot"
COMPLETE = "COMPLETE"
SEQ_KEY = "serve_log_seq"

logger = logging.getLogger(__name__)


class DuplicateIdError(TextclError):
    """An added id is already indexed, or repeated within the request (HTTP 409)."""


class UnknownIdError(TextclError):
    """No indexed document has this id (HTTP 404)."""


class NotRemovableError(TextclError):
    """The index type cannot remove documents (HTTP 409)."""


def encode_vectors(vectors: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vectors, dtype="<f4").tobytes()).decode("ascii")


def decode_vectors(text: str, rows: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(rows, -1).astype(np.float32)


def finish_snapshot(root: Path) -> None:
    """Complete a snapshot a crash interrupted while its files were moved, or drop one that was still being
    written (see the module docstring)."""
    snapshot = root / SNAPSHOT_DIR
    if not snapshot.is_dir():
        return
    if (snapshot / COMPLETE).is_file():
        for path in snapshot.iterdir():
            if path.name != COMPLETE:
                os.replace(path, root / path.name)
        fsync_dir(root)
    shutil.rmtree(snapshot)
    fsync_dir(root)


def read_log(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete records of the log and the byte length they fill. A last line without its newline or
    that does not parse was cut by a crash before it was acknowledged; a bad line before the last is an error."""
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    records, good = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1] is what follows the last newline
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines) - 1 and not lines[-1]:
                break  # the last line: torn, unacknowledged
            raise TextclError(f"{path}:{number}: not a log record; the write log is damaged") from None
        good += len(line) + 1
    return records, good


def log_header(root: Path) -> dict[str, str]:
    """The first line of a log: which saved index (meta.json, which changes with every save) it continues."""
    return {"op": "begin", "meta_sha256": hashlib.sha256((root / "meta.json").read_bytes()).hexdigest()}


def load_index(
    root: Path, encoder: TextEncoder | None, device: str | torch.device | None, backend: str | None = None,
    onnx_file: str | None = None,
) -> SearchIndex:
    """`SearchIndex.load`, with a damaged folder reported as one line."""
    try:
        return SearchIndex.load(root, encoder, device=device, backend=backend, onnx_file=onnx_file)
    except TextclError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TextclError(f"{str(root)!r} is not a readable search index ({reason}); rebuild it with "
                          "`textcl index`") from error


@dataclass
class DurableIndex:
    """A `SearchIndex` (`index`) saved in folder `root` plus the log of writes since; see the module docstring.
    Not thread-safe: the server calls it from one thread."""

    index: SearchIndex
    root: Path
    log: BinaryIO
    seq: int
    snapshot_every: int = 1000
    writes_since_snapshot: int = 0
    known_ids: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def open(
        cls, root: str | Path, encoder: TextEncoder | None = None, device: str | torch.device | None = None,
        snapshot_every: int = 1000, backend: str | None = None, onnx_file: str | None = None,
    ) -> DurableIndex:
        """Load the index in `root` (finishing an interrupted snapshot) and replay its log; without `encoder`,
        the index's model is loaded as `SearchIndex.load` does (`device`, `backend`, `onnx_file`)."""
        root = Path(root)
        finish_snapshot(root)
        index = load_index(root, encoder, device, backend, onnx_file)
        seq = int(index.meta.get(SEQ_KEY, 0))
        path = root / LOG_NAME
        records, good = read_log(path)
        if records and records[0] != log_header(root):
            if records[0].get("op") != "begin" or any(record["seq"] > seq for record in records[1:]):
                raise TextclError(f"{path} holds writes to another version of this index (was it rebuilt?); "
                                  "move the log away to serve the index as saved")
            records, good = [], 0  # a crash came after a snapshot and before the log restarted: all is in the index
        for record in records[1:]:
            if record["seq"] > seq:
                apply(index, record)
                seq = record["seq"]
        try:
            log = path.open("ab")
        except OSError as error:
            raise TextclError(f"cannot write the log of {str(root)!r} ({error.strerror}); serve a copy in a "
                              "folder you can write to") from error
        self = cls(index, root, log, seq, snapshot_every, max(len(records) - 1, 0), set(index.ids.tolist()))
        if good:
            log.truncate(good)
            log.seek(good)
        else:
            self.restart_log()
        return self

    def check_new(self, ids: list[str]) -> None:
        """Raise `DuplicateIdError` when an id is indexed already or given twice."""
        seen = set()
        for key in ids:
            if key in self.known_ids or key in seen:
                where = "is indexed already" if key in self.known_ids else "appears twice in the request"
                raise DuplicateIdError(f"document id {key!r} {where}; ids must be unique")
            seen.add(key)

    def add(self, ids: list[str], texts: list[str], vectors: np.ndarray) -> None:
        """Log, then index, documents with their vectors `[n, dim]`; durable when this returns."""
        self.check_new(ids)
        self.write({"op": "add", "ids": ids, "texts": texts, "vectors": encode_vectors(vectors)})
        self.index.add_vectors(ids, texts, vectors)
        self.known_ids.update(ids)
        self.after_write()

    def remove(self, doc_id: str) -> None:
        """Log, then apply, the removal of one document; durable when this returns."""
        if doc_id not in self.known_ids:
            raise UnknownIdError(f"no document has the id {doc_id!r}")
        if not self.index.removable:
            raise NotRemovableError(f"a {self.index.meta['factory']} index cannot remove documents; "
                                    "serve a Flat, SQ or PQ index to delete")
        self.write({"op": "delete", "ids": [doc_id]})
        self.index.remove([doc_id])
        self.known_ids.discard(doc_id)
        self.after_write()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to disk; on failure the log is cut back, so nothing half-written stays."""
        line = json.dumps({"seq": self.seq + 1, **record}, ensure_ascii=False).encode("utf-8") + b"\n"
        start = self.log.tell()
        try:
            self.log.write(line)
            self.log.flush()
            os.fdatasync(self.log.fileno())
        except OSError:
            self.log.truncate(start)
            raise
        self.seq += 1

    def after_write(self) -> None:
        self.writes_since_snapshot += 1
        if self.writes_since_snapshot >= self.snapshot_every:
            try:
                self.snapshot()
            except OSError as error:  # the log still holds every write; the next write tries again
                logger.warning("snapshot of %s failed (%s); the write log keeps growing", self.root, error)

    def snapshot(self) -> None:
        """Save the whole index over the folder's files (atomically, see the module docstring); restart the log."""
        snapshot = self.root / SNAPSHOT_DIR
        if snapshot.exists():
            shutil.rmtree(snapshot)
        self.index.meta[SEQ_KEY] = self.seq
        self.index.save(snapshot)
        for path in snapshot.iterdir():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        (snapshot / COMPLETE).touch()
        fsync_dir(snapshot)
        finish_snapshot(self.root)
        self.restart_log()
        self.writes_since_snapshot = 0

    def restart_log(self) -> None:
        """Empty the log but for its header naming the index as saved now."""
        self.log.truncate(0)
        self.log.seek(0)
        self.log.write(json.dumps(log_header(self.root)).encode("utf-8") + b"\n")
        self.log.flush()
        os.fsync(self.log.fileno())
        fsync_dir(self.root)

    def close(self) -> None:
        """Snapshot when anything was written since the last one, and close the log."""
        if self.writes_since_snapshot:
            self.snapshot()
        self.log.close()


def apply(index: SearchIndex, record: dict[str, Any]) -> None:
    """Replay one log record onto `index`."""
    if record["op"] == "add":
        index.add_vectors(record["ids"], record["texts"], decode_vectors(record["vectors"], len(record["ids"])))
    elif record["op"] == "delete":
        index.remove(record["ids"])
    else:
        raise TextclError(f"unknown log record {record['op']!r}")
