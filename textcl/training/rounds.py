"""Rounds of hard-negative mining and training in one run (`mining_rounds: N`), as ANCE and RocketQA re-mine
with a trained model.

Round 1 mines negatives for the pairs of `train_data` (a BEIR folder or a pairs table) with the base model,
then trains on them; round r > 1 mines with round r-1's model and trains again from the base model (the
recipe that reached 0.761 on SciFact: negatives of a fine-tuned model, a fresh start from the base). Mining is
`textcl mine`'s (`mine_hard_negatives`, settings in `mining_options` under its option names, encoded in fp32
and cached as `textcl mine` caches); training is `textcl.training.trainer.train`, unchanged. The output folder:

    round-1-negatives/mined.jsonl   the mined table, and mined.jsonl.textcl.json: how it was mined (as `textcl
                                    mine` writes it; re-mining with `remine_steps` reads it too)
    round-1-model/                  round 1's model (every round but the last)
    round-2-negatives/ ...
    rounds.json                     each round: the model that mined, its file, settings, rows, seconds
    (the last round's model, textcl.json, metrics.jsonl and checkpoints, as any run)

A kill at any point loses at most the step in progress: a negatives folder is written whole or not at all
(`write_folder`), a round's model counts as done once rounds.json records it (written when its training
returned), and `resume_from_checkpoint: latest` skips what is done and resumes the round in progress from its latest
checkpoint, as any run resumes.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

from textcl.config import TrainConfig
from textcl.errors import TextclError
from textcl.io.atomic import exclusive_lock, write_folder, write_text_atomically
from textcl.io.pairs import read_pairs
from textcl.io.tables import write_table
from textcl.model.encode_options import EncodeOptions
from textcl.model.encoder import Encoder
from textcl.retrieval.corpus_embeddings import default_cache_dir
from textcl.retrieval.mining import mine_hard_negatives
from textcl.training import trainer
from textcl.training.plan import RunPlan, plan_run
from textcl.version import __version__

MINED_FILE = "mined.jsonl"
RECORD_FILE = "rounds.json"
NOT_OPTIONS = ("encoder", "anchors", "positives", "corpus", "encode_options", "cache_dir", "show_progress_bar",
               "precision")
# `textcl mine`'s settings: those of `mine_hard_negatives` and of its `EncodeOptions` (prompt names, lengths, batch)
ENCODE_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(EncodeOptions).parameters.items()
                   if name not in NOT_OPTIONS}
MINING_DEFAULTS = {name: parameter.default
                   for name, parameter in inspect.signature(mine_hard_negatives).parameters.items()
                   if name not in NOT_OPTIONS} | ENCODE_DEFAULTS


def mining_settings(config: TrainConfig, number: int) -> dict[str, Any]:
    """Round `number`'s `mining_options` ("key=value" with `textcl mine`'s option names; "roundN.key=value" for
    round N only) as `mine_hard_negatives` keywords, typed as its defaults are ("none" for None); num_negatives
    defaults to the run's num_negatives, else 1."""
    settings: dict[str, Any] = {"num_negatives": config.data.num_negatives or 1}
    for option in sorted(config.data.mining_options, key=lambda item: item.startswith("round")):
        key, _, text = option.partition("=")
        scope, dot, name = key.partition(".")
        if dot and scope.startswith("round") and scope[5:].isdigit():
            if int(scope[5:]) != number:
                continue
            key = name
        if key not in MINING_DEFAULTS:
            match = difflib.get_close_matches(key, list(MINING_DEFAULTS), n=1, cutoff=0.0)
            raise TextclError(f"mining_options: unknown setting {key!r}" + (f"; did you mean {match[0]!r}?" if match
                                                                              else ""))
        default = MINING_DEFAULTS[key]
        try:
            if text.lower() == "none" or key.endswith("_name"):
                value = None if text.lower() == "none" else text
            elif isinstance(default, (bool, str)):
                value = text if isinstance(default, str) else text.lower() in ("true", "1", "yes")
            else:  # numbers; a None default (min_negatives, lengths) takes an int
                value = type(default)(text) if default is not None else int(text)
        except ValueError:
            raise TextclError(f"mining_options {option!r}: {text!r} is not a number") from None
        settings[key] = value
    return settings


def round_folders(output_dir: Path, number: int) -> tuple[Path, Path]:
    """(negatives folder, model folder) of round `number` (the last round's model is output_dir itself)."""
    return output_dir / f"round-{number}-negatives", output_dir / f"round-{number}-model"


def mine_round(config: TrainConfig, model: str, folder: Path, settings: dict[str, Any], number: int) -> dict[str, Any]:
    """Mine the negatives of round `number` with `model` into `folder` (written whole); returns its record."""
    data = config.data
    started = time.perf_counter()
    anchors, positives, corpus = read_pairs(data.train_data[0], data.train_split, data.anchor_column,
                                            data.positive_column or "positive")
    encoder = Encoder.load(model, max_seq_length=config.model.max_seq_length)
    encoding = {key: value for key, value in settings.items() if key in ENCODE_DEFAULTS}
    options = EncodeOptions(cache_dir=default_cache_dir(), show_progress_bar=True, **encoding)
    mined = mine_hard_negatives(encoder, anchors, positives, corpus, encode_options=options,
                                **{key: value for key, value in settings.items() if key not in ENCODE_DEFAULTS})
    print(f"textcl: round {number}: mined with {model}\n{mined.stats.summary()}")
    provenance = {"textcl_version": __version__, "command": "mine", "model": model, "data": str(data.train_data[0]),
                  "split": data.train_split, "corpus": None, "settings": mined.settings,
                  "scores": {"model": model, "kind": "bi-encoder (the mining model)"}, "mining_round": number}
    write_folder(folder, lambda staging: write_table(mined.columns, staging / MINED_FILE, provenance=provenance),
                 f"the round {number} negatives")
    return {"round": number, "mined_with": model, "mined_file": str(folder / MINED_FILE),
            "settings": mined.settings, "rows": mined.stats.rows_kept, "mine_seconds": time.perf_counter() - started}


def round_config(config: TrainConfig, mined: Path, output_dir: Path, last: bool) -> TrainConfig:
    """The config of one round's training: the mined file as train_data, its own output folder."""
    data = dataclasses.replace(config.data, train_data=[str(mined)], mining_rounds=0, mining_options=[])
    training = dataclasses.replace(config.training, output_dir=str(output_dir),
                                   push_to_hub=config.training.push_to_hub and last)
    return dataclasses.replace(config, data=data, training=training)


def read_record(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / RECORD_FILE
    return json.loads(path.read_text())["rounds"] if path.is_file() else []


def train(config: TrainConfig | RunPlan) -> dict[str, Any]:
    """Run the training job `config` (or its RunPlan) describes (`textcl train`): its mining rounds when it has
    `mining_rounds`, else one run of the trainer; returns the final evaluation metrics."""
    plan = config if isinstance(config, RunPlan) else plan_run(config)
    return train_rounds(plan.config) if plan.config.data.mining_rounds else trainer.train(plan)


def train_rounds(config: TrainConfig) -> dict[str, Any]:
    """Run every round of `config.data.mining_rounds` (see the module docstring); returns the final metrics."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TextclError("mining_rounds run in one process for now; start `textcl train` without a launcher")
    output_dir = Path(config.training.output_dir)
    resuming = config.training.resume_from_checkpoint == "latest"
    with exclusive_lock(output_dir, what="the output_dir", lock_file=output_dir / ".textcl.lock"):
        if (output_dir / RECORD_FILE).is_file() and not (resuming or config.training.overwrite_output_dir):
            raise TextclError(f"output_dir {str(output_dir)!r} already holds a run of mining rounds; pass "
                              "--resume_from_checkpoint latest to continue it or --overwrite_output_dir true to "
                              "start over")
        records = read_record(output_dir) if resuming else []
        model, metrics = str(config.model.model_name_or_path), {}
        every = {n: mining_settings(config, n) for n in range(1, config.data.mining_rounds + 1)}  # errors first
        for number, settings in every.items():
            last = number == config.data.mining_rounds
            negatives, model_dir = round_folders(output_dir, number)
            model_dir = output_dir if last else model_dir
            done = {record["round"]: record for record in records}
            if number not in done or not (negatives / MINED_FILE).is_file():
                done[number] = mine_round(config, model, negatives, settings, number)
                records = [record for record in records if record["round"] < number] + [done[number]]
                write_text_atomically(output_dir / RECORD_FILE, json.dumps({"rounds": records}, indent=2) + "\n")
            if resuming and "model" in done[number]:
                metrics = json.loads((model_dir / "textcl.json").read_text()).get("metrics", {})
                print(f"textcl: round {number}: already trained ({model_dir}); skipped")
            else:
                started = time.perf_counter()
                metrics = trainer.train(round_config(config, negatives / MINED_FILE, model_dir, last))
                done[number] |= {"model": str(model_dir), "train_seconds": time.perf_counter() - started}
                records = [done[n] for n in sorted(done)]
                write_text_atomically(output_dir / RECORD_FILE, json.dumps({"rounds": records}, indent=2) + "\n")
            model = str(model_dir)
    return metrics
