"""DPO on the real model's own pairs, on a rule-checkable task (``recipes/smollm2/arithmetic.py``): held-out
preference accuracy and the rule's pass rate of greedy held-out answers both rise, and nothing is displaced."""

from __future__ import annotations

import json

from dpo.cli import main
from tests.helpers import write_recipe
from tests.real_model.conftest import TASK

GOLD = f"{TASK}/arithmetic.py:gold"


def pass_rate(samples: list[dict], step: int) -> float:
    answers = [s for s in samples if s["split"] == "eval" and s["step"] == step]
    return sum(s["gold"] == 1.0 for s in answers) / len(answers)


def test_pairs_from_the_real_model_are_best_against_worst_by_the_rule(tmp_path, smollm2, capsys):
    from dpo.reward import load_gold

    out = tmp_path / "pairs.jsonl"
    main(["pairs", str(smollm2), "--prompts", str(TASK / "data" / "prompts-eval.jsonl"), "--max-prompts", "12",
          "--scorer", GOLD, "--k", "4", "--temperature", "0.8", "--max-new-tokens", "32", "--batch-size", "16",
          "--keep-unfinished", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    logged = capsys.readouterr().out
    assert rows and f"wrote {len(rows)} pairs from 12 prompts" in logged
    gold = load_gold(GOLD)
    for row in rows:  # chat prompts give the conversational layout; the scores are the rule's
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        assert row["score_chosen"] == gold(row["prompt"], row["chosen"][0]["content"]) > row["score_rejected"]


def test_dpo_on_its_own_pairs_raises_held_out_accuracy_and_the_rules_pass_rate(tmp_path, smollm2):
    # The shipped pairs were sampled from this model by `dpo-train pairs` (the commands are in
    # recipes/smollm2-135m-onpolicy.yaml); the run is that recipe's, shortened to 6 steps.
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "model": {"path": str(smollm2)},
        "data": {"train": str(TASK / "data" / "onpolicy-train.jsonl"),
                 "eval": str(TASK / "data" / "onpolicy-eval.jsonl"), "max_length": 112, "max_prompt_length": 64},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 1.0e-4, "warmup_steps": 2, "log_every": 3},
        # Every held-out prompt answered greedily and kept, so the pass rate is read from samples.jsonl.
        "eval": {"generate": 30, "samples": 30, "max_new_tokens": 32, "gold": GOLD},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "output": {"dir": str(tmp_path / "run")},
    })
    main([str(recipe)])
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    before, after = final["eval_before"], final["eval_after"]
    assert before["rewards/accuracies"] == 0.5 and after["rewards/accuracies"] >= 0.7, after
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert pass_rate(samples, final["steps"]) >= pass_rate(samples, 0) + 0.15, (before, after)
    assert after["generate/gold"] > before["generate/gold"] and after["change/chosen_per_token"] > -0.1
    assert final["warnings"] == []
