"""Where the training loop's metric records go: ``metrics.jsonl``, and TensorBoard when the recipe asks.

A record is one JSON object: ``{"split": "train" | "eval", "step": N, <metric>: value, ...}``. Every numeric
value but the step (and the epoch) becomes the TensorBoard scalar ``<split>/<metric>`` at step ``N``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dpo.files import writing

TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = ("split", "step", "epoch")


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write event files (it needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def require_tensorboard(enabled: bool) -> None:
    """Refuse ``output.tensorboard: true`` where the ``tensorboard`` package is missing, before anything runs."""
    if enabled and not tensorboard_available():
        from dpo.recipe import RecipeError

        raise RecipeError("output.tensorboard: true needs the tensorboard package (pip install "
                          "'dpo-train[tensorboard]'), or set output.tensorboard: false")


class MetricLog:
    """Appends records to ``metrics.jsonl`` and, optionally, to TensorBoard event files.

    Args:
        out_dir: the run's output directory.
        tensorboard: also write ``out_dir/tensorboard/`` event files.
        resumed_step: the step of the checkpoint a resumed run starts from; TensorBoard drops the events
            after it that the earlier run had written (those steps run again), as the caller does for
            ``metrics.jsonl``. None for a fresh run.
        enabled: False makes every call a no-op (processes other than the main one).
        run_dir: the output directory's :class:`dpo.train.output_dir.RunDirectory`, which records every
            file written here before it is written; None records nothing.
    """

    def __init__(self, out_dir: Path, *, tensorboard: bool = False, resumed_step: int | None = None,
                 enabled: bool = True, run_dir=None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and run_dir is not None:
            run_dir.record(files=[self.path.name])
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            folder = Path(out_dir) / TENSORBOARD_DIR
            if run_dir is not None:
                run_dir.mkdir(TENSORBOARD_DIR)
            before = set(os.listdir(folder)) if folder.is_dir() else set()
            purge = resumed_step + 1 if resumed_step is not None else None
            with writing(folder, "TensorBoard events"):
                self.writer = SummaryWriter(str(folder), purge_step=purge)
            if run_dir is not None:  # the event file it opened, named by time, host and process
                run_dir.record(files=[f"{TENSORBOARD_DIR}/{name}" for name in sorted(set(os.listdir(folder)) - before)])

    def write(self, record: dict) -> None:
        """Append one record (flushed at once, so a crash loses at most the record being written)."""
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        with writing(self.path, "metrics", len(line.encode("utf-8"))):
            self._append(line)
        if self.writer is not None:
            split, step = record["split"], record["step"]
            for key, value in record.items():
                if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    # NaN and infinity are written as they are, as in metrics.jsonl (TensorBoard shows them).
                    self.writer.add_scalar(f"{split}/{key}", float(value), step)
            self.writer.flush()

    def _append(self, line: str) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> MetricLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
