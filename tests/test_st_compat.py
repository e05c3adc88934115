"""The saved folder is a sentence-transformers model, and sentence-transformers folders load in textcl."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES
from scipy.stats import spearmanr

from textcl import Encoder

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.base.modules.dense import Dense
from sentence_transformers.base.modules.normalize import Normalize
from sentence_transformers.base.modules.transformer import Transformer
from sentence_transformers.sentence_transformer.modules.pooling import Pooling


@pytest.mark.parametrize("pooling", ["mean", "cls", "last_token"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dense", [False, True])
def test_textcl_folder_loads_in_sentence_transformers(
    tiny_model_dir: Path, tmp_path: Path, pooling: str, normalize: bool, dense: bool
) -> None:
    encoder = Encoder.load(tiny_model_dir, pooling=pooling, normalize=normalize, max_seq_length=16)
    if dense:
        encoder.add_dense(12)
    encoder.save(tmp_path)
    ours = Encoder.load(tmp_path).encode(SENTENCES)
    theirs = st.SentenceTransformer(str(tmp_path), device="cpu").encode(SENTENCES)
    assert ours.shape == theirs.shape == (len(SENTENCES), 12 if dense else 32)
    assert np.allclose(ours, theirs, atol=1e-5)
    if normalize:
        assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("st_mode", ["mean", "cls", "max", "lasttoken", "weightedmean"])
@pytest.mark.parametrize("extras", [(), ("dense",), ("dense", "normalize"), ("normalize",)])
def test_sentence_transformers_folder_loads_in_textcl(
    tiny_model_dir: Path, tmp_path: Path, st_mode: str, extras: tuple[str, ...]
) -> None:
    modules = [Transformer(str(tiny_model_dir), max_seq_length=16), Pooling(32, st_mode)]
    if "dense" in extras:
        modules.append(Dense(32, 10))
    if "normalize" in extras:
        modules.append(Normalize())
    model = st.SentenceTransformer(modules=modules, device="cpu", prompts={"query": "query: "})
    model.save(str(tmp_path))
    theirs = model.encode(SENTENCES, prompt_name="query")
    encoder = Encoder.load(tmp_path)
    assert encoder.max_seq_length == 16
    assert encoder.prompts["query"] == "query: "
    assert np.allclose(encoder.encode(SENTENCES, prompt_name="query"), theirs, atol=1e-5)


def stsb_spearman(encode, path: Path) -> float:
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    left = encode([row["sentence1"] for row in rows])
    right = encode([row["sentence2"] for row in rows])
    cosine = (left * right).sum(1) / np.linalg.norm(left, axis=1) / np.linalg.norm(right, axis=1)
    return spearmanr(cosine, [float(row["score"]) for row in rows]).statistic


def test_real_minilm_reproduces_the_published_stsb_score(minilm_path: str, shared_data: Path) -> None:
    encoder = Encoder.load(minilm_path)
    assert encoder.pooling == "mean" and encoder.normalize and encoder.max_seq_length == 256
    score = stsb_spearman(lambda texts: encoder.encode(texts, batch_size=64), shared_data / "stsb" / "test.tsv")
    assert score == pytest.approx(0.8203, abs=0.002)
