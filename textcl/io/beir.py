"""Reading BEIR folders: `corpus.jsonl`, `queries.jsonl` and `qrels/{split}.tsv`.

The JSON-lines files go through the one table reader (`textcl.io.tables.load_table`); every mistake is one
line naming the file and line (non-UTF-8 text, bad JSON, a missing or duplicate id, qrels naming unknown
ids). Qrels files (BEIR's TSV with an optional header, or TREC's four columns) are their own format,
parsed line by line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from textcl.errors import TextclError
from textcl.io.tables import load_table
from textcl.io.text import decoded_lines, line_of_record

logger = logging.getLogger(__name__)


@dataclass
class BeirData:
    """One split of a BEIR dataset.

    corpus: doc id -> (title, text), every document of `corpus.jsonl` in file order.
    queries: query id -> text, only the queries named in the split's qrels.
    qrels: query id -> {doc id: relevance grade}; grade 0 means judged not relevant.
    dropped_qrels: qrels rows naming unknown ids that were dropped (only with allow_missing=True).
    """

    corpus: dict[str, tuple[str, str]]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    dropped_qrels: int = 0


def doc_text(title: str, text: str) -> str:
    """A document as BEIR's dense retrievers see it: title, a space, text (stripped)."""
    return f"{title} {text}".strip()


def read_id_records(path: Path, fields: tuple[str, ...], what: str) -> dict[str, tuple[str, ...]]:
    """`_id` -> the values of `fields` ("" when absent) for each JSON line, in file order; ids must be unique."""
    if path.stat().st_size == 0:
        return {}
    table = load_table(path, what=what)
    columns = table.column_names
    ids = table["_id"] if "_id" in columns else [None] * len(table)
    if any(key is None for key in ids):
        line = line_of_record(path, ids.index(None))
        raise TextclError(f"{path}:{line}: each line must be a JSON object with an '_id' field")
    ids = [str(key) for key in ids]
    if len(set(ids)) != len(ids):
        first_row: dict[str, int] = {}
        for row, key in enumerate(ids):
            if key in first_row:
                first, line = line_of_record(path, first_row[key]), line_of_record(path, row)
                raise TextclError(f"{path}:{line}: duplicate id {key!r} (first on line {first}); ids must be unique")
            first_row[key] = row
    values = [[str(v) if v is not None else "" for v in table[f]] if f in columns else [""] * len(ids) for f in fields]
    return dict(zip(ids, zip(*values))) if values else dict.fromkeys(ids, ())


def read_beir_corpus(path: Path) -> dict[str, tuple[str, str]]:
    """doc id -> (title, text) of a BEIR corpus.jsonl, in file order."""
    return read_id_records(path, ("title", "text"), "BEIR corpus")  # type: ignore[return-value]


def read_qrels(path: Path) -> list[tuple[str, str, int]]:
    """(query id, doc id, grade) rows of a BEIR qrels TSV (header optional) or a TREC qrels file (4 columns)."""
    rows = []
    for number, line in decoded_lines(path):
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) == 4:
            fields = [fields[0], fields[2], fields[3]]
        if len(fields) != 3:
            raise TextclError(f"{path}:{number}: expected query-id, corpus-id, score separated by tabs")
        query_id, doc_id, grade = (field.strip() for field in fields)
        try:
            rows.append((query_id, doc_id, int(float(grade))))
        except OverflowError:  # inf, 1e999: a grade no metric can use
            raise TextclError(f"{path}:{number}: relevance score {grade!r} is infinite") from None
        except ValueError:
            if number == 1 and not rows:
                continue
            raise TextclError(f"{path}:{number}: relevance score {grade!r} is not a number") from None
    return rows


def require(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise TextclError(f"BEIR folder is missing {path}; {hint}")
    return path


def load_beir(folder: str | Path, split: str = "test", allow_missing: bool = False) -> BeirData:
    """Load `folder`'s corpus, the queries of `split` and its qrels.

    Raises TextclError for a missing folder or file, non-UTF-8 or non-JSON lines, duplicate ids, an empty
    corpus, or qrels naming documents/queries that do not exist (dropped instead with `allow_missing`).
    """
    root = Path(folder)
    if not root.is_dir():
        raise TextclError(f"BEIR folder {str(root)!r} does not exist")
    layout = "a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv"
    corpus_path = require(root / "corpus.jsonl", layout)
    queries_path = require(root / "queries.jsonl", layout)
    splits = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
    qrels_path = require(root / "qrels" / f"{split}.tsv", f"splits found: {', '.join(splits) or 'none'}")
    corpus = read_beir_corpus(corpus_path)
    if not corpus:
        raise TextclError(f"{corpus_path} holds no documents")
    all_queries = {key: text for key, (text,) in read_id_records(queries_path, ("text",), "BEIR queries").items()}
    rows = read_qrels(qrels_path)
    unknown_queries = {q for q, _, _ in rows if q not in all_queries}
    unknown_docs = {d for _, d, _ in rows if d not in corpus}
    bad = [row for row in rows if row[0] in unknown_queries or row[1] in unknown_docs]
    if bad and not allow_missing:
        raise TextclError(
            f"{qrels_path}: {len(bad)} qrels rows name {len(unknown_queries)} unknown queries and "
            f"{len(unknown_docs)} unknown documents (e.g. query {bad[0][0]!r}, doc {bad[0][1]!r}); "
            "fix the files or pass allow_missing (--allow_missing) to drop those rows"
        )
    if bad:
        logger.warning("%s: dropped %d qrels rows naming unknown queries or documents", qrels_path, len(bad))
    qrels: dict[str, dict[str, int]] = {}
    for query_id, doc_id, grade in rows:
        if query_id not in unknown_queries and doc_id not in unknown_docs:
            qrels.setdefault(query_id, {})[doc_id] = grade
    if not qrels:
        raise TextclError(f"{qrels_path} names no query of {queries_path} and document of {corpus_path}")
    queries = {query_id: all_queries[query_id] for query_id in qrels}
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, dropped_qrels=len(bad))


def beir_pairs(folder: str | Path, split: str, allow_missing: bool = False) -> tuple[list[str], list[str], list[str]]:
    """(anchors, positives, corpus texts): one (query, document) pair per relevant document (grade >= 1) of each
    query in `qrels/{split}.tsv`, and every document of the corpus."""
    data = load_beir(folder, split, allow_missing=allow_missing)
    pairs = [(query_id, doc_id) for query_id, relevance in data.qrels.items()
             for doc_id, grade in relevance.items() if grade >= 1]
    anchors = [data.queries[query_id] for query_id, _ in pairs]
    positives = [doc_text(*data.corpus[doc_id]) for _, doc_id in pairs]
    return anchors, positives, [doc_text(title, text) for title, text in data.corpus.values()]
