"""`EncodeOptions`: how queries and documents are encoded, as one value.

Mining, retrieval evaluation, indexing, scoring and serving encode two sides, queries (anchors) and
documents, with the same eight settings; they take one `EncodeOptions` instead of eight parameters each
(`textcl.retrieval`, `textcl.evaluation`, `textcl.serving`), and the CLI builds one from its options. A prompt
name left None is the model's prompt named after the side ("query" or "document") when it has one; a max
length left None is the model's `max_seq_length`. `resolved(encoder)` fills both in, for what a search index
or a mined file records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from textcl.errors import TextclError
from textcl.model.precision import check_precision
from textcl.model.text_encoder import TextEncoder
from textcl.model.text_inputs import ENCODE_BATCH_SIZE

Role = Literal["query", "document"]
ROLES = ("query", "document")


@dataclass(frozen=True)
class EncodeOptions:
    """The prompt name and max length of each side, texts per forward, precision ("fp32" or "bf16"), where
    corpus embeddings are cached (None: nowhere), and whether a progress bar is shown."""

    query_prompt_name: str | None = None
    document_prompt_name: str | None = None
    query_max_length: int | None = None
    document_max_length: int | None = None
    batch_size: int = ENCODE_BATCH_SIZE
    precision: str = "fp32"
    cache_dir: str | Path | None = None
    show_progress_bar: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise TextclError(f"batch_size must be at least 1, got {self.batch_size}")
        for name in ("query_max_length", "document_max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TextclError(f"{name} must be at least 1, got {getattr(self, name)}")
        check_precision(self.precision)

    def prompt_name(self, role: Role, encoder: TextEncoder) -> str | None:
        """The prompt name of side `role`: the one set, else `role` if the model saved a prompt of that name."""
        name = self.query_prompt_name if check_role(role) == "query" else self.document_prompt_name
        if name is not None:
            return name
        return role if role in encoder.prompts else None

    def max_length(self, role: Role, encoder: TextEncoder) -> int:
        """The truncation length of side `role`: the one set, else the model's."""
        length = self.query_max_length if check_role(role) == "query" else self.document_max_length
        return length or encoder.max_seq_length

    def resolved(self, encoder: TextEncoder) -> EncodeOptions:
        """These options with every prompt name and max length decided for `encoder` (an unknown prompt name
        fails here, naming the model's prompts)."""
        for role in ROLES:
            encoder.resolve_prompt(None, self.prompt_name(role, encoder))
        return dataclasses.replace(
            self, query_prompt_name=self.prompt_name("query", encoder),
            document_prompt_name=self.prompt_name("document", encoder),
            query_max_length=self.max_length("query", encoder),
            document_max_length=self.max_length("document", encoder),
        )

    def encode(self, encoder: TextEncoder, texts: Sequence[str], role: Role, normalize: bool = True) -> np.ndarray:
        """`encoder.encode` of `texts` with side `role`'s prompt and max length and these batch size, precision and
        progress bar (no cache: `textcl.retrieval.corpus_embeddings.encode_corpus` adds it) -> `[n, dim]`."""
        return encoder.encode(
            list(texts), batch_size=self.batch_size, prompt_name=self.prompt_name(role, encoder), normalize=normalize,
            max_seq_length=self.max_length(role, encoder), precision=self.precision,
            show_progress_bar=self.show_progress_bar,
        )


def check_role(role: str) -> str:
    if role not in ROLES:
        raise TextclError(f"unknown side {role!r}; use {' or '.join(ROLES)}")
    return role
