"""Reading plain-text inputs (one text a line) with one-line errors for the usual mistakes."""

from __future__ import annotations

from pathlib import Path

from textcl.errors import TextclError


def read_lines(path: str | Path, what: str = "input file") -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file.

    Raises TextclError for a missing path, a folder, a non-UTF-8 line (naming the file and line) or
    a file with no text.
    """
    path = Path(path)
    if not path.exists():
        raise TextclError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise TextclError(f"{what} {str(path)!r} is a folder; pass a text file with one text a line")
    lines = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise TextclError(f"{path}:{number}: not UTF-8 ({error.reason}); re-encode the file as UTF-8") from None
            if text:
                lines.append(text)
    if not lines:
        raise TextclError(f"{what} {str(path)!r} is empty")
    return lines
