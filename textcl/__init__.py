"""textcl: train, evaluate and serve text embedding models with contrastive learning."""

from textcl.beir import load_beir
from textcl.errors import TextclError
from textcl.evaluation import evaluate, evaluate_retrieval, evaluate_sts
from textcl.losses import InfoNCELoss, MatryoshkaLoss
from textcl.mining import mine_hard_negatives
from textcl.modeling import Encoder
from textcl.pooling import POOLING_MODES
from textcl.search import SearchIndex

__version__ = "0.1.0"

__all__ = [
    "POOLING_MODES",
    "Encoder",
    "InfoNCELoss",
    "MatryoshkaLoss",
    "SearchIndex",
    "TextclError",
    "__version__",
    "evaluate",
    "evaluate_retrieval",
    "evaluate_sts",
    "load_beir",
    "mine_hard_negatives",
]
