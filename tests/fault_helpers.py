"""Helpers shared by the fault-injection tests: tiny data files, recipes, strict JSON, one-line errors."""

from __future__ import annotations

import csv
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from textcl.demo.run import demo_rows

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_pairs(path: Path, rows: int = 40) -> Path:
    """`rows` (anchor, positive) pairs of distinct texts; positives are an anchor's first words."""
    texts = [row["text"] for row in demo_rows()[:rows]]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["anchor", "positive"])
        writer.writerows((t, " ".join(t.split()[: 3 + i % 9])) for i, t in enumerate(texts))
    return path


def write_recipe(tmp_path: Path, model: Path, data: Path, name: str = "recipe.yaml", **settings) -> Path:
    lines = {"model_name_or_path": str(model), "train_data": str(data), "output_dir": str(tmp_path / "out"),
             "per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1, "max_seq_length": 24,
             **settings}
    path = tmp_path / name
    path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in lines.items()))
    return path


def strict_json_lines(path: Path) -> list[dict]:
    """Every line of a .jsonl file parsed as standard JSON (NaN and Infinity are not JSON)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    """The `textcl: error:` lines printed so far (and the captured stderr for messages)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("textcl: error:")]


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(value).all()) for value in load_file(path).values())


def finite_share(value: float) -> bool:
    return value is not None and math.isfinite(value)


class Payload:
    """A pickle whose loading runs a harmless shell command: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_pickle(path: Path, marker: Path) -> None:
    with path.open("wb") as handle:
        pickle.dump(Payload(marker), handle)
