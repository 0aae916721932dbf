"""The whole data path: splits, separate eval files, max_rows, parallel tokenization, statistics."""

from __future__ import annotations

import json
import shutil

import pytest

from dpo.data import DataError, prepare_data
from dpo.data.prepare import split_rows
from tests.data_helpers import FIXTURES, build_word_tokenizer, data_config


def rows_of(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_split_is_seeded_disjoint_complete_and_keeps_file_order():
    rows = [{"number": i} for i in range(1, 28)]
    train, evaluation = split_rows(rows, 0.1, seed=0, source="d.jsonl")
    # round(27 * 0.1) = round(2.7) = 3 eval rows.
    assert (len(train), len(evaluation)) == (24, 3)
    numbers = [r["number"] for r in train] + [r["number"] for r in evaluation]
    assert sorted(numbers) == list(range(1, 28))
    assert [r["number"] for r in train] == sorted(r["number"] for r in train)
    assert split_rows(rows, 0.1, seed=0, source="d.jsonl") == (train, evaluation)
    assert any(split_rows(rows, 0.1, seed=s, source="d.jsonl")[1] != evaluation for s in range(1, 5))
    # A positive fraction of a small set still gives one eval row: round(4 * 0.1) = 0 -> 1.
    assert [len(part) for part in split_rows(rows[:4], 0.1, seed=0, source="d.jsonl")] == [3, 1]
    assert split_rows(rows, 0.0, seed=0, source="d.jsonl") == (rows, [])
    with pytest.raises(DataError, match="too few to split"):
        split_rows(rows[:1], 0.5, seed=0, source="d.jsonl")


def test_prepared_eval_split_holds_the_rows_the_train_split_lacks(tmp_path):
    tokenizer = build_word_tokenizer()
    whole = prepare_data(data_config(FIXTURES / "explicit_prompt.jsonl", tmp_path, eval_fraction=0.0), tokenizer, unpaired=False, seed=0, log=lambda _: None)
    split = prepare_data(data_config(FIXTURES / "explicit_prompt.jsonl", tmp_path, eval_fraction=0.25), tokenizer, unpaired=False, seed=0, log=lambda _: None)
    # round(27 * 0.25) = round(6.75) = 7 eval pairs.
    assert (len(split.train), len(split.eval)) == (20, 7)
    assert split.eval["index"][:] == list(range(7))
    key = ("prompt_ids", "chosen_ids", "rejected_ids")
    everything = sorted(tuple(tuple(r[k]) for k in key) for r in whole.train)
    parts = sorted([tuple(tuple(r[k]) for k in key) for r in split.train] + [tuple(tuple(r[k]) for k in key) for r in split.eval])
    assert parts == everything
    assert split.stats.count == 27 and (split.stats.train_count, split.stats.eval_count) == (20, 7)


def test_a_separate_eval_file_is_used_whole_and_must_share_the_layout(tmp_path):
    tokenizer = build_word_tokenizer()
    config = data_config(FIXTURES / "explicit_prompt.jsonl", tmp_path, eval=str(FIXTURES / "stack_exchange_paired_style.jsonl"),
                         columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"})
    with pytest.raises(DataError, match="question.*no such column"):
        prepare_data(config, tokenizer, unpaired=False, seed=0, log=lambda _: None)
    eval_copy = tmp_path / "eval.jsonl"
    eval_copy.write_text("".join(json.dumps(r) + "\n" for r in rows_of(FIXTURES / "explicit_prompt.jsonl")[:5]), encoding="utf-8")
    prepared = prepare_data(data_config(FIXTURES / "explicit_prompt.jsonl", tmp_path, eval=str(eval_copy)), tokenizer, unpaired=False, seed=0, log=lambda _: None)
    assert (len(prepared.train), len(prepared.eval)) == (27, 5)
    mixed = data_config(FIXTURES / "explicit_prompt.jsonl", tmp_path, eval=str(FIXTURES / "hh_rlhf_style.jsonl"))
    with pytest.raises(DataError, match="data.eval .* has layout hh_rlhf, but data.train has layout explicit"):
        prepare_data(mixed, tokenizer, unpaired=False, seed=0, log=lambda _: None)


def test_max_rows_reads_only_the_first_rows(tmp_path):
    logged: list[str] = []
    config = data_config(FIXTURES / "explicit_prompt.jsonl", tmp_path, eval_fraction=0.0, max_rows=5)
    prepared = prepare_data(config, build_word_tokenizer(), unpaired=False, seed=0, log=logged.append)
    assert len(prepared.train) == 5
    assert any("using the first 5 of 27 rows" in line for line in logged)


def test_parallel_tokenization_gives_the_same_data(tmp_path):
    tokenizer = build_word_tokenizer()
    data = tmp_path / "d.jsonl"
    shutil.copy(FIXTURES / "conversational.jsonl", data)
    one = prepare_data(data_config(data, tmp_path / "a", num_proc=1), tokenizer, unpaired=False, seed=0, log=lambda _: None)
    two = prepare_data(data_config(data, tmp_path / "b", num_proc=2), tokenizer, unpaired=False, seed=0, log=lambda _: None)
    assert two.train_fingerprint == one.train_fingerprint and two.train[:] == one.train[:]


def test_stats_count_lengths_before_truncation(tmp_path):
    rows = [
        # Prompt tokens (BOS included): 2, 3, 4, 5; completion tokens (EOS included): 2 and 3 each.
        {"prompt": "alpha", "chosen": " Paris.", "rejected": " Rome"},
        {"prompt": "alpha beta", "chosen": " Paris.", "rejected": " Rome"},
        {"prompt": "alpha beta gamma", "chosen": " Paris.", "rejected": " Rome"},
        {"prompt": "alpha beta gamma delta", "chosen": " Paris.", "rejected": " Rome"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = data_config(path, tmp_path / "c", eval_fraction=0.0, max_length=7, max_prompt_length=3)
    stats = prepare_data(config, build_word_tokenizer(), unpaired=False, seed=0, log=lambda _: None).stats
    # Prompt lengths 2, 3, 4, 5: p50 is the 2nd smallest (3), p90 and p99 the 4th (5).
    assert (stats.prompt_lengths.p50, stats.prompt_lengths.p90, stats.prompt_lengths.max) == (3, 5, 5)
    # Completions 3 ("Paris", ".", EOS) and 2 ("Rome", EOS) four times each: p50 is 2, p90 3.
    assert (stats.completion_lengths.p50, stats.completion_lengths.p90) == (2, 3)
    # Only row 4 overflows: 5 + 3 = 8 > 7; rows 1-3 fit (5, 6, 7 tokens).
    assert (stats.count, stats.truncated, stats.dropped) == (4, 1, 0)
    text = stats.format()
    assert "pairs:              4 (train 4, eval 0)" in text
    assert "prompt tokens:      p50 3  p90 5  p99 5  max 5" in text
    assert "truncated:          1 pairs (max_length 7, max_prompt_length 3, keep_end)" in text
