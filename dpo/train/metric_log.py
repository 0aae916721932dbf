"""Where the training loop's metric records go: ``metrics.jsonl``, and the experiment trackers the recipe
names (``output.report_to``: TensorBoard, wandb, MLflow; see :mod:`dpo.train.trackers`).

A record is one JSON object: ``{"split": "train" | "eval", "step": N, <metric>: value, ...}``. Every numeric
value but the step (and the epoch) goes to each tracker as ``<split>/<metric>`` at step ``N``.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpo.files import writing

TENSORBOARD_DIR = "tensorboard"


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write event files (it needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class MetricLog:
    """Appends records to ``metrics.jsonl`` and hands each to the experiment trackers.

    Args:
        out_dir: the run's output directory.
        trackers: ``output.report_to`` names (see :mod:`dpo.train.trackers`), started here.
        tensorboard: add TensorBoard to ``trackers`` (``output.tensorboard: true``).
        resumed_step: the step of the checkpoint a resumed run starts from; TensorBoard drops the events
            after it that the earlier run had written (those steps run again), as the caller does for
            ``metrics.jsonl``. None for a fresh run.
        enabled: False makes every call a no-op (processes other than the main one).
        run_dir: the output directory's :class:`dpo.train.output_dir.RunDirectory`, which records every
            file written here before it is written; None records nothing.
        project: the wandb project and MLflow experiment name.
        config: the resolved recipe (a tree), stored by wandb and MLflow as the run's settings.
    """

    def __init__(self, out_dir: Path, *, trackers: list[str] | tuple[str, ...] = (), tensorboard: bool = False,
                 resumed_step: int | None = None, enabled: bool = True, run_dir=None, project: str = "dpo-train",
                 config: dict | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.trackers: list = []
        if not enabled:
            return
        if run_dir is not None:
            run_dir.record(files=[self.path.name])
        names = [*trackers, *(["tensorboard"] if tensorboard and "tensorboard" not in trackers else [])]
        if names:
            from dpo.train.trackers import start_trackers

            with writing(Path(out_dir), "experiment trackers"):
                self.trackers = start_trackers(names, Path(out_dir), project=project, config=config,
                                               resumed_step=resumed_step, run_dir=run_dir)

    def write(self, record: dict) -> None:
        """Append one record (flushed at once, so a crash loses at most the record being written), and log it to
        every tracker as ``<split>/<metric>`` at its step."""
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        with writing(self.path, "metrics", len(line.encode("utf-8"))):
            self._append(line)
        if self.trackers:
            from dpo.train.trackers import scalars

            values = scalars(record)
            for tracker in self.trackers:
                # NaN and infinity are logged as they are, as in metrics.jsonl.
                tracker.log(values, step=record["step"])

    def _append(self, line: str) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.finish()

    def __enter__(self) -> MetricLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
