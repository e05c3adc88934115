"""Issue 24's ablation on SciFact: who mines the hard negatives (the base model, or the round-1 model) x how many
(1 or 3), at retrieval-hardneg's budget, 3 seeds; every choice made on a dev split of SciFact train.

    python bench/retrieval_rounds.py ablation --seeds 42 43 44       # the four sides below, one table
    python bench/retrieval_rounds.py ablation --sides round1-5 --seeds 42 43 44   # a cheap variation
    python bench/retrieval_rounds.py recipe --seeds 42 43 44         # recipes/retrieval-rounds.yaml end to end
    python bench/retrieval_rounds.py final --recipe recipes/retrieval-hardneg.yaml --seeds 42 43 44  # as shipped
    python bench/retrieval_rounds.py student --data final-retrieval-hardneg --seeds 42 43 44   # 3-layer student
    python bench/retrieval_rounds.py hybrid --model outputs/bench-rounds/runs/recipe-42   # dense/BM25/hybrid
    python bench/retrieval_rounds.py ablation --sides base-1 round1-3 --seeds 42 --max_steps 2 --scale 0.02 \
        --per_device_train_batch_size 4 --work /tmp/rounds-smoke                   # a smoke run

The dev split: --dev_queries (100) of SciFact train's 919 claims, drawn with --split_seed (0), written with the
rest as a BEIR folder in --work (scifact-dev/: qrels/train.tsv without the dev claims, qrels/dev.tsv, the test
qrels as they are) and listed in --work/dev_queries.json. Every model trains on the 819 other claims and is
scored on dev and test; choose on dev, report test.

Sides (seed s trains every model; mined files of a seed-independent model are made once):
  base-1     negatives mined by the base model, 1 a claim (retrieval-hardneg's data)
  base-3     the same, 3 a claim
  round1-N   negatives mined by base-1's model of the same seed (the round-1 model), N a claim (N in 1, 3, 5)
Each row: dev and test nDCG@10, STS-B test Spearman, train seconds (for round1-N also the round-1 training
and the second mining: the whole recipe's time), general retrieval nDCG@10 on MRPC test (queries = first
sentences of the 1,147 paraphrase pairs, corpus = all 1,725 second sentences; a news-domain check that
tuning for SciFact keeps general retrieval; the base model's figure is printed first).
`recipe` times `textcl train recipes/retrieval-rounds.yaml` as one command (both rounds, rounds.json).
`final`: the shipped recipe as a user runs it (mine as its header says, train) on all 919 train claims, scored
on test only (its training saw the dev claims); the mining is timed once and added to every seed's time.
`student`: `textcl shrink` of the base model to 3 layers, InfoNCE on the --data side's negatives of seed s
for distill-small's 4 epochs (--data final-RECIPE: `final`'s negatives, all of train); its encode speed over
the teacher's (the --data side's seed-s model).
`hybrid`: `textcl eval MODEL --hybrid` on test, weighted fusion with the weight chosen on dev, and RRF; on SciFact
and on MRPC as retrieval with MRPC dev's pairs as its dev split (`general_set_with_dev`).
--scale < 1 cuts the corpus and claims (smoke runs only; figures then mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import time
from pathlib import Path

from common import SHARED, best_time, cpu_capability, minilm_path

SCIFACT = SHARED / "scifact"
SIDES = ["base-1", "base-3", "round1-1", "round1-3"]
RECIPE = "recipes/retrieval-hardneg.yaml"


def cli(*arguments: object) -> None:
    from textcl.cli import main

    assert main([str(a) for a in arguments]) == 0, arguments


def write_split(work: Path, dev_queries: int, seed: int, scale: float) -> Path:
    """SciFact with a dev split of train as a BEIR folder (made once; --scale < 1 keeps a share of it)."""
    folder = work / "scifact-dev"
    if (folder / "qrels" / "dev.tsv").is_file():
        return folder
    (folder / "qrels").mkdir(parents=True, exist_ok=True)

    def qrels(split: str) -> dict[str, list[tuple[str, str]]]:
        rows: dict[str, list[tuple[str, str]]] = {}
        with (SCIFACT / "qrels" / f"{split}.tsv").open() as handle:
            for query, doc, score in list(csv.reader(handle, delimiter="\t"))[1:]:
                rows.setdefault(query, []).append((doc, score))
        return rows

    train, test = qrels("train"), qrels("test")
    if scale < 1:
        train = dict(list(train.items())[: max(20, int(len(train) * scale))])
        test = dict(list(test.items())[: max(10, int(len(test) * scale))])
        dev_queries = min(dev_queries, len(train) // 4)
    dev = sorted(random.Random(seed).sample(sorted(train), dev_queries))
    for name, rows in (("train", {q: r for q, r in train.items() if q not in dev}), ("dev", {q: train[q] for q in dev}),
                       ("test", test)):
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, docs in rows.items() for d, s in docs]
        (folder / "qrels" / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    keep = {d for rows in (train, test) for docs in rows.values() for d, _ in docs}
    with (SCIFACT / "corpus.jsonl").open() as source, (folder / "corpus.jsonl").open("w") as target:
        for number, line in enumerate(source):
            if scale >= 1 or json.loads(line)["_id"] in keep or number < 5183 * scale:
                target.write(line)
    (folder / "queries.jsonl").write_text((SCIFACT / "queries.jsonl").read_text())
    (work / "dev_queries.json").write_text(json.dumps({"split_seed": seed, "of": len(train), "dev": dev}) + "\n")
    return folder


def paraphrase_set(folder: Path, splits: dict[str, list[dict]]) -> Path:
    """MRPC rows as a BEIR folder: each paraphrase pair's first sentence (a query of its split) finds its second
    among the second sentences of every row given (made once)."""
    if (folder / "qrels" / "test.tsv").is_file():
        return folder
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    docs = list(dict.fromkeys(row["sentence2"] for rows in splits.values() for row in rows))
    doc_id = {text: f"d{i}" for i, text in enumerate(docs)}
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": doc_id[t], "title": "", "text": t}) + "\n"
                                                 for t in docs))
    queries = []
    for split, rows in splits.items():
        pairs = [row for row in rows if row["label"] == "1"]
        queries += [json.dumps({"_id": f"{split}-q{i}", "text": row["sentence1"]}) + "\n" for i, row in enumerate(pairs)]
        lines = ["query-id\tcorpus-id\tscore"] + [f"{split}-q{i}\t{doc_id[row['sentence2']]}\t1"
                                                  for i, row in enumerate(pairs)]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    (folder / "queries.jsonl").write_text("".join(queries))
    return folder


def mrpc_rows(split: str) -> list[dict]:
    with (SHARED / "mrpc" / f"{split}.tsv").open() as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def general_set(work: Path, scale: float) -> Path:
    """MRPC test as a retrieval set: each paraphrase pair's first sentence finds its second among all seconds."""
    return paraphrase_set(work / "mrpc-retrieval", {"test": mrpc_rows("test")[: max(50, int(1725 * scale))]})


def general_set_with_dev(work: Path) -> Path:
    """`general_set` with MRPC dev's pairs as a dev split beside test (the corpus holds the second sentences of
    both), so that hybrid search's fusion weight is chosen on dev here too."""
    return paraphrase_set(work / "mrpc-hybrid", {"dev": mrpc_rows("dev"), "test": mrpc_rows("test")})


def mined(work: Path, model: str | Path, name: str, negatives: int, data: Path) -> Path:
    """SciFact train (without dev) mined by `model`, `negatives` a claim, as retrieval-hardneg mines (made once)."""
    out = work / "mined" / f"{name}-{negatives}.jsonl"
    if not out.is_file():
        cli("mine", model, "--data", data, "--split", "train", "--out", out, "--num_negatives", negatives,
            "--min_negatives", 0, "--query_max_length", 64)
    return out


def train(recipe: str, overrides: list, seed: int, output: Path, args: argparse.Namespace) -> float:
    from textcl.config import load_config
    from textcl.training.rounds import train as train_run

    arguments = [*map(str, overrides), "--seed", str(seed), "--output_dir", str(output), "--overwrite_output_dir",
                 "true"]
    if args.max_steps:
        arguments += ["--max_steps", str(args.max_steps)]
    if args.per_device_train_batch_size:
        arguments += ["--per_device_train_batch_size", str(args.per_device_train_batch_size)]
    start = time.perf_counter()
    train_run(load_config(recipe, arguments))
    return time.perf_counter() - start


def sts_file(work: Path, scale: float) -> Path:
    """STS-B test (a share of it with --scale < 1)."""
    if scale >= 1:
        return SHARED / "stsb" / "test.tsv"
    lines = (SHARED / "stsb" / "test.tsv").read_text().splitlines()
    (work / "stsb-test.tsv").write_text("\n".join(lines[: max(50, int(len(lines) * scale))]) + "\n")
    return work / "stsb-test.tsv"


def evaluate(folder: Path, data: Path, args: argparse.Namespace, splits: tuple[str, ...] = ("dev", "test")
             ) -> dict[str, float]:
    """nDCG@10 on `splits` of `data` (a model trained on all of SciFact train has no dev: NaN), STS-B test
    Spearman, and nDCG@10 on the general (MRPC) retrieval set."""
    from textcl import EncodeOptions, Encoder
    from textcl.evaluation.retrieval import evaluate_retrieval
    from textcl.evaluation.sts import evaluate_sts

    encoder = Encoder.load(folder)
    general = general_set(args.work, args.scale)
    cache = EncodeOptions(cache_dir=args.work / "cache")  # the corpus is encoded once for dev and test
    scores = {split: evaluate_retrieval(encoder, data, split, k_values=(10,), encode_options=cache)["ndcg@10"]
              for split in splits}
    return {"dev": float("nan"), **scores, "stsb": evaluate_sts(encoder, sts_file(args.work, args.scale))["spearman"],
            "general": evaluate_retrieval(encoder, general, "test", k_values=(10,))["ndcg@10"]}


def ablation_side(side: str, seed: int, data: Path, args: argparse.Namespace) -> dict:
    """Train (and score) one side at one seed; round1-N reuses (or makes) base-1's model of that seed."""
    runs = args.work / "runs"
    who, negatives = side.split("-")
    if who == "base":
        source = mined(args.work, minilm_path(), "base", int(negatives), data)
        extra = 0.0
    else:
        round_one = runs / f"base-1-{seed}"
        if not (runs / f"base-1-{seed}.json").is_file():  # base-1 of this seed is the round-1 model
            ablation_side("base-1", seed, data, args)
        record = json.loads((runs / f"base-1-{seed}.json").read_text())
        start = time.perf_counter()
        source = mined(args.work, round_one, f"round1-seed{seed}", int(negatives), data)
        extra = record["seconds"] + time.perf_counter() - start
    output = runs / f"{side}-{seed}"
    seconds = train(RECIPE, ["--model_name_or_path", minilm_path(), "--train_data", source, "--num_negatives",
                             negatives], seed, output, args)
    row = {"side": side, "seed": seed, "seconds": seconds, "recipe_seconds": seconds + extra,
           **evaluate(output, data, args)}
    (runs / f"{side}-{seed}.json").write_text(json.dumps(row) + "\n")
    return row


def recipe_run(seed: int, data: Path, args: argparse.Namespace) -> dict:
    output = args.work / "runs" / f"recipe-{seed}"
    seconds = train("recipes/retrieval-rounds.yaml", ["--model_name_or_path", minilm_path(), "--train_data", data],
                    seed, output, args)
    return {"side": "recipe", "seed": seed, "seconds": seconds, "recipe_seconds": seconds,
            **evaluate(output, data, args)}


def final_run(seed: int, args: argparse.Namespace) -> dict:
    """The shipped recipe (--recipe) as a user runs it, on all 919 SciFact train claims: mine with the base model as
    the recipe's header says (uncached, timed; the file is the same for every seed, so it is mined once and its
    time added to each seed's), train, score on test (dev is inside its training data)."""
    from textcl.cli import main as textcl

    recipe = Path(args.recipe)
    command = json.loads(recipe.read_text().split("# mine: ", 1)[1].splitlines()[0])
    mined_file = args.work / "mined" / f"full-{recipe.stem}.jsonl"
    timing = args.work / "mined" / f"full-{recipe.stem}.seconds"
    if not timing.is_file():
        start = time.perf_counter()
        assert textcl(["mine", minilm_path(), "--data", str(SCIFACT), "--split", "train", "--out", str(mined_file),
                       "--no_cache", *command]) == 0
        timing.write_text(f"{time.perf_counter() - start}\n")
    output = args.work / "runs" / f"final-{recipe.stem}-{seed}"
    seconds = train(str(recipe), ["--model_name_or_path", minilm_path(), "--train_data", mined_file], seed, output,
                    args)
    return {"side": f"final-{recipe.stem}", "seed": seed, "seconds": seconds,
            "recipe_seconds": seconds + float(timing.read_text()), **evaluate(output, SCIFACT, args, ("test",))}


def student_run(seed: int, data: Path, args: argparse.Namespace) -> dict:
    from common import scifact_docs

    from textcl import Encoder

    student = args.work / "minilm-l3"
    if not (student / "modules.json").is_file():
        cli("shrink", minilm_path(), "--num_layers", 3, "--out", student)
    teacher, splits = args.work / "runs" / f"{args.data}-{seed}", ("dev", "test")
    if args.data.startswith("final-"):  # `final`'s data (all of SciFact train) and model of seed s
        source, data, splits = args.work / "mined" / f"full-{args.data[6:]}.jsonl", SCIFACT, ("test",)
    elif args.data.startswith("base-"):
        source = mined(args.work, minilm_path(), "base", int(args.data[5:]), data)
    else:
        source = mined(args.work, args.work / "runs" / f"base-1-{seed}", f"round1-seed{seed}",
                       int(args.data.split("-")[1]), data)
    output = args.work / "runs" / f"student-{args.data}-{seed}"
    seconds = train("recipes/distill-small.yaml", ["--model_name_or_path", student, "--train_data", source,
                                                   "--distill_loss", "none"], seed, output, args)
    docs = scifact_docs(1000)
    models = {name: Encoder.load(folder, device="cpu") for name, folder in (("student", output), ("teacher", teacher))
              if (folder / "modules.json").is_file()}
    speed = {name: len(docs) / best_time(lambda m=model: m.encode(docs, batch_size=64), 2)
             for name, model in models.items()}
    return {"side": f"student-{args.data}", "seed": seed, "seconds": seconds, "recipe_seconds": seconds,
            **evaluate(output, data, args, splits),
            "speedup": speed["student"] / speed["teacher"] if "teacher" in speed else float("nan")}


def table(rows: list[dict]) -> None:
    print(f"\nCPU: {cpu_capability()}; side, runs, dev nDCG@10, test nDCG@10 (mean ± sd), STS-B test, MRPC "
          "retrieval nDCG@10, train s, whole recipe s (means)")
    for side in dict.fromkeys(row["side"] for row in rows):
        mine = [row for row in rows if row["side"] == side]
        test = [row["test"] for row in mine]
        spread = statistics.stdev(test) if len(test) > 1 else 0.0
        mean = {key: statistics.mean(row[key] for row in mine) for key in
                ("dev", "stsb", "general", "seconds", "recipe_seconds")}
        extra = f"  speed x{statistics.mean(r['speedup'] for r in mine):.2f}" if "speedup" in mine[0] else ""
        print(f"{side:18s} {len(mine):2d}  {mean['dev']:.4f}  {statistics.mean(test):.4f} ± {spread:.4f}  "
              f"{mean['stsb']:.4f}  {mean['general']:.4f}  {mean['seconds']:8.1f}  {mean['recipe_seconds']:8.1f}{extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bench", choices=["ablation", "recipe", "final", "student", "hybrid"])
    parser.add_argument("--sides", nargs="+", default=SIDES)
    parser.add_argument("--data", default="round1-3", help="student: the side whose negatives it trains on")
    parser.add_argument("--model", default=None, help="hybrid: the model to evaluate")
    parser.add_argument("--recipe", default=RECIPE, help="final: the recipe to run on all of SciFact train")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--work", type=Path, default=Path("outputs/bench-rounds"))
    parser.add_argument("--dev_queries", type=int, default=100)
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=None, help="cap every training run (smoke runs)")
    parser.add_argument("--scale", type=float, default=1.0, help="share of SciFact to use (smoke runs)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=None, help="(smoke runs; default: the "
                        "recipe's)")
    args = parser.parse_args()
    (args.work / "runs").mkdir(parents=True, exist_ok=True)
    data = write_split(args.work, args.dev_queries, args.split_seed, args.scale)
    if args.bench == "hybrid":
        for folder in (data, general_set_with_dev(args.work)):
            for fusion in (["--fusion", "weighted", "--fusion_dev_split", "dev"], ["--fusion", "rrf"]):
                name = f"hybrid-{Path(args.model or 'base').name}-{folder.name}-{fusion[1]}.json"
                cli("eval", args.model or minilm_path(), "--beir", folder, "--split", "test", "--hybrid", *fusion,
                    "--json", args.work / name, "--cache_dir", args.work / "cache")
        return
    if args.bench == "ablation":
        print(f"RUN base {json.dumps(evaluate(Path(minilm_path()), data, args))}", flush=True)
    rows = []
    for seed in args.seeds:
        for side in args.sides if args.bench == "ablation" else [args.bench]:
            row = (ablation_side(side, seed, data, args) if args.bench == "ablation" else
                   recipe_run(seed, data, args) if args.bench == "recipe" else
                   final_run(seed, args) if args.bench == "final" else student_run(seed, data, args))
            rows.append(row)
            print(f"RUN {json.dumps(row)}", flush=True)
    table(rows)


if __name__ == "__main__":
    main()
