"""The sentence-transformers module types textcl reads and writes, one entry each in `MODULE_TYPES`.

Each entry reads its own folder into an `EncoderSpec` and writes it from one, as sentence-transformers'
modules do with their `config_keys` and `save`/`load`: the Transformer at the folder's root
(sentence_bert_config.json), Pooling (`1_Pooling/config.json`), Dense (`2_Dense/config.json` +
`model.safetensors`) and Normalize (an empty folder). A new module type is one more entry here (and the spec
field it fills); `textcl.model.st_folder` walks modules.json through this registry, and names any type it
does not hold in a one-line error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from textcl.errors import TextclError
from textcl.model.lora import is_adapter, remove_other_format
from textcl.model.spec import EncoderSpec

# sentence-transformers' pooling names <-> ours; its "mean_sqrt_len_tokens" has no textcl counterpart.
ST_POOLING = {"mean": "mean", "cls": "cls", "max": "max", "lasttoken": "last_token", "weightedmean": "weighted_mean"}
ST_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
ST_ACTIVATIONS = {"torch.nn.modules.activation.Tanh": "tanh", "torch.nn.modules.linear.Identity": "identity"}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass(frozen=True)
class ModuleType:
    """One sentence-transformers module type: `name` (the class in modules.json, sentence_transformers.models.<name>,
    and the folder suffix), whether a spec has it (`used`), and how it fills a spec from its folder (`read`) and
    writes its folder from a spec (`write`)."""

    name: str
    used: Callable[[EncoderSpec], bool]
    read: Callable[[Path, EncoderSpec], None]
    write: Callable[[EncoderSpec, Path], None]

    @property
    def st_type(self) -> str:
        return f"sentence_transformers.models.{self.name}"


def read_transformer(folder: Path, spec: EncoderSpec) -> None:
    spec.transformer_dir = folder
    max_seq_length = read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if max_seq_length:
        spec.max_seq_length = int(max_seq_length)


def write_transformer(spec: EncoderSpec, folder: Path) -> None:
    """The transformers model (or LoRA adapter: adapter_config.json + adapter_model.safetensors instead of
    config.json + model.safetensors), the tokenizer and sentence_bert_config.json."""
    remove_other_format(folder, adapter=is_adapter(spec.model))
    spec.model.save_pretrained(folder)
    spec.tokenizer.model_max_length = spec.max_seq_length
    spec.tokenizer.save_pretrained(folder)
    write_json(folder / "sentence_bert_config.json", {"max_seq_length": spec.max_seq_length, "do_lower_case": False})


def read_pooling(folder: Path, spec: EncoderSpec) -> None:
    """textcl pooling mode from a sentence-transformers Pooling config (old boolean or new string form), and
    whether it pools over a prompt's tokens (`include_prompt`)."""
    config = read_json(folder / "config.json")
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        modes = [mode for flag, mode in ST_POOLING_FLAGS.items() if config.get(flag)]
    if len(modes) != 1 or modes[0] not in ST_POOLING:
        raise TextclError(f"{folder}: pooling {modes} is not supported; textcl supports one of {sorted(ST_POOLING)}")
    spec.pooling = ST_POOLING[modes[0]]
    spec.include_prompt = bool(config.get("include_prompt", True))


def write_pooling(spec: EncoderSpec, folder: Path) -> None:
    st_mode = {ours: theirs for theirs, ours in ST_POOLING.items()}[spec.pooling]
    config = {"word_embedding_dimension": spec.hidden_size, "include_prompt": spec.include_prompt}
    write_json(folder / "config.json", config | {flag: mode == st_mode for flag, mode in ST_POOLING_FLAGS.items()})


def read_dense(folder: Path, spec: EncoderSpec) -> None:
    """A Dense module folder -> the spec's Linear layer and activation name."""
    if spec.dense is not None:
        raise TextclError(f"{folder.parent}: more than one Dense module is not supported")
    config = read_json(folder / "config.json")
    activation_name = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation_name not in ST_ACTIVATIONS:
        raise TextclError(f"{folder}: Dense activation {activation_name!r} is not supported (only Tanh or Identity)")
    linear = nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    if (folder / "model.safetensors").exists():
        state = load_file(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").exists():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise TextclError(f"{folder}: Dense layer has no model.safetensors or pytorch_model.bin")
    linear.load_state_dict({key.removeprefix("linear."): value for key, value in state.items()})
    spec.dense, spec.dense_activation = linear, ST_ACTIVATIONS[activation_name]


def write_dense(spec: EncoderSpec, folder: Path) -> None:
    dense = spec.dense
    activation = {ours: theirs for theirs, ours in ST_ACTIVATIONS.items()}[spec.dense_activation]
    config = {"in_features": dense.in_features, "out_features": dense.out_features, "bias": dense.bias is not None,
              "activation_function": activation}
    write_json(folder / "config.json", config)
    state = {f"linear.{key}": value.detach().cpu().contiguous() for key, value in dense.state_dict().items()}
    save_file(state, folder / "model.safetensors")


def read_normalize(folder: Path, spec: EncoderSpec) -> None:
    spec.normalize = True


def write_normalize(spec: EncoderSpec, folder: Path) -> None:
    folder.mkdir(exist_ok=True)


# In pipeline order: a written folder lists the used ones in this order.
MODULE_TYPES = (
    ModuleType("Transformer", lambda spec: True, read_transformer, write_transformer),
    ModuleType("Pooling", lambda spec: True, read_pooling, write_pooling),
    ModuleType("Dense", lambda spec: spec.dense is not None, read_dense, write_dense),
    ModuleType("Normalize", lambda spec: spec.normalize, read_normalize, write_normalize),
)
TRANSFORMER = MODULE_TYPES[0]


def module_type(st_type: str, where: Path) -> ModuleType:
    """The registry entry for modules.json's `st_type` (e.g. "sentence_transformers.models.Dense"); the last
    dotted part decides, so sentence-transformers' newer module paths match too."""
    name = st_type.rsplit(".", 1)[-1]
    for entry in MODULE_TYPES:
        if entry.name == name:
            return entry
    known = ", ".join(entry.name for entry in MODULE_TYPES)
    raise TextclError(f"{where}: sentence-transformers module {st_type!r} is not supported by textcl (it reads "
                      f"{known})")
