"""The training stage: one loop from a recipe to a trained adapter, with checkpoints and metrics.

Takes a validated recipe. The task's setup (:mod:`dpo.train.setup`) builds the model, the step module
whose forward the loop runs, the data, the loss and the batch source (the preference losses over cached
reference log-probs, a reward model, SFT, or PPO/RLOO whose batches are rollouts, :mod:`dpo.online`); the
loop (:mod:`dpo.train.loop`) runs the optimizer steps, evaluations and checkpoints, on one process or several
(under accelerate's DDP, FSDP2 or DeepSpeed, :mod:`dpo.train.engine`; what such a run does itself,
:mod:`dpo.train.parallel`). Hands on the adapter,
``metrics.jsonl`` (:mod:`dpo.train.metric_log`), ``final_metrics.json`` and resumable checkpoints
(:mod:`dpo.train.checkpoint`), into an output directory whose marker records every path written there and
whose lock admits one run at a time (:mod:`dpo.train.output_dir`). What a run shows and leaves to read: the
inputs checked before anything is created (:mod:`dpo.train.inputs`), the step plan (:mod:`dpo.train.plan`),
the progress bar, log lines and ``train.log`` (:mod:`dpo.train.console`), ``curves.png``
(:mod:`dpo.train.curves`), the run's README and the adapter's model card (:mod:`dpo.train.run_files`), and
the experiment trackers (:mod:`dpo.train.trackers`).
"""

from dpo.train.checkpoint import (
    CheckpointError,
    TooManyBadSteps,
    TrainingInterrupted,
    TrainingStopped,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    preflight,
)
from dpo.train.loop import build_optimizer, train
from dpo.train.metric_log import MetricLog
from dpo.train.setup import SETUPS, TrainSetup, online_setup, preference_setup, reward_setup, sft_setup

__all__ = [
    "SETUPS",
    "CheckpointError",
    "MetricLog",
    "TooManyBadSteps",
    "TrainSetup",
    "TrainingInterrupted",
    "TrainingStopped",
    "build_optimizer",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "online_setup",
    "preflight",
    "preference_setup",
    "reward_setup",
    "sft_setup",
    "train",
]
