"""`textcl serve`: HTTP results equal `SearchIndex.search`, micro-batching, durable writes (SIGKILL), every bad input
as a 4xx JSON error, and the web page in a real headless Chromium.

Servers listen on 127.0.0.1 only (a free port), run a tiny random model, and stop at the end of each test.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import SENTENCES

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
import uvicorn

from textcl import Encoder
from textcl.cli import main
from textcl.errors import TextclError
from textcl.retrieval.search_index import SearchIndex
from textcl.serving.app import create_app
from textcl.serving.batcher import MicroBatcher
from textcl.serving.server import ServeSettings, bind
from textcl.serving.service import SearchService
from textcl.serving.store import LOG_NAME, SNAPSHOT_DIR, DurableIndex, read_log

QUERIES = ["someone plays an instrument", "animals in the snow", "financial news", "a book"]
IDS = [f"doc-{i}" for i in range(len(SENTENCES))]
KEY = "k3y-for-tests"
HOST = "127.0.0.1"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback traffic never goes to a proxy
XSS = '<script>window.__pwned = 1</script> The cat sits <img src=x onerror="window.__pwned = 2"> on the mat & rug'


# --- fixtures and helpers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a sentence-transformers folder (mean pooling, normalized)."""
    path = tmp_path_factory.mktemp("tiny-st")
    Encoder.load(tiny_model_dir, pooling="mean", normalize=True).save(path)
    return path


@pytest.fixture(scope="session")
def index_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Flat index of SENTENCES (ids doc-0 ...) and the XSS document (id xss); never written to."""
    path = tmp_path_factory.mktemp("index") / "index"
    SearchIndex.build(Encoder.load(model_dir), [*SENTENCES, XSS], [*IDS, "xss"]).save(path)
    return path


def fresh_copy(index_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(index_dir, tmp_path / "served"))


@contextmanager
def running(folder: Path, api_key: str | None = None, max_batch_size: int = 64, batch_wait_ms: float = 2.0,
            max_body_bytes: int = 1 << 20, snapshot_every: int = 1000) -> Iterator[tuple[str, SearchService]]:
    """A real uvicorn server over the index in `folder`, in a thread, on 127.0.0.1:<free port>."""
    service = SearchService(DurableIndex.open(folder, snapshot_every=snapshot_every), max_batch_size, batch_wait_ms)
    with server_thread(uvicorn.Config(create_app(service, api_key, max_body_bytes), log_level="warning")) as (url, _):
        yield url, service


@contextmanager
def server_thread(config: uvicorn.Config) -> Iterator[tuple[str, uvicorn.Server]]:
    """A uvicorn server of `config` running in a thread on 127.0.0.1:<free port>: (its URL, the server)."""
    server = uvicorn.Server(config)
    sock = bind(HOST, 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://{HOST}:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


def call(url: str, method: str = "GET", body: Any = None, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
    """(status, parsed JSON or text, headers) of one request; errors are answers, not exceptions."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={**({"content-type": "application/json"} if data else {}), **(headers or {})})
    try:
        with NO_PROXY.open(request, timeout=60) as response:
            status, payload, answer_headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, payload, answer_headers = error.code, error.read(), error.headers
    kind = answer_headers.get("content-type", "")
    return status, json.loads(payload) if "json" in kind else payload.decode(), dict(answer_headers)


def hits_of(results: list[dict]) -> list[list[tuple[str, float, str]]]:
    return [[(hit["id"], hit["score"], hit["text"]) for hit in result["hits"]] for result in results]


def assert_same_hits(answer: list[dict], expected, queries: list[str]) -> None:
    """The HTTP results equal `SearchIndex.search`'s `Hits`: same ids and texts in order, scores within 1e-5."""
    assert [result["query"] for result in answer] == queries
    for got, ids, scores, texts in zip(hits_of(answer), expected.ids, expected.scores, expected.texts):
        assert [hit[0] for hit in got] == [i for i in ids if i is not None]
        assert [hit[2] for hit in got] == [t for t in texts if t is not None]
        assert np.allclose([hit[1] for hit in got], scores[: len(got)], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def server(index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One server for the tests that only read (or whose writes must fail): API key set, 4 KB body limit."""
    folder = Path(shutil.copytree(index_dir, tmp_path_factory.mktemp("module") / "served"))
    with running(folder, api_key=KEY, max_body_bytes=4096) as (url, _):
        yield url


# --- the API ----------------------------------------------------------------------------------------------------

def test_search_over_http_equals_search_index(server: str, index_dir: Path) -> None:
    index = SearchIndex.load(index_dir)
    status, answer, _ = call(f"{server}/search", "POST", {"query": QUERIES, "k": 5})
    assert status == 200
    assert_same_hits(answer["results"], index.search(QUERIES, k=5), QUERIES)
    status, answer, _ = call(f"{server}/search", "POST", {"query": "a cat on a mat"})  # k defaults to 10
    assert status == 200 and len(answer["results"][0]["hits"]) == 10
    assert_same_hits(answer["results"], index.search("a cat on a mat"), ["a cat on a mat"])
    status, answer, _ = call(f"{server}/search", "POST", {"query": "everything", "k": 1000})  # k above the size
    assert status == 200 and len(answer["results"][0]["hits"]) == len(SENTENCES) + 1


def test_embed_equals_the_index_encodings(server: str, index_dir: Path) -> None:
    index = SearchIndex.load(index_dir)
    for kind, expected in [("query", index.encode(QUERIES, "query")), ("document", index.encode(QUERIES, "document"))]:
        status, answer, _ = call(f"{server}/embed", "POST", {"texts": QUERIES, "kind": kind})
        assert status == 200 and answer["dimension"] == 32
        assert np.allclose(answer["vectors"], expected, atol=1e-5)
    raw = NO_PROXY.open(urllib.request.Request(f"{server}/embed", json.dumps({"texts": QUERIES}).encode(),
                                               headers={"content-type": "application/json"}), timeout=60).read()
    vectors = raw.split(b'"dimension"')[0]  # {"vectors": [[...], ...], "dimension": 32}
    numbers = re.findall(rb"-?[\d.]+(?:e[-+]?\d+)?", vectors)
    digits = [len(number.split(b"e")[0].lstrip(b"-").replace(b".", b"").lstrip(b"0")) for number in numbers]
    assert len(numbers) == 32 * len(QUERIES) and max(digits) <= 9, "floats in float32's shortest form, not float64's"


def test_health_page_and_openapi(server: str, model_dir: Path) -> None:
    status, health, _ = call(f"{server}/health")
    assert status == 200
    assert health | {"mean_batch_size": 0} == {
        "status": "ok", "model": model_dir.name, "dimension": 32, "documents": len(SENTENCES) + 1,
        "index_type": "Flat", "metric": "cosine", "max_batch_size": 64, "mean_batch_size": 0, "writes_need_key": True}
    status, page, headers = call(f"{server}/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "the page loads nothing from elsewhere"
    assert "innerHTML" not in page, "texts go into the page as text, never as HTML"
    status, spec, _ = call(f"{server}/openapi.json")
    assert status == 200 and {"/search", "/embed", "/documents", "/documents/{doc_id}", "/health"} <= set(spec["paths"])
    assert set(spec["components"]["schemas"]) >= {"SearchRequest", "SearchResponse", "Document", "Health", "Error"}


def test_docs_work_offline(server: str) -> None:
    """/docs loads Swagger UI from the server itself (the swagger-ui-bundle package), nothing from a CDN."""
    status, page, _ = call(f"{server}/docs")
    assert status == 200 and "swagger" in page.lower()
    assert not re.search(r"https?://", page), "the docs page names no other server"
    assets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", page) + re.findall(r"""url:\s*'([^']+)'""", page)
    assert len(assets) >= 3
    for asset in assets:
        assert asset.startswith("/"), asset
        with NO_PROXY.open(f"{server}{asset}", timeout=60) as response:
            assert response.status == 200 and len(response.read()) > 100, asset


def bad_requests() -> list[tuple[str, dict[str, Any], int, str]]:
    """(name, call arguments, status, regex the detail matches)."""
    search = {"path": "/search", "method": "POST"}
    write = {"path": "/documents", "method": "POST", "headers": {"Authorization": f"Bearer {KEY}"}}
    return [
        ("empty query", {**search, "body": {"query": ""}}, 422, "query: must not be empty"),
        ("blank query", {**search, "body": {"query": " \n\t"}}, 422, "query: must not be empty"),
        ("blank query in a list", {**search, "body": {"query": ["fine", ""]}}, 422, "query: must not be empty"),
        ("no queries", {**search, "body": {"query": []}}, 422, "query: must hold 1 to 256 texts, got 0"),
        ("too many queries", {**search, "body": {"query": ["q"] * 257}}, 422, "must hold 1 to 256 texts, got 257"),
        ("missing query", {**search, "body": {"k": 3}}, 422, "query: Field required"),
        ("k zero", {**search, "body": {"query": "q", "k": 0}}, 422, "k: Input should be greater than or equal to 1"),
        ("k negative", {**search, "body": {"query": "q", "k": -4}}, 422, "k: Input should be greater than or equal to 1"),
        ("k over the cap", {**search, "body": {"query": "q", "k": 1001}}, 422, "k: .*less than or equal to 1000"),
        ("k as a string", {**search, "body": {"query": "q", "k": "5"}}, 422, "k: Input should be a valid integer"),
        ("k as a float", {**search, "body": {"query": "q", "k": 2.5}}, 422, "k: Input should be a valid integer"),
        ("query as a number", {**search, "body": {"query": 5}}, 422, "query: must be a string or a list of strings"),
        ("query list of numbers", {**search, "body": {"query": [1, 2]}}, 422, "must be a string or a list of strings"),
        ("misspelled field", {**search, "body": {"query": "q", "top_k": 3}}, 422, "top_k: Extra inputs are not permitted"),
        ("body not an object", {**search, "body": ["q"]}, 422, "body: Input should be a valid dictionary"),
        ("not JSON", {**search, "raw": b'{"query": "q",'}, 400, "the body is not valid JSON"),
        ("not UTF-8", {**search, "raw": b'{"query": "caf\xe9"}'}, 400, "the request body is not valid UTF-8"),
        ("lone surrogate", {**search, "raw": b'{"query": "\\ud800"}'}, 422, "not valid UTF-8 \\(it holds a lone surrogate"),
        ("body over the limit", {**search, "body": {"query": "q" * 5000}}, 413, "larger than 4096 bytes"),
        ("not sent as JSON", {**search, "raw": b'{"query": "q"}', "headers": {"content-type": "text/plain"}}, 415,
         "Content-Type: application/json"),
        ("embed kind", {"path": "/embed", "method": "POST", "body": {"texts": "q", "kind": "passage"}}, 422,
         "kind: Input should be 'query' or 'document'"),
        ("document without text", {**write, "body": [{"id": "n1"}]}, 422, r"0.text: Field required"),
        ("document id not a string", {**write, "body": [{"id": 7, "text": "t"}]}, 422, "0.id: Input should be a valid string"),
        ("empty document text", {**write, "body": [{"id": "n1", "text": ""}]}, 422, "0.text: must not be empty"),
        ("no documents", {**write, "body": []}, 422, "at least 1 item"),
        ("documents not a list", {**write, "body": {"id": "n1", "text": "t"}}, 422, "Input should be a valid list"),
        ("duplicate id", {**write, "body": [{"id": "doc-1", "text": "t"}]}, 409, "'doc-1' is indexed already"),
        ("id twice in a request", {**write, "body": [{"id": "n", "text": "a"}, {"id": "n", "text": "b"}]}, 409,
         "'n' appears twice in the request"),
        ("write without the key", {**write, "headers": {}, "body": [{"id": "n1", "text": "t"}]}, 401,
         "writes need an API key"),
        ("write with a wrong key", {**write, "headers": {"Authorization": "Bearer nope"}, "body": [{"id": "n", "text": "t"}]},
         403, "wrong API key"),
        ("write with another scheme", {**write, "headers": {"Authorization": f"Basic {KEY}"}, "body": [{"id": "n", "text": "t"}]},
         401, "writes need an API key"),
        ("delete without the key", {"path": "/documents/doc-1", "method": "DELETE"}, 401, "writes need an API key"),
        # the key is checked before the body is read: a client without it learns nothing from the body's parsing
        ("bad body without the key", {**write, "headers": {}, "raw": b'{"id":'}, 401, "writes need an API key"),
        ("big body without the key", {**write, "headers": {}, "body": [{"id": "n", "text": "t" * 5000}]}, 401,
         "writes need an API key"),
        ("bad body with a wrong key", {**write, "headers": {"Authorization": "Bearer nope"}, "raw": b"[{"}, 403,
         "wrong API key"),
        # control characters in ids are refused: DELETE /documents/{id} could never match a newline
        ("id with a newline", {**write, "body": [{"id": "line1\nline2", "text": "t"}]}, 422,
         r"0.id: must not hold control characters \(it holds U\+000A\)"),
        ("id with a NUL", {**write, "body": [{"id": "a\u0000b", "text": "t"}]}, 422, "U\\+0000"),
        ("delete an unknown id", {"path": "/documents/no-such-doc", "method": "DELETE", "headers": write["headers"]}, 404,
         "no document has the id 'no-such-doc'"),
        ("unknown path", {"path": "/nowhere"}, 404, "Not Found"),
        ("wrong method", {"path": "/search"}, 405, "Method Not Allowed"),
    ]


@pytest.mark.parametrize("case", bad_requests(), ids=lambda case: case[0])
def test_bad_input_is_a_clear_4xx_json_error(server: str, case: tuple) -> None:
    _, arguments, expected_status, message = case
    arguments = dict(arguments)
    status, answer, headers = call(f"{server}{arguments.pop('path')}", **arguments)
    assert status == expected_status, answer
    assert headers["content-type"] == "application/json" and isinstance(answer["detail"], str), answer
    assert re.search(message, answer["detail"]), answer["detail"]
    if status == 401:
        assert headers["www-authenticate"] == "Bearer"
    assert call(f"{server}/health")[1]["documents"] == len(SENTENCES) + 1, "the server is alive and unchanged"


def test_a_body_over_the_limit_sent_in_chunks_is_a_413(server: str) -> None:
    """Without Content-Length the limit counts the bytes as they arrive."""
    connection = http.client.HTTPConnection(HOST, int(server.rsplit(":", 1)[1]), timeout=30)
    chunks = iter([b'{"query": "', b"q" * 3000, b"q" * 3000, b'"}'])
    connection.request("POST", "/search", body=chunks, headers={"content-type": "application/json"},
                       encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "larger than 4096 bytes" in json.loads(response.read())["detail"]
    connection.close()


# --- concurrency ------------------------------------------------------------------------------------------------

def test_concurrent_queries_share_forwards_and_equal_one_at_a_time(index_dir: Path, tmp_path: Path) -> None:
    index = SearchIndex.load(index_dir)
    queries = [f"{QUERIES[i % 4]} {i}" for i in range(16)]
    expected = {query: index.search(query, k=3) for query in queries}
    for max_batch_size, batch_wait_ms in [(64, 300.0), (1, 0.0)]:
        with running(fresh_copy(index_dir, tmp_path / str(max_batch_size)), max_batch_size=max_batch_size,
                     batch_wait_ms=batch_wait_ms) as (url, service):
            start = threading.Barrier(len(queries))

            def ask(query: str, start: threading.Barrier = start, url: str = url) -> tuple[str, Any]:
                start.wait(10)
                return query, call(f"{url}/search", "POST", {"query": query, "k": 3})

            with ThreadPoolExecutor(len(queries)) as pool:
                answers = list(pool.map(ask, queries))
            for query, (status, answer, _) in answers:
                assert status == 200
                assert_same_hits(answer["results"], expected[query], [query])
            mean = call(f"{url}/health")[1]["mean_batch_size"]
            if max_batch_size == 1:
                assert mean == 1.0 and service.batcher.batches == len(queries)
            else:  # a 300 ms window gathers requests sent together: far fewer forwards than queries
                assert mean >= 4 and service.batcher.batches <= len(queries) // 4, service.batcher.batches


def test_the_encoder_never_blocks_the_event_loop(index_dir: Path, tmp_path: Path) -> None:
    """While a forward takes 3 s, /health still answers at once (a blocked loop would answer after ~2.7 s)."""
    with running(fresh_copy(index_dir, tmp_path)) as (url, service):
        slow = service.index.require_encoder().model.register_forward_hook(lambda *_: time.sleep(3))
        with ThreadPoolExecutor(1) as pool:
            searching = pool.submit(call, f"{url}/search", "POST", {"query": "slow"})
            time.sleep(0.3)
            assert not searching.done()
            start = time.perf_counter()
            assert call(f"{url}/health")[0] == 200
            assert time.perf_counter() - start < 1.5
            assert searching.result(timeout=30)[0] == 200
        slow.remove()


def test_the_micro_batcher_groups_jobs_caps_batches_and_passes_errors_on() -> None:
    """Jobs queued together run together, up to max_batch_size texts; a job over the cap runs alone; an error in a
    batch reaches its requests and the worker goes on."""
    calls: list[list[int]] = []

    def run_batch(payloads: list[int]) -> list[int]:
        calls.append(payloads)
        if -1 in payloads:
            raise ValueError("bad batch")
        return [2 * payload for payload in payloads]

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as executor:
            batcher = MicroBatcher(run_batch, executor, max_batch_size=4, max_wait=0.05)
            batcher.start()
            results = await asyncio.gather(*(batcher.submit(n, 1) for n in range(10)), batcher.submit(10, 6))
            assert results == [2 * n for n in range(11)]
            assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9], [10]]
            with pytest.raises(ValueError, match="bad batch"):
                await batcher.submit(-1, 1)
            assert await batcher.submit(21, 1) == 42
            await batcher.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))


# --- writes -----------------------------------------------------------------------------------------------------

def test_writes_need_the_key_and_are_on_disk_when_they_return(index_dir: Path, tmp_path: Path) -> None:
    folder = fresh_copy(index_dir, tmp_path)
    key = {"Authorization": f"Bearer {KEY}"}
    new = [{"id": "new-0", "text": "A violinist performs on stage tonight."}, {"id": "a/b c", "text": "Slashes too."}]
    with running(folder, api_key=KEY) as (url, _):
        status, answer, _ = call(f"{url}/documents", "POST", new, headers=key)
        assert (status, answer) == (201, {"added": 2, "documents": len(SENTENCES) + 3})
        assert [record["ids"] for record in read_log(folder / LOG_NAME)[0][1:]] == [["new-0", "a/b c"]]
        status, answer, _ = call(f"{url}/search", "POST", {"query": new[0]["text"], "k": 1})  # reads need no key
        assert status == 200 and answer["results"][0]["hits"][0]["id"] == "new-0"
        assert answer["results"][0]["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
        for doc_id in ("doc-3", "a%2Fb%20c"):
            status, answer, _ = call(f"{url}/documents/{doc_id}", "DELETE", headers=key)
            assert status == 200, answer
        assert answer == {"deleted": "a/b c", "documents": len(SENTENCES) + 1}
        assert len(read_log(folder / LOG_NAME)[0]) == 4, "each delete was logged before it returned"
        status, answer, _ = call(f"{url}/search", "POST", {"query": "anything", "k": 100})
        found = [hit["id"] for hit in answer["results"][0]["hits"]]
        assert "doc-3" not in found and "new-0" in found and len(found) == len(SENTENCES) + 1
        assert call(f"{url}/documents/doc-3", "DELETE", headers=key)[0] == 404
    # a clean stop snapshots: a plain SearchIndex.load sees the writes, and the log holds only its header
    saved = SearchIndex.load(folder)
    assert saved.ids.tolist() == [*IDS[:3], *IDS[4:], "xss", "new-0"]
    assert len(read_log(folder / LOG_NAME)[0]) == 1 and not (folder / SNAPSHOT_DIR).exists()
    assert np.allclose(saved.search(QUERIES).scores, DurableIndex.open(folder).index.search(QUERIES).scores)


def test_search_index_remove_equals_an_index_built_without_them(model_dir: Path) -> None:
    encoder = Encoder.load(model_dir)
    index = SearchIndex.build(encoder, SENTENCES, IDS)
    index.remove(["doc-0", "doc-5"])
    kept = [i for i in range(len(SENTENCES)) if i not in (0, 5)]
    expected = SearchIndex.build(encoder, [SENTENCES[i] for i in kept], [IDS[i] for i in kept])
    got, want = index.search(QUERIES, k=4), expected.search(QUERIES, k=4)
    assert got.ids.tolist() == want.ids.tolist() and np.allclose(got.scores, want.scores, atol=1e-6)
    with pytest.raises(TextclError, match="no document has the id 'doc-0'"):
        index.remove(["doc-0"])
    hnsw = SearchIndex.build(encoder, SENTENCES, IDS, factory="HNSW8")
    with pytest.raises(TextclError, match="a HNSW8 index cannot remove documents"):
        hnsw.remove(["doc-1"])


def store_with_writes(index_dir: Path, tmp_path: Path, snapshot_every: int = 1000) -> tuple[Path, DurableIndex]:
    folder = fresh_copy(index_dir, tmp_path)
    store = DurableIndex.open(folder, snapshot_every=snapshot_every)
    for n in range(3):
        texts = [f"added document number {n}"]
        vectors = store.index.encode(texts, "document")
        store.add([f"added-{n}"], texts, vectors)
    store.remove("doc-2")
    release_lock(store)  # as after a crash, which releases the server lock; the tests below open the folder again
    return folder, store


def release_lock(store: DurableIndex) -> None:
    if store.lock is not None:
        os.close(store.lock)
        store.lock = None


def served_ids(folder: Path) -> list[str]:
    store = DurableIndex.open(folder)
    release_lock(store)
    return store.index.ids.tolist()


EXPECTED_AFTER_WRITES = [*IDS[:2], *IDS[3:], "xss", "added-0", "added-1", "added-2"]


def test_a_torn_last_log_line_is_cut_and_the_rest_replayed(index_dir: Path, tmp_path: Path) -> None:
    folder, _ = store_with_writes(index_dir, tmp_path)  # never closed: as after a crash
    with (folder / LOG_NAME).open("ab") as log:
        log.write(b'{"seq": 5, "op": "add", "ids": ["half-writ')
    store = DurableIndex.open(folder)
    assert store.index.ids.tolist() == EXPECTED_AFTER_WRITES and store.seq == 4
    assert (folder / LOG_NAME).read_bytes().endswith(b"\n"), "the torn line is gone"
    store.remove("added-0")
    release_lock(store)
    assert served_ids(folder) == [key for key in EXPECTED_AFTER_WRITES if key != "added-0"]


def test_a_damaged_log_line_before_the_last_is_an_error(index_dir: Path, tmp_path: Path) -> None:
    folder, _ = store_with_writes(index_dir, tmp_path)
    lines = (folder / LOG_NAME).read_bytes().split(b"\n")
    lines[2] = lines[2][:40]
    (folder / LOG_NAME).write_bytes(b"\n".join(lines))
    with pytest.raises(TextclError, match=rf"{LOG_NAME}:3: not a log record; the write log is damaged"):
        DurableIndex.open(folder)


def test_a_snapshot_interrupted_while_its_files_move_is_finished(index_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    folder, store = store_with_writes(index_dir, tmp_path)
    moved = []

    def crash_after_one(source: Any, target: Any) -> None:  # the process dies after moving one file into place
        if Path(target).parent == folder:
            if moved:
                raise SystemExit("killed")
            moved.append(target)
        real_replace(source, target)

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", crash_after_one)
    with pytest.raises(SystemExit):
        store.snapshot()
    monkeypatch.setattr(os, "replace", real_replace)
    assert (folder / SNAPSHOT_DIR / "COMPLETE").exists() and len(moved) == 1
    assert served_ids(folder) == EXPECTED_AFTER_WRITES
    assert not (folder / SNAPSHOT_DIR).exists()


def test_a_snapshot_interrupted_while_written_is_dropped(index_dir: Path, tmp_path: Path) -> None:
    folder, _ = store_with_writes(index_dir, tmp_path)
    (folder / SNAPSHOT_DIR).mkdir()
    (folder / SNAPSHOT_DIR / "index.faiss").write_bytes(b"half a file")  # no COMPLETE marker
    assert served_ids(folder) == EXPECTED_AFTER_WRITES
    assert not (folder / SNAPSHOT_DIR).exists()


def test_what_a_save_killed_before_its_rename_leaves_goes_at_the_next_start(index_dir: Path, tmp_path: Path) -> None:
    """A SIGKILL inside `SearchIndex.save` leaves its temporary folder (a whole copy of the index) and its lock;
    the next server removes both, so kills do not pile up copies."""
    folder, _ = store_with_writes(index_dir, tmp_path)
    stray = folder / f".{SNAPSHOT_DIR}.tmp-0123abcd"
    shutil.copytree(index_dir, stray)
    (folder / f".{SNAPSHOT_DIR}.lock").write_text("999999999")
    assert served_ids(folder) == EXPECTED_AFTER_WRITES
    assert not stray.exists() and not (folder / f".{SNAPSHOT_DIR}.lock").exists()


def test_a_crash_between_snapshot_and_log_restart_replays_nothing_twice(index_dir: Path, tmp_path: Path) -> None:
    folder, store = store_with_writes(index_dir, tmp_path)
    old_log = (folder / LOG_NAME).read_bytes()
    store.snapshot()
    (folder / LOG_NAME).write_bytes(old_log)  # as if the process died before the log restarted
    assert served_ids(folder) == EXPECTED_AFTER_WRITES


def test_a_log_beside_a_rebuilt_index_is_refused(index_dir: Path, tmp_path: Path, model_dir: Path) -> None:
    folder, _ = store_with_writes(index_dir, tmp_path)
    SearchIndex.build(Encoder.load(model_dir), SENTENCES[:5]).save(folder, overwrite=True)  # rebuilt while writes were unsaved
    with pytest.raises(TextclError, match="holds writes to another version of this index"):
        DurableIndex.open(folder)


# --- the command ------------------------------------------------------------------------------------------------

def bad_starts(tmp: Path, index_dir: Path, model_dir: Path) -> list[tuple[list[str], str]]:
    (tmp / "empty").mkdir()
    broken = Path(shutil.copytree(index_dir, tmp / "broken"))
    (broken / "meta.json").write_text("{not json")
    damaged = Path(shutil.copytree(index_dir, tmp / "damaged"))
    (damaged / LOG_NAME).write_text('{"op": "begin", "meta_sha256": "x"}\ngarbage\n{"seq": 1}\n')
    return [
        ([str(tmp / "missing")], r"not a search index folder \(missing index.faiss, ids.jsonl, meta.json\)"),
        ([str(tmp / "empty")], "not a search index folder"),
        ([str(broken)], r"meta.json is not JSON .*; rebuild the index with `textcl index`"),
        ([str(damaged)], "not a log record; the write log is damaged"),
        ([str(model_dir)], "is a model, not an index: pass --corpus FILE"),
        ([str(model_dir), "--corpus", str(tmp / "nothing.txt")], "does not exist"),
        ([str(index_dir), "--api-key-env", "TEXTCL_TEST_UNSET_VARIABLE"], "that environment variable is not set"),
        ([str(index_dir), "--max_batch_size", "0"], "max_batch_size must be at least 1, got 0"),
    ]


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_batch_size": 0}, "max_batch_size must be at least 1, got 0"),
    ({"snapshot_every": -1}, "snapshot_every must be at least 1"),
    ({"max_body_bytes": 0}, "max_body_bytes must be at least 1"),
    ({"batch_wait_ms": -0.5}, "batch_wait_ms must not be negative"),
    ({"max_connections": 0}, "max_connections must be at least 1"),
    ({"receive_timeout": 0}, "receive_timeout must be positive"),
])
def test_serve_settings_check_their_own_limits(settings: dict, message: str) -> None:
    """The limits are the library's rule (a Python caller gets the same one line as the CLI)."""
    with pytest.raises(TextclError, match=message):
        ServeSettings(**settings)


@pytest.mark.parametrize("case", range(8))
def test_a_bad_start_is_one_line_and_exit_code_2(index_dir: Path, model_dir: Path, tmp_path: Path, case: int,
                                                 capsys: pytest.CaptureFixture) -> None:
    args, message = bad_starts(tmp_path, index_dir, model_dir)[case]
    assert main(["serve", *args, "--port", "0", "--device", "cpu"]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("textcl: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert re.search(message, errors[0]), errors[0]


def test_a_taken_port_is_one_line_and_exit_code_2(index_dir: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        assert main(["serve", str(index_dir), "--port", str(taken.getsockname()[1])]) == 2
    assert re.search(r"textcl: error: cannot listen on 127.0.0.1:\d+ .*pick another --port", capsys.readouterr().err)


# --- a real process, killed -------------------------------------------------------------------------------------

def start_process(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """`textcl serve ARGS --port 0` in a new process; returns it and its URL once it listens."""
    command = [sys.executable, "-m", "textcl", "serve", *args, "--host", HOST, "--port", "0", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if match := re.search(rf"http://{HOST}:\d+", line):
            return process, match.group(0)
        if process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"the server did not start: {log.read_text()}")


def stream_writes(url: str, prefix: str, deletable: list[str], stop: threading.Event, added: set[str],
                  deleted: set[str], tried: set[str]) -> None:
    """Add (and delete) documents from 4 clients until `stop` or the server dies, recording the acknowledged
    ids in `added` and `deleted` as the answers come, and in `tried` every id whose delete was sent (a delete
    the kill cut off may or may not have happened)."""
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            ids = [f"{prefix}-{n}-{i}-{j}" for j in range(1 + i % 3)]
            body = [{"id": key, "text": f"streamed document {key} about topic {i % 7}"} for key in ids]
            try:
                if call(f"{url}/documents", "POST", body)[0] == 201:
                    with lock:
                        added.update(ids)
                if deletable and n == 0 and i % 2:
                    key = deletable.pop()
                    with lock:
                        tried.add(key)
                    if call(f"{url}/documents/{key}", "DELETE")[0] == 200:
                        with lock:
                            deleted.add(key)
            except (OSError, http.client.HTTPException):  # the server was killed mid-request: not acknowledged
                return

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


@pytest.mark.slow
def test_sigkill_during_a_stream_of_writes_loses_nothing(model_dir: Path, tmp_path: Path) -> None:
    """Two servers (the first builds its index from a corpus) are killed with SIGKILL while 4 clients add and
    delete documents; snapshots every 3 writes put some kills inside a snapshot. Every acknowledged add is in
    the index that loads afterwards, and every acknowledged delete is gone."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(SENTENCES) + "\n")
    folder = tmp_path / "index"
    rng = np.random.default_rng(0)
    all_added: set[str] = set()
    all_deleted: set[str] = set()
    all_tried: set[str] = set()  # deletes sent: those not acknowledged may be gone or not
    expected_count = len(SENTENCES)
    for round_ in range(2):
        source = [str(model_dir), "--corpus", str(corpus), "--out", str(folder)] if round_ == 0 else [str(folder)]
        process, url = start_process([*source, "--snapshot_every", "3"], tmp_path / f"server{round_}.log")
        stop = threading.Event()
        added: set[str] = set()
        deleted: set[str] = set()
        tried: set[str] = set()
        deletable = sorted(all_added - all_tried) or [str(n) for n in range(1, len(SENTENCES) + 1)]
        writer = threading.Thread(target=stream_writes, args=(url, f"r{round_}", deletable, stop, added, deleted,
                                                                 tried))
        try:
            assert call(f"{url}/health")[1]["documents"] == expected_count, "the server replays as DurableIndex.open"
            writer.start()
            deadline = time.monotonic() + 60
            while len(added) < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0, 1.0))  # then a moment that differs from round to round
            os.kill(process.pid, signal.SIGKILL)
            process.wait(30)
        finally:
            stop.set()
            process.kill()
        writer.join(60)
        assert not writer.is_alive() and len(added) >= 10, f"{len(added)} documents acknowledged before the kill"
        all_added |= added
        all_deleted |= deleted
        all_tried |= tried
        ids = served_ids(folder)  # then the lock is free for the next round's server
        assert len(ids) == len(set(ids))
        assert all_added - all_tried <= set(ids), "an acknowledged add was lost"
        assert not all_deleted & set(ids), "an acknowledged delete came back"
        expected_count = len(ids)


# --- the web page in a real browser -----------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,900"]


def chromium(tmp_path: Path) -> Any:
    """Debian's Chromium driven by Selenium (its own browser download does not work here); skips with the reason
    where it is missing, except under CI, which installs it (.ci/run) and must run this test."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ModuleNotFoundError:
        missing.append("the selenium package (test extra)")
    if missing:
        reason = f"no headless browser: {', '.join(missing)} missing (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test; {reason}")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


@pytest.mark.slow
def test_the_page_in_a_real_browser(index_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    """Type a query in headless Chromium: ranked results with scores, ids and highlighted query terms, the call's
    latency and the health line; a document holding <script> and an onerror handler shows as text and runs
    nothing. The screenshot is saved under the test's tmp dir."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium(tmp_path)
    try:
        with running(fresh_copy(index_dir, tmp_path)) as (url, _):
            browser.set_page_load_timeout(30)
            browser.get(f"{url}/")
            wait = WebDriverWait(browser, 20)
            wait.until(lambda b: "documents" in b.find_element(By.ID, "health").text)
            assert browser.find_element(By.ID, "health").text == (
                f"{model_dir.name} · 32 dimensions · {len(SENTENCES) + 1} documents · "
                "Flat index (cosine)")
            k = browser.find_element(By.ID, "k")
            k.clear()
            k.send_keys("13")
            query = "the cat sit on a mat window"
            browser.find_element(By.ID, "query").send_keys(query, Keys.ENTER)
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .hit")) == len(SENTENCES) + 1)
            expected = call(f"{url}/search", "POST", {"query": query, "k": 13})[1]["results"][0]["hits"]
            rows = browser.find_elements(By.CSS_SELECTOR, "#results .hit")
            for rank, (row, hit) in enumerate(zip(rows, expected), start=1):
                assert row.find_element(By.CLASS_NAME, "rank").text == str(rank)
                assert row.find_element(By.CLASS_NAME, "id").text == hit["id"]
                assert row.find_element(By.CLASS_NAME, "score").text == f"{hit['score']:.4f}"
                assert row.find_element(By.CLASS_NAME, "text").text == hit["text"]
            xss = next(row for row, hit in zip(rows, expected) if hit["id"] == "xss")
            marked = [mark.text for mark in xss.find_elements(By.TAG_NAME, "mark")]
            # the query's words but "the", "on" and "a"; words under 4 letters whole ("sit" leaves "sits"), longer
            # ones also as prefixes ("window" in "window.__pwned"), inside the markup shown as text too
            assert marked == ["window", "cat", "window", "mat"], marked
            assert browser.execute_script("return window.__pwned") is None, "a document's markup ran"
            assert not browser.find_elements(By.CSS_SELECTOR, "#results script, #results img")
            assert re.fullmatch(r"13 results in \d+ ms", browser.find_element(By.ID, "status").text)
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", xss)
            browser.save_screenshot(str(tmp_path / "page.png"))
            assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        browser.quit()
