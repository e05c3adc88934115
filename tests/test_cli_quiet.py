"""The command line is quiet by default (no progress bars of transformers and datasets), `--verbose` brings them
back, and `textcl train --help` lists every setting with its help text under its group."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SENTENCES

from textcl.config import PARTS

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
for name in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS",
             "HF_HUB_DISABLE_PROGRESS_BARS"):
    ENV.pop(name, None)  # the libraries' defaults, as on a user's machine
LIBRARY_OUTPUT = ("Generating train split", "Map:", "Filter:", "Loading weights", "Writing model shards")


def train_help() -> str:
    result = subprocess.run([sys.executable, "-m", "textcl", "train", "--help"], check=True, env=ENV,
                            capture_output=True, text=True, timeout=300)
    return result.stdout


def test_train_help_lists_every_setting_with_its_help_under_its_group() -> None:
    text = " ".join(train_help().split())  # argparse wraps lines
    headings = [text.index(f"{group} settings") for group in ("model", "data", "loss", "training")]
    assert headings == sorted(headings)
    loss = text[headings[2]:headings[3]]
    assert "--temperature VALUE InfoNCE temperature: lower sharpens the softmax over candidates. (default: 0.05)" in loss
    for part in PARTS:
        for item in dataclasses.fields(part):
            assert item.metadata.get("help"), f"{item.name} has no help text"
            assert f"--{item.name} " in text


@pytest.fixture
def run_files(tmp_path: Path, tiny_model_dir: Path) -> list[str]:
    """A new data file for each test: datasets caches what it generated from a file (no bar the second time)."""
    pairs = tmp_path / "pairs.tsv"
    with pairs.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["anchor", "positive"])
        writer.writerows((s, " ".join(s.split()[:4])) for s in SENTENCES)
    return ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(pairs), "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--max_seq_length", "24", "--pooling", "mean"]


def train(tmp_path: Path, settings: list[str], *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "textcl", *flags, "train", *settings, "--output_dir", str(tmp_path / "out")]
    return subprocess.run(command, check=True, env=ENV, capture_output=True, text=True, timeout=300)


def test_library_progress_bars_are_hidden_by_default(run_files: list[str], tmp_path: Path) -> None:
    result = train(tmp_path, run_files)
    assert not [marker for marker in LIBRARY_OUTPUT if marker in result.stderr], result.stderr
    assert "train: 100%" in result.stderr  # textcl's own bar stays
    assert "" not in result.stdout.splitlines() and "textcl: model saved to" in result.stdout


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_brings_them_back(run_files: list[str], tmp_path: Path, where: str) -> None:
    result = train(tmp_path, run_files, "--verbose") if where == "before" else train(tmp_path, [*run_files, "--verbose"])
    assert "Generating train split" in result.stderr and "Map:" in result.stderr and "Loading weights" in result.stderr
