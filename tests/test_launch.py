"""`textcl train --num_processes N` starts N processes through accelerate's launcher (gloo on a CPU-only
machine) and reports a failing process as one line naming its rank, with no launcher traceback."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import SENTENCES
from gloo_processes import launch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
       "OMP_NUM_THREADS": "1"}


@pytest.fixture
def settings(tmp_path: Path, tiny_model_dir: Path) -> list[str]:
    pairs = tmp_path / "pairs.tsv"
    with pairs.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["anchor", "positive"])
        writer.writerows((s, " ".join(s.split()[:4])) for s in SENTENCES)
    return ["--model_name_or_path", str(tiny_model_dir), "--train_data", str(pairs), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--max_seq_length", "16", "--logging_steps", "1",
            "--output_dir", str(tmp_path / "out")]


def train(tmp_path: Path, *arguments: str):
    command = [sys.executable, "-m", "textcl", "train", "--num_processes", "2", *arguments]
    return launch(command, timeout=420, env=ENV, log_dir=tmp_path / "logs")


@pytest.mark.slow
def test_two_processes_train_and_one_summary_is_printed(settings: list[str], tmp_path: Path) -> None:
    result = train(tmp_path, *settings)
    assert result.returncode == 0, result.stdout[-3000:]
    run = json.loads((tmp_path / "out" / "textcl.json").read_text())
    assert run["config"]["max_steps"] == 2 and (tmp_path / "out" / "config.json").is_file()
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # 2 processes x batch 2: every step saw 4 rows (the gathered batch)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert result.stdout.count("textcl: model saved to") == 1


@pytest.mark.slow
def test_a_failing_process_is_one_line_naming_its_rank(settings: list[str], tmp_path: Path) -> None:
    result = train(tmp_path, *settings, "--anchor_column", "question")
    errors = [line for line in result.stdout.splitlines() if "error" in line.lower()]
    assert result.returncode == 2, result.stdout[-3000:]
    assert "Traceback" not in result.stdout and "CalledProcessError" not in result.stdout, result.stdout[-3000:]
    assert len(errors) == 1, errors
    assert errors[0].startswith("textcl: error: process 0 of 2: anchor column 'question' not in ")


def test_the_root_cause_is_the_first_failure_not_a_peer_that_lost_it(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from textcl.cli.launch import root_cause

    (tmp_path / "rank-0.txt").write_text("process 0 of 3 stopped at step 4: a collective failed or waited longer")
    (tmp_path / "rank-1.txt").write_text("out of memory in step 4")
    failures = {0: SimpleNamespace(timestamp=100, exitcode=2), 1: SimpleNamespace(timestamp=100, exitcode=2),
                2: SimpleNamespace(timestamp=99, exitcode=-9)}
    assert root_cause(failures, 3, tmp_path) == "process 2 of 3 exited with code -9 (its output is above)"
    failures[2].timestamp = 101
    assert root_cause(failures, 3, tmp_path) == "process 1 of 3: out of memory in step 4"
