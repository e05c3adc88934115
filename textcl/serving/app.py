"""The HTTP API of `textcl serve` (FastAPI): search, embed, add, delete, health, and the web page.

Every error is JSON `{"detail": "one line"}` with a 4xx status that says whose fault it is: 422 for a body
that parses but breaks the schema (empty query, k out of range, wrong type), 400 for one that does not
parse (not JSON, not UTF-8), 415 for a body not sent as JSON, 413 over the size limit, 401/403 for a
missing/wrong API key on a write (checked before the body is read), 404 for an unknown id, 409 for a duplicate
id, 400 for a Host header that does not name this server, 429 with Retry-After when the queue is full, and 507
(503) when the write log could not be written (a full disk): that write was not applied. Under /v1 (the OpenAI
embeddings API, openai_api.py) errors take OpenAI's shape instead. OpenAPI docs are at /docs, served with the
Swagger UI files of the swagger-ui-bundle package, so they work offline; Prometheus metrics at /metrics
(metrics.py).
"""

# No `from __future__ import annotations` here: FastAPI reads the annotations of the routes defined inside
# search_router, and a string annotation could not see the local `bearer` they depend on.
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path as FilePath
from typing import Annotated, Any

import numpy as np

from textcl.errors import TextclError

try:
    from fastapi import APIRouter, Depends, FastAPI, Path, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from starlette.datastructures import Headers
    from starlette.exceptions import HTTPException
    from starlette.staticfiles import StaticFiles
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
    from swagger_ui_bundle import swagger_ui_path
except ModuleNotFoundError as missing:
    raise TextclError(f"textcl serve needs {missing.name}: pip install \"textcl[serve]\"") from missing

from textcl.retrieval.index_folder import model_location
from textcl.retrieval.search_index import Hits
from textcl.serving.guards import HostCheck, KeyCheck
from textcl.serving.metrics import RequestObserver, ServerMetrics, access_logger
from textcl.serving.openai_api import is_openai, openai_error, openai_router
from textcl.serving.schemas import (
    AddResponse,
    DeleteResponse,
    Documents,
    EmbedRequest,
    EmbedResponse,
    Error,
    Health,
    SearchRequest,
    SearchResponse,
    dump_json,
)
from textcl.serving.service import SearchService, ServerBusyError
from textcl.serving.store import DuplicateIdError, LogWriteError, NotRemovableError, OutOfSpaceError, UnknownIdError
from textcl.version import __version__

PAGE = files("textcl.serving").joinpath("page.html").read_text(encoding="utf-8")
STATUS_OF = {DuplicateIdError: 409, NotRemovableError: 409, UnknownIdError: 404, OutOfSpaceError: 507,
             LogWriteError: 503}
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Error} for code in (400, 413, 415, 422, 429)}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, **{code: {"model": Error} for code in (401, 403, 503, 507)}}
ASSETS = "/docs-assets"


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a JSON 413. Starlette's own limit (FastAPI's
    `max_body_size`) answers in plain text when Content-Length is over, and every error here is JSON."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self.too_large(scope["path"])(scope, receive, send)
        received = 0

        async def limited() -> Message:  # a body sent in chunks, without Content-Length
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413)  # FastAPI passes an HTTPException raised while reading the body on
            return message

        await self.app(scope, limited, send)

    def too_large(self, path: str) -> JSONResponse:
        return error(413, f"the request body is larger than {self.max_bytes} bytes", path=path)


def hit_records(hits: Hits, row: int) -> list[dict[str, Any]]:
    """The hits of query `row`; a hybrid or BM25 search adds each side's score (None: not returned by it)."""
    parts = [] if hits.lexical_scores is None else [("dense_score", hits.dense_scores), ("bm25_score", hits.lexical_scores)]
    records = []
    for column, key in enumerate(hits.ids[row]):
        if key is not None:
            record = {"id": key, "score": float(hits.scores[row, column]), "text": hits.texts[row, column]}
            for name, values in parts:
                value = float(values[row, column])
                record[name] = None if math.isnan(value) else value
            records.append(record)
    return records


def error(status: int, detail: str, headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    """`{"detail": detail}`, or OpenAI's error shape under /v1."""
    if is_openai(path):
        return openai_error(status, detail, headers)
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def describe_validation(exc: RequestValidationError) -> str:
    """Pydantic's errors as one line: `k: Input should be greater than or equal to 1; ...`."""
    parts = []
    for item in exc.errors():
        if item.get("type") == "json_invalid":
            return f"the body is not valid JSON: {item.get('ctx', {}).get('error', 'decode error')}"
        loc = item.get("loc", ())
        where = ".".join(str(part) for part in (loc[1:] if loc[:1] == ("body",) and len(loc) > 1 else loc))
        message = str(item.get("msg")).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def public_model_name(model: str, root: FilePath) -> str:
    """The model as /health shows it: a local folder by its name only (its absolute path is nobody's business),
    a Hub id as is."""
    local = FilePath(model_location(model, root))
    return local.name if local.exists() else model


def add_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    """Every error as one JSON line (`error`): invalid bodies, HTTP errors, TextclError, a full queue (429)."""

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.method in ("POST", "PUT") and "json" not in request.headers.get("content-type", ""):
            return error(415, "send the body as JSON, with the header Content-Type: application/json",
                         path=request.url.path)
        invalid_json = any(item.get("type") == "json_invalid" for item in exc.errors())
        return error(400 if invalid_json else 422, describe_validation(exc), path=request.url.path)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 413:
            detail = f"the request body is larger than {max_body_bytes} bytes"
        elif isinstance(exc.__cause__, UnicodeDecodeError):
            detail = f"the request body is not valid UTF-8 ({exc.__cause__.reason} at byte {exc.__cause__.start})"
        return error(exc.status_code, detail, exc.headers, request.url.path)

    @app.exception_handler(TextclError)
    async def on_textcl_error(request: Request, exc: TextclError) -> JSONResponse:
        return error(STATUS_OF.get(type(exc), 400), str(exc), path=request.url.path)

    @app.exception_handler(ServerBusyError)
    async def on_busy(request: Request, exc: ServerBusyError) -> JSONResponse:
        return error(429, str(exc), {"Retry-After": str(exc.retry_after)}, request.url.path)


def search_router(service: SearchService, api_key: str | None) -> APIRouter:
    """The index's routes: /health, /search, /embed, and the writes (/documents), which declare the bearer key in
    the OpenAPI schema when `api_key` is set."""
    router = APIRouter()
    bearer = HTTPBearer(auto_error=False, description="the key in the variable named by --api-key-env")

    def require_key(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        """Declares the key in the OpenAPI schema; `KeyCheck` checked it before the body was read."""

    @router.get("/health")
    async def health() -> Health:
        index, batcher = service.index, service.batcher
        return Health(
            model=public_model_name(index.meta["model"], service.store.root), dimension=index.meta["dim"],
            documents=len(index.ids),
            index_type=index.meta["factory"], metric=index.meta["metric"], max_batch_size=batcher.max_batch_size,
            mean_batch_size=batcher.batched_texts / max(batcher.batches, 1), writes_need_key=api_key is not None,
        )

    @router.post("/search", response_model=SearchResponse, responses=ERRORS)
    async def search(request: SearchRequest) -> Response:
        """Top-k documents of each query, best first."""
        queries = request.query
        hits = await service.search(queries, request.k, request.mode)  # BM25 on an index without it: a 400
        results = [{"query": query, "hits": hit_records(hits, row)} for row, query in enumerate(queries)]
        body = SearchResponse.model_validate({"results": results})
        return Response(body.model_dump_json(exclude_unset=True), media_type="application/json")

    @router.post("/embed", response_model=EmbedResponse, responses=ERRORS)
    async def embed(request: EmbedRequest) -> Response:
        """Embeddings `[n_texts, dimension]` with the index's query or document settings."""
        vectors = await service.embed(request.texts, request.kind)
        return Response(dump_json({"vectors": np.ascontiguousarray(vectors, dtype=np.float32),
                                   "dimension": vectors.shape[1]}), media_type="application/json")

    @router.post("/documents", status_code=201, responses={**WRITE_ERRORS, 409: {"model": Error}},
                 dependencies=[Depends(require_key)])
    async def add_documents(documents: Documents) -> AddResponse:
        """Add documents; they are on disk when this returns. An id already indexed is a 409."""
        count = await service.add([doc.id for doc in documents], [doc.text for doc in documents])
        return AddResponse(added=len(documents), documents=count)

    @router.delete("/documents/{doc_id:path}", responses={**WRITE_ERRORS, 404: {"model": Error}, 409: {"model": Error}},
                   dependencies=[Depends(require_key)])
    async def delete_document(doc_id: Annotated[str, Path(description="the document's id")]) -> DeleteResponse:
        """Remove one document; the removal is on disk when this returns."""
        count = await service.delete(doc_id)
        return DeleteResponse(deleted=doc_id, documents=count)

    return router


def create_app(service: SearchService, api_key: str | None = None, max_body_bytes: int = 1 << 20,
               allowed_hosts: set[str] | None = None, log_format: str = "text") -> FastAPI:
    """The FastAPI app over `service`; writes need `Authorization: Bearer <api_key>` when a key is given; with
    `allowed_hosts` (see `textcl.serving.guards`), other Host headers are refused; `log_format` "json" writes an
    access line per request on stderr."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        await service.stop()

    app = FastAPI(
        title="textcl search", version=__version__, lifespan=lifespan,
        description="Semantic search over a textcl index. Writes need `Authorization: Bearer KEY` when the "
        "server was started with --api-key-env.", docs_url=None, redoc_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(KeyCheck, api_key=api_key)  # added after BodyLimit: runs before it
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)
    metrics = ServerMetrics()
    metrics.watch(service)
    service.batcher.on_batch = metrics.batch_texts.observe
    app.add_middleware(RequestObserver, metrics=metrics, logger=access_logger(log_format))  # outermost: sees all
    app.mount(ASSETS, StaticFiles(directory=swagger_ui_path), name="docs-assets")
    app.include_router(openai_router(service, public_model_name(service.index.meta["model"], service.store.root)))
    app.include_router(metrics.router())
    app.include_router(search_router(service, api_key))
    add_error_handlers(app, max_body_bytes)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - docs",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon-32x32.png")

    return app
