"""The training loop on `accelerate`: one CPU to many GPUs with the same results semantics.

`train(config)` builds the encoder, data, loss and optimizer, then steps until max_steps, logging to
`output_dir/metrics.jsonl` (and the trackers in `report_to`), evaluating every `eval_steps`, and
checkpointing atomically every `save_steps`. The final (or best) model is saved as a
sentence-transformers folder with `textcl.json` holding the resolved config and final metrics.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from textcl import __version__
from textcl.config import TrainConfig
from textcl.data.loader import build_training_data
from textcl.errors import TextclError
from textcl.hub.model_card import TrainingRun, write_model_card
from textcl.hub.push import push_to_hub, require_token
from textcl.model.device import default_device
from textcl.model.lora import merged
from textcl.model.precision import resolve_precision
from textcl.training.checkpoint import (
    TrainingPosition,
    prepare_output_dir,
    replace_dir,
    resolve_resume,
    save_checkpoint,
)
from textcl.training.parallel import (
    apply_launch_config,
    collective_failures,
    evaluation_encoder,
    full_encoder,
    process_group_kwargs,
    shard_batches,
)
from textcl.training.setup import (
    apply_training_options,
    build_encoder,
    build_helpers,
    build_loss,
    build_optimizer,
    check_training_options,
)
from textcl.training.step import StepRunner, optimizer_step


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
                process_index=self.accelerator.process_index,
            )
        self.loss = build_loss(config.loss)
        self.optimizer = build_optimizer(self.encoder, self.loss, args)
        momentum, guide = build_helpers(config.loss, self.encoder, self.accelerator.device)
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
        self.steps = StepRunner(config, self.model, self.loss, self.accelerator, momentum, guide)
        for stateful in (self.scheduler, self.position, self.loss, *self.steps.stateful()):
            self.accelerator.register_for_checkpointing(stateful)
        self.resume_from = resolve_resume(self.output_dir, args.resume_from_checkpoint)

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

    def log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with (self.output_dir / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(record) + "\n")
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
        if best is None or sign * (value - best) > 0:
            self.position.best_metric = value
            staging = self.output_dir / ".best_model.tmp"
            self.save_model(staging)
            if self.accelerator.is_main_process:
                replace_dir(staging, self.output_dir / "best_model")
            self.accelerator.wait_for_everyone()

    def train(self) -> dict[str, Any]:
        args = self.config.training
        accelerator = self.accelerator
        if accelerator.is_main_process:
            self.write_run_file({})
        accelerator.init_trackers("textcl", config={k: str(v) for k, v in self.config.to_dict().items()})
        if self.resume_from is not None:
            accelerator.load_state(str(self.resume_from))
        position = self.position
        self.model.train()  # from_pretrained returns eval mode: no dropout, so no SimCSE positives
        bar = tqdm(total=self.max_steps, initial=position.step, disable=not accelerator.is_main_process, desc="train")
        started, samples = time.perf_counter(), 0
        while position.step < self.max_steps:
            self.start_epoch(position.epoch)
            loader = self.prepared_loader
            if position.batches_in_epoch:
                loader = accelerator.skip_first_batches(loader, position.batches_in_epoch)
            for batch in self.steps.batches(loader):
                with accelerator.accumulate(self.model):
                    self.steps.backward(batch)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                    stepped = optimizer_step(accelerator, self.optimizer)
                    self.optimizer.zero_grad(set_to_none=True)
                position.batches_in_epoch += 1
                samples += batch["anchor"]["input_ids"].shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                if stepped:  # not after an fp16 overflow
                    self.scheduler.step()
                loss = self.steps.end_step(skipped=not stepped)
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
                if args.eval_steps and position.step % args.eval_steps == 0:
                    metrics = self.evaluate()
                    self.log({"step": position.step, **metrics})
                    self.keep_best(metrics)
                if args.save_steps and position.step % args.save_steps == 0:
                    save_checkpoint(accelerator, self.output_dir, position.step, args.save_total_limit)
                if position.step >= self.max_steps:
                    break
            else:
                position.epoch += 1
                position.batches_in_epoch = 0
        bar.close()
        runtime = time.perf_counter() - started
        speed = {"train_runtime": runtime, "train_samples_per_second": samples / runtime}
        self.log({"step": position.step, **speed})
        return self.finish() | {"train": speed}

    def finish(self) -> dict[str, Any]:
        """Final evaluation, best-model selection, and the saved model folder; returns the evaluation."""
        metrics = self.evaluate()
        if metrics:
            self.log({"step": self.position.step, **metrics})
            self.keep_best(metrics)
        best = self.output_dir / "best_model"
        kept_best = bool(self.config.training.metric_for_best_model) and self.position.best_metric is not None
        if not kept_best:
            self.save_model(self.output_dir)
        if self.accelerator.is_main_process:
            if kept_best:
                for item in best.iterdir():
                    target = self.output_dir / item.name
                    if target.is_dir():
                        shutil.rmtree(target)
                    shutil.move(str(item), target)
                best.rmdir()
            self.write_run_file(metrics)
            self.write_card(metrics)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        args = self.config.training
        if args.push_to_hub and self.accelerator.is_main_process:
            repo_id = args.hub_model_id or self.output_dir.resolve().name
            url = push_to_hub(self.output_dir, repo_id, private=args.hub_private_repo, revision=args.hub_revision)
            print(f"pushed {self.output_dir} to {url}")
        return metrics

    def save_model(self, path: Path) -> None:
        """Save the trained encoder; with `lora_merge`, a copy with the adapter merged into full weights. Every
        process calls it (sharded weights are gathered first); the main process writes."""
        encoder = full_encoder(self.accelerator, self.model, lambda: build_encoder(self.config.model))
        if encoder is None:
            return
        if self.config.model.lora_merge:
            encoder = merged(encoder)
        encoder.save(path)

    def saved_evaluation(self, metrics: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """(evaluation, step) of the saved model: the final `metrics`, or, when metric_for_best_model kept an
        earlier model, that model's evaluation as logged in metrics.jsonl (step None: the final model)."""
        name, best = self.config.training.metric_for_best_model, self.position.best_metric
        if not name or best is None:
            return metrics, None
        for line in (self.output_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if ("sts" in record or "retrieval" in record) and lookup(record, name) == best:
                return {key: record[key] for key in ("sts", "retrieval") if key in record}, record["step"]
        return metrics, None

    def write_card(self, metrics: dict[str, Any]) -> None:
        """README.md describing this run."""
        evaluation, best_step = self.saved_evaluation(metrics)
        run = TrainingRun(
            config=self.config, metrics=evaluation, steps=self.position.step,
            num_processes=self.accelerator.num_processes, train_rows=self.data.rows, best_step=best_step,
            precision=self.precision,
            dropout_positives=self.data.dropout_positives, hard_negatives=self.data.num_negatives > 0,
        )
        model_id = self.config.training.hub_model_id or self.output_dir.resolve().name
        write_model_card(self.unwrapped(), self.output_dir, run, model_id)

    def write_run_file(self, metrics: dict[str, Any]) -> None:
        """textcl.json: the resolved config (rerunnable as a recipe) and the final metrics."""
        run = {"textcl_version": __version__, "config": self.config.to_dict(), "metrics": metrics}
        (self.output_dir / "textcl.json").write_text(json.dumps(run, indent=2) + "\n")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run one training job described by `config`; returns the final evaluation metrics."""
    trainer = Trainer(config)
    with collective_failures(lambda: min(trainer.position.step + 1, trainer.max_steps), config.training.ddp_timeout):
        return trainer.train()
