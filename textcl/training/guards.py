"""Guards that keep a run from ending "successfully" when it did not train: non-finite steps, collapse, a zero loss.

- `NonFiniteGuard`: a step whose loss or gradient norm is NaN or infinite is skipped (the trainer applies no
  update and queues no keys); `max_nonfinite_steps` such steps in a row stop the run with one line naming the
  last good checkpoint.
- `nonfinite_tensors`: the names of a module's non-finite parameters and buffers; nothing non-finite is saved.
- `training_warnings(records, batch_size)`: what the logged records of a finished run say went wrong:
  `collapse_warning` (the loss stuck at chance level, ln(batch), while every embedding sits on one point)
  and a loss of exactly 0 (nothing to contrast). The trainer prints them at the end of a run.
- `json_safe`: NaN and infinities as null, so metrics.jsonl stays standard JSON.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from textcl.errors import TextclError

# Collapse: the last quarter of the logged steps (at least 3) have a median uniformity above this (all
# embeddings within ~0.1 of one point: log E exp(-2 d^2) ~ -2 d^2) and a median loss at or above this share
# of ln(batch), the loss of a batch whose candidates all score the same.
COLLAPSED_UNIFORMITY = -0.05
CHANCE_LOSS_SHARE = 0.95
ZERO_LOSS = 1e-6


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None, in nested dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def finite(value: Tensor | float | None) -> bool:
    """A loss or norm is usable: not None, not NaN, not infinite."""
    if value is None:
        return True
    if isinstance(value, Tensor):
        return bool(torch.isfinite(value.detach()).all())
    return math.isfinite(value)


def gradient_norm(parameters: Iterable[nn.Parameter]) -> Tensor | None:
    """The 2-norm of this process's gradients (shards, under FSDP), or None when there are none."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False) if grads else None


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of `module`'s parameters and buffers that hold a NaN or an infinity (local shards under FSDP)."""
    bad = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local.detach()).all()):
            bad.append(name)
    return bad


def step_is_finite(loss: Tensor | float | None, grad_norm: Tensor | float | None) -> bool:
    """A step's loss and gradient norm are both finite (None: not measured)."""
    return finite(loss) and finite(grad_norm)


@dataclass
class NonFiniteGuard:
    """Counts optimizer steps in a row whose loss or gradient norm was not finite. `observe` records a step
    (its update is applied only when it was finite); `raise_if_diverged` stops the run after `max_nonfinite_steps` bad
    steps in a row, naming `last_checkpoint`."""

    max_nonfinite_steps: int = 3
    last_checkpoint: str | None = None
    streak: list[int] = field(default_factory=list)

    def observe(self, step: int, ok: bool) -> bool:
        """Record whether step `step` (1-based) was finite; returns `ok` (apply its update)."""
        self.streak = [] if ok else [*self.streak, step]
        return ok

    def raise_if_diverged(self) -> None:
        if len(self.streak) < self.max_nonfinite_steps:
            return
        first, last = self.streak[0], self.streak[-1]
        steps = f"step {last}" if first == last else f"steps {first}-{last}"
        kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written"
        raise TextclError(
            f"training diverged: a non-finite loss or gradient (NaN or inf) for {len(self.streak)} steps in a "
            f"row ({steps}); stopped without saving a model, {kept}; lower learning_rate or set max_grad_norm"
        )


def tail(records: list[dict[str, Any]], key: str) -> list[float]:
    """The finite values of `key` in the last quarter of the records that have it (at least 3 records)."""
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    recent = values[-max(3, len(values) // 4):] if len(values) >= 3 else []
    return [v for v in recent if math.isfinite(v)]


def collapse_warning(records: list[dict[str, Any]], batch_size: int) -> str | None:
    """A warning when the run's last logged steps look collapsed, else None.

    `records`: metrics.jsonl records (`loss`, `uniformity`); `batch_size`: the global batch (rows whose
    positives are each row's candidates). Collapse: the loss sits at (or above) ln(batch_size), the loss of a
    batch whose candidates all score the same, and uniformity is near 0, every embedding on one point.
    """
    losses, uniformity = tail(records, "loss"), tail(records, "uniformity")
    if not losses or not uniformity or batch_size < 2:
        return None
    chance, loss, spread = math.log(batch_size), statistics.median(losses), statistics.median(uniformity)
    if loss < CHANCE_LOSS_SHARE * chance or spread < COLLAPSED_UNIFORMITY:
        return None
    return (f"the embeddings collapsed: over the last {len(losses)} logged steps the loss stayed at {loss:.3f} "
            f"(ln({batch_size}) = {chance:.3f}, chance level) and uniformity at {spread:.3f} (every text on nearly "
            "one point); the model learned nothing usable: lower learning_rate")


def training_warnings(records: list[dict[str, Any]], batch_size: int) -> list[str]:
    """Warnings about a finished run from its logged `records` (collapse, a zero loss); empty when it looks sound."""
    warnings = [collapse_warning(records, batch_size)]
    losses = tail(records, "loss")
    if losses and max(losses) < ZERO_LOSS:
        warnings.append(
            f"the loss is 0 over the last {len(losses)} logged steps: no batch had a candidate to contrast "
            "(one-row batches, or every other text masked as a duplicate); nothing was learned: check that "
            "the data holds distinct texts"
        )
    return [warning for warning in warnings if warning]
