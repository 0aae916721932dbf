"""Packed batches through SDPA one segment at a time, so attention costs what the mask allows, not a row squared.

A dense 4-D mask makes SDPA score every query of a packed row against every key of the row, although a query
only sees keys of its own segment (and of its own side). FlexAttention skips the ruled-out blocks on CUDA; this
is the same saving for SDPA (the CPU, or where FlexAttention is missing): for each segment
``[prompt | first side | second side ...]`` of a row,

* the prompt and the first side are one causal block: queries and keys are that span (``is_causal`` when the
  mask there is plainly causal, else the mask's own slice, e.g. with a sliding window);
* each further side is one block whose queries are the side and whose keys are the prompt and the side,
  masked by the mask's slices for those keys.

Every block takes its mask from the 4-D mask transformers built for the layer (the same one the dense path
uses), so sliding windows and the causal rule are exactly the dense path's; only the keys the mask rules out
are never scored. Row padding (the tail after the last segment) gets zero output: nothing reads it.

Each block is one SDPA call, with its slicing and autograd bookkeeping: on a small model with short rows that
overhead exceeds what the skipped keys save (the tiny quickstart model trained 50% slower), so
:func:`segments_pay` compares the two by a cost model and a batch where they do not pay runs through dense SDPA
(the same values up to rounding; the choice is a function of the batch, so the reference precompute and
evaluation make the same one).

It is an attention function registered with transformers' ``AttentionInterface`` (with the ``sdpa`` mask
builder), not a forked model: the decoder forwards the segment spans to it as a keyword argument, as it does
the sequence boundaries of flash-attention's variable-length kernels. Without that argument (padded batches,
generation) it is ``sdpa`` itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpo.data.pack import PADDING_SEGMENT, PROMPT

SEGMENT_SDPA = "dpo_segment_sdpa"
SPANS_KWARG = "packed_segment_spans"

# One segment of a row: (prompt start, prompt end, [(side start, side end), ...]), columns of the row.
SegmentSpans = tuple[int, int, tuple[tuple[int, int], ...]]


# One SDPA call per block costs, forward and backward, about as much as this many products of a score and a head
# dimension in the CPU's attention kernel (measured on a 2-core AMD EPYC: about 0.5 ms a block, against
# 0.17 ns per score x head dimension).
BLOCK_OVERHEAD_SCORE_DIMS = 3_000_000


def segments_pay(spans: tuple[tuple[SegmentSpans, ...], ...], width: int, score_dims: int) -> bool:
    """Whether attention one segment at a time costs less than dense SDPA over the rows, by a cost model.

    Dense: every row scores ``width x width`` keys. Segments: each block scores its queries against its keys, plus
    :data:`BLOCK_OVERHEAD_SCORE_DIMS` / ``score_dims`` for the call itself.

    Args:
        spans: per row, its segments (:func:`segment_spans`).
        width: the rows' width W.
        score_dims: query heads x head dimension (each score costs that many products).
    """
    dense = len(spans) * width * width
    blocks = [block for row in spans for segment in row for block in segment_blocks(segment)]
    scored = sum((queries.stop - queries.start) * sum(k.stop - k.start for k in keys) for queries, keys in blocks)
    return scored + len(blocks) * BLOCK_OVERHEAD_SCORE_DIMS / max(score_dims, 1) < dense


def register_segment_sdpa() -> None:
    """Register :data:`SEGMENT_SDPA` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if SEGMENT_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(SEGMENT_SDPA, segment_sdpa_attention_forward)
        AttentionMaskInterface.register(SEGMENT_SDPA, sdpa_mask)


def segment_spans(segment_ids: Tensor, branch_ids: Tensor) -> tuple[tuple[SegmentSpans, ...], ...]:
    """The segments of each row of a packed batch, as column spans.

    Args:
        segment_ids: ``[R, W]`` segment of each token (-1 on row padding).
        branch_ids: ``[R, W]`` 0 on prompt tokens, the side's number (1, 2, ...) on a side's tokens.

    Returns:
        Per row, per segment in column order: ``(prompt_start, prompt_end, ((side_start, side_end), ...))``.
    """
    rows = []
    for segments, branches in zip(segment_ids.tolist(), branch_ids.tolist()):
        spans: list[SegmentSpans] = []
        column, width = 0, len(segments)
        while column < width and segments[column] != PADDING_SEGMENT:
            segment, start = segments[column], column
            while column < width and segments[column] == segment and branches[column] == PROMPT:
                column += 1
            prompt_end, sides = column, []
            while column < width and segments[column] == segment:
                side, side_start = branches[column], column
                while column < width and segments[column] == segment and branches[column] == side:
                    column += 1
                sides.append((side_start, column))
            spans.append((start, prompt_end, tuple(sides)))
        rows.append(tuple(spans))
    return tuple(rows)


def segment_blocks(segment: SegmentSpans) -> list[tuple[slice, list[slice]]]:
    """The attention blocks of one segment, ``(queries, key spans)``: the prompt and first side over themselves
    (causal), then each further side over the prompt and itself."""
    prompt_start, prompt_end, sides = segment
    first_end = sides[0][1] if sides else prompt_end
    first = slice(prompt_start, first_end)
    blocks = [(first, [first])] if first_end > prompt_start else []
    prompt = slice(prompt_start, prompt_end)
    return blocks + [(slice(start, end), [prompt, slice(start, end)]) for start, end in sides[1:]]


def is_plainly_causal(mask: Tensor) -> bool:
    """Whether a ``[..., n, n]`` boolean mask is exactly lower-triangular (so ``is_causal`` computes the same)."""
    n = mask.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril_()
    return bool((mask == causal).all())


def segment_sdpa_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """Attention over a packed batch, segment by segment; plain ``sdpa`` without segment spans.

    Args:
        module: the attention layer (for its key/value groups and causal flag).
        query: ``[R, heads, W, d]``.
        key, value: ``[R, kv_heads, W, d]``.
        attention_mask: ``[R, 1, W, W]`` boolean mask of the packed batch (True: attend).
        dropout: attention dropout probability.
        scaling: score scale (None: ``1 / sqrt(d)``).
        **kwargs: :data:`SPANS_KWARG` (from :func:`segment_spans`) for a packed batch; the rest goes to
            ``sdpa`` as is.

    Returns:
        ``([R, W, heads, d], None)``, as transformers' ``sdpa_attention_forward``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    spans = kwargs.pop(SPANS_KWARG, None)
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if attention_mask is None or attention_mask.dtype != torch.bool:
        raise ValueError(f"{SEGMENT_SDPA}: a packed batch needs its boolean 4-D mask")

    rows, width = query.shape[0], query.shape[2]
    if len(spans) != rows:
        raise ValueError(f"{SEGMENT_SDPA}: spans for {len(spans)} rows, batch of {rows}")

    def join(parts: list[Tensor], dim: int) -> Tensor:
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    outputs = []
    for row, row_spans in enumerate(spans):
        pieces, column = [], 0
        for segment in row_spans:
            for queries, keys in segment_blocks(segment):
                one = slice(row, row + 1)
                # The prompt and first side: `is_causal` (the kernel skips the upper triangle) where the mask
                # there is plainly causal; else, and for the other sides, the mask's own slices.
                causal = len(keys) == 1 and is_plainly_causal(attention_mask[row, :, queries, queries])
                mask = None if causal else join([attention_mask[one, :, queries, k] for k in keys], dim=-1)
                out, _ = sdpa_attention_forward(
                    module, query[one, :, queries], join([key[one, :, k] for k in keys], dim=2),
                    join([value[one, :, k] for k in keys], dim=2), mask, dropout=dropout, scaling=scaling,
                    is_causal=causal, **kwargs)
                pieces.append(out)  # [1, queries, heads, d]
                column = queries.stop
        if column < width:
            pieces.append(query.new_zeros(1, width - column, query.shape[1], query.shape[3]))
        outputs.append(torch.cat(pieces, dim=1))
    return torch.cat(outputs, dim=0), None
