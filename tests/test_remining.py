"""Re-mining during training (`remine_steps`): the negatives are `mine_hard_negatives`' with the model being
trained, a resumed run trains on the re-mined negatives, metrics.jsonl says how many changed, and BEIR folders
work as well as mined files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from accelerate.state import AcceleratorState, GradientState
from conftest import build_tiny_bert
from safetensors.torch import load_file
from transformers import AutoTokenizer

from textcl import Encoder
from textcl.cli import main
from textcl.config import DataArguments, load_config
from textcl.data.loader import build_training_data
from textcl.demo.run import demo_rows
from textcl.errors import TextclError
from textcl.model.encode_options import EncodeOptions
from textcl.retrieval.mining import mine_hard_negatives
from textcl.training.checkpoint import decode
from textcl.training.plan import plan_run
from textcl.training.remining import build_remining, remine_source
from textcl.training.setup import build_encoder
from textcl.training.trainer import Trainer

# No positive-aware filter: the random test models score most documents about as high as the positive, so
# the filter would leave few rows any negative (7 of 80 slots), and steps without one cannot show the re-mine.
MINING = ["--num_negatives", "2", "--min_negatives", "0", "--range_min", "0", "--range_max", "10",
          "--max_score_ratio", "none", "--margin", "none"]


@pytest.fixture(scope="module")
def mined(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """40 pairs, 2 negatives each mined from a 60-document corpus (its sidecar names it) by another random model
    than the one trained, so re-mining with the trained model changes most rows' negatives. (Mined by the trained
    model itself, with the positive-aware filter on, few rows had a negative and fewer changed; whether one of them
    fell in steps 3-4's batches decided the resume test, which then failed now and then.)"""
    folder = tmp_path_factory.mktemp("remine")
    miner = folder / "miner"
    build_tiny_bert(len(AutoTokenizer.from_pretrained(tiny_model_dir)), seed=1).save_pretrained(miner)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(miner)
    texts = [row["text"] for row in demo_rows()[:200]]
    pairs = folder / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"anchor": texts[i], "positive": " ".join(texts[i].split()[:6])}) + "\n"
                             for i in range(40)))
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(texts[100:160]) + "\n")
    out = folder / "mined.jsonl"
    assert main(["mine", str(miner), "--data", str(pairs), "--corpus", str(corpus), "--out", str(out),
                 *MINING, "--no_cache"]) == 0
    return out


def settings(model: Path, data: Path, output: Path, **values) -> list[str]:
    values = {"model_name_or_path": model, "train_data": data, "output_dir": output, "per_device_train_batch_size": 8,
              "logging_steps": 1, "max_seq_length": 24, "dropout": 0.0, "pooling": "mean", "learning_rate": 1e-3,
              "remine_steps": 2, "save_steps": 2, "max_steps": 4, **values}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]


def run(arguments: list[str]) -> Trainer:
    AcceleratorState._reset_state()
    GradientState._reset_state()
    trainer = Trainer(load_config(None, arguments))
    trainer.train()
    return trainer


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, mined: Path) -> Path:
    """4 steps, re-mining at step 2 (the step-4 re-mine would come after the last step: skipped)."""
    output = tmp_path_factory.mktemp("full") / "run"
    run(settings(tiny_model_dir, mined, output))
    return output


def test_remined_negatives_are_mine_hard_negatives_with_the_model_of_that_step(
    full_run: Path, mined: Path, tiny_model_dir: Path
) -> None:
    """The negatives checkpoint-2 holds (re-mined after step 2) equal `mine_hard_negatives` run, with the
    settings of the mined file's sidecar, by the model of checkpoint-2; they differ from the file's."""
    config = load_config(None, settings(tiny_model_dir, mined, full_run))
    encoder = build_encoder(config.model)
    encoder.load_state_dict(load_file(full_run / "checkpoint-2" / "model.safetensors"))
    rows = [json.loads(line) for line in mined.read_text().splitlines()]
    corpus = (mined.parent / "corpus.txt").read_text().splitlines()
    recorded = json.loads(Path(f"{mined}.textcl.json").read_text())["settings"]  # texts cut at 64 tokens, not 24
    assert (recorded["query_max_length"], recorded["document_max_length"]) == (64, 64)
    expected = mine_hard_negatives(encoder, [r["anchor"] for r in rows], [r["positive"] for r in rows], corpus,
                                   num_negatives=2, min_negatives=0, range_min=0, range_max=10, max_score_ratio=None,
                                   margin=None,
                                   encode_options=EncodeOptions(query_max_length=64, document_max_length=64))
    state = json.loads((full_run / "checkpoint-2" / "textcl_state.json").read_text())["state"]
    saved = decode(state, load_file(full_run / "checkpoint-2" / "textcl_state.safetensors"))["remining"]["negatives"]
    want = [[t for t in (a, b) if t] for a, b in zip(expected.columns["negative_1"], expected.columns["negative_2"])]
    assert saved == want
    before = [[t for t in (r["negative_1"], r["negative_2"]) if t] for r in rows]
    changed = sum(len(set(new) - set(old)) for new, old in zip(want, before))
    log = [r for r in records(full_run) if "negatives_changed" in r]
    assert [r["step"] for r in log] == [2] and changed > 0
    assert log[0]["negatives_changed"] == changed and log[0]["remined_negatives"] == sum(map(len, want))


def test_a_resumed_run_trains_on_the_remined_negatives(full_run: Path, mined: Path, tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    """Resumed from checkpoint-2 (after the re-mine), steps 3 and 4 log the uninterrupted run's losses; a run that
    never re-mines before step 4 (so steps 3-4 train on the file's negatives) logs others: the negatives count."""
    resumed = tmp_path / "resumed"
    shutil.copytree(full_run, resumed, ignore=shutil.ignore_patterns("checkpoint-4"))
    for name in ("model.safetensors", "textcl.json", "README.md"):
        (resumed / name).unlink(missing_ok=True)
    run(settings(tiny_model_dir, mined, resumed, resume_from_checkpoint="latest"))
    full = [r["loss"] for r in records(full_run) if "loss" in r]
    again = [r["loss"] for r in records(resumed) if "loss" in r]
    assert again == pytest.approx(full, abs=1e-6) and len(full) == 4
    stale = tmp_path / "stale"
    run(settings(tiny_model_dir, mined, stale, remine_steps=4))
    other = [r["loss"] for r in records(stale) if "loss" in r]
    assert other[:2] == pytest.approx(full[:2], abs=1e-6)
    assert other[2:] != pytest.approx(full[2:], abs=1e-4)


def test_beir_folders_are_remined_against_their_corpus(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A BEIR folder's rows start without negatives; a re-mine gives each (query, document) pair those of
    `mine_hard_negatives` over the folder's corpus (every relevant document of a query excluded)."""
    texts = [row["text"] for row in demo_rows()[:60]]
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                                 for i, t in enumerate(texts[:40])))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                                  for i, t in enumerate(texts[40:])))
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{j}\t1\n" for i in range(20) for j in ({i, (i + 7) % 40})))
    data = DataArguments(train_data=[str(folder)], remine_steps=5, num_negatives=2)
    encoder = Encoder.load(tiny_model_dir, pooling="mean")
    built = build_training_data(data, tokenizer=encoder.tokenizer, max_seq_length=24, prompts={}, batch_size=8, seed=0)
    remining = build_remining(data, built.loader.dataset, built.collator, "fp32")
    assert built.collator.num_negatives == 2 and not any(remining.negatives.values())
    assert len(remine_source(data).corpus) == 40 and remining.source.settings == {"num_negatives": 2}
    window = {"range_min": 0, "range_max": 10, "max_score_ratio": None, "margin": None}  # a random model: no threshold
    remining.source.settings |= window
    logged = remining.remine(encoder)
    anchors, positives = zip(*remining.pairs)
    expected = mine_hard_negatives(encoder, anchors, positives, texts[:40], num_negatives=2, min_negatives=0, **window)
    assert [remining.negatives[key] for key in remining.pairs] == [
        [t for t in (a, b) if t] for a, b in zip(expected.columns["negative_1"], expected.columns["negative_2"])]
    assert logged["remined_rows"] == 40 and logged["negatives_changed"] == logged["remined_negatives"] > 0
    batch = next(iter(remining.apply(built.loader)))
    first = remining.negatives[batch["row_keys"][0]]
    assert int(batch["negative_mask"][0].sum()) == len(first)


def test_remine_steps_errors_name_the_fix(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"anchor": "a", "positive": "b"}) + "\n")
    base = ["--model_name_or_path", "m", "--output_dir", str(tmp_path), "--remine_steps", "2"]
    with pytest.raises(TextclError, match="replaces the negatives whose teacher scores"):
        plan_run(load_config(None, base + ["--train_data", str(plain), "--distill_loss", "kl"]))
    with pytest.raises(TextclError, match="one train_data"):
        plan_run(load_config(None, base + ["--train_data", str(plain), str(plain)]))
    with pytest.raises(TextclError, match="written by `textcl mine`"):
        remine_source(DataArguments(train_data=[str(plain)], remine_steps=2))
