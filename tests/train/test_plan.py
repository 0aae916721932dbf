"""The step plan: hand-counted for the quickstart, and the one --dry-run prints is what the run does."""

from __future__ import annotations

import json

import pytest

from dpo.cli import main
from dpo.data import DataError
from dpo.recipe import TrainConfig, load_recipe
from dpo.train.plan import format_plan, plan_steps
from tests.train.test_loop import read_jsonl, tiny_recipe


def test_quickstart_plan_by_hand():
    # 2000 pairs in micro-batches of 16: 125 a epoch (the last of 0 left over: 2000 = 125 * 16), 4 epochs.
    recipe = load_recipe("recipes/quickstart.yaml")
    plan = plan_steps(2000, recipe.train, drop_last=False)
    assert (plan.micro_batches, plan.steps_per_epoch, plan.total_steps, plan.epochs) == (125, 125, 500, 4)
    assert plan.warmup_steps == 25  # warmup_ratio 0.05 of 500
    assert plan.examples_per_step == 16
    assert plan.eval_steps == [0, 250, 500] and plan.save_steps == [200, 400, 500]
    assert plan.log_steps == list(range(25, 501, 25))
    text = format_plan(plan, recipe.train)
    assert "optimizer steps: 500 (125 per epoch; train.epochs=4)" in text
    assert "epochs: 4 over 2000 training pairs" in text and "pairs per step: 16" in text
    assert "warmup steps: 25" in text and "evaluations: after steps 0, 250, 500 (3 in all)" in text
    assert "checkpoints: after steps 200, 400, 500 (3 in all), keeping the last 2" in text


def test_accumulation_processes_and_short_batches():
    train = TrainConfig(batch_size=4, grad_accum=2, epochs=3, warmup_steps=1, save_every=4, log_every=1)
    # KTO drops the short batch: 18 rows make 4 micro-batches of 4, so 2 steps an epoch.
    plan = plan_steps(18, train, drop_last=True)
    assert (plan.micro_batches, plan.steps_per_epoch, plan.total_steps, plan.warmup_steps) == (4, 2, 6, 1)
    assert plan.save_steps == [4, 6] and plan.examples_per_step == 8
    # Two processes: 5 micro-batches of 4 (20 rows), one left out, each process 2 micro-batches = 1 step.
    plan = plan_steps(20, train, drop_last=False, world=2)
    assert (plan.left_out, plan.steps_per_epoch, plan.examples_per_step) == (1, 1, 16)
    with pytest.raises(DataError, match="fewer than train.batch_size"):
        plan_steps(3, train, drop_last=True)
    with pytest.raises(DataError, match="fewer than the 2 processes"):
        plan_steps(4, train, drop_last=False, world=2)
    capped = plan_steps(400, TrainConfig(batch_size=4, max_steps=30, warmup_ratio=0.1), drop_last=False)
    assert capped.total_steps == 30 and capped.epochs == pytest.approx(0.3) and capped.warmup_steps == 3


def test_the_dry_run_prints_the_plan_the_run_follows(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, train={"max_steps": None, "epochs": 2, "eval_every": 3, "save_every": 4})
    main([str(recipe), "--dry-run"])
    printed = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    # 48 pairs in micro-batches of 8: 6 steps an epoch, 12 in all
    assert "optimizer steps: 12 (6 per epoch; train.epochs=2)" in printed
    assert "epochs: 2 over 48 training pairs" in printed and "pairs per step: 8" in printed
    assert "warmup steps: 1" in printed  # warmup_ratio 0.1 of 12
    assert "evaluations: after steps 0, 3, 6, 9, 12 (5 in all)" in printed
    assert "checkpoints: after steps 4, 8, 12 (3 in all)" in printed
    main([str(recipe)])
    out = tmp_path / "out"
    assert json.loads((out / "final_metrics.json").read_text())["steps"] == 12
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["split"] == "eval"] == [0, 3, 6, 9, 12]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000008", "step-000012"]
