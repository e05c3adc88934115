"""Recipes: YAML values with command-line overrides, and one-line errors for typos."""

from __future__ import annotations

from pathlib import Path

import pytest

from textcl.config import TrainConfig, load_config
from textcl.errors import TextclError
from textcl.training.plan import plan_run

BASE = "model_name_or_path: m\ntrain_data: d.txt\noutput_dir: out\n"


def recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(BASE + text)
    return str(path)


def test_yaml_values_are_typed_and_overrides_win(tmp_path: Path) -> None:
    path = recipe(tmp_path, "learning_rate: 3e-5\nsymmetric: true\neval_sts: [a.tsv, b.tsv]\n"
                            "matryoshka_dims: [64, 32]\n")
    config = load_config(path, ["--per_device_train_batch_size", "8", "--learning_rate", "1e-4", "--bf16"])
    assert config.training.learning_rate == pytest.approx(1e-4)
    assert config.training.per_device_train_batch_size == 8 and config.training.bf16
    assert config.loss.symmetric and config.loss.matryoshka_dims == [64, 32]
    assert config.data.eval_sts == ["a.tsv", "b.tsv"]
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("learning_rat: 1e-5\n", [], "unknown recipe key 'learning_rat'; did you mean 'learning_rate'?"),
        ("", ["--temprature", "0.1"], "unknown option '--temprature'; did you mean 'temperature'?"),
        ("", ["--learning_rat", "1"], "did you mean 'learning_rate'"),
        ("bf16: true\nfp16: true\n", [], "bf16 and fp16 are both set"),
    ],
)
def test_mistakes_name_the_fix(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(TextclError, match=message):
        plan_run(load_config(recipe(tmp_path, text), overrides))


def test_missing_required_and_bad_files(tmp_path: Path) -> None:
    (tmp_path / "partial.yaml").write_text("model_name_or_path: m\ntrain_data: d\n")
    with pytest.raises(TextclError, match="missing required setting 'output_dir'"):
        load_config(str(tmp_path / "partial.yaml"), [])
    with pytest.raises(TextclError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"), [])
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(TextclError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"), [])
