"""Fault injection: kills during saves, a full disk, truncated and tampered files, planted pickles, concurrent
writers. Each test breaks something the way users and machines do and checks that nothing runs, nothing is
lost, and the user reads one line that names the file and the fix."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import SENTENCES
from fault_helpers import ENV, Payload, all_finite, error_lines, plant_pickle, write_pairs, write_recipe

from textcl import Encoder
from textcl.cli import main
from textcl.errors import TextclError
from textcl.io.atomic import exclusive_lock
from textcl.model.encode_options import EncodeOptions
from textcl.retrieval.corpus_embeddings import encode_corpus
from textcl.retrieval.search_index import SearchIndex
from textcl.training.checkpoint import STATE_FILE, check_dcp_metadata
from textcl.training.outputs import save_model_folder


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.tsv")


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with checkpoint-2 and checkpoint-4 (copy it before breaking it)."""
    root = tmp_path_factory.mktemp("trained")
    recipe = write_recipe(root, tiny_model_dir, pairs, max_steps=4, save_steps=2, save_total_limit=2)
    assert main(["train", str(recipe)]) == 0
    return root


def copy_run(trained: Path, tmp_path: Path, tiny_model_dir: Path, pairs: Path) -> tuple[Path, Path]:
    """(output_dir, recipe) of a private copy of the trained run, set to resume up to step 6."""
    out = tmp_path / "out"
    shutil.copytree(trained / "out", out)
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs, max_steps=6, save_steps=2, save_total_limit=2)
    return out, recipe


# ---- planted pickles -------------------------------------------------------------------------------------------

def test_a_planted_custom_state_pickle_neither_runs_nor_is_loaded(
    trained: Path, tiny_model_dir: Path, pairs: Path, tmp_path: Path, capsys
) -> None:
    """The pickle accelerate used to load with weights_only=False for registered custom state."""
    out, recipe = copy_run(trained, tmp_path, tiny_model_dir, pairs)
    marker = tmp_path / "marker"
    plant_pickle(out / "checkpoint-4" / "custom_checkpoint_0.pkl", marker)
    assert main(["train", str(recipe), "--resume_from_checkpoint", "latest"]) == 0
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "checkpoint-4" in err and "custom_checkpoint_0.pkl" in err and "resuming from checkpoint-2" in err, err
    assert main(["train", str(recipe), "--resume_from_checkpoint", str(out / "checkpoint-4-damaged"),
                 "--max_steps", "8"]) == 2
    (error,) = error_lines(capsys)
    assert "custom_checkpoint_0.pkl" in error and "not loaded" in error, error
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_accelerates_own_pickles_never_run_code(
    trained: Path, tiny_model_dir: Path, pairs: Path, tmp_path: Path, capsys, name: str
) -> None:
    """Even with the manifest rewritten to match (as a tamperer would), the optimizer state is read only through
    torch's weights-only unpickler, and an RNG pickle textcl no longer writes is refused."""
    out, recipe = copy_run(trained, tmp_path, tiny_model_dir, pairs)
    marker = tmp_path / "marker"
    checkpoint = out / "checkpoint-4"
    plant_pickle(checkpoint / name, marker)
    state = json.loads((checkpoint / STATE_FILE).read_text())
    if name in state["files"]:
        state["files"][name] = (checkpoint / name).stat().st_size
        (checkpoint / STATE_FILE).write_text(json.dumps(state))
    assert main(["train", str(recipe), "--resume_from_checkpoint", str(checkpoint)]) == 2
    (error,) = error_lines(capsys)
    assert name in error, error
    assert not marker.exists()


# ---- truncated and damaged checkpoints -------------------------------------------------------------------------

def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_good_one(
    trained: Path, tiny_model_dir: Path, pairs: Path, tmp_path: Path, capsys
) -> None:
    out, recipe = copy_run(trained, tmp_path, tiny_model_dir, pairs)
    weights = out / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["train", str(recipe), "--resume_from_checkpoint", str(out / "checkpoint-4")]) == 2
    (error,) = error_lines(capsys)
    assert "checkpoint-4" in error and "model.safetensors" in error and "truncated" in error, error
    assert main(["train", str(recipe), "--resume_from_checkpoint", "latest"]) == 0
    err = capsys.readouterr().err
    assert "resuming from checkpoint-2" in err, err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s <= 6] == sorted(s for s in steps if s <= 6)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-4-damaged",
                                                                   "checkpoint-6"]
    assert Encoder.load(out).dim == 32


def test_a_checkpoint_from_another_model_is_one_line(
    trained: Path, tiny_model_dir: Path, pairs: Path, tmp_path: Path, capsys
) -> None:
    _, recipe = copy_run(trained, tmp_path, tiny_model_dir, pairs)
    assert main(["train", str(recipe), "--resume_from_checkpoint", "latest", "--dense_dim", "8"]) == 2
    (error,) = error_lines(capsys)
    assert "checkpoint-4" in error and "does not fit this run's model" in error, error


# ---- kills during saves ----------------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
from pathlib import Path
import accelerate, transformers
target = sys.argv.pop(1)
save_state = accelerate.Accelerator.save_state
def killed_save_state(self, output_dir=None, **kwargs):
    result = save_state(self, output_dir, **kwargs)
    if target == "checkpoint" and "checkpoint-4" in str(output_dir):  # half-written weights, then the kill
        weights = Path(output_dir) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return result
save_tokenizer = transformers.PreTrainedTokenizerBase.save_pretrained
def killed_save_tokenizer(self, *args, **kwargs):  # only the final model saves a tokenizer
    if target == "model":
        os.kill(os.getpid(), signal.SIGKILL)
    return save_tokenizer(self, *args, **kwargs)
accelerate.Accelerator.save_state = killed_save_state
transformers.PreTrainedTokenizerBase.save_pretrained = killed_save_tokenizer
from textcl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_killed(tmp_path: Path, target: str, recipe: Path) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    result = subprocess.run([sys.executable, str(script), target, "train", str(recipe)], env=ENV,
                            capture_output=True, text=True, timeout=240, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]


def test_kills_during_checkpoint_and_model_saves_lose_nothing(
    tiny_model_dir: Path, pairs: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs, max_steps=5, save_steps=2, save_total_limit=2)
    out = tmp_path / "out"
    run_killed(tmp_path, "checkpoint", recipe)  # killed while writing checkpoint-4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    resume = tmp_path / "resume.yaml"
    resume.write_text(recipe.read_text() + 'resume_from_checkpoint: "latest"\n')
    run_killed(tmp_path, "model", resume)  # killed while writing the final model
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for marker in ("config.json", "modules.json", "model.safetensors"):  # no half-model that looks like a model
        assert not (out / marker).exists(), marker
    with pytest.raises(TextclError):
        Encoder.load(out)
    assert main(["train", str(recipe), "--resume_from_checkpoint", "latest"]) == 0
    assert Encoder.load(out).dim == 32
    assert not list(out.glob(".*tmp*"))


# ---- a full disk -----------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True, check=False)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_at_the_final_save_is_one_line_and_leaves_no_half_model(
    tiny_model_dir: Path, pairs: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The writer fails after config.json (as ENOSPC does mid-save): one line, and the folder never looks
    like a model."""
    import errno

    save = Encoder.save

    def full_disk(self, path, *args, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "model.safetensors"))

    monkeypatch.setattr(Encoder, "save", full_disk)
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs, max_steps=2, save_steps=2)
    assert main(["train", str(recipe)]) == 2
    (error,) = error_lines(capsys)
    out = tmp_path / "out"
    assert "no space left" in error and str(out) in error and "bytes" in error and "checkpoint-2" in error, error
    assert not (out / "config.json").exists() and not list(out.glob(".*tmp*"))
    monkeypatch.setattr(Encoder, "save", save)
    assert main(["train", str(recipe), "--resume_from_checkpoint", "latest"]) == 0
    assert Encoder.load(out).dim == 32


def test_a_real_full_disk(tiny_model_dir: Path, pairs: Path, tmp_path: Path, small_disk: Path, capsys) -> None:
    encoder = Encoder.load(tiny_model_dir, pooling="mean")
    with pytest.raises(TextclError, match=r"no space left on device .*model.* needs about [\d,]+ bytes"):
        save_model_folder(encoder.save, small_disk / "model", needed=1)
    assert not list(small_disk.iterdir())  # nothing half-written stays
    recipe = write_recipe(tmp_path, tiny_model_dir, pairs, max_steps=2, output_dir=str(small_disk / "run"))
    assert main(["train", str(recipe)]) == 2
    (error,) = error_lines(capsys)
    assert str(small_disk / "run") in error and "bytes" in error, error
    index = SearchIndex.build(encoder, SENTENCES * 40, [str(i) for i in range(480)])
    with pytest.raises(TextclError, match=r"no space left on device .*index"):
        index.save(small_disk / "index")
    assert not [p for p in small_disk.iterdir() if p.name not in ("run", ".index.lock")]


# ---- tampered index folders ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_index(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("index") / "index"
    assert main(["index", str(tiny_model_dir), "--corpus", str(write_corpus(path.parent)), "--out", str(path)]) == 0
    return path


def write_corpus(folder: Path) -> Path:
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    return corpus


def tamper(folder: Path, name: str, how: str) -> None:
    path = folder / name
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "not json":
        path.write_text("{not json")
    elif how == "no model":
        meta = json.loads(path.read_text())
        del meta["model"]
        path.write_text(json.dumps(meta))
    elif how == "bad line":
        lines = path.read_text().splitlines()
        lines[5] = '{"id": "5", "text": '
        path.write_text("\n".join(lines) + "\n")
    elif how == "wrong dim":
        meta = json.loads(path.read_text())
        meta["dim"] = 100
        path.write_text(json.dumps(meta))


@pytest.mark.parametrize(("name", "how", "message"), [
    ("index.faiss", "truncate", r"index\.faiss .*damaged"),
    ("meta.json", "not json", r"meta\.json is not JSON"),
    ("meta.json", "no model", r"meta\.json has no 'model'"),
    ("ids.jsonl", "bad line", r"ids\.jsonl line 6 is not"),
    ("meta.json", "wrong dim", r"meta\.json says 100 dimensions but index\.faiss holds 32-dimensional vectors"),
])
def test_a_tampered_index_folder_is_one_line_naming_the_file(
    saved_index: Path, tmp_path: Path, capsys, name: str, how: str, message: str
) -> None:
    folder = tmp_path / "index"
    shutil.copytree(saved_index, folder)
    tamper(folder, name, how)
    assert main(["search", str(folder), "a query"]) == 2
    (error,) = error_lines(capsys)
    assert str(folder / name) in error and "rebuild" in error, error
    import re

    assert re.search(message, error), error


# ---- concurrent and repeated index writers ---------------------------------------------------------------------

def test_an_existing_index_is_replaced_only_with_overwrite(saved_index: Path, tiny_model_dir: Path, tmp_path: Path,
                                                           capsys) -> None:
    folder = tmp_path / "index"
    shutil.copytree(saved_index, folder)
    corpus = tmp_path / "c.txt"
    corpus.write_text("one document\nanother document\n")
    assert main(["index", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(folder)]) == 2
    (error,) = error_lines(capsys)
    assert "already holds a search index" in error and "--overwrite" in error, error
    assert len(SearchIndex.load(folder).ids) == 12
    assert main(["index", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(folder), "--overwrite"]) == 0
    assert len(SearchIndex.load(folder).ids) == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    assert main(["index", str(tiny_model_dir), "--corpus", str(corpus), "--out", str(tmp_path / "notes"),
                 "--overwrite"]) == 2
    assert "not a search index folder" in error_lines(capsys)[0]
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


@contextlib.contextmanager
def held_elsewhere(target: Path, lock_file: Path | None = None):
    """Another thread holds `target`'s write lock (as a running `textcl index` or `textcl train` does)."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with exclusive_lock(target, lock_file=lock_file):
            holding.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(timeout=60)
        yield
    finally:
        release.set()
        holder.join(timeout=60)


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(
    tiny_model_dir: Path, pairs: Path, tmp_path: Path, capsys
) -> None:
    folder = tmp_path / "index"
    with held_elsewhere(folder):
        assert main(["index", str(tiny_model_dir), "--corpus", str(write_corpus(tmp_path)), "--out", str(folder)]) == 2
    (error,) = error_lines(capsys)
    assert "another process is writing the search index" in error and str(folder) in error, error
    out = tmp_path / "out"
    out.mkdir()
    with held_elsewhere(out, out / ".textcl.lock"):
        assert main(["train", str(write_recipe(tmp_path, tiny_model_dir, pairs, max_steps=1))]) == 2
    (error,) = error_lines(capsys)
    assert "another process is writing the output_dir" in error and str(out) in error, error


def save_repeatedly(index: SearchIndex, folder: str, times: int) -> None:
    for _ in range(times):
        index.save(folder, overwrite=True)


def test_concurrent_saves_never_leave_a_torn_index(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two processes save different indexes to one folder over and over while this one reads it: every read
    is one whole index, and the folder ends as one whole index."""
    encoder = Encoder.load(tiny_model_dir, pooling="mean")
    first = SearchIndex.build(encoder, SENTENCES, [f"a{i}" for i in range(12)])
    second = SearchIndex.build(encoder, SENTENCES[:7], [f"b{i}" for i in range(7)])
    folder = tmp_path / "index"
    first.save(folder)
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=save_repeatedly, args=(index, str(folder), 15)) for index in (first, second)]
    for writer in writers:
        writer.start()
    seen = set()
    while any(writer.is_alive() for writer in writers):
        loaded = SearchIndex.load(folder, encoder)
        ids = tuple(loaded.ids)
        assert ids in (tuple(first.ids), tuple(second.ids)), ids
        assert loaded.index.ntotal == len(ids)
        seen.add(ids[0])
    for writer in writers:
        writer.join(timeout=60)
        assert writer.exitcode == 0
    assert tuple(SearchIndex.load(folder, encoder).ids) in (tuple(first.ids), tuple(second.ids))
    assert not [p.name for p in tmp_path.iterdir() if p.name not in ("index", ".index.lock")]


def test_a_kill_during_an_index_save_keeps_the_previous_index(saved_index: Path, tmp_path: Path) -> None:
    folder = tmp_path / "index"
    shutil.copytree(saved_index, folder)
    script = (
        "import os, signal, sys, faiss\n"
        "from textcl.retrieval.search_index import SearchIndex\n"
        "index = SearchIndex.load(sys.argv[1])\n"
        "write = faiss.write_index\n"
        "def killed(*args):\n"
        "    write(*args)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "faiss.write_index = killed\n"
        "index.add(['a late document'], ids=['late'])\n"
        "index.save(sys.argv[1], overwrite=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(folder)], env=ENV, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert len(SearchIndex.load(folder).ids) == 12


# ---- smaller search faults -------------------------------------------------------------------------------------

def test_an_empty_query_is_refused(saved_index: Path, capsys) -> None:
    index = SearchIndex.load(saved_index)
    for query in ("", "   ", ["a query", ""]):
        with pytest.raises(TextclError, match="empty"):
            index.search(query)
    assert main(["search", str(saved_index), ""]) == 2
    assert "empty" in error_lines(capsys)[0]


def test_the_model_path_is_resolved_against_the_index_folder(tiny_model_dir: Path, tmp_path: Path,
                                                             monkeypatch) -> None:
    """An index saved with a relative model path finds that model from any working directory, even when the
    new working directory holds another model under the same relative name."""
    project = tmp_path / "project"
    shutil.copytree(tiny_model_dir, project / "model")
    monkeypatch.chdir(project)
    SearchIndex.build(Encoder.load("model", pooling="mean"), SENTENCES).save("indexes/first")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "model").mkdir(parents=True)  # a decoy: not a model at all
    monkeypatch.chdir(elsewhere)
    loaded = SearchIndex.load(project / "indexes" / "first")
    assert loaded.search("a cat", k=1).ids.shape == (1, 1)


def test_nonfinite_embeddings_are_not_indexed(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model whose weights went NaN gives NaN vectors; indexing them would return no hits and exit 0."""
    import torch

    encoder = Encoder.load(tiny_model_dir, pooling="mean")
    with torch.no_grad():
        encoder.model.embeddings.word_embeddings.weight.fill_(float("nan"))
    with pytest.raises(TextclError, match="non-finite embeddings"):
        SearchIndex.build(encoder, SENTENCES)
    assert all_finite(tiny_model_dir / "model.safetensors")
    assert np.isnan(encoder.encode(["x"])).all()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fsdp_sharded_checkpoint_pickles_are_checked_before_torch_reads_them(tmp_path: Path) -> None:
    """torch.distributed.checkpoint (FSDP's sharded state) reads `.metadata` with plain pickle.load and byte
    items with weights_only=False: a planted payload in either is refused before torch sees it."""
    import torch
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "marker"
    state = {"model": {"weight": torch.ones(3, 4)}, "optim": {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}]}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp_path / "good"), no_dist=True)
    assert check_dcp_metadata(tmp_path / "good" / ".metadata") is None
    dcp.save({"model": {"weight": torch.ones(3, 4)}, "extra": Payload(marker)},
             storage_writer=dcp.FileSystemWriter(tmp_path / "bytes"), no_dist=True)
    assert "not plain data" in check_dcp_metadata(tmp_path / "bytes" / ".metadata")
    shutil.copytree(tmp_path / "good", tmp_path / "metadata")
    plant_pickle(tmp_path / "metadata" / ".metadata", marker)
    assert "not plain checkpoint metadata" in check_dcp_metadata(tmp_path / "metadata" / ".metadata")
    assert not marker.exists()


def test_a_damaged_embedding_cache_is_encoded_again(tiny_model_dir: Path, tmp_path: Path, caplog) -> None:
    encoder = Encoder.load(tiny_model_dir, pooling="mean")
    cached_options = EncodeOptions(cache_dir=tmp_path)
    expected = np.array(encode_corpus(encoder, SENTENCES, encode_options=cached_options))  # a copy, not the memory map
    (cached,) = tmp_path.glob("*.npy")
    cached.write_bytes(cached.read_bytes()[:200])
    assert np.allclose(encode_corpus(encoder, SENTENCES, encode_options=cached_options), expected)
    assert "damaged" in caplog.text
