"""Re-mining hard negatives during training (`remine_steps: N`).

Every N optimizer steps the corpus is encoded with the model being trained and every training row gets new
hard negatives from `textcl.retrieval.mining.mine_hard_negatives`, the function behind `textcl mine`, with
the settings the mined file's sidecar records (rank window, positive-aware threshold, sampling; its lengths as
the `EncodeOptions`) or, for a BEIR folder, its defaults; `num_negatives` of the run wins, the run's
`query_max_length`/`document_max_length` fill lengths the sidecar lacks, and no row is dropped (`min_negatives` 0:
a row with fewer candidates keeps empty slots). Encoding is sharded across processes (`computed_rows`); each
process then searches the whole corpus alike, so every process holds the same negatives.

New negatives reach a batch when the training loop takes it (`apply`), not when the DataLoader collates it
(accelerate's loader collates one batch ahead): the batch right after a re-mine already has them, in a run
and in its resumption alike. The negatives are part of the checkpoint (`state_dict`), so a resumed run
trains on the negatives its interrupted run had.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from textcl.config import DataArguments
from textcl.data.collator import ContrastiveCollator
from textcl.errors import TextclError
from textcl.io.corpus import read_corpus
from textcl.io.pairs import read_pairs
from textcl.io.tables import provenance_path
from textcl.model.encode_options import EncodeOptions
from textcl.model.text_encoder import TextEncoder
from textcl.retrieval.mining import mine_hard_negatives
from textcl.retrieval.mining_record import MiningRecord

# The mining settings a sidecar records that `mine_hard_negatives` takes again, and those it encodes with.
MINING_SETTINGS = ("num_negatives", "range_min", "range_max", "max_score_ratio", "margin", "sampling", "factory",
                   "search_params", "seed")
LENGTH_SETTINGS = ("query_max_length", "document_max_length")
DEFAULT_NUM_NEGATIVES = 1  # a BEIR folder without a num_negatives setting: one negative a row, as retrieval-hardneg


@dataclass
class RemineSource:
    """What re-mining needs besides the model: the corpus to search, the settings to mine with, and the
    max lengths to encode with (the precision is the run's)."""

    corpus: list[str]
    settings: dict[str, Any]
    encode_options: EncodeOptions = EncodeOptions()


def remine_source(data: DataArguments) -> RemineSource:
    """The corpus and mining settings of the run's one `train_data` source: a BEIR folder (its corpus, mining's
    defaults) or a table written by `textcl mine` (the data, corpus and settings its sidecar records)."""
    source = data.train_data[0]
    settings: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    if Path(source).is_dir():
        corpus = read_pairs(source, data.train_split)[2]
    else:
        record = MiningRecord.read(source)
        if record is None:
            raise TextclError(f"remine_steps needs a BEIR folder or a file written by `textcl mine` (its sidecar "
                              f"{provenance_path(source).name} names the corpus); {source!r} has none")
        if record.corpus:
            corpus = read_corpus(record.corpus)[1]
        else:  # the default corpus of `textcl mine`: a BEIR folder's corpus, else every positive of the pairs
            _, positives, corpus = read_pairs(record.data, record.split or "train")
            corpus = corpus or list(dict.fromkeys(positives))
        settings = {key: record.settings[key] for key in MINING_SETTINGS if key in record.settings}
        lengths = {key: record.settings[key] for key in LENGTH_SETTINGS if record.settings.get(key)}
    if data.num_negatives is not None:
        settings["num_negatives"] = data.num_negatives
    settings.setdefault("num_negatives", DEFAULT_NUM_NEGATIVES)
    for key in LENGTH_SETTINGS:
        if getattr(data, key) and key not in lengths:
            lengths[key] = getattr(data, key)
    return RemineSource(corpus, settings, EncodeOptions(**lengths))


@dataclass
class Remining:
    """Re-mines the negatives of the training rows every `steps` optimizer steps. `negatives`: each distinct
    (anchor, positive) pair's current negative texts (at first the data's), `pairs` their order."""

    steps: int
    negatives: dict[tuple[str, str], list[str]] = field(repr=False)
    source: RemineSource
    collator: ContrastiveCollator
    precision: str = "fp32"

    def __post_init__(self) -> None:
        self.pairs = list(self.negatives)

    @property
    def num_negatives(self) -> int:
        return int(self.source.settings["num_negatives"])

    def due(self, step: int) -> bool:
        return self.steps > 0 and step % self.steps == 0

    def apply(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The batches with the current negatives of their rows (as they are taken, after any re-mine before)."""
        for batch in batches:
            yield self.collator.add_negatives(batch, [self.negatives[key] for key in batch["row_keys"]])

    def remine(self, encoder: TextEncoder) -> dict[str, Any]:
        """Mine every row's negatives with `encoder` (on every process); returns what to log: how many rows and
        negatives there are now, how many negatives are not among their row's previous ones, and the seconds."""
        started = time.perf_counter()
        anchors, positives = [a for a, _ in self.pairs], [p for _, p in self.pairs]
        options = dataclasses.replace(self.source.encode_options, precision=self.precision)
        mined = mine_hard_negatives(encoder, anchors, positives, self.source.corpus, min_negatives=0,
                                    encode_options=options, **self.source.settings)
        columns = mined.columns
        names = [f"negative_{j + 1}" for j in range(self.num_negatives)]
        fresh = {(a, p): [text for text in row if text] for a, p, *row in
                 zip(columns["anchor"], columns["positive"], *(columns[name] for name in names))}
        changed = sum(len(set(texts) - set(self.negatives[key])) for key, texts in fresh.items())
        self.negatives = fresh
        return {"remined_rows": len(fresh), "remined_negatives": sum(map(len, fresh.values())),
                "negatives_changed": changed, "remine_seconds": time.perf_counter() - started}

    def state_dict(self) -> dict[str, Any]:
        """The current negatives, one list a pair in `pairs` order."""
        return {"negatives": [self.negatives[key] for key in self.pairs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["negatives"]) != len(self.pairs):
            raise TextclError(f"the checkpoint's re-mined negatives are for {len(state['negatives'])} (anchor, "
                              f"positive) pairs, this run's data has {len(self.pairs)}: resume with the same train_data")
        self.negatives = dict(zip(self.pairs, state["negatives"]))


def build_remining(data: DataArguments, rows: Any, collator: ContrastiveCollator, precision: str) -> Remining | None:
    """The run's re-mining (None without `remine_steps`); `rows` are the training rows (map-style)."""
    if not data.remine_steps:
        return None
    if any(positive is None for positive in rows["positive"]):
        raise TextclError("remine_steps needs a positive in every row (mining excludes it from the negatives)")
    negatives = {(a, p): list(n) for a, p, n in zip(rows["anchor"], rows["positive"], rows["negatives"])}
    remining = Remining(data.remine_steps, negatives, remine_source(data), collator, precision)
    widen_collator(collator, remining.num_negatives)
    return remining


def widen_collator(collator: ContrastiveCollator, num_negatives: int) -> None:
    """Make `collator` (in place) tag each batch with its rows' keys, which `Remining.apply` looks the current
    negatives up by, and hold up to `num_negatives` negatives a row (re-mining may find more than the data had)."""
    collator.row_keys = True
    collator.num_negatives = max(collator.num_negatives, num_negatives)
