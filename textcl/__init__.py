"""textcl: train, evaluate and serve text embedding models with contrastive learning."""

from textcl.errors import TextclError
from textcl.modeling import Encoder
from textcl.pooling import POOLING_MODES

__version__ = "0.1.0"

__all__ = ["POOLING_MODES", "Encoder", "TextclError", "__version__"]
