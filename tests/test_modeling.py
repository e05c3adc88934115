"""Encoder: padding invariance on a real model forward, encode order, prompts, and loading rules."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCES

from textcl import POOLING_MODES, Encoder
from textcl.errors import TextclError


@pytest.mark.parametrize("pooling", POOLING_MODES)
def test_text_alone_equals_text_inside_a_padded_batch(tiny_model_dir: Path, pooling: str) -> None:
    encoder = Encoder.load(tiny_model_dir, pooling=pooling).eval()
    short, long = SENTENCES[2], SENTENCES[4]
    with torch.no_grad():
        alone = encoder(**encoder.tokenize([short]))
        batch = encoder.tokenize([short, long])
        assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]
        together = encoder(**batch)
    assert torch.allclose(together[0], alone[0], atol=1e-5)


def test_encode_restores_input_order_and_matches_one_by_one(tiny_model_dir: Path) -> None:
    encoder = Encoder.load(tiny_model_dir)
    batched = encoder.encode(SENTENCES, batch_size=5)
    single = np.stack([encoder.encode(text) for text in SENTENCES])
    assert batched.shape == (len(SENTENCES), encoder.dim)
    assert np.allclose(batched, single, atol=1e-5)


def test_encode_shapes_normalize_truncate_and_tensor(tiny_model_dir: Path) -> None:
    encoder = Encoder.load(tiny_model_dir)
    assert encoder.encode([]).shape == (0, 32)
    assert encoder.encode("one text").shape == (32,)
    truncated = encoder.encode(SENTENCES, truncate_dim=8, normalize=True)
    assert truncated.shape == (len(SENTENCES), 8)
    assert np.allclose(np.linalg.norm(truncated, axis=1), 1.0, atol=1e-6)
    full = encoder.encode(SENTENCES)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    assert np.allclose(truncated, expected, atol=1e-6)
    assert isinstance(encoder.encode(SENTENCES, convert_to_tensor=True), torch.Tensor)


def test_encode_leaves_training_mode_as_it_was(tiny_model_dir: Path) -> None:
    encoder = Encoder.load(tiny_model_dir).train()
    first = encoder.encode(SENTENCES[:3])
    assert encoder.training
    assert np.allclose(first, encoder.encode(SENTENCES[:3]), atol=1e-6), "encode must run without dropout"


def test_prompts_are_saved_and_applied(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = {"query": "query: ", "document": "passage: "}
    Encoder.load(tiny_model_dir, prompts=prompts).save(tmp_path / "m")
    encoder = Encoder.load(tmp_path / "m")
    assert encoder.prompts == prompts
    by_name = encoder.encode(SENTENCES[:3], prompt_name="query")
    assert np.allclose(by_name, encoder.encode(["query: " + t for t in SENTENCES[:3]]), atol=1e-6)
    assert not np.allclose(by_name, encoder.encode(SENTENCES[:3]), atol=1e-3)
    with pytest.raises(TextclError, match="unknown prompt_name 'passage'; this model's prompts: document, query"):
        encoder.encode("x", prompt_name="passage")


def test_mlp_head_is_used_in_training_only_and_never_saved(tiny_model_dir: Path, tmp_path: Path) -> None:
    encoder = Encoder.load(tiny_model_dir, pooling="cls", mlp_head=True)
    batch = encoder.tokenize(SENTENCES[:2])
    torch.manual_seed(0)
    encoder.model.eval()
    encoder.mlp_head.train()
    encoder.training = True
    with torch.no_grad():
        with_head = encoder(**batch)
        encoder.training = False
        without = encoder(**batch)
    assert not torch.allclose(with_head, without)
    encoder.save(tmp_path / "m")
    reloaded = Encoder.load(tmp_path / "m")
    assert reloaded.mlp_head is None
    assert np.allclose(reloaded.encode(SENTENCES[:2]), encoder.encode(SENTENCES[:2]), atol=1e-6)


def test_plain_transformers_folder_defaults_to_mean_with_a_warning(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="textcl"):
        encoder = Encoder.load(tiny_model_dir)
    assert encoder.pooling == "mean" and not encoder.normalize
    assert "using mean pooling" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="textcl"):
        Encoder.load(tiny_model_dir, pooling="cls")
    assert "using mean pooling" not in caplog.text


def test_bad_model_paths_are_one_line_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(TextclError, match="does not exist"):
        Encoder.load(tmp_path / "missing")
    with pytest.raises(TextclError, match="holds no model"):
        Encoder.load(tmp_path)
    with pytest.raises(TextclError, match="unknown pooling mode 'avg'; valid modes"):
        Encoder.load(tiny_model_dir, pooling="avg")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TextclError, match="could not load the transformers model"):
        Encoder.load(tmp_path)


def test_hub_ids_fail_cleanly_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(TextclError, match="could not be fetched from the Hugging Face Hub"):
        Encoder.load("textcl-tests/no-such-model")
