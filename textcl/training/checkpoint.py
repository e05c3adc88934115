"""Checkpoints that survive a kill at any moment, and the output_dir rules around them.

`accelerator.save_state` writes into `.checkpoint-N.tmp/`, which is renamed to `checkpoint-N/`
only once complete; a run killed mid-write leaves the previous checkpoints untouched and the temp
folder is ignored (and cleaned) later. Resuming restores model, optimizer, scheduler, RNG states
and every object registered with `accelerator.register_for_checkpointing` (the training position,
the negative queue).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator

from textcl.errors import TextclError

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
RUN_ARTIFACTS = ("checkpoint-*", ".checkpoint-*.tmp", "best_model", "metrics.jsonl", "textcl.json")


@dataclass
class TrainingPosition:
    """Where training stands; saved in every checkpoint so a resume continues mid-epoch exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    best_metric: float | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name))]
    return [path for _, path in sorted(found)]


def resolve_resume(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    """`latest` -> the newest complete checkpoint (None if there is none yet); a path must exist."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise TextclError(f"resume_from_checkpoint {str(path)!r} does not exist")
    return path


def prepare_output_dir(output_dir: Path, overwrite: bool, resuming: bool) -> None:
    """Refuse to mix two runs in one folder unless asked to overwrite it or resume the run in it."""
    holds_run = output_dir.exists() and any(any(output_dir.glob(pattern)) for pattern in RUN_ARTIFACTS)
    if holds_run and not (overwrite or resuming):
        raise TextclError(
            f"output_dir {str(output_dir)!r} already holds a run; pass --overwrite_output_dir true to replace it "
            "or --resume_from_checkpoint latest to continue it"
        )
    if holds_run and overwrite and not resuming:
        for pattern in RUN_ARTIFACTS:
            for path in output_dir.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """Write checkpoint-`step` atomically (temp folder + rename) and keep only the newest `keep`."""
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        fsync_dir(output_dir)
        for old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def fsync_dir(path: Path) -> None:
    """Make a rename durable (the directory entry itself is flushed)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_dir(source: Path, target: Path) -> None:
    """Move the finished folder `source` to `target` atomically (a temp sibling, then rename)."""
    if target.exists():
        shutil.rmtree(target)
    os.replace(source, target)
