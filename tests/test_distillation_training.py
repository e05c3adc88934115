"""Distillation in training: teacher scores written by `textcl score` round-trip into the batches, the
distill_* settings are checked, and a step's loss is InfoNCE + distill_weight x the distillation loss
computed directly on the same embeddings (chunked forwards and GradCache alike)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import SENTENCES, build_tiny_bert
from transformers import AutoTokenizer

from textcl import Encoder
from textcl.cli import main
from textcl.config import DataArguments, load_config
from textcl.data.collator import text_id
from textcl.data.loader import build_training_data
from textcl.demo.run import demo_rows
from textcl.errors import TextclError
from textcl.losses import InfoNCELoss
from textcl.losses.distillation import EmbeddingMSELoss, KLDistillationLoss, MarginMSELoss, real_rows
from textcl.retrieval.scoring import load_teacher, score_pairs
from textcl.training.plan import plan_run
from textcl.training.step import split_views
from textcl.training.trainer import Trainer


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """Another tiny random BERT with the fixture model's tokenizer."""
    path = tmp_path_factory.mktemp("teacher")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    build_tiny_bert(len(tokenizer), seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 rows with 1 or 2 negatives (negative_2 blank in every third row)."""
    texts = [row["text"] for row in demo_rows()[:200]]
    rows = [{"anchor": texts[i], "positive": " ".join(texts[i].split()[:5]), "negative_1": texts[100 + i],
             "negative_2": texts[150 + i] if i % 3 else ""} for i in range(40)]
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def scored_file(rows_file: Path, teacher_dir: Path) -> Path:
    out = rows_file.parent / "scored.tsv"  # TSV: its cells are read back as text
    assert main(["score", str(teacher_dir), "--data", str(rows_file), "--out", str(out), "--no_cache"]) == 0
    return out


def test_teacher_scores_round_trip_from_textcl_score_into_the_batches(
    scored_file: Path, rows_file: Path, teacher_dir: Path
) -> None:
    """Every batch's `teacher_scores` `[B, 1 + k]` are the teacher's scores of (anchor, positive) and (anchor, each
    negative), in the negatives' order, with 0 where `negative_mask` marks a missing negative."""
    tokenizer = Encoder.load(teacher_dir).tokenizer
    data = build_training_data(DataArguments(train_data=[str(scored_file)]), tokenizer=tokenizer, max_seq_length=32,
                               prompts={}, batch_size=8, seed=0, teacher_scores=True)
    teacher = load_teacher(teacher_dir)
    source = [json.loads(line) for line in rows_file.read_text().splitlines()]
    by_id = {text_id(row["anchor"]): row for row in source}
    pairs = [(row["anchor"], text) for row in source for text in (row["positive"], row["negative_1"], row["negative_2"])
             if text]
    expected = dict(zip(pairs, score_pairs(teacher, *zip(*pairs)).tolist()))
    seen = 0
    for batch in data.loader:
        scores, mask = batch["teacher_scores"], batch["negative_mask"]
        assert scores.shape == (len(batch["anchor_ids"]), 3) and scores.dtype == torch.float32
        for i, anchor_id in enumerate(batch["anchor_ids"].tolist()):
            row = by_id[anchor_id]
            kept = [text for text in (row["positive"], row["negative_1"], row["negative_2"]) if text]
            assert scores[i, : len(kept)].tolist() == pytest.approx([expected[row["anchor"], t] for t in kept], abs=1e-6)
            assert mask[i].tolist() == [True, len(kept) == 3]
            assert scores[i, len(kept) :].eq(0).all()
            seen += 1
    assert seen == 40


def test_distillation_settings_and_data_errors_name_the_fix(rows_file: Path, tmp_path: Path) -> None:
    base = ["--model_name_or_path", "m", "--train_data", str(rows_file), "--output_dir", str(tmp_path)]
    for settings, message in [
        (["--distill_loss", "kld"], "use one of none, kl, margin_mse, mse"),
        (["--distill_loss", "mse"], "set teacher_model"),
        (["--distill_loss", "kl", "--teacher_model", "t"], "teacher_model is read by distill_loss mse only"),
        (["--distill_loss", "kl", "--distill_temperature", "0"], "must be > 0"),
    ]:
        with pytest.raises(TextclError, match=message):
            plan_run(load_config(None, base + settings))
    with pytest.raises(TextclError, match=r"no 'positive_score' column .*textcl score TEACHER"):
        build_training_data(DataArguments(train_data=[str(rows_file)]), tokenizer=None, max_seq_length=8, prompts={},
                            batch_size=8, seed=0, teacher_scores=True)
    unscored = tmp_path / "partly.jsonl"  # a negative without its score
    unscored.write_text(json.dumps({"anchor": "a b", "positive": "c", "negative_1": "d", "positive_score": 0.5,
                                    "negative_1_score": None}) + "\n")
    with pytest.raises(TextclError, match="row 1 .* without a teacher score .*textcl score"):
        build_training_data(DataArguments(train_data=[str(unscored)]), tokenizer=None, max_seq_length=8, prompts={},
                            batch_size=1, seed=0, teacher_scores=True)


def run_settings(model: Path, data: Path, output: Path, **settings) -> list[str]:
    values = {"model_name_or_path": model, "train_data": data, "output_dir": output, "per_device_train_batch_size": 8,
              "logging_steps": 1, "max_seq_length": 24, "dropout": 0.0, "pooling": "mean", "learning_rate": 0.0,
              "max_steps": 1, **settings}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


@pytest.mark.parametrize("settings", [
    {"distill_loss": "kl", "distill_temperature": 0.5, "distill_weight": 0.7, "forward_chunk_size": 3},
    {"distill_loss": "margin_mse", "distill_weight": 2.0, "gradcache_chunk_size": 3},
    {"distill_loss": "mse", "distill_weight": 5.0, "forward_chunk_size": 0},
], ids=["kl-chunks", "margin_mse-gradcache", "mse"])
def test_a_steps_loss_is_infonce_plus_weight_times_the_distillation_loss(
    tiny_model_dir: Path, scored_file: Path, teacher_dir: Path, tmp_path: Path, settings: dict
) -> None:
    """The logged loss of step 1 equals InfoNCE + distill_weight x the distillation loss, both computed here by
    fresh loss objects on the encoder's embeddings of the step's batch; the logged parts equal the two terms."""
    if settings["distill_loss"] == "mse":
        settings = settings | {"teacher_model": teacher_dir}
    AcceleratorState._reset_state()
    GradientState._reset_state()
    trainer = Trainer(load_config(None, run_settings(tiny_model_dir, scored_file, tmp_path / "run", **settings)))
    trainer.start_epoch(0)
    batch = next(iter(trainer.prepared_loader))
    encoder = trainer.unwrapped()
    encoder.train()
    with torch.no_grad():
        groups = [batch["anchor"], batch["positive"], batch["negatives"]]
        anchor, positive, negatives = split_views([encoder(**group) for group in groups], batch)
        infonce = InfoNCELoss(temperature=0.05)(anchor, positive, negatives, negative_mask=batch["negative_mask"],
                                                positive_ids=batch["positive_ids"], negative_ids=batch["negative_ids"])
        mask, scores = batch["negative_mask"], batch["teacher_scores"]
        if settings["distill_loss"] == "kl":
            distill = KLDistillationLoss(0.5)(anchor, positive, negatives, scores, negative_mask=mask)
        elif settings["distill_loss"] == "margin_mse":
            distill = MarginMSELoss()(anchor, positive, negatives, scores, negative_mask=mask)
        else:
            teacher = Encoder.load(teacher_dir).eval()
            views = split_views([teacher.embed(**group) for group in groups], batch)
            distill = EmbeddingMSELoss()(real_rows(anchor, positive, negatives, mask), real_rows(*views, mask))
    assert distill.item() > 1e-4  # the distillation term is not negligible next to the tolerance
    trainer.train()
    record = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][0]
    weight = settings["distill_weight"]
    assert record["loss"] == pytest.approx(infonce.item() + weight * distill.item(), abs=1e-5)
    assert record["contrastive_loss"] == pytest.approx(infonce.item(), abs=1e-5)
    assert record["distill_loss"] == pytest.approx(distill.item(), abs=1e-6)


def test_margin_mse_without_negatives_and_mse_with_another_width_are_refused(
    tiny_model_dir: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"anchor": f"{t} one", "positive": t, "positive_score": 0.5}) + "\n"
                             for t in SENTENCES))
    AcceleratorState._reset_state()
    with pytest.raises(TextclError, match="margin_mse needs hard negatives"):
        Trainer(load_config(None, run_settings(tiny_model_dir, pairs, tmp_path / "a", distill_loss="margin_mse")))
    AcceleratorState._reset_state()
    with pytest.raises(TextclError, match="set dense_dim: 32"):
        Trainer(load_config(None, run_settings(tiny_model_dir, pairs, tmp_path / "b", distill_loss="mse",
                                               teacher_model=teacher_dir, dense_dim=16)))


def test_the_distill_small_recipe_trains_a_shrunk_student_on_mined_teacher_scores(
    teacher_dir: Path, rows_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """recipes/distill-small.yaml as its header says (shrink the teacher, mine with it, train), on tiny data: the
    run reads the mined file's teacher scores, logs both loss terms and saves a 1-layer student."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    student, mined, out = tmp_path / "student", tmp_path / "mined.jsonl", tmp_path / "distilled"
    assert main(["shrink", str(teacher_dir), "--num_layers", "1", "--out", str(student)]) == 0
    assert main(["mine", str(teacher_dir), "--data", str(rows_file), "--out", str(mined), "--num_negatives", "3",
                 "--min_negatives", "0", "--range_min", "0", "--range_max", "10", "--max_score_ratio", "none",
                 "--no_cache"]) == 0  # a random teacher scores everything alike: no threshold
    overrides = ["--model_name_or_path", str(student), "--train_data", str(mined), "--output_dir", str(out),
                 "--max_seq_length", "24", "--query_max_length", "16", "--document_max_length", "24",
                 "--per_device_train_batch_size", "8", "--max_steps", "2", "--logging_steps", "1", "--bf16", "false"]
    assert main(["train", "recipes/distill-small.yaml", *overrides]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "distill_loss" in record]
    assert len(steps) == 2 and all(r["distill_loss"] > 0 and r["loss"] > r["contrastive_loss"] for r in steps)
    assert Encoder.load(out).model.config.num_hidden_layers == 1
