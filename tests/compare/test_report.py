"""The compare report: every number of report.json is in report.md, under the column the JSON names."""

from __future__ import annotations

import re

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
