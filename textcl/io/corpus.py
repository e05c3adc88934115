"""Corpora for search, mining and encoding: a BEIR folder, a table with a `text` column, or a text file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from textcl.errors import TextclError
from textcl.io.beir import doc_text, read_beir_corpus
from textcl.io.tables import BUILDERS, column, load_table, read_records

TABLES = {suffix for suffix, builder in BUILDERS.items() if builder != "text"}


def read_corpus(source: str | Path, what: str = "corpus") -> tuple[list[str], list[str]]:
    """(ids, texts) of a corpus: a BEIR folder; a table with `text` (optional `title`, `_id`/`id`; ids default to
    row numbers from 1); or any other file, one document a line (ids are line numbers; blank lines skipped).
    Errors call the source `what`."""
    path = Path(source)
    if path.is_dir():
        if not (path / "corpus.jsonl").is_file():
            raise TextclError(f"{what} folder {str(path)!r} has no corpus.jsonl; pass a BEIR folder or a file")
        docs = read_beir_corpus(path / "corpus.jsonl")
        ids, texts = list(docs), [doc_text(title, text) for title, text in docs.values()]
    elif path.is_file() and path.suffix not in TABLES:
        lines = load_table(path, what=what, lines=True)["text"]
        numbered = [(str(n), line.strip()) for n, line in enumerate(lines, start=1)]
        ids, texts = [key for key, text in numbered if text], [text for _, text in numbered if text]
    else:
        rows = read_records(source, what)
        bodies = column(rows, "text", source, "a 'text' column")
        titles = [str(row.get("title") or "") for row in rows]
        id_column = next((name for name in ("_id", "id") if name in rows[0]), None)
        ids = column(rows, id_column, source, "") if id_column else [str(i) for i in range(1, len(rows) + 1)]
        texts = [doc_text(title, body) for title, body in zip(titles, bodies)]
    if not texts:
        raise TextclError(f"{what} {str(source)!r} is empty")
    if len(set(ids)) != len(ids):
        duplicate = Counter(ids).most_common(1)[0][0]
        raise TextclError(f"{what} {str(source)!r} repeats doc id {duplicate!r}; ids must be unique")
    return ids, texts
