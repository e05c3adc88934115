"""A search index whose adds and deletes survive a crash: a write-ahead log beside the index, and snapshots.

Every write is one JSON line appended to `serve-log.jsonl` in the index folder with `os.write` on an
unbuffered descriptor and flushed to disk (`fdatasync`) before it is applied and acknowledged. A write that
fails (a full disk) is cut off the log again and never applied, so no byte of it can reach the log later under
another write's number; the caller gets `LogWriteError`, reads go on, and writes work again once there is space. an add carries its vectors, so replaying it needs no
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
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a second server on one folder is not refused
    fcntl = None  # type: ignore[assignment]

import numpy as np
import torch

from textcl.errors import TextclError
from textcl.io.atomic import SPACE_ERRNOS, fsync_dir, write_text_atomically
from textcl.io.targets import SERVER_LOCK
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


class LogWriteError(TextclError):
    """The write log could not be written; the write was not applied (HTTP 503)."""


class OutOfSpaceError(LogWriteError):
    """The write log's disk is full; the write was not applied (HTTP 507)."""


def hold_server_lock(root: Path) -> int | None:
    """Take the folder's server lock (a `flock` on `.serve.lock`, released when the process ends however it ends)
    and write this PID into it; a folder another live server holds is refused with one line naming its PID.
    Returns the descriptor to keep open while serving."""
    if fcntl is None:
        return None
    path = root / SERVER_LOCK
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise TextclError(f"cannot write the lock of {str(root)!r} ({error.strerror}); serve a copy in a "
                          "folder you can write to") from error
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(descriptor)
        raise TextclError(f"{str(root)!r} is already served by process {holder}; stop that server, or serve a "
                          "copy of the folder") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode("ascii"), 0)
    return descriptor


def encode_vectors(vectors: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vectors, dtype="<f4").tobytes()).decode("ascii")


def decode_vectors(text: str, rows: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(rows, -1).astype(np.float32)


def finish_snapshot(root: Path) -> None:
    """Complete a snapshot a crash interrupted while its files were moved, or drop one that was still being
    written (see the module docstring), with what a killed `SearchIndex.save` left (its temporary folder and
    lock). Called only by the holder of the server lock, so no save of this folder is running."""
    for stray in root.glob(f".{SNAPSHOT_DIR}.tmp-*"):  # a save killed before its rename: never part of the index
        shutil.rmtree(stray, ignore_errors=True)
    snapshot = root / SNAPSHOT_DIR
    if not snapshot.is_dir():
        drop_save_lock(root)
        return
    if (snapshot / COMPLETE).is_file():
        for path in snapshot.iterdir():
            if path.name != COMPLETE:
                os.replace(path, root / path.name)
        fsync_dir(root)
    shutil.rmtree(snapshot)
    drop_save_lock(root)
    fsync_dir(root)


def drop_save_lock(root: Path) -> None:
    """Delete the lock file `SearchIndex.save` leaves beside `.snapshot/`: the server lock already keeps every
    other writer out of the folder, so nothing races for it, and the folder stays as `textcl index` wrote it."""
    (root / f".{SNAPSHOT_DIR}.lock").unlink(missing_ok=True)


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
    log: int  # an unbuffered descriptor opened O_APPEND: nothing of a failed write lingers in a buffer
    lock: int | None  # the server lock's descriptor (`hold_server_lock`)
    seq: int
    snapshot_every: int = 1000
    writes_since_snapshot: int = 0
    known_ids: set[str] = field(default_factory=set, repr=False)
    broken: str = ""  # why writes are refused until a restart ("": they are not)

    @classmethod
    def open(
        cls, root: str | Path, encoder: TextEncoder | None = None, device: str | torch.device | None = None,
        snapshot_every: int = 1000, backend: str | None = None, onnx_file: str | None = None,
    ) -> DurableIndex:
        """Load the index in `root` (finishing an interrupted snapshot) and replay its log; without `encoder`,
        the index's model is loaded as `SearchIndex.load` does (`device`, `backend`, `onnx_file`)."""
        root = Path(root)
        lock = hold_server_lock(root) if root.is_dir() else None
        try:
            return cls.replay(root, lock, encoder, device, snapshot_every, backend, onnx_file)
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise

    @classmethod
    def replay(
        cls, root: Path, lock: int | None, encoder: TextEncoder | None, device: str | torch.device | None,
        snapshot_every: int, backend: str | None, onnx_file: str | None,
    ) -> DurableIndex:
        """`open` once the server lock is held: finish a snapshot, load the index, replay the log."""
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
            if not good:
                restart_log(root)
            log = os.open(path, os.O_WRONLY | os.O_APPEND)
            if good:
                os.ftruncate(log, good)  # a torn last line goes
        except OSError as error:
            raise TextclError(f"cannot write the log of {str(root)!r} ({error.strerror}); serve a copy in a "
                              "folder you can write to") from error
        return cls(index, root, log, lock, seq, snapshot_every, max(len(records) - 1, 0), set(index.ids.tolist()))

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
        self.check_writable()
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
        self.check_writable()
        self.write({"op": "delete", "ids": [doc_id]})
        self.index.remove([doc_id])
        self.known_ids.discard(doc_id)
        self.after_write()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it to disk. On failure the log is cut back to where it ended, so no byte
        of the record stays (nor reaches the log later: there is no buffer), and `LogWriteError` is raised."""
        line = json.dumps({"seq": self.seq + 1, **record}, ensure_ascii=False).encode("utf-8") + b"\n"
        start = os.fstat(self.log).st_size
        try:
            view = memoryview(line)
            while view:  # a write may be short when the disk fills mid-record; the next one raises ENOSPC
                view = view[os.write(self.log, view):]
            os.fdatasync(self.log)
        except OSError as error:
            self.cut_back(start, error)
            full = error.errno in SPACE_ERRNOS
            kind = OutOfSpaceError if full else LogWriteError
            raise kind(f"the write was not applied: the write log of the index could not be written "
                       f"({error.strerror or error}); {'free some space' if full else 'check the disk'} and "
                       "send it again") from error
        self.seq += 1

    def cut_back(self, size: int, error: OSError) -> None:
        """Cut the log back to `size` bytes after a failed write. Should even that fail, no write is taken
        until a restart (whose replay cuts a torn last line), so a failed record never precedes a taken one."""
        try:
            os.ftruncate(self.log, size)
            os.fdatasync(self.log)
        except OSError as again:
            self.broken = f"the write log could not be cut back after a failed write ({again.strerror})"
            logger.error("textcl serve: %s; restart the server to take writes again", self.broken)

    def check_writable(self) -> None:
        if self.broken:
            raise LogWriteError(f"{self.broken}; restart the server to take writes again")

    def after_write(self) -> None:
        self.writes_since_snapshot += 1
        if self.writes_since_snapshot >= self.snapshot_every:
            self.try_snapshot("the write log keeps growing")

    def try_snapshot(self, meanwhile: str) -> None:
        """Snapshot; a failure (a full disk) is one logged line, since the log still holds every write."""
        try:
            self.snapshot()
        except (OSError, TextclError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            logger.warning("textcl serve: the snapshot of %s failed (%s); %s", self.root, reason, meanwhile)

    def snapshot(self) -> None:
        """Save the whole index over the folder's files (atomically, see the module docstring); restart the log."""
        snapshot = self.root / SNAPSHOT_DIR
        if snapshot.exists():
            shutil.rmtree(snapshot)
        self.index.meta[SEQ_KEY] = self.seq
        try:
            self.index.save(snapshot)
        finally:
            drop_save_lock(self.root)
        for path in snapshot.iterdir():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        (snapshot / COMPLETE).touch()
        fsync_dir(snapshot)
        finish_snapshot(self.root)
        restart_log(self.root)
        os.close(self.log)
        self.log = os.open(self.root / LOG_NAME, os.O_WRONLY | os.O_APPEND)
        self.writes_since_snapshot = 0

    def close(self) -> None:
        """Snapshot when anything was written since the last one (a failure leaves the log to replay), close the
        log and release the folder."""
        if self.writes_since_snapshot:
            self.try_snapshot("the write log holds every write and is replayed at the next start")
        os.close(self.log)
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def restart_log(root: Path) -> None:
    """Replace the log (atomically: a failure leaves the old one) by its header naming the index as saved now."""
    write_text_atomically(root / LOG_NAME, json.dumps(log_header(root)) + "\n")
    fsync_dir(root)


def apply(index: SearchIndex, record: dict[str, Any]) -> None:
    """Replay one log record onto `index`."""
    if record["op"] == "add":
        index.add_vectors(record["ids"], record["texts"], decode_vectors(record["vectors"], len(record["ids"])))
    elif record["op"] == "delete":
        index.remove(record["ids"])
    else:
        raise TextclError(f"unknown log record {record['op']!r}")
