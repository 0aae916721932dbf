"""The pipeline on the quickstart task, shortened to a CPU budget: SFT raises the chosen answers' likelihood on
held-out prompts; PPO and RLOO from the SFT adapter raise the reward model's held-out score and the gold reward
with a finite, reported KL; and against a reward model that rewards length, with a weak KL penalty, the proxy
rises while the gold reward does not, and the compare report flags it."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from dpo.cli import main
from tests.helpers import write_jsonl, write_recipe

EVAL = "recipes/quickstart/data/eval.jsonl"


def final(run: Path) -> dict:
    return json.loads((run / "final_metrics.json").read_text())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("online-quickstart")
    main(["recipes/sft-quickstart.yaml", "--set", f"output.dir={tmp / 'sft'}", "--set", "train.log_every=50"])
    # The shipped reward model as it is, trained on pairs whose rejected answers are wrong in every way (wrong value,
    # wrong form, cut short, extended, garbled): one trained only on wrong values scores some answers of the wrong
    # form above every right one, and PPO then raises the proxy at the gold reward's expense.
    main(["recipes/reward-quickstart.yaml", "--set", f"output.dir={tmp / 'reward'}", "--set", "train.eval_every=null",
          "--set", "train.log_every=250"])
    return tmp


def online(pipeline: Path, recipe: str, name: str, *overrides: str) -> dict:
    out = pipeline / name
    main([recipe, "--set", f"output.dir={out}", "--set", f"model.adapter={pipeline / 'sft' / 'adapter'}",
          "--set", f"online.reward_model={pipeline / 'reward'}", *[a for o in overrides for a in ("--set", o)]])
    return final(out)


@pytest.mark.slow
def test_sft_raises_the_chosen_answers_likelihood_on_held_out_prompts(pipeline):
    summary = final(pipeline / "sft")
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["loss"] < before["loss"] - 0.5  # NLL per completion token, on prompts never trained on
    assert after["logps/completion"] > before["logps/completion"] + 2.0


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["recipes/ppo-quickstart.yaml", "recipes/rloo-quickstart.yaml"])
def test_online_baselines_raise_the_proxy_and_the_gold_reward(pipeline, recipe):
    task = Path(recipe).stem.split("-")[0]
    summary = online(pipeline, recipe, task)
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["kl/k1"] == 0.0  # the policy starts as the reference: the SFT adapter
    # Across training seeds 0-2 (here, 2-core CPU) the held-out proxy rose by 0.15-0.68 (PPO) and 0.60-1.27
    # (RLOO), the gold by 0.04-0.10 and 0.09-0.13.
    assert after["reward/proxy"] > before["reward/proxy"] + 0.1, (before, after)
    assert after["reward/gold"] > before["reward/gold"], (before, after)
    assert math.isfinite(after["kl/k1"]) and 0 < after["kl/k1"] < 5
    assert summary["budget"]["samples_generated"] > 0 and summary["budget"]["wall_time_s"] > 0


def length_rewarding_pairs(count: int, seed: int) -> list[dict]:
    """Quickstart prompts whose 'chosen' side is the correct answer with junk after it, 'rejected' the correct
    answer alone: a reward model trained on them rewards length, and gold (exact answers) says the opposite."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in Path("recipes/quickstart/data/train.jsonl").read_text().splitlines()]
    pairs = []
    for row in rows[:count]:
        junk = "".join(rng.choice("abcdefghij ") for _ in range(rng.randint(2, 5)))
        pairs.append({"prompt": row["prompt"], "chosen": f"{row['chosen']} {junk}", "rejected": row["chosen"]})
    return pairs


@pytest.mark.slow
def test_reward_hacking_of_a_length_reward_is_visible_and_the_report_flags_it(pipeline):
    tmp = pipeline
    data = write_jsonl(tmp / "long" / "train.jsonl", length_rewarding_pairs(600, 0))
    main(["recipes/reward-quickstart.yaml", "--set", f"data.train={data}", "--set", "data.eval=null",
          "--set", f"output.dir={tmp / 'long-reward'}", "--set", "train.max_steps=150", "--set", "train.eval_every=null",
          "--set", "train.log_every=50"])
    summary = online(pipeline, "recipes/ppo-quickstart.yaml", "hacked", f"online.reward_model={tmp / 'long-reward'}",
                     "online.kl_coef=0.001", "online.missing_eos_penalty=null", "online.generation.temperature=0.15",
                     "train.lr=0.001", "train.max_steps=24")
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["reward/proxy"] > before["reward/proxy"] + 1.0, (before, after)
    assert after["length"] > before["length"] + 1.0  # what the flawed reward model pays for
    assert after["reward/gold"] < before["reward/gold"], (before, after)

    compare = write_recipe(tmp / "compare-hacked.yaml", {
        "models": [{"name": "sft", "run": str(tmp / "sft")}, {"name": "hacked", "run": str(tmp / "hacked")}],
        "reference": "sft", "reward_model": str(tmp / "long-reward"), "gold": "dpo.quickstart:gold",
        "prompts": {"path": EVAL, "max_prompt_length": 48, "max_prompts": 50},
        "generation": {"max_new_tokens": 8, "temperature": 0.15, "samples_per_prompt": 2, "seed": 0, "batch_size": 100},
        "output": str(tmp / "compare-hacked"),
    })
    main(["compare", str(compare)])
    report = json.loads((tmp / "compare-hacked" / "report.json").read_text())
    models = {m["name"]: m for m in report["models"]}
    hacked = models["hacked"]
    assert hacked["reward_hacking"] and not models["sft"]["reward_hacking"]
    assert hacked["reward"]["gain"] > 0 >= hacked["gold"]["gain"]
    assert hacked["budget"]["samples_generated"] > 0 and hacked["budget"]["optimizer_steps"] == 24
    markdown = (tmp / "compare-hacked" / "report.md").read_text()
    assert "**reward hacking**: proxy up, gold not" in markdown and "## Training budget" in markdown
    assert (tmp / "compare-hacked" / "reward_vs_kl.png").stat().st_size > 0
    sample = json.loads((tmp / "compare-hacked" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["gold"] in (0.0, 1.0)
