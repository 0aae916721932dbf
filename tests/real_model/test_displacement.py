"""Off-policy pairs on the real model: accuracy rises while the chosen answers fall, and the run says so."""

from __future__ import annotations

import json

from dpo.cli import main
from dpo.train.guards import DISPLACEMENT_NATS_PER_TOKEN
from tests.helpers import write_recipe
from tests.real_model.conftest import TASK


def test_the_displacement_warning_fires_on_off_policy_pairs(tmp_path, smollm2, capsys):
    # Chosen: a bare number; rejected: the same number wrapped in flattery. The model writes neither.
    lines = {name: (TASK / "data" / f"flattery-{name}.jsonl").read_text().splitlines() for name in ("train", "eval")}
    (tmp_path / "train.jsonl").write_text("\n".join(lines["train"][:32]) + "\n")
    (tmp_path / "eval.jsonl").write_text("\n".join(lines["eval"][:16]) + "\n")
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "model": {"path": str(smollm2)},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 96,
                 "max_prompt_length": 64},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {"max_steps": 8, "batch_size": 4, "lr": 1.0e-3, "warmup_steps": 0, "log_every": 2},
        "eval": {"samples": 0},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "output": {"dir": str(tmp_path / "run")},
    })
    main([str(recipe)])
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    before, after = final["eval_before"], final["eval_after"]
    assert before["rewards/accuracies"] == 0.5 and after["rewards/accuracies"] >= 0.9, after
    assert after["change/chosen_per_token"] <= -DISPLACEMENT_NATS_PER_TOKEN, after
    assert after["change/rejected"] < after["change/chosen"] < 0
    assert any(w.startswith("likelihood displacement") for w in final["warnings"]), final["warnings"]
    assert capsys.readouterr().out.count("warning: likelihood displacement") == 1
