"""Line-by-line readers for the jobs `datasets` does not do: naming the file and line of a mistake, checking
that every csv/tsv record has its header's field count, and parsing qrels files.

`textcl.io.tables.load_table` reads every table through `datasets`; when that fails, or a loaded table
breaks a rule (a duplicate id, a missing field), these readers find the line to name. Written by hand
because `datasets` reports such problems as Arrow errors without a line number.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from textcl.errors import TextclError


def not_utf8(path: Path, line: int, error: UnicodeDecodeError) -> TextclError:
    return TextclError(f"{path}:{line}: not UTF-8 ({error.reason}); re-encode the file as UTF-8")


def check_utf8(path: Path, block: int = 2**24) -> None:
    """Raise the file:line TextclError of the first byte that is not UTF-8 (read in 16 MiB blocks, at C speed;
    Arrow's JSON reader only fails on bad bytes later, without a line)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines_before = 1
    with path.open("rb") as handle:
        while data := handle.read(block):
            try:
                decoder.decode(data)
            except UnicodeDecodeError as error:
                raise not_utf8(path, lines_before + data.count(b"\n", 0, error.start), error) from None
            lines_before += data.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as error:
            raise not_utf8(path, lines_before, error) from None


def decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of every non-blank line; a non-UTF-8 line is a TextclError naming it."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
            except UnicodeDecodeError as error:
                raise not_utf8(path, number, error) from None
            if line:
                yield number, line


def json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSON-lines file; a line that is not a JSON object
    is a TextclError naming it."""
    for number, line in decoded_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TextclError(f"{path}:{number}: not valid JSON ({error.msg}); write one JSON object a line") from None
        if not isinstance(record, dict):
            raise TextclError(f"{path}:{number}: expected a JSON object")
        yield number, record


def locate_problem(path: Path) -> None:
    """Raise the file:line TextclError of the first line that is not UTF-8 (or, in a .jsonl file, not a JSON
    object); return when every line reads."""
    lines = json_lines(path) if path.suffix == ".jsonl" else decoded_lines(path)
    for _ in lines:
        pass


def line_of_record(path: Path, row: int) -> int:
    """The line number of the `row`-th (0-based) non-blank line of a text file."""
    for index, (number, _) in enumerate(decoded_lines(path)):
        if index == row:
            return number
    return row + 1


DELIMITER_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
SUFFIX_OF = {",": ".csv", "\t": ".tsv"}


def separator(delimiter: str | None) -> str | None:
    """A `delimiter` setting as one character: `tab`, `\\t` and a real tab are a tab; None stays None."""
    if delimiter is None:
        return None
    text = {"tab": "\t", "\\t": "\t", "comma": ","}.get(delimiter.lower(), delimiter)
    if len(text) != 1:
        raise TextclError(f"delimiter {delimiter!r} must be one character (e.g. , or tab)")
    return text


def check_fields(path: Path, delimiter: str, source: str, explicit: bool = False) -> None:
    """Raise a TextclError naming the file and line of the first record whose field count differs from the
    header's, or naming the delimiter a file seems to use when it is not the one its extension says.

    Written by hand: pandas (under `datasets`' csv builder) silently turns an extra leading field into an
    index, which shifts every column, and fills missing fields with nothing. `csv` reads quoted fields with
    delimiters and newlines inside them as one field, as pandas does; blank lines are skipped, as pandas does.
    """
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, [])
        if not explicit:
            check_delimiter(header, delimiter, source)
        start = reader.line_num + 1
        for record in reader:
            if record and len(record) != len(header):
                raise TextclError(
                    f"{source} line {start}: {len(record)} fields, header has {len(header)} ({', '.join(header)}); "
                    f"quote fields that hold a {DELIMITER_NAMES.get(delimiter, repr(delimiter))}, or fix the row")
            start = reader.line_num + 1


def check_table_file(path: str | Path, delimiter: str | None = None) -> None:
    """`check_fields` for a local .csv/.tsv file (`delimiter`: the setting, None: by the extension); anything else
    passes (made before the model loads, so a misread file costs a second, not a model load)."""
    suffix = Path(path).suffix
    if Path(path).is_file() and suffix in SUFFIX_OF.values():
        chosen = separator(delimiter) or {".csv": ",", ".tsv": "\t"}[suffix]
        check_fields(Path(path), chosen, str(path), explicit=delimiter is not None)


def check_delimiter(header: list[str], delimiter: str, source: str) -> None:
    """Name the separator a file seems to use when its header (split by `delimiter`) holds another one: a tab in
    a header name is never meant, another separator only when the whole header is one name."""
    for other, name in DELIMITER_NAMES.items():
        if other != delimiter and any(other in part for part in header) and (len(header) == 1 or other == "\t"):
            fix = f"rename it {SUFFIX_OF[other]} or set delimiter" if other in SUFFIX_OF else "set delimiter"
            raise TextclError(f"{source} looks {name}-separated; {fix}")
