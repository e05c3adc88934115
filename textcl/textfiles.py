"""Reading UTF-8 text inputs with one-line errors for the usual mistakes (missing file, folder, bad byte)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from textcl.errors import TextclError


def check_file(path: str | Path, what: str) -> Path:
    """`path` as a Path if it is an existing file, else a TextclError naming `what` it should be."""
    path = Path(path)
    if not path.exists():
        raise TextclError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise TextclError(f"{what} {str(path)!r} is a folder; pass a file")
    return path


def not_utf8(path: Path, line: int, error: UnicodeDecodeError) -> TextclError:
    return TextclError(f"{path}:{line}: not UTF-8 ({error.reason}); re-encode the file as UTF-8")


def decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of every non-blank line; a non-UTF-8 line is a TextclError naming it."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                raise not_utf8(path, number, error) from None
            if line:
                yield number, line


def read_text(path: str | Path, what: str) -> str:
    """The whole file as text (a leading BOM dropped)."""
    path = check_file(path, what)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise not_utf8(path, data.count(b"\n", 0, error.start) + 1, error) from None


def read_lines(path: str | Path, what: str = "input file") -> list[str]:
    """Non-blank, stripped lines of a text file; an empty file is a TextclError."""
    path = check_file(path, what)
    lines = [line for _, line in decoded_lines(path)]
    if not lines:
        raise TextclError(f"{what} {str(path)!r} is empty")
    return lines
