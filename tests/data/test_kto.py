"""Unpaired rows: pair conversion, mismatched KL completions, label checks and the KTO balance warning."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from dpo.data import DataError, kto_balance_warning, prepare_data
from dpo.data.kto import kl_completions, mismatched_partners, pairs_to_unpaired, require_both_labels
from tests.data_helpers import FIXTURES, build_word_tokenizer, data_config


def test_pairs_to_unpaired_uses_every_completion_once_with_its_label():
    prompts = [[1, 10], [1, 11], [1, 12]]
    chosen = [[20, 2], [21, 2], [22, 2]]
    rejected = [[30, 2], [31, 2], [32, 2]]
    rows = pairs_to_unpaired(prompts, chosen, rejected, seed=0)
    triples = sorted(zip(map(tuple, rows["prompt_ids"]), map(tuple, rows["completion_ids"]), rows["label"]))
    expected = sorted([(tuple(p), tuple(c), True) for p, c in zip(prompts, chosen)] + [(tuple(p), tuple(r), False) for p, r in zip(prompts, rejected)])
    assert triples == expected
    assert pairs_to_unpaired(prompts, chosen, rejected, seed=0) == rows
    assert any(pairs_to_unpaired(prompts, chosen, rejected, seed=s) != rows for s in range(1, 5))


def test_partners_are_never_the_row_itself_and_avoid_its_prompt_when_possible():
    # 20 rows, 10 prompts each used twice (a converted pair gives two rows with one prompt).
    prompts = [[1, 100 + i // 2] for i in range(20)]
    for seed in range(10):
        partner = mismatched_partners(prompts, seed)
        assert all(p != i for i, p in enumerate(partner))
        assert all(prompts[p] != prompts[i] for i, p in enumerate(partner))
    assert mismatched_partners(prompts, 3) == mismatched_partners(prompts, 3)


def test_partners_with_a_single_prompt_still_come_from_another_row():
    partner = mismatched_partners([[1, 5]] * 4, seed=0)
    assert all(p != i for i, p in enumerate(partner))
    with pytest.raises(DataError, match="at least 2"):
        mismatched_partners([[1, 5]], seed=0)


def test_kl_completions_are_cut_to_fit_the_rows_prompt():
    prompts = [[1, 10, 11, 12], [1, 13]]
    completions = [[20, 2], [30, 31, 32, 33, 2]]
    # Two rows: each row's partner is the other. Row 0: room 6 - 4 = 2 -> [30, 31]; row 1: room 4 -> [20, 2].
    assert kl_completions(prompts, completions, seed=0, max_length=6) == [[30, 31], [20, 2]]


def test_one_label_only_is_an_error():
    with pytest.raises(DataError, match="all 3 rows are desirable"):
        require_both_labels([True, True, True], "kto.jsonl")
    with pytest.raises(DataError, match="all 2 rows are undesirable"):
        require_both_labels([False, False], "kto.jsonl")
    require_both_labels([True, False], "kto.jsonl")


def test_paired_data_for_an_unpaired_loss_becomes_shuffled_labelled_rows(tmp_path):
    tokenizer = build_word_tokenizer()
    config = data_config(FIXTURES / "explicit_prompt.jsonl", tmp_path, eval_fraction=0.0, max_length=24, max_prompt_length=12)
    paired = prepare_data(config, tokenizer, unpaired=False, seed=0, log=lambda _: None)
    prepared = prepare_data(config, tokenizer, unpaired=True, seed=0, log=lambda _: None)
    assert len(prepared.train) == 2 * 27
    assert prepared.train["index"][:] == list(range(54))
    assert Counter(prepared.train["label"][:]) == {True: 27, False: 27}
    # Every chosen completion is desirable and every rejected one undesirable, each exactly once.
    got = Counter((tuple(r["prompt_ids"]), tuple(r["completion_ids"]), r["label"]) for r in prepared.train)
    want = Counter()
    for r in paired.train:
        want[(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), True)] += 1
        want[(tuple(r["prompt_ids"]), tuple(r["rejected_ids"]), False)] += 1
    assert got == want
    # Shuffled: the first half is not all chosen rows.
    assert len(set(prepared.train["label"][:27])) == 2
    for row in prepared.train:
        assert 0 < len(row["kl_completion_ids"]) and len(row["prompt_ids"]) + len(row["kl_completion_ids"]) <= 24
    assert prepared.stats.unpaired_rows == (54, 0)
    assert "as unpaired rows:   train 54, eval 0" in prepared.stats.format()


def test_unpaired_file_with_a_single_label_is_refused(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "kto_unpaired.jsonl").read_text().splitlines()]
    path = tmp_path / "desirable.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["label"]), encoding="utf-8")
    config = data_config(path, tmp_path / "c", eval_fraction=0.0)
    with pytest.raises(DataError, match="desirable.jsonl: all 27 rows are desirable"):
        prepare_data(config, build_word_tokenizer(), unpaired=True, seed=0, log=lambda _: None)


def test_balance_warning_inside_the_recommended_range_is_none():
    # 12 * 1 / (10 * 1) = 1.2, inside [1, 4/3]; both ends are inside too.
    assert kto_balance_warning(12, 10, 1.0, 1.0) is None
    assert kto_balance_warning(10, 10, 1.0, 1.0) is None
    assert kto_balance_warning(4, 3, 1.0, 1.0) is None
    # 27 desirable, 16 undesirable (the fixture): 27 / 16 = 1.6875 > 4/3; with weight 0.7: 18.9 / 16 = 1.18.
    assert kto_balance_warning(27, 16, 0.7, 1.0) is None


def test_balance_warning_prints_weights_that_bring_the_ratio_inside():
    # 30 * 1 / (10 * 1) = 3 > 4/3. desirable_weight in [1 * 10 / 30, 4/3 * 10 / 30] = [0.3333, 0.4444];
    # undesirable_weight in [30 / (4/3 * 10), 30 / 10] = [2.25, 3].
    message = kto_balance_warning(30, 10, 1.0, 1.0)
    assert message is not None
    assert "= 3.000" in message
    assert "desirable_weight in [0.3333, 0.4444]" in message
    assert "undesirable_weight in [2.25, 3]" in message
    # 5 * 1 / (10 * 1) = 0.5 < 1: desirable_weight in [2, 2.667]; undesirable_weight in [0.375, 0.5].
    message = kto_balance_warning(5, 10, 1.0, 1.0)
    assert "desirable_weight in [2, 2.667]" in message and "undesirable_weight in [0.375, 0.5]" in message
    # The suggested ends, applied, are inside the range.
    assert kto_balance_warning(30, 10, 0.4444, 1.0) is None
    assert kto_balance_warning(30, 10, 1.0, 2.25) is None
