"""What a run shows: one progress bar, log lines above it, the same lines in ``train.log``, and the
libraries' own noise kept out of the way.

:class:`RunConsole` is the run's ``log``. Every message goes to the terminal (written above the progress
bar, never glued to it) and, once the output directory is ready, to ``OUT/train.log``; the messages of a
run before that (loading, tokenizing) are kept and written first. Used as a context manager it also
quiets the libraries for its duration: their Python warnings and ``logging`` records (transformers,
datasets, peft, accelerate, bitsandbytes, ...) go to ``train.log`` instead of the terminal, and their
progress bars (transformers' "Loading weights", the hub's downloads) are off. ``--verbose`` shows all of
them as they come. At the end one line says how many were kept out of the terminal.

Every ``train.log_every`` steps the loop writes one aligned line (:func:`format_train_line`)::

    step   25/500  loss 0.6912  acc 0.550  margin +0.012  lr 3.00e-03  grad  1.234  tok/s 12,345  0:00:02

This module imports nothing heavy, so the command line can enter it before the libraries are imported
(bitsandbytes, for one, warns while it is being imported).
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from tqdm.auto import tqdm

from dpo.files import writing

Log = Callable[[str], None]

TRAIN_LOG = "train.log"
# The loggers whose records are kept out of the terminal unless --verbose (each covers its children).
LIBRARY_LOGGERS = ("transformers", "datasets", "peft", "accelerate", "bitsandbytes", "huggingface_hub", "torch",
                   "safetensors", "wandb", "mlflow", "urllib3", "filelock", "fsspec", "triton", "DeepSpeed")


def _number(value: object, spec: str, width: int) -> str:
    """``value`` formatted by ``spec`` and right-aligned in ``width`` characters (non-finite ones too)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-".rjust(width)
    if not math.isfinite(value):
        return str(value).rjust(width)
    return format(value, spec).rjust(width)


def _gap(record: dict) -> float | None:
    if "rewards/gap" in record:
        return record["rewards/gap"]
    if "rewards/desirable" in record and "rewards/undesirable" in record:
        return record["rewards/desirable"] - record["rewards/undesirable"]
    return None


# (label, how to read it from a record, format, width) of each column of a log line, in order; a column
# shows only when the record has its value, so every line of one run has the same columns.
COLUMNS: list[tuple[str, Callable[[dict], object], str, int]] = [
    ("loss", lambda r: r.get("loss"), ".4f", 7),
    ("acc", lambda r: r.get("rewards/accuracies"), ".3f", 5),
    ("gap", _gap, "+.3f", 7),
    ("margin", lambda r: r.get("rewards/margins"), "+.3f", 7),
    ("reward", lambda r: r.get("reward/proxy"), "+.3f", 7),  # online tasks: the reward model's score,
    ("gold", lambda r: r.get("reward/gold"), "+.3f", 7),  # the gold scorer's,
    ("kl", lambda r: r.get("kl/k1"), "+.3f", 7),  # and the sampled KL to the reference
    ("lr", lambda r: r.get("lr"), ".2e", 8),
    ("grad", lambda r: r.get("grad_norm"), ".3f", 7),
    ("tok/s", lambda r: r.get("tokens_per_s"), ",.0f", 7),
]


def format_train_line(record: dict, total_steps: int, elapsed: float | None = None) -> str:
    """One aligned line for a train record of ``metrics.jsonl``: step, loss, accuracy (or KTO's gap between
    desirable and undesirable rewards), margin, learning rate, gradient norm, tokens/s, and the time since
    the run's first step (``H:MM:SS``)."""
    digits = len(str(total_steps))
    parts = [f"step {record['step']:>{digits}}/{total_steps}"]
    for label, read, spec, width in COLUMNS:
        value = read(record)
        if value is not None:
            parts.append(f"{label} {_number(value, spec, width)}")
    if record.get("bad_steps"):
        parts.append(f"bad steps {record['bad_steps']}")
    if elapsed is not None:
        parts.append(_clock(elapsed))
    return "  ".join(parts)


def bar_metrics(record: dict) -> dict[str, str]:
    """The headline metrics the progress bar shows after its counts: loss and accuracy (or gap)."""
    shown = {}
    for label, read, spec, _ in COLUMNS[:3]:
        value = read(record)
        if value is not None:
            shown[label] = _number(value, spec, 0)
    return shown


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Captured(logging.Handler):
    """Hands each record of a library logger to the console."""

    def __init__(self, console: RunConsole):
        super().__init__(level=logging.WARNING)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.library(f"{record.levelname.lower()} ({record.name}): {record.getMessage()}")
        except Exception:  # a message that cannot be formatted must not stop the run
            self.handleError(record)


class RunConsole:
    """The run's log: terminal and ``train.log``, one progress bar, the libraries' noise kept aside.

    Args:
        echo: writes one line to the terminal (``typer.echo``, ``print``, or a list's ``append`` in tests).
        verbose: show the libraries' warnings, log records and progress bars as they come.
        bar_file: the stream of the progress bar (default stderr; the bar is off where it is not a
            terminal, unless ``force_bar``).
        force_bar: draw the bar even where ``bar_file`` is not a terminal (tests).
    """

    def __init__(self, echo: Log = print, *, verbose: bool = False, bar_file=None, force_bar: bool = False):
        self.echo = echo
        self.verbose = verbose
        self.bar_file = bar_file
        self.force_bar = force_bar
        self.bar = None
        self.log_path: Path | None = None
        self.pending: list[str] = []  # lines logged before train.log could be opened
        self.library_count = 0
        self.started = time.perf_counter()
        self._restore: list[Callable[[], None]] = []  # undoes what __enter__ changed, last first
        self._warnings = None

    # ------------------------------------------------------------------------------------ messages

    def log(self, message: str) -> None:
        """One message: to the terminal above the bar, and to ``train.log``."""
        self._to_file(message)
        self._to_terminal(message)

    __call__ = log

    def library(self, message: str) -> None:
        """A library's warning or log record: to ``train.log``; to the terminal only when verbose."""
        self.library_count += 1
        self._to_file(f"library {message}")
        if self.verbose:
            self._to_terminal(message)

    def _to_terminal(self, message: str) -> None:
        if self.bar is None:
            self.echo(message)
            return
        with tqdm.external_write_mode(file=self.bar.fp):  # clears the bar, writes, draws it again below
            self.echo(message)

    def _to_file(self, message: str) -> None:
        if self.log_path is None:
            self.pending.append(message)
            return
        text = message.rstrip("\n") + "\n"
        with writing(self.log_path, "the run log", len(text.encode("utf-8"))):
            with open(self.log_path, "a", encoding="utf-8") as handle:
                handle.write(text)

    def open_log(self, run_dir, *, resumed: bool) -> Path:
        """Start writing ``train.log`` in the run's output directory (recorded in its marker first): a header
        line, then every message logged so far. A resumed run appends to the log of the run it continues."""
        from importlib.metadata import PackageNotFoundError, version

        run_dir.record(files=[TRAIN_LOG])
        self.log_path = run_dir.root / TRAIN_LOG
        try:
            release = version("dpo-train")
        except PackageNotFoundError:
            release = "(not installed)"
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        self._to_file(f"# dpo-train {release}, {'resumed' if resumed else 'started'} {stamp}: "
                      f"{' '.join(['dpo-train', *sys.argv[1:]])}")
        pending, self.pending = self.pending, []
        for message in pending:
            self._to_file(message)
        return self.log_path

    # ---------------------------------------------------------------------------------- progress bar

    def start_bar(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True) -> None:
        """The run's one progress bar: steps done of ``total``, elapsed time, time left, headline metrics."""
        self.close_bar()
        if not enabled:
            return
        file = self.bar_file if self.bar_file is not None else sys.stderr
        disable = False if self.force_bar else None  # None: off where the stream is not a terminal
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=file, disable=disable,
                        dynamic_ncols=True, bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| "
                        "[{elapsed}<{remaining}, {rate_fmt}]{postfix}")
        if self.bar.disable:
            self.bar = None

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def show_metrics(self, record: dict) -> None:
        """Put a record's headline metrics on the bar."""
        if self.bar is not None:
            self.bar.set_postfix(bar_metrics(record), refresh=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # ----------------------------------------------------------------------------- library noise

    def __enter__(self) -> RunConsole:
        if self.verbose:
            return self
        # The libraries' progress bars first: this also sets up transformers' own log handler, which the
        # loggers' swap below must find in place to set it aside.
        self._bars_off()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.showwarning = self._show_warning
        handler = _Captured(self)
        for name in LIBRARY_LOGGERS:
            logger = logging.getLogger(name)
            saved = (logger.handlers[:], logger.propagate, logger.level)
            self._restore.append(lambda logger=logger, saved=saved: self._restore_logger(logger, *saved))
            logger.handlers = [handler]
            logger.propagate = False
            if logger.level == logging.NOTSET or logger.level > logging.WARNING:
                logger.setLevel(logging.WARNING)
        return self

    @staticmethod
    def _restore_logger(logger: logging.Logger, handlers: list, propagate: bool, level: int) -> None:
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)

    def __exit__(self, *exc_info) -> None:
        self.close_bar()
        if self._warnings is not None:
            self._warnings.__exit__(*exc_info)
            self._warnings = None
        while self._restore:
            self._restore.pop()()
        if self.library_count and not self.verbose:
            where = f"written to {self.log_path}" if self.log_path is not None else "not shown"
            self.echo(f"note: {self.library_count} warning(s) and message(s) of the libraries were {where}; "
                      "--verbose shows them as they come")

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.library(f"{category.__name__} ({Path(filename).name}:{lineno}): {message}")

    def _bars_off(self) -> None:
        """Turn off the libraries' progress bars (transformers' weight loading, the hub's downloads), where
        those libraries are installed; turned back on at exit. datasets' bars stay: they show the progress of
        tokenizing the data, which takes minutes on a large set."""
        try:
            from transformers.utils import logging as transformers_logging

            transformers_logging.get_logger("transformers")  # its handler, set up now (see __enter__)
            if transformers_logging.is_progress_bar_enabled():
                transformers_logging.disable_progress_bar()
                self._restore.append(transformers_logging.enable_progress_bar)
        except ImportError:
            pass
        try:
            from huggingface_hub import utils as hub_utils

            if not hub_utils.are_progress_bars_disabled():
                hub_utils.disable_progress_bars()
                self._restore.append(hub_utils.enable_progress_bars)
        except ImportError:
            pass
