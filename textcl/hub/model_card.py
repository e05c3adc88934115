"""Model cards: the README.md of every saved model, with the YAML front matter the Hugging Face Hub reads.

`model_card(encoder)` describes the model alone (architecture, adapter, usage). With a `TrainingRun` it
also states what the run did: data, loss, hyperparameters, the evaluation of the saved model (also as
the front matter's `model-index`, which the Hub renders) and the papers of the methods the run used.
Every statement comes from the run's config and what its batches held; nothing else is claimed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData, metadata_load, try_to_load_from_cache

from textcl.config import TrainConfig
from textcl.hub.citations import CITATIONS
from textcl.io.tables import table_columns
from textcl.model.encoder import Encoder
from textcl.model.location import packaged_copy
from textcl.model.lora import adapter_summary

TAGS = ["sentence-transformers", "sentence-similarity", "feature-extraction", "textcl"]
MINED_COLUMNS = {"positive_score", "negative_1_score"}  # what `textcl mine` writes next to the negatives
RETRIEVAL_METRICS = {"ndcg@10": "nDCG@10", "mrr@10": "MRR@10", "recall@10": "Recall@10",
                     "recall@100": "Recall@100", "map@100": "MAP@100"}


@dataclass
class TrainingRun:
    """What a finished run did, filled in by the trainer. The card reads the config's typed fields, so a
    renamed setting fails where the card reads it (tests/test_hub.py builds cards of every kind)."""

    config: TrainConfig
    metrics: dict[str, Any]  # evaluation of the saved model, as textcl.evaluation.evaluate returns it
    steps: int  # optimizer steps taken
    num_processes: int
    precision: str = "fp32"  # what the run computed in: fp32, bf16 or fp16
    train_rows: int | None = None  # None for streamed data
    best_step: int | None = None  # the kept model's step when metric_for_best_model chose it
    dropout_positives: bool = False  # some rows were their own positive (two dropout masks)
    hard_negatives: bool = False  # rows carried hard negatives
    # the run's evaluators (`textcl.evaluation.evaluators`: name, primary_metric, greater_is_better), whose
    # headline figures the card states first
    headlines: Sequence[Any] = ()

    @property
    def sources(self) -> list[str]:
        """The `train_data` sources (one or more)."""
        return list(self.config.data.train_data)


def hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub id rather than a local path (the only kind the front matter may name)."""
    if not name or Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    return name


def display_name(name: str, hub_section: str = "") -> str:
    """A Hub id as a link (`hub_section` "datasets/" for datasets); a local path as its last part only
    (cards get published: no local directories)."""
    return f"[{name}](https://huggingface.co/{hub_section}{name})" if hub_id(name) else f"`{Path(name).name}`"


def base_license(base: str | None) -> str | None:
    """The `license` of the base model's own card, read from disk only (local folder, Hub cache, shipped copy)."""
    if not base:
        return None
    readme: Any = Path(base) / "README.md"
    if hub_id(base):
        cached, shipped = try_to_load_from_cache(base, "README.md"), packaged_copy(base)
        readme = cached if isinstance(cached, str) else shipped[1] / "README.md" if shipped else None
    if readme is None or not Path(readme).is_file():
        return None
    return (metadata_load(readme) or {}).get("license")


def mined_data(run: TrainingRun) -> bool:
    """The run's hard negatives came from a table written by `textcl mine`."""
    files = [Path(source) for source in run.sources if Path(source).is_file()]
    return run.hard_negatives and any(MINED_COLUMNS <= set(table_columns(path)) for path in files)


def methods_used(run: TrainingRun | None, adapter: dict[str, Any] | None) -> list[str]:
    """Names (keys of CITATIONS) of the methods behind this model, in the order the card cites them."""
    if run is None:
        return ["LoRA"] if adapter else []
    c = run.config
    used = {
        "InfoNCE": True,
        "SimCSE": run.dropout_positives or c.model.pooling == "cls_mlp",
        "SupCon": bool(c.data.label_column),
        "GradCache": bool(c.loss.gradcache_chunk_size),
        "MoCo": c.loss.queue_size > 0,
        "DCL": c.loss.tau_plus > 0,
        "Matryoshka": bool(c.loss.matryoshka_dims),
        "GISTEmbed": bool(c.loss.guide_model),
        "ESimCSE": run.dropout_positives and "word_repetition" in c.data.augment,
        "NV-Retriever": mined_data(run),
        "LoRA": bool(c.model.lora),
    }
    return [name for name in CITATIONS if used[name]]


def eval_results(metrics: dict[str, Any], eval_beir: str | None, eval_beir_split: str) -> list[Any]:
    """The evaluation as huggingface_hub EvalResults (the front matter's model-index); `eval_beir` names the BEIR
    folder the retrieval figures come from."""
    results = []
    for path, figures in metrics.get("sts", {}).get("files", {}).items():
        name = "/".join(Path(path).parts[-2:])
        for key in ("spearman", "pearson"):
            results.append(EvalResult(
                task_type="semantic-similarity", task_name="Semantic Similarity", dataset_type=Path(path).parent.name,
                dataset_name=name, dataset_split=Path(path).stem, metric_type=f"{key}_cosine",
                metric_name=f"{key.title()} (cosine)", metric_value=round(figures[key], 4),
            ))
    retrieval = metrics.get("retrieval", {})
    beir = Path(eval_beir or "beir").name
    for key, label in RETRIEVAL_METRICS.items():
        if key in retrieval:
            results.append(EvalResult(
                task_type="information-retrieval", task_name="Information Retrieval", dataset_type=beir,
                dataset_name=beir, dataset_split=eval_beir_split, metric_type=f"cosine_{key}",
                metric_name=label, metric_value=round(retrieval[key], 4),
            ))
    return results


def front_matter(run: TrainingRun | None, model_id: str, adapter: dict[str, Any] | None) -> str:
    base = run.config.model.model_name_or_path if run else adapter and adapter["base_model"]
    datasets = [source for source in run.sources if hub_id(source)] if run else []
    results = eval_results(run.metrics, run.config.data.eval_beir, run.config.data.eval_beir_split) if run else []
    data = ModelCardData(
        library_name="sentence-transformers", pipeline_tag="sentence-similarity",
        tags=TAGS + (["lora", "peft"] if adapter else []), base_model=hub_id(base), license=base_license(base),
        datasets=datasets or None, model_name=model_id if results else None,
        eval_results=results or None,
    )
    return f"---\n{data.to_yaml()}\n---\n"


def describe_model(encoder: Encoder, run: TrainingRun | None, adapter: dict[str, Any] | None) -> str:
    rows = [
        ("Output dimension", str(encoder.dim)),
        ("Pooling", encoder.pooling + (", then a Dense layer" if encoder.dense is not None else "")),
        ("Normalized", "yes (unit vectors: dot product = cosine)" if encoder.normalize else "no"),
        ("Max sequence length", f"{encoder.max_seq_length} tokens"),
        ("Similarity", "cosine"),
    ]
    rows += [(f"Prompt `{name}`", f"`{text!r}`") for name, text in encoder.prompts.items()]
    lines = []
    if run:
        lines.append(f"Fine-tuned from {display_name(run.config.model.model_name_or_path)} with "
                     f"[textcl](https://github.com/textcl/textcl).")
    if adapter:
        lines.append(
            f"This folder holds a LoRA adapter (rank {adapter['r']}, alpha {adapter['alpha']}, on "
            f"{adapter['target_modules']}) over {display_name(adapter['base_model'] or 'the base model')}; loading it "
            "loads the base model and applies the adapter (needs `peft`)."
        )
    table = "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])
    return "\n\n".join([*lines, table])


def describe_training(run: TrainingRun, lora: dict[str, Any] | None) -> str:
    """The run's data, loss and hyperparameters; `lora` is the adapter it trained (also when saved merged)."""
    c = run.config
    beir = [Path(source).is_dir() for source in run.sources]
    data = ", ".join(display_name(source, "datasets/") for source in run.sources)
    data += f" ({run.train_rows:,} rows)" if run.train_rows else ""
    if any(beir):
        data += f"; BEIR folders: split `{c.data.train_split}`, each query paired with each relevant document"
    parts = []
    if run.dropout_positives and c.data.missing_positive == "dropout" and c.data.positive_column:
        parts.append(f"positives from column `{c.data.positive_column}`; rows without one are their own positive "
                     "through two dropout masks (`missing_positive: dropout`)")
    elif run.dropout_positives:
        parts.append("each text is its own positive through two dropout masks")
    elif not all(beir):
        parts.append(f"positives from column `{c.data.positive_column}`")
    if c.data.label_column:
        parts.append(f"rows sharing a `{c.data.label_column}` value are positives of each other")
    if run.hard_negatives:
        parts.append("hard negatives from the data" + (" (mined by `textcl mine`)" if mined_data(run) else ""))
    if c.data.augment:
        parts.append(f"augmentations: {', '.join(c.data.augment)}")
    global_batch = c.training.per_device_train_batch_size * run.num_processes
    loss = [f"InfoNCE, temperature {c.loss.temperature}" + (" (learnable)" if c.loss.learnable_temperature else ""),
            f"candidates: every positive{' and hard negative' if run.hard_negatives else ''} of the batch of "
            f"{global_batch} rows"]
    if c.loss.symmetric:
        loss.append("symmetric (positive to anchor as well)")
    if c.loss.anchor_negatives:
        loss.append("other anchors are negatives too")
    if c.loss.false_negative_margin is not None:
        judge = f" as judged by {display_name(c.loss.guide_model)}" if c.loss.guide_model else ""
        loss.append(f"candidates scoring above the positive + {c.loss.false_negative_margin}{judge} are masked")
    if c.loss.tau_plus > 0:
        loss.append(f"debiased with class prior {c.loss.tau_plus}")
    if c.loss.matryoshka_dims:
        loss.append(f"Matryoshka over dimensions {c.loss.matryoshka_dims}")
    if c.loss.queue_size > 0:
        loss.append(f"plus a queue of {c.loss.queue_size} keys from a momentum encoder ({c.loss.momentum})")
    warmup = c.training.warmup_steps or math.ceil(c.training.warmup_ratio * run.steps)
    hyper = [
        ("Learning rate", f"{c.training.learning_rate:g} ({c.training.lr_scheduler_type}, {warmup} warmup steps)"),
        ("Batch size", f"{c.training.per_device_train_batch_size} per process x {run.num_processes} = {global_batch}"),
        ("Optimizer steps", f"{run.steps}" + (f" (gradient accumulation {c.training.gradient_accumulation_steps})"
                                              if c.training.gradient_accumulation_steps > 1 else "")),
        ("Weight decay / max grad norm", f"{c.training.weight_decay:g} / {c.training.max_grad_norm:g}"),
        ("Precision", run.precision),
        ("Seed", str(c.training.seed)),
    ]
    if c.loss.gradcache_chunk_size:
        hyper.append(("GradCache chunk", f"{c.loss.gradcache_chunk_size} rows"))
    if lora:
        merged = "; saved merged into full weights" if c.model.lora_merge else ""
        hyper.append(("LoRA", f"r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
                              f"targets: {lora['target_modules']}; base weights frozen{merged}"))
    table = "\n".join(["| Hyperparameter | Value |", "|---|---|", *(f"| {k} | {v} |" for k, v in hyper)])
    return (f"## Training\n\n- **Data:** {data}" + "".join(f"; {part}" for part in parts) + ".\n"
            f"- **Loss:** {'; '.join(loss)}.\n\n{table}\n")


def describe_evaluation(run: TrainingRun) -> str:
    metrics = run.metrics
    if not metrics:
        return ""
    when = (f"the kept model (step {run.best_step}, the best by `{run.config.training.metric_for_best_model}`)"
            if run.best_step is not None else f"the final model (step {run.steps})")
    lines = [f"## Evaluation\n\nMeasured by textcl on {when}; cosine similarity.\n"]
    for evaluator in run.headlines:
        value = metrics.get(evaluator.name, {}).get(evaluator.primary_metric)
        if isinstance(value, (int, float)):
            better = "higher" if evaluator.greater_is_better else "lower"
            lines.append(f"- **{evaluator.name}** (headline `{evaluator.primary_metric}`, {better} is better): "
                         f"{value:.4f}")
    if run.headlines and len(lines) > 1:
        lines.append("")
    if "sts" in metrics:
        lines += ["| STS file | Spearman | Pearson | Pairs |", "|---|---|---|---|"]
        for path, f in metrics["sts"]["files"].items():
            lines.append(f"| {'/'.join(Path(path).parts[-2:])} | {f['spearman']:.4f} | {f['pearson']:.4f} | {f['n']} |")
        lines.append("")
    if "retrieval" in metrics:
        figures = metrics["retrieval"]
        shown = [key for key in RETRIEVAL_METRICS if key in figures]
        beir = f"{Path(run.config.data.eval_beir).name}, {run.config.data.eval_beir_split}"
        lines.append(f"| Retrieval ({beir}: {figures['n_queries']} queries, {figures['n_docs']} documents) | "
                     + " | ".join(RETRIEVAL_METRICS[key] for key in shown) + " |")
        lines.append("|---" * (len(shown) + 1) + "|")
        lines.append("| | " + " | ".join(f"{figures[key]:.4f}" for key in shown) + " |")
        lines.append("")
    return "\n".join(lines)


def describe_usage(model_id: str, encoder: Encoder, adapter: dict[str, Any] | None) -> str:
    texts = '["A man is playing a guitar.", "Someone plays an instrument."]'
    peft = " (with `peft` installed: this is an adapter)" if adapter else ""
    return f"""## Usage

With textcl (`pip install textcl`):

```python
from textcl import Encoder

encoder = Encoder.load("{model_id}")
embeddings = encoder.encode({texts})  # [2, {encoder.dim}]
```

With sentence-transformers{peft}:

```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{model_id}")
embeddings = model.encode({texts})
```

Semantic search with FAISS (`textcl.SearchIndex` in Python): index a corpus, one document a line, and query it:

```bash
textcl index {model_id} --corpus documents.txt --out my-index
textcl search my-index "how do plants make energy?" -k 5
```
"""


def describe_citations(names: list[str]) -> str:
    if not names:
        return ""
    blocks = [f"**{name}** ({CITATIONS[name][0]}):\n\n```bibtex\n{CITATIONS[name][1]}\n```" for name in names]
    return "## Citation\n\nMethods used by this model:\n\n" + "\n\n".join(blocks) + "\n"


def model_card(encoder: Encoder, run: TrainingRun | None = None, model_id: str = "path/to/model") -> str:
    """README.md text: front matter, model description, training and evaluation (with `run`), usage, citations.

    `model_id` is the name the usage examples load (a Hub id or a folder). A run with `lora_merge` saved
    its encoder merged, so the card describes a full model even though `encoder` still holds the adapter.
    """
    trained = adapter_summary(encoder.model)
    adapter = None if run and run.config.model.lora_merge else trained
    sections = [
        front_matter(run, model_id, adapter) + f"\n# {model_id}\n",
        f"A text embedding model: it maps sentences and paragraphs to {encoder.dim}-dimensional vectors for "
        "semantic search, clustering and similarity.\n\n" + describe_model(encoder, run, adapter) + "\n",
        describe_training(run, trained) if run else "",
        describe_evaluation(run) if run else "",
        describe_usage(model_id, encoder, adapter),
        describe_citations(methods_used(run, adapter)),
    ]
    return "\n".join(section for section in sections if section)


def write_model_card(
    encoder: Encoder, folder: str | Path, run: TrainingRun | None = None, model_id: str | None = None
) -> None:
    """Write `folder/README.md`; `model_id` defaults to the folder's name. Fits `Encoder.save(path,
    model_card=write_model_card)` for a card that describes the model alone."""
    folder = Path(folder)
    (folder / "README.md").write_text(model_card(encoder, run, model_id or folder.resolve().name), encoding="utf-8")
