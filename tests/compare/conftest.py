"""Runs trained once on the quickstart task (a DPO adapter and a reward model) and the compare report made
from them, shared by the compare tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo.cli import main
from tests.helpers import write_recipe

QUICKSTART = Path("recipes/quickstart")
EVAL = str(QUICKSTART / "data" / "eval.jsonl")


def quickstart_run(tmp: Path, name: str, **tree) -> Path:
    """Train on the quickstart task (its model and pairs) and return the run directory."""
    recipe = write_recipe(tmp / f"{name}.yaml", {
        "model": {"path": str(QUICKSTART / "model")},
        "data": {"train": str(QUICKSTART / "data" / "train.jsonl"), "eval": EVAL, "max_length": 64,
                 "max_prompt_length": 48, "max_rows": 800, "cache_dir": str(tmp / "cache")},
        "lora": {"r": 32, "alpha": 64},
        "output": {"dir": str(tmp / name)},
        **tree,
    })
    main([str(recipe)])
    return tmp / name


@pytest.fixture(scope="package")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("compare")
    dpo = quickstart_run(tmp, "dpo", loss={"name": "dpo", "beta": 0.5},
                         train={"max_steps": 200, "batch_size": 16, "lr": 0.003, "warmup_ratio": 0.05,
                                "log_every": 50})
    reward = quickstart_run(tmp, "reward", task="reward",
                            train={"max_steps": 30, "batch_size": 16, "lr": 0.001, "log_every": 10})
    return {"dpo": dpo, "reward": reward, "tmp": tmp}


def compare_file(runs: dict[str, Path], output: Path) -> Path:
    return write_recipe(runs["tmp"] / "compare.yaml", {
        "models": [{"name": "base", "path": str(QUICKSTART / "model")}, {"name": "dpo", "run": str(runs["dpo"])}],
        "reference": "base",
        "reward_model": str(runs["reward"]),
        "prompts": {"path": EVAL, "max_prompt_length": 48, "max_prompts": 12},
        "pairs": {"path": EVAL, "max_length": 64, "max_prompt_length": 48, "batch_size": 50},
        "generation": {"max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "samples_per_prompt": 3,
                       "seed": 0, "batch_size": 36},
        "output": str(output),
    })


@pytest.fixture(scope="package")
def report(runs) -> Path:
    out = runs["tmp"] / "report-a"
    main(["compare", str(compare_file(runs, out))])
    return out
