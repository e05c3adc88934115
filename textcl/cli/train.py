"""`textcl train`: a YAML recipe plus `--setting value` overrides (the fields of `textcl.config`).

The recipe and its data are checked before torch and the model load: a missing file or an unreachable Hub
dataset is one line within a second or two, not after the model has loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from textcl.cli.launch import follow_launcher, launch_training, leave_if_distributed
from textcl.config import PARTS, DataArguments, load_config
from textcl.errors import TextclError
from textcl.io.sources import data_sources, hub_dataset
from textcl.io.text import check_table_file
from textcl.training.plan import plan_run

GROUP_NAMES = {"ModelArguments": "model", "DataArguments": "data", "LossArguments": "loss",
               "TrainingArguments": "training"}


def settings_help() -> str:
    """Every setting of the config with its help text and default, in one argument group per dataclass (model,
    data, loss, training). Shown by `textcl train --help`; the settings themselves are parsed by textcl.config."""
    listing = argparse.ArgumentParser(prog="textcl train", add_help=False, usage=argparse.SUPPRESS,
                                      formatter_class=argparse.HelpFormatter)
    for part in PARTS:
        group = listing.add_argument_group(f"{GROUP_NAMES[part.__name__]} settings (recipe keys, or --key value)")
        for item in dataclasses.fields(part):
            default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
            text = item.metadata.get("help", "").replace("%", "%%")
            group.add_argument(f"--{item.name}", metavar="VALUE" if item.type != "bool" else "[true|false]",
                               help=f"{text} (default: {default})".lstrip())
    return listing.format_help()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train from a YAML recipe; any setting below can be set in the recipe or overridden as "
                          "--key value after it.")
    parser.usage = "textcl train [RECIPE.yaml] [--setting value ...]"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # keeps the settings listing's layout
    parser.epilog = settings_help()
    parser.add_argument("--json", action="store_true",
                        help="also print the final metrics as JSON (output_dir/textcl.json holds them too)")
    parser.add_argument("--num_processes", type=int, default=None, metavar="N",
                        help="train in N processes (accelerate's launcher: one per GPU, or gloo on a CPU-only machine)")
    parser.set_defaults(takes_overrides=True)


def check_hub_sources(data: DataArguments) -> None:
    """Load each Hub dataset of the run now (downloaded once, then read from the cache by the trainer), so an id
    that cannot be reached fails before the model loads."""
    from textcl.io.tables import load_table  # datasets: only when a Hub id is used

    for setting, source in data_sources(data):
        if setting != "eval_beir" and hub_dataset(source) is not None:
            split = data.train_split if setting == "train_data" else "test"
            load_table(source, split=split, streaming=data.streaming and setting == "train_data", what=setting)


def run(args: argparse.Namespace) -> int | None:
    follow_launcher()  # a child of a launcher dies with it, before anything is loaded
    overrides = list(args.overrides)
    recipe = overrides.pop(0) if overrides and not overrides[0].startswith("-") else None
    plan = plan_run(load_config(recipe, overrides), recipe)  # every check the config alone allows
    for setting, source in data_sources(plan.config.data):  # a misread csv/tsv: one line, before the model loads
        check_table_file(source, plan.config.data.delimiter if setting == "train_data" else None)
    check_hub_sources(plan.config.data)
    if args.num_processes is not None:
        if plan.config.data.mining_rounds:
            raise TextclError("mining_rounds run in one process for now; drop --num_processes")
        return launch_training(args.num_processes, [*args.overrides, *(["--json"] if args.json else [])],
                               getattr(args, "verbose", False))
    from textcl.training.rounds import train  # torch, accelerate, transformers: after the cheap checks

    metrics = train(plan)
    if metrics and args.json:
        print(json.dumps(metrics, indent=2))
    leave_if_distributed(0)  # under a launcher: without gloo's destructors, which can hang
    return 0
