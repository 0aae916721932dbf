"""Packed batches: each prompt once, no padding between documents.

A pair becomes one *segment* ``[prompt | first | second]`` (chosen and rejected, or a KTO completion and its
mismatched KL completion). Position ids of the second side continue from the end of the prompt, as if it
followed the prompt directly; its tokens may attend to the prompt and to earlier tokens of their own side,
never to the first side. So each side sees exactly what it sees in the padded layout
(:func:`dpo.data.collate.pad_sequences`), and its log-probs are the same function.

Segments are packed into rows (first fit, longest first) of at most ``row_tokens`` tokens; a row ends with
padding up to the widest row. Every token carries its segment id and branch id, from which the model stage
builds the attention mask (:mod:`dpo.model.packing`): a query attends to a key of the same segment, not after it,
whose branch is the prompt's (0) or its own. Row padding has segment id -1 and attends only to earlier
padding, so no query row is fully masked.

Targets are listed explicitly rather than as shifted labels, because the last prompt token predicts the first
token of *both* sides: ``target_ids[k]`` is predicted by the hidden state at flat position
``target_sources[k]`` (``row * width + column``) and counts towards sequence ``target_sequences[k]``.
Sequences are numbered as the padded layout numbers its rows: for a batch of B pairs, the first sides are
``0..B-1`` and the second sides ``B..2B-1``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor

from dpo.data.collate import collate_paired, collate_unpaired, pad_sequences

PROMPT = 0  # branch id of prompt tokens and of row padding
PADDING_SEGMENT = -1
PACKED_KEY = "segment_ids"  # a batch holding this key is packed
UNLIMITED = sys.maxsize  # row_tokens for "every segment of the batch in one row"

# A segment: the prompt's token ids and its sides, each (sequence number, completion token ids).
Segment = tuple[list[int], list[tuple[int, list[int]]]]


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` is in the packed layout (else it is the padded one)."""
    return PACKED_KEY in batch


def segment_length(segment: Segment) -> int:
    prompt, sides = segment
    return len(prompt) + sum(len(tokens) for _, tokens in sides)


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """First fit, longest first (ties in batch order), into rows of ``capacity`` tokens; a segment longer than
    that gets a row of its own."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for position in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, used in enumerate(fill):
            if used + lengths[position] <= capacity:
                rows[r].append(position)
                fill[r] += lengths[position]
                break
        else:
            rows.append([position])
            fill.append(lengths[position])
    return rows


def pack_rows(lengths: list[int], row_tokens: int | None) -> list[list[int]]:
    """Segment positions of each row.

    Args:
        lengths: tokens of each segment.
        row_tokens: the most tokens a row holds (first fit, longest first). None: rows of at most 1, 1.5 or 2
            times the longest segment, whichever lays the segments out in the fewest token positions (rows are
            padded to the widest; ties go to the narrower rows, since a dense mask costs a row's width squared).

    Returns:
        Rows, each the positions (into ``lengths``) of its segments in the order they are laid out.
    """
    if row_tokens is not None:
        return first_fit(lengths, row_tokens)
    longest = max(lengths)
    layouts = [first_fit(lengths, int(longest * factor)) for factor in (1, 1.5, 2)]

    def positions(rows: list[list[int]]) -> tuple[int, int]:
        width = max(sum(lengths[i] for i in row) for row in rows)
        return len(rows) * width, width

    return min(layouts, key=positions)


def pack_segments(segments: list[Segment], num_sequences: int, pad_token_id: int,
                  row_tokens: int | None = None) -> dict[str, Tensor]:
    """Lay segments out in rows with their position, segment and branch ids and their targets.

    Args:
        segments: ``(prompt_ids, [(sequence, completion_ids), ...])``; each sequence number in
            ``0..num_sequences-1`` appears exactly once.
        num_sequences: how many sequences (prompt + one side) the segments hold.
        pad_token_id: written on row padding.
        row_tokens: see :func:`pack_rows`.

    Returns:
        ``input_ids``, ``position_ids``, ``segment_ids``, ``branch_ids`` [R, W] (long); ``target_ids``,
        ``target_sources``, ``target_sequences`` [N] (long); ``sequence_ends`` [S] (flat position of each
        sequence's last token) and ``sequence_lengths`` [S] (prompt + completion tokens), S = ``num_sequences``.
    """
    lengths = [segment_length(s) for s in segments]
    rows = pack_rows(lengths, row_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    segment_ids = torch.full((len(rows), width), PADDING_SEGMENT, dtype=torch.long)
    branch_ids = torch.full((len(rows), width), PROMPT, dtype=torch.long)
    targets, sources, owners = [], [], []
    ends = [-1] * num_sequences
    sequence_lengths = [0] * num_sequences
    for r, row in enumerate(rows):
        column = 0
        for position in row:
            prompt, sides = segments[position]
            start = r * width + column  # flat position of the segment's first token
            input_ids[r, column : column + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            position_ids[r, column : column + len(prompt)] = torch.arange(len(prompt))
            segment_ids[r, column : column + len(prompt)] = position
            column += len(prompt)
            for branch, (sequence, tokens) in enumerate(sides, start=1):
                span = slice(column, column + len(tokens))
                input_ids[r, span] = torch.tensor(tokens, dtype=torch.long)
                position_ids[r, span] = torch.arange(len(prompt), len(prompt) + len(tokens))
                segment_ids[r, span] = position
                branch_ids[r, span] = branch
                flat = r * width + column
                # Token k of this side is predicted by token k-1 of the side, the first one by the last prompt
                # token; with an empty prompt the first token has no predictor (as in the padded layout).
                for k, token in enumerate(tokens):
                    source = flat + k - 1 if k > 0 else (start + len(prompt) - 1 if prompt else None)
                    if source is not None:
                        targets.append(token)
                        sources.append(source)
                        owners.append(sequence)
                ends[sequence] = flat + len(tokens) - 1 if tokens else start + len(prompt) - 1
                sequence_lengths[sequence] = len(prompt) + len(tokens)
                column += len(tokens)
    if -1 in ends:
        raise ValueError(f"pack_segments: sequence {ends.index(-1)} of 0..{num_sequences - 1} is in no segment")
    return {
        "input_ids": input_ids, "position_ids": position_ids, "segment_ids": segment_ids, "branch_ids": branch_ids,
        "target_ids": torch.tensor(targets, dtype=torch.long),
        "target_sources": torch.tensor(sources, dtype=torch.long),
        "target_sequences": torch.tensor(owners, dtype=torch.long),
        "sequence_ends": torch.tensor(ends, dtype=torch.long),
        "sequence_lengths": torch.tensor(sequence_lengths, dtype=torch.long),
    }


def pair_segments(rows: list[dict[str, Any]], first: str, second: str, share_prompt: bool) -> list[Segment]:
    """Segments of B two-sided rows: sequence ``i`` is row i's ``first`` side, ``B + i`` its ``second``.

    ``share_prompt=False`` makes two segments per row, ``[prompt | first]`` and ``[prompt | second]``
    (packing without prefix sharing, for comparison).
    """
    b = len(rows)
    if share_prompt:
        return [(r["prompt_ids"], [(i, r[first]), (b + i, r[second])]) for i, r in enumerate(rows)]
    return ([(r["prompt_ids"], [(i, r[first])]) for i, r in enumerate(rows)]
            + [(r["prompt_ids"], [(b + i, r[second])]) for i, r in enumerate(rows)])


def collate_packed_paired(rows: list[dict[str, Any]], pad_token_id: int, row_tokens: int | None = None,
                          share_prompt: bool = True) -> dict[str, Tensor]:
    """A packed batch of B pairs (sequences ``0..B-1`` chosen, ``B..2B-1`` rejected).

    Args:
        rows: tokenized pairs with ``index``, ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (and ``margin``).
        pad_token_id: written on row padding.
        row_tokens: the most tokens of a row (see :func:`pack_rows`).
        share_prompt: one segment per pair (the prompt once); False: one per sequence.

    Returns:
        What :func:`pack_segments` returns, plus ``index`` [B] (long) and, when the rows carry one,
        ``margin`` [B] (float32).
    """
    batch = pack_segments(pair_segments(rows, "chosen_ids", "rejected_ids", share_prompt), 2 * len(rows),
                          pad_token_id, row_tokens)
    batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
    if rows and "margin" in rows[0]:
        batch["margin"] = torch.tensor([float(r["margin"]) for r in rows], dtype=torch.float32)
    return batch


def collate_packed_unpaired(rows: list[dict[str, Any]], pad_token_id: int, row_tokens: int | None = None,
                            share_prompt: bool = True) -> dict[str, Tensor]:
    """A packed batch of B unpaired rows: sequences ``0..B-1`` the completions, ``B..2B-1`` the KL completions,
    which share their row's prompt.

    Returns:
        What :func:`pack_segments` returns, plus ``index`` [B] (long) and ``label`` [B] (bool, true = desirable).
    """
    batch = pack_segments(pair_segments(rows, "completion_ids", "kl_completion_ids", share_prompt), 2 * len(rows),
                          pad_token_id, row_tokens)
    batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
    batch["label"] = torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool)
    return batch


def default_row_tokens(device) -> int | None:
    """Row budget when ``train.max_batch_tokens`` is unset: on CUDA a whole micro-batch in one row (FlexAttention
    skips the blocks the mask rules out, so a wide row costs nothing); elsewhere None, rows of one to two times
    the longest segment (:func:`pack_rows`), since a dense 4-D mask costs a row's width squared."""
    return UNLIMITED if torch.device(device).type == "cuda" else None


def choose_collate(paired: bool, pad_token_id: int, packing: str, max_batch_tokens: int | None,
                   device) -> Callable[[list[dict[str, Any]]], dict[str, Tensor]]:
    """The collate function for ``train.packing`` (``auto``/``on``: packed, ``off``: padded).

    It depends only on the recipe and the device, so the reference precompute and evaluation batch held-out
    rows identically; whether a network takes the packed layout is decided by the step module
    (:class:`dpo.model.SequenceLogprobs` re-lays a packed batch as a padded one for a network that cannot).

    Args:
        paired: pairs (chosen, rejected) or unpaired rows (completion, KL completion).
        pad_token_id: written on padding.
        packing: ``train.packing``.
        max_batch_tokens: ``train.max_batch_tokens``: the most tokens of a packed row (see :func:`pack_rows`).
        device: where the batches run (sets the default row budget, :func:`default_row_tokens`).
    """
    if packing == "off":
        return partial(collate_paired if paired else collate_unpaired, pad_token_id=pad_token_id)
    row_tokens = max_batch_tokens if max_batch_tokens is not None else default_row_tokens(device)
    return partial(collate_packed_paired if paired else collate_packed_unpaired, pad_token_id=pad_token_id,
                   row_tokens=row_tokens)


def sequence_positions(batch: dict[str, Tensor]) -> list[Tensor]:
    """Flat positions (``row * width + column``) of each sequence's tokens, in order: its prompt, then its side."""
    segments, branches = batch["segment_ids"].cpu(), batch["branch_ids"].cpu()
    width = segments.shape[1]
    out = []
    for end in batch["sequence_ends"].cpu().tolist():
        r, column = divmod(end, width)
        segment, branch = segments[r, column], branches[r, column]
        mine = (segments[r] == segment) & ((branches[r] == PROMPT) | (branches[r] == branch))
        out.append(r * width + mine.nonzero().squeeze(1))
    return out


def unpack_to_padded(batch: dict[str, Tensor], pad_token_id: int = 0) -> dict[str, Tensor]:
    """The same sequences in the padded layout: ``input_ids``, ``attention_mask``, ``labels`` [S, T].

    For a network that cannot take the packed layout. Row ``s`` is sequence ``s``: its prompt, then its side,
    right-padded; labels on the side's tokens. ``index``, ``label``, ``margin`` and ``sequence_lengths`` are
    kept.
    """
    flat_ids = batch["input_ids"].reshape(-1).cpu()
    flat_branches = batch["branch_ids"].reshape(-1).cpu()
    sequences = []
    for positions in sequence_positions(batch):
        is_prompt = flat_branches[positions] == PROMPT
        sequences.append((flat_ids[positions[is_prompt]].tolist(), flat_ids[positions[~is_prompt]].tolist()))
    padded = pad_sequences(sequences, pad_token_id)
    device = batch["input_ids"].device
    out = {k: v.to(device) for k, v in padded.items()}
    for key in ("index", "label", "margin"):
        if key in batch:
            out[key] = batch[key]
    return out
