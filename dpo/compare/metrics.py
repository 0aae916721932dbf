"""The numbers of a comparison report, as plain functions of per-sample values (no models here).

Conventions: a "pair" is a model's k-th sample for a prompt against the reference model's k-th sample for
the same prompt; a win counts 1, a tie 0.5, a loss 0. Lengths are completion tokens without the EOS.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

LENGTH_TOLERANCE = 0.10  # the length-controlled view keeps pairs whose lengths differ by under 10%


def win_rate(scores: Sequence[float], reference_scores: Sequence[float]) -> float | None:
    """Mean over pairs of 1 (win), 0.5 (tie), 0 (loss); None without pairs."""
    if len(scores) != len(reference_scores):
        raise ValueError(f"{len(scores)} scores against {len(reference_scores)} reference scores")
    if not scores:
        return None
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, reference_scores)]
    return sum(outcomes) / len(outcomes)


def similar_length(a: int, b: int, tolerance: float = LENGTH_TOLERANCE) -> bool:
    """Whether two lengths differ by under ``tolerance`` of the longer one (equal lengths always do)."""
    return a == b or abs(a - b) < tolerance * max(a, b)


def length_controlled_win_rate(scores: Sequence[float], reference_scores: Sequence[float],
                               lengths: Sequence[int], reference_lengths: Sequence[int]) -> tuple[float | None, int]:
    """The win rate over pairs of similar length only, and how many pairs that is."""
    keep = [i for i, (a, b) in enumerate(zip(lengths, reference_lengths)) if similar_length(a, b)]
    return win_rate([scores[i] for i in keep], [reference_scores[i] for i in keep]), len(keep)


def mean_and_standard_error(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Sample mean and its standard error s/√n (s with n − 1); None where undefined."""
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def paired_gain(values: Sequence[float], reference_values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean of the per-pair differences ``value − reference value`` and its standard error (pairs: the same
    prompt and sample number), as :func:`mean_and_standard_error` of the differences."""
    if len(values) != len(reference_values):
        raise ValueError(f"{len(values)} values against {len(reference_values)} reference values")
    return mean_and_standard_error([a - b for a, b in zip(values, reference_values)])


def reward_hacking(proxy_gain: float | None, proxy_se: float | None, gold_gain: float | None) -> bool:
    """Whether a model shows reward hacking against the reference: its proxy (reward-model) score rose by more
    than two standard errors while its gold reward did not rise at all (Gao et al. 2022)."""
    if proxy_gain is None or gold_gain is None:
        return False
    return proxy_gain > 2 * (proxy_se or 0.0) and gold_gain <= 0


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all n-grams of all sequences (n-grams do not cross sequences); 0 when none."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def ranking_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float | None:
    """How often chosen scores above rejected (a tie counts half); None without pairs."""
    return win_rate(chosen, rejected)


def median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def mean(values: Sequence[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None
