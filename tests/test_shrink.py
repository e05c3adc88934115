"""`textcl shrink`: a layer-reduced student computes what the teacher's first layers compute, and loads in
sentence-transformers with the teacher's tokenizer, pooling and prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SENTENCES
from textcl import Encoder
from textcl.cli import main
from textcl.errors import TextclError
from textcl.model.shrink import evenly_spaced, shrink


@pytest.mark.parametrize(("total", "keep", "expected"), [(6, 3, [0, 2, 5]), (12, 4, [0, 4, 7, 11]), (6, 6, list(range(6))),
                                                          (6, 1, [0])])
def test_evenly_spaced_layers_keep_the_first_and_the_last(total: int, keep: int, expected: list[int]) -> None:
    assert evenly_spaced(total, keep) == expected


def test_a_student_of_the_first_layer_computes_the_teachers_first_layer(tiny_model_dir: Path) -> None:
    teacher = Encoder.load(tiny_model_dir, pooling="mean", device="cpu")
    batch = teacher.tokenize(SENTENCES)
    with torch.no_grad():
        hidden = teacher.model(**batch, output_hidden_states=True).hidden_states[1]  # after layer 0
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
    student = shrink(teacher, [0])
    assert len(student.model.encoder.layer) == 1 and student.model.config.num_hidden_layers == 1
    np.testing.assert_allclose(student.encode(SENTENCES), expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(shrink(teacher, [0, 1]).encode(SENTENCES), teacher.encode(SENTENCES), atol=1e-6)
    assert len(teacher.model.encoder.layer) == 2, "the teacher is unchanged"


def test_shrink_command_writes_a_folder_sentence_transformers_loads(tiny_model_dir: Path, tmp_path: Path) -> None:
    teacher = Encoder.load(tiny_model_dir, pooling="cls", normalize=True, prompts={"query": "query: "}, device="cpu")
    teacher.save(tmp_path / "teacher")
    assert main(["shrink", str(tmp_path / "teacher"), "--num_layers", "1", "--out", str(tmp_path / "student")]) == 0
    student = Encoder.load(tmp_path / "student")
    assert (student.pooling, student.normalize, student.prompts) == ("cls", True, {"query": "query: "})
    assert json.loads((tmp_path / "student" / "config.json").read_text())["num_hidden_layers"] == 1
    assert (tmp_path / "student" / "README.md").is_file()
    st = pytest.importorskip("sentence_transformers")
    theirs = st.SentenceTransformer(str(tmp_path / "student"), device="cpu").encode(SENTENCES)
    np.testing.assert_allclose(student.encode(SENTENCES), theirs, atol=1e-5)


def test_bad_layers_are_one_line(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    teacher = Encoder.load(tiny_model_dir, pooling="mean", device="cpu")
    for layers in ([2], [0, 0], []):
        with pytest.raises(TextclError, match=r"distinct indices in 0\.\.1 \(the model has 2\)"):
            shrink(teacher, layers)
    assert main(["shrink", str(tiny_model_dir), "--num_layers", "3", "--out", str(tmp_path / "s")]) == 2
    assert "num_layers must be between 1 and the model's 2 layers" in capsys.readouterr().err
