"""Where `textcl export` puts its files, and the digest of the weights a graph was exported from.

Kept apart from the exporter (which needs the torch Encoder) so that the ONNX backend can read it alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

ONNX_DIR = "onnx"
MODEL_FILE = "model.onnx"
INT8_FILE = "model_qint8.onnx"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


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
