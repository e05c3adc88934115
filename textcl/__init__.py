"""textcl: train, evaluate and serve text embedding models with contrastive learning.

The public names load on first use (PEP 562): `import textcl` for training or encoding does not pull in
faiss and scipy, which only evaluation, mining and search need (~35 MB of memory and ~0.8 s of import).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

EXPORTS = {
    "POOLING_MODES": "textcl.pooling",
    "Encoder": "textcl.modeling",
    "InfoNCELoss": "textcl.losses",
    "MatryoshkaLoss": "textcl.losses",
    "SearchIndex": "textcl.search",
    "TextclError": "textcl.errors",
    "evaluate": "textcl.evaluation",
    "evaluate_retrieval": "textcl.evaluation",
    "evaluate_sts": "textcl.evaluation",
    "load_beir": "textcl.beir",
    "mine_hard_negatives": "textcl.mining",
}

__all__ = ["__version__", *EXPORTS]

if TYPE_CHECKING:
    from textcl.beir import load_beir
    from textcl.errors import TextclError
    from textcl.evaluation import evaluate, evaluate_retrieval, evaluate_sts
    from textcl.losses import InfoNCELoss, MatryoshkaLoss
    from textcl.mining import mine_hard_negatives
    from textcl.modeling import Encoder
    from textcl.pooling import POOLING_MODES
    from textcl.search import SearchIndex


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module 'textcl' has no attribute {name!r}")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
