"""Which device a model runs on: one rule for the library and the CLI.

The default is the GPU when torch sees one (as `SentenceTransformer`); under `accelerate launch` each
process takes the GPU of its LOCAL_RANK. A named device is checked before any model loads.
"""

from __future__ import annotations

import os

import torch

from textcl.errors import TextclError


def default_device() -> torch.device:
    """`cuda:LOCAL_RANK` when torch sees a GPU, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def resolve_device(name: str | torch.device | None, what: str = "device") -> torch.device:
    """The checked device called `name` (cpu, cuda, cuda:N, mps), or `default_device()` for None; errors call
    the setting `what` (e.g. "--device")."""
    if name is None:
        return default_device()
    if isinstance(name, torch.device):
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TextclError(f"unknown {what} {name!r}; use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise TextclError(f"{what} {name}: this torch ({torch.__version__}) sees no such device; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise TextclError(f"{what} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device
