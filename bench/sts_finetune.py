"""Supervised STS fine-tuning, textcl vs sentence-transformers: same model, data, seeds, batch, lr, epochs.

    python bench/sts_finetune.py --seeds 42 43 44
    python bench/sts_finetune.py --sides textcl textcl-fp32 --seeds 42     # bf16 quality check

Data: ../shared/data/pairs/positive_pairs.tsv (5,602 paraphrase / entailment pairs, in-batch negatives) and
pairs/nli_triplets_sick.tsv (328 SICK triplets whose contradiction is a hard negative), one epoch, batch 32,
lr 2e-5, warmup 10%, max length 64, bf16 autocast. Evaluation: STS-B test and SICK-R test Spearman (cosine)
of the reloaded fp32 model.
Sides:
  peer         SentenceTransformerTrainer + MultipleNegativesRankingLoss (scale 20 = temperature 0.05, its
               default) on both datasets (its multi-dataset training: each batch from one dataset,
               proportional sampling), no-duplicates sampler.
  peer-t07     the same at scale 1 / 0.07: does textcl's temperature alone explain the difference?
  textcl       textcl's trainer with the loss settings read from recipes/pairs.yaml (symmetric InfoNCE at
               temperature 0.07, candidates scoring above the positive + 0.1 masked as likely false
               negatives), and `batch_per_source`
               (each batch from one file, like the peer's multi-dataset batches).
  textcl-fp32  the same in fp32: bf16 must not cost quality before it is recommended.
Each (side, seed) runs in a fresh Python process (see `common.run_fresh`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml
from common import SHARED, minilm_path, run_fresh, train_peer

PAIRS = SHARED / "pairs" / "positive_pairs.tsv"
TRIPLETS = SHARED / "pairs" / "nli_triplets_sick.tsv"
SETTINGS = {"per_device_train_batch_size": 32, "learning_rate": 2e-5, "num_train_epochs": 1, "warmup_ratio": 0.1,
            "max_seq_length": 64}
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pairs.yaml"
LOSS_KEYS = ("temperature", "symmetric", "false_negative_margin")
TESTS = {"stsb": SHARED / "stsb" / "test.tsv", "sickr": SHARED / "sick-r" / "test.tsv"}


def peer(seed: int, folder: Path, temperature: float) -> float:
    from datasets import DatasetDict, load_dataset
    from sentence_transformers.training_args import MultiDatasetBatchSamplers

    def table(path: Path):
        return load_dataset("csv", data_files=str(path), delimiter="\t", split="train").remove_columns("source")

    data = DatasetDict({"pairs": table(PAIRS), "triplets": table(TRIPLETS)})
    return train_peer(data, {**SETTINGS, "bf16": True}, seed, folder, logging_steps=50,
                      scale=1 / temperature, multi_dataset_batch_sampler=MultiDatasetBatchSamplers.PROPORTIONAL)


def textcl(seed: int, folder: Path, bf16: bool) -> float:
    from textcl.config import load_config
    from textcl.training.trainer import train

    recipe = yaml.safe_load(RECIPE.read_text())
    settings = {"model_name_or_path": minilm_path(), **{key: recipe[key] for key in LOSS_KEYS},
                "batch_per_source": True, "bf16": bf16,
                "seed": seed, "output_dir": folder / "model", "logging_steps": 50, **SETTINGS}
    overrides = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    start = time.perf_counter()
    train(load_config(None, overrides + ["--train_data", str(PAIRS), str(TRIPLETS)]))
    return time.perf_counter() - start


def evaluate(model: Path | str) -> dict[str, float]:
    from textcl import Encoder
    from textcl.evaluation.sts import evaluate_sts

    encoder = Encoder.load(model)
    return {name: evaluate_sts(encoder, path)["spearman"] for name, path in TESTS.items()}


def run_here(side: str, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if side.startswith("peer"):
            seconds = peer(seed, folder, 0.07 if side == "peer-t07" else 0.05)
        else:
            seconds = textcl(seed, folder, side == "textcl")
        return {"seed": seed, "seconds": seconds, **evaluate(folder / "model")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sides", nargs="+", default=["peer", "textcl"],
                        choices=["peer", "peer-t07", "textcl", "textcl-fp32"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--in_process", action="store_true", help="run here instead of one fresh process per run")
    args = parser.parse_args()
    if not args.in_process:
        print("BASE", json.dumps(evaluate(minilm_path())), flush=True)
    results: dict[str, list[dict]] = {side: [] for side in args.sides}
    for seed in args.seeds:
        for side in args.sides:
            row = run_here(side, seed) if args.in_process else run_fresh(__file__, side, seed)
            results[side].append(row)
            print(f"RUN {side} {json.dumps(row)}", flush=True)
    print("\nside          seeds  STS-B test (mean ± sd)  SICK-R test (mean ± sd)  wall s (mean)")
    for side, rows in results.items():
        cells = []
        for name in TESTS:
            values = [r[name] for r in rows]
            cells.append(f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}")
        seconds = statistics.mean(r["seconds"] for r in rows)
        print(f"{side:12s} {len(rows):5d}  {cells[0]:22s}  {cells[1]:23s}  {seconds:7.1f}")


if __name__ == "__main__":
    main()
