"""The one reader of tables and text files, used by every command: `train`, `mine`, `eval`, `index` and
`encode` accept the same inputs.

`load_table` reads a local .csv/.tsv/.json/.jsonl/.parquet/.txt file or a Hub dataset id through
`datasets.load_dataset` (Arrow, memory-mapped; streaming on request; `owner/name:config` picks a config). CSV and TSV cells are read as text,
so a column of digits stays text and only an empty cell is missing. A file that does not read is reported
as one line naming the file and line (`textcl.io.text`). `read_corpus` adds BEIR folders and the id
conventions of corpora (`textcl.io.corpus`); `write_table` writes .jsonl/.tsv/.csv/.parquet.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from textcl.errors import TextclError
from textcl.io.sources import hub_dataset
from textcl.io.text import check_fields, check_utf8, locate_problem, separator

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
DELIMITERS = {".tsv": "\t", ".csv": ","}
OUTPUT_SUFFIXES = (".jsonl", ".tsv", ".csv", ".parquet")


def load_table(
    source: str | Path, *, split: str = "train", streaming: bool = False, what: str = "file", lines: bool = False,
    delimiter: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """The rows of a local file (see the module docstring) or of split `split` of a Hub dataset; with `lines`,
    any local file is read as text, one `text` row a line. `delimiter`: the field separator of a csv/tsv file
    (default: by its extension, `,` or tab); every record must have as many fields as the header.

    Raises TextclError naming `what` the source is for a missing, empty, unreadable or unsupported source.
    """
    source = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        raise TextclError(f"{what} {source!r} is a folder; pass a data file")
    if path.exists():
        builder = "text" if lines else BUILDERS.get(path.suffix)
        if builder is None:
            raise TextclError(f"{what} {source!r}: unsupported file type; use one of {', '.join(BUILDERS)}")
        if path.stat().st_size == 0:
            raise TextclError(f"{what} {source!r} is empty")
        options: dict[str, Any] = {"data_files": str(path), "split": "train"}
        if builder != "parquet":
            check_utf8(path)
        if builder == "csv":
            chosen = separator(delimiter) or DELIMITERS[path.suffix]
            check_fields(path, chosen, source, explicit=delimiter is not None)
            options |= text_cells(path, chosen)
        return read(builder, options, streaming, source, what, path)
    hub = hub_dataset(source)
    if hub is None:
        raise TextclError(f"{what} {source!r} does not exist")
    return read(hub[0], {"name": hub[1], "split": split}, streaming, source, what, None)


def text_cells(path: Path, delimiter: str) -> dict[str, Any]:
    """load_dataset options that read every CSV/TSV column as text, an empty cell as missing, and nothing else
    (not "NA" or "null") as missing."""
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), [])
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return {"delimiter": delimiter, "features": features, "keep_default_na": False, "na_values": [""]}


def read(builder: str, options: dict[str, Any], streaming: bool, source: str, what: str, path: Path | None) -> Any:
    try:
        return datasets.load_dataset(builder, streaming=streaming, **options)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError,
            datasets.exceptions.DatasetGenerationError) as error:
        if path is not None:
            locate_problem(path)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "corresponds to no data" in reason:
            raise TextclError(f"{what} {source!r} has no rows") from error
        raise TextclError(f"could not load {what} {source!r}: {reason}{hub_hint(what) if path is None else ''}") \
            from error


def hub_hint(what: str) -> str:
    """How to run without a Hub dataset that did not load: a local file instead, or (for an evaluation) none."""
    if what.startswith("eval_"):
        return f"; point {what} at a local file (README: Data formats) or skip it with --{what} none"
    return f"; point {what} at a local file (README: Data formats)"


def read_records(source: str | Path, what: str = "file", split: str = "train") -> list[dict[str, Any]]:
    """Every row of `load_table(source)` as a dict; an empty table is a TextclError."""
    rows = load_table(source, split=split, what=what).to_list()
    if not rows:
        raise TextclError(f"{what} {str(source)!r} has no rows")
    return rows


def column(rows: list[dict[str, Any]], name: str, source: str | Path, option: str) -> list[str]:
    """The values of column `name` as text ("" where missing); a missing column is a TextclError listing the
    columns found."""
    if name not in rows[0]:
        found = ", ".join(map(str, rows[0]))
        raise TextclError(f"column {name!r} not in {source}; columns found: {found}; set {option}")
    return [str(row[name]) if row.get(name) is not None else "" for row in rows]


def table_columns(source: str | Path) -> list[str]:
    """Column names of a local table (empty for anything else: folders, Hub ids, unreadable files)."""
    path = Path(source)
    if not path.is_file() or path.suffix not in BUILDERS or path.suffix == ".txt":
        return []
    try:
        return list(load_table(path).column_names)
    except TextclError:
        return []


def check_output(path: str | Path) -> Path:
    """`path` as a Path if its suffix is one `write_table` writes, else a TextclError (checked before slow work)."""
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES + (".json",):
        raise TextclError(f"output {str(path)!r}: unsupported file type; use {', '.join(OUTPUT_SUFFIXES)}")
    return path


def provenance_path(path: str | Path) -> Path:
    """The sidecar that says how a written table was made: `<file>.textcl.json` next to it."""
    return Path(f"{path}.textcl.json")


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The sidecar of a table written by `write_table(..., provenance=...)`, or None when it has none."""
    sidecar = provenance_path(path)
    if not sidecar.is_file():
        return None
    try:
        return json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TextclError(f"{sidecar}: not valid JSON ({error.msg}); delete it or write the table again") from None


def natural_order(columns: Sequence[str]) -> list[str]:
    """`columns` sorted with their numbers as numbers (negative_2 < negative_10)."""
    return sorted(columns, key=lambda c: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", c)])


def negative_column_names(columns: Sequence[str]) -> list[str]:
    """The one rule for which columns hold negatives: those named negative* that hold texts (not their `_score`,
    see `score_column`), in natural order. Training, scoring and mining all ask here."""
    return natural_order([c for c in columns if c.startswith("negative") and not c.endswith(score_column(""))])


def score_column(column: str) -> str:
    """Where the teacher's score of the texts in `column` goes: `positive` -> `positive_score`."""
    return f"{column}_score"


def write_table(columns: dict[str, Sequence], path: str | Path, provenance: dict[str, Any] | None = None) -> None:
    """Write equal-length columns to .jsonl, .tsv, .csv or .parquet (chosen by the suffix); with `provenance`, also
    the sidecar `<file>.textcl.json` saying how the table was made (a stale sidecar is removed)."""
    path = check_output(path)
    table = datasets.Dataset.from_dict({name: list(values) for name, values in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".jsonl", ".json"):
        table.to_json(path, lines=True, force_ascii=False)
    elif path.suffix in DELIMITERS:
        table.to_csv(path, sep=DELIMITERS[path.suffix], index=False)
    else:
        table.to_parquet(path)
    sidecar = provenance_path(path)
    if provenance is None:
        sidecar.unlink(missing_ok=True)
    else:
        sidecar.write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
