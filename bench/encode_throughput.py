"""Encode throughput: textcl `Encoder.encode` vs `SentenceTransformer.encode`, same model, data, batch, process.

    python bench/encode_throughput.py --data sentences --n 10000
    python bench/encode_throughput.py --data scifact

Both sides run alternately `--repeats` times; the best time of each is reported with the ratio
textcl / peer in texts per second (higher is better for textcl).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
from common import best_time, cpu_capability, minilm_path, scifact_docs, sentences


def best_rates(runs: dict[str, Callable[[], object]], count: int, repeats: int) -> dict[str, float]:
    """Texts/s of each run over `count` texts: the best of `repeats` rounds, the runs alternating in each."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(best_time(fn, 1))
    return {name: count / min(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", choices=["sentences", "scifact"], default="sentences")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sentence_transformers import SentenceTransformer

    from textcl import Encoder

    texts = sentences(args.n) if args.data == "sentences" else scifact_docs(args.n)
    ours, peer = Encoder.load(minilm_path()), SentenceTransformer(minilm_path(), device="cpu")
    assert np.allclose(ours.encode(texts[:64]), peer.encode(texts[:64]), atol=1e-4), "models disagree"
    runs = {
        "textcl": lambda: ours.encode(texts, batch_size=args.batch_size),
        "peer": lambda: peer.encode(texts, batch_size=args.batch_size),
    }
    rates = best_rates(runs, len(texts), args.repeats)
    print(f"torch threads {torch.get_num_threads()}, {len(texts)} {args.data} texts, batch {args.batch_size}")
    for name, rate in rates.items():
        print(f"{name:7s} {rate:8.1f} texts/s (best of {args.repeats})")
    print(f"ratio textcl/peer: {rates['textcl'] / rates['peer']:.3f}")
    print(cpu_capability())


if __name__ == "__main__":
    main()
