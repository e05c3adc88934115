"""`textcl serve` side by side with infinity (infinity-emb), the embedding server users deploy today.

    bash bench/infinity_env.sh                          # once: infinity in its own venv (/tmp/infinity-venv)
    python bench/serve_compare.py                       # 3 repeats, 4 servers x 4 workloads, ~45 min on 2 cores
    python bench/serve_compare.py --repeats 1 --cell_seconds 3 --sides textcl-torch,infinity-torch   # a smoke run

Both servers load the same model folder, all-MiniLM-L6-v2 from the offline package (fp32, CPU; textcl's copy
holds its exported ONNX graph; infinity gets a copy of that folder, the same graph at its top), and
are started one at a time, each with its defaults:

- textcl-torch / textcl-onnx: `textcl serve INDEX --backend torch|onnx` (micro-batching on), POST /v1/embeddings;
- infinity-torch / infinity-onnx: `infinity_emb v2 --engine torch|optimum --device cpu`, POST /embeddings
  (`--onnx-do-not-prefer-quantized`: fp32 on both sides; `--pooling-method mean`, the model's pooling, which the
  optimum engine does not read from the folder). infinity's optimum engine truncates at the model's position
  limit (512), not its max_seq_length (256): the documents here are 256 tokens, so both encode the same tokens.

Both answer the OpenAI embeddings format, so the requests and answers are the same bytes on the wire. Every
workload sends, from --clients threads (one keep-alive connection each, 127.0.0.1 only): `query1` one SciFact
claim per request (~12 words), `query8` 8 claims, `doc1` one SciFact abstract cut to 256 tokens (MiniLM's
maximum length; both servers truncate there), `doc8` 8 of them. A cell (server x workload) warms up, then runs
until --requests answers or --cell_seconds, whichever comes first; latency is measured per request by the
client, the server's CPU time by psutil. Sides alternate order between repeats; the table gives the median of
the repeats. Each server's vectors are checked against textcl-torch's for the same texts, singly and in a batch:
a cosine below 0.9999 voids that server's rows.

Before the servers start, the bench times the encoder alone in this process (no HTTP; serve_load.py's
`encoder_ceiling`): short queries one per forward and in forwards of 8 and 16, torch and ONNX. The fastest
is the most any server can reach on this machine; the report gives each textcl server's query1 throughput as a
fraction of it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from common import SHARED, cpu_capability, minilm_path, scifact_docs
from serve_load import HOST, build_index, encoder_ceiling, load_requests, post, start_server, stop_server

SIDES = ["textcl-torch", "textcl-onnx", "infinity-torch", "infinity-onnx"]
WORKLOADS = {"query1": ("queries", 1), "query8": ("queries", 8), "doc1": ("docs", 1), "doc8": ("docs", 8)}
MODEL_NAME = "minilm"  # the folder's name: what textcl serves it as, and infinity's --served-model-name
MIN_COSINE = 0.9999


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def infinity_copy(model: Path, folder: Path) -> Path:
    """A copy of the model folder for infinity, its ONNX graph at the top: infinity 0.0.78 hands optimum the graph's
    path as it globbed it, and optimum matches that against bare file names, so only `model.onnx` found from
    inside the folder (`--model-id .`) loads."""
    if not folder.exists():
        shutil.copytree(model, folder, ignore=shutil.ignore_patterns("onnx"))
        shutil.copy2(model / "onnx" / "model.onnx", folder / "model.onnx")
    return folder


def start_infinity(venv: Path, model: Path, engine: str, timeout: float) -> tuple[subprocess.Popen, int]:
    """infinity on 127.0.0.1 (its default host is 0.0.0.0), offline, telemetry off, its caches beside the model;
    returns once /health answers."""
    port = free_port()
    command = [str(venv / "bin" / "infinity_emb"), "v2", "--model-id", ".", "--served-model-name", MODEL_NAME,
               "--engine", engine, "--device", "cpu", "--host", HOST, "--port", str(port), "--log-level", "warning",
               "--onnx-do-not-prefer-quantized",
               # the model's pooling (1_Pooling/config.json); infinity's optimum engine otherwise takes the CLS
               # token ("auto" is not "mean" there), and its vectors miss the model's (cosine 0.3)
               "--pooling-method", "mean"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1",
           "HF_HUB_CACHE": str(model.parent / "infinity-cache")}
    env.pop("PYTHONPATH", None)  # infinity's venv only
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=model)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server, port
        except OSError:
            time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"infinity ({engine}) did not start within {timeout:.0f} s: {server.stderr.read()[-2000:]}")


def embed(port: int, path: str, texts: list[str]) -> np.ndarray:
    connection = http.client.HTTPConnection(HOST, port, timeout=120)
    body = json.dumps({"model": MODEL_NAME, "input": texts, "encoding_format": "float"}).encode()
    answer = json.loads(post(connection, path, body))
    connection.close()
    return np.array([item["embedding"] for item in sorted(answer["data"], key=lambda item: item["index"])])


def workload_bodies(texts: dict[str, list[str]], name: str) -> list[bytes]:
    kind, size = WORKLOADS[name]
    pool = texts[kind]
    groups = [pool[start:start + size] for start in range(0, len(pool) - size + 1, size)]
    return [json.dumps({"model": MODEL_NAME, "input": group if size > 1 else group[0],
                        "encoding_format": "float"}).encode() for group in groups]


def probe_texts(texts: dict[str, list[str]]) -> list[list[str]]:
    """The texts each server's vectors are compared on: singly and in batches, queries and documents."""
    return [[texts["queries"][0]], texts["queries"][1:9], [texts["docs"][0]], texts["docs"][1:9]]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def documents_of_256_tokens(count: int) -> list[str]:
    """SciFact abstracts of at least 256 MiniLM tokens, each cut at its 256th token's end (characters): the
    servers then truncate nothing and both encode exactly 256 tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    docs = []
    for doc in scifact_docs(4 * count):
        encoded = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        if len(encoded["input_ids"]) >= 254:  # 254 + [CLS] + [SEP] = 256
            docs.append(doc[:encoded["offset_mapping"][253][1]])
        if len(docs) == count:
            break
    return docs


def run_side(side: str, args: argparse.Namespace, index: Path, model: Path, texts: dict[str, list[str]],
             reference: list[np.ndarray] | None) -> tuple[dict[str, dict], list[np.ndarray], float]:
    """Start `side`, check its vectors, run every workload; returns (cells, its probe vectors, min cosine)."""
    server_kind, engine = side.split("-")
    if server_kind == "textcl":
        server, port = start_server(index, ["--backend", engine, *args.textcl_args.split()], timeout=300)
        path = "/v1/embeddings"
    else:
        engine = {"torch": "torch", "onnx": "optimum"}[engine]
        server, port = start_infinity(Path(args.infinity_venv), model, engine, timeout=600)
        path = "/embeddings"
    cells = {}
    try:
        vectors = [embed(port, path, group) for group in probe_texts(texts)]
        agreement = 1.0 if reference is None else float(min(cosines(a, b).min() for a, b in zip(vectors, reference)))
        process = psutil.Process(server.pid)
        for name in args.workloads.split(","):
            bodies = workload_bodies(texts, name)
            warm = http.client.HTTPConnection(HOST, port, timeout=120)
            for body in bodies[:10]:
                post(warm, path, body)
            warm.close()
            before, client_before = process.cpu_times(), psutil.Process().cpu_times()
            cell = load_requests(port, path, bodies, args.requests, args.clients, args.cell_seconds)
            after, client_after = process.cpu_times(), psutil.Process().cpu_times()
            size = WORKLOADS[name][1]
            cell["texts_per_s"] = cell["rps"] * size
            for key, (start, end) in {"cpu_ms_per_text": (before, after),
                                      "client_cpu_ms_per_text": (client_before, client_after)}.items():
                cell[key] = 1000 * (end.user + end.system - start.user - start.system) / (cell["requests"] * size)
            cells[name] = cell
    finally:
        stop_server(server)
    return cells, vectors, agreement


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4000, help="requests per cell at most")
    parser.add_argument("--cell_seconds", type=float, default=30, help="seconds per cell at most (after warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ceiling_seconds", type=float, default=10, help="encoder-alone timing per backend")
    parser.add_argument("--docs", type=int, default=200, help="documents in textcl's index (not searched here)")
    parser.add_argument("--infinity_venv", default=os.environ.get("INFINITY_VENV", "/tmp/infinity-venv"))
    parser.add_argument("--work_dir", default="/tmp/textcl-bench-serve")
    parser.add_argument("--textcl_args", default="", help="more `textcl serve` options, e.g. '--max_batch_size 16'")
    args = parser.parse_args()
    os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", "")
    sides = args.sides.split(",")
    if sides[0] != "textcl-torch":
        sides.insert(0, "textcl-torch")  # the reference vectors
    if any(side.startswith("infinity") for side in sides) and not (Path(args.infinity_venv) / "bin" / "infinity_emb").exists():
        sys.exit(f"no infinity in {args.infinity_venv}: run bash bench/infinity_env.sh first")

    work = Path(args.work_dir)
    index = work / f"index-{args.docs}-exported"
    build_index(index, args.docs, work / MODEL_NAME)
    infinity_model = infinity_copy(work / MODEL_NAME, work / "minilm-infinity")
    with (SHARED / "scifact" / "queries.jsonl").open(encoding="utf-8") as handle:
        queries = [json.loads(line)["text"] for line in handle]
    texts = {"queries": queries, "docs": documents_of_256_tokens(400)}
    print(f"{cpu_capability()}; all-MiniLM-L6-v2 fp32; {args.clients} clients; cells of at most {args.requests} "
          f"requests / {args.cell_seconds:.0f} s; {len(texts['queries'])} queries "
          f"({statistics.mean(len(q.split()) for q in queries):.1f} words), {len(texts['docs'])} docs of 256 tokens",
          flush=True)
    ceilings = {}
    for backend in ("torch", "onnx"):
        ceiling = encoder_ceiling(index, backend, queries, args.ceiling_seconds)
        ceilings[backend] = 1000 / min(ceiling.values())
        print(f"encoder alone ({backend}), ms per query: "
              + ", ".join(f"{ms:.2f} in forwards of {size}" for size, ms in ceiling.items())
              + f"; ceiling {ceilings[backend]:.0f} queries/s", flush=True)

    results: dict[str, list[dict[str, dict]]] = {side: [] for side in sides}
    agreement: dict[str, float] = {}
    reference = None
    for repeat in range(args.repeats):
        order = sides if repeat % 2 == 0 else [sides[0], *reversed(sides[1:])]
        for side in order:
            cells, vectors, cosine = run_side(side, args, index, infinity_model, texts, reference)
            reference = reference or vectors
            agreement[side] = min(agreement.get(side, 1.0), cosine)
            results[side].append(cells)
            for name, cell in cells.items():
                print(f"repeat {repeat + 1} {side:>14} {name:>6}: {cell['texts_per_s']:7.1f} texts/s "
                      f"({cell['rps']:6.1f} req/s)  p50 {cell['p50_ms']:6.1f} ms  p99 {cell['p99_ms']:6.1f} ms  "
                      f"server CPU {cell['cpu_ms_per_text']:.1f} ms/text, client {cell['client_cpu_ms_per_text']:.1f}  "
                      f"({cell['requests']} requests)", flush=True)
    report(results, agreement, ceilings)


def report(results: dict[str, list[dict[str, dict]]], agreement: dict[str, float], ceilings: dict[str, float]) -> None:
    def median(side: str, name: str, key: str) -> float:
        return statistics.median(cells[name][key] for cells in results[side])

    names = list(next(iter(results.values()))[0])
    print(f"\nmedian of {len(next(iter(results.values())))} repeats; vectors vs textcl-torch: "
          + ", ".join(f"{side} min cosine {cos:.6f}{'' if cos >= MIN_COSINE else ' (VOID)'}"
                      for side, cos in agreement.items()))
    print("| server | workload | texts/s | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
    for side in results:
        void = " (void: vectors differ)" if agreement[side] < MIN_COSINE else ""
        for name in names:
            print(f"| {side}{void} | {name} | {median(side, name, 'texts_per_s'):.1f} | {median(side, name, 'rps'):.1f} | "
                  f"{median(side, name, 'p50_ms'):.1f} | {median(side, name, 'p99_ms'):.1f} |")
    for engine in ("torch", "onnx"):
        ours, theirs = f"textcl-{engine}", f"infinity-{engine}"
        if ours in results and "query1" in names:
            print(f"{ours} query1 reaches {median(ours, 'query1', 'texts_per_s') / ceilings[engine]:.2f}x "
                  f"the encoder-alone ceiling ({ceilings[engine]:.0f} queries/s)")
        if ours in results and theirs in results and agreement[theirs] >= MIN_COSINE:
            print(f"{ours} / {theirs} throughput: " + ", ".join(
                f"{name} {median(ours, name, 'texts_per_s') / median(theirs, name, 'texts_per_s'):.2f}x"
                for name in names) + "; p99 lower in " + ", ".join(
                name for name in names if median(ours, name, "p99_ms") < median(theirs, name, "p99_ms")))


if __name__ == "__main__":
    main()
