"""The `textcl` command line: each subcommand parses its arguments and calls the library.

Heavy imports (torch, transformers) happen inside the command functions so `textcl --help` is instant.
A `TextclError` becomes one line on stderr and exit code 2; argparse mistakes also exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from textcl import __version__
from textcl.errors import TextclError

Command = Callable[[argparse.Namespace], int | None]


def add_encode_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("encode", help="embed a text file (one text a line) into a .npy array [n, dim]")
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument("--input", required=True, help="UTF-8 text file, one text a line")
    parser.add_argument("--output", required=True, help="where to write the .npy array")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--prompt_name", default=None, help="a prompt saved with the model, e.g. query")
    parser.add_argument("--prompt", default=None, help="a literal prefix for every text")
    parser.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    parser.add_argument("--truncate_dim", type=int, default=None, help="keep the first N dimensions")
    parser.add_argument("--max_seq_length", type=int, default=None)
    parser.add_argument("--pooling", default=None, help="override the model's pooling mode")
    parser.set_defaults(run=run_encode)


def run_encode(args: argparse.Namespace) -> None:
    import numpy as np

    from textcl.modeling import Encoder
    from textcl.textfiles import read_lines

    texts = read_lines(args.input)
    encoder = Encoder.load(args.model, pooling=args.pooling, max_seq_length=args.max_seq_length)
    embeddings = encoder.encode(
        texts,
        batch_size=args.batch_size,
        prompt=args.prompt,
        prompt_name=args.prompt_name,
        normalize=args.normalize or None,
        truncate_dim=args.truncate_dim,
        show_progress_bar=True,
    )
    np.save(args.output, embeddings)
    print(f"wrote {args.output}: {embeddings.shape[0]} x {embeddings.shape[1]} float32")


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run the embedded default on bundled data (no network)")
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the shipped MiniLM)")
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from textcl.demo import run

    run(args.model)


PARSERS = (add_encode_parser, add_demo_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textcl", description="Train, evaluate and serve text embedding models.")
    parser.add_argument("--version", action="version", version=f"textcl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in PARSERS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `textcl` console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except TextclError as error:
        print(f"textcl: error: {error}", file=sys.stderr)
        return 2
