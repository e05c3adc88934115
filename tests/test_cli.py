"""The `textcl` command: help, version, encode, `--device`, and one-line errors with exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCES

from textcl import Encoder, __version__


def textcl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textcl", *args], capture_output=True, text=True, timeout=300)


def test_help_and_version() -> None:
    assert "encode" in textcl("--help").stdout
    assert textcl("--version").stdout.strip() == f"textcl {__version__}"


def test_encode_writes_the_same_vectors_as_the_api(tiny_model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n")
    result = textcl("encode", str(tiny_model_dir), "--input", str(tmp_path / "in.txt"),
                    "--output", str(tmp_path / "e.npy"))
    assert result.returncode == 0, result.stderr
    expected = Encoder.load(tiny_model_dir).encode(SENTENCES)
    assert np.allclose(np.load(tmp_path / "e.npy"), expected, atol=1e-6)


def bad_inputs(tmp: Path, model: Path) -> list[tuple[list[str], str]]:
    (tmp / "ok.txt").write_text("hello\n")
    (tmp / "empty.txt").write_text("\n\n")
    (tmp / "latin1.txt").write_bytes("fine\ncaf\xe9\n".encode("latin-1"))
    (tmp / "nomodel").mkdir()
    return [
        (["encode", str(tmp / "missing"), "--input", str(tmp / "ok.txt")], "model path '.*missing' does not exist"),
        (["encode", str(tmp / "nomodel"), "--input", str(tmp / "ok.txt")], "holds no model"),
        (["encode", str(model), "--pooling", "avg", "--input", str(tmp / "ok.txt")], "valid modes: mean, cls"),
        (["encode", str(model), "--input", str(tmp / "empty.txt")], "input file .* is empty"),
        (["encode", str(model), "--input", str(tmp / "latin1.txt")], r"latin1.txt:2: not UTF-8"),
        (["encode", str(model), "--input", str(tmp / "nofile.txt")], "input file .* does not exist"),
    ]


@pytest.mark.parametrize("case", range(6))
def test_bad_input_is_one_line_and_exit_code_2(tiny_model_dir: Path, tmp_path: Path, case: int) -> None:
    args, message = bad_inputs(tmp_path, tiny_model_dir)[case]
    result = textcl(*args, "--output", str(tmp_path / "out.npy"))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("textcl: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "out.npy").exists()


def test_device_cpu_gives_the_default_vectors(tiny_model_dir: Path, tmp_path: Path) -> None:
    """`--device cpu` runs and, on a machine without a GPU, matches the default device's output exactly."""
    (tmp_path / "in.txt").write_text("\n".join(SENTENCES) + "\n")
    for name, extra in (("default", []), ("cpu", ["--device", "cpu"])):
        result = textcl("encode", str(tiny_model_dir), "--input", str(tmp_path / "in.txt"),
                        "--output", str(tmp_path / f"{name}.npy"), *extra)
        assert result.returncode == 0, result.stderr
    if not torch.cuda.is_available():
        assert np.array_equal(np.load(tmp_path / "default.npy"), np.load(tmp_path / "cpu.npy"))


@pytest.mark.parametrize(("device", "message"), [("gpu0", "unknown --device 'gpu0'"),
                                                  ("cuda:7", "cuda:7: (this torch .* sees no such|only .* visible)")])
def test_unusable_device_is_one_line(tiny_model_dir: Path, tmp_path: Path, device: str, message: str) -> None:
    (tmp_path / "in.txt").write_text("hello\n")
    for command in (["encode", str(tiny_model_dir), "--input", str(tmp_path / "in.txt"), "--output",
                     str(tmp_path / "out.npy")], ["eval", str(tiny_model_dir), "--sts", str(tmp_path / "in.txt")]):
        result = textcl(*command, "--device", device)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert re.search(message, result.stderr.strip().splitlines()[-1]), result.stderr
    assert not (tmp_path / "out.npy").exists()
