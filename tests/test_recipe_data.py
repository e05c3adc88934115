"""Every recipe names data a user can get (a Hub dataset id, or a file its header says how to download or make),
and a missing file or unreachable Hub dataset stops `textcl train` with one line before torch or the model load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from textcl.config import load_config
from textcl.errors import TextclError
from textcl.io.sources import check_local_sources, data_sources, hub_dataset

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_data_is_a_hub_id_or_a_file_its_header_says_how_to_get(recipe: Path) -> None:
    header = "\n".join(line for line in recipe.read_text().splitlines() if line.startswith("#"))
    for setting, source in data_sources(load_config(str(recipe), []).data):
        assert "shared" not in source, (setting, source)  # the repository's test data is no user's data
        if setting != "eval_beir" and hub_dataset(source) is not None:
            assert source in header, f"{recipe.name}: say what the Hub dataset {source} holds in the header"
        else:
            name = Path(source).name
            assert any(name in line and ("wget" in line or "--out" in line) for line in header.splitlines()), \
                f"{recipe.name}: the header must say how to get {source}"


def test_hub_ids_with_a_config() -> None:
    assert hub_dataset("sentence-transformers/all-nli:pair") == ("sentence-transformers/all-nli", "pair")
    assert hub_dataset("sentence-transformers/stsb") == ("sentence-transformers/stsb", None)
    assert hub_dataset("data/missing.tsv") is None and hub_dataset("../shared/data/scifact") is None


def test_a_missing_local_file_names_the_setting_and_how_to_get_data(tmp_path: Path) -> None:
    with pytest.raises(TextclError, match=r"eval_sts '.*nope.tsv' does not exist; .*sentence-transformers/stsb"):
        check_local_sources([("train_data", "org/dataset"), ("eval_sts", str(tmp_path / "nope.tsv"))])
    with pytest.raises(TextclError, match=r"eval_beir 'scifact' does not exist; download and unzip a BEIR folder"):
        check_local_sources([("eval_beir", "scifact")])  # a BEIR folder is never a Hub id
    check_local_sources([("train_data", str(Path(__file__)))])


def train_command(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`textcl train` with a model path that does not exist either, under -X importtime (stderr lists every
    module imported), so the test sees that the data error came before torch and any model."""
    command = [sys.executable, "-X", "importtime", "-m", "textcl", "train", str(ROOT / "recipes" / "quickstart.yaml"),
               "--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "out"), *overrides]
    return subprocess.run(command, check=False, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path)


def errors_and_imports(result: subprocess.CompletedProcess) -> tuple[list[str], set[str]]:
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    return [line for line in lines if not line.startswith("import time:")], imported


def test_missing_train_data_is_one_line_before_torch_loads(tmp_path: Path) -> None:
    result = train_command(tmp_path, "--train_data", str(tmp_path / "pairs.tsv"))
    errors, imported = errors_and_imports(result)
    assert result.returncode == 2, result.stderr[-2000:]
    assert errors == [(f"textcl: error: train_data {str(tmp_path / 'pairs.tsv')!r} does not exist; the header of "
                       f"{ROOT / 'recipes' / 'quickstart.yaml'} says how to get or make it; or pass your own file or "
                       "a Hub dataset id, e.g. --train_data sentence-transformers/all-nli:pair (anchor, positive "
                       "pairs) (README: Data formats)")]
    assert "torch" not in imported and "datasets" not in imported and "textcl.training.trainer" not in imported


def test_an_unreachable_hub_dataset_is_one_line_before_torch_loads(tmp_path: Path) -> None:
    result = train_command(tmp_path, "--train_data", "textcl-tests/no-such-dataset:pair")
    errors, imported = errors_and_imports(result)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(
        "textcl: error: could not load train_data 'textcl-tests/no-such-dataset:pair'"), errors
    assert "torch" not in imported and "textcl.training.trainer" not in imported
