"""A tiny random model, quickstart-task pairs and a reward model trained on that model for a few steps,
shared by the online tests; and a helper that writes an online recipe for them."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpo.cli import main
from tests.helpers import build_tiny_model, write_pairs, write_recipe


@pytest.fixture(scope="package")
def tiny(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("online-tiny")
    model = build_tiny_model(tmp / "model")
    train, eval_ = write_pairs(tmp / "data", train=48, eval=8)
    reward = write_recipe(tmp / "reward.yaml", {
        "task": "reward",
        "model": {"path": str(model)},
        "data": {"train": str(train), "eval": str(eval_), "max_length": 32, "max_prompt_length": 24},
        "lora": {"r": 4, "alpha": 8},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 0.01, "log_every": 3},
        "output": {"dir": str(tmp / "reward")},
    })
    main([str(reward)])
    return {"tmp": tmp, "model": model, "train": train, "eval": eval_, "reward": tmp / "reward"}


def online_recipe(tiny: dict[str, Path], out: Path, task: str = "ppo", **sections) -> Path:
    """An online recipe on the tiny model: 4 prompts a rollout, micro-batches of 2, 2 passes (PPO)."""
    online = {"reward_model": str(tiny["reward"]), "gold": "dpo.quickstart:gold", "prompts_per_rollout": 4,
              "generation": {"max_new_tokens": 5, "temperature": 1.0, "samples_per_prompt": 2 if task == "rloo" else 1,
                             "batch_size": 8, "seed": 0},
              "ppo_epochs": 2, "kl_coef": 0.05, "missing_eos_penalty": 1.0, "max_eval_prompts": 4}
    tree = {
        "task": task,
        "model": {"path": str(tiny["model"])},
        "data": {"train": str(tiny["train"]), "eval": str(tiny["eval"]), "max_length": 32, "max_prompt_length": 24},
        "lora": {"r": 4, "alpha": 8},
        "online": online,
        "train": {"max_steps": 6, "batch_size": 2, "lr": 0.01, "log_every": 2, "save_every": 3, "seed": 1},
        "output": {"dir": str(out)},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    if "online" in sections:
        tree["online"] = {**online, **sections["online"]}
    return write_recipe(out.parent / f"{out.name}.yaml", tree)
