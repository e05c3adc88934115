"""Hard-negative mining time: textcl `mine_hard_negatives` vs sentence-transformers' on SciFact train, same run.

    python bench/mining_speed.py                 # full corpus (5,183 docs): minutes, encoding dominates
    python bench/mining_speed.py --n_docs 500    # a quick check while developing

Same model (all-MiniLM-L6-v2, max length 256), data (919 train pairs, 809 queries), corpus, batch size and
settings: exact FAISS search, 3 negatives, range_max 50, top sampling and the 95%-of-positive threshold
(sentence-transformers' relative_margin=0.05 is textcl's max_score_ratio=0.95). Neither side reuses the
other's embeddings: textcl's first run starts from an empty embedding cache (it encodes everything and
writes the cache, as a first `textcl mine` does); its second run is the same call again (warm cache).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import SHARED, cpu_capability, minilm_path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_docs", type=int, default=None, help="use only the first N corpus documents")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()

    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as peer_mine

    from textcl import EncodeOptions, Encoder
    from textcl.io.pairs import read_pairs
    from textcl.retrieval.mining import mine_hard_negatives

    anchors, positives, corpus = read_pairs(SHARED / "scifact", "train")
    corpus = corpus[: args.n_docs]
    if args.n_docs:
        kept = set(corpus)
        pairs = [(a, p) for a, p in zip(anchors, positives) if p in kept]
        anchors, positives = [a for a, _ in pairs], [p for _, p in pairs]
    ours, peer = Encoder.load(minilm_path(), max_seq_length=256), SentenceTransformer(minilm_path(), device="cpu")
    peer.max_seq_length = 256

    def run_ours(cache_dir: str) -> object:
        return mine_hard_negatives(
            ours, anchors, positives, corpus, num_negatives=3, range_min=0, range_max=50, max_score_ratio=0.95,
            margin=None, encode_options=EncodeOptions(batch_size=args.batch_size, cache_dir=cache_dir),
        )

    def run_peer() -> object:
        return peer_mine(
            Dataset.from_dict({"anchor": anchors, "positive": positives}), peer, corpus=corpus, range_max=50,
            relative_margin=0.05, num_negatives=3, sampling_strategy="top", batch_size=args.batch_size,
            use_faiss=True, output_format="n-tuple", verbose=False,
        )

    def timed(fn):
        """(wall seconds, process CPU seconds, result); CPU time is less disturbed by other jobs on the machine."""
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        return time.perf_counter() - wall, time.process_time() - cpu, result

    ours.encode(corpus[:64], batch_size=args.batch_size)  # warm-up: first forward passes are slower
    peer.encode(corpus[:64], batch_size=args.batch_size)
    peer_time, peer_cpu, peer_result = timed(run_peer)
    with tempfile.TemporaryDirectory() as cache:
        ours_time, ours_cpu, ours_result = timed(lambda: run_ours(cache))
        warm_time, warm_cpu, _ = timed(lambda: run_ours(cache))
    names = [f"negative_{j}" for j in (1, 2, 3)]
    peer_rows = {(row["anchor"], row["positive"]): [row[name] for name in names] for row in peer_result}
    columns = ours_result.columns
    same = sum(
        peer_rows.get(key) == [columns[name][i] for name in names]
        for i, key in enumerate(zip(columns["anchor"], columns["positive"]))
    )
    print(f"torch threads {torch.get_num_threads()}, {len(anchors)} pairs, {len(corpus)} corpus docs, "
          f"batch {args.batch_size}")
    print(f"peer    {peer_time:8.1f} s wall {peer_cpu:8.1f} s CPU  ({len(peer_result)} rows kept)")
    kept = ours_result.stats.rows_kept
    print(f"textcl  {ours_time:8.1f} s wall {ours_cpu:8.1f} s CPU  first run ({kept} rows kept; {same} of them with "
          "the peer's negatives)")
    print(f"textcl  {warm_time:8.1f} s wall {warm_cpu:8.1f} s CPU  second run, embeddings from the cache")
    print(f"ratio textcl/peer, first run: wall {ours_time / peer_time:.3f}, CPU {ours_cpu / peer_cpu:.3f}; "
          f"second run: wall {warm_time / peer_time:.4f}")
    print(cpu_capability())


if __name__ == "__main__":
    main()
