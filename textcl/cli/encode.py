"""`textcl encode`: embed texts into a .npy array."""

from __future__ import annotations

import argparse

import numpy as np

from textcl.cli.options import add_backend_options, add_bf16_option, add_device_option, defaults_of, precision_of
from textcl.io.corpus import read_corpus
from textcl.model.encoder import Encoder


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = defaults_of(Encoder.encode)
    parser.add_argument("model", help="model folder or Hub id")
    parser.add_argument("--input", required=True,
                        help="texts: a text file (one a line), a table with a 'text' column, or a BEIR folder")
    parser.add_argument("--output", required=True, help="where to write the .npy array")
    parser.add_argument("--batch_size", type=int, default=defaults["batch_size"])
    parser.add_argument("--prompt_name", default=defaults["prompt_name"], help="a prompt saved with the model, e.g. query")
    parser.add_argument("--prompt", default=defaults["prompt"], help="a literal prefix for every text")
    parser.add_argument("--normalize", action="store_true", help="L2-normalize the embeddings")
    parser.add_argument("--truncate_dim", type=int, default=defaults["truncate_dim"], help="keep the first N dimensions")
    parser.add_argument("--max_seq_length", type=int, default=None)
    parser.add_argument("--pooling", default=None, help="override the model's pooling mode")
    add_bf16_option(parser)
    add_device_option(parser)
    add_backend_options(parser)


def run(args: argparse.Namespace) -> None:
    _, texts = read_corpus(args.input, what="input file")
    encoder = Encoder.load(args.model, pooling=args.pooling, max_seq_length=args.max_seq_length, device=args.device,
                           backend=args.backend, onnx_file=args.onnx_file)
    embeddings = encoder.encode(
        texts,
        batch_size=args.batch_size,
        prompt=args.prompt,
        prompt_name=args.prompt_name,
        normalize=args.normalize or None,
        truncate_dim=args.truncate_dim,
        show_progress_bar=True,
        precision=precision_of(args),
    )
    np.save(args.output, embeddings)
    print(f"wrote {args.output}: {embeddings.shape[0]} x {embeddings.shape[1]} float32")
