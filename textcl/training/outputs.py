"""The output folder of a run: everything in it but the checkpoints (`textcl.training.checkpoint`).

- `prepare_output_dir`: refuse to mix two runs in one folder, or clear the old run when asked to overwrite;
- `RunOutputs`: metrics.jsonl (and the trackers of `report_to`), best_model/, the final model with its card
  (README.md) and textcl.json, and the push to the Hub, all read from the run's `OutputPlan`;
- `save_model_folder`: a model folder that never looks half-written. The final model is staged in
  `output_dir/.model.tmp/` and moved into place file by file with the files that make a folder look like a
  model (config.json, modules.json) last: a folder that looks like a model is whole.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from textcl.errors import TextclError
from textcl.evaluation.evaluators import Evaluator, evaluations_of
from textcl.hub.model_card import TrainingRun, write_model_card
from textcl.hub.push import push_to_hub
from textcl.io.atomic import fsync_dir, fsync_tree, is_out_of_space, space_error, write_folder, write_text_atomically
from textcl.io.targets import refusal
from textcl.model.encoder import Encoder
from textcl.training.guards import json_safe
from textcl.training.plan import OutputPlan
from textcl.version import __version__

RUN_ARTIFACTS = ("checkpoint-*", ".checkpoint-*.tmp", "best_model", ".best_model.*", ".model.tmp", "metrics.jsonl",
                 "textcl.json")
# The files that make a folder look like a model to Encoder.load and sentence-transformers, moved in last.
MODEL_MARKERS = ("config.json", "adapter_config.json", "modules.json")
BEST_MODEL = "best_model"

def prepare_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse to mix two runs in one folder unless asked to overwrite it or resume the run in it.

    Overwriting removes the previous run's checkpoints, metrics and the files that make its model look like a
    model (so a killed new run never leaves the old model looking like its result).
    """
    holds_run = output_dir.exists() and any(any(output_dir.glob(pattern)) for pattern in RUN_ARTIFACTS)
    holds_model = output_dir.exists() and any(any(output_dir.glob(pattern)) for pattern in MODEL_MARKERS)
    if (holds_run or holds_model) and not (overwrite or resuming):
        refused = refusal(output_dir, "a run" if holds_run else "a model", "--overwrite_output_dir true")
        raise TextclError(f"{refused}{' (or --resume_from_checkpoint latest to continue it)' if holds_run else ''}")
    if (holds_run or holds_model) and overwrite and not resuming:
        for pattern in (*RUN_ARTIFACTS, *MODEL_MARKERS):
            for path in output_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in (*output_dir.glob(".checkpoint-*.tmp"), *output_dir.glob(".model.tmp")):
        shutil.rmtree(stale, ignore_errors=True)


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a line a kill cut short is skipped."""
    path = output_dir / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def trim_metrics(output_dir: Path, step: int) -> None:
    """Drop the records of steps after `step` (logged by a run killed after its last checkpoint, about to be
    logged again by the resumed run) and any line the kill cut short."""
    path = output_dir / "metrics.jsonl"
    if path.exists():
        kept = [record for record in read_metrics(output_dir) if record.get("step", 0) <= step]
        write_text_atomically(path, "".join(json.dumps(record) + "\n" for record in kept))


def state_bytes(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Bytes of a module's parameters (and buffers, unless `trainable_only`): about what saving it writes."""
    tensors = [p for p in module.parameters() if p.requires_grad or not trainable_only]
    tensors += [] if trainable_only else list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def link_or_copy_tree(source: Path, target: Path) -> None:
    """A copy of folder `source` at `target`, hard-linking files where the filesystem allows (no extra space)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def save_model_folder(
    write: Callable[[Path], Any], target: Path, needed: int, what: str = "the model",
    fix: str = "free some space or choose another output_dir",
) -> None:
    """Write a model into folder `target` (which may hold other files) so that it never looks half-written.

    `write(staging)` writes the whole model into `target/.model.tmp/`; its files are flushed and then moved
    into `target`, the marker files (config.json, modules.json) last and the old markers removed first. A
    failure removes the staging folder; a full disk is one line with about `needed` bytes.
    """
    target = Path(target)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    staging = target / ".model.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        write(staging)
        fsync_tree(staging)
    except Exception as error:
        written = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) if staging.exists() else 0
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(target.iterdir()):
            target.rmdir()
        if is_out_of_space(error):
            raise space_error(what, target, max(needed, written), fix) from error
        raise
    for marker in MODEL_MARKERS:
        (target / marker).unlink(missing_ok=True)
    order = {name: rank for rank, name in enumerate(MODEL_MARKERS, start=1)}
    for item in sorted(staging.iterdir(), key=lambda p: (order.get(p.name, 0), p.name)):
        destination = target / item.name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(item, destination)
    staging.rmdir()
    fsync_dir(target)


class RunOutputs:
    """Writes the output folder of one run (`plan`); every process calls the methods, the main one writes.

    `model_bytes`: about what the saved model takes, for the full-disk messages.
    """

    def __init__(self, plan: OutputPlan, accelerator: Accelerator, model_bytes: int = 0) -> None:
        self.plan, self.accelerator, self.model_bytes = plan, accelerator, model_bytes
        self.folder = plan.output_dir

    def log(self, record: dict[str, Any]) -> None:
        """Append `record` (its "step" and anything else) to metrics.jsonl and hand its numbers to the trackers."""
        record = json_safe(record)  # NaN is not JSON: non-finite values are logged as null
        if self.accelerator.is_main_process:
            with (self.folder / "metrics.jsonl").open("a") as handle:
                handle.write(json.dumps(record, allow_nan=False) + "\n")
        flat = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        for group, values in record.items():
            if isinstance(values, dict):
                flat |= {f"{group}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}
        self.accelerator.log(flat, step=record["step"])

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.folder)

    def save_best(self, encoder: Encoder | None) -> None:
        """best_model/ holds `encoder` (given on the main process, None on the others)."""
        if encoder is not None:
            write_folder(self.folder / BEST_MODEL, encoder.save, "the best model", self.model_bytes)
        self.accelerator.wait_for_everyone()

    def kept_best(self) -> Path | None:
        """best_model/ when the run keeps its best model and one was saved."""
        best = self.folder / BEST_MODEL
        return best if best.exists() else None

    def saved_evaluation(self, metrics: dict[str, Any], best_step: int | None, evaluators: Sequence[Evaluator]
                         ) -> tuple[dict[str, Any], int | None]:
        """(evaluation, step) of the saved model: the final `metrics`, or, when the run kept the model of
        `best_step`, that step's evaluation as logged in metrics.jsonl (step None: the final model). Matched by
        step, not by value: the base model's evaluation (step 0) can equal a later one."""
        if best_step is None:
            return metrics, None
        for record in self.records():
            if record.get("step") == best_step and evaluations_of(record, evaluators):
                return evaluations_of(record, evaluators), best_step
        return metrics, None

    def install(self, encoder: Encoder | None, best: Path | None, write_card: Callable[[Path], None],
                last_checkpoint: str | None) -> None:
        """Write the final model (`encoder`, or the kept `best` folder) and its card (`write_card(folder)`) into
        output_dir, never half a model. Main process only."""
        fix = "free some space, then " + (
            f"resume with --resume_from_checkpoint latest ({Path(last_checkpoint).name} is intact)" if last_checkpoint
            else "rerun (no checkpoint was written: set save_steps to keep one)")

        def write(staging: Path) -> None:
            if best is None:
                encoder.save(staging)
            else:
                link_or_copy_tree(best, staging)
            write_card(staging)

        save_model_folder(write, self.folder, self.model_bytes, "the final model", fix)
        if best is not None:
            shutil.rmtree(best)

    def write_card(self, folder: Path, encoder: Encoder, run: TrainingRun) -> None:
        """folder/README.md describing `run`."""
        write_model_card(encoder, folder, run, self.plan.model_id)

    def write_run_file(self, config: dict[str, Any], metrics: dict[str, Any]) -> None:
        """textcl.json: the resolved `config` (rerunnable as a recipe) and the final metrics. Main process only."""
        run = {"textcl_version": __version__, "config": config, "metrics": json_safe(metrics)}
        write_text_atomically(self.folder / "textcl.json", json.dumps(run, indent=2) + "\n")

    def push(self) -> None:
        """Push output_dir to the Hub when the plan says so (main process only)."""
        if self.plan.push_to_hub and self.accelerator.is_main_process:
            url = push_to_hub(self.folder, self.plan.model_id, private=self.plan.hub_private_repo,
                              revision=self.plan.hub_revision)
            print(f"pushed {self.folder} to {url}")
