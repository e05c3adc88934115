"""The run plan: a `TrainConfig` checked once and turned into the small option objects each part of a run reads.

The config travels one way: the CLI (or `textcl.train`) makes a `RunPlan` with `plan_run`, the trainer and
the output folder read the plan. Every check that needs only the config sits here, so a bad recipe is one
line before torch or any model loads (this module imports neither):

- `check_config`: the settings agree with each other, and the local files they name exist;
- `check_launch`: the settings fit how the run was launched (`Launch`: processes, DeepSpeed, sharding),
  run by the trainer once its Accelerator exists.

Checks that need what the run loaded are the named hooks below, run by the trainer in this order:

1. `check_model(plan, encoder)`: the model is loaded, no data is read yet (gradient checkpointing);
2. `check_data(plan, data)`: the training data is loaded (distillation needs hard negatives).

No function outside the plan, the trainer and the CLI takes the whole `TrainConfig`
(tests/test_architecture.py): the parts get `StepOptions`, `EvaluationPlan`, `OutputPlan` or `Schedule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from textcl.config import (
    AUGMENTATIONS,
    DISTILL_LOSSES,
    MISSING_POSITIVE,
    TEACHER_SCORE_LOSSES,
    LossArguments,
    TrainConfig,
    instruction_prompt,
)
from textcl.errors import TextclError
from textcl.io.sources import check_local_sources, data_sources


@dataclass(frozen=True)
class Launch:
    """How the run was launched, as the plan's checks need it (`textcl.training.parallel.launch_of` reads it
    from the Accelerator)."""

    num_processes: int = 1
    device_type: str = "cpu"
    gradient_accumulation_steps: int = 1
    deepspeed: bool = False
    shards_parameters: bool = False  # FSDP or DeepSpeed ZeRO-3: no process holds every weight


@dataclass(frozen=True)
class StepOptions:
    """What one optimizer step reads (`textcl.training.step.StepRunner`, the gradient clipping)."""

    gradcache_chunk_size: int = 0  # 0: no GradCache
    forward_chunk_size: int = 0  # rows a plain forward embeds at once; 0: whole groups
    mask_duplicate_texts: bool = True
    queue_size: int = 0
    max_grad_norm: float = 1.0  # 0: no clipping


@dataclass(frozen=True)
class Schedule:
    """How long the run is and how its learning rate moves."""

    max_steps: int
    num_train_epochs: float
    gradient_accumulation_steps: int
    warmup_steps: int
    warmup_ratio: float
    lr_scheduler_type: str

    def total_steps(self, batches_per_epoch: int | None) -> int:
        """Optimizer steps of the run: max_steps, else the epochs' worth. accelerate also steps at the end of
        every epoch, so an epoch of n batches takes ceil(n / gradient_accumulation_steps) steps (as in
        transformers). `batches_per_epoch` None: streamed data, which `check_config` made set max_steps."""
        if self.max_steps > 0 or batches_per_epoch is None:
            return self.max_steps
        steps_per_epoch = math.ceil(batches_per_epoch / self.gradient_accumulation_steps)
        return max(1, math.ceil(self.num_train_epochs * steps_per_epoch))

    def warmup(self, total_steps: int) -> int:
        return self.warmup_steps or math.ceil(self.warmup_ratio * total_steps)


@dataclass(frozen=True)
class EvaluationPlan:
    """What the run evaluates on and when; empty (false) without eval sets."""

    sts: tuple[str, ...] = ()
    beir: str | None = None
    beir_split: str = "test"
    eval_steps: int = 0  # 0: at the start and the end only
    metric_for_best_model: str | None = None  # an evaluator's name (its headline) or a dotted metric
    greater_is_better: bool = True  # for a dotted metric; an evaluator's headline knows its own direction

    def __bool__(self) -> bool:
        return bool(self.sts or self.beir)


@dataclass(frozen=True)
class OutputPlan:
    """The output folder: where, what happens to a run already in it, checkpoints, the saved model, the Hub."""

    output_dir: Path
    overwrite_output_dir: bool = False
    resume_from_checkpoint: str | None = None
    logging_steps: int = 10
    save_steps: int = 0
    save_total_limit: int | None = None
    lora_merge: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool = False
    hub_revision: str | None = None

    @property
    def model_id(self) -> str:
        """The name the model card's usage examples load, and the Hub repository a push goes to."""
        return self.hub_model_id or self.output_dir.resolve().name


@dataclass(frozen=True)
class RunPlan:
    """A checked config and what the parts of the run read from it."""

    config: TrainConfig
    step: StepOptions
    schedule: Schedule
    evaluation: EvaluationPlan
    output: OutputPlan
    reads_teacher_scores: bool  # the loss reads the data's teacher scores (distill_loss kl or margin_mse)

    def for_launch(self, launch: Launch) -> RunPlan:
        """The plan checked against `launch`, with the settings whose default depends on it resolved."""
        check_launch(self.config, launch)
        chosen = self.config.training.forward_chunk_size
        forward = chosen if chosen is not None else (32 if launch.device_type == "cpu" else 0)
        return replace(self, step=replace(self.step, forward_chunk_size=forward))


def reads_teacher_scores(loss: LossArguments) -> bool:
    """The run's loss needs the data's teacher scores (distill_loss kl or margin_mse)."""
    return loss.distill_loss in TEACHER_SCORE_LOSSES


def plan_run(config: TrainConfig, recipe: str | None = None) -> RunPlan:
    """`config` checked (`check_config`; `recipe` names where to look in a missing-file message) and planned."""
    check_config(config, recipe)
    model, data, loss, training = config.model, config.data, config.loss, config.training
    step = StepOptions(gradcache_chunk_size=loss.gradcache_chunk_size or 0,
                       forward_chunk_size=training.forward_chunk_size or 0,
                       mask_duplicate_texts=loss.mask_duplicate_texts, queue_size=loss.queue_size,
                       max_grad_norm=training.max_grad_norm)
    schedule = Schedule(training.max_steps, training.num_train_epochs, training.gradient_accumulation_steps,
                        training.warmup_steps, training.warmup_ratio, training.lr_scheduler_type)
    evaluation = EvaluationPlan(tuple(data.eval_sts), data.eval_beir, data.eval_beir_split, training.eval_steps,
                                training.metric_for_best_model, training.greater_is_better)
    output = OutputPlan(Path(training.output_dir), training.overwrite_output_dir, training.resume_from_checkpoint,
                        training.logging_steps, training.save_steps, training.save_total_limit, model.lora_merge,
                        training.push_to_hub, training.hub_model_id, training.hub_private_repo, training.hub_revision)
    return RunPlan(config, step, schedule, evaluation, output, reads_teacher_scores(loss))


# ---- checks on the config alone ---------------------------------------------------------------------------------

def check_config(config: TrainConfig, recipe: str | None = None) -> None:
    """Every rule between the settings, and the local files they name (one line each, naming the fix)."""
    data, training = config.data, config.training
    if training.metric_for_best_model and not (data.eval_sts or data.eval_beir or data.eval_split):
        raise TextclError("metric_for_best_model needs eval_split, eval_sts or eval_beir to evaluate on")
    if training.bf16 == "true" and training.fp16:
        raise TextclError("bf16 and fp16 are both set; choose one")
    if data.missing_positive not in MISSING_POSITIVE:
        raise TextclError(f"missing_positive {data.missing_positive!r}: use one of {', '.join(MISSING_POSITIVE)}")
    if training.max_nonfinite_steps < 1:
        raise TextclError("max_nonfinite_steps must be at least 1 (1 stops at the first non-finite step)")
    if config.model.lora_merge and config.model.lora is False:
        raise TextclError("lora_merge merges a LoRA adapter: set lora: true too, or drop lora_merge")
    if training.ddp_timeout < 1:
        raise TextclError(f"ddp_timeout must be a positive number of seconds, got {training.ddp_timeout}")
    if data.streaming and training.max_steps <= 0:
        raise TextclError("streaming data has no length: set max_steps")
    unknown = set(data.augment) - set(AUGMENTATIONS)
    if unknown:
        raise TextclError(f"unknown augmentation {min(unknown)!r}; valid: {', '.join(AUGMENTATIONS)}")
    if data.batch_per_source and data.streaming:
        raise TextclError("batch_per_source needs map-style data: set streaming: false")
    check_distillation(config.loss)
    check_remining(config)
    check_mining_rounds(config)
    check_instructions(config)
    check_local_sources(data_sources(data), recipe)  # a missing file is one line before the model loads


def check_remining(config: TrainConfig) -> None:
    """remine_steps needs one map-style source, and no teacher scores (they belong to the negatives it replaces)."""
    data = config.data
    if data.remine_steps < 0:
        raise TextclError("remine_steps must be >= 0 (0: off)")
    if not data.remine_steps:
        return
    if data.streaming or len(data.train_data) != 1:
        raise TextclError("remine_steps re-mines one train_data source (a BEIR folder or a file written by `textcl "
                          "mine`), not streamed: set streaming: false and one train_data")
    if reads_teacher_scores(config.loss):
        raise TextclError(f"remine_steps replaces the negatives whose teacher scores distill_loss "
                          f"{config.loss.distill_loss} reads; use distill_loss mse or none with remine_steps")


def check_mining_rounds(config: TrainConfig) -> None:
    """mining_rounds mines one map-style train_data source; mining_options only with it."""
    data = config.data
    if data.mining_rounds < 0:
        raise TextclError("mining_rounds must be >= 0 (0: off)")
    if not data.mining_rounds:
        if data.mining_options:
            raise TextclError("mining_options set how mining_rounds mine; set mining_rounds too, or drop them")
        return
    if data.streaming or len(data.train_data) != 1:
        raise TextclError("mining_rounds mines one train_data source (a BEIR folder or a pairs table), not streamed: "
                          "set streaming: false and one train_data")
    for option in data.mining_options:
        if "=" not in option:
            raise TextclError(f"mining_options {option!r}: write each as key=value, e.g. num_negatives=3")


def check_instructions(config: TrainConfig) -> None:
    """query_instruction excludes query_prompt; source_instructions gives one task per train_data source."""
    model, data = config.model, config.data
    if model.query_instruction and model.query_prompt:
        raise TextclError("query_instruction and query_prompt both set the query prompt; keep one")
    if model.query_instruction or data.source_instructions:
        instruction_prompt(model.instruction_template, "")
    if data.source_instructions and len(data.source_instructions) != len(data.train_data):
        raise TextclError(f"source_instructions holds {len(data.source_instructions)} tasks for "
                          f"{len(data.train_data)} train_data sources: give one per source ('' for the default)")


def check_distillation(loss: LossArguments) -> None:
    """The distill_* settings and teacher_model agree (whether the data has teacher scores: `check_data`)."""
    if loss.distill_loss not in DISTILL_LOSSES:
        raise TextclError(f"distill_loss {loss.distill_loss!r}: use one of {', '.join(DISTILL_LOSSES)}")
    if loss.distill_loss == "mse" and not loss.teacher_model:
        raise TextclError("distill_loss mse matches a teacher's embeddings: set teacher_model (a model folder or Hub id)")
    if loss.teacher_model and loss.distill_loss != "mse":
        raise TextclError("teacher_model is read by distill_loss mse only (kl and margin_mse read the teacher's scores "
                          "from the data: `textcl score`); set distill_loss: mse or drop teacher_model")
    if not loss.distill_weight > 0 or not loss.distill_temperature > 0:
        raise TextclError("distill_weight and distill_temperature must be > 0")


def check_launch(config: TrainConfig, launch: Launch) -> None:
    """The settings fit the launch: accelerate's gradient accumulation is the recipe's, and what a DeepSpeed or
    sharded run cannot do is refused before any work is done."""
    if launch.gradient_accumulation_steps != config.training.gradient_accumulation_steps:
        raise TextclError(f"the launch sets gradient_accumulation_steps={launch.gradient_accumulation_steps} "
                          f"(its config or ACCELERATE_GRADIENT_ACCUMULATION_STEPS) but the recipe says "
                          f"{config.training.gradient_accumulation_steps}: set it in the recipe only")
    if launch.deepspeed and config.loss.gradcache_chunk_size:
        raise TextclError("gradcache_chunk_size does not work under DeepSpeed (its engine owns the backward); "
                          "launch with recipes/accelerate/fsdp.yaml or ddp.yaml, or drop gradcache_chunk_size")
    if launch.shards_parameters and config.loss.queue_size > 0:
        raise TextclError("queue_size (a momentum encoder) needs every weight on every process: it does not work "
                          "with FSDP or DeepSpeed ZeRO-3; use DDP or ZeRO-2, or set queue_size: 0")
    if launch.shards_parameters and launch.deepspeed and (config.data.eval_sts or config.data.eval_beir):
        raise TextclError("evaluation during training is not supported under DeepSpeed ZeRO-3: drop eval_sts and "
                          "eval_beir and evaluate the saved model with `textcl eval`")


# ---- hooks on what the run loaded, in the order the trainer runs them ---------------------------------------

def check_model(plan: RunPlan, encoder: Any) -> None:
    """Hook 1, the model is loaded and no data read yet: gradient_checkpointing needs a model that supports it."""
    model = encoder.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA adapter's base
    if plan.config.training.gradient_checkpointing and not getattr(base, "supports_gradient_checkpointing", False):
        raise TextclError(f"gradient_checkpointing: {type(base).__name__} does not support it; set "
                          "gradient_checkpointing: false")


def check_data(plan: RunPlan, num_negatives: int) -> None:
    """Hook 2, the data is loaded: KL and MarginMSE compare the positive with hard negatives (a softmax over the
    positive alone is 1), so the data must have some."""
    loss = plan.config.loss
    if plan.reads_teacher_scores and num_negatives == 0:
        raise TextclError(f"distill_loss {loss.distill_loss} needs hard negatives in the data (with their teacher "
                          "scores); mine them with `textcl mine TEACHER` (or `--teacher TEACHER`), or use "
                          "distill_loss mse")
