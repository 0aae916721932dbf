"""Experiment trackers (output.report_to) through accelerate, offline: every metrics.jsonl record reaches each."""

from __future__ import annotations

import json

import pytest

from dpo.cli import main
from dpo.train.metric_log import MetricLog
from tests.train.test_loop import read_jsonl, tiny_recipe

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def mlflow_metrics(out) -> dict[str, list[tuple[int, float]]]:
    """``{"train/loss": [(step, value), ...]}`` from MLflow's file store under ``out/mlflow``."""
    runs = [p for p in (out / "mlflow").glob("*/*") if (p / "metrics").is_dir()]
    assert len(runs) == 1
    found = {}
    for path in (runs[0] / "metrics").rglob("*"):
        if path.is_file():
            rows = [line.split() for line in path.read_text().splitlines()]
            found[path.relative_to(runs[0] / "metrics").as_posix()] = [(int(r[2]), float(r[1])) for r in rows]
    return found


def test_a_run_reports_every_record_to_tensorboard_wandb_and_mlflow_offline(tmp_path, monkeypatch):
    from tests.train.test_metric_log import scalars

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = tiny_recipe(tmp_path, output={"report_to": ["tensorboard", "wandb", "mlflow"], "project": "tests"})
    main([str(recipe)])
    out = tmp_path / "out"
    records = read_jsonl(out / "metrics.jsonl")
    events, logged = scalars(out), mlflow_metrics(out)
    for record in records:
        for key in ("loss", "rewards/accuracies"):
            tag = f"{record['split']}/{key}"
            assert (record["step"], pytest.approx(record[key])) in events[tag]
            assert (record["step"], pytest.approx(record[key])) in logged[tag]
    assert [step for step, _ in logged["train/grad_norm"]] == [2, 4]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # offline: nothing left the machine
    data = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert b"train/loss" in data and b"eval/rewards/accuracies" in data
    marker = json.loads((out / ".dpo-train").read_text())["written"]
    assert {"wandb", "mlflow"} <= set(marker["scratch"])
    # --overwrite removes the trackers' folders whole, with the rest of the run
    main([str(recipe), "--overwrite"])
    assert not runs[0].exists() and len(list((out / "wandb").glob("offline-run-*"))) == 1


def test_wandb_gets_each_value_at_its_step(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with MetricLog(tmp_path, trackers=["wandb"], config={"loss": {"name": "dpo"}}) as log:
        run = log.trackers[0].run
        assert run.settings.mode == "offline"
        assert dict(run.config)["loss.name"] == "dpo"
        calls = []
        real = run.log
        monkeypatch.setattr(run, "log", lambda values, step=None, **kw: (calls.append((values, step)),
                                                                          real(values, step=step, **kw)))
        log.write({"split": "eval", "step": 0, "loss": 0.75})
        log.write({"split": "train", "step": 2, "epoch": 0, "loss": 0.5, "lr": 1e-3, "bad_steps": 0})
    assert calls == [({"eval/loss": 0.75}, 0), ({"train/loss": 0.5, "train/lr": 1e-3, "train/bad_steps": 0.0}, 2)]


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_tracker_without_its_package_is_an_error_naming_the_extra(tmp_path, monkeypatch, capsys, tracker):
    import dpo.train.trackers

    monkeypatch.setattr(dpo.train.trackers, "tracker_available", lambda name: name != tracker)
    recipe = tiny_recipe(tmp_path, output={"report_to": [tracker]})
    with pytest.raises(SystemExit) as info:
        main([str(recipe)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"output.report_to: {tracker}" in err and f"pip install 'dpo-train[{tracker}]'" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main([str(recipe), "--dry-run"])
    assert f"pip install 'dpo-train[{tracker}]'" in capsys.readouterr().err


def test_tensorboard_true_is_report_to_tensorboard():
    from dpo.recipe import OutputConfig

    assert OutputConfig(dir="o", tensorboard=True).trackers() == ["tensorboard"]
    assert OutputConfig(dir="o", report_to=["mlflow", "tensorboard"], tensorboard=True).trackers() == [
        "tensorboard", "mlflow"]
