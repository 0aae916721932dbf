"""The reference precompute shared between the processes of a run (``accelerate launch``, ``torchrun``).

The examples still to compute are cut into the batches a single process would run (longest first,
``batch_size`` each), and process ``r`` of ``W`` runs batches ``r, r + W, ...``. After every round of ``W``
batches the processes exchange what they computed, so every process holds every value computed so far:
the first process of each machine can save progress and write its machine's cache file, and the values
are those one process computes, bit for bit (each batch is the same batch, run by the same code).

A round is a collective: every process takes part in every round, and one with no batch left in the last
round says so. Under an engine whose forward is itself a collective (FSDP or DeepSpeed ZeRO-3 gather each
layer's weights from all processes: :attr:`Processes.lockstep`) such a process runs a batch anyway and drops
its values, and a batch that runs out of memory is an error: halving it on one process alone would leave
the others waiting in their next forward. Otherwise a batch out of memory is run in halves, as in
:func:`dpo.reference.compute.compute_reference_logps`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dpo.reference.compute import (
    LogpFn,
    ReferenceLogps,
    _longest_first,
    example_indices,
    finite_reference_logps,
    save_progress_after_failure,
)
from dpo.reference.store import StoredValues

Log = Callable[[str], None]


def _alone(obj: Any) -> list:
    return [obj]


@dataclass(frozen=True)
class Processes:
    """The processes of a run, as the reference stage sees them.

    Attributes:
        rank: this process's index, ``0 <= rank < world``.
        world: how many processes take part.
        local_main: the first process of its machine: it takes the cache's locks and writes its machine's
            cache files (several machines need not share a disk).
        gather: every process's object, by rank; a collective, which every process calls at the same point.
        lockstep: every forward is a collective (an engine that shards parameters), so every process runs
            as many forwards as the others.
    """

    rank: int = 0
    world: int = 1
    local_main: bool = True
    gather: Callable[[Any], list] = field(default=_alone, compare=False)
    lockstep: bool = False

    @classmethod
    def launched(cls) -> Processes:
        """The processes ``accelerate launch`` or ``torchrun`` started (one process when started alone),
        over gloo on a machine without a GPU."""
        import os

        from accelerate import PartialState
        from accelerate.utils import gather_object

        state = PartialState(cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
        if state.num_processes == 1:
            return cls()
        return cls(rank=state.process_index, world=state.num_processes, local_main=state.is_local_main_process,
                   gather=lambda obj: gather_object([obj]))


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def compute_sharded(
    rows: Sequence[dict],
    collate: Callable[[list[dict]], dict[str, Tensor]],
    logp_fn: LogpFn,
    batch_size: int,
    processes: Processes,
    device: torch.device | str = "cpu",
    desc: str = "reference",
    log: Log = print,
    *,
    progress: StoredValues | None = None,
    checkpoint: Callable[[StoredValues], Any] | None = None,
    checkpoint_every_s: float = 60.0,
) -> ReferenceLogps:
    """:func:`dpo.reference.compute.compute_reference_logps` with the batches shared between ``processes``.

    Every process calls it with the same ``rows`` and ``batch_size`` and returns every example's values.

    Args:
        rows, collate, logp_fn, batch_size, device, desc, log: as in ``compute_reference_logps``.
        processes: who takes part (see :class:`Processes`).
        progress: this machine's saved progress, or None. An example is computed again unless every
            process has it (machines without a shared disk may have saved different progress).
        checkpoint: saves the values so far (given to the processes that write progress, None elsewhere):
            called at most every ``checkpoint_every_s`` seconds between rounds, and once more on a failure.
        checkpoint_every_s: seconds between progress saves.

    Raises:
        ValueError: indices that are not ``0..n-1``, or non-finite log-probs.
        torch.OutOfMemoryError: a batch does not fit under :attr:`Processes.lockstep`.
    """
    n = len(rows)
    indices = example_indices(rows)
    if sorted(indices) != list(range(n)):
        raise ValueError(f"{desc}: example indices must be exactly 0..{n - 1}")
    values = progress if progress is not None else StoredValues.empty(n)
    done = torch.stack(processes.gather(values.done.clone())).all(dim=0)
    queue = _longest_first(rows, [p for p in range(n) if not done[indices[p]]])
    batches = [queue[i : i + batch_size] for i in range(0, len(queue), batch_size)]
    rounds = math.ceil(len(batches) / processes.world)
    size = batch_size  # examples per forward on this process; lowered when one runs out of memory

    def run(positions: list[int]) -> list[tuple[Tensor, ...]]:
        """``(index, first, second, first_tokens, second_tokens)`` of each forward over ``positions``."""
        nonlocal size
        parts, start = [], 0
        while start < len(positions):
            chunk = positions[start : start + size]
            batch = _to(collate([rows[p] for p in chunk]), device)
            try:
                sums, counts = logp_fn(batch)
            except torch.OutOfMemoryError:
                if processes.lockstep:
                    raise torch.OutOfMemoryError(
                        f"{desc}: out of memory at {len(chunk)} examples per batch on process {processes.rank}; "
                        "the engine shards the model, so every process must run the same batches and one cannot "
                        "halve its own: lower reference.batch_size") from None
                if len(chunk) == 1:
                    raise
                del batch
                size = max(1, len(chunk) // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log(f"{desc}: out of memory at {len(chunk)} examples per batch; continuing with {size}")
                continue
            b = len(chunk)
            parts.append((batch["index"].cpu(), sums[:b].float().cpu(), sums[b:].float().cpu(),
                          counts[:b].long().cpu(), counts[b:].long().cpu()))
            start += b
        return parts

    todo = len(queue)
    start = last_checkpoint = time.perf_counter()
    unsaved = False
    bar = tqdm(total=2 * n, initial=2 * (n - todo), desc=desc, unit="seq", leave=False,
               disable=not todo or processes.rank != 0)  # one bar for the run, counting every process's values
    try:
        for round_ in range(rounds):
            slot = round_ * processes.world + processes.rank
            if slot < len(batches):
                parts = run(batches[slot])
            else:
                if processes.lockstep:  # the others' forwards wait for this one's share of every layer
                    run(batches[0][:size])
                parts = []
            for index, first, second, first_tokens, second_tokens in (
                    part for shared in processes.gather(parts) for part in shared):
                values.tensors["first"][index] = first
                values.tensors["second"][index] = second
                values.tensors["first_tokens"][index] = first_tokens
                values.tensors["second_tokens"][index] = second_tokens
                values.done[index] = True
                bar.update(2 * len(index))
            unsaved = True
            if (checkpoint is not None and round_ + 1 < rounds
                    and time.perf_counter() - last_checkpoint >= checkpoint_every_s):
                checkpoint(values)
                last_checkpoint, unsaved = time.perf_counter(), False
    except BaseException:
        if unsaved:
            save_progress_after_failure(checkpoint, values, desc, log)
        raise
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    if todo:
        rate = 2 * todo / elapsed if elapsed > 0 else float("inf")
        log(f"{desc}: computed {2 * todo} sequences in {elapsed:.1f}s over {processes.world} processes "
            f"({rate:.1f} sequences/s)")
    return finite_reference_logps(values, desc)
