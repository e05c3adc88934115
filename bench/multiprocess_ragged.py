"""Issue 13's reproduction, timed: 2 processes, ragged negatives, forward_chunk_size 4, 8 steps of all-MiniLM-L6-v2.

    python bench/multiprocess_ragged.py [--repeats 2]

Data: 300 rows built from textcl's bundled demo sentences: an anchor, its first 4-10 words as the positive,
and for every other row (150 of them) a negative, `null` for the rest (what `textcl mine --min_negatives 0`
writes). Recipe as in the issue: max_seq_length 64, per_device_train_batch_size 16, forward_chunk_size 4,
max_steps 8. The 2-process run is `accelerate launch --multi_gpu --num_processes 2 -m textcl train` (gloo on
CPU; before the fix it hung at its first uneven step); the normal run it is compared with is one process with
the same global batch (32). Each command's wall time (process start to exit, model loading included) and the
run's own train_runtime are printed; the two sides alternate, `--repeats` times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import minilm_path

from textcl.demo.run import demo_rows


def write_data(folder: Path) -> Path:
    texts = [row["text"] for row in demo_rows()]
    path = folder / "ragged.jsonl"
    with path.open("w") as handle:
        for i in range(300):
            row = {"anchor": texts[i], "positive": " ".join(texts[i].split()[: 4 + i % 7]),
                   "negative": texts[(i + 400) % len(texts)] if i % 2 == 0 else None}
            handle.write(json.dumps(row) + "\n")
    return path


def run(command: list[str], output: Path) -> tuple[float, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 9)), steps
    return wall, next(r["train_runtime"] for r in records if "train_runtime" in r)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="textcl-ragged-"))
    recipe = folder / "ragged.yaml"
    settings = {"model_name_or_path": minilm_path(), "train_data": str(write_data(folder)), "max_seq_length": 64,
                "per_device_train_batch_size": 16, "forward_chunk_size": 4, "max_steps": 8, "logging_steps": 1}
    recipe.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))
    textcl = [sys.executable, "-m", "textcl", "train", str(recipe), "--overwrite_output_dir", "true"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", *textcl[2:]]
    sides = {"2 processes x 16": (launch, []), "1 process x 32": (textcl, ["--per_device_train_batch_size", "32"])}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    for repeat in range(args.repeats):
        for name, (command, extra) in sides.items():
            output = folder / f"out-{len(results[name])}-{name[0]}"
            wall, train = run([*command, *extra, "--output_dir", str(output)], output)
            results[name].append((wall, train))
            print(f"{name}: wall {wall:6.1f} s, train_runtime {train:6.1f} s (8 steps)", flush=True)
    print(f"\n{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs; ranges over {args.repeats} runs a side")
    for name, rows in results.items():
        walls, trains = [w for w, _ in rows], [t for _, t in rows]
        print(f"{name}: wall {min(walls):.1f}-{max(walls):.1f} s, train_runtime {min(trains):.1f}-{max(trains):.1f} s")


if __name__ == "__main__":
    main()
