"""`textcl train`: a YAML recipe plus `--setting value` overrides (the fields of `textcl.config`)."""

from __future__ import annotations

import argparse
import json

from textcl.config import FIELDS, load_config
from textcl.training.trainer import train

HELP = "train a model from a YAML recipe (also under `accelerate launch -m textcl train`)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Train from a YAML recipe; any setting can be overridden as --key value after the recipe. "
                          f"Settings: {', '.join(FIELDS)}.")
    parser.usage = "textcl train [RECIPE.yaml] [--setting value ...]"
    parser.add_argument("--json", action="store_true",
                        help="also print the final metrics as JSON (output_dir/textcl.json holds them too)")
    parser.set_defaults(takes_overrides=True)


def run(args: argparse.Namespace) -> None:
    overrides = list(args.overrides)
    recipe = overrides.pop(0) if overrides and not overrides[0].startswith("-") else None
    metrics = train(load_config(recipe, overrides))
    if metrics and args.json:
        print(json.dumps(metrics, indent=2))
