"""Data parallelism: round-robin shards, merged metric windows, and two CPU processes (gloo) training
exactly as one process accumulating the same micro-batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dpo.cli import main
from dpo.train.parallel import merge_sums, shard
from tests.train.test_loop import read_jsonl, tiny_recipe
from tests.train.test_loop_faults import comparable_metrics

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ shards


def test_shard_takes_every_world_th_item_from_its_rank():
    items = list(range(10))
    assert shard(items, 0, 3, whole_rounds=False) == [0, 3, 6, 9]
    assert shard(items, 1, 3, whole_rounds=False) == [1, 4, 7]
    assert shard(items, 2, 3, whole_rounds=False) == [2, 5, 8]


def test_shards_cover_every_item_once_for_evaluation():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            shards = [shard(list(range(n)), r, world, whole_rounds=False) for r in range(world)]
            assert sorted(x for s in shards for x in s) == list(range(n))


def test_training_shards_are_whole_rounds_of_equal_length():
    for n in range(0, 12):
        for world in (1, 2, 3, 5):
            shards = [shard(list(range(n)), r, world, whole_rounds=True) for r in range(world)]
            assert len({len(s) for s in shards}) == 1
            assert len(shards[0]) == n // world
            taken = sorted(x for s in shards for x in s)
            assert taken == list(range(n // world * world))  # only the last incomplete round is left out


def test_one_process_keeps_everything():
    assert shard([4, 5, 6], 0, 1, whole_rounds=True) == [4, 5, 6]


def test_merge_sums_adds_sums_and_counts_key_by_key():
    sums, counts = merge_sums([({"loss": 1.5, "acc": 2.0}, {"loss": 3, "acc": 4}),
                               ({"loss": 0.5}, {"loss": 1}),
                               ({}, {})])
    assert sums == {"loss": 2.0, "acc": 2.0}
    assert counts == {"loss": 4, "acc": 4}


# -------------------------------------------------------------------------------- two processes


def launch_two_processes(recipe: Path, *extra: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m dpo.cli RECIPE`` on the CPU (accelerate picks gloo)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dpo.cli", str(recipe), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def adapter_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))


def as_reward_recipe(path: Path) -> Path:
    """The same run as a Bradley–Terry reward model (task: reward, no loss section)."""
    tree = yaml.safe_load(path.read_text())
    tree.pop("loss")
    tree["task"] = "reward"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("task", ["preference", "reward"])
def test_two_processes_train_as_one_process_accumulating_their_micro_batches(tmp_path, task):
    """Two processes of batch_size 8 = one process of batch_size 8 with grad_accum 2: process r takes
    micro-batches r, r+2, ... of the same epoch order, and the averaged gradient is the accumulated one
    (for a reward model too, whose score head is trained in full)."""
    train = {"max_steps": 4, "log_every": 2, "eval_every": 2}
    single = tiny_recipe(tmp_path / "single", lora={"dropout": 0.0}, train={**train, "grad_accum": 2})
    parallel = tiny_recipe(tmp_path / "parallel", lora={"dropout": 0.0}, train=train)
    if task == "reward":
        single, parallel = as_reward_recipe(single), as_reward_recipe(parallel)

    main([str(single)])
    result = launch_two_processes(parallel)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    one, two = tmp_path / "single" / "out", tmp_path / "parallel" / "out"
    expected, actual = adapter_weights(one), adapter_weights(two)
    assert expected.keys() == actual.keys()
    assert max(float(v.abs().max()) for k, v in actual.items() if "lora_B" in k) > 0  # lora_B starts at zero
    assert task == "preference" or any("score" in k for k in actual)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)

    # One record per step and split, written by the main process alone, with the same values: the
    # train windows merge both processes' micro-batches, the eval is split between them and merged.
    records_one, records_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records_two] == [(r["split"], r["step"]) for r in records_one]
    assert [(r["split"], r["step"]) for r in records_two] == [
        ("eval", 0), ("train", 2), ("eval", 2), ("train", 4), ("eval", 4)]
    for a, b in zip(records_one, records_two, strict=True):
        for key in ("loss", "rewards/accuracies", "rewards/margins"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (b["split"], b["step"], key)
    if task == "preference":
        assert records_two[0]["rewards/accuracies"] == 0.5  # untrained policy reproduces the reference exactly
    run = json.loads((two / "checkpoints" / "step-000004" / "run.json").read_text())
    assert run["num_processes"] == 2
    rng = json.loads((two / "checkpoints" / "step-000004" / "rng.json").read_text())
    assert len(rng["processes"]) == 2
    assert result.stdout.count("adapter saved to") == 1  # the other process says nothing


@pytest.mark.slow
def test_two_processes_resume_bit_for_bit_with_each_process_dropout_stream(tmp_path):
    """Resuming a two-process run from its step-2 checkpoint gives the uninterrupted run's adapter and
    metrics exactly: each process gets its own generator state back, and the main one the merged window."""
    recipe = tiny_recipe(tmp_path, lora={"dropout": 0.1},
                         train={"max_steps": 4, "log_every": 3, "eval_every": 2, "save_every": 2})
    first = launch_two_processes(recipe)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "out"
    uninterrupted = {"adapter": adapter_weights(out), "metrics": comparable_metrics(out)}
    assert [(r["split"], r["step"]) for r in uninterrupted["metrics"]] == [
        ("eval", 0), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]

    resumed = launch_two_processes(recipe, "--resume", str(out / "checkpoints" / "step-000002"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    adapter = adapter_weights(out)
    for key, value in uninterrupted["adapter"].items():
        assert torch.equal(adapter[key], value), key
    # The train record of step 3 averages micro-batches from before and after the checkpoint.
    assert comparable_metrics(out) == uninterrupted["metrics"]
