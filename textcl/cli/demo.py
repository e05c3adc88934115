"""`textcl demo`: the embedded default on bundled data, offline."""

from __future__ import annotations

import argparse

from textcl.cli.options import defaults_of
from textcl.demo.run import run as run_demo


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = defaults_of(run_demo)
    parser.add_argument("--model", default=defaults["model"], help="model folder or Hub id (default: the shipped MiniLM)")
    parser.add_argument("--output_dir", default=defaults["output_dir"], help="where the trained model goes")


def run(args: argparse.Namespace) -> None:
    run_demo(args.model, args.output_dir)
