"""Line-by-line readers for the two jobs `datasets` does not do: naming the file and line of a mistake, and
parsing qrels files.

`textcl.io.tables.load_table` reads every table through `datasets`; when that fails, or a loaded table
breaks a rule (a duplicate id, a missing field), these readers find the line to name. Written by hand
because `datasets` reports such problems as Arrow errors without a line number.
"""

from __future__ import annotations

import codecs
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
