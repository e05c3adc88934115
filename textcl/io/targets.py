"""Where a command writes a model or index folder: a folder that already holds one is replaced only when asked
(`--overwrite`), and every command says so in the same words (`refusal`).

The check runs before the slow work; the replacement itself is atomic (`write_model_folder`: a temporary sibling
swapped in), so the old model stays whole until the new one is complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

from textcl.errors import TextclError
from textcl.io.atomic import exclusive_lock, write_folder

MODEL_MARKERS = ("config.json", "modules.json", "adapter_config.json")
SERVER_LOCK = ".serve.lock"  # in an index folder: flock-held by the `textcl serve` of it, holds its PID


def refusal(path: Path, holds: str, option: str = "--overwrite") -> TextclError:
    """The one line every writing command gives for an existing target: `'out' already holds a model; pass
    --overwrite to replace it`."""
    return TextclError(f"{str(path)!r} already holds {holds}; pass {option} to replace it")


def is_model_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in MODEL_MARKERS)


def check_model_target(path: str | Path, overwrite: bool) -> None:
    """Refuse (before slow work) to write a model into a folder that holds one unless `overwrite`, and into a
    folder holding anything else (or a file) ever."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TextclError(f"{str(path)!r} is a file; choose a folder for the model")
    if path.is_dir() and any(path.iterdir()):
        if not is_model_folder(path):
            raise TextclError(f"{str(path)!r} exists and is not a model folder; choose a new folder")
        if not overwrite:
            raise refusal(path, "a model")


def write_model_folder(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(folder)` into a temporary sibling of `path` that then replaces it in one rename, under its lock."""
    path = Path(path)
    with exclusive_lock(path, what="the model folder"):
        write_folder(path, write, "the model")


def serving_process(folder: Path) -> str | None:
    """The PID of the live `textcl serve` holding index folder `folder` (its `.serve.lock`), or None."""
    path = Path(folder) / SERVER_LOCK
    if fcntl is None or not path.is_file():
        return None
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.pread(descriptor, 32, 0).decode("ascii", "replace").strip() or "unknown"
    finally:
        os.close(descriptor)  # releases a shared lock taken here
