"""Deploy bench (issue 15): ONNX/int8 encode speed against the peer, int8 model quality, quantized search.

    bash bench/peer_onnx_env.sh                                      # the peer's ONNX backend, once (see there)
    python bench/onnx_deploy.py encode --data sentences --n 10000     # texts/s, every side in a fresh process
    python bench/onnx_deploy.py encode --data scifact --n 1000
    python bench/onnx_deploy.py quality                               # STS-B test, SciFact nDCG@10: fp32 vs int8
    python bench/onnx_deploy.py vectors --corpus scifact              # quantized search: nDCG@10, bytes, latency
    python bench/onnx_deploy.py vectors --corpus sentences --n 120000

Sides of `encode`: textcl-torch (Encoder, fp32), textcl-onnx (onnx/model.onnx, fp32), textcl-int8
(onnx/model_qint8.onnx), peer-onnx (SentenceTransformer(backend="onnx"), its own optimum export), peer-int8
(its `export_dynamic_quantized_onnx_model(..., "avx512_vnni")`) and peer-int8-avx2 (the "avx2" config). Each
side runs in its own process (load and warm-up untimed), rounds alternate the order, and each side's best
pass counts. The peer's ONNX extra (optimum-onnx) needs transformers < 4.58, which sentence-transformers 6 does
not allow, so the peer's ONNX sides run sentence-transformers 5.1.2 from the folder $PEER_ONNX
(bench/peer_onnx_env.sh); its ONNX code path is the one 6.x has. Everything runs fp32 on the CPU (no bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import SHARED, minilm_path, scifact_docs, sentences

WORK = Path(os.environ.get("TEXTCL_BENCH_WORK", "/tmp/textcl-onnx-bench"))
PEER_ONNX = os.environ.get("PEER_ONNX", "/tmp/peer-onnx")
PEER_FILES = {"peer-onnx": "onnx/model.onnx", "peer-int8": "onnx/model_qint8_avx512_vnni.onnx",
              "peer-int8-avx2": "onnx/model_quint8_avx2.onnx"}
SIDES = ["textcl-torch", "textcl-onnx", "textcl-int8", *PEER_FILES]


def textcl_folder() -> Path:
    """all-MiniLM-L6-v2 exported by textcl (fp32 + int8), once."""
    from textcl.model.onnx_export import export_onnx

    folder = WORK / "minilm"
    if not (folder / "onnx" / "model_qint8.onnx").is_file():
        export_onnx(minilm_path(), out=folder, quantize="int8")
    return folder


def peer_environment() -> dict[str, str]:
    if not Path(PEER_ONNX, "optimum", "onnxruntime").is_dir():
        sys.exit(f"the peer's ONNX backend is not in {PEER_ONNX}: run bash bench/peer_onnx_env.sh")
    return os.environ | {"PYTHONPATH": f"{PEER_ONNX}:{Path(__file__).parent}"}


def texts_of(data: str, n: int) -> list[str]:
    return sentences(n) if data == "sentences" else scifact_docs(n)


def worker(side: str, data: str, n: int, repeats: int, batch_size: int) -> None:
    """One side in this process: load, warm up, then the best of `repeats` timed passes; prints RESULT."""
    texts = texts_of(data, n)
    if side.startswith("peer"):
        from sentence_transformers import SentenceTransformer

        folder = WORK / "peer-minilm"
        model = SentenceTransformer(str(folder), backend="onnx", device="cpu",
                                    model_kwargs={"file_name": PEER_FILES[side]})
        encode = lambda batch: model.encode(batch, batch_size=batch_size)
    else:
        from textcl import Encoder

        if side == "textcl-torch":
            model = Encoder.load(minilm_path(), device="cpu")
        else:
            onnx_file = "model_qint8.onnx" if side == "textcl-int8" else "model.onnx"
            model = Encoder.load(WORK / "minilm", backend="onnx", onnx_file=onnx_file)
        encode = lambda batch: model.encode(batch, batch_size=batch_size)
    sample = encode(texts[:64])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        encode(texts)
        times.append(time.perf_counter() - start)
    np.save(WORK / f"sample-{side}.npy", sample)
    print("RESULT " + json.dumps({"side": side, "seconds": min(times), "texts_per_s": len(texts) / min(times)}))


def prepare_peer() -> None:
    """The peer's own ONNX export and int8 exports of all-MiniLM-L6-v2 (in the peer's environment)."""
    folder = WORK / "peer-minilm"
    if (folder / PEER_FILES["peer-int8-avx2"]).is_file():
        return
    shutil.copytree(minilm_path(), folder, dirs_exist_ok=True)
    script = (
        "import sys; from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model\n"
        "m = SentenceTransformer(sys.argv[1], backend='onnx', device='cpu'); m.save_pretrained(sys.argv[1])\n"
        "for config in ('avx512_vnni', 'avx2'): export_dynamic_quantized_onnx_model(m, config, sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(folder)], env=peer_environment(), check=True)


def peer_loads_textcl_export(folder: Path) -> float:
    """SentenceTransformer(textcl's export, backend="onnx") against textcl's ONNX encoder: lowest cosine."""
    from textcl import Encoder

    texts = sentences(200)
    ours = Encoder.load(folder, backend="onnx").encode(texts)
    script = (
        "import sys, json, numpy as np; from sentence_transformers import SentenceTransformer\n"
        "m = SentenceTransformer(sys.argv[1], backend='onnx', device='cpu')\n"
        "np.save(sys.argv[3], m.encode(json.load(open(sys.argv[2]))))\n"
    )
    (WORK / "compat-texts.json").write_text(json.dumps(texts))
    subprocess.run([sys.executable, "-c", script, str(folder), str(WORK / "compat-texts.json"),
                    str(WORK / "compat.npy")], env=peer_environment(), check=True)
    theirs = np.load(WORK / "compat.npy")
    return float(((ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)).min())


def run_encode(args: argparse.Namespace) -> None:
    import onnxruntime
    import torch

    folder = textcl_folder()
    prepare_peer()
    best: dict[str, float] = {}
    sides = args.sides or SIDES
    for round_ in range(args.rounds):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            command = [sys.executable, __file__, "worker", side, "--data", args.data, "--n", str(args.n),
                       "--repeats", str(args.repeats), "--batch_size", str(args.batch_size)]
            env = peer_environment() if side.startswith("peer") else os.environ
            output = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env).stdout
            result = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
            best[side] = max(best.get(side, 0.0), result["texts_per_s"])
            print(f"round {round_}: {side:15s} {result['texts_per_s']:8.1f} texts/s", flush=True)
    reference = np.load(WORK / "sample-textcl-torch.npy") if "textcl-torch" in best else None
    print(f"\nCPU capability {torch.backends.cpu.get_cpu_capability()}, onnxruntime {onnxruntime.__version__}, "
          f"{args.n} {args.data} texts, batch {args.batch_size}, best of {args.rounds} rounds x {args.repeats}")
    for side, rate in best.items():
        sample = np.load(WORK / f"sample-{side}.npy")
        agreement = ""
        if reference is not None:
            cos = (sample * reference).sum(1) / np.linalg.norm(sample, axis=1) / np.linalg.norm(reference, axis=1)
            agreement = f"  cosine to textcl-torch on 64 texts: min {cos.min():.6f} mean {cos.mean():.6f}"
        print(f"{side:15s} {rate:8.1f} texts/s{agreement}")
    ratios = [("textcl-onnx", "peer-onnx"), ("textcl-onnx", "textcl-torch"), ("textcl-int8", "peer-int8"),
              ("textcl-int8", "peer-int8-avx2"), ("textcl-int8", "textcl-torch"), ("textcl-int8", "textcl-onnx")]
    for ours, theirs in ratios:
        if ours in best and theirs in best:
            print(f"ratio {ours} / {theirs}: {best[ours] / best[theirs]:.3f}")
    if args.compat:
        print(f"SentenceTransformer(textcl export, backend='onnx') vs textcl: min cosine {peer_loads_textcl_export(folder):.7f}")


def run_quality(args: argparse.Namespace) -> None:
    from textcl import EncodeOptions, Encoder, evaluate

    folder = textcl_folder()
    rows = {}
    for name, onnx_file in [("fp32", "model.onnx"), ("int8", "model_qint8.onnx")]:
        encoder = Encoder.load(folder, backend="onnx", onnx_file=onnx_file)
        start = time.perf_counter()
        results = evaluate(encoder, sts=[SHARED / "stsb" / "test.tsv"] if "sts" in args.sets else None,
                           beir=SHARED / "scifact" if "scifact" in args.sets else None, k_values=[10],
                           encode_options=EncodeOptions(cache_dir=WORK / "cache"))
        rows[name] = {"STS-B test Spearman": results.get("sts", {}).get("spearman"),
                      "SciFact nDCG@10": results.get("retrieval", {}).get("ndcg@10")}
        figures = ", ".join(f"{metric} {value:.4f}" for metric, value in rows[name].items() if value is not None)
        print(f"{name}: {figures} ({time.perf_counter() - start:.0f} s)", flush=True)
    for metric, value in rows["fp32"].items():
        if value is not None:
            print(f"int8 - fp32 {metric}: {rows['int8'][metric] - value:+.4f}")


def run_vectors(args: argparse.Namespace) -> None:
    """Quantized search against exact float search over the same embeddings (textcl ONNX fp32 encoder)."""
    import faiss

    from textcl import EncodeOptions, Encoder
    from textcl.evaluation.retrieval import evaluate_retrieval
    from textcl.retrieval.corpus_embeddings import encode_corpus
    from textcl.retrieval.exact_search import exact_search
    from textcl.retrieval.quantization import build_quantized_index, index_bytes, quantized_search

    faiss.omp_set_num_threads(2)
    cached = EncodeOptions(cache_dir=WORK / "cache")
    if args.corpus == "synthetic":
        pass
    elif args.backend == "torch":
        encoder = Encoder.load(minilm_path(), device="cpu")
    else:
        encoder = Encoder.load(textcl_folder(), backend="onnx")
    schemes = [(None, 0), ("int8", 0), ("int8", 4), ("binary", 0), ("binary", 4), ("binary", 10)]
    if args.corpus == "scifact":
        from textcl.io.beir import doc_text, load_beir

        data = load_beir(SHARED / "scifact", "test")
        documents = encode_corpus(encoder, [doc_text(*data.corpus[i]) for i in data.corpus], "document", cached)
        query_texts = [data.queries[q] for q in data.qrels]
        ndcg = {}
        for quantize, rescore in schemes:
            metrics = evaluate_retrieval(encoder, SHARED / "scifact", k_values=[10], quantize=quantize,
                                         rescore=rescore, encode_options=cached)
            ndcg[quantize, rescore] = metrics["ndcg@10"]
    elif args.corpus == "sentences":
        with (SHARED / "unlabeled-sentences" / "sentences.txt").open(encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
        query_texts, corpus = lines[:1000], lines[1000 : 1000 + args.n]
        documents = encode_corpus(encoder, corpus, "document", EncodeOptions(cache_dir=WORK / "cache",
                                                                             show_progress_bar=True))
        ndcg = {}
    if args.corpus == "synthetic":
        documents, queries, ndcg = synthetic(args.n, 384, 0), synthetic(1000, 384, 1), {}
    else:
        queries = encode_corpus(encoder, query_texts, "query", cached)
    _, exact_rows = exact_search(queries, documents, 10)
    float_index = faiss.IndexFlatIP(documents.shape[1])
    float_index.add(np.ascontiguousarray(documents))
    print(f"{args.corpus}: {len(documents)} documents x {documents.shape[1]} dims, {len(queries)} queries; latency = "
          f"search time per query (the first {min(len(queries), args.latency_queries)} one at a time, embeddings "
          "given), median of 3 passes")
    print("| scheme | index bytes | vs float | query latency ms | recall@10 vs exact | nDCG@10 | nDCG@10 drop |")
    print("|---|---|---|---|---|---|---|")
    float_bytes = index_bytes(float_index)
    for quantize, rescore in schemes:
        index = float_index if quantize is None else build_quantized_index([documents], quantize)

        def search_one(vector: np.ndarray, index=index, quantize=quantize, rescore=rescore) -> np.ndarray:
            if quantize is None:
                return index.search(vector, 10)[1]
            return quantized_search(index, quantize, vector, 10, rescore, documents)[1]

        rows = search_one(queries)
        passes, timed = [], min(len(queries), args.latency_queries)
        for _ in range(3):
            start = time.perf_counter()
            for i in range(timed):
                search_one(queries[i : i + 1])
            passes.append((time.perf_counter() - start) / timed * 1000)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact_rows)])
        size = index_bytes(index)
        name = "float32 (exact)" if quantize is None else f"{quantize}" + (f" + rescore {rescore}" if rescore else "")
        quality = ""
        if ndcg:
            drop = ndcg[None, 0] - ndcg[quantize, rescore]
            quality = f"{ndcg[quantize, rescore]:.4f} | {drop:+.4f}"
        else:
            quality = "- | -"
        print(f"| {name} | {size:,} | {size / float_bytes:.3f} | {np.median(passes):.3f} | {recall:.4f} | {quality} |",
              flush=True)


def synthetic(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 2,000 fixed random centres (documents and queries share them): a corpus with
    meaningful neighbours and no encoding cost, for the memory and latency of large indexes."""
    centres = np.random.default_rng(1234).normal(size=(2000, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    vectors = centres[rng.integers(0, 2000, n)] + 0.8 * rng.normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    encode = commands.add_parser("encode")
    encode.add_argument("--data", choices=["sentences", "scifact"], default="sentences")
    encode.add_argument("--n", type=int, default=10_000)
    encode.add_argument("--batch_size", type=int, default=32)
    encode.add_argument("--repeats", type=int, default=1, help="timed passes per process")
    encode.add_argument("--rounds", type=int, default=2, help="processes per side, alternating the order")
    encode.add_argument("--sides", nargs="+", choices=SIDES, default=None)
    encode.add_argument("--compat", action="store_true", help="also load textcl's export with the peer")
    one = commands.add_parser("worker")
    one.add_argument("side", choices=SIDES)
    one.add_argument("--data", default="sentences")
    one.add_argument("--n", type=int, default=10_000)
    one.add_argument("--batch_size", type=int, default=32)
    one.add_argument("--repeats", type=int, default=1)
    quality = commands.add_parser("quality")
    quality.add_argument("--sets", nargs="+", choices=["sts", "scifact"], default=["sts", "scifact"])
    vectors = commands.add_parser("vectors")
    vectors.add_argument("--corpus", choices=["scifact", "sentences", "synthetic"], default="scifact")
    vectors.add_argument("--latency_queries", type=int, default=300, help="queries timed one at a time")
    vectors.add_argument("--n", type=int, default=120_000, help="documents of sentences.txt after the 1,000 queries")
    vectors.add_argument("--backend", choices=["torch", "onnx"], default="onnx",
                         help="the fp32 encoder whose (cached) embeddings are quantized")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.command == "worker":
        worker(args.side, args.data, args.n, args.repeats, args.batch_size)
    elif args.command == "encode":
        run_encode(args)
    elif args.command == "quality":
        run_quality(args)
    else:
        run_vectors(args)


if __name__ == "__main__":
    main()
