"""`textcl serve`: a search service (HTTP API and web page) over an index, or over a corpus indexed at start-up."""

from __future__ import annotations

import argparse
import os

# Idle OpenMP threads (torch's) sleep instead of spinning: a server alternates short forwards with HTTP work on
# the same cores, and spinning threads took 5-30x the CPU per query in bench/serve_load.py (bench/RESULTS.md).
# It must be set before torch loads its OpenMP runtime, i.e. before the imports below; a value you set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from textcl.cli.options import add_backend_options, add_device_option, defaults_of
from textcl.errors import TextclError
from textcl.retrieval.search_index import SearchIndex
from textcl.serving.server import ServeSettings, serve


def configure(parser: argparse.ArgumentParser) -> None:
    defaults = defaults_of(ServeSettings)
    parser.add_argument("index", help="index folder (from `textcl index`), or a model with --corpus")
    parser.add_argument("--corpus", default=None,
                        help="index this corpus (text file, table with 'text', or BEIR folder) with the model INDEX "
                        "at start-up")
    parser.add_argument("--out", default=None, help="with --corpus: keep the index (and its writes) in this folder")
    parser.add_argument("--host", default=defaults["host"], help="address to listen on (loopback: this machine only)")
    parser.add_argument("--allowed_hosts", action="append", default=[], metavar="NAME",
                        help="a host name clients may use in the Host header, repeatable (IP addresses, localhost "
                        "and --host always work; '*': any name, which lets DNS-rebinding web pages in)")
    parser.add_argument("--port", type=int, default=defaults["port"], help="port (0: any free one)")
    parser.add_argument("--api-key-env", "--api_key_env", dest="api_key_env", default=None, metavar="VAR",
                        help="writes (POST/DELETE /documents) need `Authorization: Bearer $VAR`; reads never do")
    parser.add_argument("--max_batch_size", type=int, default=defaults["max_batch_size"],
                        help="texts per micro-batch at most (on a CPU encoded in length-sorted forwards of "
                        "at most 16); 1 turns micro-batching off")
    parser.add_argument("--batch_wait_ms", type=float, default=defaults["batch_wait_ms"],
                        help="how long a batch's first query waits for others")
    parser.add_argument("--max_body_bytes", type=int, default=defaults["max_body_bytes"],
                        help="larger request bodies are refused (413)")
    parser.add_argument("--max_queued_texts", type=int, default=defaults["max_queued_texts"],
                        help="texts waiting for the model at most; a request that would queue more gets 429 with "
                        "Retry-After")
    parser.add_argument("--log-format", "--log_format", dest="log_format", choices=["text", "json"],
                        default=defaults["log_format"],
                        help="json: one JSON access line per request on stderr (text: no access lines)")
    parser.add_argument("--graceful_shutdown_s", type=float, default=defaults["graceful_shutdown_s"],
                        help="on SIGTERM, how long requests in flight may take to finish before the server exits")
    parser.add_argument("--snapshot_every", type=int, default=defaults["snapshot_every"],
                        help="writes between snapshots of the whole index (a log keeps them in between)")
    parser.add_argument("--receive_timeout", type=float, default=defaults["receive_timeout"],
                        help="seconds a client has to send a whole request; slower connections are closed")
    parser.add_argument("--max_connections", type=int, default=defaults["max_connections"],
                        help="open connections at most; more are answered 503")
    add_device_option(parser)
    add_backend_options(parser, SearchIndex.load)


def run(args: argparse.Namespace) -> None:
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise TextclError(f"--api-key-env {args.api_key_env}: that environment variable is not set or empty")
    for name in ("max_batch_size", "snapshot_every", "max_body_bytes", "max_connections", "max_queued_texts"):
        if getattr(args, name) < 1:
            raise TextclError(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("batch_wait_ms", "graceful_shutdown_s"):
        if getattr(args, name) < 0:
            raise TextclError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.receive_timeout <= 0:
        raise TextclError(f"--receive_timeout must be positive, got {args.receive_timeout}")
    settings = ServeSettings(args.host, args.port, args.max_batch_size, args.batch_wait_ms, args.max_body_bytes,
                             args.snapshot_every, args.allowed_hosts, args.receive_timeout, args.max_connections,
                             args.max_queued_texts, args.log_format, args.graceful_shutdown_s)
    serve(args.index, settings, corpus=args.corpus, out=args.out, device=args.device, api_key=api_key,
          backend=args.backend, onnx_file=args.onnx_file)
