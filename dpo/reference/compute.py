"""Reference log-probs: computed once per fingerprint, kept on disk, looked up by example index.

The training step never runs the reference model. This module does not know what model it runs: the
caller passes ``logp_fn`` (the policy with its adapter disabled, or a separate reference model) and the
fingerprint of everything that determines the values (:mod:`dpo.reference.setup` builds both), which keeps
the data flow one-way. The files themselves are :mod:`dpo.reference.store`'s business.

Layout: every collated batch has ``2B`` rows; rows ``0..B-1`` are the first side of each example
(chosen, or the KTO completion) and rows ``B..2B-1`` the second (rejected, or KTO's mismatched
completion). :class:`ReferenceLogps` stores both sides per example index.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dpo.files import WriteFailed, writing
from dpo.reference.store import CacheFileError, ReferenceStore, StoredValues

LogpFn = Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]]
Log = Callable[[str], None]


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

    def tensors(self) -> dict[str, Tensor]:
        return {"first": self.first, "second": self.second,
                "first_tokens": self.first_tokens, "second_tokens": self.second_tokens}


def _example_length(row: dict) -> int:
    prompt = len(row["prompt_ids"])
    sides = [k for k in ("chosen_ids", "rejected_ids", "completion_ids", "kl_completion_ids") if k in row]
    return prompt + max((len(row[k]) for k in sides), default=0)  # prompt-only rows: an online task's held-out prompts


def _longest_first(rows: Sequence[dict], positions: Sequence[int]) -> list[int]:
    return sorted(positions, key=lambda i: _example_length(rows[i]), reverse=True)


def length_sorted_batches(rows: Sequence[dict], batch_size: int) -> list[list[int]]:
    """Positions of ``rows`` grouped into batches of similar length (longest first), to avoid padding."""
    order = _longest_first(rows, range(len(rows)))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def example_indices(rows: Sequence[dict]) -> list[int]:
    """The ``index`` of every row (read as a column when ``rows`` is a ``datasets.Dataset``)."""
    if hasattr(rows, "column_names"):
        return [int(i) for i in rows["index"]]
    return [int(row["index"]) for row in rows]


@torch.no_grad()
def compute_reference_logps(
    rows: Sequence[dict],
    collate: Callable[[list[dict]], dict[str, Tensor]],
    logp_fn: LogpFn,
    batch_size: int,
    device: torch.device | str = "cpu",
    desc: str = "reference",
    log: Log = print,
    *,
    progress: StoredValues | None = None,
    checkpoint: Callable[[StoredValues], Any] | None = None,
    checkpoint_every_s: float = 60.0,
) -> ReferenceLogps:
    """Run ``logp_fn`` once over every example not yet done, longest examples first, without gradients.

    A batch that runs out of accelerator memory is split in half and retried (and so are all later
    batches), so ``batch_size`` can be set to the largest that might fit.

    Args:
        rows: tokenized examples, each with an ``index``; the indices are exactly ``0..n-1``.
        collate: builds a ``2B``-row batch (see module docstring) from a list of rows.
        logp_fn: ``batch -> (summed log-probs [2B], token counts [2B])``.
        batch_size: examples per forward at most (each gives two rows).
        device: where batches are sent.
        desc: label for the progress bar and the summary line.
        log: where the summary line goes.
        progress: values already computed (an interrupted run's progress); only examples not ``done``
            are computed. None starts from nothing.
        checkpoint: called with the values so far at most every ``checkpoint_every_s`` seconds, and once
            more if the computation fails, so that a later run can resume.
        checkpoint_every_s: seconds between checkpoints (0: after every batch).

    Returns:
        The reference log-probs of every example, on the CPU.

    Raises:
        ValueError: indices that are not ``0..n-1``, or non-finite log-probs (the reference model overflows).
    """
    n = len(rows)
    indices = example_indices(rows)
    if sorted(indices) != list(range(n)):
        raise ValueError(f"{desc}: example indices must be exactly 0..{n - 1}")
    values = progress if progress is not None else StoredValues.empty(n)
    todo = [p for p in range(n) if not values.done[indices[p]]]
    queue = _longest_first(rows, todo)
    size = batch_size
    start = last_checkpoint = time.perf_counter()
    unsaved = False
    bar = tqdm(total=2 * n, initial=2 * (n - len(todo)), desc=desc, unit="seq", leave=False, disable=not todo)
    try:
        while queue:
            positions, rest = queue[:size], queue[size:]
            batch = collate([rows[p] for p in positions])
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            try:
                sums, counts = logp_fn(batch)
            except torch.OutOfMemoryError:
                if len(positions) == 1:
                    raise
                del batch
                size = max(1, len(positions) // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log(f"{desc}: out of memory at {len(positions)} examples per batch; continuing with {size}")
                continue
            b = len(positions)
            index = batch["index"].cpu()
            values.tensors["first"][index] = sums[:b].float().cpu()
            values.tensors["second"][index] = sums[b:].float().cpu()
            values.tensors["first_tokens"][index] = counts[:b].long().cpu()
            values.tensors["second_tokens"][index] = counts[b:].long().cpu()
            values.done[index] = True
            queue, unsaved = rest, True
            bar.update(2 * b)
            if checkpoint is not None and queue and time.perf_counter() - last_checkpoint >= checkpoint_every_s:
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
        rate = 2 * len(todo) / elapsed if elapsed > 0 else float("inf")
        log(f"{desc}: computed {2 * len(todo)} sequences in {elapsed:.1f}s ({rate:.1f} sequences/s)")
    return finite_reference_logps(values, desc)


def save_progress_after_failure(checkpoint: Callable[[StoredValues], None] | None, values: StoredValues, desc: str,
                                log: Log) -> None:
    """Save ``values`` through ``checkpoint`` (if any) while a failure propagates, so a later run resumes; a
    failure of the save itself is only logged, keeping the original one (the lost progress is recomputed)."""
    if checkpoint is None:
        return
    try:
        checkpoint(values)
    except Exception as exc:
        log(f"{desc}: could not save progress ({exc})")


def finite_reference_logps(values: StoredValues, desc: str) -> ReferenceLogps:
    """The computed values as :class:`ReferenceLogps`.

    Raises:
        ValueError: some log-prob is not finite (the reference model overflows), naming the first example.
    """
    result = ReferenceLogps(**values.tensors)
    bad = ~(torch.isfinite(result.first) & torch.isfinite(result.second))
    if bad.any():
        raise ValueError(
            f"{desc}: the reference model gives non-finite log-probs for {int(bad.sum())} examples (first: "
            f"index {int(bad.nonzero()[0])}); check the model and model.dtype (float16 overflows easily)"
        )
    return result


# --------------------------------------------------------------------------------------- the cache


def load_cached(store: ReferenceStore, fingerprint: str, count: int, split: str, log: Log) -> ReferenceLogps | None:
    """The cached values of one split, or None (reported as a miss) when they must be computed."""
    path = store.path(fingerprint)
    try:
        tensors = store.load(fingerprint, count)
    except CacheFileError as exc:
        log(f"reference cache: {path} is unusable ({exc}); it will be recomputed")
        return None
    if tensors is None:
        return None
    log(f"reference cache: hit ({path}): {split} split, {2 * count} sequences")
    return ReferenceLogps(**tensors)


def compute_and_store(
    store: ReferenceStore,
    fingerprint: str,
    parts: dict[str, Any],
    rows: Sequence[dict],
    collate: Callable[[list[dict]], dict[str, Tensor]],
    logp_fn: LogpFn,
    batch_size: int,
    device: torch.device | str,
    split: str,
    log: Log,
    checkpoint_every_s: float = 60.0,
    processes=None,
    write: bool = True,
) -> ReferenceLogps:
    """Compute one split's values (resuming from saved progress) and write the finished cache file.

    Args:
        store: the cache folder.
        fingerprint: the split's key (see :func:`dpo.reference.setup.reference_keys`).
        parts: what the key was made of, stored in the file for people reading it.
        rows, collate, logp_fn, batch_size, device: as in :func:`compute_reference_logps`.
        split: "train" or "eval", for messages.
        log: where messages go.
        checkpoint_every_s: seconds between progress saves.
        processes: a :class:`dpo.reference.shard.Processes` of several processes that share the work
            (every one of them calls this); None or one process computes alone.
        write: save progress and the finished file (the process that writes its machine's cache); otherwise
            only compute and return the values.
    """
    count = len(rows)
    progress = store.load_partial(fingerprint, count)
    done = int(progress.done.sum()) if progress is not None else 0
    message = f"reference cache: miss: computing {2 * (count - done)} sequences ({split} split)"
    if done:
        message += f", resuming after {2 * done} saved in {store.partial_path(fingerprint)}"
    log(message)
    save_progress = (lambda values: store.save_partial(fingerprint, values, parts)) if write else None
    if processes is not None and processes.world > 1:
        from dpo.reference.shard import compute_sharded

        result = compute_sharded(rows, collate, logp_fn, batch_size, processes, device, f"reference ({split})", log,
                                 progress=progress, checkpoint=save_progress, checkpoint_every_s=checkpoint_every_s)
    else:
        result = compute_reference_logps(
            rows, collate, logp_fn, batch_size, device, f"reference ({split})", log,
            progress=progress, checkpoint=save_progress, checkpoint_every_s=checkpoint_every_s,
        )
    if not write:
        return result
    if done < count:  # kept as progress first, so a failing final write (a full disk) loses nothing computed
        store.save_partial(fingerprint, StoredValues(result.tensors(), torch.ones(count, dtype=torch.bool)), parts)
    try:
        with writing(store.path(fingerprint), "reference cache"):
            path = store.save(fingerprint, result.tensors(), parts)
    except WriteFailed as exc:
        exc.kept = (f"Every value computed is saved in {store.partial_path(fingerprint)}: the next run writes the "
                    "finished entry from it without computing anything again.")
        raise
    log(f"reference cache: wrote {path}")
    return result


# --------------------------------------------------------------------------------------- verification


def verification_tolerance(tokens: Tensor, per_token: float) -> Tensor:
    """Allowed ``|cached - recomputed|`` for sums over ``tokens`` tokens.

    Rounding differences between batch shapes are independent from token to token, so their sum grows
    like the square root of the length; a stale value (another model or other data) differs by O(1) per
    token and so by O(length).
    """
    return per_token * tokens.double().clamp(min=1).sqrt()


def reference_mismatches(cached: ReferenceLogps, fresh: ReferenceLogps, indices: list[int],
                         per_token: float) -> list[str]:
    """Descriptions of every example whose recomputed values differ from the cached ones beyond tolerance.

    Args:
        cached: the values read from the cache.
        fresh: recomputed values; ``fresh[j]`` is example ``indices[j]``.
        indices: the example indices that were recomputed.
        per_token: tolerance scale (see :func:`verification_tolerance`).
    """
    problems = []
    for j, index in enumerate(indices):
        for side in ("first", "second"):
            tokens_cached = int(getattr(cached, f"{side}_tokens")[index])
            tokens_fresh = int(getattr(fresh, f"{side}_tokens")[j])
            value_cached = float(getattr(cached, side)[index])
            value_fresh = float(getattr(fresh, side)[j])
            allowed = float(verification_tolerance(torch.tensor(tokens_fresh), per_token))
            if tokens_cached != tokens_fresh:
                problems.append(f"example {index} ({side}): {tokens_cached} cached tokens, {tokens_fresh} now")
            elif not math.isclose(value_cached, value_fresh, rel_tol=0.0, abs_tol=allowed):
                problems.append(f"example {index} ({side}): cached {value_cached:.6f}, recomputed {value_fresh:.6f} "
                                f"(|difference| {abs(value_cached - value_fresh):.3g} > tolerance {allowed:.3g})")
    return problems
