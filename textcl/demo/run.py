"""`textcl demo`: the embedded default, offline, on public-domain sentences bundled in `textcl/demo/data/`.

The task is inverse-cloze retrieval (Lee et al. 2019): the query is a random contiguous fragment of a
sentence (about a third of its words), the document is the whole sentence, and the other sentences of the
batch are the negatives. The demo fine-tunes the shipped all-MiniLM-L6-v2 for one epoch on the training
sentences and measures the task on held-out sentences before and after. It also checks that general
similarity is not damaged: the mean cosine of random pairs, the uniformity of the held-out sentences, and the
top answers of a few general questions over a fixed list of general documents must not get worse.
"""

from __future__ import annotations

import csv
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from textcl.config import TrainConfig
from textcl.evaluation.geometry import alignment_uniformity
from textcl.io.atomic import write_text_atomically
from textcl.losses.infonce import InfoNCELoss
from textcl.model.encoder import Encoder
from textcl.model.location import packaged_copy
from textcl.model.precision import autocast, resolve_precision
from textcl.training.trainer import train

HUB_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
HELD_OUT = 1000  # sentences kept out of training: the documents (and, cropped, the queries) of the evaluation
CROP_FRACTION, MIN_CROP_WORDS = 0.35, 4
SEED = 0
BATCH_SIZE, LEARNING_RATE, TEMPERATURE, MAX_SEQ_LENGTH = 64, 3e-5, 0.05, 64
METRICS = ("recall@1", "mrr@10", "ndcg@10")
MAX_COSINE_RISE = 0.05  # random pairs may grow this much closer before the demo warns
MAX_UNIFORMITY_RISE = 0.05  # uniformity (lower is more uniform) may rise this much before the demo warns

# General questions and documents that have nothing to do with the speeches (written for textcl, public
# domain): the base model ranks each question's answer first, and the fine-tuned model must keep doing so.
SANITY_ANSWERS = {
    "why is the sky blue": "Sunlight is scattered by the air, and blue light is scattered the most, so the sky "
                           "looks blue.",
    "how do plants make their food": "Plants turn sunlight, water and carbon dioxide into sugar through "
                                     "photosynthesis.",
    "how to fix a flat tire on my bike": "To mend a punctured bicycle tyre, take out the inner tube, find the hole "
                                         "and glue a patch over it.",
    "when did world war two end": "The war in Europe ended in May 1945, and Japan surrendered that September.",
    "what is the best way to learn a foreign language": "Speaking with native speakers every day is the quickest "
                                                        "way to become fluent in a language.",
}
SANITY_QUERIES = tuple(SANITY_ANSWERS)
SANITY_DOCUMENTS = (
    *SANITY_ANSWERS.values(),
    "Thunder is the sound of air expanding suddenly around a bolt of lightning.",
    "The Moon's gravity pulls on the oceans and raises the tides.",
    "Bread rises because yeast releases carbon dioxide into the dough.",
    "A marathon is a running race of a little over 42 kilometres.",
    "Cats sleep for twelve to sixteen hours a day.",
    "Python is a popular programming language for data analysis.",
    "The stock market fell sharply after the central bank raised interest rates.",
)


def default_model() -> str:
    """The shipped all-MiniLM-L6-v2 (the `demo` extra) when installed, else its Hub id."""
    copy = packaged_copy(HUB_MODEL)
    return str(copy[1]) if copy else HUB_MODEL


def demo_rows() -> list[dict[str, str]]:
    """The bundled sentences, in a fixed shuffled order: `text` and `source` (see README's data credits)."""
    with resources.files("textcl.demo").joinpath("data/speeches.tsv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def split_rows(rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, held-out rows): the first HELD_OUT sentences are held out (the file is already shuffled)."""
    return rows[HELD_OUT:], rows[:HELD_OUT]


def crop(text: str, rng: random.Random) -> str:
    """A random contiguous run of CROP_FRACTION of the words of `text` (at least MIN_CROP_WORDS)."""
    words = text.split()
    length = min(len(words), max(MIN_CROP_WORDS, round(CROP_FRACTION * len(words))))
    start = rng.randrange(len(words) - length + 1)
    return " ".join(words[start:start + length])


def query_document_pairs(rows: list[dict[str, str]], seed: int = SEED) -> list[tuple[str, str]]:
    """(fragment, sentence) for each row; the fragments are drawn from random.Random(seed)."""
    rng = random.Random(seed)
    return [(crop(row["text"], rng), row["text"]) for row in rows]


def write_beir(held_out: list[dict[str, str]], folder: Path) -> None:
    """A BEIR folder: every held-out sentence is a document (d0, d1, ...) and a fragment of it the query
    (q0, q1, ...) to which it alone is relevant."""
    pairs = query_document_pairs(held_out, seed=SEED + 1)
    (folder / "qrels").mkdir(parents=True)
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"_id": f"d{i}", "title": "", "text": doc}) + "\n"
                          for i, (_, doc) in enumerate(pairs))
    with (folder / "queries.jsonl").open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"_id": f"q{i}", "text": query}) + "\n" for i, (query, _) in enumerate(pairs))
    with (folder / "qrels" / "test.tsv").open("w", encoding="utf-8") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        handle.writelines(f"q{i}\td{i}\t1\n" for i in range(len(pairs)))


def write_train(rows: list[dict[str, str]], path: Path) -> None:
    """The training rows: `anchor` a fragment, `positive` its sentence."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["anchor", "positive"])
        writer.writerows(query_document_pairs(rows))


def write_documents(held_out: list[dict[str, str]], path: Path) -> None:
    """The held-out sentences as a corpus for `textcl index` (one `{"_id", "text"}` a line)."""
    write_text_atomically(path, "".join(json.dumps({"_id": f"d{i}", "text": row["text"]}) + "\n"
                                        for i, row in enumerate(held_out)))


def demo_config(model: str, train_file: Path, output_dir: str, beir: Path) -> TrainConfig:
    """The run: the trainer evaluates the task on the held-out BEIR folder before (step 0) and after, so its
    summary and the demo's table are one evaluation."""
    return TrainConfig.from_dict({
        "model_name_or_path": model, "max_seq_length": MAX_SEQ_LENGTH, "eval_beir": str(beir),
        "train_data": str(train_file), "temperature": TEMPERATURE, "symmetric": True,
        "output_dir": output_dir, "overwrite_output_dir": True, "seed": SEED,
        "per_device_train_batch_size": BATCH_SIZE, "num_train_epochs": 1, "learning_rate": LEARNING_RATE,
        "warmup_ratio": 0.1, "logging_steps": 10, "bf16": "auto",
    })


def general_checks(encoder: Encoder, documents: Sequence[str]) -> dict[str, Any]:
    """What fine-tuning must not damage: `random_pair_cosine` (mean cosine of `documents` paired with a fixed
    shuffle of themselves), `uniformity` (Wang & Isola; lower is more uniform) over `documents`, and the top
    SANITY_DOCUMENTS answer of each SANITY_QUERIES question (`sanity`: question -> document)."""
    shuffled = list(documents)
    random.Random(SEED).shuffle(shuffled)
    geometry = alignment_uniformity(encoder, [(a, b) for a, b in zip(documents, shuffled) if a != b])
    queries = encoder.encode(list(SANITY_QUERIES), normalize=True, convert_to_tensor=True)
    answers = encoder.encode(list(SANITY_DOCUMENTS), normalize=True, convert_to_tensor=True)
    top = (queries @ answers.T).argmax(dim=1).tolist()
    return {
        # for unit vectors ||a - b||^2 = 2 - 2 cos(a, b), so the alignment of random pairs gives their mean cosine
        "random_pair_cosine": 1 - geometry["alignment"] / 2,
        "uniformity": geometry["uniformity"],
        "sanity": {query: SANITY_DOCUMENTS[i] for query, i in zip(SANITY_QUERIES, top)},
    }


def seconds_per_text(encoder: Encoder, texts: Sequence[str]) -> float:
    """The time to embed one text for evaluation, measured on a batch of `texts` (after a warm-up batch)."""
    sample = list(texts[:BATCH_SIZE])
    encoder.encode(sample[:8])
    started = time.perf_counter()
    encoder.encode(sample)
    return (time.perf_counter() - started) / len(sample)


def base_task(output_dir: str) -> dict[str, Any]:
    """The base model's task metrics: the run's own step-0 evaluation in metrics.jsonl."""
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("step") == 0 and "retrieval" in record:
            return record["retrieval"]
    raise RuntimeError("the run logged no step-0 evaluation")  # the trainer always does with eval_beir


def cpu_and_memory() -> str:
    """`peak memory 2.1 GB`: this process's peak resident memory (what the machine must hold for the demo)."""
    import resource  # POSIX only; the demo's closing line is the one place that asks

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return f"peak memory {peak / (2**30 if sys.platform == 'darwin' else 2**20):.1f} GB"


def seconds_per_step(encoder: Encoder, pairs: Sequence[tuple[str, str]], precision: str) -> float:
    """The time of one training step's forwards and backward on a batch of `pairs` (the faster of two, the first
    being a warm-up); the weights are not changed."""
    loss_fn = InfoNCELoss(TEMPERATURE, symmetric=True, gather_across_processes=False)
    queries, documents = (list(side) for side in zip(*pairs[:BATCH_SIZE]))
    encoder.train()
    times = []
    for _ in range(2):
        started = time.perf_counter()
        with autocast(encoder.device, precision):
            anchor = encoder(**encoder.tokenize(queries, max_length=MAX_SEQ_LENGTH))
            positive = encoder(**encoder.tokenize(documents, max_length=MAX_SEQ_LENGTH))
            loss = loss_fn(anchor, positive)
        loss.backward()
        times.append(time.perf_counter() - started)
    encoder.zero_grad(set_to_none=True)
    encoder.eval()
    return min(times)


def print_comparison(before: dict[str, Any], after: dict[str, Any], checks: dict[str, Any]) -> None:
    task, general = (before["task"], after["task"]), (before["general"], after["general"])
    print(f"\nFind the sentence from a fragment: {task[0]['n_queries']} held-out fragments, "
          f"{task[0]['n_docs']} held-out sentences")
    print(f"{'':<24}{'before':>9}{'after':>9}")
    for name in METRICS:
        print(f"{name:<24}{task[0][name]:>9.4f}{task[1][name]:>9.4f}")
    print("\nGeneral similarity (must not get worse)")
    print(f"{'random-pair cosine':<24}{general[0]['random_pair_cosine']:>9.4f}{general[1]['random_pair_cosine']:>9.4f}"
          f"   (may rise by {MAX_COSINE_RISE} at most)")
    print(f"{'uniformity (lower=good)':<24}{general[0]['uniformity']:>9.4f}{general[1]['uniformity']:>9.4f}"
          f"   (may rise by {MAX_UNIFORMITY_RISE} at most)")
    for query in SANITY_QUERIES:
        kept = general[0]["sanity"][query] == general[1]["sanity"][query]
        print(f"  {query!r} -> {general[1]['sanity'][query][:60]!r}{'' if kept else '  (CHANGED)'}")
    if checks["passed"]:
        print("Checks passed: the task improved and general similarity held.")
    for warning in checks["warnings"]:
        print(f"textcl: warning: {warning}", file=sys.stderr)


def check(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """{"passed": bool, "warnings": [...]}: the task improved, and general similarity did not get worse."""
    warnings = []
    if not after["task"]["mrr@10"] > before["task"]["mrr@10"]:
        warnings.append("the held-out task did not improve (mrr@10)")
    rise = after["general"]["random_pair_cosine"] - before["general"]["random_pair_cosine"]
    if rise > MAX_COSINE_RISE:
        warnings.append(f"random pairs grew {rise:.3f} more similar (more than {MAX_COSINE_RISE})")
    rise = after["general"]["uniformity"] - before["general"]["uniformity"]
    if rise > MAX_UNIFORMITY_RISE:
        warnings.append(f"uniformity rose by {rise:.3f} (more than {MAX_UNIFORMITY_RISE})")
    changed = [q for q in SANITY_QUERIES if before["general"]["sanity"][q] != after["general"]["sanity"][q]]
    if changed:
        warnings.append(f"the top answer changed for {', '.join(map(repr, changed))}")
    return {"passed": not warnings, "warnings": warnings}


def run(model: str | None = None, output_dir: str = "textcl-demo") -> dict[str, Any]:
    """Evaluate, train, evaluate again; print the comparison and return {"before", "after"} (each {"task": the
    retrieval metrics, "general": `general_checks`}), "checks" (`check`), "train_seconds" and "documents" (the
    held-out corpus file it wrote for `textcl index`)."""
    started = time.perf_counter()
    model = model or default_model()
    train_rows, held_out = split_rows(demo_rows())
    documents = [row["text"] for row in held_out]
    with tempfile.TemporaryDirectory() as scratch:
        beir, train_file = Path(scratch) / "beir", Path(scratch) / "train.tsv"
        write_beir(held_out, beir)
        write_train(train_rows, train_file)
        encoder = Encoder.load(model)
        precision, why = resolve_precision("auto", encoder.device)
        steps = math.ceil(len(train_rows) / BATCH_SIZE)
        print(f"textcl demo: fine-tune {model}\n"
              f"  task: find a sentence from a random fragment of ~{CROP_FRACTION:.0%} of its words (inverse cloze), "
              f"in-batch negatives\n"
              f"  train: {len(train_rows)} sentences of public-domain US presidential speeches, 1 epoch = {steps} "
              f"steps of batch {BATCH_SIZE}, learning rate {LEARNING_RATE}, {precision} ({why})\n"
              f"  evaluate before and after: {len(held_out)} held-out sentences, and general-similarity checks")
        general_before = general_checks(encoder, documents)
        step_seconds = seconds_per_step(encoder, query_document_pairs(train_rows), precision)
        # evaluations: the task's queries and documents, before and after; the checks' pairs of documents twice
        evaluation_seconds = 2 * (2 * len(held_out) + 2 * len(documents)) * seconds_per_text(encoder, documents)
        print(f"  estimated time: {(steps * step_seconds + evaluation_seconds) / 60:.1f} min ({steps} training steps "
              f"x {step_seconds:.1f} s, and {evaluation_seconds / 60:.1f} min of evaluations, from timing one step and "
              "one batch just now)")
        metrics = train(demo_config(model, train_file, output_dir, beir))
        before = {"task": base_task(output_dir), "general": general_before}
        after = {"task": metrics["retrieval"], "general": general_checks(Encoder.load(output_dir), documents)}
    train_seconds = metrics["train"]["train_runtime"]
    corpus = Path(output_dir) / "held_out_documents.jsonl"
    write_documents(held_out, corpus)
    checks = check(before, after)
    print_comparison(before, after, checks)
    print(f"\nTook {(time.perf_counter() - started) / 60:.1f} min in all, {train_seconds / 60:.1f} min of it training, "
          f"in {precision} ({why}); {cpu_and_memory()}.\nThe model is in {output_dir}/ (a sentence-transformers "
          f"folder). Search the held-out sentences with it:\n"
          f"  textcl index {output_dir} --corpus {corpus} --out demo-index\n"
          f"  textcl search demo-index \"taxes on imported goods\" -k 3\n"
          f"  textcl serve demo-index   # a search page and API on http://127.0.0.1:8000 "
          f"(pip install \"textcl[serve]\")")
    return {"before": before, "after": after, "checks": checks, "train_seconds": train_seconds,
            "documents": str(corpus)}
