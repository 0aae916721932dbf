"""metrics.jsonl and TensorBoard scalars: the same records, a resumed run's repeated steps replaced."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dpo.cli import main
from dpo.train.metric_log import MetricLog
from tests.train.test_loop import read_jsonl, tiny_recipe

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def scalars(out_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_records_go_to_jsonl_and_every_numeric_value_to_a_scalar(tmp_path):
    records = [{"split": "eval", "step": 0, "loss": 0.75, "rewards/accuracies": 0.5},
               {"split": "train", "step": 2, "epoch": 1, "loss": 0.5, "lr": 1e-3, "bad_steps": 0},
               {"split": "train", "step": 4, "epoch": 1, "loss": float("nan"), "lr": 5e-4, "bad_steps": 1}]
    with MetricLog(tmp_path, tensorboard=True) as log:
        for record in records:
            log.write(record)
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert lines[:2] == records[:2] and math.isnan(lines[2]["loss"])
    found = scalars(tmp_path)
    assert set(found) == {"eval/loss", "eval/rewards/accuracies", "train/loss", "train/lr", "train/bad_steps"}
    assert found["eval/rewards/accuracies"] == [(0, 0.5)]
    assert found["train/lr"] == [(2, pytest.approx(1e-3)), (4, pytest.approx(5e-4))]
    assert found["train/loss"][0] == (2, 0.5) and math.isnan(found["train/loss"][1][1])


def test_a_resumed_log_replaces_the_steps_after_its_checkpoint(tmp_path):
    with MetricLog(tmp_path, tensorboard=True) as log:
        for step in (1, 2, 3, 4):
            log.write({"split": "train", "step": step, "loss": float(step)})
    with MetricLog(tmp_path, tensorboard=True, resumed_step=2) as log:
        for step in (3, 4):
            log.write({"split": "train", "step": step, "loss": 10.0 * step})
    assert scalars(tmp_path)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_a_disabled_log_writes_nothing(tmp_path):
    with MetricLog(tmp_path, tensorboard=True, enabled=False) as log:
        log.write({"split": "train", "step": 1, "loss": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_without_tensorboard_only_jsonl_is_written(tmp_path):
    with MetricLog(tmp_path) as log:
        log.write({"split": "train", "step": 1, "loss": 1.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_run_with_tensorboard_writes_the_metrics_jsonl_records_as_scalars(tmp_path):
    recipe = tiny_recipe(tmp_path, output={"tensorboard": True})
    main([str(recipe)])
    out = tmp_path / "out"
    found = scalars(out)
    for record in read_jsonl(out / "metrics.jsonl"):
        tag = f"{record['split']}/loss"
        assert (record["step"], pytest.approx(record["loss"])) in found[tag]
    assert [step for step, _ in found["train/loss"]] == [2, 4]
    assert [step for step, _ in found["eval/rewards/accuracies"]] == [0, 4]


def test_tensorboard_without_the_package_is_an_error_naming_the_key(tmp_path, monkeypatch, capsys):
    import dpo.train.metric_log

    monkeypatch.setattr(dpo.train.metric_log, "tensorboard_available", lambda: False)
    recipe = tiny_recipe(tmp_path, output={"tensorboard": True})
    with pytest.raises(SystemExit) as info:
        main([str(recipe)])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "output.tensorboard" in err and "pip install 'dpo-train[tensorboard]'" in err
    assert not (tmp_path / "out").exists()  # refused before anything was written

