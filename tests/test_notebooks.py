"""The notebooks run end to end (nbclient, a real Jupyter kernel) with small settings, so they cannot rot.

Settings are injected the way papermill does: the cell tagged "parameters" is replaced by the test's
values before execution. The committed notebooks must carry no outputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from scifact_fixtures import write_beir

from textcl.demo.run import demo_rows

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, parameters: dict, cwd: Path) -> list[dict]:
    """Run notebooks/`name` with its parameters cell replaced; returns every output of every code cell."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    unknown = [key for key in parameters if not re.search(rf"^{key}\b|, {key}\b", cells[0].source, re.MULTILINE)]
    assert not unknown, f"{name}'s parameters cell has no {unknown}"
    cells[0].source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def library_noise(outputs: list[dict]) -> list[str]:
    """Lines of the libraries' progress bars and logs in the cells' stderr (the notebooks switch them off)."""
    stderr = "".join(output.get("text", "") for output in outputs if output.get("name") == "stderr")
    return [line for line in re.split(r"[\r\n]", stderr) if re.match(r"(Map|Filter|Generating|Loading|Writing)", line)]


def text_of(outputs: list[dict]) -> str:
    return "".join(output.get("text", "") + output.get("data", {}).get("text/plain", "") for output in outputs)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "retrieval_finetune.ipynb"])
def test_notebooks_are_committed_without_outputs(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_quickstart_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    parameters = {"MODEL": str(tiny_model_dir), "MAX_STEPS": 4, "BATCH_SIZE": 16, "MAX_SEQ_LENGTH": 24,
                  "OUTPUT_DIR": str(tmp_path / "model")}
    outputs = execute("quickstart.ipynb", parameters, tmp_path)
    assert not library_noise(outputs), library_noise(outputs)[:5]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 3  # loss curve, similarity histograms, alignment/uniformity
    text = text_of(outputs)
    assert "2000 training sentences, 1000 held out" in text and "mrr@10" in text
    assert "liberty and the founding of the nation" in text
    assert (tmp_path / "model" / "README.md").is_file() and (tmp_path / "model" / "metrics.jsonl").is_file()


def small_beir(root: Path) -> Path:
    """40 documents; a query is the first half of a document's words, relevant to that document.
    Queries 0-29 are the train split, 30-39 the test split."""
    texts = list(dict.fromkeys(row["text"] for row in demo_rows()))[:40]
    docs = {f"d{i}": ("", text) for i, text in enumerate(texts)}
    queries = {f"q{i}": " ".join(text.split()[: max(2, len(text.split()) // 2)]) for i, text in enumerate(texts)}
    write_beir(root, docs, queries, [(f"q{i}", f"d{i}", 1) for i in range(30)], split="train")
    return write_beir(root, docs, queries, [(f"q{i}", f"d{i}", 1) for i in range(30, 40)], split="test")


def test_retrieval_finetune_runs_offline_on_a_local_beir_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    parameters = {"DATA": str(small_beir(tmp_path / "beir")), "MODEL": str(tiny_model_dir), "NUM_NEGATIVES": 2,
                  "RANGE_MIN": 0, "RANGE_MAX": 8, "MAX_SCORE_RATIO": None, "MAX_STEPS": 3, "BATCH_SIZE": 8,
                  "MAX_SEQ_LENGTH": 24, "LEARNING_RATE": 1e-3, "LORA": True, "OUTPUT_DIR": str(tmp_path / "model")}
    outputs = execute("retrieval_finetune.ipynb", parameters, tmp_path)
    assert not library_noise(outputs), library_noise(outputs)[:5]
    text = text_of(outputs)
    assert "10 queries, 40 documents" in text and "kept " in text and "ndcg@10" in text
    card = (tmp_path / "model" / "README.md").read_text()
    assert "NV-Retriever" in card and "LoRA" in card and (tmp_path / "model" / "adapter_config.json").is_file()
