"""textcl: train, evaluate and serve text embedding models with contrastive learning.

The public names load on first use (PEP 562): `import textcl` for training or encoding does not pull in
faiss and scipy, which only evaluation, mining and search need (~35 MB of memory and ~0.8 s of import).
ARCHITECTURE.md maps the packages: model, data, losses, training, retrieval, evaluation, io, hub, cli.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from textcl.version import __version__

EXPORTS = {
    "POOLING_MODES": "textcl.model.pooling",
    "EncodeOptions": "textcl.model.encode_options",
    "Encoder": "textcl.model.encoder",
    "InfoNCELoss": "textcl.losses.infonce",
    "MatryoshkaLoss": "textcl.losses.matryoshka",
    "SearchIndex": "textcl.retrieval.search_index",
    "TextclError": "textcl.errors",
    "TrainConfig": "textcl.config",
    "evaluate": "textcl.evaluation.suite",
    "evaluate_retrieval": "textcl.evaluation.retrieval",
    "evaluate_sts": "textcl.evaluation.sts",
    "load_beir": "textcl.io.beir",
    "load_config": "textcl.config",
    "mine_hard_negatives": "textcl.retrieval.mining",
    "train": "textcl.training.rounds",
}

__all__ = ["__version__", *EXPORTS]

if TYPE_CHECKING:
    from textcl.config import TrainConfig, load_config
    from textcl.errors import TextclError
    from textcl.evaluation.retrieval import evaluate_retrieval
    from textcl.evaluation.sts import evaluate_sts
    from textcl.evaluation.suite import evaluate
    from textcl.io.beir import load_beir
    from textcl.losses.infonce import InfoNCELoss
    from textcl.losses.matryoshka import MatryoshkaLoss
    from textcl.model.encode_options import EncodeOptions
    from textcl.model.encoder import Encoder
    from textcl.model.pooling import POOLING_MODES
    from textcl.retrieval.mining import mine_hard_negatives
    from textcl.retrieval.search_index import SearchIndex
    from textcl.training.rounds import train


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module 'textcl' has no attribute {name!r}")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
