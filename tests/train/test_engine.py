"""Training under each engine with two CPU processes (gloo): DDP, FSDP2 (also over a 4-bit base), DeepSpeed
ZeRO-2, and two machines simulated on this one. Every run is compared with one process accumulating the same
micro-batches (``grad_accum: 2``), which computes the same updates: process r of 2 takes micro-batches
r, r+2, ... of the same epoch order, and the engine averages their gradients once per step.

The processes are started by torchrun with the environment ``accelerate launch --config_file
recipes/accelerate/NAME.yaml`` gives them (accelerate's own launcher code), so the example configs are the ones
tested.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dpo.cli import main
from dpo.recipe import load_recipe
from dpo.train.engine import EngineError, check_engine, configure_deepspeed
from tests.helpers import free_port, qlora_recipe, torchrun
from tests.train.test_loop import read_jsonl, tiny_recipe
from tests.train.test_loop_faults import comparable_metrics

TRAIN = {"max_steps": 4, "log_every": 2, "eval_every": 2}


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def edit_recipe(path: Path, **sections) -> Path:
    tree = yaml.safe_load(path.read_text())
    for key, value in sections.items():
        if value is None:
            tree.pop(key, None)
        elif isinstance(value, dict):
            tree[key] = {**tree.get(key, {}), **value}
        else:
            tree[key] = value
    path.write_text(yaml.safe_dump(tree))
    return path


def one_and_two(tmp_path: Path, task: str = "dpo", **train) -> tuple[Path, Path]:
    """The same run for one process accumulating 2 micro-batches and for two processes, each with its own
    reference cache; ``task`` is dpo, kto or reward."""
    recipes = []
    for name, accumulate in (("one", 2), ("two", 1)):
        path = tiny_recipe(tmp_path / name, lora={"dropout": 0.0}, train={**TRAIN, **train, "grad_accum": accumulate},
                           reference={"cache_dir": str(tmp_path / name / "cache")})
        if task == "kto":
            edit_recipe(path, loss={"name": "kto"}, train={"lr": 0.001})
        if task == "reward":
            edit_recipe(path, loss=None, task="reward")
        recipes.append(path)
    return recipes[0], recipes[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The DPO run every engine's two processes are compared with: one process, ``grad_accum: 2``, a checkpoint
    every 2 steps (its folder: ``out/``, ``cache/``). Run once for the module; the two-process recipes are made
    beside it with :func:`two_processes`."""
    root = tmp_path_factory.mktemp("one-process")
    one, _ = one_and_two(root, save_every=2)
    main([str(one)])
    return one.parent


def two_processes(tmp_path: Path, one: Path, **sections) -> Path:
    """``one``'s recipe for two processes (``grad_accum: 1``) in ``tmp_path``, with its own output and cache."""
    tree = yaml.safe_load((one / "recipe.yaml").read_text())
    tree["train"]["grad_accum"] = 1
    tree["output"]["dir"] = str(tmp_path / "out")
    tree["reference"]["cache_dir"] = str(tmp_path / "cache")
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def assert_ran(result, engine: str) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert f"engine: {engine}" in result.stdout
    assert result.stdout.count("adapter saved to") == 1  # the other process says nothing


def assert_same_adapter(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert actual.keys() == expected.keys()
    assert max(float(v.abs().max()) for k, v in actual.items() if "lora_B" in k) > 0  # lora_B starts at zero
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=atol, msg=key)


def assert_same_records(actual: list[dict], expected: list[dict], rel: float = 1e-4, abs_: float = 1e-5) -> None:
    """One record per step and split, the same values: train windows merge both processes' micro-batches, the
    evaluation is split between them and merged."""
    assert [(r["split"], r["step"]) for r in actual] == [(r["split"], r["step"]) for r in expected]
    for a, b in zip(actual, expected, strict=True):
        assert a.keys() == b.keys()
        for key, value in b.items():
            if key != "tokens_per_s" and isinstance(value, float):
                assert a[key] == pytest.approx(value, rel=rel, abs=abs_), (a["split"], a["step"], key)


def cache_values(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {path.name: load_file(str(path)) for path in sorted(folder.glob("*.safetensors"))
            if ".partial." not in path.name}


def assert_same_cache(actual: Path, expected: Path) -> None:
    """The reference values computed by two processes are the one process's, exactly."""
    a, b = cache_values(actual), cache_values(expected)
    assert a.keys() == b.keys() and len(a) == 2  # train and eval
    for name in a:
        for key in b[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)


# ------------------------------------------------------------------------------------------------ DDP


def test_ddp_trains_as_one_process_and_resumes_bit_for_bit_or_under_another_count_with_force(tmp_path, one_process,
                                                                                           capsys):
    recipe = two_processes(tmp_path, one_process)
    first = torchrun([str(recipe)], config="ddp")
    assert_ran(first, "DDP, 2 processes on 1 machine")
    out = tmp_path / "out"
    assert_same_adapter(adapter_weights(out / "adapter"), adapter_weights(one_process / "out" / "adapter"))
    records = read_jsonl(out / "metrics.jsonl")
    assert_same_records(records, read_jsonl(one_process / "out" / "metrics.jsonl"))
    assert [(r["split"], r["step"]) for r in records] == [
        ("eval", 0), ("train", 2), ("eval", 2), ("train", 4), ("eval", 4)]
    assert records[0]["rewards/accuracies"] == 0.5  # untrained policy reproduces the reference exactly
    assert_same_cache(tmp_path / "cache", one_process / "cache")  # the shared precompute: one process's values
    final = out / "checkpoints" / "step-000004"
    run = json.loads((final / "run.json").read_text())
    assert run["num_processes"] == 2 and run["engine"] == "ddp"
    assert len(json.loads((final / "rng.json").read_text())["processes"]) == 2

    # Resumed from step 2: the uninterrupted run's adapter and metrics, exactly.
    uninterrupted = {"adapter": adapter_weights(out / "adapter"), "metrics": comparable_metrics(out)}
    checkpoint = out / "checkpoints" / "step-000002"
    resumed = torchrun([str(recipe), "--resume", str(checkpoint)], config="ddp")
    assert_ran(resumed, "DDP")
    assert "resumed from" in resumed.stdout
    adapter = adapter_weights(out / "adapter")
    for key, value in uninterrupted["adapter"].items():
        assert torch.equal(adapter[key], value), key
    assert comparable_metrics(out) == uninterrupted["metrics"]

    # One process: the result would differ, so refused; --force resumes with a warning.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([str(recipe), "--resume", str(checkpoint)])
    assert "number of processes: 2 in the checkpoint, 1 now" in capsys.readouterr().err
    main([str(recipe), "--resume", str(checkpoint), "--force"])
    output = capsys.readouterr().out
    assert "warning: --force" in output and "engine: ddp in the checkpoint, single now" in output
    assert json.loads((out / "final_metrics.json").read_text())["steps"] == 4


def test_the_cache_command_shares_the_precompute_between_processes(tmp_path, one_process):
    """``torchrun ... -m dpo.cli cache RECIPE``: each process runs the whole model on its share of the batches;
    the file holds exactly one process's values, and the main process alone names it."""
    result = torchrun(["cache", str(two_processes(tmp_path, one_process))])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "over 2 processes" in result.stdout and result.stdout.count("reference cache (train):") == 1
    assert_same_cache(tmp_path / "cache", one_process / "cache")


@pytest.mark.parametrize("task", ["kto", "reward"])
def test_ddp_trains_kto_and_a_reward_model_as_one_process(tmp_path, task):
    one, two = one_and_two(tmp_path, task)
    main([str(one)])
    result = torchrun([str(two)], config="ddp")
    assert_ran(result, "DDP, 2 processes on 1 machine")
    out_one, out_two = one.parent / "out", two.parent / "out"
    assert_same_adapter(adapter_weights(out_two / "adapter"), adapter_weights(out_one / "adapter"))
    assert_same_records(read_jsonl(out_two / "metrics.jsonl"), read_jsonl(out_one / "metrics.jsonl"))
    if task == "reward":
        assert any("score" in key for key in adapter_weights(out_two / "adapter"))  # the head, trained in full
    else:
        assert_same_cache(two.parent / "cache", one.parent / "cache")


# ---------------------------------------------------------------------------------------------- FSDP2


def test_fsdp2_trains_as_one_process_saves_full_tensors_and_resumes(tmp_path, one_process):
    from peft import PeftModel

    from dpo.model import load_base_model

    recipe = two_processes(tmp_path, one_process)
    first = torchrun([str(recipe)], config="fsdp2")
    assert_ran(first, "FSDP2 (fully_shard), 2 processes on 1 machine")
    out = tmp_path / "out"
    adapter = adapter_weights(out / "adapter")
    assert_same_adapter(adapter, adapter_weights(one_process / "out" / "adapter"))
    assert_same_records(read_jsonl(out / "metrics.jsonl"), read_jsonl(one_process / "out" / "metrics.jsonl"))
    assert_same_cache(tmp_path / "cache", one_process / "cache")

    # The checkpoints hold full tensors in the one-process format: the same files, the same values.
    for step in ("step-000002", "step-000004"):
        sharded, whole = out / "checkpoints" / step, one_process / "out" / "checkpoints" / step
        assert_same_adapter(adapter_weights(sharded / "adapter"), adapter_weights(whole / "adapter"))
        optimizer_two, optimizer_one = load_file(sharded / "optimizer.safetensors"), load_file(whole / "optimizer.safetensors")
        assert optimizer_two.keys() == optimizer_one.keys()
        for key in optimizer_one:
            torch.testing.assert_close(optimizer_two[key], optimizer_one[key], rtol=1e-4, atol=1e-7, msg=key)

    # The saved adapter loads with peft in one process.
    reloaded = PeftModel.from_pretrained(load_base_model(load_recipe(recipe).model), out / "adapter")
    trained = {name: p for name, p in reloaded.named_parameters() if "lora_" in name}
    assert len(trained) == len(adapter)
    assert any(float(p.abs().max()) > 0 for name, p in trained.items() if "lora_B" in name)

    # Resumed from step 2 under FSDP2: the uninterrupted run, within float32 rounding.
    uninterrupted = read_jsonl(out / "metrics.jsonl")
    resumed = torchrun([str(recipe), "--resume", str(out / "checkpoints" / "step-000002")], config="fsdp2")
    assert_ran(resumed, "FSDP2")
    assert_same_adapter(adapter_weights(out / "adapter"), adapter, atol=1e-6)
    assert_same_records(read_jsonl(out / "metrics.jsonl"), uninterrupted, rel=1e-5, abs_=1e-6)


@pytest.mark.slow
def test_fsdp2_shards_a_4bit_base_and_trains_as_one_process(tmp_path):
    """FSDP-QLoRA: the 4-bit codes are stored in float32 tensors, flat-sharded like every other weight."""
    pytest.importorskip("bitsandbytes")
    recipes = []
    for name, accumulate in (("one", 2), ("two", 1)):
        path = qlora_recipe(tmp_path / name, optimizer="adamw", max_steps=2, log_every=2, grad_accum=accumulate)
        recipes.append(edit_recipe(path, reference={"cache_dir": str(tmp_path / name / "cache")}))
    main([str(recipes[0])])
    result = torchrun([str(recipes[1])], config="fsdp2-qlora")
    assert_ran(result, "FSDP2")
    assert_same_adapter(adapter_weights(tmp_path / "two" / "out" / "adapter"),
                        adapter_weights(tmp_path / "one" / "out" / "adapter"))
    assert_same_records(read_jsonl(tmp_path / "two" / "out" / "metrics.jsonl"),
                        read_jsonl(tmp_path / "one" / "out" / "metrics.jsonl"))


# ----------------------------------------------------------------------------------- several machines


def test_two_machines_without_a_shared_disk_each_fill_their_own_caches(tmp_path, one_process):
    """``torchrun --nnodes 2`` twice on this machine, each "machine" with its own cache folders: the processes
    of each tokenize into and write the reference cache of their own machine, and the run is the one-process
    run."""
    recipe = two_processes(tmp_path, one_process, reference={"cache_dir": None})  # each machine's default cache
    port = free_port()
    homes = [tmp_path / f"machine-{rank}" for rank in (0, 1)]
    nodes = [torchrun([str(recipe)], processes=1, nodes=(rank, 2), port=port, env={"XDG_CACHE_HOME": str(homes[rank])},
                      background=True) for rank in (0, 1)]
    results = []
    for node in nodes:
        stdout, stderr = node.communicate(timeout=600)
        results.append((node.returncode, stdout, stderr))
    for code, stdout, stderr in results:
        assert code == 0, stdout[-3000:] + stderr[-5000:]
    assert "engine: DDP, 2 processes on 2 machines" in results[0][1]
    for home in homes:
        assert_same_cache(home / "dpo-train" / "reference", one_process / "cache")
        assert any((home / "dpo-train").glob("tokenized*/*")), sorted(home.rglob("*"))[:10]
    out = tmp_path / "out"
    assert_same_adapter(adapter_weights(out / "adapter"), adapter_weights(one_process / "out" / "adapter"))
    assert_same_records(read_jsonl(out / "metrics.jsonl"), read_jsonl(one_process / "out" / "metrics.jsonl"))


# ------------------------------------------------------------------------------------------ DeepSpeed


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed-zero2", "deepspeed-zero3"])
def test_deepspeed_trains_as_one_process_and_saves_full_tensors(tmp_path, one_process, config):
    """ZeRO-2 splits the optimizer state and gradients; ZeRO-3 also the weights, and gathers the LM head for the
    step (an external parameter of the step module). Both save what one process saves; ZeRO-2 resumes from it."""
    pytest.importorskip("deepspeed")
    if config == "deepspeed-zero3":
        # ZeRO-3 partitions the weights as they load, so packing cannot be probed and falls back to padded
        # batches: the one process to compare with runs padded too (the same numbers up to rounding, but an
        # accuracy can flip on a margin that rounding moves across zero).
        (tmp_path / "one-padded").mkdir()
        main([str(two_processes(tmp_path / "one-padded", one_process, train={"packing": "off", "grad_accum": 2}))])
        one_process = tmp_path / "one-padded"
    recipe = two_processes(tmp_path, one_process, train={"packing": "auto"})
    result = torchrun([str(recipe)], config=config)
    assert_ran(result, f"DeepSpeed ZeRO-{config[-1]}, 2 processes on 1 machine")
    if config == "deepspeed-zero3":
        assert "packing: off for the policy (padded batches): the weights are partitioned" in result.stdout
    out = tmp_path / "out"
    assert_same_adapter(adapter_weights(out / "adapter"), adapter_weights(one_process / "out" / "adapter"))
    assert_same_records(read_jsonl(out / "metrics.jsonl"), read_jsonl(one_process / "out" / "metrics.jsonl"))
    sharded, whole = out / "checkpoints" / "step-000004", one_process / "out" / "checkpoints" / "step-000004"
    optimizer_two, optimizer_one = load_file(sharded / "optimizer.safetensors"), load_file(whole / "optimizer.safetensors")
    assert optimizer_two.keys() == optimizer_one.keys()
    for key in optimizer_one:
        torch.testing.assert_close(optimizer_two[key], optimizer_one[key], rtol=1e-4, atol=1e-7, msg=key)
    if config == "deepspeed-zero2":  # the full tensors go back into DeepSpeed's partitions: the same run
        uninterrupted = {"adapter": adapter_weights(out / "adapter"), "metrics": comparable_metrics(out)}
        resumed = torchrun([str(recipe), "--resume", str(out / "checkpoints" / "step-000002")], config=config)
        assert_ran(resumed, "DeepSpeed ZeRO-2")
        assert_same_adapter(adapter_weights(out / "adapter"), uninterrupted["adapter"], atol=1e-7)
        assert comparable_metrics(out) == uninterrupted["metrics"]


# ----------------------------------------------------------------------------------- what is refused


def test_what_an_engine_cannot_do_is_refused_naming_the_setting(tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path), ["train.optimizer=adamw_8bit"])
    for kind in ("single", "ddp"):
        check_engine(kind, recipe)
    for kind in ("fsdp2", "deepspeed-zero2", "deepspeed-zero3"):
        with pytest.raises(EngineError, match="train.optimizer: adamw_8bit .* use adamw"):
            check_engine(kind, recipe)
    with pytest.raises(EngineError, match="fsdp_version: 2"):
        check_engine("fsdp1", load_recipe(tiny_recipe(tmp_path / "b")))


def test_the_deepspeed_config_is_filled_from_the_recipe(tmp_path):
    recipe = load_recipe(tiny_recipe(tmp_path), ["train.grad_accum=3", "train.max_grad_norm=null"])
    config = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
    configure_deepspeed(config, recipe, processes=4)
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_accumulation_steps"] == 3
    assert config["train_batch_size"] == 8 * 3 * 4
    assert config["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    with pytest.raises(EngineError, match="'optimizer' section"):
        configure_deepspeed({"optimizer": {"type": "AdamW"}}, recipe, processes=2)
