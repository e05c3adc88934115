"""Unsupervised SimCSE on ../shared/data/unlabeled-sentences: what can be shown without an MLM checkpoint.

    python bench/simcse_unsup.py scratch --steps 100     # (a) random-init MiniLM shape: dropout ablation
    python bench/simcse_unsup.py minilm --steps 100      # (b) a short run from all-MiniLM-L6-v2

(a) A BERT with all-MiniLM-L6-v2's shape and tokenizer, randomly initialised (seed 0), trained for the same
    number of steps (the fixed CPU budget) in three ways that differ only in the dropout masks of the
    two views (SimCSE's Table 1 ablation): independent masks at p=0.1 (SimCSE), p=0 (no dropout: the
    two views are identical) and one fixed mask at p=0.1 shared by both views. A bare loop over textcl's
    Encoder and InfoNCELoss is used so that the three runs share everything but the masks; the trainer
    has no "shared mask" switch, and should not (it exists only to show what fails).
(b) textcl's trainer (`textcl.train`, the simcse-unsup recipe's loss, mean pooling kept) from
    all-MiniLM-L6-v2, then STS-B test and SciFact test nDCG@10 before and after: an already-trained model
    need not improve, and the figures are reported either way.
Batch 64, max length 32, temperature 0.05, bf16 autocast, linear schedule with 10% warmup, seed 42.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from common import SHARED, minilm_path

SENTENCES = SHARED / "unlabeled-sentences" / "sentences.txt"
STSB = SHARED / "stsb" / "test.tsv"


def random_init(folder: Path) -> Path:
    """A randomly initialised BERT of all-MiniLM-L6-v2's shape, with its tokenizer, as a plain HF folder."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.from_pretrained(minilm_path())).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def stsb(encoder) -> float:
    from textcl.evaluation.sts import evaluate_sts

    return evaluate_sts(encoder, STSB)["spearman"]


def ablation_run(model: Path, masks: str, steps: int, learning_rate: float) -> float:
    """Train `steps` batches of 64 sentences with the given masks ("independent", "none", "fixed")."""
    from transformers import get_scheduler

    from textcl import Encoder
    from textcl.losses import InfoNCELoss
    from textcl.training.setup import set_dropout

    torch.manual_seed(42)
    encoder = Encoder.load(model)
    set_dropout(encoder.model, 0.0 if masks == "none" else 0.1)
    encoder.train()
    loss_fn = InfoNCELoss(temperature=0.05)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=learning_rate)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=steps // 10, num_training_steps=steps)
    with SENTENCES.open(encoding="utf-8") as handle:
        lines = (line.strip() for line in handle if line.strip())
        for _ in range(steps):
            features = encoder.tokenize(list(itertools.islice(lines, 64)), max_length=32)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                if masks == "fixed":  # one forward: both views are the same masked pass
                    anchor = positive = encoder.embed(**features).float()
                else:  # two stacked copies get independent masks (identical views when p = 0)
                    both = encoder.embed(**{key: torch.cat([value, value]) for key, value in features.items()}).float()
                    anchor, positive = both.chunk(2)
            loss = loss_fn(anchor, positive)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
    encoder.eval()
    return stsb(encoder)


def scratch(args: argparse.Namespace) -> None:
    from textcl import Encoder

    with tempfile.TemporaryDirectory() as scratch_dir:
        model = random_init(Path(scratch_dir))
        print("RESULT untrained", json.dumps({"stsb_test": stsb(Encoder.load(model))}), flush=True)
        for masks in ("independent", "none", "fixed"):
            start = time.perf_counter()
            score = ablation_run(model, masks, args.steps, args.learning_rate)
            result = {"stsb_test": score, "steps": args.steps, "seconds": round(time.perf_counter() - start)}
            print("RESULT", masks, json.dumps(result), flush=True)


def minilm(args: argparse.Namespace) -> None:
    from textcl import Encoder
    from textcl.config import load_config
    from textcl.evaluation.retrieval import evaluate_retrieval
    from textcl.training.trainer import train

    def figures(model: str) -> dict[str, float]:
        encoder = Encoder.load(model)
        ndcg = evaluate_retrieval(encoder, SHARED / "scifact", "test", k_values=(10,))["ndcg@10"]
        return {"stsb_test": stsb(encoder), "scifact_ndcg@10": ndcg}

    print("RESULT base", json.dumps(figures(minilm_path())), flush=True)
    with tempfile.TemporaryDirectory() as scratch_dir:
        settings = {"model_name_or_path": minilm_path(), "train_data": SENTENCES, "max_seq_length": 32,
                    "per_device_train_batch_size": 64, "max_steps": args.steps, "learning_rate": args.learning_rate,
                    "temperature": 0.05, "warmup_ratio": 0.1, "bf16": True, "seed": 42, "output_dir": scratch_dir,
                    "overwrite_output_dir": True}
        train(load_config(None, [item for key, value in settings.items() for item in (f"--{key}", str(value))]))
        print("RESULT unsup", json.dumps({**figures(scratch_dir), "steps": args.steps}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("start", choices=["scratch", "minilm"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--learning_rate", type=float, default=None, help="default: 1e-4 scratch, 3e-5 minilm")
    args = parser.parse_args()
    args.learning_rate = args.learning_rate or (1e-4 if args.start == "scratch" else 3e-5)
    (scratch if args.start == "scratch" else minilm)(args)


if __name__ == "__main__":
    main()
