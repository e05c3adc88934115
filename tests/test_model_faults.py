"""Faults in what a model folder or a data file holds, caught with one line before they reach torch or onnxruntime:
a tokenizer that does not fit its model, an ONNX file changed after export, infinite teacher scores."""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
from pathlib import Path

import pytest
from conftest import SENTENCES, build_tiny_bert, build_tokenizer
from test_scoring import cross_encoder_dir  # noqa: F401 -- a fixture

from textcl import Encoder
from textcl.cli import main
from textcl.config import DataArguments
from textcl.data.loader import build_training_data
from textcl.errors import TextclError
from textcl.io.beir import read_qrels
from textcl.retrieval.scoring import load_teacher

LONG_TEXT = " ".join(SENTENCES * 12)  # several hundred tokens


def one_error(capsys: pytest.CaptureFixture) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("textcl: error:")]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its ONNX export (no fusions: quicker)."""
    folder = tmp_path_factory.mktemp("model-faults") / "model"
    Encoder.load(tiny_model_dir, pooling="mean").save(folder)
    assert main(["export", str(folder), "--no_optimize"]) == 0
    return folder


def widen_tokenizer(folder: Path) -> None:
    """Map the token 'hello' to id 40000, beyond the model's vocabulary (as in a tokenizer from another model)."""
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    tokenizer["model"]["vocab"]["hello"] = 40000
    path.write_text(json.dumps(tokenizer))


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_tokenizer_with_ids_beyond_the_vocabulary_is_refused_at_load(
    backend: str, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = Path(shutil.copytree(exported, tmp_path / "model"))
    widen_tokenizer(folder)
    size = json.loads((folder / "config.json").read_text())["vocab_size"]
    expected = (rf"the tokenizer of '{re.escape(str(folder))}' can produce token id 40000 \('hello'\) but the "
                rf"model's vocabulary has {size} ids \(0 to {size - 1}\); use the tokenizer the model was trained with")
    with pytest.raises(TextclError, match=expected):
        Encoder.load(folder, backend=backend)
    (tmp_path / "texts.txt").write_text("hello world\n")
    capsys.readouterr()
    assert main(["encode", str(folder), "--input", str(tmp_path / "texts.txt"), "--output", str(tmp_path / "e.npy"),
                 "--backend", backend]) == 2
    assert re.search(expected, one_error(capsys))


def test_lengths_beyond_the_positions_are_capped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A plain transformers folder with 16 positions and a tokenizer that allows 512 tokens: the length is capped
    at 16 with a warning, and `textcl index` of a long document works (before: a tensor size mismatch)."""
    tokenizer = build_tokenizer(SENTENCES)
    tokenizer.model_max_length = 512
    model = build_tiny_bert(len(tokenizer))
    model.config.max_position_embeddings = 16
    model = type(model)(model.config)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    encoder = Encoder.load(tmp_path / "model")
    assert encoder.max_seq_length == 16
    assert re.search(r"textcl: warning: max_seq_length 512 of .* is more than the model's 16 positions",
                     capsys.readouterr().err)
    assert encoder.encode([LONG_TEXT], max_seq_length=400).shape == (1, 32)
    (tmp_path / "corpus.txt").write_text(f"{LONG_TEXT}\nshort document\n")
    assert main(["index", str(tmp_path / "model"), "--corpus", str(tmp_path / "corpus.txt"),
                 "--out", str(tmp_path / "index")]) == 0


def test_a_changed_onnx_file_is_refused(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """200 random bytes flipped in model.onnx (a file that may still parse): refused with one line at load."""
    folder = Path(shutil.copytree(exported, tmp_path / "model"))
    graph = folder / "onnx" / "model.onnx"
    assert (folder / "onnx" / "model.onnx.sha256").read_text().endswith("  model.onnx\n")
    data = bytearray(graph.read_bytes())
    rng = random.Random(0)
    for position in rng.sample(range(len(data) // 2, len(data)), 200):  # in the weights, past the graph's header
        data[position] ^= 0xFF
    graph.write_bytes(bytes(data))
    expected = r"model.onnx changed since it was exported \(its sha256 no longer matches model.onnx.sha256\)"
    with pytest.raises(TextclError, match=expected):
        Encoder.load(folder, backend="onnx")
    (tmp_path / "texts.txt").write_text("hello world\n")
    capsys.readouterr()
    assert main(["encode", str(folder), "--input", str(tmp_path / "texts.txt"), "--output", str(tmp_path / "e.npy"),
                 "--backend", "onnx"]) == 2
    assert re.search(expected, one_error(capsys))
    assert Encoder.load(exported, backend="onnx").encode(["hello world"]).shape == (1, 32), "the intact copy loads"


@pytest.mark.parametrize("score", ["inf", "1e999", "-inf", "Infinity"])
def test_infinite_teacher_scores_are_refused_naming_the_row(score: str, tmp_path: Path) -> None:
    path = tmp_path / "scored.tsv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["anchor", "positive", "positive_score"])
        writer.writerows([("a b", "c", "0.5"), ("d e", "f", score), ("g h", "i", "0.2")])
    with pytest.raises(TextclError, match=rf"row 2 of .* has an infinite teacher score \(positive_score: '{score}'\)"):
        build_training_data(DataArguments(train_data=[str(path)]), tokenizer=None, max_seq_length=8, prompts={},
                            batch_size=1, seed=0, teacher_scores=True)


def test_an_infinite_relevance_grade_is_one_line(tmp_path: Path) -> None:
    """The same class in BEIR qrels: `1e999` was an OverflowError from int(float(...)), a traceback."""
    qrels = tmp_path / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\t1e999\n")
    with pytest.raises(TextclError, match=r"test.tsv:3: relevance score '1e999' is infinite"):
        read_qrels(qrels)


def test_a_cross_encoder_teacher_whose_tokenizer_does_not_fit_is_refused(cross_encoder_dir: Path,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    """The same check for `textcl score`'s cross-encoder teachers (sentence-transformers loads those)."""
    folder = Path(shutil.copytree(cross_encoder_dir, tmp_path / "cross"))
    widen_tokenizer(folder)
    with pytest.raises(TextclError, match=r"can produce token id 40000 \('hello'\) but the model's vocabulary has"):
        load_teacher(folder, device="cpu")
