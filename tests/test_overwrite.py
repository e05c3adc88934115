"""Every command that writes a model or index folder refuses one that already holds a model, an index, a run or an
ONNX export, in the same words, and leaves it untouched; with --overwrite it replaces it whole."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SENTENCES

from textcl import Encoder
from textcl.cli import COMMANDS, build_parser, main
from textcl.cli.options import OVERWRITE_HELP

REFUSAL = re.compile(r"textcl: error: '[^']+' already holds (a model|a search index|a run|an ONNX export); pass "
                     r"(--overwrite|--overwrite_output_dir true) to replace it")
# command -> what it writes: every command with an --out/output folder of a model or an index
WRITING_COMMANDS = {"shrink", "export", "merge", "index"}


@pytest.fixture(scope="module")
def folders(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A sentence-transformers model, a LoRA adapter of it, a corpus, and 'other': a folder holding another model."""
    root = tmp_path_factory.mktemp("overwrite")
    Encoder.load(tiny_model_dir, pooling="mean").save(root / "model")
    adapter = Encoder.load(tiny_model_dir, pooling="mean")
    adapter.add_lora(str(tiny_model_dir), r=2)
    adapter.save(root / "adapter")
    (root / "corpus.txt").write_text("\n".join(SENTENCES[:8]) + "\n")
    return {"model": root / "model", "adapter": root / "adapter", "corpus": root / "corpus.txt", "root": root}


def fingerprint(folder: Path) -> str:
    """A digest of the folder's files (a writer's lock file aside)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.name.endswith(".lock"):
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def other_model(path: Path, tiny_model_dir: Path) -> Path:
    Encoder.load(tiny_model_dir, pooling="cls").save(path)
    (path / "mine.txt").write_text("a file the user keeps here")
    return path


def cases(f: dict[str, Path], tmp: Path, tiny: Path) -> dict[str, tuple[list[str], Callable[[], Path]]]:
    """command -> (its argv writing into the target, a function making the occupied target)."""

    def index() -> Path:
        assert main(["index", str(f["model"]), "--corpus", str(f["corpus"]), "--out", str(tmp / "index")]) == 0
        return tmp / "index"

    def exported() -> Path:
        other = other_model(tmp / "exported", tiny)
        assert main(["export", str(other), "--no_optimize"]) == 0
        return other

    def used_output_dir() -> Path:
        return other_model(tmp / "out", tiny)

    recipe = tmp / "recipe.yaml"
    recipe.write_text(json.dumps({"model_name_or_path": str(f["model"]), "train_data": str(f["corpus"]),
                                  "output_dir": str(tmp / "out"), "max_steps": 1}))
    return {
        "shrink": (["shrink", str(f["model"]), "--layers", "0", "--out", str(tmp / "shrunk")],
                   lambda: other_model(tmp / "shrunk", tiny)),
        "merge": (["merge", str(f["adapter"]), str(tmp / "merged")], lambda: other_model(tmp / "merged", tiny)),
        "export": (["export", str(f["model"]), "--no_optimize", "--out", str(tmp / "copy")],
                   lambda: other_model(tmp / "copy", tiny)),
        "export into the model": (["export", str(tmp / "exported"), "--no_optimize"], exported),
        "index": (["index", str(f["model"]), "--corpus", str(f["corpus"]), "--out", str(tmp / "index")], index),
        "train": (["train", str(recipe)], used_output_dir),
    }


CASES = ["shrink", "merge", "export", "export into the model", "index", "train"]


@pytest.mark.parametrize("case", CASES)
def test_every_writing_command_refuses_an_occupied_folder_in_the_same_words(
    case: str, folders: dict[str, Path], tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv, occupy = cases(folders, tmp_path, tiny_model_dir)[case]
    target = occupy()
    before = fingerprint(target)
    capsys.readouterr()
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("textcl: error:")]
    assert len(errors) == 1 and REFUSAL.match(errors[0]), errors
    assert fingerprint(target) == before, "the refused folder is untouched"


@pytest.mark.parametrize("case", ["shrink", "merge", "export"])
def test_overwrite_replaces_the_folder_whole(case: str, folders: dict[str, Path], tiny_model_dir: Path,
                                            tmp_path: Path) -> None:
    argv, occupy = cases(folders, tmp_path, tiny_model_dir)[case]
    target = occupy()
    assert main([*argv, "--overwrite"]) == 0
    assert not (target / "mine.txt").exists(), "nothing of the old folder is left"
    assert json.loads((target / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    if case != "export":  # the card names the folder, not the temporary one it was written in
        assert target.name in (target / "README.md").read_text() and ".tmp-" not in (target / "README.md").read_text()
    assert not list(target.parent.glob(f".{target.name}.*-*")), "no temporary sibling is left"


def test_every_command_that_writes_a_folder_has_the_same_overwrite_option() -> None:
    for command in WRITING_COMMANDS:
        parser = build_parser([command])
        subparser = next(action for action in parser._subparsers._group_actions[0].choices.items()
                         if action[0] == command)[1]
        option = next((action for action in subparser._actions if "--overwrite" in action.option_strings), None)
        assert option is not None and option.help == OVERWRITE_HELP, command
    assert WRITING_COMMANDS <= set(COMMANDS)
