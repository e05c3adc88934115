"""The ONNX backend: an encoder that runs a graph written by `textcl export` in onnxruntime, with no torch forward.

`OnnxEncoder` is a `TextEncoder` (`textcl.model.text_encoder`), like the torch `Encoder`, so encoding,
evaluation, indexing and search take either. `Encoder.load(path, backend="onnx")` returns one. The graph
already holds pooling, Dense and normalization (`textcl.model.onnx_export`); this class runs a padded batch
through it (`forward_arrays`), and the shared `encode` loop does the rest. The folder's settings (max length,
prompts) come from the one sentence-transformers folder reader (`textcl.model.st_folder`). A file exported
from other weights than the folder now holds is refused (`weights_digest`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import transformers

from textcl.errors import TextclError
from textcl.model.fit import check_vocabulary, fit_length, position_limit
from textcl.model.location import resolve_model_dir
from textcl.model.onnx_files import MODEL_FILE, ONNX_DIR, check_file_digest, weights_digest
from textcl.model.st_folder import read_st_folder
from textcl.model.st_modules import read_json
from textcl.model.text_encoder import TextEncoder
from textcl.model.text_inputs import default_max_length

logger = logging.getLogger(__name__)


def find_onnx_file(folder: Path, file_name: str | None) -> Path:
    """The ONNX file `file_name` (default model.onnx) in `folder/onnx/`; a path relative to `folder` (such as
    sentence-transformers' "onnx/model_qint8_avx512_vnni.onnx") or an absolute path also works."""
    name = file_name or MODEL_FILE
    for path in (folder / ONNX_DIR / name, folder / name, Path(name)):
        if path.is_file():
            return path
    found = sorted(path.name for path in (folder / ONNX_DIR).glob("*.onnx"))
    hint = f"it has {', '.join(found)}" if found else f"run `textcl export {folder}` first"
    raise TextclError(f"no ONNX file {name!r} in {folder / ONNX_DIR}; {hint}")


def session_providers(device: str | torch.device | None) -> list[str]:
    """onnxruntime execution providers for `device`: the CPU by default, CUDA where onnxruntime has it (else the
    CPU, with a warning)."""
    import onnxruntime  # onnxruntime: only for the ONNX backend (the `onnx` extra)

    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if kind != "cpu":
        # the CLI's default device is the GPU whenever torch sees one; the `onnx` extra's onnxruntime is CPU-only
        logger.warning("this onnxruntime has no %s provider (install onnxruntime-gpu); running on the CPU", kind)
    return ["CPUExecutionProvider"]


def folder_settings(folder: Path, tokenizer: Any, config: dict[str, Any]) -> tuple[int, dict[str, str]]:
    """(max_seq_length, prompts) of `folder` as the torch `Encoder.load` reads them: its sentence-transformers
    configs, else the same default truncation length (`default_max_length` of the tokenizer and `config`, the
    transformers config.json)."""
    if (folder / "modules.json").is_file():
        spec = read_st_folder(folder, settings_only=True)
        max_seq_length, prompts = spec.max_seq_length, spec.prompts
    else:
        max_seq_length, prompts = None, {}
    if max_seq_length is None:
        max_seq_length = default_max_length(tokenizer, config.get("max_position_embeddings"))
    return max_seq_length, prompts


@dataclass(eq=False)
class OnnxEncoder(TextEncoder):
    """An exported graph in an onnxruntime session, with its tokenizer and the model's settings.

    `normalize` says whether the graph's output is L2-normalized; `dim` is its width.
    """

    session: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    file: Path
    folder: Path
    pooling: str
    normalize: bool
    dim: int
    max_seq_length: int
    prompts: dict[str, str]
    position_limit: int  # the most tokens the graph's model takes (textcl.model.fit)
    backend: ClassVar[str] = "onnx"

    @property
    def name_or_path(self) -> str:
        """The model folder (what a search index records as its model)."""
        return str(self.folder)

    @functools.cached_property
    def input_names(self) -> list[str]:
        """The graph's inputs: input_ids, attention_mask, and token_type_ids where the model takes them."""
        return [item.name for item in self.session.get_inputs()]

    @property
    def onnx_file(self) -> str:
        """The ONNX file's name in the folder's onnx/ (what a search index records to load the same graph)."""
        return self.file.name

    @classmethod
    def load(
        cls,
        model_name_or_path: str | Path,
        onnx_file: str | None = None,
        max_seq_length: int | None = None,
        prompts: dict[str, str] | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        device: str | torch.device | None = None,
    ) -> OnnxEncoder:
        """Open `onnx/<onnx_file>` (default model.onnx) of a folder written by `textcl export`, refusing a file
        that predates the folder's current weights."""
        import onnxruntime  # see session_providers

        folder = resolve_model_dir(model_name_or_path, revision)
        path = find_onnx_file(folder, onnx_file)
        check_file_digest(path)
        try:
            session = onnxruntime.InferenceSession(str(path), providers=session_providers(device))
        except Exception as error:  # noqa: BLE001 -- onnxruntime raises its own Fail/InvalidGraph types
            raise TextclError(f"onnxruntime cannot load {path}: {str(error).splitlines()[0][:200]}") from None
        meta = session.get_modelmeta().custom_metadata_map
        outputs = [output.name for output in session.get_outputs()]
        if "sentence_embedding" not in outputs or "textcl_pooling" not in meta:
            raise TextclError(
                f"{path} was not written by `textcl export` (its outputs are {', '.join(outputs)}, without pooling); "
                f"run `textcl export {folder} --overwrite`"
            )
        recorded, current = meta.get("textcl_weights_sha256"), weights_digest(folder)
        if recorded and current and recorded != current:
            raise TextclError(
                f"{path} is stale: the weights in {folder} changed after it was exported; "
                f"run `textcl export {folder} --overwrite`"
            )
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise TextclError(f"could not load the tokenizer in {str(folder)!r}: {str(error).splitlines()[0]}") from None
        config = read_json(folder / "config.json")
        check_vocabulary(tokenizer, config, folder)
        saved_length, saved_prompts = folder_settings(folder, tokenizer, config)
        return cls(
            session, tokenizer, path, folder, meta["textcl_pooling"], json.loads(meta["textcl_normalize"]),
            int(meta["textcl_dim"]), fit_length(max_seq_length or saved_length, config, folder),
            dict(prompts or saved_prompts), position_limit(config) or 1 << 30,
        )

    def fingerprint(self) -> str:
        """sha256 of the ONNX file and the tokenizer's identity (names this model in the embedding cache)."""
        if not hasattr(self, "_fingerprint"):
            digest = hashlib.sha256()
            with self.file.open("rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
            identity = [type(self.tokenizer).__name__, len(self.tokenizer), str(self.folder), self.file.name]
            digest.update(json.dumps(identity).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def running(self, precision: str) -> contextlib.AbstractContextManager:
        """Nothing to set up; a precision other than "fp32" is refused: the graph's own weights set its precision."""
        if precision != "fp32":
            raise TextclError(f"precision {precision!r} applies to the torch backend; the ONNX backend runs the "
                              "graph as exported (fp32, or int8 with `textcl export --quantize int8`)")
        return contextlib.nullcontext()

    def forward_arrays(self, batch: dict[str, np.ndarray], prompt_length: int | None = None) -> np.ndarray:
        """Padded token arrays `[batch, seq]` -> the graph's `sentence_embedding` `[batch, dim]` (zeros for an input
        the graph takes that the tokenizer does not make). A graph pools over every token (`textcl export` refuses
        a model with `include_prompt` False), so `prompt_length` is always None here."""
        feeds = {name: batch.get(name, np.zeros_like(batch["input_ids"])) for name in self.input_names}
        return self.session.run(["sentence_embedding"], feeds)[0]
