"""Teacher scores: `textcl score` writes a bi-encoder's cosines or a cross-encoder's logits next to the texts,
cached, with a sidecar naming the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SENTENCES, build_tokenizer
from textcl import Encoder
from textcl.cli import main
from textcl.io.tables import load_table, read_provenance
from textcl.model.encode_options import EncodeOptions
from textcl.retrieval.scoring import load_teacher, score_pairs


def write_triplets(path: Path) -> Path:
    rows = [{"anchor": SENTENCES[i], "positive": SENTENCES[i + 4], "negative_1": SENTENCES[(i + 7) % 12],
             "negative_2": SENTENCES[(i + 9) % 12] if i % 2 else ""} for i in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_bi_encoder_scores_are_the_cosines_of_its_prompted_embeddings(tiny_model_dir: Path, tmp_path: Path) -> None:
    teacher_dir = tmp_path / "teacher"
    Encoder.load(tiny_model_dir, pooling="mean", prompts={"query": "q: ", "document": "d: "}).save(teacher_dir)
    data, out, cache = write_triplets(tmp_path / "t.jsonl"), tmp_path / "scored.jsonl", tmp_path / "cache"
    assert main(["score", str(teacher_dir), "--data", str(data), "--out", str(out), "--cache_dir", str(cache)]) == 0
    rows = load_table(out).to_list()
    encoder = Encoder.load(teacher_dir)
    for row in rows:
        q = encoder.encode(row["anchor"], prompt_name="query", normalize=True)
        for column in ("positive", "negative_1", "negative_2"):
            if row[column]:
                d = encoder.encode(row[column], prompt_name="document", normalize=True)
                assert row[f"{column}_score"] == pytest.approx(float(q @ d), abs=1e-5)
            else:
                assert row[f"{column}_score"] is None
    provenance = read_provenance(out)
    assert provenance["scores"]["model"] == str(teacher_dir) and provenance["scores"]["kind"] == "bi-encoder"
    cached = sorted(cache.glob("*.npy"))
    assert cached and main(["score", str(teacher_dir), "--data", str(data), "--out", str(out),
                            "--cache_dir", str(cache)]) == 0
    assert sorted(cache.glob("*.npy")) == cached and load_table(out).to_list() == rows


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small randomly initialised sentence-transformers CrossEncoder (none can be downloaded here)."""
    st = pytest.importorskip("sentence_transformers")
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = build_tokenizer(SENTENCES)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=1)
    raw = tmp_path_factory.mktemp("raw-cross")
    BertForSequenceClassification(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    folder = tmp_path_factory.mktemp("cross")
    st.CrossEncoder(str(raw), device="cpu").save(str(folder))
    return folder


def test_cross_encoder_scores_are_its_raw_logits(cross_encoder_dir: Path, tmp_path: Path) -> None:
    from sentence_transformers import CrossEncoder

    teacher = load_teacher(cross_encoder_dir, device="cpu")
    assert teacher.kind == "cross-encoder"
    pairs = [(SENTENCES[i], SENTENCES[(i * 5) % 12]) for i in range(12)]
    expected = CrossEncoder(str(cross_encoder_dir), device="cpu").predict(pairs, activation_fn=torch.nn.Identity())
    scores = score_pairs(teacher, *zip(*pairs), EncodeOptions(batch_size=5, cache_dir=tmp_path))
    np.testing.assert_allclose(scores, np.asarray(expected).reshape(-1), atol=1e-5)
    assert len(list(tmp_path.glob("pairs-*.npy"))) == 1
    np.testing.assert_array_equal(score_pairs(teacher, *zip(*pairs), EncodeOptions(cache_dir=tmp_path)), scores)
    data, out = write_triplets(tmp_path / "t.jsonl"), tmp_path / "scored.parquet"
    assert main(["score", str(cross_encoder_dir), "--data", str(data), "--out", str(out), "--no_cache"]) == 0
    row = load_table(out)[0]
    assert row["negative_1_score"] == pytest.approx(
        float(CrossEncoder(str(cross_encoder_dir), device="cpu").predict([(row["anchor"], row["negative_1"])],
                                                                          activation_fn=torch.nn.Identity())[0]),
        abs=1e-5)
    assert read_provenance(out)["scores"]["kind"] == "cross-encoder"


def mine(model: Path, pairs: Path, out: Path, *extra: str) -> None:
    command = ["mine", str(model), "--data", str(pairs), "--out", str(out), "--num_negatives", "2",
               "--min_negatives", "0", "--range_min", "0", "--range_max", "8", *extra]
    assert main(command) == 0


def test_mining_is_deterministic_and_its_sidecar_says_how(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two runs give byte-identical files (fresh, and from the cache), and the sidecar records every setting."""
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("anchor\tpositive\n" + "".join(f"{SENTENCES[i]}\t{SENTENCES[i + 6]}\n" for i in range(6)))
    outs = [tmp_path / f"mined{i}.jsonl" for i in range(3)]
    mine(tiny_model_dir, pairs, outs[0], "--no_cache")
    mine(tiny_model_dir, pairs, outs[1], "--cache_dir", str(tmp_path / "cache"))
    mine(tiny_model_dir, pairs, outs[2], "--cache_dir", str(tmp_path / "cache"))
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()
    sidecars = [read_provenance(out) for out in outs]
    assert sidecars[0]["settings"] == sidecars[1]["settings"] == sidecars[2]["settings"]
    settings = sidecars[0]["settings"]
    assert settings["range_max"] == 8 and settings["min_negatives"] == 0 and settings["precision"] == "fp32"
    assert settings["query_max_length"] == settings["document_max_length"] == Encoder.load(tiny_model_dir).max_seq_length
    assert sidecars[0]["environment"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_mine_with_a_teacher_writes_the_teachers_scores(tiny_model_dir: Path, cross_encoder_dir: Path,
                                                        tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("anchor\tpositive\n" + "".join(f"{SENTENCES[i]}\t{SENTENCES[i + 6]}\n" for i in range(6)))
    mine(tiny_model_dir, pairs, tmp_path / "plain.jsonl", "--no_cache")
    mine(tiny_model_dir, pairs, tmp_path / "taught.jsonl", "--no_cache", "--teacher", str(cross_encoder_dir))
    plain, taught = load_table(tmp_path / "plain.jsonl").to_list(), load_table(tmp_path / "taught.jsonl").to_list()
    assert [r["negative_1"] for r in plain] == [r["negative_1"] for r in taught], "the teacher does not change mining"
    teacher = load_teacher(cross_encoder_dir, device="cpu")
    expected = score_pairs(teacher, [r["anchor"] for r in taught], [r["positive"] for r in taught])
    np.testing.assert_allclose([r["positive_score"] for r in taught], expected, atol=1e-5)
    assert read_provenance(tmp_path / "taught.jsonl")["scores"] == {"model": str(cross_encoder_dir),
                                                                    "kind": "cross-encoder"}
