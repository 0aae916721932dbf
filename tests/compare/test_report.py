"""The compare report: every number of report.json is in report.md, under the column the JSON names."""

from __future__ import annotations

import json
import re

import pytest

from dpo.compare.report import COLUMNS, fmt
from tests.compare.test_run import numbers


def test_every_number_in_the_json_is_in_the_markdown(report):
    content = numbers(report)
    markdown = (report / "report.md").read_text()
    rows = {}
    header = None
    for line in markdown.splitlines():
        if line.startswith("| model |"):
            header = [c.strip() for c in line.strip("|").split("|")]
        elif header and line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = dict(zip(header, cells))
        elif header and not line.startswith("|"):
            break  # the end of the per-model table
    # Without a gold scorer (this report has none) the gold column is left out.
    columns = [column for column in COLUMNS if column[0] != "gold" or content["settings"]["gold"]]
    assert header == ["model", *[heading for _, _, heading in columns]]
    for model in content["models"]:
        for section, key, heading in columns:
            assert rows[model["name"]][heading] == fmt(model[section][key]), (model["name"], heading)
        accuracy = model["preference_accuracy"]
        assert f"- {model['name']}: {fmt(accuracy['value'])}, by {accuracy['method']}" in markdown
    reward = content["reward_model"]
    assert f"**{fmt(reward['preference_accuracy'])}** on {reward['pairs']} pairs" in markdown

    def leaves(tree):
        for value in tree.values():
            if isinstance(value, dict):
                yield from leaves(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                yield value

    for model in content["models"]:
        for value in leaves(model):
            assert fmt(value) in markdown, value
    # every setting is stated: the settings block is the JSON's settings
    block = re.search(r"```yaml\n(.*?)```", markdown, re.S).group(1)
    import yaml

    assert yaml.safe_load(block) == content["settings"]


def model(name, mean, se, std, kl=0.1, kl_se=0.01):
    return {"name": name, "reward": {"mean": mean, "standard_error": se, "std": std},
            "drift": {"kl": kl, "kl_standard_error": kl_se}}


def test_the_reward_axis_is_never_narrower_than_the_spread_of_single_scores():
    from dpo.compare.report import reward_axis_limits

    # Means 0.0012 and 0.0021 with standard errors 0.0002, single samples spread by 0.5: an axis that
    # autoscales to 0.001-0.0022 turns a 0.0009 gap into the whole plot; here it is under 1% of the height.
    low, high = reward_axis_limits([model("a", 0.0012, 0.0002, 0.5), model("b", 0.0021, 0.0002, 0.4)])
    assert high - low >= 0.5 and low < 0.0012 - 0.0004 and high > 0.0021 + 0.0004
    assert (0.0021 - 0.0012) / (high - low) < 0.02
    # A real gap, far beyond the spread and the error bars, keeps every error bar inside the axis.
    low, high = reward_axis_limits([model("a", -2.5, 0.05, 0.3), model("b", 1.0, 0.2, 0.3)])
    assert low < -2.5 - 0.1 and high > 1.0 + 0.4 and high - low < 5


def test_a_reward_model_near_chance_is_flagged_in_words():
    from dpo.compare.report import reward_model_warning

    words = reward_model_warning({"preference_accuracy": 0.55, "pairs": 200})
    assert "55.0%" in words and "carry little information" in words and "200 held-out pairs" in words
    assert reward_model_warning({"preference_accuracy": 0.9, "pairs": 200}) is None
    trained = reward_model_warning({"preference_accuracy": None, "pairs": 0, "training_accuracy": 0.52})
    assert "when it was trained" in trained
    assert reward_model_warning({"preference_accuracy": None, "pairs": 0, "training_accuracy": None}) is None


def test_the_report_gives_reward_standard_errors_and_the_warning_where_due(report):
    content = numbers(report)
    for entry in content["models"]:
        scores = [json.loads(line)["score"] for line in (report / "samples.jsonl").read_text().splitlines()
                  if json.loads(line)["model"] == entry["name"]]
        mean = sum(scores) / len(scores)
        std = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5
        assert entry["reward"]["std"] == pytest.approx(std) and entry["reward"]["standard_error"] == pytest.approx(
            std / len(scores) ** 0.5)
    reward = content["reward_model"]
    markdown = (report / "report.md").read_text()
    assert (reward["warning"] is not None) == (reward["preference_accuracy"] < 0.6)
    assert ("carry little information" in markdown) == (reward["warning"] is not None)
    assert isinstance(reward["training_accuracy"], float)
