"""The compare file: errors name the key, overrides apply, the shipped file validates."""

from __future__ import annotations

import re

import pytest

from dpo.cli import main
from dpo.compare.config import CompareError, load_compare_config
from tests.helpers import write_recipe


def test_compare_file_errors_name_the_key(tmp_path, capsys):
    good = {"models": [{"name": "a", "path": "m"}], "reward_model": "r", "prompts": {"path": "p"}, "output": "o"}
    cases = [
        ({**good, "models": [{"name": "a", "path": "m", "run": "r"}]}, "give exactly one of path"),
        ({**good, "reference": "b"}, "reference: 'b' is not a model name"),
        ({**good, "models": [{"name": "a", "path": "m"}, {"name": "a", "path": "n"}]}, "a repeated"),
        ({**good, "generation": {"top_p": 0}}, "generation.top_p"),
        ({**good, "samples": 3}, "samples: unknown key"),
        ({**good, "pairs": {"path": "x", "max_length": 8, "max_prompt_length": 16}}, "max_prompt_length (16)"),
    ]
    for tree, expected in cases:
        path = write_recipe(tmp_path / "c.yaml", tree)
        with pytest.raises(CompareError, match=re.escape(expected)):
            load_compare_config(path)
    path = write_recipe(tmp_path / "c.yaml", good)
    assert load_compare_config(path, ["models.0.path=other", "generation.seed=3"]).models[0].path == "other"
    with pytest.raises(SystemExit) as info:
        main(["compare", str(write_recipe(tmp_path / "d.yaml", {**good, "reference": "b"}))])
    assert info.value.code == 2 and "reference: 'b' is not a model name" in capsys.readouterr().err


def test_shipped_compare_file_validates():
    config = load_compare_config("recipes/compare-quickstart.yaml")
    assert config.reference_name == "base" and [m.name for m in config.models] == ["base", "dpo"]


def test_online_compare_file_validates_and_a_gold_spec_is_checked():
    config = load_compare_config("recipes/compare-online-quickstart.yaml")
    assert config.gold == "dpo.quickstart:gold" and config.reference_name == "sft"
    assert [m.run for m in config.models][1:] == ["runs/dpo-sft-quickstart", "runs/ppo-quickstart",
                                                  "runs/rloo-quickstart"]
    with pytest.raises(CompareError, match="gold: expected module:function"):
        load_compare_config("recipes/compare-online-quickstart.yaml", ["gold=not-a-spec"])
