"""Packed, prefix-shared batches: the layout written out by hand, rows, and the way back to padded batches."""

from __future__ import annotations

import torch

from dpo.data import (
    UNLIMITED,
    choose_collate,
    collate_packed_paired,
    collate_packed_unpaired,
    collate_paired,
    collate_unpaired,
    is_packed,
    unpack_to_padded,
)
from dpo.data.pack import pack_rows, sequence_positions


def pair(index, prompt, chosen, rejected, **extra):
    return {"index": index, "prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, **extra}


def test_one_pair_is_one_segment_with_the_rejected_positions_continuing_from_the_prompt():
    batch = collate_packed_paired([pair(7, [10, 11, 12], [20, 21], [30, 31, 32])], pad_token_id=0)
    assert is_packed(batch)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 31, 32]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    assert batch["segment_ids"].tolist() == [[0] * 8]
    assert batch["branch_ids"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    # The last prompt token (flat 2) predicts the first token of both sides.
    assert batch["target_ids"].tolist() == [20, 21, 30, 31, 32]
    assert batch["target_sources"].tolist() == [2, 3, 2, 5, 6]
    assert batch["target_sequences"].tolist() == [0, 0, 1, 1, 1]
    assert batch["sequence_ends"].tolist() == [4, 7]
    assert batch["sequence_lengths"].tolist() == [5, 6]
    assert batch["index"].tolist() == [7]


def test_segments_pack_longest_first_into_rows_and_sequences_keep_the_padded_numbering():
    rows = [pair(0, [1], [2], [3]), pair(1, [4, 5, 6], [7, 8], [9]), pair(2, [10, 11], [12], [13, 14])]
    batch = collate_packed_paired(rows, pad_token_id=99, row_tokens=9)
    # Lengths 3, 6, 5: first fit, longest first: row 0 = pair 1 (6) + pair 0 (3); row 1 = pair 2 (5) + padding.
    assert batch["input_ids"].tolist() == [[4, 5, 6, 7, 8, 9, 1, 2, 3], [10, 11, 12, 13, 14, 99, 99, 99, 99]]
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0, 0], [2, 2, 2, 2, 2, -1, -1, -1, -1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 1], [0, 1, 2, 2, 3, 0, 0, 0, 0]]
    # sequences 0..2 chosen of pairs 0..2, 3..5 rejected; their last tokens' flat positions (row width 9)
    assert batch["sequence_ends"].tolist() == [7, 4, 11, 8, 5, 13]
    assert batch["sequence_lengths"].tolist() == [2, 5, 3, 2, 4, 4]


def test_one_token_prompt_and_an_empty_prompt():
    batch = collate_packed_paired([pair(0, [5], [6, 7], [8])], pad_token_id=0)
    assert batch["target_sources"].tolist() == [0, 1, 0]
    empty = collate_packed_paired([pair(0, [], [6, 7], [8, 9])], pad_token_id=0)
    # As in the padded layout, a first token with nothing before it is not predicted.
    assert empty["target_ids"].tolist() == [7, 9]
    assert empty["target_sequences"].tolist() == [0, 1]
    padded = collate_paired([pair(0, [], [6, 7], [8, 9])], pad_token_id=0)
    assert ((padded["labels"][:, 1:] != -100).sum(dim=1)).tolist() == [1, 1]


def test_row_budget_default_unlimited_and_oversized_segments():
    # None: rows of 6, 9 or 12 tokens, whichever needs the fewest positions: 3 x 6 = 18 and 2 x 9 = 18 (the
    # narrower wins the tie) against 2 x 11 = 22.
    assert pack_rows([3, 6, 5], None) == [[1], [2], [0]]
    assert pack_rows([5, 4, 4, 3], None) == [[0, 1], [2, 3]]  # 2 x 9 = 18 beats 4 x 5 = 20 and 3 x 7 = 21
    assert pack_rows([3, 6, 5], UNLIMITED) == [[1, 2, 0]]
    assert pack_rows([3, 6, 5], 4) == [[1], [2], [0]]  # longer than the budget: a row of its own
    assert pack_rows([2, 2, 2, 2], 5) == [[0, 1], [2, 3]]


def test_without_prefix_sharing_each_sequence_is_its_own_segment():
    rows = [pair(0, [1, 2], [3], [4, 5])]
    batch = collate_packed_paired(rows, pad_token_id=0, row_tokens=UNLIMITED, share_prompt=False)
    assert batch["input_ids"].tolist() == [[1, 2, 4, 5, 1, 2, 3]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 0, 0, 1]]
    assert batch["target_sequences"].tolist() == [1, 1, 0]


def test_unpacking_gives_back_the_padded_batch():
    rows = [pair(3, [10, 11, 12], [20, 21], [30]), pair(4, [13], [22, 23, 24], [31, 32]),
            pair(5, [14, 15], [25], [33, 34, 35, 36])]
    rows = [{**r, "margin": float(r["index"])} for r in rows]
    packed = collate_packed_paired(rows, pad_token_id=0, row_tokens=7)
    padded = collate_paired(rows, pad_token_id=0)
    back = unpack_to_padded(packed)
    for key in ("input_ids", "attention_mask", "labels", "index", "margin", "sequence_lengths"):
        assert torch.equal(back[key], padded[key]), key
    assert not is_packed(back)
    positions = sequence_positions(packed)
    flat = packed["input_ids"].reshape(-1)
    assert flat[positions[0]].tolist() == [10, 11, 12, 20, 21] and flat[positions[3]].tolist() == [10, 11, 12, 30]


def test_unpaired_rows_share_the_prompt_with_their_kl_completion():
    rows = [{"index": 0, "prompt_ids": [1, 2], "completion_ids": [3, 4], "kl_completion_ids": [5], "label": True},
            {"index": 1, "prompt_ids": [6], "completion_ids": [7], "kl_completion_ids": [8, 9], "label": False}]
    packed = collate_packed_unpaired(rows, pad_token_id=0, row_tokens=UNLIMITED)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert packed["label"].tolist() == [True, False]
    back = unpack_to_padded(packed)
    padded = collate_unpaired(rows, pad_token_id=0)
    for key in ("input_ids", "attention_mask", "labels", "label"):
        assert torch.equal(back[key], padded[key]), key


def test_collate_follows_train_packing_and_the_device():
    rows = [pair(0, [1], [2, 3], [4]), pair(1, [5, 6], [7], [8, 9, 10])]
    assert not is_packed(choose_collate(True, 0, "off", None, "cpu")(rows))
    cpu = choose_collate(True, 0, "auto", None, "cpu")(rows)
    assert cpu["input_ids"].shape == (1, 10)  # one row of 10 positions beats two of 6
    three = rows + [pair(2, [1, 2, 3], [4, 5], [6])]
    assert choose_collate(True, 0, "auto", None, "cpu")(three)["input_ids"].shape == (3, 6)  # 18 positions, not 2 x 12
    assert choose_collate(True, 0, "on", 100, "cpu")(rows)["input_ids"].shape == (1, 10)
    assert choose_collate(True, 0, "auto", None, "cuda")(rows)["input_ids"].shape == (1, 10)  # one row
