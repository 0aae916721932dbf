"""A reward model trained once on the quickstart task, shared by the reward model and scoring tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo.cli import main
from tests.helpers import write_recipe

QUICKSTART = Path("recipes/quickstart")


@pytest.fixture(scope="package")
def trained_reward_model(tmp_path_factory) -> Path:
    """A reward model trained briefly on the quickstart task (its own model, train and held-out pairs)."""
    tmp = tmp_path_factory.mktemp("reward")
    recipe = write_recipe(tmp / "reward.yaml", {
        "task": "reward",
        "model": {"path": str(QUICKSTART / "model")},
        "data": {"train": str(QUICKSTART / "data" / "train.jsonl"), "eval": str(QUICKSTART / "data" / "eval.jsonl"),
                 "max_length": 64, "max_prompt_length": 48, "cache_dir": str(tmp / "cache")},
        "lora": {"r": 32, "alpha": 64},
        "reward": {"center_weight": 0.01},
        "train": {"seed": 0, "max_steps": 500, "batch_size": 16, "lr": 0.001, "warmup_ratio": 0.05,
                  "log_every": 100},
        "output": {"dir": str(tmp / "run")},
    })
    main([str(recipe)])
    return tmp / "run"
