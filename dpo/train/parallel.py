"""What a multi-process run does itself; the engine does the rest.

The engine (accelerate's DDP, FSDP2 or DeepSpeed, see :mod:`dpo.train.engine`) wraps the step module and
owns gradient synchronisation (once per optimizer step: under gradient accumulation the other micro-batches
run inside ``accelerator.accumulate``'s ``no_sync``), parameter sharding and mixed precision. Three things
stay here, because no engine does them:

* **The data order** (:func:`shard`). Every process rebuilds the epoch's shuffled micro-batches from
  ``(seed, epoch)`` and takes its share, round robin. A data loader prepared by accelerate would shard as
  well, but its position lives in the loader's and sampler's hidden state; rebuilding the order from a
  checkpoint's (epoch, micro-batch) is what makes a resumed run exact, and what lets a run resume under
  another process count (``--force``). With ``W`` processes, process ``r`` takes micro-batches
  ``r, r + W, r + 2W, ...``, so one round of ``W`` micro-batches in parallel gives the gradient that one
  process accumulating those ``W`` micro-batches (``grad_accum = W``) gives: the mean over micro-batches of
  each one's mean loss.
* **Merged metric windows** (:func:`merge_sums`). Engines reduce gradients, not metrics. A train record
  averages every example that every process saw since the last record (not a mean of per-process means),
  which takes their sums and counts.
* **Forwards in step** (:func:`lockstep`). Under an engine that shards parameters (FSDP, DeepSpeed ZeRO-3)
  every forward is a collective: each process gathers each layer's weights from the others. A pass without
  gradients whose batches do not divide evenly (evaluation, the reference precompute) must still run the same
  number of forwards on every process, so the short ones repeat a batch and discard its result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

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


def lockstep(items: Sequence[T], rank: int, world: int) -> list[tuple[T, bool]]:
    """Process ``rank``'s share of ``items`` (every item once over all processes), padded so that every
    process has ``ceil(len / world)`` entries: ``(item, counts)``, where ``counts`` is False on a padding entry
    (a repeat of ``items[0]``, to run and discard).

    Args:
        items: the shared order, the same on every process; padding needs at least one item.
        rank: this process's index.
        world: the number of processes.
    """
    own = [(item, True) for item in shard(items, rank, world, whole_rounds=False)]
    if not items:
        return own
    return own + [(items[0], False)] * (math.ceil(len(items) / world) - len(own))


def merge_sums(parts: Sequence[tuple[dict[str, float], dict[str, int]]]) -> tuple[dict[str, float], dict[str, int]]:
    """Add up ``(sums, counts)`` of running metric windows from several processes, key by key."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for part_sums, part_counts in parts:
        for key, value in part_sums.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + part_counts[key]
    return sums, counts
