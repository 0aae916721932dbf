"""The comparison's numbers from per-sample values, each checked by hand."""

from __future__ import annotations

import math

import pytest

from dpo.compare import metrics as cm


def test_win_rate_counts_ties_half():
    # wins at 0 and 3, a tie at 1, a loss at 2: (1 + 0.5 + 0 + 1) / 4 = 0.625
    assert cm.win_rate([2.0, 1.0, 0.0, 5.0], [1.0, 1.0, 3.0, -1.0]) == 0.625
    assert cm.win_rate([0.3, 0.7], [0.3, 0.7]) == 0.5  # against itself: all ties
    assert cm.win_rate([], []) is None
    with pytest.raises(ValueError):
        cm.win_rate([1.0], [])


def test_length_controlled_view_keeps_pairs_under_ten_percent_apart():
    # |10 − 11| = 1 < 1.1 kept; |10 − 12| = 2 ≥ 1.2 dropped; 0 and 0 equal, kept; |20 − 19| = 1 < 2 kept;
    # |9 − 10| = 1 is not under 10% of 10
    assert [cm.similar_length(a, b) for a, b in ((10, 11), (10, 12), (0, 0), (20, 19), (9, 10))] == [
        True, False, True, True, False]
    rate, pairs = cm.length_controlled_win_rate([1.0, 9.0, 0.0, 3.0], [0.0, 0.0, 1.0, 3.0],
                                                [10, 10, 0, 20], [11, 12, 0, 19])
    # kept: pair 0 (win), pair 2 (loss), pair 3 (tie): (1 + 0 + 0.5) / 3 = 0.5
    assert pairs == 3 and rate == pytest.approx(0.5)
    assert cm.length_controlled_win_rate([1.0], [0.0], [1], [5]) == (None, 0)


def test_mean_and_standard_error_by_hand():
    # values 1, 2, 3, 6: mean 3; s² = (4 + 1 + 0 + 9) / 3 = 14/3; s.e. = √(14/3) / 2
    mean, se = cm.mean_and_standard_error([1.0, 2.0, 3.0, 6.0])
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2)
    assert cm.mean_and_standard_error([0.0, 0.0, 0.0]) == (0.0, 0.0)
    assert cm.mean_and_standard_error([4.0]) == (4.0, None)
    assert cm.mean_and_standard_error([]) == (None, None)


def test_distinct_n_within_samples():
    samples = [[5, 6, 5, 6], [5, 7]]
    # unigrams 5,6,5,6,5,7: 3 distinct of 6; bigrams (5,6),(6,5),(5,6),(5,7): 3 distinct of 4
    assert cm.distinct_n(samples, 1) == 0.5
    assert cm.distinct_n(samples, 2) == 0.75
    # bigrams never span two samples: [1], [2] have none
    assert cm.distinct_n([[1], [2]], 2) == 0.0


def test_median_and_mean():
    assert cm.median([3, 1, 2, 10]) == 2.5
    assert cm.mean([1, 2]) == 1.5
    assert cm.median([]) is None and cm.mean([]) is None


def test_paired_gain_and_the_reward_hacking_flag():
    # Differences 1, 2, 3: mean 2, s = 1, s.e. 1/sqrt(3).
    gain, se = cm.paired_gain([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    assert gain == pytest.approx(2.0) and se == pytest.approx(1 / math.sqrt(3))
    with pytest.raises(ValueError):
        cm.paired_gain([1.0], [1.0, 2.0])
    assert cm.reward_hacking(2.0, 0.5, 0.0)  # proxy up by 4 s.e., gold flat
    assert cm.reward_hacking(2.0, 0.5, -0.3)  # gold down
    assert not cm.reward_hacking(2.0, 0.5, 0.1)  # gold rose too
    assert not cm.reward_hacking(0.8, 0.5, -0.3)  # proxy within two standard errors: no claim
    assert not cm.reward_hacking(2.0, 0.5, None)  # no gold scorer
