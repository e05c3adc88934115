"""CUDA runs of the equivalences that make sense on one GPU; bench/gpu.sh runs them with pytest (skipped without
CUDA, so CI only collects them):

    python -m pytest -q bench/gpu_checks.py

- GradCache = plain backprop through the same chunks with dropout ON, on CUDA: the CUDA RNG must be replayed
  for each chunk (on the CPU only the CPU RNG is), and left where plain training leaves it;
- a GradCache training run = the same run with whole-batch forwards (dropout off), step by step;
- bf16 training keeps the losses of fp32 training within tolerance.
Resume = uninterrupted is tests/test_training.py's kill-and-resume test, which trains on the GPU when torch
sees one (gpu.sh runs it too).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import SENTENCES, build_tiny_bert, build_tokenizer
from test_gradcache import (
    assert_grads_close,
    batch_texts,
    make_setup,
    parameter_grads,
    plain_chunked_embeddings,
    text_ids,
)

from textcl.cli import main
from textcl.demo.run import demo_rows
from textcl.losses.gradcache import gradcache_backward

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs it)")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = build_tokenizer(SENTENCES)
    build_tiny_bert(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [row["text"] for row in demo_rows()[:320]]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"anchor": t, "positive": " ".join(t.split()[: 3 + i % 9])} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("chunk_size", [3, 16])
def test_gradcache_equals_plain_backprop_with_dropout_on_cuda(model_dir: Path, chunk_size: int) -> None:
    texts = batch_texts(16)
    encoder, loss, groups = make_setup(model_dir, texts)
    encoder.to(CUDA)
    loss.to(CUDA)
    groups = [{key: value.to(CUDA) for key, value in group.items()} for group in groups]
    ids, negative_ids = text_ids(texts[0]).to(CUDA), text_ids(texts[2])[:, None].to(CUDA)

    def loss_fn(embeddings: list[torch.Tensor]) -> torch.Tensor:
        anchor, positive, negative = embeddings
        return loss(anchor, positive, negative[:, None], positive_ids=ids, negative_ids=negative_ids)

    torch.manual_seed(1)
    cached = gradcache_backward(encoder, groups, loss_fn, chunk_size)
    after_cached = torch.rand(3, device=CUDA)
    got = parameter_grads(encoder, loss)
    torch.manual_seed(1)
    plain = loss_fn(plain_chunked_embeddings(encoder, groups, chunk_size))
    plain.backward()
    assert torch.equal(torch.rand(3, device=CUDA), after_cached), "GradCache must leave the CUDA RNG as plain does"
    torch.testing.assert_close(cached, plain.detach())
    assert_grads_close(got, parameter_grads(encoder, loss), atol=1e-5)


def train_losses(model_dir: Path, data: Path, out: Path, *flags: str) -> list[float]:
    common = ["--model_name_or_path", str(model_dir), "--train_data", str(data), "--output_dir", str(out),
              "--per_device_train_batch_size", "32", "--max_steps", "6", "--learning_rate", "1e-3",
              "--logging_steps", "1", "--max_seq_length", "24", "--dropout", "0.0", "--pooling", "mean"]
    assert main(["train", *common, *flags]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_gradcache_training_equals_whole_batch_training_on_cuda(model_dir: Path, pairs_file: Path,
                                                                 tmp_path: Path) -> None:
    whole = train_losses(model_dir, pairs_file, tmp_path / "whole", "--forward_chunk_size", "0")
    cached = train_losses(model_dir, pairs_file, tmp_path / "cached", "--gradcache_chunk_size", "5")
    assert len(whole) == 6
    assert cached == pytest.approx(whole, abs=1e-4)


def test_bf16_training_keeps_the_fp32_losses_on_cuda(model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    fp32 = train_losses(model_dir, pairs_file, tmp_path / "fp32", "--bf16", "false")
    bf16 = train_losses(model_dir, pairs_file, tmp_path / "bf16", "--bf16", "true")
    assert len(fp32) == 6 and fp32[-1] < fp32[0]
    assert bf16 == pytest.approx(fp32, rel=5e-2)  # bf16 rounds cosines to ~3 digits; logits are cos / 0.05
