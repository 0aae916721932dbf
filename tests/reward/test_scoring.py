"""``dpo-train score``: one score per row, in order and intact; a bad row named; a policy run refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo.cli import main
from dpo.quickstart import is_correct
from dpo.reward.model import load_reward_run
from dpo.reward.scoring import score_texts
from tests.helpers import write_jsonl, write_recipe

QUICKSTART = Path("recipes/quickstart")


def test_score_command_writes_one_score_per_row(trained_reward_model, tmp_path):
    rows = []
    for line in (QUICKSTART / "data" / "eval.jsonl").read_text().splitlines()[:40]:
        pair = json.loads(line)
        rows.append({"id": len(rows), "prompt": pair["prompt"], "completion": pair["chosen"]})
        rows.append({"id": len(rows), "prompt": pair["prompt"], "completion": pair["rejected"]})
    data = write_jsonl(tmp_path / "answers.jsonl", rows)
    main(["score", "--reward-model", str(trained_reward_model), "--data", str(data)])
    written = [json.loads(line) for line in (tmp_path / "answers.scores.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "score"} for r in written] == rows  # every row, in order, intact
    run = load_reward_run(trained_reward_model)
    expected = score_texts(run, rows, 16, "cpu", "test")
    assert [r["score"] for r in written] == pytest.approx(expected, abs=1e-5)
    correct = [r["score"] for r in written if is_correct(r["prompt"], r["completion"])]
    wrong = [r["score"] for r in written if not is_correct(r["prompt"], r["completion"])]
    assert sum(correct) / len(correct) > sum(wrong) / len(wrong)


def test_score_names_the_bad_row(trained_reward_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Is 4 even? Answer:", "completion": " even"},
                                                {"prompt": "Is 5 even? Answer:"}])
    with pytest.raises(SystemExit) as info:
        main(["score", "--reward-model", str(trained_reward_model), "--data", str(data)])
    assert info.value.code == 2
    assert "bad.jsonl, line 2: missing field: no 'completion' field" in capsys.readouterr().err


def test_score_refuses_a_policy_run(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    write_recipe(run / "recipe.yaml", {"model": {"path": "m"}, "data": {"train": "t"}, "output": {"dir": str(run)}})
    with pytest.raises(SystemExit):
        main(["score", "--reward-model", str(run), "--data", str(tmp_path / "x.jsonl")])
    assert "trained with task: preference, not a reward model" in capsys.readouterr().err
