"""Training throughput: textcl's trainer vs sentence-transformers' trainer, same model, data, batch, steps.

    python bench/train_throughput.py --mode unsup                      # batch 64, max len 32, (s, s) pairs
    python bench/train_throughput.py --mode unsup --precision bf16     # both sides under bf16 autocast
    python bench/train_throughput.py --mode unsup --precision bf16 --peer_precision fp32
    python bench/train_throughput.py --mode hardneg                    # batch 32, q 64 / d 256, 3 negatives
    python bench/train_throughput.py --mode gradcache                  # batch 512, chunk 32 vs CachedMNRL

Each run is a fresh subprocess (so peak RSS is per run), alternating textcl and the peer `--repeats`
times; the best samples/s of each side is compared. samples/s counts anchors (rows) per second of the
training loop as each trainer reports it (`train_samples_per_second`), setup and saving excluded.
Unsupervised data reaches the peer as (s, s) pairs and textcl as a text file (its dropout-positive input).
The peer is `SentenceTransformerTrainer` with (Cached)MultipleNegativesRankingLoss (scale 20 = temperature
0.05) and its no-duplicates batch sampler; textcl runs `textcl.train` with InfoNCE at 0.05.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import SHARED, cpu_capability, minilm_path, peak_rss_gib, scifact_docs, sentences

MODES = {
    "unsup": {"batch": 64, "max_length": 32, "query_length": 32, "negatives": 0, "chunk": None},
    "hardneg": {"batch": 32, "max_length": 256, "query_length": 64, "negatives": 3, "chunk": None},
    "gradcache": {"batch": 512, "max_length": 32, "query_length": 32, "negatives": 0, "chunk": 32},
}


def rows(mode: dict, n: int) -> dict[str, list[str]]:
    """Training columns: unsupervised (s, s) pairs, or SciFact (claim, abstract, 3 other abstracts)."""
    if not mode["negatives"]:
        texts = sentences(n)
        return {"anchor": texts, "positive": texts}
    with (SHARED / "scifact" / "queries.jsonl").open() as handle:
        claims = [json.loads(line)["text"] for line in handle]
    docs = scifact_docs()
    columns = {"anchor": [claims[i % len(claims)] + f" ({i})" for i in range(n)], "positive": docs[:n]}
    for j in range(mode["negatives"]):
        columns[f"negative_{j + 1}"] = [docs[(i * 7 + 1000 * (j + 1)) % len(docs)] for i in range(n)]
    return columns


def run_textcl(mode: dict, columns: dict[str, list[str]], steps: int, bf16: bool, folder: Path,
               model: str | None = None, use_cpu: bool = True, logging_steps: int | None = None) -> float:
    """textcl's samples/s; its log (`folder/out/metrics.jsonl`) has the running rate every `logging_steps`."""
    from datasets import Dataset

    from textcl.config import TrainConfig
    from textcl.training.trainer import train

    if columns["anchor"] is columns["positive"]:  # unsupervised: textcl's own input for it, one text a line
        data = folder / "train.txt"
        data.write_text("\n".join(columns["anchor"]) + "\n")
    else:
        data = folder / "train.jsonl"
        Dataset.from_dict(columns).to_json(data)
    settings = {
        "model_name_or_path": model or minilm_path(), "max_seq_length": mode["max_length"],
        "query_max_length": mode["query_length"], "train_data": str(data),
        "temperature": 0.05, "gradcache_chunk_size": mode["chunk"], "output_dir": str(folder / "out"),
        "per_device_train_batch_size": mode["batch"], "max_steps": steps, "learning_rate": 2e-5,
        "bf16": bf16, "logging_steps": logging_steps or steps, "dataloader_drop_last": True, "use_cpu": use_cpu,
    }
    return train(TrainConfig.from_dict(settings))["train"]["train_samples_per_second"]


def run_peer(mode: dict, columns: dict[str, list[str]], steps: int, bf16: bool, folder: Path,
             model: str | None = None, use_cpu: bool = True, callbacks: tuple = ()) -> float:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.training_args import BatchSamplers

    peer = SentenceTransformer(model or minilm_path(), device="cpu" if use_cpu else None)
    peer.max_seq_length = mode["max_length"]
    if mode["chunk"]:
        loss = losses.CachedMultipleNegativesRankingLoss(peer, mini_batch_size=mode["chunk"])
    else:
        loss = losses.MultipleNegativesRankingLoss(peer)
    args = Arguments(
        output_dir=str(folder / "peer"), per_device_train_batch_size=mode["batch"], max_steps=steps,
        learning_rate=2e-5, bf16=bf16, use_cpu=use_cpu, save_strategy="no", report_to="none",
        logging_steps=steps, batch_sampler=BatchSamplers.NO_DUPLICATES, dataloader_drop_last=True,
    )
    trainer = SentenceTransformerTrainer(model=peer, args=args, train_dataset=Dataset.from_dict(columns), loss=loss,
                                         callbacks=list(callbacks))
    return trainer.train().metrics["train_samples_per_second"]


def worker(args: argparse.Namespace) -> None:
    mode = MODES[args.mode]
    columns = rows(mode, mode["batch"] * args.steps)
    run = run_textcl if args.worker == "textcl" else run_peer
    with tempfile.TemporaryDirectory() as folder:
        rate = run(mode, columns, args.steps, args.precision == "bf16", Path(folder))
    print("RESULT " + json.dumps({"samples_per_second": rate, "peak_rss_gib": peak_rss_gib()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=sorted(MODES), default="unsup")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="textcl's precision")
    parser.add_argument("--peer_precision", choices=["fp32", "bf16"], default=None, help="default: same")
    parser.add_argument("--worker", choices=["textcl", "peer"], default=None)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    precision = {"textcl": args.precision, "peer": args.peer_precision or args.precision}
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for side in ("peer", "textcl"):
            command = [sys.executable, __file__, "--worker", side, "--mode", args.mode, "--steps", str(args.steps),
                       "--precision", precision[side]]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            result = json.loads(output.split("RESULT ", 1)[1])
            if result["samples_per_second"] > best.get(side, {}).get("samples_per_second", 0):
                best[side] = result
    mode = MODES[args.mode]
    print(f"mode {args.mode}: batch {mode['batch']}, max len {mode['query_length']}/{mode['max_length']}, "
          f"{mode['negatives']} negatives, chunk {mode['chunk']}, {args.steps} steps, best of {args.repeats}")
    for side, result in best.items():
        print(f"{side:7s} {precision[side]:5s} {result['samples_per_second']:7.2f} samples/s  "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB")
    speed = best["textcl"]["samples_per_second"] / best["peer"]["samples_per_second"]
    print(f"ratio textcl/peer samples/s: {speed:.3f}"
          f"  peak RSS ratio: {best['textcl']['peak_rss_gib'] / best['peer']['peak_rss_gib']:.3f}")
    print(cpu_capability())


if __name__ == "__main__":
    main()
