"""`EncoderSpec`: an encoder as a sentence-transformers folder describes it, with no behaviour of its own.

The folder code (`textcl.model.st_folder`, `textcl.model.st_modules`) reads and writes specs; the torch
`Encoder` is built from one (`Encoder.from_spec`) and gives one to save (`Encoder.spec`), so the folder code
never needs the Encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class EncoderSpec:
    """Transformer -> Pooling [-> Dense] [-> Normalize], and the folder-wide settings.

    Read from a folder, `transformer_dir` is where the transformers model (or LoRA adapter) lives and
    `max_seq_length` is None when the folder saves none; to write a folder, `model` and `tokenizer` hold the
    transformer and `hidden_size` its width.
    """

    transformer_dir: Path | None = None
    model: nn.Module | None = None
    tokenizer: Any = None
    hidden_size: int | None = None
    max_seq_length: int | None = None
    pooling: str = "mean"
    include_prompt: bool = True
    dense: nn.Linear | None = None
    dense_activation: str = "tanh"
    normalize: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
