"""The sidecar of a table written by `textcl mine` (`<table>.textcl.json`): where its rows came from and how they
were mined. Written by the CLI and read back by re-mining during training (`textcl.training.remining`), both
through `MiningRecord`, so the two cannot disagree on a key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textcl.io.tables import read_provenance
from textcl.version import __version__

COMMAND = "mine"


@dataclass(frozen=True)
class MiningRecord:
    """`data` (split `split`) was mined by `model` over `corpus` (None: `textcl mine`'s default corpus, the data's
    own) with `settings` (`MinedTable.settings`); `scores` names who scored the texts, `environment` what else
    decides float results."""

    model: str
    data: str
    split: str | None = None
    corpus: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's JSON (`textcl.io.tables.write_table(..., provenance=...)`)."""
        return {"textcl_version": __version__, "command": COMMAND, "model": self.model, "data": self.data,
                "split": self.split, "corpus": self.corpus, "settings": self.settings, "scores": self.scores,
                "environment": self.environment}

    @classmethod
    def read(cls, table: str | Path) -> MiningRecord | None:
        """The record of `table`, or None when it has no sidecar written by `textcl mine`, or one naming no data."""
        record = read_provenance(table)
        if record is None or record.get("command") != COMMAND or not record.get("data"):
            return None
        folder = Path(table).parent  # paths are as the command was given them, else relative to the table
        corpus = record.get("corpus")
        return cls(str(record.get("model", "")), existing(record["data"], folder), record.get("split"),
                   existing(corpus, folder) if corpus else None, dict(record.get("settings") or {}),
                   dict(record.get("scores") or {}), dict(record.get("environment") or {}))


def existing(path: str, relative_to: Path) -> str:
    """`path` as recorded, else relative to the folder of the file that recorded it."""
    if Path(path).exists():
        return path
    beside = relative_to / path
    return str(beside) if beside.exists() else path
