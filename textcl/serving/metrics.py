"""`/metrics` in Prometheus' text format (prometheus-client), and access log lines (`--log-format json`).

One `RequestObserver` middleware times every request: it counts it in `textcl_requests_total{method, route,
status}`, observes its latency in `textcl_request_seconds{route}`, and writes its access log line. `route` is
the route's template (`/documents/{doc_id}`), so ids never become labels; requests no route matched are
`route="unmatched"`. Live values (queue depth, index size) are read when Prometheus scrapes. Each app has
its own registry, so several servers in one process (tests) do not share counters.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from textcl.errors import TextclError
from textcl.serving.service import SearchService

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
except ModuleNotFoundError as missing:
    raise TextclError(f"textcl serve needs {missing.name}: pip install \"textcl[serve]\"") from missing

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ACCESS_LOGGER = "textcl.serve.access"


class ServerMetrics:
    """The server's collectors in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("textcl_requests", "HTTP requests answered", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("textcl_request_seconds", "time from request to the end of the answer",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_texts = Histogram("textcl_batch_texts", "texts per encoder batch (micro-batching)",
                                     buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("textcl_queue_texts", "texts waiting for the model thread", registry=self.registry)
        self.index_size = Gauge("textcl_index_documents", "documents in the index", registry=self.registry)

    def watch(self, service: SearchService) -> None:
        """Read the queue depth and index size from `service` at each scrape."""
        self.queue_depth.set_function(lambda: service.queued)
        self.index_size.set_function(lambda: len(service.index.ids))

    def router(self) -> APIRouter:
        router = APIRouter()

        @router.get("/metrics", include_in_schema=False)
        async def metrics() -> Response:
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return router


class JsonLines(logging.Formatter):
    """A log record as one JSON object a line: time, level, message and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "message": record.getMessage()}
        return json.dumps({**line, **getattr(record, "fields", {})}, ensure_ascii=False)


def access_logger(log_format: str) -> logging.Logger | None:
    """The access logger for `--log-format`: JSON lines on stderr for "json"; None (no access lines) for "text"."""
    if log_format != "json":
        return None
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class RequestObserver:
    """ASGI middleware: metrics of every HTTP request, and its access line when `logger` is given."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, logger: logging.Logger | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.logger = logger

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        answer: dict[str, Any] = {"status": 500, "bytes": 0}

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body":
                answer["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            self.observe(scope, answer, time.perf_counter() - start)

    def observe(self, scope: Scope, answer: dict[str, Any], seconds: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(scope["method"], route, str(answer["status"])).inc()
        self.metrics.latency.labels(route).observe(seconds)
        if self.logger is not None:
            client = scope.get("client")
            self.logger.info("request", extra={"fields": {
                "method": scope["method"], "path": scope["path"], "route": route, "status": answer["status"],
                "duration_ms": round(1000 * seconds, 3), "response_bytes": answer["bytes"],
                "client": f"{client[0]}:{client[1]}" if client else None}})
