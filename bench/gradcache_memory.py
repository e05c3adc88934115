"""Peak memory and time of one contrastive training step: GradCache vs plain, textcl vs sentence-transformers.

    python bench/gradcache_memory.py                      # batches 32 256 1024, chunk 32, plain up to 256
    python bench/gradcache_memory.py --plain_max 1024     # also plain batch 1024 (about 19 GB of RAM)

One step = tokenize + forward + backward + AdamW step of all-MiniLM-L6-v2 (train mode, dropout on) on
unsupervised (s, s) pairs from sentences.txt at max length 32, InfoNCE / MNRL at temperature 0.05
(scale 20). Every setting runs in a FRESH subprocess, because peak RSS is per process; the worker
first takes one warm-up step at batch 32 (allocator, kernels, optimizer state), then times `--repeats`
steps at the full batch and keeps the fastest (the machine may be shared). Implementations: textcl
plain, textcl GradCache (`gradcache_backward`), sentence-transformers MultipleNegativesRankingLoss and
CachedMultipleNegativesRankingLoss (mini_batch_size = chunk). Peaks are compared with the same
library's plain step at the smallest batch, times per sample with its plain step at the same batch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from common import minilm_path, peak_rss_gib, sentences

IMPLS = ["textcl", "textcl-cache", "st-mnrl", "st-cached"]


def textcl_step(batch: int, chunk: int, max_length: int, cached: bool):
    from textcl import Encoder
    from textcl.losses import InfoNCELoss
    from textcl.losses.gradcache import gradcache_backward

    encoder = Encoder.load(minilm_path(), max_seq_length=max_length).train()
    loss = InfoNCELoss(temperature=0.05)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=2e-5)

    def step(texts: list[str]) -> float:
        groups = [encoder.tokenize(texts), encoder.tokenize(texts)]
        if cached:
            value = gradcache_backward(encoder, groups, lambda e: loss(e[0], e[1]), chunk)
        else:
            value = loss(encoder(**groups[0]), encoder(**groups[1]))
            value.backward()
        optimizer.step()
        optimizer.zero_grad()
        return value.item()

    return step


def peer_step(batch: int, chunk: int, max_length: int, cached: bool):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = max_length
    model.train()
    if cached:
        loss = CachedMultipleNegativesRankingLoss(model, mini_batch_size=chunk)
    else:
        loss = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)

    def step(texts: list[str]) -> float:
        value = loss([model.preprocess(texts), model.preprocess(texts)], None)
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        return value.item()

    return step


def worker(impl: str, batch: int, chunk: int, max_length: int, repeats: int) -> None:
    torch.manual_seed(0)
    build = textcl_step if impl.startswith("textcl") else peer_step
    step = build(batch, chunk, max_length, cached=impl.endswith("cache") or impl.endswith("cached"))
    texts = sentences(batch + 32)
    step(texts[batch : batch + 32])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss = step(texts[:batch])
        times.append(time.perf_counter() - start)
    seconds = min(times)
    print(json.dumps({"impl": impl, "batch": batch, "seconds": seconds, "peak_gib": peak_rss_gib(), "loss": loss}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 256, 1024])
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument("--plain_max", type=int, default=256, help="skip plain runs above this batch (memory)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per setting; the fastest counts")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.chunk, args.max_length, args.repeats)
        return

    results = {}
    for batch in args.batches:
        for impl in IMPLS:
            if "cache" not in impl and batch > args.plain_max:
                continue
            command = [sys.executable, __file__, "--worker", impl, str(batch), "--chunk", str(args.chunk),
                       "--max_length", str(args.max_length), "--repeats", str(args.repeats)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            results[impl, batch] = row
            print(f"{impl:13s} batch {batch:5d}: peak {row['peak_gib']:6.2f} GiB, step {row['seconds']:7.2f} s, "
                  f"{1000 * row['seconds'] / batch:6.1f} ms/sample, loss {row['loss']:.4f}", flush=True)

    base_batch = min(args.batches)
    print(f"\ntorch threads {torch.get_num_threads()}, chunk {args.chunk}, max length {args.max_length}, "
          f"plain runs up to batch {args.plain_max}")
    print("peak: / the same library's plain peak at the smallest batch; time/sample: / its plain time/sample at the")
    print("same batch, or at its largest plain batch when plain was skipped (named in brackets)")
    for (impl, batch), row in results.items():
        plain = "textcl" if impl.startswith("textcl") else "st-mnrl"
        plain_batches = [b for (name, b) in results if name == plain]
        if not plain_batches:
            continue
        reference = batch if batch in plain_batches else max(plain_batches)
        peak = row["peak_gib"] / results[plain, base_batch]["peak_gib"]
        speed = (row["seconds"] / batch) / (results[plain, reference]["seconds"] / reference)
        print(f"{impl:13s} batch {batch:5d}: peak {peak:5.2f}x  time/sample {speed:5.2f}x [plain {reference}]")
    print("textcl / peer at the same setting (peak, time):")
    for ours, peer in [("textcl", "st-mnrl"), ("textcl-cache", "st-cached")]:
        for batch in args.batches:
            if (ours, batch) in results and (peer, batch) in results:
                a, b = results[ours, batch], results[peer, batch]
                print(f"{ours:13s} vs {peer:9s} batch {batch:5d}: peak {a['peak_gib'] / b['peak_gib']:.2f}x, "
                      f"time {a['seconds'] / b['seconds']:.2f}x")


if __name__ == "__main__":
    main()
