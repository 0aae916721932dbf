"""SDPA one segment at a time: the spans of a packed batch, the same outputs and gradients as dense SDPA over the
whole row with the packed mask (float64), plain ``sdpa`` without spans, and the spans reaching the attention
through real decoders."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations import sdpa_attention
from transformers.masking_utils import sdpa_mask

from dpo.data import collate_packed_paired
from dpo.data.pack import pack_segments
from dpo.model import LogprobSettings, SequenceLogprobs, plan_packing
from dpo.model.packing import packed_mask_function
from dpo.model.segment_attention import (
    BLOCK_OVERHEAD_SCORE_DIMS,
    SEGMENT_SDPA,
    SPANS_KWARG,
    is_plainly_causal,
    segment_sdpa_attention_forward,
    segment_spans,
    segments_pay,
)
from tests.model.test_packing import MAX_LENGTH, load, make_rows


class Attention(torch.nn.Module):
    """What the attention functions read from a decoder's attention layer."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def packed_batch(share_prompt: bool = True, row_tokens: int = 30):
    # (prompt, first, second): a one-token prompt, an empty prompt, odd lengths; rows of at most 30 tokens.
    segments = [([11] * 5, [(0, [1] * 4), (4, [2] * 7)]), ([12], [(1, [3] * 3), (5, [4] * 2)]),
                ([], [(2, [5] * 6), (6, [6] * 3)]), ([13] * 8, [(3, [7] * 2), (7, [8] * 9)])]
    if not share_prompt:
        segments = [(prompt, [side]) for prompt, sides in segments for side in sides]
    return pack_segments(segments, 8, 0, row_tokens)


def dense_mask(batch, window=None):
    rows, width = batch["input_ids"].shape
    function = packed_mask_function(batch["segment_ids"], batch["branch_ids"], batch["position_ids"], window)
    return sdpa_mask(batch_size=rows, q_length=width, kv_length=width, mask_function=function, attention_mask=None,
                     allow_is_causal_skip=False, dtype=torch.float64, device=torch.device("cpu"))


def test_spans_of_a_hand_laid_batch():
    batch = packed_batch()
    spans = segment_spans(batch["segment_ids"], batch["branch_ids"])
    # First fit, longest first: segment lengths 16, 6, 9, 19 into rows of 30: [19 | 9], [16 | 6].
    assert spans == (((0, 8, ((8, 10), (10, 19))), (19, 19, ((19, 25), (25, 28)))),
                     ((0, 5, ((5, 9), (9, 16))), (16, 17, ((17, 20), (20, 22)))))
    plain = packed_batch(share_prompt=False)
    assert all(len(sides) == 1 for row in segment_spans(plain["segment_ids"], plain["branch_ids"])
               for _, _, sides in row)


def test_segments_pay_by_hand():
    spans = segment_spans(*(packed_batch()[k] for k in ("segment_ids", "branch_ids")))
    # Blocks (queries x keys): row 0: 10 x 10, 9 x (8 + 9); 6 x 6, 3 x (0 + 3); row 1: 9 x 9, 7 x (5 + 7);
    # 4 x 4, 2 x (1 + 2). 8 blocks scoring 100 + 153 + 36 + 9 + 81 + 84 + 16 + 6 = 485 against 2 x 28 x 28 = 1568.
    assert segments_pay(spans, 28, score_dims=BLOCK_OVERHEAD_SCORE_DIMS // 135)  # 485 + 8 x 135 = 1565 < 1568
    assert not segments_pay(spans, 28, score_dims=BLOCK_OVERHEAD_SCORE_DIMS // 136)  # 485 + 8 x 136 = 1573
    # The tiny quickstart model (4 heads of 16) packs short rows: the calls cost more than the keys they skip.
    assert not segments_pay(spans, 28, score_dims=64)


def test_plainly_causal():
    assert is_plainly_causal(torch.ones(4, 4, dtype=torch.bool).tril())
    window = torch.ones(4, 4, dtype=torch.bool).tril() & ~torch.ones(4, 4, dtype=torch.bool).tril(-2)
    assert not is_plainly_causal(window)


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("groups", [1, 2])
def test_outputs_and_gradients_equal_dense_sdpa_over_the_row(share_prompt, window, groups):
    batch = packed_batch(share_prompt)
    rows, width = batch["input_ids"].shape
    mask = dense_mask(batch, window)
    generator = torch.Generator().manual_seed(0)
    heads, dim = 4, 8
    query = torch.randn(rows, heads, width, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    key = torch.randn(rows, heads // groups, width, dim, generator=generator, dtype=torch.float64,
                      requires_grad=True)
    value = torch.randn(rows, heads // groups, width, dim, generator=generator, dtype=torch.float64,
                        requires_grad=True)
    module = Attention(groups)
    real = (batch["segment_ids"] >= 0)[:, :, None, None]  # [R, W, 1, 1]: not row padding
    upstream = torch.randn(rows, width, heads, dim, generator=generator, dtype=torch.float64) * real

    spans = segment_spans(batch["segment_ids"], batch["branch_ids"])
    ours, _ = segment_sdpa_attention_forward(module, query, key, value, mask, **{SPANS_KWARG: spans})
    our_grads = torch.autograd.grad((ours * upstream).sum(), (query, key, value))
    dense, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask)
    dense_grads = torch.autograd.grad((dense * upstream).sum(), (query, key, value))

    assert ours.shape == dense.shape == (rows, width, heads, dim)
    torch.testing.assert_close(ours * real, dense * real, rtol=1e-12, atol=1e-12)
    assert torch.equal(ours * ~real, torch.zeros_like(ours))  # row padding: nothing reads it
    for mine, theirs in zip(our_grads, dense_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def test_without_spans_it_is_sdpa():
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(2, 4, 9, 8, generator=generator) for _ in range(3))
    mask = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9)
    module = Attention(1)
    ours, _ = segment_sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    theirs, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert torch.equal(ours, theirs)


def test_a_packed_batch_without_its_boolean_mask_is_refused():
    batch = packed_batch()
    spans = segment_spans(batch["segment_ids"], batch["branch_ids"])
    query = torch.randn(2, 4, batch["input_ids"].shape[1], 8)
    with pytest.raises(ValueError, match="boolean 4-D mask"):
        segment_sdpa_attention_forward(Attention(1), query, query, query, None, **{SPANS_KWARG: spans})


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_decoders_hand_the_spans_to_the_attention(tmp_path, monkeypatch, arch):
    # An sdpa model is switched to segment attention on the CPU; each layer then runs SDPA once per block
    # (prompt + chosen, rejected), never over a whole row.
    import dpo.model.packing as packing

    model = load(tmp_path, arch, **({"sliding_window": 6} if arch == "mistral" else {})).eval()
    plan = plan_packing(model, MAX_LENGTH, "cpu")
    monkeypatch.setattr(packing, "segments_pay", lambda *args: True)  # these tiny rows would go dense
    assert plan.implementation == SEGMENT_SDPA and model.config._attn_implementation == SEGMENT_SDPA
    rows = make_rows(model.config.vocab_size)
    batch = collate_packed_paired(rows, 0, row_tokens=10_000)
    assert batch["input_ids"].shape[0] == 1
    query_lengths = []
    original = sdpa_attention.sdpa_attention_forward

    def recorded(module, query, *args, **kwargs):
        query_lengths.append(query.shape[2])
        return original(module, query, *args, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", recorded)
    with torch.no_grad():
        SequenceLogprobs(model, LogprobSettings(impl="torch"), plan)(batch)
    expected = [p + c for p, c, _ in [(len(r["prompt_ids"]), len(r["chosen_ids"]), 0) for r in rows]]
    assert len(query_lengths) == model.config.num_hidden_layers * 2 * len(rows)
    assert sorted(set(query_lengths)) == sorted(set(expected + [len(r["rejected_ids"]) for r in rows]))
