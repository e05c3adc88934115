"""The files `eval`, `mine`, `index` and `search` read and write: TSV/CSV/JSONL tables and text corpora.

Reading uses the stdlib `csv`/`json` modules rather than `datasets` so that a non-UTF-8 byte or a bad
JSON line is reported with its file and line number. Writing goes through `datasets` (any of
.jsonl, .tsv, .csv, .parquet).
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from textcl.errors import TextclError
from textcl.textfiles import read_text

DELIMITERS = {".tsv": "\t", ".csv": ","}
JSON_SUFFIXES = (".jsonl", ".json")
OUTPUT_SUFFIXES = (".jsonl", ".tsv", ".csv", ".parquet")


def read_table(path: str | Path, what: str = "file") -> list[dict[str, str]]:
    """Rows of a .tsv/.csv (header row, csv quoting) or .jsonl file, as dicts of column -> value."""
    path = Path(path)
    text = read_text(path, what)
    if path.suffix in DELIMITERS:
        rows = list(csv.DictReader(io.StringIO(text, newline=""), delimiter=DELIMITERS[path.suffix]))
    elif path.suffix in JSON_SUFFIXES:
        rows = []
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                message = f"{path}:{number}: not valid JSON ({error.msg}); write one JSON object a line"
                raise TextclError(message) from None
            if not isinstance(row, dict):
                raise TextclError(f"{path}:{number}: expected a JSON object")
            rows.append(row)
    else:
        raise TextclError(f"{what} {str(path)!r}: unsupported file type; use .tsv, .csv or .jsonl")
    if not rows:
        raise TextclError(f"{what} {str(path)!r} has no rows")
    return rows


def column(rows: list[dict[str, str]], name: str, path: str | Path, option: str) -> list[str]:
    """The values of column `name`; a missing column is a TextclError listing the columns found."""
    if name not in rows[0]:
        found = ", ".join(map(str, rows[0]))
        raise TextclError(f"column {name!r} not in {path}; columns found: {found}; set {option}")
    return [str(row.get(name) if row.get(name) is not None else "") for row in rows]


def read_corpus(path: str | Path) -> tuple[list[str], list[str]]:
    """(ids, texts) of a corpus: a BEIR folder, a .jsonl/.tsv/.csv with `text` (optional `title`, `_id`/`id`),
    or a text file with one document a line (ids are line numbers)."""
    from textcl.beir import doc_text, read_jsonl

    path = Path(path)
    if path.is_dir():
        if not (path / "corpus.jsonl").is_file():
            raise TextclError(f"corpus folder {str(path)!r} has no corpus.jsonl; pass a BEIR folder or a file")
        docs = read_jsonl(path / "corpus.jsonl", ("title", "text"))
        ids, texts = list(docs), [doc_text(title, text) for title, text in docs.values()]
    elif path.suffix in DELIMITERS or path.suffix in JSON_SUFFIXES:
        rows = read_table(path, "corpus")
        bodies = column(rows, "text", path, "a 'text' column")
        titles = [str(row.get("title") or "") for row in rows]
        id_column = next((name for name in ("_id", "id") if name in rows[0]), None)
        ids = column(rows, id_column, path, "") if id_column else [str(i) for i in range(1, len(rows) + 1)]
        texts = [doc_text(title, body) for title, body in zip(titles, bodies)]
    else:
        numbered = [(str(n), line.strip()) for n, line in enumerate(read_text(path, "corpus").split("\n"), 1)]
        ids, texts = [key for key, text in numbered if text], [text for _, text in numbered if text]
    if not texts:
        raise TextclError(f"corpus {str(path)!r} is empty")
    if len(set(ids)) != len(ids):
        duplicate = Counter(ids).most_common(1)[0][0]
        raise TextclError(f"corpus {str(path)!r} repeats doc id {duplicate!r}; ids must be unique")
    return ids, texts


def check_output(path: str | Path) -> Path:
    """`path` as a Path if its suffix is one `write_table` writes, else a TextclError (checked before slow work)."""
    path = Path(path)
    if path.suffix not in OUTPUT_SUFFIXES + (".json",):
        raise TextclError(f"output {str(path)!r}: unsupported file type; use {', '.join(OUTPUT_SUFFIXES)}")
    return path


def write_table(columns: dict[str, Sequence], path: str | Path) -> None:
    """Write equal-length columns to .jsonl, .tsv, .csv or .parquet (chosen by the suffix)."""
    import datasets

    path = check_output(path)
    table = datasets.Dataset.from_dict({name: list(values) for name, values in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in JSON_SUFFIXES:
        table.to_json(path, lines=True, force_ascii=False)
    elif path.suffix in DELIMITERS:
        table.to_csv(path, sep=DELIMITERS[path.suffix], index=False)
    else:
        table.to_parquet(path)
