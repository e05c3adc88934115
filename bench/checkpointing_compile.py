"""gradient_checkpointing: activation memory; torch_compile: speed and loss. textcl and the peer, same run.

    python bench/checkpointing_compile.py memory            # batch 64 x 256 tokens, 4 fresh processes
    python bench/checkpointing_compile.py compile           # MiniLM steps, eager vs inductor
    python bench/checkpointing_compile.py compile --threads 1

memory: one InfoNCE training step (forward + backward + AdamW) of all-MiniLM-L6-v2 in fp32 on 64 anchor and 64
positive SciFact documents, each truncated to 256 tokens, dropout on. Activation memory = the step's peak RSS
(VmHWM, reset before the step through /proc/self/clear_refs) minus the RSS just before it, after a warm-up step
that allocated gradients and the optimizer's state. Sides, each in a fresh process: textcl plain, textcl with
`gradient_checkpointing` (`textcl.training.setup.apply_training_options`, as a run applies it), the peer
(sentence-transformers MultipleNegativesRankingLoss) plain and with its own `gradient_checkpointing_enable()`.

compile: the training step textcl runs on CPU (length-sorted chunks of 32 rows, each padded to its own longest
text) on batches of 32 sentence pairs of varying lengths, eager and with `torch_compile` (inductor, dynamic
shapes, as a run applies it): the first step (compilation), then the median of the following steps, and the
losses of the same batches with dropout off.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import minilm_path, scifact_docs, sentences

SIDES = ["textcl", "textcl-checkpointing", "peer", "peer-checkpointing"]


def rss_mib(field: str) -> float:
    """VmRSS or VmHWM (peak) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def textcl_step(checkpointing: bool):
    from textcl.config import ModelArguments, TrainingArguments
    from textcl.losses import InfoNCELoss
    from textcl.training.setup import apply_training_options, build_encoder

    encoder = build_encoder(ModelArguments(model_name_or_path=minilm_path(), max_seq_length=256)).train()
    apply_training_options(encoder, TrainingArguments(gradient_checkpointing=checkpointing))
    loss = InfoNCELoss(temperature=0.05)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=2e-5)

    def step(anchors: list[str], positives: list[str]) -> float:
        value = loss(encoder(**encoder.tokenize(anchors)), encoder(**encoder.tokenize(positives)))
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        return value.item()

    return step


def peer_step(checkpointing: bool):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = 256
    if checkpointing:
        model[0].auto_model.gradient_checkpointing_enable()  # what its trainer does for gradient_checkpointing
    model.train()
    loss = MultipleNegativesRankingLoss(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)

    def step(anchors: list[str], positives: list[str]) -> float:
        value = loss([model.preprocess(anchors), model.preprocess(positives)], None)
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        return value.item()

    return step


def memory_worker(side: str, batch: int) -> None:
    torch.manual_seed(0)
    build = textcl_step if side.startswith("textcl") else peer_step
    step = build(checkpointing=side.endswith("checkpointing"))
    docs = scifact_docs(2 * batch + 8)
    step(docs[-8:-4], docs[-4:])  # warm-up: gradients and AdamW state exist from here on
    rows = []
    for _ in range(2):
        gc.collect()
        before = rss_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        loss = step(docs[:batch], docs[batch : 2 * batch])
        rows.append({"activation_mib": rss_mib("VmHWM") - before, "seconds": time.perf_counter() - start})
    best = min(rows, key=lambda row: row["activation_mib"])
    print("ROW " + json.dumps({"side": side, **best, "loss": loss}))


def memory(args: argparse.Namespace) -> None:
    results = {}
    for side in SIDES:
        command = [sys.executable, __file__, "memory", "--worker", side, "--batch", str(args.batch)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[side] = json.loads(output.split("ROW ", 1)[1].splitlines()[0])
        row = results[side]
        print(f"{side:22s} activations {row['activation_mib']:7.0f} MiB  step {row['seconds']:6.1f} s  "
              f"loss {row['loss']:.4f}", flush=True)
    print(f"\nbatch {args.batch} x 256 tokens (2 groups), fp32, torch threads {torch.get_num_threads()}, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    for library in ("textcl", "peer"):
        plain, checkpointed = results[library], results[f"{library}-checkpointing"]
        print(f"{library:6s} checkpointing / plain: activations {checkpointed['activation_mib'] / plain['activation_mib']:.2f}x"
              f", step time {checkpointed['seconds'] / plain['seconds']:.2f}x")
    ours, theirs = results["textcl-checkpointing"], results["peer-checkpointing"]
    print(f"textcl / peer, both checkpointing: activations {ours['activation_mib'] / theirs['activation_mib']:.2f}x, "
          f"step time {ours['seconds'] / theirs['seconds']:.2f}x")


def compile_worker(mode: str, steps: int, threads: int) -> None:
    """`steps` training steps as textcl's StepRunner takes them on CPU (chunks of 32, length-sorted)."""
    from textcl.config import ModelArguments, TrainingArguments
    from textcl.losses import InfoNCELoss
    from textcl.losses.gradcache import split_batch
    from textcl.training.setup import apply_training_options, build_encoder
    from textcl.training.step import by_length

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    encoder = build_encoder(ModelArguments(model_name_or_path=minilm_path(), max_seq_length=64, dropout=0.0)).train()
    apply_training_options(encoder, TrainingArguments(torch_compile=mode == "compiled"))
    loss_fn = InfoNCELoss(temperature=0.05)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=2e-5, fused=True)
    texts = sentences(64 * steps)

    def embed(group: dict) -> torch.Tensor:
        ordered, restore = by_length(group)
        return torch.cat([encoder(**chunk) for chunk in split_batch(ordered, 32)])[restore]

    times, losses = [], []
    for index in range(steps):
        batch = texts[64 * index : 64 * index + 64]
        anchors, positives = batch[:32], [" ".join(text.split()[: 4 + i % 8]) for i, text in enumerate(batch[32:])]
        start = time.perf_counter()
        value = loss_fn(embed(encoder.tokenize(anchors)), embed(encoder.tokenize(positives)))
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        losses.append(value.item())
    print("ROW " + json.dumps({"mode": mode, "first": times[0], "steady": statistics.median(times[2:]),
                               "steady_times": times[2:], "losses": losses}))


def compile_bench(args: argparse.Namespace) -> None:
    results = {}
    for mode in ("eager", "compiled", "eager"):  # eager again afterwards: the machine is shared, alternate sides
        command = [sys.executable, __file__, "compile", "--worker", mode, "--steps", str(args.steps),
                   "--threads", str(args.threads)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        row = json.loads(output.split("ROW ", 1)[1].splitlines()[0])
        results.setdefault(mode, []).append(row)
        print(f"{mode:9s} first step {row['first']:7.1f} s, steady step (median of {args.steps - 2}) "
              f"{row['steady']:.3f} s  [{min(row['steady_times']):.3f} - {max(row['steady_times']):.3f}]", flush=True)
    eager = min(row["steady"] for row in results["eager"])
    compiled = results["compiled"][0]
    gap = max(abs(a - b) for a, b in zip(compiled["losses"], results["eager"][0]["losses"]))
    print(f"\nMiniLM, batch 32 pairs in chunks of 32, fp32, {args.threads} thread(s), "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"compiled / eager steady step: {compiled['steady'] / eager:.2f}x (best eager {eager:.3f} s); "
          f"compilation (first step) {compiled['first']:.0f} s; largest loss gap over {args.steps} steps {gap:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=["memory", "compile"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker and args.part == "memory":
        memory_worker(args.worker, args.batch)
    elif args.worker:
        compile_worker(args.worker, args.steps, args.threads)
    elif args.part == "memory":
        memory(args)
    else:
        compile_bench(args)


if __name__ == "__main__":
    main()
