"""What a data setting names: a local file or folder, or a Hub dataset id (`owner/name`, or `owner/name:config`
for a dataset with several configs, e.g. `sentence-transformers/all-nli:pair`), and the check that every local
one exists, made before anything slow (no `datasets`, torch or model import here).

`check_local_sources` turns a missing file into one line saying what is missing and how to get data for that
setting (a Hub id that holds that kind of data, or where to download a BEIR folder).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from textcl.errors import TextclError

HUB_DATASET = re.compile(r"^(?P<path>[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?)(:(?P<config>[\w.\-]+))?$")
FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".txt")
BEIR_DOWNLOAD = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/scifact.zip"
# setting -> how to get data for it, said when a local source is missing
HOW_TO_GET = {
    "train_data": "pass your own file or a Hub dataset id, e.g. --train_data sentence-transformers/all-nli:pair "
                  "(anchor, positive pairs)",
    "eval_sts": "pass your own STS file (sentence1, sentence2, score) or the Hub id sentence-transformers/stsb",
    "eval_beir": f"download and unzip a BEIR folder (e.g. {BEIR_DOWNLOAD})",
}


def hub_dataset(source: str | Path) -> tuple[str, str | None] | None:
    """(dataset id, config or None) when `source` is no local path and reads as a Hub dataset id, else None."""
    text = str(source)
    if Path(text).expanduser().exists() or Path(text).suffix in FILE_SUFFIXES:
        return None
    match = HUB_DATASET.match(text)
    return (match["path"], match["config"]) if match else None


def check_local_sources(sources: Iterable[tuple[str, str | Path]], recipe: str | None = None) -> None:
    """Raise one TextclError line for the first (setting, source) that names a local file or folder that does not
    exist (Hub ids are checked when they load); `recipe`: the recipe file, whose header says how to get its data."""
    for setting, source in sources:
        local = setting == "eval_beir" or hub_dataset(source) is None  # BEIR is read from folders only
        if local and not Path(str(source)).expanduser().exists():
            hint = HOW_TO_GET.get(setting, "check the path")
            if recipe:
                hint = f"the header of {recipe} says how to get or make it; or {hint}"
            raise TextclError(f"{setting} {str(source)!r} does not exist; {hint} (README: Data formats)")


def data_sources(data: object) -> list[tuple[str, str]]:
    """(setting, source) for every source of a run's data settings (a `textcl.config.DataArguments`)."""
    beir = getattr(data, "eval_beir", None)
    return ([("train_data", str(s)) for s in getattr(data, "train_data", [])]
            + [("eval_sts", str(s)) for s in getattr(data, "eval_sts", [])] + ([("eval_beir", str(beir))] if beir else []))
