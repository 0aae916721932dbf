"""The reference precompute: interrupted and resumed, batches halved on out-of-memory, and the verification
tolerance."""

from __future__ import annotations

import shutil
from functools import partial

import pytest
import torch

from dpo.data import collate_paired
from dpo.reference.compute import compute_and_store, compute_reference_logps, reference_mismatches
from dpo.reference.store import CacheFileError, ReferenceStore
from tests.helpers import reference_values

QUIET = lambda _: None  # noqa: E731

# ------------------------------------------------------------------------------- interrupted precompute


def _rows(n: int) -> list[dict]:
    # Lengths 1..n so that the longest-first order is fixed; values depend only on the row.
    return [{"index": i, "prompt_ids": [1], "chosen_ids": [5] * (i + 1), "rejected_ids": [6] * (i + 1)}
            for i in range(n)]


def _fake_logp_fn(calls: list[int], fail_at: int | None = None, oom_above: int | None = None):
    def logp_fn(batch):
        b = batch["index"].shape[0]
        if oom_above is not None and b > oom_above:
            raise torch.OutOfMemoryError("fake: out of memory")
        calls.append(b)
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("injected failure")
        counts = (batch["labels"] != -100).sum(dim=1)
        return -0.5 * counts.float() - 0.01 * batch["index"].repeat(2).float(), counts

    return logp_fn


@pytest.mark.parametrize("checkpoint_every_s", [0.0, 3600.0])
def test_interrupted_precompute_leaves_no_acceptable_file_and_resumes(tmp_path, checkpoint_every_s):
    rows, store, fingerprint = _rows(10), ReferenceStore(tmp_path), "c" * 40
    collate = partial(collate_paired, pad_token_id=0)
    calls: list[int] = []
    with pytest.raises(RuntimeError, match="injected"):
        compute_and_store(store, fingerprint, {}, rows, collate, _fake_logp_fn(calls, fail_at=3), 2, "cpu",
                          "train", QUIET, checkpoint_every_s=checkpoint_every_s)
    assert not store.path(fingerprint).exists()
    for leftover in tmp_path.iterdir():  # whatever it left, no name or content passes as the finished entry
        shutil.copy(leftover, store.path(fingerprint))
        with pytest.raises(CacheFileError):
            store.load(fingerprint, len(rows))
    store.path(fingerprint).unlink()

    # Two batches finished before the failure (hourly checkpoints: saved by the failure handler).
    resumed_calls: list[int] = []
    messages: list[str] = []
    resumed = compute_and_store(store, fingerprint, {}, rows, collate, _fake_logp_fn(resumed_calls), 2, "cpu",
                                "train", messages.append, checkpoint_every_s=checkpoint_every_s)
    assert resumed_calls == [2, 2, 2] and "resuming after 8 saved" in messages[0]
    clean = compute_reference_logps(rows, collate, _fake_logp_fn([]), 2, "cpu", log=QUIET)
    assert all(torch.equal(resumed.tensors()[k], clean.tensors()[k]) for k in clean.tensors())
    assert [p.name for p in tmp_path.iterdir()] == [store.path(fingerprint).name]  # progress file removed


def test_out_of_memory_halves_the_batch_and_keeps_every_value(tmp_path):
    rows, collate = _rows(9), partial(collate_paired, pad_token_id=0)
    calls: list[int] = []
    messages: list[str] = []
    result = compute_reference_logps(rows, collate, _fake_logp_fn(calls, oom_above=2), 8, "cpu", log=messages.append)
    assert calls == [2, 2, 2, 2, 1]
    assert any("out of memory at 8" in m for m in messages) and any("out of memory at 4" in m for m in messages)
    # The fake value is -0.5 per token - 0.01 * index; tokens = index + 1 on both sides.
    index = torch.arange(9, dtype=torch.float32)
    assert torch.allclose(result.first, -0.5 * (index + 1) - 0.01 * index)
    assert torch.equal(result.second_tokens, torch.arange(9) + 1)


# ----------------------------------------------------------------------------------------- verification



def test_verification_tolerance_grows_with_the_square_root_of_length():
    cached = reference_values(2)
    fresh = {k: v.clone() for k, v in cached.items()}
    from dpo.reference.compute import ReferenceLogps

    # first_tokens = [1, 2]: tolerance 1e-3 * sqrt(1) and 1e-3 * sqrt(2) = 1.414e-3.
    fresh["first"] = fresh["first"] + torch.tensor([0.9e-3, 1.5e-3])
    problems = reference_mismatches(ReferenceLogps(**cached), ReferenceLogps(**fresh), [0, 1], 1e-3)
    assert len(problems) == 1 and problems[0].startswith("example 1 (first)")
    fresh["second_tokens"] = fresh["second_tokens"] + 1
    assert len(reference_mismatches(ReferenceLogps(**cached), ReferenceLogps(**fresh), [0, 1], 1e-3)) == 3
