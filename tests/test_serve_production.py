"""`textcl serve` in production: the OpenAI embeddings API through the official `openai` client, request bounds
(413/422 at once), backpressure (429 with Retry-After), /metrics read by prometheus_client's own parser, and
SIGTERM (requests in flight finish, acknowledged writes survive, exit code 0, JSON access lines).

Servers listen on 127.0.0.1 only (a free port) and run the tiny random model of test_serve.py.
"""

from __future__ import annotations

import base64
import http.client
import json
import resource
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the test extra (openai) is not installed")
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from test_serve import (  # noqa: F401 -- fixtures
    HOST, QUERIES, call, fresh_copy, index_dir, model_dir, server_thread, start_process, stream_writes,
)

from textcl.retrieval.search_index import SearchIndex
from textcl.serving.app import create_app
from textcl.serving.service import SearchService
from textcl.serving.store import LOG_NAME, DurableIndex, read_log


@contextmanager
def serving(folder: Path, max_queued_texts: int = 4096, max_body_bytes: int = 1 << 20,
            ) -> Iterator[tuple[str, SearchService, uvicorn.Server]]:
    """A real uvicorn server over the index in `folder`, in a thread, on 127.0.0.1:<free port>."""
    service = SearchService(DurableIndex.open(folder), 64, 2.0, max_queued_texts)
    config = uvicorn.Config(create_app(service, None, max_body_bytes), log_level="warning", timeout_graceful_shutdown=10)
    with server_thread(config) as (url, server):
        yield url, service, server


def hold_forwards(service: SearchService, gate: threading.Event) -> Any:
    """Every encoder forward waits until `gate` is set; returns the hook's handle."""

    def hold(*_: Any) -> None:  # a hook that returns None leaves the forward's output as it is
        gate.wait(30)

    return service.index.require_encoder().model.register_forward_hook(hold)


@pytest.fixture(scope="module")
def served(index_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # noqa: F811
    with serving(fresh_copy(index_dir, tmp_path_factory.mktemp("openai"))) as (url, _, _):
        yield url


@pytest.fixture(scope="module")
def client(served: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0, timeout=60)


# --- the OpenAI embeddings API ------------------------------------------------------------------------------------

def test_the_openai_client_gets_the_vectors_of_embed(client: openai.OpenAI, served: str, model_dir: Path,  # noqa: F811
                                                     index_dir: Path) -> None:  # noqa: F811
    """The official client (base64 by default, floats when asked) gets /embed's document vectors; `dimensions`
    truncates and renormalises; usage counts tokens; a text over the model's length is cut and counted."""
    models = client.models.list().data
    assert [model.id for model in models] == [model_dir.name]
    _, embed, _ = call(f"{served}/embed", "POST", {"texts": QUERIES, "kind": "document"})
    expected = np.array(embed["vectors"], dtype=np.float32)
    as_base64 = client.embeddings.create(model=model_dir.name, input=QUERIES)
    as_floats = client.embeddings.create(model=str(model_dir), input=QUERIES, encoding_format="float")
    for answer in (as_base64, as_floats):
        assert [item.index for item in answer.data] == list(range(len(QUERIES))) and answer.model == model_dir.name
        np.testing.assert_allclose([item.embedding for item in answer.data], expected, atol=1e-6)
    raw = client.embeddings.with_raw_response.create(model=model_dir.name, input=QUERIES[0], encoding_format="base64")
    exact = np.frombuffer(base64.b64decode(json.loads(raw.text)["data"][0]["embedding"]), dtype="<f4")
    single = call(f"{served}/embed", "POST", {"texts": QUERIES[0], "kind": "document"})[1]["vectors"][0]
    assert np.array_equal(exact, np.array(single, dtype=np.float32)), "base64 holds the float32 vector bit for bit"
    short = client.embeddings.create(model=model_dir.name, input=QUERIES, dimensions=8)
    head = expected[:, :8] / np.linalg.norm(expected[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose([item.embedding for item in short.data], head, atol=1e-6)
    index = SearchIndex.load(index_dir)
    tokens = sum(len(ids) for ids in index.encoder.tokenizer(QUERIES)["input_ids"])
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == tokens
    long_text = " ".join(QUERIES * 40)
    raw = client.embeddings.with_raw_response.create(model=model_dir.name, input=[long_text, QUERIES[0]])
    assert raw.headers["x-truncated-inputs"] == "1"
    assert raw.parse().usage.prompt_tokens == index.meta["max_seq_length"] + len(index.encoder.tokenizer(QUERIES[0])["input_ids"])
    queries = client.embeddings.create(model=model_dir.name, input=QUERIES, extra_body={"input_type": "query"})
    np.testing.assert_allclose([item.embedding for item in queries.data], index.encode(QUERIES, "query"), atol=1e-5)


@pytest.mark.parametrize("case", [
    ("unknown model", {"model": "text-embedding-3-small", "input": "q"}, openai.NotFoundError, "model",
     "'text-embedding-3-small' is not served here"),
    ("token ids", {"input": [[101, 2023]]}, openai.UnprocessableEntityError, "input", "token ids are not supported"),
    ("too many inputs", {"input": ["q"] * 2049}, openai.UnprocessableEntityError, "input", "1 to 2048 texts, got 2049"),
    ("empty input", {"input": ""}, openai.UnprocessableEntityError, "input", "must not be empty"),
    ("dimensions over", {"input": "q", "dimensions": 33}, openai.UnprocessableEntityError, "dimensions",
     "at most 32"),
    ("dimensions zero", {"input": "q", "dimensions": 0}, openai.UnprocessableEntityError, "dimensions",
     "greater than or equal to 1"),
    ("bad format", {"input": "q", "encoding_format": "int8"}, openai.UnprocessableEntityError, "encoding_format",
     "'float' or 'base64'"),
], ids=lambda case: case[0] if isinstance(case, tuple) else None)
def test_openai_errors_take_openai_shape(client: openai.OpenAI, model_dir: Path, case: tuple) -> None:  # noqa: F811
    _, arguments, error_class, param, message = case
    with pytest.raises(error_class) as raised:
        client.embeddings.create(**{"model": model_dir.name, **arguments})
    error = raised.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    assert message in error["message"], error


# --- bounds and backpressure ------------------------------------------------------------------------------------

def test_a_200_mb_body_or_100_000_texts_is_refused_at_once(served: str) -> None:
    """A body declared 200 MB gets 413 before it is sent, 100,000 texts in a body under the limit a 422; the
    process's peak memory does not grow by the size of either."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    connection = http.client.HTTPConnection(HOST, int(served.rsplit(":", 1)[1]), timeout=10)
    start = time.perf_counter()
    connection.putrequest("POST", "/v1/embeddings")
    connection.putheader("content-type", "application/json")
    connection.putheader("content-length", str(200_000_000))
    connection.endheaders(b'{"input": ["' + b"x" * 65536)
    response = connection.getresponse()
    answer = json.loads(response.read())
    assert response.status == 413 and "larger than 1048576 bytes" in answer["error"]["message"]
    assert time.perf_counter() - start < 2
    connection.close()
    many = ["a"] * 100_000  # 500 KB of JSON: under the body limit
    for path, body, field in [("/v1/embeddings", {"model": "m", "input": many}, "input"),
                              ("/embed", {"texts": many}, "texts")]:
        start = time.perf_counter()
        status, answer, _ = call(f"{served}{path}", "POST", body)
        message = answer["error"]["message"] if "error" in answer else answer["detail"]
        assert status == 422 and f"{field}: must hold 1 to" in message and "got 100000" in message, answer
        assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000, "peak memory grew by > 100 MB"


def test_a_full_queue_answers_429_with_retry_after_and_the_queued_requests_finish(
        index_dir: Path, model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """With room for 3 queued texts: one request runs (its forward held until the end), three wait, the fifth
    gets 429 with Retry-After; the waiting three then get their answers."""
    with serving(fresh_copy(index_dir, tmp_path), max_queued_texts=3) as (url, service, _):
        gate = threading.Event()
        held = hold_forwards(service, gate)
        with ThreadPoolExecutor(4) as pool:
            running = pool.submit(call, f"{url}/search", "POST", {"query": "first"})
            while service.batcher.batches == 0 and not running.done():  # the first batch is on the model thread
                time.sleep(0.01)
            time.sleep(0.1)
            waiting = [pool.submit(call, f"{url}/embed", "POST", {"texts": f"query {n}"}) for n in range(3)]
            deadline = time.monotonic() + 10
            while service.queued < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            status, answer, headers = call(f"{url}/search", "POST", {"query": "one too many"})
            assert status == 429 and "the server is busy (3 texts queued)" in answer["detail"], answer
            assert int(headers["retry-after"]) >= 1
            status, answer, headers = call(f"{url}/v1/embeddings", "POST", {"model": model_dir.name, "input": "q"})
            assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded" and "retry-after" in headers
            gate.set()
            assert running.result(30)[0] == 200 and [job.result(30)[0] for job in waiting] == [200] * 3
        held.remove()


# --- /metrics ---------------------------------------------------------------------------------------------------

def test_metrics_parse_with_prometheus_clients_parser(served: str) -> None:
    """Requests by route and status, latency histogram, batch sizes, queue depth and index size."""
    call(f"{served}/search", "POST", {"query": QUERIES})
    call(f"{served}/documents/nothing", "DELETE")
    status, text, headers = call(f"{served}/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in families.values() for sample in family.samples}
    assert samples[("textcl_requests_total", (("method", "POST"), ("route", "/search"), ("status", "200")))] >= 1
    assert ("textcl_requests_total", (("method", "DELETE"), ("route", "/documents/{doc_id:path}"),
                                      ("status", "404"))) in samples, "routes are templates, not ids"
    assert families["textcl_request_seconds"].type == "histogram"
    assert samples[("textcl_request_seconds_count", (("route", "/search"),))] >= 1
    assert samples[("textcl_batch_texts_sum", ())] >= len(QUERIES)
    assert samples[("textcl_queue_texts", ())] == 0
    assert samples[("textcl_index_documents", ())] == call(f"{served}/health")[1]["documents"]


# --- shutting down ----------------------------------------------------------------------------------------------

def test_a_request_in_flight_when_the_server_is_told_to_stop_gets_its_answer(index_dir: Path,  # noqa: F811
                                                                             tmp_path: Path) -> None:
    """uvicorn's SIGTERM handler sets `should_exit`; a search whose forward is still running then gets its 200."""
    with serving(fresh_copy(index_dir, tmp_path)) as (url, service, server):
        gate = threading.Event()
        hold_forwards(service, gate)
        with ThreadPoolExecutor(1) as pool:
            searching = pool.submit(call, f"{url}/search", "POST", {"query": "in flight"})
            while service.batcher.batches == 0 and not searching.done():
                time.sleep(0.01)
            server.should_exit = True
            time.sleep(0.5)
            assert not searching.done(), "the request is still in flight"
            gate.set()
            status, answer, _ = searching.result(30)
            assert status == 200 and answer["results"][0]["query"] == "in flight"


def test_sigterm_drains_keeps_every_acknowledged_write_exits_0_and_logs_json(index_dir: Path,  # noqa: F811
                                                                             tmp_path: Path) -> None:
    folder = fresh_copy(index_dir, tmp_path)
    log = tmp_path / "server.log"
    process, url = start_process([str(folder), "--log-format", "json", "--snapshot_every", "5"], log)
    stop = threading.Event()
    added: set[str] = set()
    deleted: set[str] = set()
    writer = threading.Thread(target=stream_writes, args=(url, "t", [], stop, added, deleted, set()))
    try:
        writer.start()
        deadline = time.monotonic() + 60
        while len(added) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log.read_text()
        assert time.monotonic() - start < 15
    finally:
        stop.set()
        process.kill()
    writer.join(60)
    assert len(added) >= 10
    assert added <= set(SearchIndex.load(folder).ids.tolist()), "the snapshot taken at shutdown holds every write"
    assert len(read_log(folder / LOG_NAME)[0]) == 1, "the write log is back to its header"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    writes = [line for line in lines if line["route"] == "/documents" and line["status"] == 201]
    assert len(writes) >= 10 and {"time", "level", "method", "path", "status", "duration_ms", "client"} <= set(writes[0])
