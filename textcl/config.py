"""Training configuration: four dataclasses filled from a YAML recipe plus `--key value` overrides.

Field names follow transformers / sentence-transformers (`model_name_or_path`, `learning_rate`,
`per_device_train_batch_size`, ...). `transformers.HfArgumentParser` turns the dataclasses into a
command-line parser; the recipe's values become its defaults, so the command line wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from textcl.errors import TextclError

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Model folder or Hub id (required)."})
    pooling: str | None = field(
        default=None,
        metadata={"help": "mean|cls|cls_mlp|max|last_token|weighted_mean; cls_mlp = cls + SimCSE's training-only "
                  "MLP head. Default: the model folder's own, else mean."},
    )
    normalize: bool | None = field(default=None, metadata={"help": "L2-normalize the saved model's output."})
    max_seq_length: int | None = field(default=None, metadata={"help": "Truncation length (default: the model's)."})
    dense_dim: int | None = field(default=None, metadata={"help": "Add a Dense projection to this many dims."})
    query_prompt: str | None = field(default=None, metadata={"help": "Prefix for anchors/queries, e.g. 'query: '."})
    document_prompt: str | None = field(default=None, metadata={"help": "Prefix for positives and negatives."})
    query_instruction: str | None = field(
        default=None,
        metadata={"help": "The task of an instruction-following embedder (e.g. 'Given a web search query, retrieve "
                  "relevant passages that answer the query'): the query prompt becomes instruction_template with "
                  "this task; documents get none. Saved as the model's 'query' prompt."},
    )
    instruction_template: str = field(
        default="Instruct: {task}\nQuery: {text}",
        metadata={"help": "How query_instruction (and source_instructions) wrap a query: {task} is the instruction, "
                  "{text} the query and must come last (e5-mistral's form; Qwen3-Embedding: "
                  "'Instruct: {task}\\nQuery:{text}')."},
    )
    include_prompt: bool | None = field(
        default=None,
        metadata={"help": "Pool over the prompts' tokens too; false leaves the query prompt or instruction out of "
                  "mean pooling (sentence-transformers' include_prompt, NV-Embed, gte). Default: the model "
                  "folder's own, else true."},
    )
    append_eos_token: bool = field(
        default=False,
        metadata={"help": "Make the tokenizer end every text with its EOS token (saved in tokenizer.json), as "
                  "decoder embedders trained with last_token pooling expect (Qwen3-Embedding, e5-mistral)."},
    )
    bidirectional: bool = field(
        default=False,
        metadata={"help": "Remove a decoder's causal mask (LLM2Vec, NV-Embed); saved in config.json as "
                  "is_causal: false. An error for encoders and for families whose code ignores it."},
    )
    dropout: float | None = field(default=None, metadata={"help": "Override the model's hidden/attention dropout."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})
    lora: bool | None = field(
        default=None,
        metadata={"help": "Train a LoRA adapter (peft) instead of all weights. Default: LoRA for backbones over "
                  "1B parameters (decoder LLMs), full fine-tuning below."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator: the update is alpha / r * B A."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch's input."})
    lora_target_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "Layers to adapt, e.g. query value, or all-linear (default: for decoders every "
                  "projection of their blocks, q_proj k_proj v_proj o_proj gate_proj up_proj down_proj or their "
                  "family's names; for encoders peft's choice, else every linear layer but the pooler)."},
    )
    lora_merge: bool = field(
        default=False, metadata={"help": "Save the final model with the adapter merged in (a full model) instead "
                                 "of the adapter alone."}
    )


@dataclass
class DataArguments:
    train_data: list[str] = field(
        default_factory=list,
        metadata={"help": "One or more sources, concatenated: .txt files (one text a line: dropout positives), "
                  "csv/tsv/jsonl/parquet files, BEIR folders, or Hub dataset ids (required)."},
    )
    delimiter: str | None = field(
        default=None, metadata={"help": "Field separator of csv/tsv train_data files: , or tab (default: by the "
                                "extension, , for .csv and tab for .tsv)."}
    )
    train_split: str = field(default="train", metadata={"help": "Split of a Hub dataset or BEIR qrels file."})
    anchor_column: str = field(default="anchor", metadata={"help": "Column of the anchors (queries)."})
    positive_column: str | None = field(default="positive", metadata={"help": "Empty: dropout positives."})
    negative_columns: list[str] = field(
        default_factory=list, metadata={"help": "Hard-negative columns (default: columns named negative*)."}
    )
    label_column: str | None = field(default=None, metadata={"help": "Rows sharing a label are positives."})
    num_negatives: int | None = field(default=None, metadata={"help": "Use only the first N negatives a row."})
    query_max_length: int | None = field(default=None, metadata={"help": "Token limit for anchors."})
    document_max_length: int | None = field(default=None, metadata={"help": "Token limit for positives/negatives."})
    augment: list[str] = field(
        default_factory=list,
        metadata={"help": "Augmentations for dropout positives: word_deletion, span_crop, word_repetition."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N rows only."})
    streaming: bool = field(default=False, metadata={"help": "Stream the data (needs max_steps)."})
    group_by_length: bool = field(
        default=False, metadata={"help": "Put texts of similar length in the same batch (less padding)."}
    )
    missing_positive: str = field(
        default="error",
        metadata={"help": "Rows whose positive is empty or null: error (names the rows), drop (counted and "
                  "reported), or dropout (such a row is its own positive through two dropout masks)."},
    )
    source_instructions: list[str] = field(
        default_factory=list,
        metadata={"help": "One query_instruction task per train_data source, in order, wrapped by "
                  "instruction_template ('' keeps the model's query prompt for that source). Training only: the "
                  "saved model's 'query' prompt is query_instruction's."},
    )
    batch_per_source: bool = field(
        default=False, metadata={"help": "Draw every batch from one train_data source (negatives from the same "
                                 "task), sources in proportion to their size."}
    )
    eval_split: float | None = field(
        default=None, metadata={"help": "Hold out this share (0 < x < 1) or this many rows (>= 1) of the train_data "
                                "pairs, chosen by seed, and evaluate retrieval on them at step 0 and at the end: each "
                                "held-out anchor searches all held-out positives and negatives. No held-out text is "
                                "trained on (rows sharing one are left out). Reported as heldout.*."}
    )
    eval_sts: list[str] = field(default_factory=list, metadata={"help": "STS files (sentence1, sentence2, score)."})
    eval_beir: str | None = field(default=None, metadata={"help": "A BEIR folder to evaluate retrieval on."})
    eval_beir_split: str = field(default="test", metadata={"help": "qrels split of eval_beir to evaluate on."})
    remine_steps: int = field(
        default=0, metadata={"help": "Every N optimizer steps, re-encode the corpus with the model being trained and "
                             "replace each row's hard negatives (as `textcl mine` chooses them: its settings from the "
                             "mined file's sidecar, or its defaults for a BEIR folder; num_negatives wins); 0: off."}
    )
    mining_rounds: int = field(
        default=0, metadata={"help": "Rounds of mine -> train in one run (0: off): round 1 mines hard negatives for "
                             "train_data (a BEIR folder or pairs table) with the base model and trains on them; each "
                             "later round mines with the previous round's model and trains again from the base model. "
                             "output_dir holds round-N-negatives/, round-N-model/ and rounds.json; resumable."}
    )
    mining_options: list[str] = field(
        default_factory=list, metadata={"help": "`textcl mine` settings for mining_rounds as key=value, e.g. "
                                        "num_negatives=3 min_negatives=0 query_max_length=64; roundN.key=value "
                                        "for round N only (round2.num_negatives=3)."}
    )


@dataclass
class LossArguments:
    temperature: float = field(
        default=0.05, metadata={"help": "InfoNCE temperature: lower sharpens the softmax over candidates."}
    )
    learnable_temperature: bool = field(
        default=False, metadata={"help": "Learn the temperature (clamped), starting at temperature."}
    )
    symmetric: bool = field(default=False, metadata={"help": "Add the positive->anchor direction."})
    anchor_negatives: bool = field(default=False, metadata={"help": "Other anchors are negatives too."})
    mask_duplicate_texts: bool = field(default=True, metadata={"help": "Mask candidates equal to the positive."})
    false_negative_margin: float | None = field(
        default=None, metadata={"help": "Mask candidates scoring above the positive + margin."}
    )
    tau_plus: float = field(default=0.0, metadata={"help": "Debiased InfoNCE class prior (0 = off)."})
    matryoshka_dims: list[int] = field(
        default_factory=list, metadata={"help": "Also train these embedding prefixes, e.g. 256 128 64 (Matryoshka)."}
    )
    matryoshka_weights: list[float] = field(
        default_factory=list, metadata={"help": "Loss weight of each matryoshka_dims entry (default: 1 each)."}
    )
    gradcache_chunk_size: int | None = field(
        default=None, metadata={"help": "GradCache chunk: exact large-batch gradients at chunk-sized memory."}
    )
    queue_size: int = field(default=0, metadata={"help": "MoCo-style queue of past momentum-encoder keys."})
    momentum: float = field(default=0.999, metadata={"help": "Momentum-encoder update rate for queue_size (MoCo)."})
    guide_model: str | None = field(default=None, metadata={"help": "Frozen model judging false negatives."})
    distill_loss: str = field(
        default="none",
        metadata={"help": "Distillation added to InfoNCE: none; kl (KL between the teacher's and the student's "
                  "softmax over each row's positive and negatives) or margin_mse (MSE of the positive - negative "
                  "score margins), both against the data's teacher scores (positive_score, negative_1_score, ... "
                  "written by `textcl score` or `textcl mine --teacher`); mse (MSE against teacher_model's "
                  "embeddings of the same texts)."},
    )
    distill_weight: float = field(default=1.0, metadata={"help": "loss = InfoNCE + distill_weight x distillation."})
    distill_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of distill_loss kl, on both score rows (the loss is "
                               "multiplied by its square)."}
    )
    teacher_model: str | None = field(
        default=None, metadata={"help": "Frozen model whose embeddings distill_loss mse matches (same tokenizer and "
                                "embedding width as the student, e.g. the model a `textcl shrink` student came from)."}
    )


@dataclass
class TrainingArguments:
    output_dir: str | None = field(default=None, metadata={"help": "Where the model and checkpoints go (required)."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Replace an output_dir that holds another run."}
    )
    per_device_train_batch_size: int = field(
        default=32, metadata={"help": "Rows a batch on each process; the negatives of all processes are shared."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the data (unless max_steps is set)."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: epochs)."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(
        default="linear", metadata={"help": "Learning-rate schedule: linear, cosine, constant, ..."}
    )
    warmup_ratio: float = field(
        default=0.0, metadata={"help": "Share of the steps spent warming up the learning rate."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps (overrides warmup_ratio)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this (0: no clipping)."})
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "Stop the run (exit code 2, no model saved) after this many optimizer steps in "
                             "a row with a NaN or infinite loss or gradient; each such step is skipped."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Averages gradients of several batches; does NOT enlarge the negative pool "
                             "(use gradcache_chunk_size for that)."}
    )
    seed: int = field(default=42, metadata={"help": "Random seed (data order, dropout, initialization)."})
    bf16: str = field(
        default="false",
        metadata={"help": "bf16 mixed precision: auto (bf16 only where it is native: CUDA GPUs with bf16, CPUs "
                  "with AMX or AVX-512-BF16; fp32 elsewhere), true, or false. On CPUs without native bf16 it is "
                  "many times slower than fp32.", "nargs": "?", "const": "true"},
    )
    fp16: bool = field(default=False, metadata={"help": "fp16 mixed precision with a loss scaler (GPUs)."})
    use_cpu: bool = field(default=False, metadata={"help": "Train on the CPU even when a GPU is present."})
    forward_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Embed each group in length-sorted chunks of this many rows, each padded to its own "
                  "longest text (the loss still sees the whole batch). Default: 32 on CPU, 0 (whole groups) on GPU."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute each layer's activations in the backward instead of keeping "
                                 "them: less memory, about a third more compute."}
    )
    torch_compile: bool = field(
        default=False, metadata={"help": "Compile the transformer with torch.compile (inductor); the first steps "
                                 "pay the compilation."}
    )
    torch_compile_backend: str = field(
        default="inductor", metadata={"help": "torch.compile backend: inductor (generated kernels), aot_eager "
                                      "(graph capture only; fast to compile), ..."}
    )
    ddp_timeout: int = field(
        default=1800, metadata={"help": "Seconds a multi-process collective may wait: when a process dies or "
                                "stalls, the others stop after this long with one line naming the step."}
    )
    dataloader_drop_last: bool = field(default=False, metadata={"help": "Drop each epoch's last, short batch."})
    logging_steps: int = field(default=10, metadata={"help": "Log to metrics.jsonl every N steps."})
    report_to: list[str] = field(default_factory=list, metadata={"help": "Trackers: tensorboard, wandb, ..."})
    eval_steps: int | None = field(
        default=None, metadata={"help": "Evaluate every N steps (and always at the end; the base model at step 0)."}
    )
    metric_for_best_model: str | None = field(
        default=None, metadata={"help": "Keep the best model by sts or retrieval (their headline: Spearman, "
                                 "nDCG@10) or by one figure, e.g. retrieval.recall@100."}
    )
    greater_is_better: bool = field(default=True, metadata={"help": "metric_for_best_model improves upwards."})
    save_steps: int | None = field(default=None, metadata={"help": "Write a checkpoint every N steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most N checkpoints (oldest removed)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "latest, or a checkpoint folder."})
    push_to_hub: bool = field(
        default=False, metadata={"help": "Upload the final model to the Hugging Face Hub (token: HF_TOKEN or "
                                 "`hf auth login`)."}
    )
    hub_model_id: str | None = field(default=None, metadata={"help": "Repository, e.g. user/name (default: the "
                                                              "output_dir's name in your namespace)."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repository as private."})
    hub_revision: str | None = field(default=None, metadata={"help": "Branch to push to (created if missing)."})


@dataclass
class TrainConfig:
    model: ModelArguments
    data: DataArguments
    loss: LossArguments
    training: TrainingArguments

    def to_dict(self) -> dict[str, Any]:
        """All fields in one flat mapping, as in a recipe."""
        parts = (self.model, self.data, self.loss, self.training)
        return {key: value for part in parts for key, value in dataclasses.asdict(part).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return parse_config(values, [])


PARTS = (ModelArguments, DataArguments, LossArguments, TrainingArguments)
FIELDS = [f.name for part in PARTS for f in dataclasses.fields(part)]
REQUIRED = ("model_name_or_path", "train_data", "output_dir")
# Old names users may have written in recipes or on the command line -> the current name.
DEPRECATED_KEYS = {"passage_max_length": "document_max_length"}
MISSING_POSITIVE = ("error", "drop", "dropout")
DISTILL_LOSSES = ("none", "kl", "margin_mse", "mse")
TEACHER_SCORE_LOSSES = ("kl", "margin_mse")  # read the teacher scores that came with the data
AUGMENTATIONS = ("word_deletion", "span_crop", "word_repetition")
LIST_FIELDS = {f.name for part in PARTS for f in dataclasses.fields(part) if str(f.type).startswith("list")}


def closest(key: str) -> str:
    match = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.0)
    return f"; did you mean {match[0]!r}?" if match else ""


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML recipe, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise TextclError(f"recipe {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise TextclError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise TextclError(f"recipe {path} must be a mapping of key: value lines")
    return values


def parse_config(recipe: dict[str, Any], overrides: list[str]) -> TrainConfig:
    """Recipe values, then `--key value` overrides, into a TrainConfig: known keys, typed values, the required
    settings present. The rules between settings are checked by `textcl.training.plan.check_config`."""
    recipe = {renamed(key): value for key, value in recipe.items()}
    overrides = [f"--{renamed(item[2:])}" if item.startswith("--") else item for item in overrides]
    for key in recipe:
        if key not in FIELDS:
            raise TextclError(f"unknown recipe key {key!r}{closest(key)}")
    overrides, emptied = emptied_lists(overrides)
    parser = HfArgumentParser(PARTS, allow_abbrev=False, exit_on_error=False)
    parser.set_defaults(**{key: stringify(as_list(key, value)) for key, value in recipe.items() if key not in emptied})
    parser.set_defaults(**{key: [] for key in emptied})
    try:
        *parts, remaining = parser.parse_args_into_dataclasses(args=overrides, return_remaining_strings=True)
    except argparse.ArgumentError as error:
        name = (error.argument_name or "").split("/")[0]
        empty = f"; pass {name} none for an empty list" if name else ""
        raise TextclError(f"{error}{empty if 'expected' in str(error) else ''}") from None
    if remaining:
        flag = next((item for item in remaining if item.startswith("--")), remaining[0])
        raise TextclError(f"unknown option {flag!r}{closest(flag.lstrip('-'))}")
    config = TrainConfig(*parts)
    for part in parts:  # `--eval_beir none` turns an optional setting off, as `--eval_sts none` empties a list
        for item in dataclasses.fields(part):
            if "None" in str(item.type) and "str" in str(item.type) and isinstance(getattr(part, item.name), str) \
                    and getattr(part, item.name).strip().lower() == "none":
                setattr(part, item.name, None)
    config.training.bf16 = bf16_setting(config.training.bf16)
    values = config.to_dict()
    missing = [key for key in REQUIRED if not values[key]]
    if missing:
        raise TextclError(f"missing required setting {missing[0]!r}: add it to the recipe or pass --{missing[0]}")
    return config


def instruction_prompt(template: str, task: str) -> str:
    """The query prompt (a prefix) that wraps a query in `template` with `task`: "Instruct: {task}\\nQuery: {text}"
    and "Find the answer" give "Instruct: Find the answer\\nQuery: "."""
    if "{task}" not in template or not template.endswith("{text}") or template.count("{text}") != 1:
        raise TextclError(f"instruction_template {template!r} must hold {{task}} and end with {{text}} (a prompt is "
                          "a prefix), e.g. 'Instruct: {task}\\nQuery: {text}'")
    return template.removesuffix("{text}").replace("{task}", task)


def bf16_setting(value: object) -> str:
    """A `bf16` setting (bool, None or text such as "yes") as "auto", "true" or "false"."""
    text = str(value).strip().lower() if value is not None else "false"
    if text == "auto":
        return text
    if text in ("true", "yes", "1", "on") or text in ("false", "no", "0", "off", "none", ""):
        return "true" if text in ("true", "yes", "1", "on") else "false"
    raise TextclError(f"bf16 must be auto, true or false; got {value!r}")


def renamed(key: str) -> str:
    """The current name of a setting, with a one-line deprecation message for an old one."""
    name, _, value = key.partition("=")
    if name not in DEPRECATED_KEYS:
        return key
    logger.warning("textcl: setting %r is deprecated; use %r", name, DEPRECATED_KEYS[name])
    return DEPRECATED_KEYS[name] + (f"={value}" if value else "")


def is_none(value: Any) -> bool:
    """`none` (any case), an empty text or an empty list: the spelling that empties a list setting."""
    return value == [] or (isinstance(value, str) and value.strip().lower() in ("none", "")) or (
        isinstance(value, list) and len(value) == 1 and is_none(value[0]))


def emptied_lists(overrides: list[str]) -> tuple[list[str], set[str]]:
    """(the overrides without `--LIST none`, the list settings they empty): `--eval_sts none` (or '') sets
    eval_sts to [] (argparse cannot give an empty list to a nargs="+" option, nor `none` to a list of numbers)."""
    kept, emptied, index = [], set(), 0
    while index < len(overrides):
        item = overrides[index]
        name, equals, inline = item[2:].partition("=") if item.startswith("--") else ("", "", "")
        if name in LIST_FIELDS and equals and is_none(inline):
            emptied.add(name)
        elif (name in LIST_FIELDS and not equals and index + 1 < len(overrides) and is_none(overrides[index + 1])
              and (index + 2 == len(overrides) or overrides[index + 2].startswith("--"))):
            emptied.add(name)
            index += 1
        else:
            kept.append(item)
        index += 1
    return kept, emptied


def as_list(key: str, value: Any) -> Any:
    """A scalar recipe value for a list setting becomes a one-item list (`train_data: x.tsv`); `none` an empty one."""
    if key in LIST_FIELDS and is_none(value):
        return []
    return [value] if key in LIST_FIELDS and not isinstance(value, list) and value is not None else value


def stringify(value: Any) -> Any:
    """YAML scalars as argparse defaults: strings are parsed by the field's type (so '3e-5' becomes a
    float), while lists, booleans and None pass through unchanged."""
    if isinstance(value, (list, bool)) or value is None:
        return value
    return str(value)


def load_config(recipe_path: str | None, overrides: list[str]) -> TrainConfig:
    return parse_config(read_recipe(recipe_path) if recipe_path else {}, overrides)
