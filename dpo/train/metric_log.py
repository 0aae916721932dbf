"""Where the training loop's metric records go: ``metrics.jsonl``, and TensorBoard when the recipe asks.

A record is one JSON object: ``{"split": "train" | "eval", "step": N, <metric>: value, ...}``. Every numeric
value but the step (and the epoch) becomes the TensorBoard scalar ``<split>/<metric>`` at step ``N``.
"""

from __future__ import annotations

import json
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"
_NOT_SCALARS = ("split", "step", "epoch")


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write event files (it needs the ``tensorboard`` package)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class MetricLog:
    """Appends records to ``metrics.jsonl`` and, optionally, to TensorBoard event files.

    Args:
        out_dir: the run's output directory.
        tensorboard: also write ``out_dir/tensorboard/`` event files.
        resumed_step: the step of the checkpoint a resumed run starts from; TensorBoard drops the events
            after it that the earlier run had written (those steps run again), as the caller does for
            ``metrics.jsonl``. None for a fresh run.
        enabled: False makes every call a no-op (processes other than the main one).
    """

    def __init__(self, out_dir: Path, *, tensorboard: bool = False, resumed_step: int | None = None,
                 enabled: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = resumed_step + 1 if resumed_step is not None else None
            self.writer = SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR), purge_step=purge)

    def write(self, record: dict) -> None:
        """Append one record (flushed at once, so a crash loses at most the record being written)."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            split, step = record["split"], record["step"]
            for key, value in record.items():
                if key not in _NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                    # NaN and infinity are written as they are, as in metrics.jsonl (TensorBoard shows them).
                    self.writer.add_scalar(f"{split}/{key}", float(value), step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> MetricLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
