"""The training loop on `accelerate`: one CPU to many GPUs with the same results semantics.

`train(config)` plans the run (`textcl.training.plan`), builds the encoder, data, loss and optimizer, then
steps until the plan's total steps. After every optimizer step the run's actions (`textcl.training.actions`)
log to `output_dir/metrics.jsonl` (and the trackers in `report_to`), re-mine, evaluate every `eval_steps` and
checkpoint atomically every `save_steps`. The final (or best) model is saved as a sentence-transformers folder
with `textcl.json` holding the resolved config and final metrics (`textcl.training.outputs`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from textcl.config import TrainConfig, TrainingArguments
from textcl.data.loader import build_training_data
from textcl.errors import TextclError
from textcl.evaluation.evaluators import PairsEvaluator, run_evaluators
from textcl.hub.model_card import TrainingRun
from textcl.hub.push import require_token
from textcl.io.atomic import check_free_space, exclusive_lock
from textcl.model.device import default_device
from textcl.model.encoder import Encoder
from textcl.model.lora import is_adapter
from textcl.model.precision import resolve_precision
from textcl.training.actions import Action, best_model_rule, default_actions, evaluators_for
from textcl.training.checkpoint import TrainingPosition, load_checkpoint, resolve_resume, save_checkpoint
from textcl.training.guards import NonFiniteGuard, gradient_norm, nonfinite_tensors, step_is_finite
from textcl.training.outputs import RunOutputs, prepare_output_dir, state_bytes, trim_metrics
from textcl.training.parallel import (
    any_process,
    apply_launch_config,
    collective_failures,
    evaluation_encoder,
    full_encoder,
    process_group_kwargs,
    shard_batches,
)
from textcl.training.plan import RunPlan, check_data, check_model, plan_run
from textcl.training.remining import build_remining
from textcl.training.setup import (
    apply_training_options,
    build_encoder,
    build_helpers,
    build_loss,
    build_optimizer,
    build_teacher,
    source_query_prompts,
)
from textcl.training.step import StepRunner, optimizer_step
from textcl.training.summary import run_warnings, summary_lines


def run_precision(args: TrainingArguments) -> tuple[str, str]:
    """(precision, why): fp16 when asked, else what `bf16` resolves to on the run's device."""
    if args.fp16:
        return "fp16", "fp16: true"
    use_cpu = args.use_cpu or not torch.cuda.is_available()
    return resolve_precision(args.bf16, torch.device("cpu") if use_cpu else default_device())


class Trainer:
    """Holds the prepared objects of one run and its loop; `train()` is the public entry point.

    `config` is a TrainConfig or the RunPlan made of it; `actions` run after every optimizer step, after the
    run's own (`textcl.training.actions.default_actions`).
    """

    def __init__(self, config: TrainConfig | RunPlan, actions: Sequence[Action] = ()) -> None:
        plan = config if isinstance(config, RunPlan) else plan_run(config)
        self.config = config = plan.config
        args = config.training
        if plan.output.push_to_hub:
            require_token()  # a missing token stops the run before training, not after it
        self.output_dir = plan.output.output_dir
        self.precision, why = run_precision(args)
        # accelerate's state is process-wide: a second run in one process (a notebook) may change precision.
        # The partial state (the process group under a launcher) stays, as transformers' Trainer keeps it.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            cpu=args.use_cpu or not torch.cuda.is_available(),
            mixed_precision="no" if self.precision == "fp32" else self.precision,  # not the launch config's
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=args.report_to or None,
            project_dir=str(self.output_dir),
            kwargs_handlers=process_group_kwargs(args.ddp_timeout),
        )
        self.plan = plan = plan.for_launch(apply_launch_config(self.accelerator, args.per_device_train_batch_size))
        if self.accelerator.is_main_process:
            print(f"textcl: training in {self.precision} ({why})")
        set_seed(args.seed, device_specific=True)
        if self.accelerator.is_main_process:
            prepare_output_dir(self.output_dir, plan.output.overwrite_output_dir,
                               bool(plan.output.resume_from_checkpoint))
        self.accelerator.wait_for_everyone()
        self.rebuild = functools.partial(build_encoder, config.model)  # a fresh copy, for sharded weights
        self.build_pieces(plan)
        self.position = TrainingPosition()
        self.rows_left_out = 0  # rows that fit in no batch of their epoch (see textcl.data.sampler), this process's epochs
        # textcl's own state, saved as safetensors + JSON by textcl.training.checkpoint (never as pickles)
        self.objects = {"scheduler": self.scheduler, "position": self.position, "loss": self.loss}
        self.objects |= {type(helper).__name__: helper for helper in self.steps.stateful()}
        if self.remining is not None:
            self.objects["remining"] = self.remining
        self.guard = NonFiniteGuard(args.max_nonfinite_steps)
        self.evaluators = evaluators_for(plan.evaluation)
        if self.data.held_out:  # rows of the run's own data, kept out of training (eval_split)
            self.evaluators.append(PairsEvaluator.of(self.data.held_out))
        self.best_rule = best_model_rule(plan.evaluation, self.evaluators)
        self.actions: list[Action] = [*default_actions(plan.evaluation, plan.output), *actions]
        model_bytes, self.checkpoint_bytes = self.saved_bytes()
        self.outputs = RunOutputs(plan.output, self.accelerator, model_bytes)
        # a disk too small fails now, not after hours of training (on every process: they all stop)
        check_free_space(self.output_dir, model_bytes + (self.checkpoint_bytes if plan.output.save_steps else 0),
                         "this run", "free some space or choose another output_dir")
        self.resume_from = resolve_resume(self.output_dir, plan.output.resume_from_checkpoint,
                                          self.accelerator.is_main_process)

    def build_pieces(self, plan: RunPlan) -> None:
        """Encoder, data, loss, optimizer, helpers, scheduler and step runner, in the order they need each other:
        the model before the data (its tokenizer), the data before the distillation check, the helpers before
        compiling (the momentum copy stays uncompiled), the prepared loader before the step count."""
        config, args, accelerator = plan.config, plan.config.training, self.accelerator
        self.encoder = build_encoder(config.model)
        check_model(plan, self.encoder)
        with accelerator.main_process_first():
            self.data = build_training_data(
                config.data, tokenizer=self.encoder.tokenizer, max_seq_length=self.encoder.max_seq_length,
                prompts=self.encoder.prompts, batch_size=args.per_device_train_batch_size, seed=args.seed,
                drop_last=args.dataloader_drop_last, num_processes=accelerator.num_processes,
                process_index=accelerator.process_index, teacher_scores=plan.reads_teacher_scores,
                source_query_prompts=source_query_prompts(config.model, config.data, self.encoder.prompts),
                prompt_length=None if self.encoder.include_prompt else self.encoder.prompt_length,
            )
        check_data(plan, self.data.num_negatives)
        self.remining = build_remining(config.data, self.data.loader.dataset, self.data.collator,
                                       self.precision if self.precision == "bf16" else "fp32")
        self.loss = build_loss(config.loss)
        self.optimizer = build_optimizer(self.encoder, self.loss, args)
        momentum, guide = build_helpers(config.loss, self.encoder, accelerator.device)
        teacher = build_teacher(config.loss, self.encoder, accelerator.device)
        apply_training_options(self.encoder, args)  # after build_helpers: the momentum copy stays uncompiled
        self.model, self.optimizer = accelerator.prepare(self.encoder, self.optimizer)
        streaming = config.data.streaming  # streams are split between processes by the data, not by accelerate
        self.prepared_loader = self.data.loader if streaming else shard_batches(accelerator, self.data.loader)
        self.loss = self.loss.to(accelerator.device)
        self.total_steps = plan.schedule.total_steps(None if streaming else len(self.prepared_loader))
        # Stepped by hand once per optimizer step: accelerate's prepared scheduler would step once per
        # process, which is right only when the step count was computed for a single process.
        self.scheduler = get_scheduler(plan.schedule.lr_scheduler_type, self.optimizer,
                                       plan.schedule.warmup(self.total_steps), self.total_steps)
        self.steps = StepRunner(plan.step, self.model, self.loss, accelerator, momentum, guide, teacher)

    def start_epoch(self, epoch: int) -> None:
        """Point the data and accelerate's loader at `epoch`.

        accelerate's loader re-applies its own epoch counter to the batch sampler on every `iter()`,
        so it must hear the epoch too, or a resumed run would replay epoch 0's order.
        """
        self.data.set_epoch(epoch)
        self.rows_left_out += getattr(self.data.batcher, "left_out", 0)
        if hasattr(self.prepared_loader, "set_epoch"):
            self.prepared_loader.set_epoch(epoch)

    def unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def evaluation_encoder(self) -> Encoder:
        """The encoder to evaluate or mine with, on every process (a full copy under FSDP)."""
        return evaluation_encoder(self.accelerator, self.model, self.rebuild)

    def evaluate(self) -> dict[str, Any]:
        """The run's evaluators on every process (corpus encoding is sharded across them); {} without eval sets."""
        if not self.evaluators:
            return {}
        return run_evaluators(self.evaluators, self.evaluation_encoder())

    def saved_bytes(self) -> tuple[int, int]:
        """About how many bytes the final model and one checkpoint take (weights; Adam's two moments of the
        trainable ones; the momentum encoder and queue)."""
        adapter_only = is_adapter(self.encoder.model) and not self.plan.output.lora_merge
        model = state_bytes(self.encoder, trainable_only=adapter_only)
        helpers = sum(state_bytes(helper) for helper in self.steps.stateful())
        return model, state_bytes(self.encoder) + 2 * state_bytes(self.encoder, trainable_only=True) + helpers

    def keep_best(self, metrics: dict[str, Any]) -> None:
        """Save the model to best_model/ when the metric_for_best_model rule says it improved."""
        if self.best_rule is None or not metrics:
            return
        value = self.best_rule.value(metrics)
        if self.best_rule.improves(value, self.position.best_metric) and not self.weights_broken():
            self.position.best_metric, self.position.best_step = value, self.position.step
            self.outputs.save_best(self.trained_encoder())

    def weights_broken(self) -> bool:
        """Some weight is NaN or infinite (on any process); such weights are never saved."""
        return any_process(self.accelerator, bool(nonfinite_tensors(self.model)))

    def clip_gradients(self) -> Any:
        """Clip the gradients to max_grad_norm (when set) and return their norm before clipping; None under fp16,
        whose gradient scaler skips overflowing steps itself."""
        max_norm = self.plan.step.max_grad_norm
        if max_norm > 0:
            norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        else:
            norm = gradient_norm(self.model.parameters())
        return None if self.accelerator.scaler is not None else norm

    def checkpoint(self) -> None:
        """A checkpoint of this step, unless the weights are not finite or the last step was skipped (the last
        good checkpoint stays the newest)."""
        step = self.position.step
        if self.guard.streak or self.weights_broken():
            if self.accelerator.is_main_process:
                tqdm.write(f"textcl: warning: step {step}: no checkpoint written (non-finite loss, gradient or "
                           "weights)", file=sys.stderr)
            return
        path = save_checkpoint(self.accelerator, self.output_dir, step, self.plan.output.save_total_limit,
                               self.objects, self.checkpoint_bytes)
        self.guard.last_checkpoint = str(path)

    def start(self) -> None:
        """Before the first step: textcl.json, the trackers, the resumed state, the base model's evaluation."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            self.outputs.write_run_file(self.config.to_dict(), {})
        accelerator.init_trackers("textcl", config={k: str(v) for k, v in self.config.to_dict().items()})
        if self.resume_from is not None:
            load_checkpoint(accelerator, self.resume_from, self.objects)
            self.guard.last_checkpoint = str(self.resume_from)
            if accelerator.is_main_process:
                trim_metrics(self.output_dir, self.position.step)
        if self.position.step == 0 and self.evaluators:
            if accelerator.is_main_process:  # the "before" of the closing summary, logged as step 0
                print("textcl: evaluating the base model (step 0)", file=sys.stderr)
            self.outputs.log({"step": 0, **self.evaluate()})

    def train(self) -> dict[str, Any]:
        self.start()
        accelerator, position = self.accelerator, self.position
        self.model.train()  # from_pretrained returns eval mode: no dropout, so no SimCSE positives
        self.bar = tqdm(total=self.total_steps, initial=position.step, disable=not accelerator.is_main_process,
                        desc="train")
        self.started, self.samples = time.perf_counter(), 0
        args = self.config.training
        epochs = math.ceil(args.num_train_epochs) if args.max_steps <= 0 else math.inf  # never past the epochs
        while position.step < self.total_steps and position.epoch < epochs:
            self.start_epoch(position.epoch)
            loader = self.prepared_loader
            if position.batches_in_epoch:
                loader = accelerator.skip_first_batches(loader, position.batches_in_epoch)
            for batch in self.steps.batches(loader if self.remining is None else self.remining.apply(loader)):
                stepped = self.train_batch(batch)
                if stepped is None:
                    continue
                for action in self.actions:
                    action.on_step_end(self)
                if position.step >= self.total_steps:
                    break
            else:
                position.epoch += 1
                position.batches_in_epoch = 0
        self.bar.close()
        runtime = time.perf_counter() - self.started
        speed = {"train_runtime": runtime, "train_samples_per_second": self.samples / runtime}
        if self.rows_left_out:
            speed["rows_left_out"] = self.rows_left_out
        self.outputs.log({"step": position.step, **speed})
        metrics = self.finish()
        if accelerator.is_main_process:
            records, saved = self.outputs.records(), self.saved_evaluation(metrics)[0]
            print("\n".join(summary_lines(self.output_dir, records, saved, self.evaluators)))
            batch = self.config.training.per_device_train_batch_size * accelerator.num_processes
            for warning in run_warnings(records, batch, saved, self.evaluators):
                print(f"textcl: warning: {warning}", file=sys.stderr)
        return metrics | {"train": speed}

    def train_batch(self, batch: dict[str, Any]) -> bool | None:
        """Forward and backward of one batch, and the optimizer step when it closes one; returns whether the
        weights were updated, None when the batch only accumulated gradients."""
        accelerator, position = self.accelerator, self.position
        with accelerator.accumulate(self.model):
            loss = self.steps.backward(batch)
            finite = not accelerator.sync_gradients or not any_process(
                accelerator, not step_is_finite(loss, self.clip_gradients()))
            # a non-finite step's gradients are discarded (see textcl.training.guards); an fp16
            # overflow is skipped by the gradient scaler itself
            stepped = finite and optimizer_step(accelerator, self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
        position.batches_in_epoch += 1
        self.samples += batch["anchor"]["input_ids"].shape[0] * accelerator.num_processes
        if not accelerator.sync_gradients:
            return None
        if stepped:
            self.scheduler.step()
        self.last_loss = self.steps.end_step(skipped=not stepped)
        if not self.guard.observe(position.step + 1, finite) and accelerator.is_main_process:
            tqdm.write(f"textcl: warning: step {position.step + 1}: non-finite loss or gradient; update skipped "
                       f"({len(self.guard.streak)} of {self.guard.max_nonfinite_steps} in a row stop the run)",
                       file=sys.stderr)
        position.step += 1
        self.bar.update(1)
        return stepped

    def finish(self) -> dict[str, Any]:
        """Final evaluation, best-model selection, and the saved model folder; returns the evaluation."""
        metrics = self.evaluate()
        if metrics:
            self.outputs.log({"step": self.position.step, **metrics})
            self.keep_best(metrics)
        best = self.outputs.kept_best() if self.best_rule is not None else None
        if best is None and self.weights_broken():
            broken = nonfinite_tensors(self.model)
            where = f" (e.g. {broken[0]})" if broken else ""
            last = self.guard.last_checkpoint or "none was written"
            raise TextclError(f"the trained weights hold non-finite values (NaN or inf){where}; no model saved "
                              f"(the last good checkpoint: {last}); lower learning_rate or set max_grad_norm")
        encoder = None if best is not None else self.trained_encoder()
        if self.accelerator.is_main_process:
            self.outputs.install(encoder, best, functools.partial(self.write_card, metrics),
                                 self.guard.last_checkpoint)
            self.outputs.write_run_file(self.config.to_dict(), metrics)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        self.outputs.push()
        return metrics

    def trained_encoder(self) -> Encoder | None:
        """The encoder to save on the main process (None on the others); with `lora_merge`, a copy with the
        adapter merged into full weights. Every process calls it: sharded weights are gathered first."""
        encoder = full_encoder(self.accelerator, self.model, self.rebuild)
        if encoder is not None and self.plan.output.lora_merge:
            encoder = encoder.merged()
        return encoder

    def saved_evaluation(self, metrics: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """(evaluation, step) of the saved model: the final `metrics`, or the kept best model's (step None: the
        final model)."""
        if self.best_rule is None:
            return metrics, None
        return self.outputs.saved_evaluation(metrics, self.position.best_step, self.evaluators)

    def write_card(self, metrics: dict[str, Any], folder: Any) -> None:
        """folder/README.md describing this run."""
        evaluation, best_step = self.saved_evaluation(metrics)
        run = TrainingRun(
            config=self.config, metrics=evaluation, steps=self.position.step,
            num_processes=self.accelerator.num_processes, train_rows=self.data.rows, best_step=best_step,
            precision=self.precision, headlines=self.evaluators,
            dropout_positives=self.data.dropout_positives, hard_negatives=self.data.num_negatives > 0,
        )
        self.outputs.write_card(folder, self.unwrapped(), run)


def train(config: TrainConfig | RunPlan, actions: Sequence[Action] = ()) -> dict[str, Any]:
    """Run one training job described by `config` (or its RunPlan); returns the final evaluation metrics.
    `actions` run after every optimizer step, after the run's own (`textcl.training.actions`).

    The first process holds output_dir's write lock for the whole run, so a second run into the same folder is
    refused instead of mixing checkpoints with this one.
    """
    plan = config if isinstance(config, RunPlan) else plan_run(config)
    if plan.config.data.mining_rounds:  # the rounds driver calls this once a round, with mining_rounds 0
        raise TextclError("mining_rounds runs through textcl.train (textcl.training.rounds), not the trainer alone")
    output_dir, ddp_timeout = plan.output.output_dir, plan.config.training.ddp_timeout
    first_process = os.environ.get("RANK", "0") == "0"  # before the Accelerator exists (set by launchers)
    existed = output_dir.is_dir()
    lock = exclusive_lock(output_dir, what="the output_dir", lock_file=output_dir / ".textcl.lock")
    with lock if first_process else contextlib.nullcontext():
        # listed under the lock: another writer's files are never taken for this run's
        found = {path for path in output_dir.iterdir() if path.name != ".textcl.lock"} if output_dir.is_dir() else set()
        trainer = None
        try:
            with collective_failures(lambda: 0, ddp_timeout):  # another process failed setting up
                trainer = Trainer(plan, actions)
            with collective_failures(lambda: min(trainer.position.step + 1, trainer.total_steps), ddp_timeout):
                return trainer.train()
        except BaseException:
            if first_process and (trainer is None or trainer.position.step == 0):
                leave_as_found(output_dir, found if existed or found else None)
            raise


def leave_as_found(output_dir: Path, found: set[Path] | None) -> None:
    """Undo a run that stopped before its first step: remove what it added to output_dir (`found`: the folder's
    entries before the run; None: the folder did not exist), so the next run does not find a run there. Called
    under the folder's lock (whose file goes with the folder, or when the lock is released)."""
    if not output_dir.is_dir():
        return
    if found is None:
        shutil.rmtree(output_dir, ignore_errors=True)
        return
    for path in {p for p in output_dir.iterdir() if p.name != ".textcl.lock"} - found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
