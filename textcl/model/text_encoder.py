"""The inference contract of both encoders, and the one `encode` loop they share.

`TextEncoder` is what retrieval, evaluation, mining and serving take: the torch `Encoder`
(`textcl.model.encoder`) and the onnxruntime `OnnxEncoder` (`textcl.model.onnx_backend`) both are one. A
backend supplies its forward over padded token arrays (`forward_arrays`), the context its forwards run in
(`running`: eval mode, inference mode, autocast for torch) and a `fingerprint` of what decides its
embeddings; `encode` does the rest the same way for both: prompt prefix, tokenizing once, sorting by token
length so each batch pads as little as possible, batching, restoring the input order, truncating and
normalizing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from textcl.model.text_inputs import ENCODE_BATCH_SIZE, pad_arrays, prompt_token_count, resolve_prompt


class TextEncoder:
    """Texts -> embeddings `[n, dim]`, whatever runs the model.

    Attributes every encoder has: `backend` ("torch" or "onnx", what a search index records), `tokenizer`,
    `prompts` (named prefixes such as {"query": "query: "}), `max_seq_length` (default truncation),
    `normalize` (whether embeddings are L2-normalized), `dim` (their width), `name_or_path` (where the
    model was loaded from), `position_limit` (the most tokens the model takes: a longer max length is cut
    there, `textcl.model.fit`) and `include_prompt` (False: a prompt's tokens are left out of pooling).
    """

    backend: ClassVar[str]
    tokenizer: Any
    prompts: dict[str, str]
    max_seq_length: int
    normalize: bool
    dim: int
    name_or_path: str
    position_limit: int
    include_prompt: bool = True

    def forward_arrays(self, batch: dict[str, np.ndarray], prompt_length: int | None = None) -> np.ndarray:
        """Padded int64 token arrays `[batch, seq]` (input_ids, attention_mask, token_type_ids where the tokenizer
        makes them) -> float32 embeddings `[batch, dim]`; `prompt_length` (with `include_prompt` False): the
        prompt's tokens at the start of each row, left out of pooling."""
        raise NotImplementedError

    def running(self, precision: str) -> contextlib.AbstractContextManager:
        """The context `encode` runs its forwards in at `precision` ("fp32" or "bf16"); refuses a precision the
        backend cannot run when called."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 of everything that decides the embeddings (weights or graph, settings, tokenizer): names this
        model in the embedding cache and in a mined file's sidecar."""
        raise NotImplementedError

    def resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str:
        """The prefix to prepend: an explicit `prompt` string, or the saved prompt called `prompt_name`."""
        return resolve_prompt(self.prompts, prompt, prompt_name)

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = ENCODE_BATCH_SIZE,
        prompt: str | None = None,
        prompt_name: str | None = None,
        normalize: bool | None = None,
        truncate_dim: int | None = None,
        show_progress_bar: bool = False,
        convert_to_tensor: bool = False,
        max_seq_length: int | None = None,
        precision: str = "fp32",
    ) -> np.ndarray | torch.Tensor:
        """Embed `texts` -> `[n, dim]` float32 (numpy, or torch with `convert_to_tensor`); a single str gives `[dim]`.

        `normalize` defaults to the model's setting and is applied after `truncate_dim`, so truncated
        Matryoshka vectors are unit length again. `max_seq_length` overrides the model's truncation length
        (e.g. shorter queries than documents). Texts are tokenized once, sorted by token length, and
        padded per batch to that batch's longest text; the output keeps the input order. `precision` "bf16"
        runs the torch forwards under bf16 autocast (`textcl.model.precision`); the output stays float32.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        prefix = self.resolve_prompt(prompt, prompt_name)
        if prefix:
            texts = [prefix + text for text in texts]
        prompt_length = None if self.include_prompt else prompt_token_count(self.tokenizer, prefix)
        dim = truncate_dim or self.dim
        out = np.empty((len(texts), dim), dtype=np.float32)
        running = self.running(precision)
        if texts:
            max_length = min(max_seq_length or self.max_seq_length, self.position_limit)
            encoded = self.tokenizer(texts, truncation=True, max_length=max_length, padding=False)
            lengths = np.array([len(ids) for ids in encoded["input_ids"]])
            order = np.argsort(-lengths, kind="stable")
            with running:
                for start in tqdm(range(0, len(texts), batch_size), desc="encode", disable=not show_progress_bar):
                    index = order[start : start + batch_size]
                    batch = pad_arrays(encoded, index, self.tokenizer)
                    out[index] = self.forward_arrays(batch, prompt_length)[:, :dim]
        result = torch.from_numpy(out)
        if normalize if normalize is not None else self.normalize:
            result = F.normalize(result, p=2, dim=-1)
        result = result[0] if single else result
        return result if convert_to_tensor else result.numpy()
