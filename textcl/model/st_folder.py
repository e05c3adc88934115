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
Read: that layout and the newer one sentence-transformers 6 writes. Each module type reads and writes its own
entry (`textcl.model.st_modules`); this module walks modules.json and the folder-wide configs, on an
`EncoderSpec` (`textcl.model.spec`), never on the Encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from textcl.errors import TextclError
from textcl.model.spec import EncoderSpec
from textcl.model.st_modules import MODULE_TYPES, TRANSFORMER, module_type, read_json, write_json
from textcl.version import __version__

# The oldest sentence-transformers release whose loader reads every key written here (prompts, similarity).
ST_FORMAT_VERSION = "3.0.0"


def read_st_folder(root: Path, settings_only: bool = False) -> EncoderSpec:
    """Parse modules.json, its module folders and the folder-wide configs into a spec (no model loaded).

    `settings_only` reads the Transformer's settings and the prompts alone, skipping the other modules' folders
    (what the ONNX backend needs: its graph holds pooling, Dense and normalization).
    """
    spec = EncoderSpec()
    for module in json.loads((root / "modules.json").read_text()):
        entry = module_type(module["type"], root)
        if entry is TRANSFORMER or not settings_only:
            entry.read(root / module.get("path", ""), spec)
    if spec.transformer_dir is None:
        raise TextclError(f"{root}/modules.json names no Transformer module")
    spec.prompts = read_json(root / "config_sentence_transformers.json").get("prompts") or {}
    return spec


def write_st_folder(spec: EncoderSpec, path: str | Path) -> None:
    """Write `spec` as a sentence-transformers folder (layout in the module docstring): each module it uses into
    `<i>_<Name>/` (the Transformer at the root), then modules.json and config_sentence_transformers.json."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    modules = []
    for entry in MODULE_TYPES:
        if entry.used(spec):
            folder = "" if entry is TRANSFORMER else f"{len(modules)}_{entry.name}"
            entry.write(spec, root / folder)
            modules.append({"idx": len(modules), "name": str(len(modules)), "path": folder, "type": entry.st_type})
    write_json(root / "modules.json", modules)
    versions = {
        "sentence_transformers": ST_FORMAT_VERSION,
        "transformers": transformers.__version__,
        "pytorch": torch.__version__,
        "textcl": __version__,
    }
    st_config = {"__version__": versions, "prompts": spec.prompts, "default_prompt_name": None}
    write_json(root / "config_sentence_transformers.json", st_config | {"similarity_fn_name": "cosine"})
