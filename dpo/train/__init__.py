"""The training stage: one loop from a recipe to a trained adapter, with checkpoints and metrics.

Takes a validated recipe. Builds the task's model, data and loss (the preference losses over cached
reference log-probs, or a reward model), then runs the optimizer steps, evaluations and checkpoints, on
one process or several (data parallel, :mod:`dpo.train.parallel`). Hands on the adapter, ``metrics.jsonl``
(:mod:`dpo.train.metric_log`), ``final_metrics.json`` and resumable checkpoints
(:mod:`dpo.train.checkpoint`).
"""

from dpo.train.checkpoint import (
    CheckpointError,
    TooManyBadSteps,
    TrainingInterrupted,
    TrainingStopped,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from dpo.train.loop import build_optimizer, train
from dpo.train.metric_log import MetricLog

__all__ = [
    "CheckpointError",
    "MetricLog",
    "TooManyBadSteps",
    "TrainingInterrupted",
    "TrainingStopped",
    "build_optimizer",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "train",
]
