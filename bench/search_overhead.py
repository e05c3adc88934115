"""Search queries/s: textcl `SearchIndex` vs raw faiss on the same index, same query vectors, same process.

    python bench/search_overhead.py                       # SciFact corpus (5,183 docs), its 1,109 queries
    python bench/search_overhead.py --factory IVF64,Flat --search_params nprobe=8

The corpus and queries are encoded once (cached in --cache_dir, not timed). Timed, best of --repeats,
alternating sides: a batch of all queries, and one query per call. "raw" is `index.search(vectors, k)` on
the faiss index inside the SearchIndex; "textcl" is `SearchIndex.search_vectors`, which adds the id and text
lookup. The end-to-end line adds query encoding on both sides (`SearchIndex.search` vs `encode` + faiss).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from common import SHARED, best_time, minilm_path, scifact_docs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--factory", default="Flat")
    parser.add_argument("--search_params", default="")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache_dir", default="/tmp/textcl-bench-embeddings")
    args = parser.parse_args()

    from textcl import EncodeOptions, Encoder
    from textcl.retrieval.search_index import SearchIndex

    encoder = Encoder.load(minilm_path(), max_seq_length=256)
    docs = scifact_docs()
    with (SHARED / "scifact" / "queries.jsonl").open(encoding="utf-8") as handle:
        queries = [json.loads(line)["text"] for line in handle]
    index = SearchIndex.build(encoder, docs, factory=args.factory, search_params=args.search_params,
                              encode_options=EncodeOptions(cache_dir=args.cache_dir, show_progress_bar=True))
    vectors = encoder.encode(queries, batch_size=64, normalize=True)
    raw, k = index.index, args.k
    assert np.array_equal(index.search_vectors(vectors, k).scores, raw.search(vectors, k)[0])

    def single(search) -> None:
        for row in range(len(vectors)):
            search(vectors[row : row + 1], k)

    cases = {
        "batch": (lambda: raw.search(vectors, k), lambda: index.search_vectors(vectors, k)),
        "one query a call": (lambda: single(raw.search), lambda: single(index.search_vectors)),
        "end-to-end, batch": (
            lambda: raw.search(encoder.encode(queries, batch_size=64, normalize=True), k),
            lambda: index.search(queries, k),
        ),
    }
    print(f"{args.factory} {args.search_params}, {len(docs)} docs, {len(queries)} queries, k={k}")
    for name, (raw_fn, ours_fn) in cases.items():
        times = {"raw": [], "textcl": []}
        for _ in range(args.repeats):
            times["raw"].append(best_time(raw_fn, 1))
            times["textcl"].append(best_time(ours_fn, 1))
        raw_qps, ours_qps = (len(queries) / min(times[side]) for side in ("raw", "textcl"))
        print(f"{name:18s} raw {raw_qps:11.1f} q/s  textcl {ours_qps:11.1f} q/s  "
              f"overhead {1 - ours_qps / raw_qps:6.1%}")


if __name__ == "__main__":
    main()
