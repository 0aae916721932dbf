"""Rollouts as the training loop's batches: every metric logged, a resume in the middle of a rollout equal
bit for bit to the run that never stopped, bad steps skipped."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dpo.cli import main
from dpo.recipe import load_recipe
from dpo.train import train
from tests.helpers import write_recipe
from tests.online.conftest import online_recipe

TIMING = ("tokens_per_s", "rollout/tokens_per_s", "rollout/seconds")
PPO_KEYS = {"loss", "reward/proxy", "reward/gold", "reward/total", "kl/k1", "kl/k3", "entropy", "length", "ended",
            "policy/clip_fraction", "policy/approx_kl", "policy/loss", "value/loss", "value/explained_variance",
            "value/clip_fraction", "advantages/mean", "advantages/std", "kl_coef", "rollout/tokens_per_s",
            "tokens_per_s", "grad_norm", "lr", "bad_steps"}


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_ppo_logs_every_metric_and_its_budget(tiny, tmp_path):
    out = tmp_path / "ppo"
    main([str(online_recipe(tiny, out))])
    train_records = [r for r in records(out) if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4, 6]
    for record in train_records:
        assert PPO_KEYS <= set(record), PPO_KEYS - set(record)
        assert record["kl/k3"] >= 0 and 0 <= record["ended"] <= 1
    evals = [r for r in records(out) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6] and "loss" not in evals[0]
    assert evals[0]["kl/k1"] == 0.0  # the untrained policy is the reference: every log-ratio is exactly 0
    final = json.loads((out / "final_metrics.json").read_text())
    # 6 steps of 4 micro-batches a rollout (2 passes over 4 samples in pairs): rollouts 0 and 1, 4 samples each.
    assert final["budget"]["samples_generated"] == 8 and final["budget"]["rollouts"] == 2
    assert final["budget"]["wall_time_s"] > 0 and final["steps"] == 6
    # The policy at the top of adapter/, the value model beside it; the frozen reward adapter is not copied.
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "value" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter" / "reward").exists()


def test_a_ppo_run_stopped_mid_rollout_and_resumed_equals_the_uninterrupted_run_bit_for_bit(tiny, tmp_path,
                                                                                            monkeypatch):
    import os
    import signal

    from dpo.online.rollout import Rollouts

    whole = tmp_path / "whole"
    train(load_recipe(online_recipe(tiny, whole, train={"save_every": 100})), log=lambda _: None)

    # The same run, sent SIGTERM during step 3 (the middle of rollout 0, steps 1-4): it finishes the step,
    # checkpoints and stops; resumed, it must continue on the same samples.
    real, calls = Rollouts.loss, []

    def loss(self, step, batch, split):
        if split == "train":
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(self, step, batch, split)

    monkeypatch.setattr(Rollouts, "loss", loss)
    stopped = tmp_path / "stopped"
    recipe = online_recipe(tiny, stopped, train={"save_every": 100})
    with pytest.raises(SystemExit) as info:
        main([str(recipe)])
    assert info.value.code == 128 + signal.SIGTERM
    state = load_file(stopped / "checkpoints" / "step-000003" / "batches.safetensors")
    assert int(state["number"][0]) == 0 and state["rollout.input_ids"].shape[0] == 4
    monkeypatch.setattr(Rollouts, "loss", real)
    main([str(recipe), "--resume"])
    for name in ("adapter_model.safetensors", "value/adapter_model.safetensors"):
        expected, resumed = load_file(whole / "adapter" / name), load_file(stopped / "adapter" / name)
        assert expected.keys() == resumed.keys()
        for key in expected:
            assert torch.equal(expected[key], resumed[key]), (name, key)
    assert without_timing(records(stopped)) == without_timing(records(whole))


def test_rloo_skips_a_bad_step_and_goes_on(tiny, tmp_path, monkeypatch):
    from dpo.online.rollout import Rollouts

    real = Rollouts.loss
    calls = []

    def loss(self, step, batch, split):
        out = real(self, step, batch, split)
        if split == "train":
            calls.append(1)
            if len(calls) == 3:  # step 3's only micro-batch: a non-finite loss
                out.losses.data.fill_(float("nan"))
        return out

    monkeypatch.setattr(Rollouts, "loss", loss)
    out = tmp_path / "rloo"
    main([str(online_recipe(tiny, out, task="rloo", online={"ppo_epochs": 1},
                           train={"batch_size": 8, "max_steps": 4}))])
    train_records = [r for r in records(out) if r["split"] == "train"]
    assert train_records[-1]["bad_steps"] == 1 and train_records[-1]["step"] == 4
    assert "value/loss" not in train_records[-1] and "policy/clip_fraction" in train_records[-1]


def test_ppo_on_a_4bit_base_shares_it_with_a_reward_model_trained_on_it(tiny, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    quantization = {"bits": 4, "compute_dtype": "float32"}
    reward = write_recipe(tmp_path / "reward.yaml", {
        "task": "reward", "model": {"path": str(tiny["model"]), "quantization": quantization},
        "data": {"train": str(tiny["train"]), "eval": str(tiny["eval"]), "max_length": 32, "max_prompt_length": 24},
        "lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 2, "batch_size": 8, "lr": 0.01},
        "output": {"dir": str(tmp_path / "reward")},
    })
    main([str(reward)])
    out = tmp_path / "ppo"
    main([str(online_recipe(tiny, out, model={"quantization": quantization, "gradient_checkpointing": True},
                            online={"reward_model": str(tmp_path / "reward")}, train={"max_steps": 4}))])
    assert "as an adapter on the policy's base (one copy of the base)" in capsys.readouterr().out
    last = [r for r in records(out) if r["split"] == "train"][-1]
    assert last["step"] == 4 and last["bad_steps"] == 0 and math.isfinite(last["loss"])
