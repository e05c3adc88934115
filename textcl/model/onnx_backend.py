"""The ONNX backend: an encoder that runs a graph written by `textcl export` in onnxruntime, with no torch forward.

`OnnxEncoder` offers the inference side of `Encoder` (`encode`, `dim`, `prompts`, `max_seq_length`,
`resolve_prompt`), so encoding, evaluation, indexing and search take either. `Encoder.load(path,
backend="onnx")` returns one. The graph already holds pooling, Dense and normalization
(`textcl.model.onnx_export`); this class tokenizes, sorts texts by length, pads each batch and runs it.
A file exported from other weights than the folder now holds is refused (`weights_digest`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from textcl.errors import TextclError
from textcl.model.location import resolve_model_dir
from textcl.model.fit import check_vocabulary, fit_length, position_limit
from textcl.model.onnx_files import MODEL_FILE, ONNX_DIR, check_file_digest, weights_digest
from textcl.model.text_inputs import ENCODE_BATCH_SIZE, pad_arrays, resolve_prompt

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


def folder_settings(folder: Path) -> tuple[int | None, dict[str, str]]:
    """(max_seq_length, prompts) from the sentence-transformers configs of `folder`, where present."""
    max_seq_length, prompts = None, {}
    if (folder / "sentence_bert_config.json").is_file():
        max_seq_length = json.loads((folder / "sentence_bert_config.json").read_text()).get("max_seq_length")
    if (folder / "config_sentence_transformers.json").is_file():
        prompts = json.loads((folder / "config_sentence_transformers.json").read_text()).get("prompts") or {}
    return max_seq_length, prompts


@dataclass(eq=False)
class OnnxEncoder:
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
        saved_length, saved_prompts = folder_settings(folder)
        tokenizer_length = getattr(tokenizer, "model_max_length", 0)
        default_length = saved_length or (tokenizer_length if 0 < tokenizer_length < 100_000 else 512)
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        check_vocabulary(tokenizer, config, folder)
        return cls(
            session, tokenizer, path, folder, meta["textcl_pooling"], json.loads(meta["textcl_normalize"]),
            int(meta["textcl_dim"]), fit_length(max_seq_length or default_length, config, folder),
            dict(prompts or saved_prompts), position_limit(config) or 1 << 30,
        )

    def resolve_prompt(self, prompt: str | None, prompt_name: str | None) -> str:
        """The prefix to prepend: an explicit `prompt` string, or the saved prompt called `prompt_name`."""
        return resolve_prompt(self.prompts, prompt, prompt_name)

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
        """Embed `texts` -> `[n, dim]` float32, as `Encoder.encode` does (same arguments and order), running
        the graph in onnxruntime. `precision` must be "fp32": the graph's own weights set its precision."""
        if precision != "fp32":
            raise TextclError(f"precision {precision!r} applies to the torch backend; the ONNX backend runs the "
                              "graph as exported (fp32, or int8 with `textcl export --quantize int8`)")
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        prefix = self.resolve_prompt(prompt, prompt_name)
        if prefix:
            texts = [prefix + text for text in texts]
        dim = truncate_dim or self.dim
        out = np.empty((len(texts), dim), dtype=np.float32)
        if texts:
            encoded = self.tokenizer(texts, truncation=True, max_length=min(max_seq_length or self.max_seq_length, self.position_limit),
                                     padding=False)
            lengths = np.array([len(ids) for ids in encoded["input_ids"]])
            order = np.argsort(-lengths, kind="stable")
            inputs = [item.name for item in self.session.get_inputs()]
            for start in tqdm(range(0, len(texts), batch_size), desc="encode", disable=not show_progress_bar):
                index = order[start : start + batch_size]
                batch = pad_arrays(encoded, index, self.tokenizer)
                feeds = {name: batch.get(name, np.zeros_like(batch["input_ids"])) for name in inputs}
                out[index] = self.session.run(["sentence_embedding"], feeds)[0][:, :dim]
        if normalize if normalize is not None else self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        result = out[0] if single else out
        return torch.from_numpy(result) if convert_to_tensor else result
