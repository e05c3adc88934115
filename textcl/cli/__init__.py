"""The `textcl` command line: each subcommand parses its arguments and calls the library.

Only the chosen command's module is imported (`COMMANDS`), so `textcl --help` is instant and a command's
options can read their defaults from the library it calls. A `TextclError` becomes one line on stderr
and exit code 2; argparse mistakes also exit with 2. Nothing outside this package imports it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from textcl.cli.launch import leave_if_distributed, report_error
from textcl.cli.quiet import set_library_output
from textcl.errors import TextclError
from textcl.version import __version__

# command -> (module, configure function, run function, one-line help)
COMMANDS = {
    "encode": ("encode", "configure", "run", "embed texts (one a line, or a table's 'text') into a .npy array"),
    "train": ("train", "configure", "run", "train a model from a YAML recipe (also under `accelerate launch -m "
              "textcl train`)"),
    "demo": ("demo", "configure", "run", "run the embedded default on bundled data (no network)"),
    "eval": ("evaluate", "configure", "run", "STS correlations and BEIR retrieval metrics of a model"),
    "mine": ("mine", "configure", "run", "mine hard negatives for (anchor, positive) pairs with FAISS"),
    "index": ("search", "configure_index", "run_index", "build a FAISS search index of a corpus"),
    "search": ("search", "configure_search", "run_search", "query a search index built by `textcl index`"),
    "serve": ("serve", "configure", "run", "serve a search index over HTTP, with a web page (extra: textcl[serve])"),
    "push": ("hub", "configure_push", "run_push", "upload a model folder to the Hugging Face Hub"),
    "merge": ("hub", "configure_merge", "run_merge", "merge a LoRA adapter folder into a full model folder"),
    "export": ("export", "configure", "run", "write a model as one ONNX graph (pooling inside), optionally int8"),
    "score": ("score", "configure", "run", "a teacher's score of each (anchor, candidate) pair, for distillation"),
    "shrink": ("shrink", "configure", "run", "copy some layers of a model into a smaller one (a student to distil)"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser, with the options of the command named in `argv` (the first word not starting with -)."""
    parser = argparse.ArgumentParser(prog="textcl", description="Train, evaluate and serve text embedding models.")
    parser.add_argument("--version", action="version", version=f"textcl {__version__}")
    verbose = "show the progress bars and info logs of transformers, datasets and huggingface_hub (hidden by default)"
    parser.add_argument("--verbose", action="store_true", help=verbose)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((word for word in argv if not word.startswith("-")), None)
    for name, (module, configure, run, help_text) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        subparser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose)
        if name == chosen:
            commands = importlib.import_module(f"textcl.cli.{module}")
            getattr(commands, configure)(subparser)
            subparser.set_defaults(run=getattr(commands, run))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `textcl` console script; returns the process exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(argv)
        args, overrides = parser.parse_known_args(argv)
        if overrides and not getattr(args, "takes_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(overrides)}")
        args.overrides = overrides
        set_library_output(args.verbose)
        if hasattr(args, "device"):
            from textcl.model.device import resolve_device  # torch: only for commands that run a model

            args.device = resolve_device(args.device, what="--device")
        return args.run(args) or 0
    except TextclError as error:
        report_error(error)  # printed, or in a child of `train --num_processes`, left to the parent to print
        leave_if_distributed(2)  # a failed multi-process run: without gloo's destructors, which can abort or hang
        return 2
