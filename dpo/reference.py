"""Reference log-probs: computed once, before training, for every training and eval example.

The training step never runs the reference model; it looks its values up by example index. This module
does not know what model it runs: the caller passes ``logp_fn`` (the policy with its adapter disabled,
or a separate reference model), which keeps the data flow one-way.

Layout: every collated batch has ``2B`` rows; rows ``0..B-1`` are the first side of each example
(chosen, or the KTO completion) and rows ``B..2B-1`` the second (rejected, or KTO's mismatched
completion). :class:`ReferenceLogps` stores both sides per example index.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

LogpFn = Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ReferenceLogps:
    """Summed reference log-probs and completion token counts of one split, indexed by example.

    Attributes:
        first: ``[n]`` float32, chosen (paired) or completion (unpaired).
        second: ``[n]`` float32, rejected (paired) or the mismatched KL completion (unpaired).
        first_tokens: ``[n]`` int64 token counts of ``first``.
        second_tokens: ``[n]`` int64 token counts of ``second``.
    """

    first: Tensor
    second: Tensor
    first_tokens: Tensor
    second_tokens: Tensor

    def __len__(self) -> int:
        return self.first.shape[0]

    def lookup(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(first [B], second [B])`` for the examples ``index [B]``, on ``index``'s device."""
        cpu_index = index.cpu()
        return self.first[cpu_index].to(index.device), self.second[cpu_index].to(index.device)


def _example_length(row: dict) -> int:
    prompt = len(row["prompt_ids"])
    sides = [k for k in ("chosen_ids", "rejected_ids", "completion_ids", "kl_completion_ids") if k in row]
    return prompt + max(len(row[k]) for k in sides)


def length_sorted_batches(rows: Sequence[dict], batch_size: int) -> list[list[int]]:
    """Positions of ``rows`` grouped into batches of similar length (longest first), to avoid padding."""
    order = sorted(range(len(rows)), key=lambda i: _example_length(rows[i]), reverse=True)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def compute_reference_logps(
    rows: Sequence[dict],
    collate: Callable[[list[dict]], dict[str, Tensor]],
    logp_fn: LogpFn,
    batch_size: int,
    device: torch.device | str = "cpu",
    desc: str = "reference",
    log: Callable[[str], None] = print,
) -> ReferenceLogps:
    """Run ``logp_fn`` over every example once.

    Args:
        rows: tokenized examples, each with an ``index`` in ``0..n-1``.
        collate: builds a ``2B``-row batch (see module docstring) from a list of rows.
        logp_fn: ``batch -> (summed log-probs [2B], token counts [2B])``.
        batch_size: examples per forward (each gives two rows).
        device: where batches are sent.
        desc: label for the progress bar.
        log: where the summary line goes.

    Returns:
        The reference log-probs of every example, on the CPU.
    """
    n = len(rows)
    first = torch.full((n,), float("nan"))
    second = torch.full((n,), float("nan"))
    first_tokens = torch.zeros(n, dtype=torch.long)
    second_tokens = torch.zeros(n, dtype=torch.long)
    start = time.perf_counter()
    batches = length_sorted_batches(rows, batch_size)
    for positions in tqdm(batches, desc=desc, leave=False, disable=n == 0):
        batch = collate([rows[p] for p in positions])
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
        sums, counts = logp_fn(batch)
        b = len(positions)
        index = batch["index"].cpu()
        first[index] = sums[:b].float().cpu()
        second[index] = sums[b:].float().cpu()
        first_tokens[index] = counts[:b].cpu()
        second_tokens[index] = counts[b:].cpu()
    elapsed = time.perf_counter() - start
    if torch.isnan(first).any() or torch.isnan(second).any():
        missing = int(torch.isnan(first).sum())
        raise RuntimeError(f"{desc}: {missing} examples got no reference log-prob (example indices must be 0..n-1)")
    rate = 2 * n / elapsed if elapsed > 0 else float("inf")
    log(f"{desc}: computed {2 * n} sequences in {elapsed:.1f}s ({rate:.0f} sequences/s)")
    return ReferenceLogps(first, second, first_tokens, second_tokens)
