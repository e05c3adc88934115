"""`textcl train` ends with a human summary read from the run's own records: where the model is, steps and time,
the final loss, the evaluation of the base model (step 0) and of the trained one, and a warning when the run
made the evaluation worse."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import SENTENCES

from textcl import Encoder, evaluate
from textcl.cli import main
from textcl.config import load_config
from textcl.evaluation.evaluators import RetrievalEvaluator, STSEvaluator
from textcl.training.summary import base_evaluation, run_warnings, summary_lines, worse_than_base
from textcl.training.trainer import train


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("summary-data")
    pairs = folder / "pairs.tsv"
    with pairs.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["anchor", "positive"])
        writer.writerows((s, " ".join(s.split()[:4])) for s in SENTENCES)
    sts = folder / "sts.tsv"
    with sts.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["sentence1", "sentence2", "score"])
        writer.writerows((a, b, (i * 7) % 5) for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1])))
    return {"pairs": pairs, "sts": sts}


def write_recipe(tmp_path: Path, model: Path, data: dict[str, Path], **settings) -> Path:
    lines = {"model_name_or_path": str(model), "train_data": str(data["pairs"]), "output_dir": str(tmp_path / "out"),
             "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1, "max_seq_length": 24,
             "max_steps": 3, "pooling": "mean", **settings}
    path = tmp_path / "recipe.yaml"
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in lines.items()))
    return path


def test_summary_reports_the_run_and_the_base_model_evaluation(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, data, eval_sts=[str(data["sts"])])
    assert main(["train", str(recipe)]) == 0
    out, err = capsys.readouterr()
    output_dir = tmp_path / "out"
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    final = json.loads((output_dir / "textcl.json").read_text())["metrics"]

    # step 0 is the base model's evaluation, equal to evaluating the base model directly
    assert records[0]["step"] == 0 and "loss" not in records[0]
    direct = evaluate(Encoder.load(tiny_model_dir, pooling="mean", max_seq_length=24), sts=[data["sts"]])
    assert records[0]["sts"]["spearman"] == pytest.approx(direct["sts"]["spearman"], abs=1e-6)

    before, after = records[0]["sts"]["spearman"], final["sts"]["spearman"]
    losses = [r["loss"] for r in records if "loss" in r]
    assert f"textcl: model saved to {output_dir}" in out
    assert "  3 steps in " in out
    assert f"final loss {losses[-1]:.4f} (first logged {losses[0]:.4f})" in out
    assert f"sts.spearman: {before:.4f} (base model) -> {after:.4f} ({after - before:+.4f})" in out
    assert not out.lstrip().startswith("{")  # no raw JSON dump without --json
    # the worse-than-base warning fires exactly when the trained model scores lower
    assert ("fell from" in err) == (after < before - 1e-4), (before, after, err)


def test_json_flag_prints_the_metrics(tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, data, max_steps=1)
    assert main(["train", str(recipe), "--json"]) == 0
    out = capsys.readouterr().out
    dump = json.loads(out[out.index("{"):])
    assert dump["train"]["train_runtime"] > 0
    assert "no evaluation: set eval_split" in out  # without eval sets, no step-0 evaluation either
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1


EVALUATORS = (STSEvaluator(("sts.tsv",)), RetrievalEvaluator("beir-folder"))


def records_of(before: float, after_loss: float = 0.5) -> list[dict]:
    return [{"step": 0, "sts": {"spearman": before}},
            *({"step": s, "loss": after_loss, "uniformity": -2.0} for s in range(1, 6))]


def test_worse_than_base_warning_fires_only_on_a_drop() -> None:
    records = records_of(0.80)
    assert base_evaluation(records, EVALUATORS) == {"sts": {"spearman": 0.80}}
    worse = run_warnings(records, 32, {"sts": {"spearman": 0.70}}, EVALUATORS)
    assert len(worse) == 1 and "sts.spearman fell from 0.8000 (base model) to 0.7000" in worse[0]
    assert run_warnings(records, 32, {"sts": {"spearman": 0.85}}, EVALUATORS) == []
    assert run_warnings(records, 32, {"sts": {"spearman": 0.80}}, EVALUATORS) == []
    retrieval = worse_than_base({"retrieval": {"ndcg@1": 0.5, "ndcg@10": 0.6}}, {"retrieval": {"ndcg@10": 0.4}},
                                EVALUATORS)
    assert len(retrieval) == 1 and "retrieval.ndcg@10" in retrieval[0]


def test_collapse_is_warned_in_the_summary_warnings() -> None:
    collapsed = [{"step": s, "loss": math.log(32), "uniformity": -0.001} for s in range(1, 9)]
    warnings = run_warnings(collapsed, 32, {}, EVALUATORS)
    assert len(warnings) == 1 and "collapsed" in warnings[0]


def test_summary_without_a_base_evaluation_shows_the_final_one() -> None:
    lines = summary_lines("out", [{"step": 2, "loss": 1.5}, {"step": 2, "train_runtime": 75.0,
                                                              "train_samples_per_second": 3.0}],
                          {"retrieval": {"ndcg@10": 0.25}}, EVALUATORS)
    assert lines == ["textcl: model saved to out (metrics.jsonl and textcl.json beside it)",
                     "  2 steps in 1m 15s (3.0 samples/s)", "  final loss 1.5000 (first logged 1.5000)",
                     "  retrieval.ndcg@10: 0.2500"]


def test_an_action_added_from_python_runs_after_every_step_and_the_best_model_follows_the_headline(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    """`train(config, actions=[...])` calls each action after every optimizer step, after the run's own (the
    step's loss is logged by then); `metric_for_best_model: sts` keeps the model with the best STS headline
    (Spearman), and the card names that model and its headline."""
    seen = []

    class Record:
        def on_step_end(self, trainer) -> None:
            seen.append((trainer.position.step, trainer.last_loss))

    recipe = write_recipe(tmp_path, tiny_model_dir, data, eval_sts=[str(data["sts"])], eval_steps=1,
                          metric_for_best_model="sts")
    train(load_config(str(recipe), []), actions=[Record()])
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in seen] == [1, 2, 3]
    assert [loss for _, loss in seen] == pytest.approx([r["loss"] for r in records if "loss" in r])
    evaluations = {r["step"]: r["sts"]["spearman"] for r in records if "sts" in r and r["step"] > 0}
    best = max(evaluations, key=evaluations.get)  # the first of equal values: only a strict gain replaces it
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"the kept model (step {best}, the best by `sts`)" in card
    assert f"**sts** (headline `spearman`, higher is better): {evaluations[best]:.4f}" in card


def test_the_card_names_the_kept_step_when_the_base_model_scored_the_same(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    """At learning_rate 0 every evaluation equals the base model's (step 0): the run keeps step 1's model (the first
    evaluation of training; only a strict gain replaces it), and the card names step 1, not step 0."""
    recipe = write_recipe(tmp_path, tiny_model_dir, data, eval_sts=[str(data["sts"])], eval_steps=1,
                          metric_for_best_model="sts", learning_rate=0.0)
    train(load_config(str(recipe), []))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len({r["sts"]["spearman"] for r in records if "sts" in r}) == 1  # the premise: all equal, step 0 too
    assert "the kept model (step 1, the best by `sts`)" in (tmp_path / "out" / "README.md").read_text()
