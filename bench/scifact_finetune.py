"""SciFact retrieval fine-tuning, textcl vs sentence-transformers, same model, data, seeds and budget.

    python bench/scifact_finetune.py --seeds 42 43 44                       # peer MNRL vs textcl recipe
    python bench/scifact_finetune.py --sides textcl --recipe recipes/retrieval-hardneg.yaml --seeds 42
    python bench/scifact_finetune.py --sides peer textcl-same --seeds 42   # textcl at the peer's settings
    python bench/scifact_finetune.py --sides textcl-same textcl-same-fp32 --seeds 42   # bf16 quality check

Sides:
  peer         SentenceTransformerTrainer + MultipleNegativesRankingLoss on the 919 SciFact train pairs,
               batch 32, lr 5e-5, 3 epochs, warmup 10%, bf16 autocast, no-duplicates sampler, max length 256
               (the peer's best settings in shared/PEER.md).
  textcl-same  textcl with exactly those settings (in-batch InfoNCE at temperature 0.05 = MNRL's scale 20).
  textcl-same-fp32  the same in fp32: bf16 must not cost retrieval quality before it is recommended.
  textcl       textcl's retrieval-hardneg recipe (`--recipe`), including its hard-negative mining, whose time
               counts towards the wall time (mining runs uncached for every seed).
Every model is evaluated on SciFact test with textcl's evaluator (trec_eval conventions) after reloading
the saved folder in fp32, and on STS-B test (the cost of retrieval tuning to similarity). Wall time covers
mining + training, not evaluation.
Each (side, seed) runs in a fresh Python process (see `common.run_fresh`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import SHARED, minilm_path, run_fresh, train_peer

SCIFACT = SHARED / "scifact"
PEER_SETTINGS = {"per_device_train_batch_size": 32, "learning_rate": 5e-5, "num_train_epochs": 3,
                 "warmup_ratio": 0.1, "bf16": True, "max_seq_length": 256}


def peer(seed: int, folder: Path) -> float:
    import datasets

    from textcl.io.beir import beir_pairs

    anchors, positives, _ = beir_pairs(SCIFACT, "train")
    pairs = datasets.Dataset.from_dict({"anchor": anchors, "positive": positives})
    return train_peer(pairs, PEER_SETTINGS, seed, folder, logging_steps=10)


def textcl(seed: int, folder: Path, recipe: str | None, bf16: bool = True) -> float:
    from textcl.config import load_config
    from textcl.training.trainer import train

    overrides = ["--seed", str(seed), "--output_dir", str(folder / "model"), "--overwrite_output_dir", "true"]
    if recipe is None:
        settings = {"model_name_or_path": minilm_path(), "train_data": str(SCIFACT), "temperature": 0.05,
                    **PEER_SETTINGS, "bf16": bf16}
        overrides += [item for key, value in settings.items() for item in (f"--{key}", str(value))]
        start = time.perf_counter()
        train(load_config(None, overrides))
        return time.perf_counter() - start
    start = time.perf_counter()
    mined = mine(recipe, folder)
    train(load_config(recipe, overrides + ["--train_data", str(mined)]))
    return time.perf_counter() - start


def mine(recipe: str, folder: Path) -> Path:
    """Mine the recipe's hard negatives with the base model (settings from the recipe's header), uncached."""
    from textcl.cli import main

    command = json.loads(Path(recipe).read_text().split("# mine: ", 1)[1].splitlines()[0])
    out = folder / "mined.jsonl"
    assert main(["mine", minilm_path(), "--data", str(SCIFACT), "--split", "train", "--out", str(out),
                 "--no_cache", *command]) == 0
    return out


def evaluate(folder: Path) -> dict[str, float]:
    """SciFact test retrieval, and STS-B test Spearman (does retrieval tuning cost similarity?)."""
    from textcl import Encoder
    from textcl.evaluation.retrieval import evaluate_retrieval
    from textcl.evaluation.sts import evaluate_sts

    encoder = Encoder.load(folder / "model")
    metrics = evaluate_retrieval(encoder, SCIFACT, "test", k_values=(10, 100))
    return {**metrics, "stsb": evaluate_sts(encoder, SHARED / "stsb" / "test.tsv")["spearman"]}


def run_here(side: str, seed: int, recipe: str) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if side == "peer":
            seconds = peer(seed, folder)
        else:
            seconds = textcl(seed, folder, recipe if side == "textcl" else None, bf16=side != "textcl-same-fp32")
        metrics = evaluate(folder)
    return {"seed": seed, "seconds": seconds, **{k: metrics[k] for k in ("ndcg@10", "mrr@10", "recall@100", "stsb")}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sides", nargs="+", default=["peer", "textcl"],
                        choices=["peer", "textcl", "textcl-same", "textcl-same-fp32"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--recipe", default="recipes/retrieval-hardneg.yaml")
    parser.add_argument("--in_process", action="store_true", help="run here instead of one fresh process per run")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {side: [] for side in args.sides}
    for seed in args.seeds:
        for side in args.sides:
            if args.in_process:
                row = run_here(side, seed, args.recipe)
            else:
                row = run_fresh(__file__, side, seed, "--recipe", args.recipe)
            results[side].append(row)
            print(f"RUN {side} {json.dumps(row)}", flush=True)
    print("\nside          seeds  nDCG@10 (mean ± sd)   MRR@10  R@100   STS-B  wall s (mean)")
    for side, rows in results.items():
        ndcg = [r["ndcg@10"] for r in rows]
        spread = statistics.stdev(ndcg) if len(ndcg) > 1 else 0.0
        print(f"{side:12s} {len(rows):5d}  {statistics.mean(ndcg):.4f} ± {spread:.4f}      "
              f"{statistics.mean(r['mrr@10'] for r in rows):.4f}  {statistics.mean(r['recall@100'] for r in rows):.4f}"
              f"  {statistics.mean(r['stsb'] for r in rows):.4f}  {statistics.mean(r['seconds'] for r in rows):7.1f}")


if __name__ == "__main__":
    main()
