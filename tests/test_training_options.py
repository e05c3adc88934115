"""`gradient_checkpointing` and `torch_compile` do what they say: the same gradients and losses, computed
differently. (Their memory and speed are measured in bench/checkpointing_compile.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import SENTENCES

from textcl.cli import main
from textcl.config import ModelArguments, TrainingArguments, load_config
from textcl.demo.run import demo_rows
from textcl.losses import InfoNCELoss
from textcl.losses.gradcache import gradcache_backward
from textcl.training.setup import apply_training_options, build_encoder
from textcl.training.trainer import Trainer


def gradients(model_dir: Path, checkpointing: bool, lora: bool, gradcache: bool) -> tuple[dict, int]:
    """Parameter gradients of one InfoNCE step with dropout on, and how often layer 0 computed its attention."""
    torch.manual_seed(0)  # the same fresh LoRA weights in every run
    encoder = build_encoder(ModelArguments(model_name_or_path=str(model_dir), pooling="mean", lora=lora)).train()
    apply_training_options(encoder, TrainingArguments(gradient_checkpointing=checkpointing))
    calls = []
    layer = encoder.model.get_base_model() if lora else encoder.model
    layer.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.append(1))  # inside the checkpoint
    groups = [encoder.tokenize(SENTENCES[:6]), encoder.tokenize(SENTENCES[6:])]
    loss = InfoNCELoss(temperature=0.05)
    torch.manual_seed(1)
    if gradcache:
        gradcache_backward(encoder, groups, lambda e: loss(e[0], e[1]), 4)
    else:
        loss(encoder(**groups[0]), encoder(**groups[1])).backward()
    return {name: p.grad for name, p in encoder.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("lora, gradcache", [(False, False), (True, False), (False, True)],
                         ids=["full", "lora", "gradcache"])
def test_gradient_checkpointing_gives_the_gradients_of_plain_backprop(
    tiny_model_dir: Path, lora: bool, gradcache: bool
) -> None:
    """Dropout on: the recomputation replays the RNG, so it draws the masks of the first forward."""
    plain, plain_calls = gradients(tiny_model_dir, False, lora, gradcache)
    checkpointed, checkpointed_calls = gradients(tiny_model_dir, True, lora, gradcache)
    assert checkpointed_calls == plain_calls + (2 if not gradcache else 4)  # the layers really ran again
    assert plain.keys() == checkpointed.keys() and len(plain) >= (4 if lora else 10)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=0, msg=name)


def test_the_trainer_turns_both_options_on(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES) + "\n")
    AcceleratorState._reset_state()
    GradientState._reset_state()
    config = load_config(None, ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(tmp_path / "s.txt"),
                                "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4", "--gradient_checkpointing", "true",
                                "--torch_compile", "true", "--torch_compile_backend", "aot_eager"])
    transformer = Trainer(config).unwrapped().model
    assert transformer.is_gradient_checkpointing and transformer._compiled_call_impl is not None


@pytest.mark.slow
def test_torch_compile_gives_the_losses_of_eager(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The compiled run (aot_eager: torch.compile's graph capture and autograd, without inductor's code
    generation, which takes minutes on a small CPU) logs the losses of the eager run."""
    data = tmp_path / "pairs.jsonl"
    texts = [row["text"] for row in demo_rows()[:24]]
    data.write_text("".join(json.dumps({"anchor": t, "positive": " ".join(t.split()[:5])}) + "\n" for t in texts))
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--torch_compile", "true", "--torch_compile_backend", "aot_eager"])):
        arguments = ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(data), "--output_dir",
                     str(tmp_path / name), "--per_device_train_batch_size", "8", "--max_steps", "3", "--dropout", "0",
                     "--logging_steps", "1", "--learning_rate", "1e-3", "--pooling", "mean", "--max_seq_length", "16"]
        assert main(["train", *arguments, *extra]) == 0
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [record["loss"] for record in map(json.loads, lines) if "loss" in record]
    assert len(losses["eager"]) == 3 and losses["compiled"] == pytest.approx(losses["eager"], abs=1e-5)
