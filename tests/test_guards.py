"""Nothing silent: a diverging run stops, a collapsed one is named, data values are never lost without a word,
and a run does not pretend to train what it cannot (batches larger than the data, identical rows)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fault_helpers import all_finite, error_lines, strict_json_lines, write_pairs, write_recipe

from textcl.cli import main
from textcl.errors import TextclError
from textcl.training.guards import NonFiniteGuard, collapse_warning, json_safe, step_is_finite, training_warnings


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.tsv")


def test_the_issues_nan_run_stops_with_one_line_and_saves_no_model(
    tiny_model_dir: Path, pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`--learning_rate 1e36 --max_grad_norm 0`: the first update leaves huge weights, every later loss is NaN.
    The run stops after `max_nonfinite_steps` (3) bad steps in a row, keeps the last good checkpoint,
    writes only standard JSON, and never saves a model."""
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs, max_steps=6, learning_rate=1e36, max_grad_norm=0,
                          save_steps=1, save_total_limit=3)
    assert main(["train", str(recipe)]) == 2
    (error,) = error_lines(capsys)
    assert "non-finite" in error and "3 steps in a row" in error and "checkpoint-1" in error, error
    out = tmp_path / "out"
    records = strict_json_lines(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["loss"] is None for r in records if "loss" in r] == [False, True, True, True]
    assert not (out / "model.safetensors").exists() and not (out / "modules.json").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert all_finite(out / "checkpoint-1" / "model.safetensors")


def test_a_single_bad_step_is_skipped_and_training_goes_on() -> None:
    guard = NonFiniteGuard(max_nonfinite_steps=2)
    steps = [(1.0, 3.0), (float("nan"), 3.0), (1.0, 2.0), (1.0, float("inf")), (float("inf"), None)]
    for step, (loss, norm) in enumerate(steps[:4], start=1):
        guard.observe(step, step_is_finite(torch.tensor(loss), None if norm is None else torch.tensor(norm)))
        guard.raise_if_diverged()  # a single bad step (2), then a good one, then one bad (4): go on
    assert guard.streak == [4]  # a finite loss with an inf gradient is bad too
    assert not guard.observe(5, step_is_finite(torch.tensor(float("inf")), None))
    with pytest.raises(TextclError, match=r"non-finite .* 2 steps in a row \(steps 4-5\)"):
        guard.raise_if_diverged()


def test_metrics_records_are_standard_json() -> None:
    record = {"loss": float("nan"), "stats": {"uniformity": float("-inf"), "alignment": 0.5}, "step": 3}
    assert json.dumps(json_safe(record), allow_nan=False) == (
        '{"loss": null, "stats": {"uniformity": null, "alignment": 0.5}, "step": 3}'
    )


def test_collapse_is_warned_about(tiny_model_dir: Path, pairs: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    """lr 1e3: every embedding lands on one point; the loss sits at ln(8) and uniformity at 0."""
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs, max_steps=6, learning_rate=1e3)
    assert main(["train", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "textcl: warning: the embeddings collapsed" in err and "ln(8)" in err, err
    healthy = [{"step": s, "loss": 2.0 / s, "uniformity": -2.5} for s in range(1, 21)]
    stuck = [{"step": s, "loss": math.log(8) + 0.003, "uniformity": -0.01} for s in range(1, 21)]
    assert collapse_warning(healthy, batch_size=8) is None
    assert "collapsed" in collapse_warning(stuck, batch_size=8)


def test_numbers_in_text_columns_are_text(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    """jsonl values that are numbers (whole columns or half the rows) are texts, not missing values; the TSV
    of digits (read as text since the reader was unified) still trains."""
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"anchor": i if i % 2 else f"text {i}", "positive": i * 1.5 if i % 2 else
                                         f"positive {i}"}) + "\n" for i in range(40)))
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"anchor": i, "positive": i + 1000}) + "\n" for i in range(40)))
    digits = tmp_path / "digits.tsv"
    digits.write_text("anchor\tpositive\n" + "".join(f"{i}\t{i * 3}\n" for i in range(40)))
    for data in (mixed, numbers, digits):
        recipe = write_recipe(tmp_path, tiny_model_dir, data, max_steps=1, output_dir=str(tmp_path / data.stem))
        assert main(["train", str(recipe)]) == 0, data
        assert "(40 rows)" in (tmp_path / data.stem / "README.md").read_text()


def test_every_dropped_row_is_counted_with_its_reason(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    rows = [{"anchor": f"anchor text {i}", "positive": f"positive text {i}"} for i in range(40)]
    rows[3]["anchor"] = ""
    rows[7]["anchor"] = "   "
    rows[11]["anchor"] = ["a", "list"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path, tiny_model_dir, data, max_steps=1)
    assert main(["train", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "dropped 3 of 40 rows" in err and "2 with an empty anchor (rows 4, 8)" in err, err
    assert "1 with an anchor that is not text (row 12)" in err, err
    assert "(37 rows)" in (tmp_path / "out" / "README.md").read_text()


def test_missing_positives_are_an_error_unless_chosen(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    rows = [{"anchor": f"anchor text {i}", "positive": None if i in (4, 9) else f"positive {i}"} for i in range(40)]
    rows[20]["positive"] = ""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path, tiny_model_dir, data, max_steps=1)
    assert main(["train", str(recipe)]) == 2
    (error,) = error_lines(capsys)
    assert "3 rows of" in error and "no positive (rows 5, 10, 21)" in error and "missing_positive" in error, error
    assert main(["train", str(recipe), "--missing_positive", "drop"]) == 0
    assert "(37 rows)" in (tmp_path / "out" / "README.md").read_text()
    assert "dropped 3 of 40 rows" in capsys.readouterr().err
    assert main(["train", str(recipe), "--missing_positive", "dropout", "--overwrite_output_dir", "true"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "(40 rows)" in card and "dropout" in card


def test_a_batch_larger_than_the_data_stops_before_training(tiny_model_dir: Path, pairs: Path, tmp_path: Path,
                                                            capsys) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs, max_steps=1, per_device_train_batch_size=64)
    assert main(["train", str(recipe)]) == 2
    (error,) = error_lines(capsys)
    assert "batch of 64 rows" in error and "larger than the 40 training rows" in error, error
    out = tmp_path / "out"
    assert not out.exists()  # the failed run left nothing, not even its lock


def test_identical_rows_stop_the_run_naming_the_repeats(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "same.tsv"
    data.write_text("anchor\tpositive\n" + "the cat sat\ton the mat\n" * 40)
    recipe = write_recipe(tmp_path, tiny_model_dir, data, max_steps=3)
    assert main(["train", str(recipe)]) == 2  # one-row batches (loss 0, nothing learned) are never made
    (error,) = error_lines(capsys)
    assert "no batch of 2 rows" in error and "39 rows repeat another row's positive (1 distinct positives" in error


def test_training_warnings_on_a_zero_loss() -> None:
    records = [{"step": s, "loss": 0.0, "uniformity": -2.0} for s in range(1, 11)]
    assert any("the loss is 0" in warning for warning in training_warnings(records, batch_size=8))


def test_metrics_do_not_repeat_steps_after_a_resume(tiny_model_dir: Path, pairs: Path, tmp_path: Path) -> None:
    """A run that logged steps 1-3 but checkpointed at 2 (as a kill after step 3 leaves it) resumes at 3."""
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs, max_steps=3, save_steps=2)
    assert main(["train", str(recipe)]) == 0
    with (tmp_path / "out" / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "loss": 1.0')  # a line cut short by the kill
    assert main(["train", str(recipe), "--max_steps", "4", "--resume_from_checkpoint", "latest"]) == 0
    steps = [r["step"] for r in strict_json_lines(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
