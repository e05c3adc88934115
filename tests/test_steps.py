"""Optimizer steps, one process: the logged loss of an accumulated step, and steps the optimizer skips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import AcceleratorState, GradientState

from textcl.cli import main
from textcl.config import load_config
from textcl.demo.run import demo_rows
from textcl.training.trainer import Trainer


@pytest.fixture(scope="module")
def sentences_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sentences.txt"
    path.write_text("\n".join(row["text"] for row in demo_rows()[:160]) + "\n")
    return path


def arguments(model: Path, data: Path, output: Path, **settings) -> list[str]:
    values = {"model_name_or_path": model, "train_data": data, "output_dir": output, "per_device_train_batch_size": 8,
              "logging_steps": 1, "max_seq_length": 16, "dropout": 0.0, "pooling": "mean", **settings}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def logged(output: Path, key: str = "loss") -> list[float]:
    return [record[key] for line in (output / "metrics.jsonl").read_text().splitlines()
            if key in (record := json.loads(line))]


def test_the_logged_loss_of_an_accumulated_step_is_the_mean_of_its_micro_batches(
    tiny_model_dir: Path, sentences_file: Path, tmp_path: Path
) -> None:
    """With the weights held still (learning rate 0), step k of accumulation 2 logs the mean of the losses that
    batches 2k-1 and 2k log without accumulation; the last micro-batch's alone would differ."""
    common = {"learning_rate": 0.0}
    assert main(["train", *arguments(tiny_model_dir, sentences_file, tmp_path / "acc", max_steps=2,
                                     gradient_accumulation_steps=2, **common)]) == 0
    assert main(["train", *arguments(tiny_model_dir, sentences_file, tmp_path / "plain", max_steps=4, **common)]) == 0
    accumulated, plain = logged(tmp_path / "acc"), logged(tmp_path / "plain")
    assert accumulated == pytest.approx([(plain[0] + plain[1]) / 2, (plain[2] + plain[3]) / 2], abs=1e-6)
    assert abs(plain[0] - plain[1]) > 1e-3  # the mean is distinguishable from either micro-batch


def test_an_fp16_overflow_skips_the_scheduler_the_momentum_encoder_and_the_queue(
    tiny_model_dir: Path, sentences_file: Path, tmp_path: Path
) -> None:
    """accelerate has no fp16 on CPU, so the run gets the GradScaler accelerate uses on GPUs, at a loss scale
    so large that some steps overflow for real (inf gradients; the scaler halves the scale after each, so
    the skips are counted from it). Only the steps the optimizer took move the learning-rate schedule, the
    momentum encoder and the queue. (AdamW is fused: it takes the step call and skips inside its kernel, where
    accelerate's `step_was_skipped` does not see it.)"""
    AcceleratorState._reset_state()
    GradientState._reset_state()
    config = load_config(None, arguments(tiny_model_dir, sentences_file, tmp_path / "out", max_steps=6,
                                         queue_size=1000, max_grad_norm=0, learning_rate=1e-3, warmup_steps=0))
    trainer = Trainer(config)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126)
    trainer.optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, device_placement=False, scaler=scaler)
    trainer.accelerator.scaler = scaler
    before = [p.detach().clone() for p in trainer.unwrapped().parameters()]
    trainer.train()
    skipped = round(math.log2(2.0**126 / scaler.get_scale()))
    taken = 6 - skipped
    assert 1 <= skipped < 6, skipped
    assert trainer.scheduler.last_epoch == taken
    assert int(trainer.steps.momentum.average.n_averaged) == 1 + taken
    assert int(trainer.steps.queue.filled) == 8 * taken
    rates = logged(tmp_path / "out", "learning_rate")
    assert sum(a == b for a, b in zip([1e-3, *rates], rates)) == skipped  # the schedule waits on skipped steps
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.unwrapped().parameters()))
