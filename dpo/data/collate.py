"""Batches: prompt + completion sequences, right-padded, with labels only on completion tokens.

Labels are aligned with ``input_ids`` (the model shifts them itself): position ``t`` holds the id of
token ``t`` when it is a completion token (EOS included), and -100 on prompt and padding positions.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100


def collate_paired(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch of B pairs: rows ``0..B-1`` are (prompt, chosen), rows ``B..2B-1`` (prompt, rejected).

    Args:
        rows: tokenized pairs with ``index``, ``prompt_ids``, ``chosen_ids``, ``rejected_ids``.
        pad_token_id: the id written on padding positions of ``input_ids``.

    Returns:
        ``input_ids`` [2B, T], ``attention_mask`` [2B, T], ``labels`` [2B, T] (long) and ``index`` [B] (long);
        ``margin`` [B] (float32) when the rows carry a margin (``prepare_data(margin_column=...)``).
    """
    sequences = [(r["prompt_ids"], r["chosen_ids"]) for r in rows]
    sequences += [(r["prompt_ids"], r["rejected_ids"]) for r in rows]
    batch = pad_sequences(sequences, pad_token_id)
    batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
    if rows and "margin" in rows[0]:
        batch["margin"] = torch.tensor([float(r["margin"]) for r in rows], dtype=torch.float32)
    return batch


def collate_unpaired(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch of B unpaired rows: rows ``0..B-1`` are (prompt, completion), ``B..2B-1`` (prompt, KL completion).

    Args:
        rows: tokenized rows with ``index``, ``prompt_ids``, ``completion_ids``, ``kl_completion_ids``, ``label``.
        pad_token_id: the id written on padding positions of ``input_ids``.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` [2B, T] (long), ``index`` [B] (long), ``label`` [B] (bool,
        true = desirable).
    """
    sequences = [(r["prompt_ids"], r["completion_ids"]) for r in rows]
    sequences += [(r["prompt_ids"], r["kl_completion_ids"]) for r in rows]
    batch = pad_sequences(sequences, pad_token_id)
    batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
    batch["label"] = torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool)
    return batch


def pad_sequences(sequences: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ``(prompt, completion)`` sequences to the longest one.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each [N, T] long, N = ``len(sequences)``, and
        ``sequence_lengths`` [N] (prompt + completion tokens of each).
    """
    width = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(sequences):
        end = len(prompt) + len(completion)
        input_ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        input_ids[i, len(prompt) : end] = torch.tensor(completion, dtype=torch.long)
        attention_mask[i, :end] = 1
        labels[i, len(prompt) : end] = torch.tensor(completion, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "sequence_lengths": attention_mask.sum(dim=1)}


def collate_completions(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch of B (prompt, completion) rows for supervised fine-tuning: each row's ``completion_ids``
    (demonstrations, unpaired rows), or for a pair its ``chosen_ids``.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` [B, T] (long) and ``index`` [B] (long).
    """
    side = "completion_ids" if rows and "completion_ids" in rows[0] else "chosen_ids"
    batch = pad_sequences([(r["prompt_ids"], r[side]) for r in rows], pad_token_id)
    batch["index"] = torch.tensor([r["index"] for r in rows], dtype=torch.long)
    return batch
