"""`mining_rounds`: one `textcl train` mines with the base model, trains, mines with the round-1 model and trains
the final model; each round's files are in the output folder, and a run killed between rounds (SIGKILL) and
resumed ends with the same model as a run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SENTENCES
from safetensors.torch import load_file
from scifact_fixtures import write_beir

import textcl
from textcl.config import load_config
from textcl.errors import TextclError


def beir_train(root: Path) -> Path:
    """8 claims, each with one relevant document among SENTENCES, as BEIR's train split."""
    docs = {f"d{i}": ("", text) for i, text in enumerate(SENTENCES)}
    queries = {f"q{i}": " ".join(SENTENCES[i].split()[:4]) for i in range(8)}
    return write_beir(root, docs, queries, [(f"q{i}", f"d{i}", 1) for i in range(8)], split="train")


def settings(model: Path, beir: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", str(model), "--pooling", "mean", "--train_data", str(beir), "--output_dir",
            str(out), "--mining_rounds", "2", "--mining_options", "num_negatives=2", "min_negatives=0", "range_min=0",
            "--per_device_train_batch_size", "4", "--num_train_epochs", "1", "--save_steps", "1", "--logging_steps",
            "1", "--bf16", "false", "--learning_rate", "1e-3"]


def read_rounds(folder: Path) -> list[dict]:
    """rounds.json's records so far ([] before it exists; it is replaced whole, never read half-written)."""
    path = folder / "rounds.json"
    return json.loads(path.read_text())["rounds"] if path.is_file() else []


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_two_rounds_record_their_files_and_resume_after_a_kill(tiny_model_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTCL_CACHE_DIR", str(tmp_path / "cache"))
    beir = beir_train(tmp_path / "beir")
    whole = tmp_path / "whole"
    textcl.train(load_config(None, settings(tiny_model_dir, beir, whole)))
    rounds = json.loads((whole / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["mined_with"] == str(tiny_model_dir) and rounds[1]["mined_with"] == str(whole / "round-1-model")
    for number, record in enumerate(rounds, start=1):
        mined = whole / f"round-{number}-negatives" / "mined.jsonl"
        assert record["mined_file"] == str(mined) and record["settings"]["num_negatives"] == 2
        sidecar = json.loads(mined.with_name("mined.jsonl.textcl.json").read_text())
        assert sidecar["command"] == "mine" and sidecar["model"] == record["mined_with"]
        assert len(mined.read_text().splitlines()) == 8 and "negative_2" in mined.read_text().splitlines()[0]
    assert (whole / "round-1-model" / "textcl.json").is_file() and (whole / "textcl.json").is_file()
    trained_on = json.loads((whole / "textcl.json").read_text())["config"]["train_data"]
    assert trained_on == [str(whole / "round-2-negatives" / "mined.jsonl")]
    # the second round's negatives come from the trained model, not the base: they differ somewhere
    first, second = ((whole / f"round-{n}-negatives" / "mined.jsonl").read_text() for n in (1, 2))
    assert first != second

    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    command = [sys.executable, "-m", "textcl", "train", *settings(tiny_model_dir, beir, killed)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    deadline = time.monotonic() + 240
    try:
        while "model" not in (read_rounds(killed) or [{}])[0]:
            assert process.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "round 1 did not finish in time"
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        process.kill()
    assert not (killed / "textcl.json").is_file()
    with pytest.raises(TextclError, match="already holds a run of mining rounds; pass --resume_from_checkpoint"):
        textcl.train(load_config(None, settings(tiny_model_dir, beir, killed)))
    round_one = (killed / "round-1-model" / "textcl.json").stat().st_mtime_ns
    textcl.train(load_config(None, [*settings(tiny_model_dir, beir, killed), "--resume_from_checkpoint", "latest"]))
    assert (killed / "round-1-model" / "textcl.json").stat().st_mtime_ns == round_one, "round 1 was trained again"
    for number in (1, 2):
        name = f"round-{number}-negatives/mined.jsonl"
        assert (killed / name).read_text() == (whole / name).read_text()
    got, want = weights(killed), weights(whole)
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[key], want[key], atol=1e-6) for key in want)
