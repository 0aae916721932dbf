"""Token statistics of prepared data, as ``--dry-run`` prints them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LengthSummary:
    """Percentiles of token lengths; each is a length that occurs in the data (no interpolation)."""

    p50: int
    p90: int
    p99: int
    max: int

    @classmethod
    def of(cls, lengths: list[int] | np.ndarray) -> LengthSummary:
        values = np.asarray(lengths, dtype=np.int64)
        if values.size == 0:
            return cls(0, 0, 0, 0)
        p50, p90, p99 = (int(v) for v in np.quantile(values, [0.5, 0.9, 0.99], method="inverted_cdf"))
        return cls(p50=p50, p90=p90, p99=p99, max=int(values.max()))

    def format(self) -> str:
        return f"p50 {self.p50}  p90 {self.p90}  p99 {self.p99}  max {self.max}"


@dataclass(frozen=True)
class TokenStats:
    """What tokenization made of the data (train and eval together).

    Attributes:
        unit: ``pairs`` or ``rows`` (unpaired data): what the counts count.
        count: units kept, train + eval.
        train_count: units in the train split.
        eval_count: units in the eval split.
        prompt_lengths: prompt tokens before truncation (BOS included).
        completion_lengths: completion tokens before truncation (EOS included), every side.
        truncated: units cut to fit ``max_length``.
        dropped: units dropped because truncation left a completion with no token.
        bad_rows: rows skipped as bad (``data.on_bad_row: skip``), per reason.
        max_length: the recipe's ``data.max_length``.
        max_prompt_length: the recipe's ``data.max_prompt_length``.
        truncation: the recipe's ``data.truncation``.
        unpaired_rows: ``(train, eval)`` unpaired rows made from the pairs, when an unpaired loss
            trains on paired data (each pair gives a desirable and an undesirable row).
        duplicates: units that repeat an earlier one of the same source exactly (kept, so they weigh more).
        eval_in_train: eval units that are also in the training data (a separate eval file).
    """

    unit: str
    count: int
    train_count: int
    eval_count: int
    prompt_lengths: LengthSummary
    completion_lengths: LengthSummary
    truncated: int
    dropped: int
    max_length: int
    max_prompt_length: int
    truncation: str
    bad_rows: dict[str, int] = field(default_factory=dict)
    unpaired_rows: tuple[int, int] | None = None
    duplicates: int = 0
    eval_in_train: int = 0

    def format(self) -> str:
        """A few aligned lines for the terminal."""
        bad = sum(self.bad_rows.values())
        bad_detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.bad_rows.items()))
        lines = [
            f"{self.unit + ':':<20}{self.count} (train {self.train_count}, eval {self.eval_count})",
            f"prompt tokens:      {self.prompt_lengths.format()}",
            f"completion tokens:  {self.completion_lengths.format()}",
            f"truncated:          {self.truncated} {self.unit} (max_length {self.max_length}, "
            f"max_prompt_length {self.max_prompt_length}, {self.truncation})",
            f"dropped:            {self.dropped} {self.unit} (a completion left with no token after truncation)",
            f"bad rows skipped:   {bad}" + (f" ({bad_detail})" if bad else ""),
            f"{'duplicate ' + self.unit + ':':<20}{self.duplicates} (exact repeats of an earlier one, kept)"
            + (f"; {self.eval_in_train} eval {self.unit} also in the training data" if self.eval_in_train else ""),
        ]
        if self.unpaired_rows is not None:
            train, evaluation = self.unpaired_rows
            lines.insert(1, f"as unpaired rows:   train {train}, eval {evaluation} (chosen desirable, rejected undesirable)")
        return "\n".join(lines)
