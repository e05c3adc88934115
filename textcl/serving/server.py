"""`textcl serve`: load (or build) an index and its encoder once, then run the app on uvicorn."""

from __future__ import annotations

import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from textcl.errors import TextclError
from textcl.io.corpus import read_corpus
from textcl.model.encode_options import EncodeOptions
from textcl.model.encoder import Encoder
from textcl.retrieval.search_index import SearchIndex
from textcl.serving.app import create_app
from textcl.serving.guards import allowed_host_names, deadline_protocol
from textcl.serving.service import SearchService
from textcl.serving.store import DurableIndex

try:
    import uvicorn
except ModuleNotFoundError as missing:
    raise TextclError(f"textcl serve needs {missing.name}: pip install \"textcl[serve]\"") from missing

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ServeSettings:
    """How the server listens, batches and persists."""

    host: str = "127.0.0.1"  # loopback: only this machine can connect
    port: int = 8000  # 0: any free port (printed at start)
    max_batch_size: int = 64  # texts per micro-batch at most (CPU: in forwards of 16); 1 turns batching off
    batch_wait_ms: float = 2.0  # how long a batch's first query waits for company
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    snapshot_every: int = 1000  # writes between snapshots of the whole index (the log holds them meanwhile)
    allowed_hosts: list[str] = field(default_factory=list)  # more names the Host header may carry; '*': any
    receive_timeout: float = 10.0  # seconds a client has to send a whole request (headers and body)
    max_connections: int = 1000  # open connections and requests in flight at most; more get 503
    max_queued_texts: int = 4096  # texts waiting for the model at most; more get 429 with Retry-After
    log_format: str = "text"  # "json": one JSON access line per request on stderr
    graceful_shutdown_s: float = 10.0  # on SIGTERM/SIGINT, how long requests in flight may take to finish

    def __post_init__(self) -> None:
        """One line naming the setting when a limit is out of range (the CLI's --options share these names)."""
        for name in ("max_batch_size", "snapshot_every", "max_body_bytes", "max_connections", "max_queued_texts"):
            if getattr(self, name) < 1:
                raise TextclError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("batch_wait_ms", "graceful_shutdown_s"):
            if getattr(self, name) < 0:
                raise TextclError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.receive_timeout <= 0:
            raise TextclError(f"receive_timeout must be positive, got {self.receive_timeout}")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, opened before the model loads so a taken port fails at once and
    early clients wait in the backlog instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise TextclError(f"cannot listen on {host}:{port} ({error.strerror}); pick another --port") from error
    sock.listen(2048)
    return sock


def open_index(
    path: str | Path, corpus: str | Path | None, out: str | Path | None, device: str | torch.device | None,
    snapshot_every: int, backend: str | None = None, onnx_file: str | None = None,
) -> DurableIndex:
    """The index folder `path`; or, with `corpus`, a Flat index of it built with the model `path`, saved in `out`.
    `backend` None: the index's own (torch for a model)."""
    if corpus is None:
        if not Path(path, "meta.json").exists() and Path(path, "config.json").exists():
            raise TextclError(f"{str(path)!r} is a model, not an index: pass --corpus FILE to index a corpus with it")
        return DurableIndex.open(path, device=device, snapshot_every=snapshot_every, backend=backend,
                                 onnx_file=onnx_file)
    ids, texts = read_corpus(corpus)
    encoder = Encoder.load(path, device=device, backend=backend or "torch", onnx_file=onnx_file)
    model = Path(path).resolve() if Path(path).exists() else path
    print(f"textcl serve: indexing {len(texts)} documents of {corpus}", file=sys.stderr, flush=True)
    options = EncodeOptions(show_progress_bar=True)
    SearchIndex.build(encoder, texts, ids, model_path=model, encode_options=options).save(out)
    return DurableIndex.open(out, encoder=encoder, snapshot_every=snapshot_every)


def serve(
    path: str | Path, settings: ServeSettings, corpus: str | Path | None = None, out: str | Path | None = None,
    device: str | torch.device | None = None, api_key: str | None = None, backend: str | None = None,
    onnx_file: str | None = None,
) -> None:
    """Serve the index folder `path` (or `corpus` indexed with the model `path`, kept in `out`, default a
    temporary folder) on settings.host:settings.port until SIGINT/SIGTERM; writes need `api_key` if given.
    `backend`/`onnx_file`: run the model in torch or onnxruntime (default: as the index was built)."""
    sock = bind(settings.host, settings.port)
    scratch = tempfile.mkdtemp(prefix="textcl-serve-") if corpus is not None and out is None else None
    try:
        store = open_index(path, corpus, out or scratch, device, settings.snapshot_every, backend, onnx_file)
        service = SearchService(store, settings.max_batch_size, settings.batch_wait_ms, settings.max_queued_texts)
        app = create_app(service, api_key, settings.max_body_bytes,
                         allowed_host_names(settings.host, settings.allowed_hosts), log_format=settings.log_format)
        host, port = sock.getsockname()[:2]
        url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        print(f"textcl serve: {url} ({len(store.index.ids)} documents, {store.index.meta['model']}); "
              f"API docs at {url}/docs", flush=True)
        if scratch:
            print(f"textcl serve: the index and its writes live in {scratch} until the server stops "
                  "(--out DIR keeps them)", file=sys.stderr, flush=True)
        if settings.host not in LOOPBACK and api_key is None:
            print("textcl serve: warning: other machines can reach this server and nothing guards writes; "
                  "set --api-key-env", file=sys.stderr, flush=True)
        config = uvicorn.Config(app, access_log=False, log_level="warning",
                                timeout_graceful_shutdown=settings.graceful_shutdown_s,
                                http=deadline_protocol(settings.receive_timeout),
                                limit_concurrency=settings.max_connections, timeout_keep_alive=5)
        # On SIGTERM uvicorn stops accepting, lets the requests in flight finish (each write is on disk when
        # acknowledged), runs the shutdown that snapshots the index and closes its log, then raises the signal
        # again once it is done; this handler takes that second SIGTERM, so a drained server exits with 0.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
    finally:
        sock.close()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
