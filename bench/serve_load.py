"""Load test of `textcl serve`: queries/s and p50/p99 latency with micro-batching on and off, same server.

    python bench/serve_load.py                          # 2,000 queries, 16 clients, 3 repeats of each side
    python bench/serve_load.py --queries 500 --repeats 1
    python bench/serve_load.py --backend onnx           # the model in onnxruntime (`textcl export`'s fp32 graph)

The index holds --docs unlabeled sentences encoded by all-MiniLM-L6-v2 (fp32, CPU; built once into
--work_dir). Queries are SciFact's claims (short: ~12 words), cycled. Each run starts a fresh server
process (`textcl serve INDEX --port 0 --device cpu`, "batched" with the default settings, "single" with
--max_batch_size 1, i.e. one query per encoder forward), warms it up, then --clients threads each keep
one HTTP connection to 127.0.0.1 and send POST /search {"query", "k": 10} until --queries have been
answered; latency is measured per request by the client, and the server's CPU time per query by psutil.
Sides alternate order between repeats (the machine is shared: compare within a repeat). Traffic goes to
127.0.0.1 only; every run is bounded by --max_seconds, and the server is stopped after each run.

Before the servers start, the bench times the encoder alone in this process (no HTTP): the same queries one
per forward and in forwards of 8 and 16. Their ratio bounds what micro-batching can give any server on this
machine, since batching saves per-forward overhead and nothing else.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from common import SHARED, best_time, minilm_path, sentences

HOST = "127.0.0.1"  # loopback only
SIDES = {"batched": [], "single": ["--max_batch_size", "1"]}


def build_index(folder: Path, docs: int, model: Path) -> None:
    from textcl import EncodeOptions, Encoder
    from textcl.model.onnx_export import export_onnx
    from textcl.retrieval.search_index import SearchIndex

    if not (model / "onnx" / "model.onnx").is_file():  # a copy of the model with its fp32 graph, for --backend onnx
        export_onnx(minilm_path(), out=model)
    if (folder / "meta.json").exists():
        return
    encoder = Encoder.load(model, device="cpu")
    options = EncodeOptions(show_progress_bar=True)
    SearchIndex.build(encoder, sentences(docs), model_path=model, encode_options=options).save(folder)


def encoder_ceiling(index: Path, backend: str, queries: list[str], seconds: float = 10.0) -> dict[int, float]:
    """Milliseconds per query of the index's encoder alone (`SearchIndex.encode`, no HTTP) in forwards of 1, 8 and 16
    queries, each timed over the same queries for about `seconds` (best of 2 passes)."""
    from textcl.retrieval.search_index import SearchIndex

    loaded = SearchIndex.load(index, device="cpu", backend=backend)
    per_query = {}
    for size in (1, 8, 16):
        groups = [queries[start:start + size] for start in range(0, len(queries) - size + 1, size)]
        loaded.encode(groups[0], "query", size)  # warm-up
        count = max(1, min(len(groups), int(seconds / 2 / (0.02 * size))))  # ~seconds/2 a pass at ~20 ms a query
        per_query[size] = 1000 * best_time(
            lambda: [loaded.encode(group, "query", size) for group in groups[:count]], 2) / (count * size)
    return per_query


def start_server(index: Path, extra: list[str], timeout: float) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "textcl", "serve", str(index), "--host", HOST, "--port", "0", "--device", "cpu",
               *extra]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if f"http://{HOST}:" in line:
            return server, int(line.split(f"http://{HOST}:", 1)[1].split()[0])
        if server.poll() is not None:
            break
    server.kill()
    raise RuntimeError(f"the server did not start within {timeout:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def request(connection: http.client.HTTPConnection, method: str, path: str, body: dict | None = None) -> dict:
    payload = json.dumps(body).encode() if body is not None else None
    connection.request(method, path, body=payload, headers={"content-type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{method} {path}: {response.status} {data[:200]!r}")
    return json.loads(data)


def post(connection: http.client.HTTPConnection, path: str, body: bytes) -> bytes:
    """POST a JSON `body` on a kept-alive connection; anything but 200 raises."""
    connection.request("POST", path, body=body, headers={"content-type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"POST {path}: {response.status} {data[:300]!r}")
    return data


def load_requests(port: int, path: str, bodies: list[bytes], total: int, clients: int, seconds: float) -> dict:
    """Send up to `total` requests (cycling `bodies`) from `clients` threads for at most `seconds`; returns
    requests/s, p50/p99 latency (ms), the number answered and the wall time."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(total))
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        connection = http.client.HTTPConnection(HOST, port, timeout=120)
        try:
            while time.monotonic() < deadline:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                start = time.perf_counter()
                post(connection, path, bodies[n % len(bodies)])
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
        except Exception as error:  # noqa: BLE001 - reported below; the run fails
            errors.append(repr(error))
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 150)
    wall = time.perf_counter() - start
    if errors or not latencies:
        raise RuntimeError(f"{len(latencies)} answered in {wall:.0f} s; errors: {errors[:3]}")
    ordered = sorted(latencies)
    return {"rps": len(ordered) / wall, "p50_ms": 1000 * statistics.median(ordered),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], "requests": len(ordered),
            "wall_s": wall}


def load(port: int, queries: list[str], total: int, clients: int, max_seconds: float) -> dict:
    """Send `total` searches from `clients` threads; returns queries/s, p50/p99 latency (ms)."""
    bodies = [json.dumps({"query": query, "k": 10}).encode() for query in queries]
    result = load_requests(port, "/search", bodies, total, clients, max_seconds)
    if result["requests"] < total:
        raise RuntimeError(f"{result['requests']}/{total} answered in {result['wall_s']:.0f} s")
    return {"qps": result["rps"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"], "wall_s": result["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--sides", default="batched,single")
    parser.add_argument("--max_seconds", type=float, default=300, help="bound on one run's load phase")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="the server's --backend")
    parser.add_argument("--work_dir", default="/tmp/textcl-bench-serve")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")

    import torch

    index = Path(args.work_dir) / f"index-{args.docs}-exported"
    build_index(index, args.docs, Path(args.work_dir) / "minilm")
    with (SHARED / "scifact" / "queries.jsonl").open(encoding="utf-8") as handle:
        queries = [json.loads(line)["text"] for line in handle]
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores; all-MiniLM-L6-v2 fp32, "
          f"backend {args.backend}; "
          f"{args.docs} docs, Flat; {args.queries} queries (SciFact claims, "
          f"{statistics.mean(len(q.split()) for q in queries):.1f} words on average), {args.clients} clients, k=10")
    ceiling = encoder_ceiling(index, args.backend, queries)
    print("encoder alone, ms per query: " + ", ".join(f"{ms:.2f} in forwards of {size}" for size, ms in ceiling.items())
          + f"; batching can speed it up {ceiling[1] / ceiling[8]:.2f}x (8) / {ceiling[1] / ceiling[16]:.2f}x (16) "
          "at most", flush=True)
    rows: dict[str, list[dict]] = {side: [] for side in args.sides.split(",")}
    for repeat in range(args.repeats):
        order = list(rows) if repeat % 2 == 0 else list(reversed(rows))
        for side in order:
            server, port = start_server(index, [*SIDES[side], "--backend", args.backend], timeout=300)
            try:
                warm = http.client.HTTPConnection(HOST, port, timeout=60)
                for query in queries[:20]:
                    request(warm, "POST", "/search", {"query": query, "k": 10})
                warm.close()
                before = psutil.Process(server.pid).cpu_times()
                result = load(port, queries, args.queries, args.clients, args.max_seconds)
                after = psutil.Process(server.pid).cpu_times()
                result["cpu_ms"] = 1000 * (after.user + after.system - before.user - before.system) / args.queries
                health = http.client.HTTPConnection(HOST, port, timeout=60)
                result["mean_batch"] = request(health, "GET", "/health")["mean_batch_size"]
                health.close()
            finally:
                stop_server(server)
            rows[side].append(result)
            print(f"repeat {repeat + 1} {side:>8}: {result['qps']:7.1f} queries/s  p50 {result['p50_ms']:6.1f} ms  "
                  f"p99 {result['p99_ms']:6.1f} ms  mean batch {result['mean_batch']:.1f}  "
                  f"server CPU {result['cpu_ms']:.1f} ms/query  ({result['wall_s']:.1f} s)",
                  flush=True)
    if {"batched", "single"} <= set(rows):
        ratios = [b["qps"] / s["qps"] for b, s in zip(rows["batched"], rows["single"])]
        print(f"throughput batched / single per repeat: {', '.join(f'{r:.2f}x' for r in ratios)} "
              f"(median {statistics.median(ratios):.2f}x)")
    for side, results in rows.items():
        print(f"{side:>8}: queries/s {min(r['qps'] for r in results):.1f}-{max(r['qps'] for r in results):.1f}, "
              f"p50 {min(r['p50_ms'] for r in results):.1f}-{max(r['p50_ms'] for r in results):.1f} ms, "
              f"p99 {min(r['p99_ms'] for r in results):.1f}-{max(r['p99_ms'] for r in results):.1f} ms")


if __name__ == "__main__":
    main()
