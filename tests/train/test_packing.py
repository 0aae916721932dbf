"""Training with packed, prefix-shared batches: the same loss curve as padded batches, the untrained policy
still equal to the reference, and a model that cannot take them trains on padded batches and says so."""

from __future__ import annotations

import json

import pytest

from dpo.cli import main
from tests.helpers import build_tiny_model, write_pairs, write_recipe
from tests.model.test_packing import remote_code_model


def run(tmp_path, name: str, model, loss: str, packing: str, capsys, **model_extra) -> tuple[list[dict], str]:
    train, eval_ = write_pairs(tmp_path / "data", train=48, eval=24)
    out = tmp_path / name
    recipe = write_recipe(tmp_path / f"{name}.yaml", {
        "model": {"path": str(model), **model_extra},
        "data": {"train": str(train), "eval": str(eval_), "max_length": 64, "max_prompt_length": 48},
        "lora": {"r": 8, "alpha": 16},
        "loss": {"name": loss, "beta": 0.5},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 0.003, "log_every": 1, "seed": 3, "packing": packing},
        "reference": {"batch_size": 16, "cache_dir": str(tmp_path / f"cache-{name}")},
        "output": {"dir": str(out)},
    })
    capsys.readouterr()
    main([str(recipe)])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_packing_on_and_off_give_the_same_loss_curve(tmp_path, capsys, loss):
    model = build_tiny_model(tmp_path / "model", "gemma2")  # sliding-window layers, softcaps, tied head
    padded, padded_log = run(tmp_path, "off", model, loss, "off", capsys)
    packed, packed_log = run(tmp_path, "on", model, loss, "on", capsys)
    assert "packing: on for the policy" in packed_log and "packing:" not in padded_log
    curve = {split: [r for r in padded if r["split"] == split] for split in ("train", "eval")}
    ours = {split: [r for r in packed if r["split"] == split] for split in ("train", "eval")}
    assert [r["step"] for r in ours["train"]] == [r["step"] for r in curve["train"]] == [1, 2, 3, 4, 5, 6]
    keys = ("loss", "rewards/margins", "logps/chosen") if loss == "dpo" else ("loss", "kl", "logps/desirable")
    for key in (*keys, "grad_norm"):
        assert [r[key] for r in ours["train"]] == pytest.approx([r[key] for r in curve["train"]], rel=1e-4, abs=1e-5)
    for records in (curve, ours):  # the untrained policy equals its reference exactly, in both layouts
        before = records["eval"][0]
        rewards = {k: v for k, v in before.items() if k.startswith("rewards/") and k != "rewards/accuracies"}
        assert before["step"] == 0 and rewards and set(rewards.values()) == {0.0}
        if loss == "dpo":
            assert before["rewards/accuracies"] == 0.5
    assert ours["eval"][-1]["loss"] == pytest.approx(curve["eval"][-1]["loss"], rel=1e-4)


def test_a_model_that_cannot_take_packed_batches_trains_on_padded_ones_and_says_so(tmp_path, capsys):
    model = remote_code_model(tmp_path)
    records, log = run(tmp_path, "auto", model, "dpo", "auto", capsys, trust_remote_code=True)
    lines = [line for line in log.splitlines() if line.startswith("packing:")]
    assert len(lines) == 1 and "packing: off for the policy (padded batches)" in lines[0]
    assert "trust_remote_code" in lines[0]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert next(r for r in records if r["split"] == "eval")["rewards/accuracies"] == 0.5
