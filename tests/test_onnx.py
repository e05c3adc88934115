"""ONNX export and the ONNX backend: the graph (pooling, Dense, normalize inside) equals the torch encoder."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES

from textcl.cli import main
from textcl.errors import TextclError
from textcl.model.encoder import Encoder
from textcl.model.onnx_export import MIN_COSINE, export_onnx
from textcl.model.pooling import POOLING_MODES
from textcl.retrieval.search_index import SearchIndex
from textcl.serving.store import DurableIndex

pytest.importorskip("onnxruntime")

TEXTS = SENTENCES + ["ok", "a much longer text " * 20]  # one text longer than the tiny model's 64 tokens


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def save_tiny(folder: Path, tiny_model_dir: Path, pooling: str = "mean", normalize: bool = False,
              dense: int | None = None) -> Path:
    encoder = Encoder.load(tiny_model_dir, pooling=pooling, normalize=normalize, device="cpu")
    if dense:
        encoder.add_dense(dense)
    encoder.save(folder)
    return folder


# Every pooling mode; Dense and normalization ride along on two of them so the head is covered too.
ROUND_TRIPS = {mode: {} for mode in POOLING_MODES} | {"mean": {"normalize": True}, "max": {"dense": 24}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir) -> Path:
    """A tiny model (mean pooling, normalized, a "query" prompt) exported with its int8 graph; tests that change
    the folder work on a copy."""
    folder = tmp_path_factory.mktemp("exported") / "model"
    encoder = Encoder.load(tiny_model_dir, normalize=True, prompts={"query": "query: "}, device="cpu")
    encoder.save(folder)
    export_onnx(folder, quantize="int8")
    return folder


@pytest.mark.parametrize("pooling", sorted(ROUND_TRIPS))
def test_export_round_trip_per_pooling_mode(tmp_path, tiny_model_dir, pooling):
    folder = save_tiny(tmp_path / "model", tiny_model_dir, pooling, **ROUND_TRIPS[pooling])
    result = export_onnx(folder)
    assert [path.name for path in result.files] == ["model.onnx"]
    expected = Encoder.load(folder, device="cpu").encode(TEXTS, batch_size=5)
    onnx = Encoder.load(folder, backend="onnx")
    got = onnx.encode(TEXTS, batch_size=5)
    assert got.shape == expected.shape
    assert cosines(got, expected).min() >= MIN_COSINE
    assert onnx.pooling == pooling and onnx.dim == expected.shape[1]
    # batch size and order do not change a text's embedding (padding is masked inside the graph)
    assert cosines(onnx.encode(TEXTS[::-1], batch_size=3)[::-1], got).min() >= MIN_COSINE


def test_encode_options_match_torch(exported):
    """Prompts, truncate_dim, normalize, max_seq_length and single strings behave as the torch encoder's."""
    folder = exported
    torch_encoder, onnx = Encoder.load(folder, device="cpu"), Encoder.load(folder, backend="onnx")
    options = {"prompt_name": "query", "truncate_dim": 16, "normalize": True, "max_seq_length": 8}
    expected, got = torch_encoder.encode(TEXTS, **options), onnx.encode(TEXTS, **options)
    assert got.shape == (len(TEXTS), 16)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert cosines(got, expected).min() >= MIN_COSINE
    assert onnx.encode("ok").shape == (onnx.dim,)
    with pytest.raises(TextclError, match="torch backend"):
        onnx.encode(TEXTS, precision="bf16")


def test_int8_export_is_close_on_tiny_model(exported):
    folder = exported
    files = folder / "onnx" / "model.onnx", folder / "onnx" / "model_qint8.onnx"
    assert files[1].stat().st_size < files[0].stat().st_size / 2
    expected = Encoder.load(folder, device="cpu").encode(TEXTS)
    got = Encoder.load(folder, backend="onnx", onnx_file="model_qint8.onnx").encode(TEXTS)
    assert cosines(got, expected).min() > 0.99


NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    folder, texts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    max_length = json.load(open(f"{folder}/sentence_bert_config.json"))["max_seq_length"]
    tokenizer = Tokenizer.from_file(f"{folder}/tokenizer.json")
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding()
    session = ort.InferenceSession(f"{folder}/onnx/model.onnx", providers=["CPUExecutionProvider"])
    batch = tokenizer.encode_batch(texts)
    inputs = {"input_ids": [e.ids for e in batch], "attention_mask": [e.attention_mask for e in batch],
              "token_type_ids": [e.type_ids for e in batch]}
    feeds = {i.name: np.array(inputs[i.name], dtype=np.int64) for i in session.get_inputs()}
    embeddings = session.run(["sentence_embedding"], feeds)[0]
    assert "torch" not in sys.modules and "transformers" not in sys.modules, sorted(sys.modules)
    np.save(out, embeddings)
    """
)


def test_exported_graph_runs_without_torch_or_transformers(tmp_path, exported):
    """Plain onnxruntime + tokenizers reproduce the embeddings: pooling and normalization are in the graph."""
    folder = exported
    script = tmp_path / "no_torch.py"
    script.write_text(NO_TORCH_SCRIPT)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([sys.executable, str(script), str(folder), json.dumps(TEXTS), str(tmp_path / "out.npy")],
                   check=True, timeout=120, env=environment, cwd=tmp_path)
    expected = Encoder.load(folder, device="cpu").encode(TEXTS)
    got = np.load(tmp_path / "out.npy")
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)  # normalized inside the graph
    assert cosines(got, expected).min() >= MIN_COSINE


def test_stale_export_is_refused(tmp_path, exported):
    folder = shutil.copytree(exported, tmp_path / "model")
    Encoder.load(folder, backend="onnx")  # fresh: loads
    encoder = Encoder.load(folder, device="cpu")
    encoder.model.embeddings.word_embeddings.weight.data.mul_(1.5)
    encoder.save(folder)
    for onnx_file in ("model.onnx", "model_qint8.onnx"):
        with pytest.raises(TextclError, match="stale.*textcl export"):
            Encoder.load(folder, backend="onnx", onnx_file=onnx_file)
    # a folder shipped with its ONNX files only (no torch weights) has nothing to be stale against
    shipped = shutil.copytree(exported, tmp_path / "shipped")
    (shipped / "model.safetensors").unlink()
    assert Encoder.load(shipped, backend="onnx").encode(["ok"]).shape == (1, 32)


def test_lora_adapter_is_merged_on_export(tmp_path, tiny_model_dir):
    encoder = Encoder.load(tiny_model_dir, device="cpu")
    encoder.add_lora(str(tiny_model_dir), r=4, target_modules=["query", "value"])
    for name, parameter in encoder.model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.5)  # a trained adapter: it changes the embeddings
    encoder.save(tmp_path / "adapter")
    with pytest.raises(TextclError, match="LoRA adapter.*--out"):
        export_onnx(tmp_path / "adapter")
    export_onnx(tmp_path / "adapter", out=tmp_path / "merged")
    expected = Encoder.load(tmp_path / "adapter", device="cpu").encode(TEXTS)
    base = Encoder.load(tiny_model_dir, device="cpu").encode(TEXTS)
    got = Encoder.load(tmp_path / "merged", backend="onnx").encode(TEXTS)
    assert cosines(got, expected).min() >= MIN_COSINE
    assert cosines(base, expected).min() < 0.999  # the adapter mattered


def test_bad_input_gets_one_line(tmp_path, tiny_model_dir, capsys):
    folder = save_tiny(tmp_path / "model", tiny_model_dir)
    assert main(["export", str(folder), "--opset", "9"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1] == "textcl: error: opset 9 is not supported; use 14 to 20 (default 17)"
    assert main(["encode", str(folder), "--input", str(tmp_path / "x.txt"), "--output", str(tmp_path / "x.npy"),
                 "--backend", "onnx"]) == 2  # the input file is missing: one line, whatever the backend
    (tmp_path / "x.txt").write_text("hello\n")
    assert main(["encode", str(folder), "--input", str(tmp_path / "x.txt"), "--output", str(tmp_path / "x.npy"),
                 "--backend", "onnx"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("textcl: error: no ONNX file 'model.onnx'") and "textcl export" in error[-1]
    with pytest.raises(TextclError, match="inside an exported ONNX graph"):
        Encoder.load(folder, backend="onnx", pooling="cls")


def test_unsupported_architecture_gets_one_line(tmp_path, capsys):
    """A model the exporter cannot trace (FNet's Fourier transform has no ONNX op) fails with one line naming the
    architecture, and nothing else on stdout."""
    import transformers
    from conftest import build_tokenizer

    tokenizer = build_tokenizer(SENTENCES)
    config = transformers.FNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.FNetModel(config).save_pretrained(tmp_path / "fnet")
    tokenizer.save_pretrained(tmp_path / "fnet")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "fnet")]) == 2
    output = capsys.readouterr()
    assert output.out == ""
    assert output.err.strip().splitlines()[-1].startswith("textcl: error: cannot export the fnet architecture")


def test_cli_export_and_encode_with_onnx(tmp_path, tiny_model_dir, capsys):
    folder = save_tiny(tmp_path / "model", tiny_model_dir, normalize=True)
    assert main(["export", str(folder), "--opset", "18"]) == 0
    assert "model.onnx" in capsys.readouterr().out
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    assert main(["encode", str(folder), "--input", str(corpus), "--output", str(tmp_path / "e.npy"),
                 "--backend", "onnx"]) == 0
    expected = Encoder.load(folder, device="cpu").encode(SENTENCES)
    assert cosines(np.load(tmp_path / "e.npy"), expected).min() >= MIN_COSINE


def test_cli_index_and_search_with_the_int8_graph(tmp_path, exported, capsys):
    """The index records the backend and ONNX file it was built with; search loads the same graph."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    assert main(["index", str(exported), "--corpus", str(corpus), "--out", str(tmp_path / "index"),
                 "--backend", "onnx", "--onnx_file", "model_qint8.onnx", "--quantize", "int8", "--rescore", "2"]) == 0
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert meta["backend"] == "onnx" and meta["onnx_file"] == "model_qint8.onnx" and meta["quantize"] == "int8"
    capsys.readouterr()
    assert main(["search", str(tmp_path / "index"), SENTENCES[3], "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert hits[0]["text"] == SENTENCES[3]
    int8 = Encoder.load(exported, backend="onnx", onnx_file="model_qint8.onnx")
    query, document = int8.encode([SENTENCES[3]], prompt_name="query")[0], int8.encode(SENTENCES)[3]
    assert hits[0]["score"] == pytest.approx(float(query @ document), abs=1e-5)  # rescored with the int8 graph's floats


def test_a_served_index_runs_its_model_in_onnxruntime(tmp_path, exported):
    """`textcl serve --backend onnx` opens an index built with torch on the ONNX graph: the same hits (scores
    within 1e-5) as `SearchIndex.search` with torch."""
    folder = tmp_path / "index"
    SearchIndex.build(Encoder.load(exported, device="cpu"), SENTENCES[:-2]).save(folder)
    queries = [" ".join(text.split()[1:]) for text in SENTENCES[:4]]
    expected = SearchIndex.load(folder, device="cpu").search(queries, k=3)
    store = DurableIndex.open(folder, backend="onnx")
    try:
        assert store.index.require_encoder().backend == "onnx"
        got = store.index.search(queries, k=3)
        assert got.ids.tolist() == expected.ids.tolist()
        assert np.allclose(got.scores, expected.scores, atol=1e-5)
    finally:
        store.close()
    with pytest.raises(TextclError, match="onnx_file applies to backend='onnx'"):  # after: one server per folder
        DurableIndex.open(folder, backend="torch", onnx_file="model_qint8.onnx")


def test_cli_eval_with_onnx_backend_and_quantized_search(tmp_path, exported, capsys):
    """`textcl eval --backend onnx` gives torch's metrics; --quantize binary --rescore over the whole tiny corpus
    rescores every document with its float vector, so the ranking (and nDCG) is the exact one."""
    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n" for i, text in enumerate(SENTENCES)))
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": " ".join(text.split()[2:])}) + "\n" for i, text in enumerate(SENTENCES[:6])))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\td{i + 1}\t1\n" for i in range(6)))  # the next sentence: a ranking that is neither 0 nor 1
    results = {}
    for name, extra in {"torch": [], "onnx": ["--backend", "onnx"],
                        "binary": ["--backend", "onnx", "--quantize", "binary", "--rescore", "12"]}.items():
        out = tmp_path / f"{name}.json"
        assert main(["eval", str(exported), "--beir", str(folder), "--k_values", "10", "--json", str(out), *extra]) == 0
        results[name] = json.loads(out.read_text())["retrieval"]
    assert 0 < results["torch"]["ndcg@10"] < 1
    assert results["onnx"]["ndcg@10"] == pytest.approx(results["torch"]["ndcg@10"], abs=1e-6)
    assert results["binary"]["ndcg@10"] == pytest.approx(results["torch"]["ndcg@10"], abs=1e-6)


@pytest.mark.slow
def test_int8_minilm_keeps_sts_quality(tmp_path, minilm_path, shared_data):
    """Real model, small set: STS-B test (first 300 pairs) Spearman of the int8 graph within 0.01 of fp32."""
    from scipy.stats import spearmanr

    export_onnx(minilm_path, out=tmp_path / "minilm", quantize="int8")
    with (shared_data / "stsb" / "test.tsv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[:300]
    gold = [float(row["score"]) for row in rows]

    def spearman(encoder: Encoder) -> float:
        first = encoder.encode([row["sentence1"] for row in rows], normalize=True)
        second = encoder.encode([row["sentence2"] for row in rows], normalize=True)
        return spearmanr((first * second).sum(axis=1), gold).statistic

    fp32 = spearman(Encoder.load(tmp_path / "minilm", backend="onnx"))
    int8 = spearman(Encoder.load(tmp_path / "minilm", backend="onnx", onnx_file="model_qint8.onnx"))
    assert abs(fp32 - spearman(Encoder.load(minilm_path, device="cpu"))) < 1e-4
    assert fp32 - int8 <= 0.01, (fp32, int8)


def test_sentence_transformers_loads_the_export(tmp_path, tiny_model_dir):
    """The folder follows sentence-transformers' ONNX layout: SentenceTransformer(path, backend="onnx") pools the
    graph's last_hidden_state itself and gets the same embeddings."""
    pytest.importorskip("optimum.onnxruntime", reason="the peer's ONNX extra (optimum-onnx) is not installed; "
                        "optimum-onnx 0.1 requires transformers < 4.58")
    from sentence_transformers import SentenceTransformer

    folder = save_tiny(tmp_path / "model", tiny_model_dir, pooling="cls", normalize=True)
    export_onnx(folder)
    peer = SentenceTransformer(str(folder), backend="onnx", device="cpu")
    expected = Encoder.load(folder, device="cpu").encode(TEXTS)
    assert cosines(peer.encode(TEXTS), expected).min() >= MIN_COSINE
