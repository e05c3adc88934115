"""Reading and writing the sentence-transformers model folder, so both libraries load each other's models.

Written layout (the classic format that sentence-transformers 3.x to 6.x all load):
    config.json, model.safetensors, tokenizer files   the `transformers` model at the root
    modules.json                                      Transformer -> Pooling [-> Dense] [-> Normalize]
    sentence_bert_config.json                         max_seq_length, do_lower_case
    config_sentence_transformers.json                 prompts, similarity function, versions
    1_Pooling/config.json                             the pooling mode
    2_Dense/config.json + model.safetensors           when the encoder has a Dense projection
    N_Normalize/                                      when the encoder normalizes
    README.md                                         the model card, when the caller asks for one
                                                      (`Encoder.save(path, model_card=...)`, `textcl.hub`)
A LoRA-wrapped encoder writes adapter_config.json + adapter_model.safetensors instead of config.json +
model.safetensors (sentence-transformers loads such folders through peft; see `textcl.model.lora`).
Read: that layout, the newer one sentence-transformers 6 writes, plain `transformers` folders and adapters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from textcl.errors import TextclError
from textcl.model.lora import is_adapter, remove_other_format
from textcl.version import __version__

if TYPE_CHECKING:
    from textcl.model.encoder import Encoder

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
# The oldest sentence-transformers release whose loader reads every key written here (prompts, similarity).
ST_FORMAT_VERSION = "3.0.0"


def read_pooling(config: dict[str, Any], where: Path) -> str:
    """textcl pooling mode from a sentence-transformers Pooling config (old boolean or new string form)."""
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        modes = [mode for flag, mode in ST_POOLING_FLAGS.items() if config.get(flag)]
    if len(modes) != 1 or modes[0] not in ST_POOLING:
        raise TextclError(f"{where}: pooling {modes} is not supported; textcl supports one of {sorted(ST_POOLING)}")
    return ST_POOLING[modes[0]]


def read_dense(folder: Path) -> tuple[nn.Linear, str]:
    """A sentence-transformers Dense module folder -> (Linear layer, activation name)."""
    config = json.loads((folder / "config.json").read_text())
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
    return linear, ST_ACTIVATIONS[activation_name]


def read_st_folder(root: Path) -> dict[str, Any]:
    """Parse modules.json and the module folders into `Encoder` keyword arguments (without model/tokenizer)."""
    spec: dict[str, Any] = {"transformer_dir": None, "normalize": False}
    for module in json.loads((root / "modules.json").read_text()):
        kind = module["type"].rsplit(".", 1)[-1]
        folder = root / module.get("path", "")
        if kind == "Transformer":
            spec["transformer_dir"] = folder
            config_file = folder / "sentence_bert_config.json"
            config = json.loads(config_file.read_text()) if config_file.exists() else {}
            if config.get("max_seq_length"):
                spec["max_seq_length"] = int(config["max_seq_length"])
        elif kind == "Pooling":
            pooling_config = json.loads((folder / "config.json").read_text())
            spec["pooling"] = read_pooling(pooling_config, folder)
            spec["include_prompt"] = bool(pooling_config.get("include_prompt", True))
        elif kind == "Dense":
            if "dense" in spec:
                raise TextclError(f"{root}: more than one Dense module is not supported")
            spec["dense"], spec["dense_activation"] = read_dense(folder)
        elif kind == "Normalize":
            spec["normalize"] = True
        else:
            raise TextclError(f"{root}: sentence-transformers module {module['type']!r} is not supported by textcl")
    if spec["transformer_dir"] is None:
        raise TextclError(f"{root}/modules.json names no Transformer module")
    config_file = root / "config_sentence_transformers.json"
    if config_file.exists():
        spec["prompts"] = json.loads(config_file.read_text()).get("prompts") or {}
    return spec


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_st_folder(encoder: Encoder, path: str | Path) -> None:
    """Write `encoder` as a sentence-transformers folder (layout in the module docstring).

    The training-only MLP head is not written: a saved model is what inference uses.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    remove_other_format(root, adapter=is_adapter(encoder.model))
    encoder.model.save_pretrained(root)
    encoder.tokenizer.model_max_length = encoder.max_seq_length
    encoder.tokenizer.save_pretrained(root)
    modules = [("", "sentence_transformers.models.Transformer"), ("1_Pooling", "sentence_transformers.models.Pooling")]
    st_mode = {ours: theirs for theirs, ours in ST_POOLING.items()}[encoder.pooling]
    pooling_config = {"word_embedding_dimension": encoder.hidden_size, "include_prompt": encoder.include_prompt}
    pooling_config |= {flag: mode == st_mode for flag, mode in ST_POOLING_FLAGS.items()}
    write_json(root / "1_Pooling" / "config.json", pooling_config)
    if encoder.dense is not None:
        dense_dir = root / "2_Dense"
        activation = {ours: theirs for theirs, ours in ST_ACTIVATIONS.items()}[encoder.dense_activation]
        dense_config = {
            "in_features": encoder.dense.in_features,
            "out_features": encoder.dense.out_features,
            "bias": encoder.dense.bias is not None,
            "activation_function": activation,
        }
        write_json(dense_dir / "config.json", dense_config)
        state = {
            f"linear.{key}": value.detach().cpu().contiguous() for key, value in encoder.dense.state_dict().items()
        }
        save_file(state, dense_dir / "model.safetensors")
        modules.append(("2_Dense", "sentence_transformers.models.Dense"))
    if encoder.normalize:
        normalize_dir = f"{len(modules)}_Normalize"
        (root / normalize_dir).mkdir(exist_ok=True)
        modules.append((normalize_dir, "sentence_transformers.models.Normalize"))
    modules_json = [{"idx": i, "name": str(i), "path": p, "type": t} for i, (p, t) in enumerate(modules)]
    write_json(root / "modules.json", modules_json)
    write_json(root / "sentence_bert_config.json", {"max_seq_length": encoder.max_seq_length, "do_lower_case": False})
    versions = {
        "sentence_transformers": ST_FORMAT_VERSION,
        "transformers": transformers.__version__,
        "pytorch": torch.__version__,
        "textcl": __version__,
    }
    st_config = {"__version__": versions, "prompts": encoder.prompts, "default_prompt_name": None}
    write_json(root / "config_sentence_transformers.json", st_config | {"similarity_fn_name": "cosine"})
