"""Where `textcl export` puts its files, the digest of the weights a graph was exported from, and each graph's own
digest (`onnx/model.onnx.sha256`, in `sha256sum`'s format, so `sha256sum -c` checks it too).

Kept apart from the exporter (which needs the torch Encoder) so that the ONNX backend can read it alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from textcl.errors import TextclError

ONNX_DIR = "onnx"
MODEL_FILE = "model.onnx"
INT8_FILE = "model_qint8.onnx"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
DIGEST_SUFFIX = ".sha256"


def weight_files(root: Path) -> list[Path]:
    """The files that decide the graph: weights, config.json and modules.json at the root, and every file of the
    module folders modules.json names (1_Pooling/, 2_Dense/, ...). The tokenizer is not among them: it runs
    outside the graph and is read from the folder at load."""
    folders = [root]
    if (root / "modules.json").is_file():
        folders += [root / m["path"] for m in json.loads((root / "modules.json").read_text()) if m.get("path")]
    files = []
    for folder in folders:
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            decides = folder != root or path.suffix in WEIGHT_SUFFIXES or path.name in ("config.json", "modules.json")
            if path.is_file() and decides:
                files.append(path)
    return files


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_file_digest(path: Path, folder: Path) -> None:
    """Write `folder/NAME.sha256` for the graph `path` (named NAME in `folder` once moved there), before the graph
    itself is moved in: a graph without a matching digest is never taken for a good one."""
    (folder / f"{path.name}{DIGEST_SUFFIX}").write_text(f"{file_digest(path)}  {path.name}\n", encoding="utf-8")


def check_file_digest(path: Path) -> None:
    """Refuse a graph whose bytes changed since it was exported (a flipped bit, a partial copy, an edit). Graphs
    exported before textcl wrote digests have none, and are read unchecked."""
    recorded_file = path.with_name(f"{path.name}{DIGEST_SUFFIX}")
    if not recorded_file.is_file():
        return
    recorded = recorded_file.read_text(encoding="utf-8").split()[0]
    if file_digest(path) != recorded:
        raise TextclError(f"{path} changed since it was exported (its sha256 no longer matches {recorded_file.name}); "
                          "export the model again (textcl export --overwrite)")


def weights_digest(root: Path) -> str | None:
    """sha256 over the names and bytes of `weight_files(root)`; None when the folder holds no weights (a folder
    shipped with only its ONNX files, which nothing can make stale)."""
    files = weight_files(root)
    if not any(path.suffix in WEIGHT_SUFFIXES for path in files):
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()
