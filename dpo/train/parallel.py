"""Data parallelism for the training loop: which micro-batches a process takes, and what processes share.

The step module (:class:`dpo.model.SequenceLogprobs`, whose forward is the log-prob path) is not wrapped
in ``DistributedDataParallel``, though it could be: its hooks would see that forward. The trainable
parameters are few (a LoRA adapter), so each process runs its own micro-batches and the gradients are
averaged with one all-reduce per dtype at the optimizer step (not once per micro-batch, as DDP outside
``no_sync`` would).

With ``W`` processes, process ``r`` takes micro-batches ``r, r + W, r + 2W, ...`` of the shared epoch
order, so one round of ``W`` micro-batches in parallel gives the gradient that one process accumulating
those ``W`` micro-batches (``grad_accum = W``) gives: the mean over micro-batches of each one's mean loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world: int, *, whole_rounds: bool) -> list[T]:
    """Process ``rank``'s share of ``items`` (round robin).

    Args:
        items: the shared order, the same on every process.
        rank: this process's index, ``0 <= rank < world``.
        world: the number of processes.
        whole_rounds: keep only complete rounds of ``world`` items, so every process gets the same number
            (training, where each optimizer step needs every process); otherwise the first ``len % world``
            processes get one more (evaluation, where every item counts once).
    """
    if world <= 1:
        return list(items)
    usable = len(items) // world * world if whole_rounds else len(items)
    return list(items[rank:usable:world])


def _by_dtype(params: Sequence[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """Parameters grouped by dtype (each group travels as one flat tensor), in a fixed order."""
    groups: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for param in params:
        groups.setdefault(param.dtype, []).append(param)
    return list(groups.values())


def _views(flat: torch.Tensor, group: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """``flat`` cut back into one view per parameter of ``group``, each of its parameter's shape."""
    return [piece.view_as(p) for piece, p in zip(flat.split([p.numel() for p in group]), group, strict=True)]


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient with its mean over all processes (in place; one all-reduce per dtype).

    A parameter without a gradient on this process counts as zero, so every process sends the same
    layout (an adapter whose output a batch did not reach still takes part).
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    for group in _by_dtype(params):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        for param, values in zip(group, _views(flat, group), strict=True):
            if param.grad is None:
                param.grad = values.clone()
            else:
                param.grad.copy_(values)


def broadcast_parameters(params: Sequence[torch.nn.Parameter]) -> None:
    """Overwrite each parameter with process 0's values (in place; one broadcast per dtype)."""
    import torch.distributed as dist

    with torch.no_grad():
        for group in _by_dtype(params):
            flat = torch.cat([p.detach().reshape(-1) for p in group])
            dist.broadcast(flat, src=0)
            for param, values in zip(group, _views(flat, group), strict=True):
                param.copy_(values)


def merge_sums(parts: Sequence[tuple[dict[str, float], dict[str, int]]]) -> tuple[dict[str, float], dict[str, int]]:
    """Add up ``(sums, counts)`` of running metric windows from several processes, key by key."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for part_sums, part_counts in parts:
        for key, value in part_sums.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + part_counts[key]
    return sums, counts
