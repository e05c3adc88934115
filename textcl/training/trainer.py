"""The training loop on `accelerate`: one CPU to many GPUs with the same results semantics.

`train(config)` builds the encoder, data, loss and optimizer, then steps until max_steps, logging to
`output_dir/metrics.jsonl` (and the trackers in `report_to`), evaluating every `eval_steps`, and
checkpointing atomically every `save_steps`. The final (or best) model is saved as a
sentence-transformers folder with `textcl.json` holding the resolved config and final metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from textcl import __version__
from textcl.config import TrainConfig
from textcl.data.loader import build_training_data
from textcl.errors import TextclError
from textcl.hub.model_card import TrainingRun, write_model_card
from textcl.hub.push import push_to_hub, require_token
from textcl.io.atomic import check_free_space, exclusive_lock, write_folder, write_text_atomically
from textcl.io.sources import check_local_sources, data_sources
from textcl.model.device import default_device
from textcl.model.encoder import Encoder
from textcl.model.lora import is_adapter
from textcl.model.precision import resolve_precision
from textcl.training.checkpoint import (
    TrainingPosition,
    any_process,
    link_or_copy_tree,
    load_checkpoint,
    prepare_output_dir,
    read_metrics,
    resolve_resume,
    save_checkpoint,
    save_model_folder,
    state_bytes,
    trim_metrics,
)
from textcl.training.guards import (
    NonFiniteGuard,
    gradient_norm,
    json_safe,
    nonfinite_tensors,
    step_is_finite,
)
from textcl.training.parallel import (
    apply_launch_config,
    collective_failures,
    evaluation_encoder,
    full_encoder,
    process_group_kwargs,
    shard_batches,
)
from textcl.training.remining import build_remining
from textcl.training.setup import (
    apply_training_options,
    build_encoder,
    build_helpers,
    build_loss,
    build_optimizer,
    build_teacher,
    check_distillation_data,
    check_training_options,
    source_query_prompts,
    reads_teacher_scores,
)
from textcl.training.step import StepRunner, optimizer_step
from textcl.training.summary import run_warnings, summary_lines


def total_steps(config: TrainConfig, batches_per_epoch: int | None) -> int:
    """Optimizer steps of the run: max_steps, else the epochs' worth. accelerate also steps at the end of every
    epoch, so an epoch of n batches takes ceil(n / gradient_accumulation_steps) steps (as in transformers)."""
    args = config.training
    if args.max_steps > 0:
        return args.max_steps
    if batches_per_epoch is None:
        raise TextclError("streaming data has no length: set max_steps")
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    return max(1, math.ceil(args.num_train_epochs * steps_per_epoch))


def lookup(metrics: dict[str, Any], dotted: str) -> float:
    """`metrics["sts"]["spearman"]` for "sts.spearman"; a one-line error names what exists."""
    value: Any = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise TextclError(f"metric_for_best_model {dotted!r} not in the evaluation results: {sorted(metrics)}")
        value = value[part]
    return float(value)


class Trainer:
    """Holds the prepared objects of one run; `train()` is the public entry point."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        args = config.training
        if args.push_to_hub:
            require_token()  # a missing token stops the run before training, not after it
        self.output_dir = Path(args.output_dir)
        use_cpu = args.use_cpu or not torch.cuda.is_available()
        self.precision, why = resolve_precision(args.bf16, torch.device("cpu") if use_cpu else default_device())
        if args.fp16:
            self.precision, why = "fp16", "fp16: true"
        # accelerate's state is process-wide: a second run in one process (a notebook) may change precision.
        # The partial state (the process group under a launcher) stays, as transformers' Trainer keeps it.
        AcceleratorState._reset_state(reset_partial_state=False)
        self.accelerator = Accelerator(
            cpu=use_cpu,
            mixed_precision="no" if self.precision == "fp32" else self.precision,  # not the launch config's
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=args.report_to or None,
            project_dir=str(self.output_dir),
            kwargs_handlers=process_group_kwargs(args.ddp_timeout),
        )
        apply_launch_config(self.accelerator, config)
        if self.accelerator.is_main_process:
            print(f"textcl: training in {self.precision} ({why})")
        set_seed(args.seed, device_specific=True)
        resuming = bool(args.resume_from_checkpoint)
        if self.accelerator.is_main_process:
            prepare_output_dir(self.output_dir, args.overwrite_output_dir, resuming)
        self.accelerator.wait_for_everyone()
        self.encoder = build_encoder(config.model)
        check_training_options(self.encoder, config)
        with self.accelerator.main_process_first():
            self.data = build_training_data(
                config.data, tokenizer=self.encoder.tokenizer, max_seq_length=self.encoder.max_seq_length,
                prompts=self.encoder.prompts, batch_size=args.per_device_train_batch_size, seed=args.seed,
                drop_last=args.dataloader_drop_last, num_processes=self.accelerator.num_processes,
                process_index=self.accelerator.process_index, teacher_scores=reads_teacher_scores(config.loss),
                source_query_prompts=source_query_prompts(config, self.encoder.prompts),
                prompt_length=None if self.encoder.include_prompt else self.encoder.prompt_length,
            )
        check_distillation_data(config.loss, self.data.num_negatives)
        self.remining = build_remining(config.data, self.data.loader.dataset, self.data.collator,
                                       self.precision if self.precision == "bf16" else "fp32")
        self.loss = build_loss(config.loss)
        self.optimizer = build_optimizer(self.encoder, self.loss, args)
        momentum, guide = build_helpers(config.loss, self.encoder, self.accelerator.device)
        teacher = build_teacher(config.loss, self.encoder, self.accelerator.device)
        apply_training_options(self.encoder, args)  # after build_helpers: the momentum copy stays uncompiled
        self.model, self.optimizer = self.accelerator.prepare(self.encoder, self.optimizer)
        streaming = config.data.streaming  # streams are split between processes by the data, not by accelerate
        self.prepared_loader = self.data.loader if streaming else shard_batches(self.accelerator, self.data.loader)
        self.loss = self.loss.to(self.accelerator.device)
        batches = None if streaming else len(self.prepared_loader)
        self.max_steps = total_steps(config, batches)
        warmup = args.warmup_steps or math.ceil(args.warmup_ratio * self.max_steps)
        # Stepped by hand once per optimizer step: accelerate's prepared scheduler would step once per
        # process, which is right only when the step count was computed for a single process.
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer, warmup, self.max_steps)
        self.position = TrainingPosition()
        self.steps = StepRunner(config, self.model, self.loss, self.accelerator, momentum, guide, teacher)
        # textcl's own state, saved as safetensors + JSON by textcl.training.checkpoint (never as pickles)
        self.objects = {"scheduler": self.scheduler, "position": self.position, "loss": self.loss}
        self.objects |= {type(helper).__name__: helper for helper in self.steps.stateful()}
        if self.remining is not None:
            self.objects["remining"] = self.remining
        self.guard = NonFiniteGuard(args.max_nonfinite_steps)
        self.model_bytes, self.checkpoint_bytes = self.saved_bytes()
        # a disk too small fails now, not after hours of training (on every process: they all stop)
        check_free_space(self.output_dir, self.model_bytes + (self.checkpoint_bytes if args.save_steps else 0),
                         "this run", "free some space or choose another output_dir")
        self.resume_from = resolve_resume(self.output_dir, args.resume_from_checkpoint,
                                          self.accelerator.is_main_process)

    def start_epoch(self, epoch: int) -> None:
        """Point the data and accelerate's loader at `epoch`.

        accelerate's loader re-applies its own epoch counter to the batch sampler on every `iter()`,
        so it must hear the epoch too, or a resumed run would replay epoch 0's order.
        """
        self.data.set_epoch(epoch)
        if hasattr(self.prepared_loader, "set_epoch"):
            self.prepared_loader.set_epoch(epoch)

    def unwrapped(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def evaluate(self) -> dict[str, Any]:
        """Evaluation on every process (corpus encoding is sharded across them); {} without eval sets."""
        data = self.config.data
        if not (data.eval_sts or data.eval_beir):
            return {}
        from textcl.evaluation.suite import evaluate  # only with eval sets: training never loads faiss and scipy

        encoder = evaluation_encoder(self.accelerator, self.model, lambda: build_encoder(self.config.model))
        return evaluate(encoder, sts=data.eval_sts, beir=data.eval_beir, split=data.eval_beir_split)

    def saved_bytes(self) -> tuple[int, int]:
        """About how many bytes the final model and one checkpoint take (weights; Adam's two moments of the
        trainable ones; the momentum encoder and queue)."""
        adapter_only = is_adapter(self.encoder.model) and not self.config.model.lora_merge
        model = state_bytes(self.encoder, trainable_only=adapter_only)
        helpers = sum(state_bytes(helper) for helper in self.steps.stateful())
        return model, state_bytes(self.encoder) + 2 * state_bytes(self.encoder, trainable_only=True) + helpers

    def log(self, record: dict[str, Any]) -> None:
        record = json_safe(record)  # NaN is not JSON: non-finite values are logged as null
        if self.accelerator.is_main_process:
            with (self.output_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(record, allow_nan=False) + "\n")
        flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        for group, values in record.items():
            if isinstance(values, dict):
                flat |= {f"{group}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        self.accelerator.log(flat, step=record["step"])

    def keep_best(self, metrics: dict[str, Any]) -> None:
        """Save the model to best_model/ when the chosen metric improved."""
        name = self.config.training.metric_for_best_model
        if not name or not metrics:
            return
        value = lookup(metrics, name)
        best = self.position.best_metric
        sign = 1 if self.config.training.greater_is_better else -1
        if (best is None or sign * (value - best) > 0) and not self.weights_broken():
            self.position.best_metric = value
            encoder = self.trained_encoder()
            if encoder is not None:
                write_folder(self.output_dir / "best_model", encoder.save, "the best model", self.model_bytes)
            self.accelerator.wait_for_everyone()

    def weights_broken(self) -> bool:
        """Some weight is NaN or infinite (on any process); such weights are never saved."""
        return any_process(self.accelerator, bool(nonfinite_tensors(self.model)))

    def gradients(self) -> Any:
        """The gradient norm after clipping to max_grad_norm (when set); None under fp16, whose gradient scaler
        skips overflowing steps itself."""
        max_norm = self.config.training.max_grad_norm
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
        args = self.config.training
        path = save_checkpoint(self.accelerator, self.output_dir, step, args.save_total_limit, self.objects,
                               self.checkpoint_bytes)
        self.guard.last_checkpoint = str(path)

    def train(self) -> dict[str, Any]:
        args = self.config.training
        accelerator = self.accelerator
        if accelerator.is_main_process:
            self.write_run_file({})
        accelerator.init_trackers("textcl", config={k: str(v) for k, v in self.config.to_dict().items()})
        if self.resume_from is not None:
            load_checkpoint(accelerator, self.resume_from, self.objects)
            self.guard.last_checkpoint = str(self.resume_from)
            if accelerator.is_main_process:
                trim_metrics(self.output_dir, self.position.step)
        position = self.position
        if position.step == 0 and (self.config.data.eval_sts or self.config.data.eval_beir):
            if accelerator.is_main_process:  # the "before" of the closing summary, logged as step 0
                print("textcl: evaluating the base model (step 0)", file=sys.stderr)
            self.log({"step": 0, **self.evaluate()})
        self.model.train()  # from_pretrained returns eval mode: no dropout, so no SimCSE positives
        bar = tqdm(total=self.max_steps, initial=position.step, disable=not accelerator.is_main_process, desc="train")
        started, samples = time.perf_counter(), 0
        while position.step < self.max_steps:
            self.start_epoch(position.epoch)
            loader = self.prepared_loader
            if position.batches_in_epoch:
                loader = accelerator.skip_first_batches(loader, position.batches_in_epoch)
            for batch in self.steps.batches(loader if self.remining is None else self.remining.apply(loader)):
                with accelerator.accumulate(self.model):
                    loss = self.steps.backward(batch)
                    finite = not accelerator.sync_gradients or not any_process(
                        accelerator, not step_is_finite(loss, self.gradients()))
                    # a non-finite step's gradients are discarded (see textcl.training.guards); an fp16
                    # overflow is skipped by the gradient scaler itself
                    stepped = finite and optimizer_step(accelerator, self.optimizer)
                    self.optimizer.zero_grad(set_to_none=True)
                position.batches_in_epoch += 1
                samples += batch["anchor"]["input_ids"].shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                if stepped:
                    self.scheduler.step()
                loss = self.steps.end_step(skipped=not stepped)
                if not self.guard.observe(position.step + 1, finite) and accelerator.is_main_process:
                    tqdm.write(f"textcl: warning: step {position.step + 1}: non-finite loss or gradient; update "
                               f"skipped ({len(self.guard.streak)} of {self.guard.max_steps} in a row stop the run)",
                               file=sys.stderr)
                position.step += 1
                bar.update(1)
                if position.step % args.logging_steps == 0 or position.step == self.max_steps:
                    rate = samples / (time.perf_counter() - started)
                    record = {"step": position.step, "epoch": position.epoch, "loss": loss,
                              "learning_rate": self.scheduler.get_last_lr()[0], "samples_per_second": rate}
                    record |= self.steps.statistics()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}",
                                    sps=f"{rate:.1f}")
                    self.log(record)
                if len(self.guard.streak) >= self.guard.max_steps:
                    bar.close()
                    self.guard.raise_if_diverged()
                if self.remining is not None and self.remining.due(position.step) and position.step < self.max_steps:
                    encoder = evaluation_encoder(self.accelerator, self.model, lambda: build_encoder(self.config.model))
                    self.log({"step": position.step, **self.remining.remine(encoder)})
                if args.eval_steps and position.step % args.eval_steps == 0:
                    metrics = self.evaluate()
                    self.log({"step": position.step, **metrics})
                    self.keep_best(metrics)
                if args.save_steps and position.step % args.save_steps == 0:
                    self.checkpoint()
                if position.step >= self.max_steps:
                    break
            else:
                position.epoch += 1
                position.batches_in_epoch = 0
        bar.close()
        runtime = time.perf_counter() - started
        speed = {"train_runtime": runtime, "train_samples_per_second": samples / runtime}
        self.log({"step": position.step, **speed})
        metrics = self.finish()
        if accelerator.is_main_process:
            records, saved = read_metrics(self.output_dir), self.saved_evaluation(metrics)[0]
            print("\n".join(summary_lines(self.output_dir, records, saved)))
            batch = args.per_device_train_batch_size * accelerator.num_processes
            for warning in run_warnings(records, batch, saved):
                print(f"textcl: warning: {warning}", file=sys.stderr)
        return metrics | {"train": speed}

    def finish(self) -> dict[str, Any]:
        """Final evaluation, best-model selection, and the saved model folder; returns the evaluation."""
        metrics = self.evaluate()
        if metrics:
            self.log({"step": self.position.step, **metrics})
            self.keep_best(metrics)
        best = self.output_dir / "best_model"
        keep_best = bool(self.config.training.metric_for_best_model) and best.exists()
        if not keep_best and self.weights_broken():
            broken = nonfinite_tensors(self.model)
            where = f" (e.g. {broken[0]})" if broken else ""
            last = self.guard.last_checkpoint or "none was written"
            raise TextclError(f"the trained weights hold non-finite values (NaN or inf){where}; no model saved "
                              f"(the last good checkpoint: {last}); lower learning_rate or set max_grad_norm")
        encoder = None if keep_best else self.trained_encoder()
        if self.accelerator.is_main_process:
            self.install_model(metrics, encoder, best if keep_best else None)
            self.write_run_file(metrics)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        args = self.config.training
        if args.push_to_hub and self.accelerator.is_main_process:
            repo_id = args.hub_model_id or self.output_dir.resolve().name
            url = push_to_hub(self.output_dir, repo_id, private=args.hub_private_repo, revision=args.hub_revision)
            print(f"pushed {self.output_dir} to {url}")
        return metrics

    def install_model(self, metrics: dict[str, Any], encoder: Encoder | None, best: Path | None) -> None:
        """Write the final model (`encoder`, or the kept `best` folder) and its card into output_dir, never half a
        model. Main process only."""
        last = self.guard.last_checkpoint
        fix = "free some space, then " + (f"resume with --resume_from_checkpoint latest ({Path(last).name} is intact)"
                                          if last else "rerun (no checkpoint was written: set save_steps to keep one)")

        def write(staging: Path) -> None:
            if best is None:
                encoder.save(staging)
            else:
                link_or_copy_tree(best, staging)
            self.write_card(metrics, staging)

        save_model_folder(write, self.output_dir, self.model_bytes, "the final model", fix)
        if best is not None:
            shutil.rmtree(best)

    def trained_encoder(self) -> Encoder | None:
        """The encoder to save on the main process (None on the others); with `lora_merge`, a copy with the
        adapter merged into full weights. Every process calls it: sharded weights are gathered first."""
        encoder = full_encoder(self.accelerator, self.model, lambda: build_encoder(self.config.model))
        if encoder is not None and self.config.model.lora_merge:
            encoder = encoder.merged()
        return encoder

    def saved_evaluation(self, metrics: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """(evaluation, step) of the saved model: the final `metrics`, or, when metric_for_best_model kept an
        earlier model, that model's evaluation as logged in metrics.jsonl (step None: the final model)."""
        name, best = self.config.training.metric_for_best_model, self.position.best_metric
        if not name or best is None:
            return metrics, None
        for record in read_metrics(self.output_dir):
            if ("sts" in record or "retrieval" in record) and lookup(record, name) == best:
                return {key: record[key] for key in ("sts", "retrieval") if key in record}, record["step"]
        return metrics, None

    def write_card(self, metrics: dict[str, Any], folder: Path) -> None:
        """folder/README.md describing this run."""
        evaluation, best_step = self.saved_evaluation(metrics)
        run = TrainingRun(
            config=self.config, metrics=evaluation, steps=self.position.step,
            num_processes=self.accelerator.num_processes, train_rows=self.data.rows, best_step=best_step,
            precision=self.precision,
            dropout_positives=self.data.dropout_positives, hard_negatives=self.data.num_negatives > 0,
        )
        model_id = self.config.training.hub_model_id or self.output_dir.resolve().name
        write_model_card(self.unwrapped(), folder, run, model_id)

    def write_run_file(self, metrics: dict[str, Any]) -> None:
        """textcl.json: the resolved config (rerunnable as a recipe) and the final metrics."""
        run = {"textcl_version": __version__, "config": self.config.to_dict(), "metrics": json_safe(metrics)}
        write_text_atomically(self.output_dir / "textcl.json", json.dumps(run, indent=2) + "\n")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run one training job described by `config`; returns the final evaluation metrics.

    The first process holds output_dir's write lock for the whole run, so a second run into the same folder is
    refused instead of mixing checkpoints with this one.
    """
    if config.data.mining_rounds:  # the rounds driver calls this once a round, with mining_rounds 0
        raise TextclError("mining_rounds runs through textcl.train (textcl.training.rounds), not the trainer alone")
    check_local_sources(data_sources(config.data))  # a missing file is one line before the model loads
    output_dir = Path(config.training.output_dir)
    first_process = os.environ.get("RANK", "0") == "0"  # before the Accelerator exists (set by launchers)
    lock = exclusive_lock(output_dir, what="the output_dir", lock_file=output_dir / ".textcl.lock")
    with lock if first_process else contextlib.nullcontext():
        with collective_failures(lambda: 0, config.training.ddp_timeout):  # another process failed setting up
            trainer = Trainer(config)
        with collective_failures(lambda: min(trainer.position.step + 1, trainer.max_steps),
                                 config.training.ddp_timeout):
            return trainer.train()
