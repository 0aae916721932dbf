"""The reference precompute shared between processes (here threads that gather through a barrier): every
process ends with every value, bit for bit what one process computes; saved progress counts only where every
process has it; under lockstep every process runs as many forwards, and out of memory is an error there."""

from __future__ import annotations

import threading
from functools import partial

import pytest
import torch

from dpo.data import collate_paired, prepare_data
from dpo.model import SequenceLogprobs, load_base_model, load_tokenizer
from dpo.recipe import DataConfig, ModelConfig
from dpo.reference.compute import compute_and_store, compute_reference_logps
from dpo.reference.shard import Processes, compute_sharded
from dpo.reference.store import ReferenceStore, StoredValues

QUIET = lambda _: None  # noqa: E731


def run_processes(world: int, work) -> list:
    """``work(processes)`` in ``world`` threads that gather from each other, as processes of one run do."""
    barrier = threading.Barrier(world, timeout=60)
    slots: list = [None] * world
    results: list = [None] * world
    errors: list = []

    def gather_for(rank: int):
        def gather(obj) -> list:
            slots[rank] = obj
            barrier.wait()
            everyone = list(slots)
            barrier.wait()  # nobody overwrites a slot before every thread has read them all
            return everyone
        return gather

    def body(rank: int) -> None:
        try:
            results[rank] = work(Processes(rank=rank, world=world, local_main=rank == 0, gather=gather_for(rank)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.fixture(scope="module")
def real(assets):
    """A tiny float32 Llama's log-prob path and 24 tokenized pairs of uneven lengths."""
    model_config = ModelConfig(path=str(assets["model"]))
    tokenizer = load_tokenizer(model_config)
    data = prepare_data(DataConfig(train=str(assets["train"]), eval_fraction=0.0, max_length=64,
                                   max_prompt_length=48), tokenizer, unpaired=False, seed=0, log=QUIET)
    step = SequenceLogprobs(load_base_model(model_config).eval())
    rows = [data.train[i] for i in range(len(data.train))]
    return rows, partial(collate_paired, pad_token_id=tokenizer.pad_token_id), step


@pytest.mark.parametrize("world, lockstep", [(2, False), (3, True)])
def test_shared_values_equal_one_process_bit_for_bit(real, world, lockstep):
    rows, collate, step = real
    with torch.no_grad():
        alone = compute_reference_logps(rows, collate, step, 5, log=QUIET)
        forwards: list[int] = []

        def logp_fn(batch):
            forwards.append(threading.get_ident())
            return step(batch)

        shared = run_processes(world, lambda processes: compute_sharded(
            rows, collate, logp_fn, 5, Processes(processes.rank, processes.world, processes.local_main,
                                                 processes.gather, lockstep), log=QUIET))
    for values in shared:  # every process has every value, computed by whichever process ran its batch
        for name, tensor in alone.tensors().items():
            assert torch.equal(values.tensors()[name], tensor), name
    per_process = sorted(forwards.count(ident) for ident in set(forwards))
    if lockstep:  # 5 batches over 3 processes: 2 rounds, so every process runs 2 forwards (one a repeat)
        assert per_process == [2, 2, 2]
    else:  # the one with no batch left in the last round runs nothing
        assert per_process == [2, 3]


def _fake_logp_fn(calls: list[int], oom_above: int | None = None):
    def logp_fn(batch):
        b = batch["index"].shape[0]
        if oom_above is not None and b > oom_above:
            raise torch.OutOfMemoryError("fake: out of memory")
        calls.append(b)
        counts = (batch["labels"] != -100).sum(dim=1)
        return -0.5 * counts.float() - 0.01 * batch["index"].repeat(2).float(), counts

    return logp_fn


def _rows(n: int) -> list[dict]:
    return [{"index": i, "prompt_ids": [1], "chosen_ids": [5] * (i + 1), "rejected_ids": [6] * (i + 1)}
            for i in range(n)]


def test_saved_progress_counts_only_where_every_process_has_it():
    rows, collate = _rows(8), partial(collate_paired, pad_token_id=0)
    clean = compute_reference_logps(rows, collate, _fake_logp_fn([]), 2, log=QUIET)
    saved = StoredValues({name: tensor.clone() for name, tensor in clean.tensors().items()},
                         torch.arange(8) < 4)  # examples 0-3 done on the first machine only
    calls: list[int] = []
    run_processes(2, lambda processes: compute_sharded(
        rows, collate, _fake_logp_fn(calls), 2, processes, log=QUIET,
        progress=StoredValues({k: v.clone() for k, v in saved.tensors.items()}, saved.done.clone())
        if processes.rank == 0 else None))
    assert sum(calls) == 8  # the second machine had nothing saved: every example is computed again

    calls.clear()
    results = run_processes(2, lambda processes: compute_sharded(
        rows, collate, _fake_logp_fn(calls), 2, processes, log=QUIET,
        progress=StoredValues({k: v.clone() for k, v in saved.tensors.items()}, saved.done.clone())))
    assert sum(calls) == 4  # both had 0-3: only 4-7 are computed
    for values in results:
        assert all(torch.equal(values.tensors()[k], clean.tensors()[k]) for k in clean.tensors())


def test_out_of_memory_halves_a_batch_alone_but_is_an_error_in_lockstep():
    rows, collate = _rows(8), partial(collate_paired, pad_token_id=0)
    calls: list[int] = []
    results = run_processes(2, lambda processes: compute_sharded(rows, collate, _fake_logp_fn(calls, oom_above=2), 4,
                                                                 processes, log=QUIET))
    assert sorted(calls) == [2, 2, 2, 2]
    clean = compute_reference_logps(rows, collate, _fake_logp_fn([]), 4, log=QUIET)
    assert torch.equal(results[1].first, clean.first)

    with pytest.raises(torch.OutOfMemoryError, match="lower reference.batch_size"):
        run_processes(2, lambda processes: compute_sharded(
            rows, collate, _fake_logp_fn([], oom_above=2), 4,
            Processes(processes.rank, 2, processes.local_main, processes.gather, lockstep=True), log=QUIET))


def test_only_the_writing_process_writes(tmp_path):
    rows, collate, fingerprint = _rows(6), partial(collate_paired, pad_token_id=0), "d" * 40
    stores = [ReferenceStore(tmp_path / "machine-0"), ReferenceStore(tmp_path / "machine-1")]
    results = run_processes(2, lambda processes: compute_and_store(
        stores[processes.rank], fingerprint, {}, rows, collate, _fake_logp_fn([]), 2, "cpu", "train", QUIET,
        processes=processes, write=processes.rank == 0))
    assert stores[0].load(fingerprint, 6) is not None
    assert not (tmp_path / "machine-1").exists()
    assert torch.equal(results[0].first, results[1].first)
