"""Collation: right padding, chosen rows before rejected rows, labels only on completion tokens."""

from __future__ import annotations

import torch

from dpo.data import IGNORE_INDEX, collate_paired, collate_unpaired, prepare_data
from tests.data_helpers import FIXTURES, build_word_tokenizer, data_config, tokens


def test_masking_hand_built_pair_labels_exactly_completion_and_eos():
    # Prompt = BOS(1) + words 10, 11; chosen = word 20 + EOS(2); rejected = words 30, 31 + EOS(2).
    rows = [{"index": 7, "prompt_ids": [1, 10, 11], "chosen_ids": [20, 2], "rejected_ids": [30, 31, 2]}]
    batch = collate_paired(rows, pad_token_id=0)
    # T = max(3 + 2, 3 + 3) = 6; the chosen row is padded by one position.
    assert batch["input_ids"].tolist() == [[1, 10, 11, 20, 2, 0], [1, 10, 11, 30, 31, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [-100, -100, -100, 20, 2, -100],
        [-100, -100, -100, 30, 31, 2],
    ]
    assert batch["index"].tolist() == [7]
    for name in ("input_ids", "attention_mask", "labels", "index"):
        assert batch[name].dtype == torch.long


def test_paired_batch_puts_all_chosen_rows_first_with_their_own_prompts():
    rows = [
        {"index": 0, "prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 2]},
        {"index": 1, "prompt_ids": [1, 8, 9, 10], "chosen_ids": [11, 2], "rejected_ids": [12, 13, 14, 2]},
    ]
    batch = collate_paired(rows, pad_token_id=99)
    # Rows: (p0, c0), (p1, c1), (p0, r0), (p1, r1); T = 4 + 4 = 8.
    assert batch["input_ids"].shape == (4, 8)
    assert batch["input_ids"].tolist() == [
        [1, 5, 6, 2, 99, 99, 99, 99],
        [1, 8, 9, 10, 11, 2, 99, 99],
        [1, 5, 7, 2, 99, 99, 99, 99],
        [1, 8, 9, 10, 12, 13, 14, 2],
    ]
    assert batch["labels"][3].tolist() == [-100, -100, -100, -100, 12, 13, 14, 2]
    # Invariant: the number of labelled positions is the number of completion tokens.
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 2 + 2 + 2 + 4
    # Padding is never attended to and never labelled.
    assert torch.all(batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX)


def test_unpaired_batch_pairs_each_prompt_with_its_completion_then_its_kl_completion():
    rows = [
        {"index": 3, "prompt_ids": [1, 5], "completion_ids": [6, 2], "kl_completion_ids": [9, 9, 2], "label": True},
        {"index": 4, "prompt_ids": [1], "completion_ids": [7, 8, 2], "kl_completion_ids": [6, 2], "label": False},
    ]
    batch = collate_unpaired(rows, pad_token_id=0)
    # Rows: (p3, c3), (p4, c4), (p3, kl3), (p4, kl4); T = max(4, 4, 5, 3) = 5.
    assert batch["input_ids"].tolist() == [
        [1, 5, 6, 2, 0],
        [1, 7, 8, 2, 0],
        [1, 5, 9, 9, 2],
        [1, 6, 2, 0, 0],
    ]
    assert batch["labels"].tolist() == [
        [-100, -100, 6, 2, -100],
        [-100, 7, 8, 2, -100],
        [-100, -100, 9, 9, 2],
        [-100, 6, 2, -100, -100],
    ]
    assert batch["label"].tolist() == [True, False]
    assert batch["label"].dtype == torch.bool
    assert batch["index"].tolist() == [3, 4]


def test_prepared_fixture_batch_labels_read_back_as_the_completion_text(tmp_path):
    tokenizer = build_word_tokenizer()
    prepared = prepare_data(
        data_config(FIXTURES / "explicit_prompt.jsonl", tmp_path, eval_fraction=0.0),
        tokenizer, unpaired=False, seed=0, log=lambda _: None,
    )
    batch = collate_paired([prepared.train[0], prepared.train[1]], tokenizer.pad_token_id)
    labelled = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    # Line 1: "Which city is the capital of France?" -> " The capital of France is Paris."
    assert tokens(tokenizer, labelled) == ["The", "capital", "of", "France", "is", "Paris", ".", "<eos>"]
    unlabelled = batch["input_ids"][0][(batch["labels"][0] == IGNORE_INDEX) & (batch["attention_mask"][0] == 1)]
    assert tokens(tokenizer, unlabelled.tolist()) == ["<bos>", "Which", "city", "is", "the", "capital", "of", "France", "?"]
    rejected = batch["labels"][2][batch["labels"][2] != IGNORE_INDEX].tolist()
    assert tokens(tokenizer, rejected) == ["The", "capital", "of", "France", "is", "Geneva", ".", "<eos>"]


def test_collate_completions_takes_the_completion_or_the_chosen_side():
    from dpo.data.collate import collate_completions

    pairs = [{"index": 3, "prompt_ids": [1, 5], "chosen_ids": [7, 2], "rejected_ids": [8, 8, 2]}]
    batch = collate_completions(pairs, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 7, 2]] and batch["labels"].tolist() == [[-100, -100, 7, 2]]
    rows = [{"index": 0, "prompt_ids": [1], "completion_ids": [4, 2]}, {"index": 1, "prompt_ids": [1, 6], "completion_ids": [2]}]
    batch = collate_completions(rows, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 4, 2], [1, 6, 2]] and batch["index"].tolist() == [0, 1]
    assert batch["labels"].tolist() == [[-100, 4, 2], [-100, -100, 2]]
