"""How many optimizer steps a run takes, and when it warms up, logs, evaluates and saves.

The loop and ``--dry-run`` both take their numbers from :func:`plan_steps`, so the plan a dry run prints is
the run's own: a step is ``grad_accum`` micro-batches of ``batch_size`` examples on each of ``world``
processes, an epoch is every process's share of the shuffled micro-batches (see
:mod:`dpo.train.parallel`), and ``train.max_steps`` overrides ``train.epochs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dpo.data import DataError
from dpo.recipe import TrainConfig


@dataclass(frozen=True)
class StepPlan:
    """The step counts of a run.

    Attributes:
        rows: training examples (pairs, or unpaired rows).
        micro_batches: micro-batches in one epoch, over all processes.
        world: processes.
        left_out: micro-batches of each epoch left out so that every process takes as many.
        steps_per_epoch: optimizer steps in one epoch.
        total_steps: optimizer steps of the run.
        warmup_steps: steps of linear learning-rate warmup.
        examples_per_step: examples one optimizer step sees, over all processes.
        log_steps: steps after which a train record is logged.
        eval_steps: steps after which the held-out set is evaluated (0 is before training), if there is one.
        save_steps: steps after which a checkpoint is written (the last one always).
    """

    rows: int
    micro_batches: int
    world: int
    left_out: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    examples_per_step: int
    log_steps: list[int]
    eval_steps: list[int]
    save_steps: list[int]

    @property
    def epochs(self) -> float:
        """Passes over the training data (fractional when ``train.max_steps`` ends the run mid-epoch)."""
        return self.total_steps / self.steps_per_epoch


def warmup_steps(train: TrainConfig, total_steps: int) -> int:
    """``train.warmup_steps``, or else ``warmup_ratio`` of the run's steps (rounded down)."""
    return train.warmup_steps if train.warmup_steps is not None else int(train.warmup_ratio * total_steps)


def count_micro_batches(num_rows: int, batch_size: int, *, drop_last: bool, world: int = 1) -> int:
    """Micro-batches of ``batch_size`` in one pass over ``num_rows`` training examples, over all processes.

    Raises:
        DataError: too few examples for one micro-batch, or for one micro-batch per process.
    """
    micro_batches = num_rows // batch_size if drop_last else math.ceil(num_rows / batch_size)
    if micro_batches == 0:
        raise DataError(f"data.train: {num_rows} training examples, fewer than train.batch_size "
                         f"({batch_size}) which this loss needs in every batch; lower train.batch_size")
    if micro_batches < world:
        raise DataError(f"data.train: {num_rows} training examples make {micro_batches} micro-batches of "
                         f"train.batch_size={batch_size}, fewer than the {world} processes that each need "
                         "one; lower train.batch_size or use fewer processes")
    return micro_batches


def plan_steps(num_rows: int, train: TrainConfig, *, drop_last: bool, world: int = 1, has_eval: bool = True,
               micro_batches: int | None = None, epochs: int | None = None) -> StepPlan:
    """The run's step counts for ``num_rows`` training examples.

    Args:
        num_rows: training examples after tokenizing.
        train: the recipe's train section.
        drop_last: whether a short last micro-batch is dropped (losses that need full batches, e.g. KTO).
        world: processes.
        has_eval: whether there is a held-out set to evaluate.
        micro_batches: micro-batches of one epoch, when the task's batch source counts them itself (an online
            task's epoch is one rollout); by default those of a pass over ``num_rows``.
        epochs: epochs of the run when ``train.max_steps`` is not set (an online task runs one per rollout);
            by default ``train.epochs``.

    Raises:
        DataError: too few examples for one micro-batch, or for one micro-batch per process.
    """
    if micro_batches is None:
        micro_batches = count_micro_batches(num_rows, train.batch_size, drop_last=drop_last, world=world)
    steps_per_epoch = max(1, micro_batches // world // train.grad_accum)
    total = train.max_steps or (train.epochs if epochs is None else epochs) * steps_per_epoch
    every = lambda n: [s for s in range(n, total, n)] if n else []  # noqa: E731 (a local shorthand)
    evals = ([0, *every(train.eval_every), total] if has_eval else [])
    return StepPlan(
        rows=num_rows, micro_batches=micro_batches, world=world, left_out=micro_batches % world,
        steps_per_epoch=steps_per_epoch, total_steps=total, warmup_steps=warmup_steps(train, total),
        examples_per_step=train.batch_size * train.grad_accum * world,
        log_steps=[*every(train.log_every), total], eval_steps=evals,
        save_steps=[*every(train.save_every), total],
    )


def _steps(steps: list[int], limit: int = 8) -> str:
    if not steps:
        return "none"
    shown = ", ".join(map(str, steps)) if len(steps) <= limit else (
        f"{', '.join(map(str, steps[:limit - 2]))}, ..., {steps[-1]}")
    return f"{shown} ({len(steps)} in all)" if len(steps) > 1 else shown


def format_plan(plan: StepPlan, train: TrainConfig, unit: str = "pairs") -> str:
    """The ``# plan`` section of ``--dry-run``."""
    per_epoch = f"{plan.steps_per_epoch} per epoch"
    epochs = (f"{plan.epochs:g}" if plan.epochs == int(plan.epochs) else f"{plan.epochs:.2f}")
    lines = [
        "# plan",
        f"optimizer steps: {plan.total_steps} ({per_epoch}; "
        + (f"train.max_steps={train.max_steps})" if train.max_steps else f"train.epochs={train.epochs})"),
        f"epochs: {epochs} over {plan.rows} training {unit}",
        f"{unit} per step: {plan.examples_per_step} (train.batch_size {train.batch_size} x train.grad_accum "
        f"{train.grad_accum} x {plan.world} process{'es' if plan.world > 1 else ''})",
        f"warmup steps: {plan.warmup_steps}, then {train.scheduler} to step {plan.total_steps} (train.lr {train.lr:g})",
        f"log lines: after steps {_steps(plan.log_steps)}",
        f"evaluations: after steps {_steps(plan.eval_steps)}" if plan.eval_steps
        else "evaluations: none (no held-out examples)",
        f"checkpoints: after steps {_steps(plan.save_steps)}, keeping the last {train.keep_last}",
    ]
    if plan.left_out:
        lines.append(f"note: {plan.left_out} micro-batch(es) of each epoch are left out so that each of the "
                     f"{plan.world} processes takes as many")
    return "\n".join(lines)
