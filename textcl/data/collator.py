"""Rows -> a tokenized training batch, with prompts, augmentations and stable text ids.

Anchors (queries) and positives/negatives (documents) are tokenized separately, each padded to its
own longest text and truncated to its own max length. Text ids are 63-bit hashes that agree across
processes (Python's `hash` does not), so the loss can mask candidates identical to a row's positive.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

AUGMENTATIONS = ("word_deletion", "span_crop", "word_repetition")


def text_id(text: str) -> int:
    """A stable signed 64-bit id of `text` (blake2b), equal in every process and run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def augment(text: str, method: str, rng: random.Random, rate: float = 0.1) -> str:
    """One augmentation of `text` for an unsupervised positive (words are whitespace tokens)."""
    words = text.split()
    if len(words) < 2:
        return text
    if method == "word_deletion":
        kept = [w for w in words if rng.random() >= rate]
        return " ".join(kept or [rng.choice(words)])
    if method == "span_crop":
        length = max(1, round(len(words) * (1 - rate * 2)))
        start = rng.randrange(len(words) - length + 1)
        return " ".join(words[start : start + length])
    if method == "word_repetition":
        return " ".join(w for word in words for w in ([word, word] if rng.random() < rate else [word]))
    raise ValueError(f"unknown augmentation {method!r}")


@dataclass
class ContrastiveCollator:
    """Callable for `DataLoader(collate_fn=...)`: list of rows -> batch dict.

    The batch holds `anchor` (tokenized `[B, Tq]`), `positive` (`[B, Tp]`, or None for dropout positives:
    the trainer encodes the anchors twice), `negatives` (`[n, Tp]`: the real negatives of all rows in row
    order, or None), `anchor_ids`, `positive_ids` `[B]`, and with `num_negatives` k > 0 `negative_ids` and
    `negative_mask` `[B, k]` (rows with fewer than k negatives are padded: id 0, mask False), else None;
    `labels` `[B]` or None.

    `source_query_prompts`: the query prompt of each `train_data` source (rows then carry their `source`
    index), replacing `query_prompt`. `prompt_length(prompt)`: given when the model pools without its prompts'
    tokens; each tokenized group then holds `prompt_length` `[rows]` (see `Encoder.embed`).
    """

    tokenizer: Any
    query_max_length: int
    document_max_length: int
    num_negatives: int = 0
    query_prompt: str = ""
    document_prompt: str = ""
    augment: tuple[str, ...] = ()
    seed: int = 0
    row_keys: bool = False
    source_query_prompts: tuple[str, ...] = ()
    prompt_length: Callable[[str], int] | None = None
    epoch: int = field(default=0, repr=False)

    def tokenize(self, texts: list[str], max_length: int, prompts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """`prompts[i] + texts[i]` tokenized and padded `[n, T]` (plus `prompt_length` `[n]`, see the class)."""
        prompts = prompts if prompts is not None else [""] * len(texts)
        batch = dict(self.tokenizer([p + t for p, t in zip(prompts, texts)], padding=True, truncation=True,
                                    max_length=max_length, return_tensors="pt"))
        if self.prompt_length is not None:
            lengths = {prompt: self.prompt_length(prompt) for prompt in set(prompts)}
            batch["prompt_length"] = torch.tensor([lengths[prompt] for prompt in prompts])
        return batch

    def query_prompts(self, rows: list[dict[str, Any]]) -> list[str]:
        """Each row's query prompt: its source's, else `query_prompt`."""
        if self.source_query_prompts:
            return [self.source_query_prompts[row["source"]] for row in rows]
        return [self.query_prompt] * len(rows)

    def positives(self, rows: list[dict[str, Any]]) -> list[str] | None:
        """Positive texts, or None when every row is a plain dropout positive."""
        if all(row["positive"] is None for row in rows):
            if not self.augment:
                return None
            return [self.augmented(row["anchor"]) for row in rows]
        return [row["anchor"] if row["positive"] is None else row["positive"] for row in rows]

    def augmented(self, text: str) -> str:
        """Deterministic in (seed, epoch, text) so a resumed run sees the same augmentations."""
        rng = random.Random(f"{self.seed}:{self.epoch}:{text}")
        return augment(text, rng.choice(self.augment), rng)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        anchors = [row["anchor"] for row in rows]
        positives = self.positives(rows)
        documents = positives if positives is not None else anchors
        batch: dict[str, Any] = {
            "anchor": self.tokenize(anchors, self.query_max_length, self.query_prompts(rows)),
            "positive": None,
            "negatives": None,
            "anchor_ids": torch.tensor([text_id(a) for a in anchors]),
            "positive_ids": torch.tensor([text_id(p) for p in documents]),
            "negative_ids": None,
            "negative_mask": None,
            "labels": None,
            "teacher_scores": None,
        }
        if positives is not None:
            batch["positive"] = self.tokenize(positives, self.document_max_length, [self.document_prompt] * len(rows))
        self.add_negatives(batch, [row["negatives"] for row in rows])
        if self.row_keys:
            batch["row_keys"] = [(row["anchor"], row["positive"]) for row in rows]
        if rows[0].get("teacher_scores") is not None:
            width = 1 + self.num_negatives
            batch["teacher_scores"] = torch.tensor(
                [row["teacher_scores"][:width] + [0.0] * (width - len(row["teacher_scores"][:width])) for row in rows],
                dtype=torch.float32,
            )
        if rows[0].get("label") is not None:
            batch["labels"] = torch.tensor([text_id(str(row["label"])) for row in rows])
        return batch

    def add_negatives(self, batch: dict[str, Any], negatives: list[list[str]]) -> dict[str, Any]:
        """Set (or replace) `batch`'s `negatives`, `negative_ids` and `negative_mask` from each row's negative texts
        (the first `num_negatives` of each); returns `batch`."""
        negatives = [row[: self.num_negatives] for row in negatives]
        flat_negatives = [text for row_negatives in negatives for text in row_negatives]
        batch |= {"negatives": None, "negative_ids": None, "negative_mask": None}
        if self.num_negatives:
            missing = [self.num_negatives - len(row) for row in negatives]
            batch["negative_ids"] = torch.tensor(
                [[text_id(n) for n in row] + [0] * m for row, m in zip(negatives, missing)]
            )
            batch["negative_mask"] = torch.tensor(
                [[True] * len(row) + [False] * m for row, m in zip(negatives, missing)]
            )
            if flat_negatives:
                prompts = [self.document_prompt] * len(flat_negatives)
                batch["negatives"] = self.tokenize(flat_negatives, self.document_max_length, prompts)
        return batch
