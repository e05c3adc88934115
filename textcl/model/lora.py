"""LoRA adapters (Hu et al. 2021) on the encoder's transformer, through `peft`.

`add_lora` wraps the encoder's transformer (an `nn.Module`) in a `peft.PeftModel`: every base weight is frozen
and each target linear layer `W [out, in]` gains `alpha / r * B A` with `A [r, in]` (random) and `B [out, r]` (zeros,
so training starts from the base model exactly). Only A and B train. A saved adapter folder holds
`adapter_config.json` (whose `base_model_name_or_path` names the base model) and
`adapter_model.safetensors` next to the tokenizer and sentence-transformers configs, so both
`Encoder.load` and `SentenceTransformer` load it; `merge_adapter` folds `B A` into the weights for a plain
full model. Everything here works on the transformer module, never on the Encoder (which imports this).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import transformers
from torch import nn

from textcl.errors import TextclError
from textcl.model.decoder import decoder_lora_targets, is_decoder
from textcl.model.location import resolve_model_dir

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FULL_MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_adapter(model: nn.Module) -> bool:
    """True for a transformer wrapped by peft (an Encoder whose `model` is a LoRA adapter over a base)."""
    from peft import PeftModel  # peft is imported only where adapters are used: it costs ~1 s at import

    return isinstance(model, PeftModel)


def is_adapter_folder(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def default_target_modules(model: nn.Module) -> tuple[list[str] | str, list[str] | None]:
    """(target_modules, exclude_modules): for a decoder every projection of its blocks (`decoder_lora_targets`);
    peft's choice for other known architectures (query and value projections for BERT-like encoders), else
    every linear layer except the pooler, which pooling never uses."""
    if is_decoder(model):
        return decoder_lora_targets(model), None
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    mapped = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(getattr(model.config, "model_type", None))
    if mapped:
        return list(mapped), None
    pooler = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and "pooler" in name]
    return "all-linear", pooler or None


def base_model_name(model: nn.Module, model_name_or_path: str) -> str:
    """What the adapter names as its base: the Hub id it came from, else the absolute local folder."""
    if Path(model_name_or_path).expanduser().exists():
        return str(Path(model.name_or_path).resolve())
    return model_name_or_path


def add_lora(
    model: nn.Module,
    model_name_or_path: str,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.1,
    target_modules: Sequence[str] = (),
) -> nn.Module:
    """The transformer `model` as a LoRA adapter of rank `r`, scale `alpha / r`, `dropout` on the LoRA branch,
    on `target_modules` (default: `default_target_modules`; ["all-linear"] for every linear layer); peft wraps
    `model` itself, so use the returned module in its place. `model_name_or_path` is what the model was loaded
    from: the adapter names it as its base.

    A model loaded from an adapter folder keeps training that adapter (its own rank and targets).
    """
    from peft import LoraConfig, TaskType, get_peft_model  # see is_adapter: peft loads only where adapters are used

    if is_adapter(model):
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("lora_" in name)
        return model
    targets, exclude = default_target_modules(model)
    if target_modules:
        chosen = list(target_modules)
        targets, exclude = ("all-linear" if chosen == ["all-linear"] else chosen), None
    config = LoraConfig(
        task_type=TaskType.FEATURE_EXTRACTION, r=r, lora_alpha=alpha,
        lora_dropout=dropout, target_modules=targets, exclude_modules=exclude,
    )
    base = base_model_name(model, model_name_or_path)
    try:
        adapted = get_peft_model(model, config)
    except ValueError as error:
        modules = model.named_modules()
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules if isinstance(module, nn.Linear)})
        raise TextclError(
            f"lora_target_modules {targets} match no layer of this model ({str(error).splitlines()[0][:120]}); "
            f"its linear layers are named: {', '.join(linear)}"
        ) from None
    adapted.peft_config["default"].base_model_name_or_path = base
    return adapted


def load_adapter_model(folder: Path, trust_remote_code: bool = False) -> nn.Module:
    """The base model named in `folder/adapter_config.json` with the adapter applied (frozen, for inference)."""
    from peft import PeftModel  # see is_adapter

    config = json.loads((folder / "adapter_config.json").read_text())
    if not config.get("base_model_name_or_path"):
        raise TextclError(f"{folder}/adapter_config.json names no base_model_name_or_path; set it to the base model")
    base_dir = resolve_model_dir(config["base_model_name_or_path"], config.get("revision"))
    base = transformers.AutoModel.from_pretrained(base_dir, trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, folder)
    model.name_or_path = str(folder)  # where this model comes from (e.g. for search index metadata), not its base
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """The base model of the adapter `model` with the adapter folded into its weights (peft merges in place:
    merge a copy to keep `model`)."""
    if not is_adapter(model):
        raise TextclError("this model has no LoRA adapter to merge")
    return model.merge_and_unload()


def remove_other_format(root: Path, adapter: bool) -> None:
    """Before saving into `root`, delete the weights of the other format (a full model's when writing an
    adapter, an adapter's when writing a full model), which loaders would otherwise pick up instead."""
    for name in FULL_MODEL_FILES if adapter else ADAPTER_FILES:
        (root / name).unlink(missing_ok=True)
    if adapter:
        for shard in root.glob("model-*-of-*.safetensors"):
            shard.unlink()


def adapter_summary(model: nn.Module) -> dict[str, Any] | None:
    """{r, alpha, dropout, target_modules, base_model} of the transformer's adapter, or None without one."""
    if not is_adapter(model):
        return None
    config = model.peft_config["default"]
    targets = config.target_modules
    return {
        "r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
        "target_modules": ", ".join(sorted(targets)) if isinstance(targets, (set, list)) else str(targets),
        "base_model": config.base_model_name_or_path,
    }
