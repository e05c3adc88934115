"""The measuring steps of bench/gpu.sh: textcl vs sentence-transformers on one GPU, same random-init model and data.

    python bench/gpu_bench.py STEP [STEP ...] --report OUT/gpu.json --work DIR [--dry_run]

Steps (gpu.sh gives each its own time limit): env, models, train_fp32_b64, train_bf16_b512,
train_gradcache_b4096, train_hardneg, encode, recipe, onnx, decoder. Each merges its figures into the report
as it goes (bench/gpu_report.py). `--dry_run` runs every step on the CPU with tiny models, a few steps and
small data, so that the GPU run can only fail on GPU matters; the real shapes are then built on the meta device.

Training figures reuse bench/train_throughput.py's runs (textcl's `train` vs `SentenceTransformerTrainer` with
(Cached)MultipleNegativesRankingLoss, no-duplicates batches); each side runs in a fresh process (its own peak
GPU memory). anchors/s is the steady rate between step `warmup` and the last step (CUDA warm-up, allocator
growth and autotuning excluded), taken from textcl's own log and from a trainer callback on the peer's side;
the whole-run rate that each trainer reports is kept beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from gpu_report import record

BENCH = Path(__file__).resolve().parent
CARRIED = ["datasets", "dill", "multiprocess", "faiss-cpu", "bm25s", "PyStemmer"]  # bench/gpu_wheels.sh downloads these
# train_throughput's mode keys, plus precision, steps and the warm-up steps left out of the steady rate.
TRAIN = {
    "train_fp32_b64": {"batch": 64, "max_length": 32, "query_length": 32, "negatives": 0, "chunk": None,
                       "bf16": False, "steps": 40, "warmup": 10},
    "train_bf16_b512": {"batch": 512, "max_length": 32, "query_length": 32, "negatives": 0, "chunk": None,
                        "bf16": True, "steps": 30, "warmup": 10},
    "train_gradcache_b4096": {"batch": 4096, "max_length": 32, "query_length": 32, "negatives": 0, "chunk": 64,
                              "bf16": True, "steps": 8, "warmup": 2},
    "train_hardneg": {"batch": 64, "max_length": 256, "query_length": 64, "negatives": 3, "chunk": None,
                      "bf16": True, "steps": 20, "warmup": 5},
    # the decoder step's training (Qwen3-0.6B shape, unsupervised pairs)
    "train_decoder": {"batch": 64, "max_length": 64, "query_length": 64, "negatives": 0, "chunk": None,
                      "bf16": True, "steps": 12, "warmup": 4},
}
DRY_TRAIN = {"batch": 4, "steps": 3, "warmup": 1}
ENCODE = {"short": 16384, "docs": 4096}  # texts per measurement (dry run: DRY_TEXTS)
ENCODE_BATCH = 256
DRY_TEXTS = 16  # texts per encoding measurement in the dry run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("steps", nargs="+")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--dry_run", action="store_true")
    parser.add_argument("--side", choices=["textcl", "peer"], help="internal: one training side in this process")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.side:
        return print("RESULT " + json.dumps(train_side(args.steps[0], args.side, args.work, args.dry_run)))
    for step in args.steps:
        started = time.perf_counter()
        STEPS[step](args)
        print(f"gpu_bench: {step} done in {time.perf_counter() - started:.1f}s", flush=True)


def device_name(dry_run: bool) -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu (dry run)" if dry_run else "cpu: torch sees no GPU"


def env(args: argparse.Namespace) -> None:
    """Versions, the GPU, onnxruntime's providers, and whether the carried wheels' needs meet the image."""
    from importlib import metadata

    import torch

    names = ["torch", "transformers", "tokenizers", "accelerate", "sentence-transformers", "peft", "safetensors",
             "huggingface-hub", "numpy", "scipy", "pyarrow", "fsspec", "onnx", "onnxruntime", "onnxruntime-gpu",
             "deepspeed", "textcl", *CARRIED]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError as error:
        providers = [f"no onnxruntime: {error}"]
    cuda = torch.cuda.is_available()
    record(args.report, "env", {
        "device": device_name(args.dry_run), "python": platform.python_version(), "versions": versions,
        "cuda": torch.version.cuda, "gpu_count": torch.cuda.device_count() if cuda else 0,
        "bf16_supported": cuda and torch.cuda.is_bf16_supported(), "onnxruntime_providers": providers,
        "requirement_problems": requirement_problems(CARRIED), "dry_run": args.dry_run,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    })


def requirement_problems(packages: list[str]) -> list[str]:
    """Each unmet requirement of `packages` (their Requires-Dist, markers evaluated here) in this environment."""
    from importlib import metadata

    from packaging.requirements import Requirement

    problems = []
    for package in packages:
        try:
            requires = metadata.requires(package) or []
        except metadata.PackageNotFoundError:
            problems.append(f"{package} is not installed")
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                version = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{package} needs {requirement}: not installed")
                continue
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{package} needs {requirement}: {version} installed")
    return problems


def model_dir(work: Path, shape: str) -> Path:
    return work / "models" / shape


def models(args: argparse.Namespace) -> None:
    """Random-init MiniLM and bert-base folders; attention implementation and padding of both libraries."""
    import torch
    from gpu_setup import build_model, check_real_shapes
    from sentence_transformers import SentenceTransformer

    from textcl import Encoder

    parameters, attention = {}, {}
    for shape in ("minilm", "bert-base"):
        folder = build_model(shape, model_dir(args.work, shape), tiny=args.dry_run)
        ours, peer = Encoder.load(folder), SentenceTransformer(str(folder))
        parameters[shape] = sum(p.numel() for p in ours.model.parameters())
        attention[shape] = {"textcl": ours.model.config._attn_implementation,
                            "peer": peer[0].auto_model.config._attn_implementation}
        del ours, peer
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    from textcl.config import DataArguments, TrainingArguments

    defaults = {f.name: f.default for cls in (DataArguments, TrainingArguments) for f in dataclasses.fields(cls)}
    padding = {
        "textcl_training": "each group padded to its longest row; forward_chunk_size "
                           f"{defaults.get('forward_chunk_size')} (None = 0 on a GPU: whole groups, no "
                           f"length sorting); group_by_length {defaults.get('group_by_length')}; not unpadded",
        "textcl_encode": "texts sorted by token length, each batch padded to its longest (length-bucketed)",
        "peer_training": "each batch padded to its longest row (no bucketing by default)",
        "peer_encode": "texts sorted by length, each batch padded to its longest (length-bucketed)",
    }
    record(args.report, "models", {"parameters": parameters, "real_shape_parameters": check_real_shapes(),
                                   "attn_implementation": attention, "padding": padding, "tiny": args.dry_run})


def train_mode(step: str, dry_run: bool) -> dict[str, Any]:
    mode = dict(TRAIN[step])
    if dry_run:  # bf16 on a CPU builds kernels for each new shape (seconds under load): one step proves it
        mode |= DRY_TRAIN | ({"chunk": 2} if mode["chunk"] else {}) | {"bf16": step == "train_bf16_b512"}
    return mode


def train_columns(mode: dict[str, Any]) -> dict[str, list[str]]:
    """Unsupervised (s, s) rows, or SciFact-shaped (claim, abstract, 3 other abstracts) rows."""
    from gpu_setup import documents, short_sentences, texts

    rows = mode["batch"] * mode["steps"]
    if not mode["negatives"]:
        sentences = short_sentences(rows)
        return {"anchor": sentences, "positive": sentences}
    docs = documents(rows * (1 + mode["negatives"]), seed=7)
    columns = {"anchor": texts(rows, 10, 25, seed=8), "positive": docs[:rows]}
    for j in range(mode["negatives"]):
        columns[f"negative_{j + 1}"] = docs[rows * (j + 1): rows * (j + 2)]
    return columns


def padding_fraction(mode: dict[str, Any], columns: dict[str, list[str]], tokenizer) -> float:
    """Share of pad tokens in the first 10 batches when each column of a batch is padded to its longest row."""
    pads = total = 0
    for start in range(0, min(10, mode["steps"]) * mode["batch"], mode["batch"]):
        for name, values in columns.items():
            limit = mode["query_length"] if name == "anchor" else mode["max_length"]
            lengths = [len(ids) for ids in tokenizer(values[start:start + mode["batch"]], truncation=True,
                                                      max_length=limit)["input_ids"]]
            pads += max(lengths) * len(lengths) - sum(lengths)
            total += max(lengths) * len(lengths)
    return round(pads / total, 4)


def train_side(step: str, side: str, work: Path, dry_run: bool) -> dict[str, Any]:
    """One side of a training comparison in this process: steady and whole-run anchors/s, peak GPU memory."""
    import torch
    from train_throughput import run_peer, run_textcl

    mode = train_mode(step, dry_run)
    columns, model = train_columns(mode), model_dir(work, "qwen3-0.6b" if step == "train_decoder" else "minilm")
    use_cpu = not torch.cuda.is_available()
    if not use_cpu:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(dir=work) as folder:
        if side == "textcl":
            whole = run_textcl(mode, columns, mode["steps"], mode["bf16"], Path(folder), str(model), use_cpu,
                               logging_steps=mode["warmup"])
            steady = textcl_steady_rate(Path(folder) / "out" / "metrics.jsonl", mode)
        else:
            clock = step_clock(mode["warmup"], mode["steps"])
            whole = run_peer(mode, columns, mode["steps"], mode["bf16"], Path(folder), str(model), use_cpu, (clock,))
            steady = mode["batch"] * (mode["steps"] - mode["warmup"]) / (clock.times[1] - clock.times[0])
    gib = 2**30
    return {"anchors_per_second": round(steady, 1), "anchors_per_second_whole_run": round(whole, 1),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 3) if not use_cpu else 0.0,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 3) if not use_cpu else 0.0}


def textcl_steady_rate(metrics: Path, mode: dict[str, Any]) -> float:
    """Anchors/s between the first logged step (`warmup`) and the last, from textcl's running rates: the
    running rate at step k is k * batch / elapsed_k."""
    logged = [json.loads(line) for line in metrics.read_text().splitlines()]
    logged = [r for r in logged if "samples_per_second" in r]
    first, last = logged[0], logged[-1]
    elapsed = [r["step"] * mode["batch"] / r["samples_per_second"] for r in (first, last)]
    return (last["step"] - first["step"]) * mode["batch"] / (elapsed[1] - elapsed[0])


def step_clock(warmup: int, steps: int):
    """A transformers TrainerCallback noting the (synchronized) time at the end of steps `warmup` and `steps`."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, steps):
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.times.append(time.perf_counter())

    return StepClock()


def train(step: str):
    """A step comparing textcl with the peer in one training setting (TRAIN[step])."""

    def run(args: argparse.Namespace) -> None:
        from gpu_setup import build_tokenizer

        mode = train_mode(step, args.dry_run)
        record(args.report, step, {"settings": mode, "padding_fraction": padding_fraction(
            mode, train_columns(mode), build_tokenizer())})
        for side in ("peer", "textcl"):
            result = side_result(step, side, args)
            record(args.report, step, {side: result})
        done = json.loads(args.report.read_text())[step]
        ratio = done["textcl"]["anchors_per_second"] / done["peer"]["anchors_per_second"]
        record(args.report, step, {"ratio": round(ratio, 3)})

    return run


def side_result(step: str, side: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one side in a fresh process (in this one for the dry run, which only proves the code path)."""
    if args.dry_run:
        return train_side(step, side, args.work, dry_run=True)
    command = [sys.executable, __file__, step, "--side", side, "--report", str(args.report), "--work", str(args.work)]
    output = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(output.split("RESULT ", 1)[1].splitlines()[0])


def sized(args: argparse.Namespace, count: int) -> int:
    return DRY_TEXTS if args.dry_run else count


def encode_rates(encoders: dict[str, Any], texts: list[str], dry_run: bool) -> dict[str, float]:
    """Texts/s of each `encoders[name](texts)` (best of 2 after a warm-up: kernels, allocator, autotuning)."""
    from encode_throughput import best_rates

    if not dry_run:
        for run in encoders.values():
            run(texts[:ENCODE_BATCH * 2])
    runs = {name: partial(run, texts) for name, run in encoders.items()}
    return {name: round(rate, 1) for name, rate in best_rates(runs, len(texts), 1 if dry_run else 2).items()}


def encode(args: argparse.Namespace) -> None:
    """Texts/s at batch 256 of textcl `Encoder.encode` vs `SentenceTransformer.encode`, short sentences and
    256-token documents, bf16 and fp32. bf16 is each library's own way: textcl's `precision="bf16"` (autocast)
    against the peer's bf16 copy of the model (`model.bfloat16()`, as its docs advise)."""
    import numpy as np
    import torch
    from gpu_setup import documents, short_sentences
    from sentence_transformers import SentenceTransformer

    from textcl import Encoder

    count = {name: sized(args, n) for name, n in ENCODE.items()}
    data = {"short": short_sentences(count["short"], seed=11), "docs": documents(count["docs"], seed=12)}
    for shape in ("minilm", "bert-base"):
        folder = str(model_dir(args.work, shape))
        ours, peer = Encoder.load(folder), SentenceTransformer(folder)
        assert np.allclose(ours.encode(data["short"][:16]), peer.encode(data["short"][:16]), atol=1e-4), shape
        peer_bf16 = SentenceTransformer(folder).bfloat16()
        for kind, texts in data.items():
            for precision in ("bf16", "fp32"):
                encoders = {"textcl": partial(ours.encode, batch_size=ENCODE_BATCH, precision=precision),
                            "peer": partial((peer_bf16 if precision == "bf16" else peer).encode,
                                            batch_size=ENCODE_BATCH)}
                rates = encode_rates(encoders, texts, args.dry_run)
                record(args.report, "encode", {f"{shape}.{kind}.{precision}": {
                    **rates, "ratio": round(rates["textcl"] / rates["peer"], 3), "texts": len(texts)}})
        del ours, peer, peer_bf16
        gc.collect()
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


def onnx(args: argparse.Namespace) -> None:
    """textcl's ONNX export encoded by onnxruntime's CUDA provider, where the image has onnxruntime-gpu."""
    import onnxruntime

    from textcl import Encoder
    from textcl.cli import main as cli

    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    if not cuda and not args.dry_run:
        reason = (f"onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (providers "
                  f"{onnxruntime.get_available_providers()}): onnxruntime-gpu is not in the image")
        return record(args.report, "onnx", {"status": "skipped", "reason": reason})
    from gpu_setup import documents, short_sentences

    folder = args.work / "onnx-minilm"
    assert cli(["export", str(model_dir(args.work, "minilm")), "--out", str(folder)]) == 0, "textcl export failed"
    device = "cuda" if cuda else "cpu"
    ours, torch_side = Encoder.load(folder, backend="onnx", device=device), Encoder.load(folder, device=device)
    figures = {}
    for kind, texts in (("short", short_sentences(sized(args, ENCODE["short"]), seed=11)),
                        ("docs", documents(sized(args, ENCODE["docs"]), seed=12))):
        encoders = {"onnx": partial(ours.encode, batch_size=ENCODE_BATCH),
                    "torch": partial(torch_side.encode, batch_size=ENCODE_BATCH)}
        figures[f"minilm.{kind}.fp32"] = encode_rates(encoders, texts, args.dry_run)
    record(args.report, "onnx", {"status": "ok" if cuda else "skipped",
                                 "reason": None if cuda else "dry run on the CPU provider", **figures})


def recipe(args: argparse.Namespace) -> None:
    """retrieval-hardneg for 30 steps on SciFact-shaped random data: mine with the base model, train with
    forward_chunk_size 0 (whole groups), evaluate on the test qrels; through the CLI as a user runs it."""
    from gpu_setup import write_beir

    from textcl.cli import main as cli

    sizes = {"documents_count": 60, "queries_count": 40, "train_pairs": 16, "test_pairs": 8} if args.dry_run else {}
    beir, model = write_beir(args.work / "scifact-shaped", **sizes), str(model_dir(args.work, "minilm"))
    out, mined = args.work / "recipe-out", args.work / "scifact-mined.jsonl"
    settings = {"max_steps": 2 if args.dry_run else 30, "forward_chunk_size": 0, "logging_steps": 1,
                "per_device_train_batch_size": 4 if args.dry_run else 32}
    started = time.perf_counter()
    mine = ["mine", model, "--data", str(beir), "--split", "train", "--out", str(mined), "--num_negatives", "1",
            "--min_negatives", "0", "--query_max_length", "64", "--no_cache"]
    assert cli(mine) == 0, "textcl mine failed"
    mine_seconds = time.perf_counter() - started
    flags = [item for key, value in settings.items() for item in (f"--{key}", str(value))]
    started = time.perf_counter()
    command = ["train", str(BENCH.parent / "recipes" / "retrieval-hardneg.yaml"), "--model_name_or_path", model,
               "--train_data", str(mined), "--output_dir", str(out), *flags]
    assert cli(command) == 0, "textcl train failed"
    train_seconds = time.perf_counter() - started
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert cli(["eval", str(out), "--beir", str(beir), "--split", "test", "--json", str(args.work / "eval.json")]) == 0
    metrics = json.loads((args.work / "eval.json").read_text())
    record(args.report, "recipe", {"mine_seconds": round(mine_seconds, 1), "train_seconds": round(train_seconds, 1),
                                   "losses": [r["loss"] for r in logged if "loss" in r], "settings": settings,
                                   "ndcg_at_10": find_metric(metrics, "ndcg_at_10")})


def find_metric(tree: Any, name: str) -> float | None:
    """The first value named like `name` anywhere in a nested evaluation result."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            if name in key.lower().replace("@", "_at_") and isinstance(value, (int, float)):
                return value
            found = find_metric(value, name)
            if found is not None:
                return found
    return None


def decoder(args: argparse.Namespace) -> None:
    """A Qwen3-0.6B-shaped decoder (last-token pooling): encode bf16 and train batch 64 bf16, textcl vs peer."""
    from gpu_setup import build_model, documents, short_sentences

    from textcl.model.pooling import POOLING_MODES

    if "last_token" not in POOLING_MODES:
        return record(args.report, "decoder", {"status": "skipped", "reason": "textcl has no last_token pooling"})
    import torch
    from sentence_transformers import SentenceTransformer

    from textcl import Encoder

    folder = build_model("qwen3-0.6b", model_dir(args.work, "qwen3-0.6b"), tiny=args.dry_run)
    ours, peer = Encoder.load(folder), SentenceTransformer(str(folder)).bfloat16()
    parameters = sum(p.numel() for p in ours.model.parameters())
    for kind, texts in (("short", short_sentences(sized(args, 4096), seed=11)),
                        ("docs", documents(sized(args, 1024), seed=12))):
        encoders = {"textcl": partial(ours.encode, batch_size=ENCODE_BATCH, precision="bf16"),
                    "peer": partial(peer.encode, batch_size=ENCODE_BATCH)}
        record(args.report, "decoder", {f"encode.{kind}.bf16": encode_rates(encoders, texts, args.dry_run)})
    del ours, peer
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    for side in ("peer", "textcl"):
        record(args.report, "decoder", {f"train_bf16_b64.{side}": side_result("train_decoder", side, args)})
    record(args.report, "decoder", {"status": "ok", "parameters": parameters})


def decoder_lora(args: argparse.Namespace) -> None:
    """bench/decoder.py (the decoder issue's own bench): a Qwen3-Embedding-0.6B-shaped LoRA training step and
    encoding at batch 32 x 512 tokens, GradCache, gradient checkpointing; its JSON lines go into the report."""
    script = BENCH / "decoder.py"
    if not script.exists():
        return record(args.report, "decoder_lora", {"status": "skipped", "reason": "no bench/decoder.py"})
    tiny = ["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads", "4", "--kv_heads", "2",
            "--head_dim", "16", "--vocab", "1000", "--batch", "4", "--seq", "16", "--steps", "2"]
    output = subprocess.run([sys.executable, str(script), *(tiny if args.dry_run else [])], stdout=subprocess.PIPE,
                            text=True, check=True).stdout
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    record(args.report, "decoder_lora", {"status": "ok", "measurements": lines})


STEPS = {"env": env, "models": models, **{step: train(step) for step in TRAIN if step != "train_decoder"},
         "encode": encode, "recipe": recipe, "onnx": onnx, "decoder": decoder, "decoder_lora": decoder_lora}

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
