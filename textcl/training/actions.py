"""What the trainer does between optimizer steps, as a list of actions (in the spirit of transformers'
`TrainerCallback`): logging, stopping a diverged run, re-mining, evaluation, checkpointing.

After every optimizer step the trainer calls `action.on_step_end(trainer)` for each of `trainer.actions`, in
order; an action decides itself whether it is due. A user adds one from Python:

    class PrintLoss:
        def on_step_end(self, trainer):
            if trainer.position.step % 100 == 0:
                print(trainer.position.step, trainer.last_loss)

    textcl.train(config, actions=[PrintLoss()])

An action that talks to other processes (a collective) must run on every process at the same steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from textcl.errors import TextclError
from textcl.evaluation.evaluators import Evaluator, RetrievalEvaluator, STSEvaluator, headline
from textcl.training.plan import EvaluationPlan, OutputPlan

if TYPE_CHECKING:
    from textcl.training.trainer import Trainer


class Action(Protocol):
    """Something to do after an optimizer step, when due."""

    def on_step_end(self, trainer: Trainer) -> None: ...


@dataclass
class LogStep:
    """Every `logging_steps` and at the last step: loss, learning rate, speed and the batch statistics, to
    metrics.jsonl, the trackers and the progress bar."""

    logging_steps: int

    def on_step_end(self, trainer: Trainer) -> None:
        step = trainer.position.step
        if step % self.logging_steps and step != trainer.total_steps:
            return
        rate = trainer.samples / (time.perf_counter() - trainer.started)
        record = {"step": step, "epoch": trainer.position.epoch, "loss": trainer.last_loss,
                  "learning_rate": trainer.scheduler.get_last_lr()[0], "samples_per_second": rate}
        record |= trainer.steps.statistics()
        trainer.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['learning_rate']:.2e}", sps=f"{rate:.1f}")
        trainer.outputs.log(record)


class StopIfDiverged:
    """Stop the run after `max_nonfinite_steps` non-finite steps in a row (`textcl.training.guards`)."""

    def on_step_end(self, trainer: Trainer) -> None:
        if len(trainer.guard.streak) >= trainer.guard.max_nonfinite_steps:
            trainer.bar.close()
            trainer.guard.raise_if_diverged()


class Remine:
    """Every `remine_steps` (but the last step): new hard negatives mined with the model being trained."""

    def on_step_end(self, trainer: Trainer) -> None:
        step = trainer.position.step
        if trainer.remining is not None and trainer.remining.due(step) and step < trainer.total_steps:
            trainer.outputs.log({"step": step, **trainer.remining.remine(trainer.evaluation_encoder())})


@dataclass
class Evaluate:
    """Every `eval_steps`: run the evaluators, log their results, keep the best model."""

    eval_steps: int

    def on_step_end(self, trainer: Trainer) -> None:
        if self.eval_steps and trainer.position.step % self.eval_steps == 0:
            metrics = trainer.evaluate()
            trainer.outputs.log({"step": trainer.position.step, **metrics})
            trainer.keep_best(metrics)


@dataclass
class SaveCheckpoint:
    """Every `save_steps`: a checkpoint (`textcl.training.checkpoint`)."""

    save_steps: int

    def on_step_end(self, trainer: Trainer) -> None:
        if self.save_steps and trainer.position.step % self.save_steps == 0:
            trainer.checkpoint()


def default_actions(evaluation: EvaluationPlan, output: OutputPlan) -> list[Action]:
    """The run's actions, in the order they run after each step."""
    return [LogStep(output.logging_steps), StopIfDiverged(), Remine(), Evaluate(evaluation.eval_steps),
            SaveCheckpoint(output.save_steps or 0)]


def evaluators_for(plan: EvaluationPlan) -> list[Evaluator]:
    """The evaluators of the run's eval sets: STS, then BEIR retrieval."""
    evaluators: list[Evaluator] = []
    if plan.sts:
        evaluators.append(STSEvaluator(plan.sts))
    if plan.beir:
        evaluators.append(RetrievalEvaluator(plan.beir, plan.beir_split))
    return evaluators


@dataclass(frozen=True)
class BestModelRule:
    """How metric_for_best_model picks the kept model: an evaluator's name picks by its headline, in its
    direction; a dotted name ("retrieval.recall@100") picks by that figure, in the direction greater_is_better."""

    metric: str
    greater_is_better: bool
    evaluator: Evaluator | None = None

    def value(self, metrics: dict[str, Any]) -> float:
        if self.evaluator is not None:
            found = headline(self.evaluator, metrics)
            if found is None:
                raise TextclError(f"metric_for_best_model {self.metric!r}: its headline "
                                  f"{self.evaluator.primary_metric!r} is not in the evaluation results")
            return found
        return lookup(metrics, self.metric)

    def improves(self, value: float, best: float | None) -> bool:
        sign = 1 if self.greater_is_better else -1
        return best is None or sign * (value - best) > 0


def best_model_rule(plan: EvaluationPlan, evaluators: Sequence[Evaluator]) -> BestModelRule | None:
    """The run's rule for keeping its best model; None without metric_for_best_model."""
    if not plan.metric_for_best_model:
        return None
    named = next((e for e in evaluators if e.name == plan.metric_for_best_model), None)
    if named is not None:
        return BestModelRule(plan.metric_for_best_model, named.greater_is_better, named)
    return BestModelRule(plan.metric_for_best_model, plan.greater_is_better)


def lookup(metrics: dict[str, Any], dotted: str) -> float:
    """`metrics["sts"]["spearman"]` for "sts.spearman"; a one-line error names what exists."""
    value: Any = metrics
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise TextclError(f"metric_for_best_model {dotted!r} not in the evaluation results: {sorted(metrics)}")
        value = value[part]
    return float(value)

