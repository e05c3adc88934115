"""The layering of ARCHITECTURE.md, enforced: import-linter's contracts (pyproject.toml) hold, they fail when a
forbidden import is added, and no module imports another inside a function to dodge a cycle."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "textcl"


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """import-linter on the `textcl` package found under `package_parent`, with the project's contracts."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=package_parent, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(package_parent), "PATH": ""})


def test_the_import_contracts_hold() -> None:
    pytest.importorskip("importlinter")
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    contracts = (ROOT / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    assert "0 broken" in result.stdout and f"{contracts} kept" in result.stdout, result.stdout


@pytest.mark.parametrize(("module", "forbidden", "contract"), [
    ("model/pooling.py", "textcl.training.trainer", "The model knows nothing of training"),
    ("losses/infonce.py", "textcl.data.collator", "Losses see tensors only"),
    ("retrieval/mining.py", "textcl.cli", "Nothing outside the CLI imports the CLI"),
    ("retrieval/search_index.py", "textcl.serving.store", "Only the CLI imports the server"),
    ("serving/app.py", "textcl.training.trainer", "The server uses the model, retrieval and io only"),
    ("model/lora.py", "textcl.model.encoder", "Inside the model"),
    ("model/st_folder.py", "textcl.model.encoder", "Inside the model"),
])
def test_a_forbidden_import_breaks_the_contracts(tmp_path: Path, module: str, forbidden: str, contract: str) -> None:
    """A copy of the package with one forbidden import added fails, naming the broken contract."""
    pytest.importorskip("importlinter")
    copy = tmp_path / "textcl"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.tsv"))
    with (copy / module).open("a") as handle:
        handle.write(f"\nimport {forbidden}  # deliberately forbidden\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout, result.stdout


def function_level_imports(source: Path) -> list[str]:
    """`textcl` modules imported inside a function body (imports under `if TYPE_CHECKING:` do not count)."""
    found = []
    for function in ast.walk(ast.parse(source.read_text())):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("textcl"):
                found.append(f"{source.relative_to(ROOT)}:{node.lineno} from {node.module}")
            if isinstance(node, ast.Import):
                found += [f"{source.relative_to(ROOT)}:{node.lineno} import {alias.name}"
                          for alias in node.names if alias.name.startswith("textcl")]
    return found


def test_no_textcl_module_is_imported_inside_a_function() -> None:
    """Deferred imports of third-party libraries that keep `import textcl` light (peft, datasets) are fine;
    a deferred import of a textcl module would hide a cycle. The CLI's are deliberate and listed here: it loads
    the device rule (torch) only for commands that run a model."""
    allowed = {"textcl/cli/__init__.py from textcl.model.device",
               # `textcl train` checks the recipe's data before loading datasets (Hub ids only) and torch (the
               # trainer), so a missing file is one line in a second or two (issue 17)
               "textcl/cli/train.py from textcl.io.tables", "textcl/cli/train.py from textcl.training.rounds"}
    found = [entry for source in PACKAGE.rglob("*.py") for entry in function_level_imports(source)]
    unexpected = [entry for entry in found if entry.split(":")[0] + " " + entry.split(" ", 1)[1] not in allowed]
    assert not unexpected, unexpected


def package_imports() -> dict[str, set[str]]:
    """{package: the textcl packages its modules import} (top-level modules such as config.py count as packages;
    imports under `if TYPE_CHECKING:` do not count)."""
    found: dict[str, set[str]] = {}
    for source in PACKAGE.rglob("*.py"):
        parts = source.relative_to(PACKAGE).parts
        if parts[0] in ("__init__.py", "__main__.py"):
            continue
        package = parts[0].removesuffix(".py")
        tree = ast.parse(source.read_text())
        typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
        names = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                 and id(node) not in typing_only]
        names += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) and id(node) not in typing_only
                  for alias in node.names]
        imported = {name.split(".")[1] for name in names if name.startswith("textcl.")}
        found.setdefault(package, set()).update(imported - {package})
    return found


def documented_arrows() -> dict[str, set[str]]:
    """The table "package | imports" of ARCHITECTURE.md; `errors` and `version` may be imported by any package."""
    table: dict[str, set[str]] = {}
    for line in (ROOT / "ARCHITECTURE.md").read_text().splitlines():
        match = re.fullmatch(r"\| ([a-z_]+) \| ([a-z_, ()]+) \|", line.strip())
        if match:
            table[match.group(1)] = {name for name in re.split(r"[, ]+", match.group(2)) if name.isidentifier()}
    return {package: imports - {"none"} | {"errors", "version"} for package, imports in table.items()}


def test_architecture_md_lists_every_package_and_import_between_packages() -> None:
    """A package, or an import between packages, that ARCHITECTURE.md's table does not list fails here."""
    documented = documented_arrows()
    imports = package_imports()
    assert set(imports) <= set(documented), f"packages missing from ARCHITECTURE.md: {set(imports) - set(documented)}"
    unlisted = {f"{package} -> {target}" for package, targets in imports.items()
                for target in targets - documented[package]}
    assert not unlisted, f"imports ARCHITECTURE.md does not list: {sorted(unlisted)}"


def test_architecture_md_names_every_module() -> None:
    """Each module (but the CLI's, one a command, and the packaged `evaluate` metrics) is named in ARCHITECTURE.md."""
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", (ROOT / "ARCHITECTURE.md").read_text()))
    modules = [source for source in PACKAGE.rglob("*.py") if source.stem not in ("__init__", "__main__")
               and source.relative_to(PACKAGE).parts[0] != "cli" and "metrics" not in source.relative_to(PACKAGE).parts]
    missing = [str(source.relative_to(ROOT)) for source in modules if source.stem not in words]
    assert not missing, f"modules ARCHITECTURE.md does not name: {missing}"


def test_only_the_plan_the_trainer_and_the_cli_take_the_whole_config() -> None:
    """The config travels cli -> plan -> trainer (or the rounds driver around it): every other function gets the plan's option objects or one part
    of the config, never a parameter annotated with the whole TrainConfig."""
    # rounds.py drives several trainer runs, each from a config it derives (mining_rounds)
    allowed = {"textcl/training/plan.py", "textcl/training/trainer.py", "textcl/training/rounds.py"}
    found = []
    for source in PACKAGE.rglob("*.py"):
        name = str(source.relative_to(ROOT))
        if name in allowed or source.relative_to(PACKAGE).parts[0] == "cli":
            continue
        for function in ast.walk(ast.parse(source.read_text())):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = [*function.args.posonlyargs, *function.args.args, *function.args.kwonlyargs]
                found += [f"{name}:{function.lineno} {function.name}({argument.arg})" for argument in arguments
                          if argument.annotation is not None
                          and re.search(r"\bTrainConfig\b", ast.unparse(argument.annotation))]
    assert not found, found


def test_no_package_imports_the_public_api() -> None:
    """`textcl/__init__.py` names every package: importing it from inside one would run an arrow back up (the
    version is read from textcl.version)."""
    found = [f"{source.relative_to(ROOT)}:{node.lineno}" for source in PACKAGE.rglob("*.py")
             for node in ast.walk(ast.parse(source.read_text()))
             if isinstance(node, ast.ImportFrom) and node.module == "textcl"
             or isinstance(node, ast.Import) and any(alias.name == "textcl" for alias in node.names)]
    assert not found, found
