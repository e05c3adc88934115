"""Distillation benches of issue 16 on SciFact: student vs teacher, KL vs one-hot InfoNCE, re-mining vs static
negatives. Every model is evaluated on SciFact test (nDCG@10, textcl's evaluator) and STS-B test after
reloading its folder in fp32.

    python bench/distill.py student --seeds 42          # teacher, its 3-layer students, the peer's students
    python bench/distill.py kl --seeds 42 43 44         # 6-layer MiniLM: InfoNCE vs InfoNCE + KL, same data
    python bench/distill.py remine --seeds 42 43 44     # retrieval-hardneg: static vs re-mined every 20 steps
    python bench/distill.py remine --seeds 42 --max_steps 6 --remine_steps 3   # a smoke-sized run
    python bench/distill.py throughput                  # teacher vs the kl student, alternating in one process

The teacher is the retrieval-hardneg recipe's model (trained once at seed 42 into --work, or --teacher).
Data, made once into --work with textcl's commands as README's Distillation section shows: the teacher
shrunk to 3 layers (`textcl shrink`), SciFact train mined by the teacher with its scores (3 negatives,
`textcl mine`), and the recipe's own mined file for `remine`.

Sides:
  student  teacher          the teacher itself (evaluation and encode throughput only)
           kl               recipes/distill-small.yaml: the 3-layer student, InfoNCE + 400 x KL (T 0.05)
           infonce          the same student and data, distill_loss none (the ablation)
           peer-mse         sentence-transformers: the same 3-layer student, MSELoss against the teacher's
                            embeddings of SciFact train queries and documents (its distillation recipe)
           peer-margin      sentence-transformers: MarginMSELoss on (query, positive, negative_1, teacher margin)
  kl       infonce / kl     all-MiniLM-L6-v2 on the teacher-scored file: InfoNCE vs InfoNCE + 400 x KL
  remine   static / remine  recipes/retrieval-hardneg.yaml as it is, and with --remine_steps
Students and the kl sides train with the distill-small recipe's budget (4 epochs, batch 32, lr 1e-4; the kl
bench in bench/RESULTS.md ran with --num_train_epochs 2); the peer's students get the same epochs, batch and
learning rate. Throughput: documents/s encoding 2,000
SciFact documents (best of 2), student over teacher, measured after each side (so other load between sides
shows in it); `throughput` measures the teacher and the seed-42 kl student of a finished `student` run again,
alternating in one process, 3 rounds over 1,000 documents, best of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import SHARED, best_time, minilm_path, scifact_docs

SCIFACT = SHARED / "scifact"
SIDES = {"student": ["teacher", "kl", "infonce", "peer-mse", "peer-margin"], "kl": ["infonce", "kl"],
         "remine": ["static", "remine"]}


def cli(*arguments: str) -> None:
    from textcl.cli import main

    assert main([str(a) for a in arguments]) == 0, arguments


def prepared(work: Path, teacher: str | None) -> dict[str, Path]:
    """The teacher, its 3-layer shrink, the teacher-mined file and the recipe's mined file (made once)."""
    work.mkdir(parents=True, exist_ok=True)
    paths = {"teacher": Path(teacher) if teacher else work / "teacher", "student": work / "minilm-l3",
             "scored": work / "scifact-teacher.jsonl", "mined": work / "scifact-mined.jsonl"}
    if not paths["mined"].exists():
        cli("mine", minilm_path(), "--data", SCIFACT, "--split", "train", "--out", paths["mined"], "--num_negatives", 1,
            "--min_negatives", 0, "--query_max_length", 64)
    if not (paths["teacher"] / "modules.json").exists():
        cli("train", "recipes/retrieval-hardneg.yaml", "--model_name_or_path", minilm_path(), "--train_data",
            paths["mined"], "--output_dir", paths["teacher"], "--seed", 42, "--bf16", "false")
    if not (paths["student"] / "modules.json").exists():
        cli("shrink", paths["teacher"], "--num_layers", 3, "--out", paths["student"])
    if not paths["scored"].exists():
        cli("mine", paths["teacher"], "--data", SCIFACT, "--split", "train", "--out", paths["scored"],
            "--num_negatives", 3, "--min_negatives", 0, "--query_max_length", 64)
    return paths


def evaluate(folder: Path) -> dict[str, float]:
    from textcl import Encoder
    from textcl.evaluation.retrieval import evaluate_retrieval
    from textcl.evaluation.sts import evaluate_sts

    encoder = Encoder.load(folder)
    metrics = evaluate_retrieval(encoder, SCIFACT, "test", k_values=(10,))
    return {"ndcg@10": metrics["ndcg@10"], "stsb": evaluate_sts(encoder, SHARED / "stsb" / "test.tsv")["spearman"]}


def throughput(folder: Path) -> float:
    from textcl import Encoder

    encoder, docs = Encoder.load(folder), scifact_docs(2000)
    return len(docs) / best_time(lambda: encoder.encode(docs, batch_size=64), 2)


def train_textcl(recipe: str, overrides: list, seed: int, output: Path, args: argparse.Namespace) -> float:
    from textcl.config import load_config
    from textcl.training.trainer import train

    arguments = [*map(str, overrides), "--seed", str(seed), "--output_dir", str(output), "--overwrite_output_dir",
                 "true", "--bf16", "false"]
    if args.num_train_epochs:
        arguments += ["--num_train_epochs", str(args.num_train_epochs)]
    if args.max_steps:
        arguments += ["--max_steps", str(args.max_steps)]
    start = time.perf_counter()
    train(load_config(recipe, arguments))
    return time.perf_counter() - start


def train_peer_student(paths: dict[str, Path], loss_name: str, seed: int, output: Path, args: argparse.Namespace) -> float:
    """sentence-transformers' distillation of the same 3-layer student (MSELoss or MarginMSELoss), with the
    distill-small recipe's epochs (or --num_train_epochs), batch and learning rate."""
    import datasets
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
    from sentence_transformers.sentence_transformer import losses

    rows = [json.loads(line) for line in paths["scored"].read_text().splitlines()]
    student = SentenceTransformer(str(paths["student"]), device="cpu")
    if loss_name == "peer-mse":
        teacher = SentenceTransformer(str(paths["teacher"]), device="cpu")
        texts = list(dict.fromkeys([r["anchor"] for r in rows] + [r["positive"] for r in rows]))
        data = datasets.Dataset.from_dict({"sentence": texts, "label": list(teacher.encode(texts, batch_size=64))})
        loss = losses.MSELoss(student)
    else:
        kept = [r for r in rows if r.get("negative_1")]
        data = datasets.Dataset.from_dict({
            "query": [r["anchor"] for r in kept], "positive": [r["positive"] for r in kept],
            "negative": [r["negative_1"] for r in kept],
            "label": [r["positive_score"] - r["negative_1_score"] for r in kept]})
        loss = losses.MarginMSELoss(student)
    training = Arguments(output_dir=str(output / "peer-run"), use_cpu=True, seed=seed, save_strategy="no",
                         report_to="none", per_device_train_batch_size=32, learning_rate=1e-4,
                         num_train_epochs=args.num_train_epochs or recipe_epochs("recipes/distill-small.yaml"),
                         warmup_ratio=0.1, max_steps=args.max_steps or -1)
    start = time.perf_counter()
    SentenceTransformerTrainer(model=student, args=training, train_dataset=data, loss=loss).train()
    elapsed = time.perf_counter() - start
    student.save(str(output))
    return elapsed


def recipe_epochs(recipe: str) -> float:
    from textcl.config import load_config

    return load_config(recipe, []).training.num_train_epochs


def alternating_throughput(work: Path, teacher: Path, rounds: int = 3, n: int = 1000) -> None:
    """Documents/s of the teacher and the kl student, alternating in one process (best round of each)."""
    from textcl import Encoder

    docs = scifact_docs(n)
    models = {"teacher": Encoder.load(teacher, device="cpu"),
              "student": Encoder.load(work / "runs" / "student-kl-42", device="cpu")}
    best = {}
    for round_ in range(rounds):
        for name in list(models) if round_ % 2 == 0 else list(reversed(models)):
            seconds = best_time(lambda: models[name].encode(docs, batch_size=64), 1)
            best[name] = min(best.get(name, seconds), seconds)
            print(f"round {round_ + 1} {name}: {n / seconds:.1f} documents/s", flush=True)
    print(f"best: teacher {n / best['teacher']:.1f}, student {n / best['student']:.1f} documents/s; "
          f"student / teacher {best['teacher'] / best['student']:.2f}x")


def run_side(bench: str, side: str, seed: int, paths: dict[str, Path], args: argparse.Namespace) -> dict:
    output = args.work / "runs" / f"{bench}-{side}-{seed}"
    seconds = 0.0
    if side == "teacher":
        output = paths["teacher"]
    elif side.startswith("peer"):
        seconds = train_peer_student(paths, side, seed, output, args)
    elif bench == "student":
        overrides = ["--model_name_or_path", paths["student"], "--train_data", paths["scored"]]
        if side == "infonce":
            overrides += ["--distill_loss", "none"]
        seconds = train_textcl("recipes/distill-small.yaml", overrides, seed, output, args)
    elif bench == "kl":
        overrides = ["--model_name_or_path", minilm_path(), "--train_data", paths["scored"]]
        if side == "infonce":
            overrides += ["--distill_loss", "none"]
        seconds = train_textcl("recipes/distill-small.yaml", overrides, seed, output, args)
    else:
        overrides = ["--model_name_or_path", minilm_path(), "--train_data", paths["mined"]]
        if side == "remine":
            overrides += ["--remine_steps", args.remine_steps]
        seconds = train_textcl("recipes/retrieval-hardneg.yaml", overrides, seed, output, args)
    row = {"seed": seed, "seconds": seconds, **evaluate(output)}
    if bench == "student":
        row["docs_per_second"] = throughput(output)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bench", choices=[*SIDES, "throughput"])
    parser.add_argument("--sides", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--work", type=Path, default=Path("outputs/bench-distill"))
    parser.add_argument("--teacher", default=None, help="the teacher's folder (default: train it into --work)")
    parser.add_argument("--remine_steps", type=int, default=20)
    parser.add_argument("--num_train_epochs", type=int, default=None, help="epochs of every run (default: the recipe's)")
    parser.add_argument("--max_steps", type=int, default=None, help="cap every training run (smoke runs)")
    args = parser.parse_args()
    if args.bench == "throughput":
        return alternating_throughput(args.work, Path(args.teacher) if args.teacher else args.work / "teacher")
    paths = prepared(args.work, args.teacher)
    sides = args.sides or SIDES[args.bench]
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for seed in args.seeds:
        for side in sides:
            if side == "teacher" and results[side]:
                continue
            row = run_side(args.bench, side, seed, paths, args)
            results[side].append(row)
            print(f"RUN {args.bench} {side} {json.dumps(row)}", flush=True)
    print(f"\n{args.bench}: side, runs, nDCG@10 (mean ± sd), STS-B, train s (mean)" +
          (", docs/s" if args.bench == "student" else ""), file=sys.stdout)
    for side, rows in results.items():
        ndcg = [r["ndcg@10"] for r in rows]
        spread = statistics.stdev(ndcg) if len(ndcg) > 1 else 0.0
        line = (f"{side:12s} {len(rows):3d}  {statistics.mean(ndcg):.4f} ± {spread:.4f}  "
                f"{statistics.mean(r['stsb'] for r in rows):.4f}  {statistics.mean(r['seconds'] for r in rows):8.1f}")
        if "docs_per_second" in rows[0]:
            line += f"  {statistics.mean(r['docs_per_second'] for r in rows):7.1f}"
        print(line)


if __name__ == "__main__":
    main()
