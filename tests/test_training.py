"""End-to-end training on a tiny model: loss goes down, the folder loads in sentence-transformers,
two processes equal one with the doubled batch, and a killed run resumes exactly."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCES
from safetensors.torch import load_file

from textcl import Encoder
from textcl.cli import main
from textcl.demo.run import demo_rows

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_recipe(tmp_path: Path, model: Path, data: Path, **settings) -> Path:
    lines = {"model_name_or_path": str(model), "train_data": str(data), "output_dir": str(tmp_path / "out"),
             "per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1, "max_seq_length": 24,
             **settings}
    path = tmp_path / "recipe.yaml"
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in lines.items()))
    return path


@pytest.fixture(scope="module")
def sentences_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "sentences.txt"
    path.write_text("\n".join(row["text"] for row in demo_rows()[:320]) + "\n")
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.tsv"
    # Positives are an anchor's first 3-11 words, so anchors and positives sort differently by length;
    # negatives never repeat an anchor, so batches stay the same whatever the batch size.
    texts = [row["text"] for row in demo_rows()[:400]]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["anchor", "positive", "negative"])
        writer.writerows((t, " ".join(t.split()[: 3 + i % 9]), texts[200 + i]) for i, t in enumerate(texts[:200]))
    return path


def losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_thirty_steps_reduce_the_loss_and_save_a_sentence_transformers_folder(
    tiny_model_dir: Path, sentences_file: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, sentences_file, max_steps=30, pooling="mean", dense_dim=16,
                          normalize=True)
    assert main(["train", str(recipe)]) == 0
    out = tmp_path / "out"
    curve = losses(out)
    # Medians: with 8 rows a batch, one unlucky step can reach the first steps' loss (seen on CI's CPU).
    assert len(curve) == 30 and np.median(curve[-10:]) < 0.5 * np.median(curve[:5])
    st = pytest.importorskip("sentence_transformers")
    ours = Encoder.load(out)
    assert ours.dim == 16 and ours.normalize
    assert np.allclose(ours.encode(SENTENCES), st.SentenceTransformer(str(out), device="cpu").encode(SENTENCES),
                       atol=1e-5)
    run = json.loads((out / "textcl.json").read_text())
    assert run["config"]["max_steps"] == 30 and run["config"]["dense_dim"] == 16


def test_simcse_mlp_head_trains_but_is_not_exported(tiny_model_dir: Path, sentences_file: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, sentences_file, max_steps=3, pooling="cls_mlp")
    assert main(["train", str(recipe)]) == 0
    ours = Encoder.load(tmp_path / "out")
    assert ours.pooling == "cls" and ours.mlp_head is None
    st = pytest.importorskip("sentence_transformers")
    theirs = st.SentenceTransformer(str(tmp_path / "out"), device="cpu").encode(SENTENCES)
    assert np.allclose(ours.encode(SENTENCES), theirs, atol=1e-5)


def test_two_processes_equal_one_process_with_the_doubled_batch(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` on CPU (gloo); dropout off so both runs draw no masks.

    Later steps' losses depend on the updated weights, so equal losses after step 1 also check the
    gradients (weights themselves are not compared: Adam's first steps move a parameter by +-lr
    whatever the size of its gradient, so float noise in a near-zero gradient flips it).
    """
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs_file, max_steps=3, dropout=0.0, pooling="mean")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "textcl", "train",
              str(recipe), "--output_dir", str(tmp_path / "two")]
    result = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["train", str(recipe), "--output_dir", str(tmp_path / "one"),
                 "--per_device_train_batch_size", "16"]) == 0
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 3
    assert two[0] == pytest.approx(one[0], abs=1e-6)
    assert two == pytest.approx(one, abs=1e-5)


def train_process(recipe: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "textcl", "train", str(recipe), *extra]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkilled_run_resumes_to_the_same_parameters(
    tiny_model_dir: Path, sentences_file: Path, tmp_path: Path
) -> None:
    """Dropout on, 60 steps over epochs of 40 batches, a checkpoint every 7 steps: the kill lands mid-epoch
    and the resumed run crosses an epoch boundary."""
    recipe = write_recipe(tmp_path, tiny_model_dir, sentences_file, max_steps=60, save_steps=7, save_total_limit=2)
    full = train_process(recipe, "--output_dir", str(tmp_path / "full"))
    killed = train_process(recipe, "--output_dir", str(tmp_path / "killed"))
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "checkpoint-21").exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    (tmp_path / "killed" / ".checkpoint-999.tmp").mkdir()  # what a kill during a checkpoint write leaves
    (tmp_path / "killed" / ".checkpoint-999.tmp" / "model.safetensors").write_bytes(b"partial")
    resumed = train_process(recipe, "--output_dir", str(tmp_path / "killed"), "--resume_from_checkpoint", "latest")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    assert full.wait(timeout=300) == 0, full.stderr.read()[-3000:]
    expected = load_file(tmp_path / "full" / "model.safetensors")
    got = load_file(tmp_path / "killed" / "model.safetensors")
    for name, value in expected.items():
        assert torch.allclose(got[name], value, atol=1e-6), name
    assert len(list((tmp_path / "killed").glob("checkpoint-*"))) == 2
    assert not (tmp_path / "killed" / ".checkpoint-999.tmp").exists()


def bad_runs(tmp_path: Path, model: Path, pairs: Path) -> list[tuple[dict, list[str], str]]:
    (tmp_path / "empty.tsv").write_text("anchor\tpositive\n")
    (tmp_path / "blank.tsv").write_text("anchor\tpositive\n \tx\n")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "textcl.json").write_text("{}")
    return [
        ({"anchor_column": "question"}, [],
         "anchor column 'question' not in .*columns found: anchor, positive, negative"),
        ({"train_data": str(tmp_path / "empty.tsv")}, [], "has no rows"),
        ({"train_data": str(tmp_path / "blank.tsv")}, [], "all 1 rows .* were filtered out"),
        ({"learning_rat": 0.1}, [], "unknown recipe key 'learning_rat'; did you mean 'learning_rate'"),
        ({"dataloader_drop_last": True}, ["--per_device_train_batch_size", "512"], "larger than the 200 training rows"),
        ({"model_name_or_path": str(tmp_path / "nomodel")}, [], "model path .*nomodel' does not exist"),
        ({"output_dir": str(tmp_path / "used")}, [], "already holds a run; pass --overwrite_output_dir"),
        ({}, ["--metric_for_best_model", "sts.spearman"], "metric_for_best_model needs eval_split, eval_sts or eval_beir"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_runs_stop_before_training_with_one_line(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: int
) -> None:
    settings, overrides, message = bad_runs(tmp_path, tiny_model_dir, pairs_file)[case]
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs_file, max_steps=2, **settings)
    assert main(["train", str(recipe), *overrides]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("textcl: error:")]
    assert len(errors) == 1, errors
    assert re.search(message, errors[0]), errors[0]
    assert not list(tmp_path.rglob("checkpoint-*")) and not list(tmp_path.rglob("model.safetensors"))


def test_length_sorted_chunks_give_the_loss_of_the_unsorted_batch(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """Embedding in length-sorted chunks of 3 rows (each padded to its own longest text) gives, at step 1,
    the loss of the first batch computed directly from whole, unsorted forwards (dropout off)."""
    from textcl.config import load_config
    from textcl.data.loader import build_training_data
    from textcl.losses import InfoNCELoss
    from textcl.training.setup import build_encoder

    recipe = write_recipe(tmp_path, tiny_model_dir, pairs_file, max_steps=1, dropout=0.0, pooling="mean")
    assert main(["train", str(recipe), "--forward_chunk_size", "3"]) == 0
    config = load_config(str(recipe), ["--output_dir", str(tmp_path / "unused")])
    encoder = build_encoder(config.model)
    data = build_training_data(config.data, tokenizer=encoder.tokenizer, max_seq_length=encoder.max_seq_length,
                               prompts=encoder.prompts, batch_size=config.training.per_device_train_batch_size,
                               seed=config.training.seed)
    batch = next(iter(data.loader))
    with torch.no_grad():
        anchor, positive = encoder(**batch["anchor"]), encoder(**batch["positive"])
        negatives = encoder(**batch["negatives"]).view(8, 1, -1)
        expected = InfoNCELoss(temperature=0.05)(anchor, positive, negatives, negative_mask=batch["negative_mask"],
                                                 positive_ids=batch["positive_ids"], negative_ids=batch["negative_ids"])
    assert losses(tmp_path / "out")[0] == pytest.approx(expected.item(), abs=1e-6)
