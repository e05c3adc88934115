"""Reading BEIR folders: `corpus.jsonl`, `queries.jsonl` and `qrels/{split}.tsv`.

Written by hand rather than with `datasets.load_dataset("json")` because every mistake must be reported
as one line naming the file and line (non-UTF-8 text, bad JSON, duplicate ids, qrels naming unknown ids),
which `datasets` reports as Arrow errors without a line number.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from textcl.errors import TextclError
from textcl.textfiles import decoded_lines

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


def read_jsonl(path: Path, fields: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """`_id` -> the values of `fields` ("" when absent) for each JSON line; ids must be unique."""
    records: dict[str, tuple[str, ...]] = {}
    first_line: dict[str, int] = {}
    for number, line in decoded_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TextclError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or "_id" not in record:
            raise TextclError(f"{path}:{number}: each line must be a JSON object with an '_id' field")
        key = str(record["_id"])
        if key in records:
            first = first_line[key]
            raise TextclError(f"{path}:{number}: duplicate id {key!r} (first on line {first}); ids must be unique")
        records[key] = tuple(str(record.get(field) or "") for field in fields)
        first_line[key] = number
    return records


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
    corpus = {key: (title, text) for key, (title, text) in read_jsonl(corpus_path, ("title", "text")).items()}
    if not corpus:
        raise TextclError(f"{corpus_path} holds no documents")
    all_queries = {key: text for key, (text,) in read_jsonl(queries_path, ("text",)).items()}
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
