"""The Encoder: a `transformers` model + pooling (+ Dense) (+ L2 normalize) that turns text into vectors.

`Encoder.forward` maps a tokenized batch to embeddings `[batch, dim]` (the training path);
`Encoder.encode` maps a list of strings to a numpy array `[n, dim]` (the inference path: the loop of
`textcl.model.text_encoder.TextEncoder`, over `forward_arrays`). `Encoder.load` and `Encoder.save` read and
write the sentence-transformers folder format (`textcl.model.st_folder`) through an `EncoderSpec`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from textcl.errors import TextclError
from textcl.model.decoder import is_decoder, prepare_decoder
from textcl.model.device import resolve_device
from textcl.model.fit import check_vocabulary, fit_length, position_limit
from textcl.model.location import resolve_model_dir
from textcl.model.lora import add_lora, is_adapter_folder, load_adapter_model, merge_adapter
from textcl.model.onnx_backend import OnnxEncoder
from textcl.model.pooling import check_pooling_mode, exclude_prompt, pool
from textcl.model.precision import autocast
from textcl.model.spec import EncoderSpec
from textcl.model.st_folder import read_st_folder, write_st_folder
from textcl.model.text_encoder import TextEncoder
from textcl.model.text_inputs import default_max_length, prompt_token_count

logger = logging.getLogger(__name__)

DENSE_ACTIVATIONS = {"tanh": nn.Tanh, "identity": nn.Identity}
BACKENDS = ("torch", "onnx")


class Encoder(nn.Module, TextEncoder):
    """Text encoder: `model` -> pooling -> optional Dense -> optional MLP head (training only) -> optional normalize.

    Args:
        model: any `transformers` model whose output has `last_hidden_state` `[batch, seq, hidden]`.
        tokenizer: the matching tokenizer.
        pooling: one of `textcl.pooling.POOLING_MODES`.
        normalize: L2-normalize the output embeddings.
        max_seq_length: texts are truncated to this many tokens.
        prompts: named prefixes such as `{"query": "query: ", "document": "passage: "}`, saved with the model.
        dense: optional projection `[hidden] -> [dim]` exported with the model (sentence-transformers' Dense).
        dense_activation: "tanh" (sentence-transformers' default) or "identity".
        mlp_head: add SimCSE's Linear+Tanh head, applied only while training and never exported.
        include_prompt: pool over a prompt's tokens too; False leaves them out (sentence-transformers'
            `Pooling(include_prompt=False)`): `embed` then takes each row's `prompt_length`.
    """

    backend = "torch"  # `OnnxEncoder.backend` is "onnx"; a search index records which built it

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        pooling: str = "mean",
        normalize: bool = False,
        max_seq_length: int = 256,
        prompts: dict[str, str] | None = None,
        dense: nn.Linear | None = None,
        dense_activation: str = "tanh",
        mlp_head: bool = False,
        include_prompt: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = check_pooling_mode(pooling)
        self.normalize = normalize
        self.max_seq_length = max_seq_length
        self.prompts = dict(prompts or {})
        self.include_prompt = include_prompt
        self.dense = dense
        self.dense_activation = dense_activation
        self.activation = DENSE_ACTIVATIONS[dense_activation]()
        hidden = self.hidden_size
        self.mlp_head = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh()) if mlp_head else None
        if self.mlp_head is not None:
            self.mlp_head = self.mlp_head.to(self.device)

    @property
    def hidden_size(self) -> int:
        """Width of the pooled vector before the Dense layer."""
        return self.model.config.hidden_size

    @property
    def dim(self) -> int:
        """Width of the output embeddings."""
        return self.dense.out_features if self.dense is not None else self.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def position_limit(self) -> int:
        """The most tokens the model takes (a length asked beyond it is cut there; see textcl.model.fit)."""
        return position_limit(self.model.config.to_dict()) or 1 << 30

    @property
    def name_or_path(self) -> str:
        """Where the transformers model was loaded from (what a search index records as its model)."""
        return self.model.name_or_path

    @classmethod
    def load(
        cls,
        model_name_or_path: str | Path,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_seq_length: int | None = None,
        prompts: dict[str, str] | None = None,
        mlp_head: bool = False,
        trust_remote_code: bool = False,
        revision: str | None = None,
        device: str | torch.device | None = None,
        backend: str = "torch",
        onnx_file: str | None = None,
    ) -> Encoder | OnnxEncoder:
        """Load a folder saved by textcl or sentence-transformers, a plain `transformers` folder, or a Hub id.

        Explicit arguments replace what the folder says. A plain `transformers` folder (no modules.json) gets
        mean pooling, with a warning unless `pooling` is given; a LoRA adapter folder (`adapter_config.json`)
        loads its base model with the adapter applied. `device` defaults to the GPU when torch sees one.
        `backend="onnx"` returns an `OnnxEncoder` running the folder's `onnx/<onnx_file>` (default model.onnx,
        written by `textcl export`) in onnxruntime; pooling and normalization are then those of the graph.
        """
        if backend not in BACKENDS:
            raise TextclError(f"unknown backend {backend!r}; use {' or '.join(BACKENDS)}")
        if backend == "onnx":
            if pooling is not None or normalize is not None or mlp_head:
                raise TextclError("pooling, normalize and mlp_head are inside an exported ONNX graph; "
                                  "load with backend='torch' to change them, then export again")
            return OnnxEncoder.load(model_name_or_path, onnx_file, max_seq_length, prompts, trust_remote_code,
                                    revision, device)
        if onnx_file is not None:
            raise TextclError("onnx_file applies to backend='onnx'")
        device = resolve_device(device)
        root = resolve_model_dir(model_name_or_path, revision)
        if (root / "modules.json").exists():
            spec = read_st_folder(root)
        elif (root / "config.json").exists() or is_adapter_folder(root):
            spec = EncoderSpec(transformer_dir=root)
            if pooling is None:
                logger.warning("%s is a plain transformers model; using mean pooling (pass pooling= to choose)", root)
        else:
            raise TextclError(
                f"folder {str(root)!r} holds no model (no modules.json or config.json); "
                "pass a folder saved by textcl, sentence-transformers or transformers"
            )
        load_transformer(spec, trust_remote_code)
        if is_decoder(spec.model):
            prepare_decoder(spec.model, spec.tokenizer)
        if spec.max_seq_length is None:
            spec.max_seq_length = default_max_length(spec.tokenizer,
                                                     getattr(spec.model.config, "max_position_embeddings", None))
        overrides = {"pooling": pooling, "normalize": normalize, "max_seq_length": max_seq_length, "prompts": prompts}
        for key, value in overrides.items():
            if value is not None:
                setattr(spec, key, value)
        config = spec.model.config.to_dict()
        check_vocabulary(spec.tokenizer, config, root)
        spec.max_seq_length = fit_length(spec.max_seq_length, config, root)
        return cls.from_spec(spec, mlp_head=mlp_head).to(device)

    @classmethod
    def from_spec(cls, spec: EncoderSpec, mlp_head: bool = False) -> Encoder:
        """The encoder a spec describes (its `model` and `tokenizer` loaded)."""
        return cls(spec.model, spec.tokenizer, spec.pooling, spec.normalize, spec.max_seq_length, spec.prompts,
                   spec.dense, spec.dense_activation, mlp_head, spec.include_prompt)

    def spec(self) -> EncoderSpec:
        """What a saved folder holds of this encoder (the training-only MLP head is not part of it)."""
        return EncoderSpec(model=self.model, tokenizer=self.tokenizer, hidden_size=self.hidden_size,
                           max_seq_length=self.max_seq_length, pooling=self.pooling, dense=self.dense,
                           dense_activation=self.dense_activation, normalize=self.normalize, prompts=self.prompts,
                           include_prompt=self.include_prompt)

    def save(self, path: str | Path, model_card: Callable[[Encoder, Path], None] | None = None) -> None:
        """Write the model as a sentence-transformers folder (`textcl.model.st_folder`); `model_card(encoder,
        folder)` then writes its README.md (e.g. `textcl.hub.write_model_card`). The training-only MLP head is
        not written: a saved model is what inference uses."""
        write_st_folder(self.spec(), path)
        if model_card is not None:
            model_card(self, Path(path))

    def add_dense(self, out_features: int, activation: str = "tanh") -> None:
        """Append a fresh Dense projection `[hidden] -> [out_features]` (exported with the model)."""
        self.dense = nn.Linear(self.hidden_size, out_features).to(self.device)
        self.dense_activation = activation
        self.activation = DENSE_ACTIVATIONS[activation]()

    def add_lora(self, model_name_or_path: str, r: int = 16, alpha: int = 32, dropout: float = 0.1,
                 target_modules: Sequence[str] = ()) -> None:
        """Train a LoRA adapter instead of the transformer's weights (`textcl.model.lora.add_lora`, same
        arguments); `model_name_or_path` is what this encoder was loaded from."""
        self.model = add_lora(self.model, model_name_or_path, r, alpha, dropout, target_modules)

    def merged(self) -> Encoder:
        """A copy whose transformer has its LoRA adapter folded into the weights (this encoder is unchanged)."""
        copied = copy.deepcopy(self)
        copied.model = merge_adapter(copied.model)
        return copied

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize with padding to the longest text and truncation to `max_length` (default max_seq_length)."""
        return dict(
            self.tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=min(max_length or self.max_seq_length, self.position_limit),
                return_tensors="pt",
            )
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """The training entry point; see `embed`. `accelerate` wraps this method for mixed precision, and
        `encode` calls `embed` directly so that wrapper never leaks into inference (which stays in the
        weights' own precision)."""
        return self.embed(input_ids, attention_mask, **inputs)

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prompt_length: int | torch.Tensor | None = None,
        **inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Tokenized batch `[batch, seq]` -> embeddings `[batch, dim]` (MLP head included while training).
        `prompt_length` (an int or `[batch]`): the prompt's tokens at the start of each row, left out of pooling
        when `include_prompt` is False."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **inputs).last_hidden_state
        if prompt_length is not None and not self.include_prompt:
            attention_mask = exclude_prompt(attention_mask, prompt_length)
        return self.head(hidden, attention_mask)

    def prompt_length(self, prompt: str) -> int:
        """Tokens `prompt` takes at the start of a text (`text_inputs.prompt_token_count`)."""
        return prompt_token_count(self.tokenizer, prompt)

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token embeddings `[batch, seq, hidden]` -> embeddings `[batch, dim]`: pooling, Dense, MLP head (training
        only), normalize. The ONNX export traces this same method (`textcl.model.onnx_export`)."""
        embeddings = pool(hidden, attention_mask, self.pooling)
        if self.dense is not None:
            embeddings = self.activation(self.dense(embeddings))
        if self.mlp_head is not None and self.training:
            embeddings = self.mlp_head(embeddings)
        if self.normalize:
            embeddings = F.normalize(embeddings, p=2, dim=-1)
        return embeddings

    def running(self, precision: str) -> contextlib.AbstractContextManager:
        """Eval mode (restored after), inference mode, and bf16 autocast for precision "bf16"."""
        return evaluating(self, autocast(self.device, precision))

    def forward_arrays(self, batch: dict[str, np.ndarray], prompt_length: int | None = None) -> np.ndarray:
        """Padded token arrays `[batch, seq]` -> float32 embeddings `[batch, dim]` through `embed` (not `forward`,
        which accelerate may wrap for mixed precision: inference stays in the weights' own precision)."""
        device = self.device
        tensors = {key: torch.from_numpy(array).to(device) for key, array in batch.items()}
        return self.embed(**tensors, prompt_length=prompt_length).float().cpu().numpy()

    def fingerprint(self) -> str:
        """sha256 of every weight and of the settings that change embeddings (pooling, Dense activation, tokenizer)."""
        digest = hashlib.sha256()
        hash_weights(digest, self)
        tokenizer = self.tokenizer
        settings = [self.pooling, self.dense_activation, type(tokenizer).__name__, len(tokenizer)]
        settings += [] if self.include_prompt else ["include_prompt=False"]  # keeps older cache keys otherwise
        digest.update(json.dumps(settings + [getattr(tokenizer, "name_or_path", "")]).encode())
        return digest.hexdigest()


def load_transformer(spec: EncoderSpec, trust_remote_code: bool) -> None:
    """Fill `spec.model` and `spec.tokenizer` from `spec.transformer_dir` (a transformers model or LoRA adapter)."""
    folder = spec.transformer_dir
    try:
        if is_adapter_folder(folder):
            spec.model = load_adapter_model(folder, trust_remote_code)
        else:
            spec.model = transformers.AutoModel.from_pretrained(folder, trust_remote_code=trust_remote_code)
        spec.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise TextclError(f"could not load the transformers model in {str(folder)!r}: {reason}") from error


@contextlib.contextmanager
def evaluating(module: nn.Module, precision: contextlib.AbstractContextManager) -> Iterator[None]:
    """`module` in eval mode under inference mode and the `precision` context; its training mode comes back after."""
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode(), precision:
            yield
    finally:
        module.train(was_training)


def hash_weights(digest: Any, module: nn.Module) -> None:
    """Feed every weight of `module` (names and bytes) into `digest`."""
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
