"""Writing files so that a kill, a full disk or a second writer never leaves a damaged or half-written one.

- `write_folder(target, write)`: `write(folder)` fills a temporary sibling folder, its files are flushed to disk,
  and it takes `target`'s place in one rename, so readers see the old folder or the new one, never a mix.
- `write_text_atomically(path, text)`: the same for one file.
- `exclusive_lock(target)`: one writer at a time, an advisory `flock` on the hidden sibling `.NAME.lock` (holding
  the writer's process id), removed when the writer leaves.
- `space_error(...)`: a full disk as one line naming the path, the bytes needed and the bytes free.

Written by hand because the standard library has no atomic folder replacement and the packages that write
files atomically (atomicwrites, and the like) handle single files only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from textcl.errors import TextclError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; writes stay atomic, concurrent writers are not refused
    fcntl = None

# A full disk (ENOSPC), a full quota (EDQUOT) and a file-size limit (EFBIG) all mean "these bytes did not fit".
SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# How writers that wrap the OS error (torch's zip writer, safetensors' Rust writer) word the same failures.
SPACE_MESSAGES = ("no space left", "storagefull", "os error 28", "code: 28", "disk quota", "file too large",
                  "filetoolarge", "os error 27", "code: 27")
RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux 3.15+)
AT_FDCWD = -100


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or would hold it: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_out_of_space(error: BaseException) -> bool:
    """`error` (or an error it wraps) says the disk, a quota or a file-size limit is full."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in SPACE_ERRNOS:
            return True
        if any(text in str(seen).lower() for text in SPACE_MESSAGES):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def space_error(what: str, path: Path, needed: int, fix: str = "free some space or choose another folder") -> TextclError:
    """One line: what did not fit where, how many bytes it needs and how many are free, and `fix`."""
    return TextclError(f"no space left on device for {what} {str(path)!r}: it needs about {needed:,} bytes and "
                       f"{free_bytes(path):,} are free; {fix}")


def check_free_space(path: Path, needed: int, what: str, fix: str) -> None:
    """Refuse before slow work when the filesystem of `path` has fewer than `needed` bytes free."""
    if free_bytes(path) < needed:
        raise space_error(what, path, needed, fix)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it becomes durable)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk, so a rename that publishes it cannot outlive its data."""
    for folder, _, files in os.walk(root):
        for name in files:
            descriptor = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fsync_dir(Path(folder))


def exchange(first: Path, second: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a filesystem without RENAME_EXCHANGE
        return False
    raise OSError(code, os.strerror(code), str(second))


def swap_in(new: Path, target: Path) -> Path | None:
    """Put folder `new` at `target`. Returns where the replaced folder now is (delete it), or None.

    Atomic where renameat2 exists; elsewhere the old folder is renamed away first, so for a moment `target`
    is missing, but it never holds a mix of the two.
    """
    if not target.exists():
        os.rename(new, target)
        return None
    if exchange(new, target):
        return new
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    os.rename(new, target)
    return old


def temporary_sibling(target: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name next to `target`: `.NAME.tmp-<random>`."""
    return target.with_name(f".{target.name}.{kind}-{uuid.uuid4().hex[:8]}")


def remove_leftovers(target: Path) -> None:
    """Delete temporary siblings of `target` left by killed writers (call only while holding its lock)."""
    for kind in ("tmp", "old"):
        for stale in target.parent.glob(f".{target.name}.{kind}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def write_folder(target: Path, write: Callable[[Path], None], what: str, needed: int = 0) -> None:
    """Write a whole folder atomically: `write(temporary)` fills a temporary sibling, then it replaces `target`.

    A kill leaves `target` as it was (plus a hidden temporary sibling, removed by the next writer); a full
    disk becomes a `space_error` naming `what` and `needed` bytes, with nothing half-written left.
    The caller holds `exclusive_lock(target)`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(target)
    temporary = temporary_sibling(target)
    try:
        temporary.mkdir()
        write(temporary)
        fsync_tree(temporary)
        old = swap_in(temporary, target)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, Exception) and is_out_of_space(error):
            raise space_error(what, target, needed) from error
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace the file `path` with `text` in one rename (a kill leaves the old file or the new one)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


HELD: dict[tuple[str, int], int] = {}  # (lock file, thread) -> depth: a thread may re-enter a lock it holds


@contextmanager
def exclusive_lock(target: Path, wait: float = 0.0, what: str = "", lock_file: Path | None = None) -> Iterator[None]:
    """Hold the write lock of `target` (a file or folder that need not exist yet), waiting up to `wait` seconds.

    Another holder (another process, or another thread of this one) makes this a TextclError naming `target` and
    the holder's process id; the thread that holds it may enter again. The lock is `lock_file` (default: the hidden
    sibling `.NAME.lock`), holding the holder's process id, and removed when the holder leaves, however it leaves
    (a SIGKILL frees the `flock` but leaves the file: the next holder takes it over and removes it; a lock still
    held, by a process the dead holder forked, is stale when its recorded process is gone). Locks are advisory
    `flock`s, per host.
    """
    target = Path(target)
    lock_file = Path(lock_file) if lock_file else target.with_name(f".{target.name}.lock")
    key = (str(lock_file.absolute()), threading.get_ident())
    if fcntl is None or key in HELD:
        HELD[key] = HELD.get(key, 0) + 1
        try:
            yield
        finally:
            HELD[key] -= 1
            if not HELD[key]:
                del HELD[key]
        return
    descriptor = acquire(lock_file, time.monotonic() + wait, f"{what + ' ' if what else ''}{str(target)!r}")
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n".encode())
        HELD[key] = 1
        try:
            yield
        finally:
            del HELD[key]
            with contextlib.suppress(FileNotFoundError):
                lock_file.unlink()  # while still holding it: a waiter on this file sees it gone and opens a new one
    finally:
        os.close(descriptor)  # closing releases the lock


def acquire(lock_file: Path, deadline: float, what: str) -> int:
    """A descriptor of `lock_file` holding its `flock`, which is still the file at that path (the previous holder
    may have removed it meanwhile: then the new file is locked); a holder whose recorded process is gone is stale
    (its lock is kept by a process it forked) and its file is replaced."""
    while True:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = recorded_process(descriptor)
            os.close(descriptor)
            if holder is not None and not process_alive(holder):
                with contextlib.suppress(FileNotFoundError):
                    lock_file.unlink()
                continue
            if time.monotonic() >= deadline:
                by = f"process {holder} holds" if holder else "it holds"
                raise TextclError(f"another process is writing {what} ({by} {lock_file.name}); wait for it to finish "
                                  "or choose another folder") from None
            time.sleep(0.05)
            continue
        try:
            if os.fstat(descriptor).st_ino == os.stat(lock_file).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)


def recorded_process(descriptor: int) -> int | None:
    """The process id a lock file holds (None when empty or unreadable)."""
    try:
        return int(os.pread(descriptor, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
