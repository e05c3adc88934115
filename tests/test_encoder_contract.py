"""One encoder contract: the torch and ONNX encoders share one encode loop and the same defaults; the eight encode
settings travel as one `EncodeOptions`; the sentence-transformers folder is read through a module registry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES

from textcl.cli import main
from textcl.errors import TextclError
from textcl.model.encode_options import EncodeOptions
from textcl.model.encoder import Encoder
from textcl.model.onnx_backend import OnnxEncoder
from textcl.model.text_encoder import TextEncoder
from textcl.retrieval.search_index import SearchIndex


def test_both_backends_are_one_text_encoder_with_one_encode_loop() -> None:
    assert issubclass(Encoder, TextEncoder) and issubclass(OnnxEncoder, TextEncoder)
    assert Encoder.encode is TextEncoder.encode and OnnxEncoder.encode is TextEncoder.encode


def test_both_backends_default_to_the_same_max_length(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A folder that saves no truncation length (and a tokenizer without a real model_max_length) truncates at the
    model's 64 positions in both backends; the ONNX one used to take 512 and fail on a long text."""
    pytest.importorskip("onnxruntime")
    from textcl.model.onnx_export import MIN_COSINE, export_onnx

    folder = tmp_path / "model"
    Encoder.load(tiny_model_dir, pooling="mean", device="cpu").save(folder)
    export_onnx(folder)
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        config = json.loads((folder / name).read_text())
        config.pop(key)
        (folder / name).write_text(json.dumps(config))
    torch_encoder, onnx_encoder = Encoder.load(folder, device="cpu"), Encoder.load(folder, backend="onnx")
    assert torch_encoder.max_seq_length == onnx_encoder.max_seq_length == 64
    long_text = [" ".join(SENTENCES * 2)]
    a, b = torch_encoder.encode(long_text, normalize=True), onnx_encoder.encode(long_text, normalize=True)
    assert float((a * b).sum()) >= MIN_COSINE


def test_encode_options_resolve_once_and_an_index_keeps_them(tiny_model_dir: Path) -> None:
    encoder = Encoder.load(tiny_model_dir, pooling="mean", prompts={"query": "query: "}, device="cpu")
    options = EncodeOptions(document_max_length=16, batch_size=5)
    resolved = options.resolved(encoder)
    assert (resolved.query_prompt_name, resolved.document_prompt_name) == ("query", None)
    assert (resolved.query_max_length, resolved.document_max_length) == (encoder.max_seq_length, 16)
    index = SearchIndex.build(encoder, SENTENCES, encode_options=options)
    assert index.encode_options == EncodeOptions(query_prompt_name="query", query_max_length=encoder.max_seq_length,
                                                 document_max_length=16)
    expected = encoder.encode(SENTENCES[:3], prompt_name="query", normalize=True)
    assert np.allclose(index.encode(SENTENCES[:3], "query"), expected, atol=1e-6)


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 0}, "batch_size must be at least 1"),
    ({"query_max_length": 0}, "query_max_length must be at least 1"),
    ({"precision": "fp16"}, "unknown precision 'fp16'"),
])
def test_bad_encode_options_are_one_line(options: dict, message: str) -> None:
    with pytest.raises(TextclError, match=message):
        EncodeOptions(**options)


def test_an_unknown_module_type_is_one_line_naming_it(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    folder = tmp_path / "model"
    Encoder.load(tiny_model_dir, pooling="mean", device="cpu").save(folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append({"idx": 2, "name": "2", "path": "2_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "texts.txt").write_text("a text\n")
    capsys.readouterr()  # what loading the tiny model printed
    assert main(["encode", str(folder), "--input", str(tmp_path / "texts.txt"), "--output", str(tmp_path / "x.npy")]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "'sentence_transformers.models.LayerNorm' is not supported" in error
