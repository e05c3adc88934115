"""LoRA on a tiny model: only the adapter trains, the saved adapter is small and loads in textcl and
sentence-transformers, merging changes nothing, and it composes with GradCache, two processes and resume."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCES
from safetensors.torch import load_file
from torch import nn

from textcl import Encoder, SearchIndex
from textcl.cli import main
from textcl.config import ModelArguments, load_config
from textcl.demo.run import demo_rows
from textcl.training.setup import build_encoder
from textcl.training.trainer import Trainer

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LORA = {"lora": True, "lora_r": 4, "lora_alpha": 8, "pooling": "mean", "learning_rate": 1e-2}


def write_recipe(tmp_path: Path, model: Path, data: Path, **settings) -> Path:
    lines = {"model_name_or_path": str(model), "train_data": str(data), "output_dir": str(tmp_path / "out"),
             "per_device_train_batch_size": 8, "logging_steps": 1, "max_seq_length": 24, **settings}
    path = tmp_path / "recipe.yaml"
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in lines.items()))
    return path


def losses(output_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [record["loss"] for record in records if "loss" in record]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.tsv"
    texts = [row["text"] for row in demo_rows()[:96]]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["anchor", "positive", "negative"])
        writer.writerows((t, " ".join(t.split()[::-1]), texts[48 + i]) for i, t in enumerate(texts[:48]))
    return path


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, pairs_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    tmp_path = tmp_path_factory.mktemp("lora")
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs_file, max_steps=6, **LORA)
    trainer = Trainer(load_config(str(recipe), []))
    trainer.train()
    return trainer


def test_only_the_adapter_changes(trained: Trainer, tiny_model_dir: Path) -> None:
    base = Encoder.load(tiny_model_dir).model.state_dict()
    trainable, frozen = {}, {}
    for name, value in trained.unwrapped().model.named_parameters():
        (trainable if value.requires_grad else frozen)[name] = value.detach()
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert all(value.abs().max() > 0 for name, value in trainable.items() if ".lora_B." in name)  # B starts at 0
    for name, value in frozen.items():
        key = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(value, base[key]), key  # bit-identical
    assert len(frozen) == len(base)


def test_adapter_folder_is_small_and_loads_in_both_libraries(
    trained: Trainer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = trained.output_dir
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    adapter = Encoder.load(out)
    ours = adapter.encode(SENTENCES)
    assert not np.allclose(ours, Encoder.load(tiny_model_dir, pooling="mean").encode(SENTENCES), atol=1e-3)
    st = pytest.importorskip("sentence_transformers")
    assert np.allclose(st.SentenceTransformer(str(out), device="cpu").encode(SENTENCES), ours, atol=1e-5)
    assert main(["merge", str(out), str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert np.allclose(Encoder.load(tmp_path / "merged").encode(SENTENCES), ours, atol=1e-5)
    adapter_bytes = (out / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.05 * (tmp_path / "merged" / "model.safetensors").stat().st_size
    index = SearchIndex.build(adapter, SENTENCES)
    index.save(tmp_path / "index")
    hits, reloaded = index.search(SENTENCES[:3], k=4), SearchIndex.load(tmp_path / "index").search(SENTENCES[:3], k=4)
    assert np.allclose(hits.scores, reloaded.scores, atol=1e-5)  # the index names the adapter, not its base model
    card = (out / "README.md").read_text()
    assert "LoRA adapter (rank 4, alpha 8, on query, value)" in card and "@inproceedings{hu2022lora" in card


def test_training_from_an_adapter_folder_continues_it_or_merges_it(trained: Trainer) -> None:
    """lora: true keeps training the saved adapter; lora: false fine-tunes every weight of the merged model."""
    adapter = Encoder.load(trained.output_dir).encode(SENTENCES)
    again = build_encoder(ModelArguments(model_name_or_path=str(trained.output_dir), lora=True, pooling="mean"))
    trainable = [name for name, value in again.named_parameters() if value.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    full = build_encoder(ModelArguments(model_name_or_path=str(trained.output_dir), pooling="mean"))
    assert not full.model.__class__.__name__.startswith("Peft")
    assert all(value.requires_grad for name, value in full.named_parameters() if "pooler" not in name)
    assert np.allclose(full.encode(SENTENCES), adapter, atol=1e-5)


def test_lora_merge_saves_a_full_model(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs_file, max_steps=2, lora_merge=True, **LORA)
    assert main(["train", str(recipe)]) == 0
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert not Encoder.load(out).model.__class__.__name__.startswith("Peft")
    card = (out / "README.md").read_text()
    assert "saved merged into full weights" in card and "holds a LoRA adapter" not in card


def test_resume_from_a_checkpoint_gives_the_same_adapter(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """Dropout and LoRA dropout on, so the resumed run must also restore the RNG states exactly."""
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs_file, max_steps=8, save_steps=3, **LORA)
    assert main(["train", str(recipe), "--output_dir", str(tmp_path / "full")]) == 0
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert main(["train", str(recipe), "--output_dir", str(tmp_path / "resumed"),
                 "--resume_from_checkpoint", str(checkpoint)]) == 0
    expected = load_file(tmp_path / "full" / "adapter_model.safetensors")
    got = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")[3:]


def test_two_processes_with_gradcache_equal_one_plain_process(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """2 processes x 8 rows in GradCache chunks of 3 vs 1 process x 16 rows in one pass: same losses."""
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs_file, max_steps=3, dropout=0.0, lora_dropout=0.0, **LORA)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "textcl", "train",
              str(recipe), "--output_dir", str(tmp_path / "two"), "--gradcache_chunk_size", "3"]
    result = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one_process = ["--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "16"]
    assert main(["train", str(recipe), *one_process]) == 0
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == 3
    assert two == pytest.approx(one, abs=1e-5)
    assert json.loads((tmp_path / "two" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize(("settings", "message"), [
    ({"lora_target_modules": ["qkv_proj"]}, "lora_target_modules .* match no layer .* named: .*query"),
    ({"lora": False, "lora_merge": True}, "lora_merge merges a LoRA adapter: set lora: true"),
])
def test_bad_lora_settings_are_one_line(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture, settings: dict, message: str
) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs_file, max_steps=2, **(LORA | settings))
    assert main(["train", str(recipe)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("textcl: error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors


def test_merge_refuses_a_full_model(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["merge", str(tiny_model_dir), str(tmp_path / "out")]) == 2
    assert "holds no LoRA adapter" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_architectures_peft_does_not_know_get_every_linear_layer_but_the_pooler() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import MPNetConfig, MPNetModel

    from textcl.model.lora import default_target_modules

    model = MPNetModel(MPNetConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32))
    targets, exclude = default_target_modules(model)
    assert targets == "all-linear" and exclude == ["pooler.dense"]
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and "pooler" not in name}
    wrapped = get_peft_model(model, LoraConfig(target_modules=targets, exclude_modules=exclude))
    adapted = {name.split(".lora_A")[0] for name, _ in wrapped.named_parameters() if ".lora_A." in name}
    assert {name.removeprefix("base_model.model.") for name in adapted} == linear and len(linear) == 6
