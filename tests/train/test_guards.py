"""Guards: the log-prob change values, the displacement and saturation warnings, and their wiring in a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dpo.train.guards as guards_module
from dpo.cli import main
from dpo.losses import PairedLogps, UnpairedLogps
from dpo.train.guards import (
    DISPLACEMENT_ACCURACY_RISE,
    DISPLACEMENT_NATS_PER_TOKEN,
    SATURATION_GRAD_FRACTION,
    SATURATION_LOGS,
    SATURATION_LOSS,
    Guards,
    logprob_metrics,
)
from tests.helpers import build_tiny_model, write_jsonl, write_recipe, yes_no_pairs


def test_logprob_metrics_hand_values_paired():
    # chosen: −6 over 3 tokens = −2 a token; from −3 at the start: −3 summed, −1 a token.
    # rejected: −8 over 4 tokens = −2 a token; from −10: +2 summed, +0.5 a token.
    policy = PairedLogps(torch.tensor([-6.0]), torch.tensor([-8.0]), torch.tensor([3]), torch.tensor([4]))
    start = PairedLogps(torch.tensor([-3.0]), torch.tensor([-10.0]), torch.tensor([3]), torch.tensor([4]))
    metrics = {k: v.tolist() for k, v in logprob_metrics(policy, start).items()}
    assert metrics == {"logps/chosen_per_token": [-2.0], "change/chosen": [-3.0], "change/chosen_per_token": [-1.0],
                       "logps/rejected_per_token": [-2.0], "change/rejected": [2.0],
                       "change/rejected_per_token": [0.5]}
    assert set(logprob_metrics(policy, None)) == {"logps/chosen_per_token", "logps/rejected_per_token"}


def test_logprob_metrics_split_unpaired_rows_by_kind():
    policy = UnpairedLogps(torch.tensor([-4.0, -9.0, -2.0]), torch.tensor([2, 3, 1]), torch.zeros(3),
                           torch.ones(3), torch.tensor([True, False, True]))
    start = UnpairedLogps(torch.tensor([-2.0, -3.0, -2.0]), torch.tensor([2, 3, 1]), torch.zeros(3),
                          torch.ones(3), torch.tensor([True, False, True]))
    metrics = {k: v.tolist() for k, v in logprob_metrics(policy, start).items()}
    assert metrics["change/desirable"] == [-2.0, 0.0] and metrics["change/desirable_per_token"] == [-1.0, 0.0]
    assert metrics["change/undesirable"] == [-6.0] and metrics["logps/undesirable_per_token"] == [-3.0]


def test_evaluations_get_their_change_since_the_before_training_evaluation():
    guards = Guards(True, lambda _: None, start={"logps/chosen": -10.0, "logps/chosen_per_token": -2.0, "loss": 0.7})
    metrics = guards.since_start({"logps/chosen": -12.5, "logps/chosen_per_token": -2.5, "loss": 0.3,
                                  "change/rejected": 1.0})
    assert metrics["change/chosen"] == -2.5 and metrics["change/chosen_per_token"] == -0.5
    assert metrics["change/rejected"] == 1.0 and "change/loss" not in metrics


def record(split: str, step: int, fall: float, accuracy: float, **extra) -> dict:
    return {"split": split, "step": step, "change/chosen_per_token": -fall, "change/chosen": -3 * fall,
            "rewards/accuracies": accuracy, **extra}


def test_displacement_is_said_once_when_the_chosen_side_falls_while_accuracy_rises():
    said: list[str] = []
    guards = Guards(True, said.append, start={"rewards/accuracies": 0.6})
    fall, rise = DISPLACEMENT_NATS_PER_TOKEN, DISPLACEMENT_ACCURACY_RISE
    guards.check(record("train", 10, fall * 0.9, 1.0))  # not fallen far enough
    guards.check(record("train", 20, fall * 3, 0.5 + rise * 0.5))  # accuracy has not risen enough
    guards.check(record("eval", 20, fall * 3, 0.6 + rise * 0.5))  # held out: measured from its own start, 0.6
    assert said == []
    guards.check(record("eval", 30, fall * 2, 0.6 + rise))
    guards.check(record("train", 40, fall * 4, 1.0))
    assert len(said) == 1 and guards.said == [said[0].removeprefix("warning: ").split(" (said once")[0]]
    message = said[0]
    assert message.startswith("warning: likelihood displacement at step 30: on the held-out pairs")
    assert f"fallen by {2 * fall:.2f} nats per token ({6 * fall:.1f} summed)" in message
    assert "rose from 0.60 to 0.70" in message
    for advice in ("train.lr", "loss.beta", "loss.nll_weight", "loss.name: dpop", "dpo-train pairs", "train.warn"):
        assert advice in message


def test_saturation_needs_several_quiet_logs_in_a_row_relative_to_the_peak_gradient():
    said: list[str] = []
    guards = Guards(True, said.append)
    quiet = {"loss": SATURATION_LOSS / 2}
    guards.check({"split": "train", "step": 1, "loss": 0.6, "grad_norm": 10.0})
    small = 10.0 * SATURATION_GRAD_FRACTION * 0.5
    for step in range(2, 2 + SATURATION_LOGS - 1):
        guards.check({"split": "train", "step": step, **quiet, "grad_norm": small})
    guards.check({"split": "train", "step": 50, **quiet, "grad_norm": 10.0 * SATURATION_GRAD_FRACTION * 2})  # resets
    guards.check({"split": "eval", "step": 50, "loss": 0.0})  # evaluations do not count
    for step in range(51, 51 + SATURATION_LOGS - 1):
        guards.check({"split": "train", "step": step, **quiet, "grad_norm": small})
    assert said == []
    guards.check({"split": "train", "step": 99, **quiet, "grad_norm": small})
    assert len(said) == 1 and said[0].startswith("warning: the loss has saturated")
    assert f"for the last {SATURATION_LOGS} logs (step 99" in said[0] and "loss.name: dpop" in said[0]
    guards.check({"split": "train", "step": 100, **quiet, "grad_norm": float("nan")})
    assert len(said) == 1


def test_switched_off_guards_say_nothing():
    said: list[str] = []
    guards = Guards(False, said.append)
    for step in range(10):
        guards.check({"split": "train", "step": step, "loss": 0.0, "grad_norm": 0.0, "change/chosen_per_token": -5.0,
                      "change/chosen": -20.0, "rewards/accuracies": 1.0})
    assert said == [] and guards.said == []


# ------------------------------------------------------------------------------------------ in a run


def guarded_recipe(tmp_path: Path, **sections) -> Path:
    model = build_tiny_model(tmp_path / "model")
    # Learnable in a few steps, and it carries to held-out prompts (accuracy rises quickly).
    train = write_jsonl(tmp_path / "data" / "train.jsonl", yes_no_pairs(48, 0, range(100, 500)))
    eval_ = write_jsonl(tmp_path / "data" / "eval.jsonl", yes_no_pairs(24, 1, range(500, 999)))
    tree = {
        "model": {"path": str(model)},
        "data": {"train": str(train), "eval": str(eval_), "max_length": 64, "max_prompt_length": 48},
        "lora": {"r": 8, "alpha": 16},
        "loss": {"name": "dpo", "beta": 0.5},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 0.01, "log_every": 2, "eval_every": 3, "seed": 3},
        "eval": {"samples": 0},
        "reference": {"batch_size": 16},
        "output": {"dir": str(tmp_path / "out")},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return write_recipe(tmp_path / "recipe.yaml", tree)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_the_change_since_the_start_and_says_a_warning_once(tmp_path, monkeypatch, capsys):
    # Any chosen log-prob counts as fallen here, so the warning's wiring shows whenever accuracy rises.
    monkeypatch.setattr(guards_module, "DISPLACEMENT_NATS_PER_TOKEN", -1e9)
    main([str(guarded_recipe(tmp_path))])
    out = tmp_path / "out"
    rows = records(out)
    change = {"change/chosen", "change/rejected", "change/chosen_per_token", "change/rejected_per_token"}
    for row in rows:
        assert change | {"logps/chosen_per_token", "logps/rejected_per_token"} <= set(row), row
    first_eval, last_eval = rows[0], rows[-1]
    assert first_eval["step"] == 0 and all(first_eval[k] == 0.0 for k in change)
    # Held out, the change since the start is the policy's log-prob minus the before-training one.
    assert last_eval["change/chosen"] == pytest.approx(last_eval["logps/chosen"] - first_eval["logps/chosen"], abs=1e-4)
    logged = capsys.readouterr().out
    assert logged.count("warning: likelihood displacement") == 1
    final = json.loads((out / "final_metrics.json").read_text())
    assert len(final["warnings"]) == 1 and final["warnings"][0].startswith("likelihood displacement at step")


def test_train_warn_false_silences_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(guards_module, "DISPLACEMENT_NATS_PER_TOKEN", -1e9)
    main([str(guarded_recipe(tmp_path, train={"warn": False}))])
    assert "likelihood displacement" not in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "final_metrics.json").read_text())["warnings"] == []


def test_without_a_starting_reference_only_evaluations_carry_the_change(tmp_path):
    main([str(guarded_recipe(tmp_path, loss={"name": "simpo", "beta": 2.0}, train={"max_steps": 2}))])
    rows = records(tmp_path / "out")
    train_rows, eval_rows = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "eval"]
    assert train_rows and not any("change/chosen" in r for r in train_rows)
    assert all("logps/chosen_per_token" in r for r in train_rows)
    assert eval_rows[0]["change/chosen"] == 0.0
    assert eval_rows[-1]["change/chosen_per_token"] == pytest.approx(
        eval_rows[-1]["logps/chosen_per_token"] - eval_rows[0]["logps/chosen_per_token"], abs=1e-6)
