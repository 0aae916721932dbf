"""Outputs that explain themselves: the run's README.md, the adapter's model card, and an adapter that loads
from any folder."""

from __future__ import annotations

import json
import os
import shutil

import torch

from dpo.cli import main
from tests.train.test_loop import tiny_recipe


def test_the_model_card_readme_and_absolute_base(tmp_path):
    recipe = tiny_recipe(tmp_path)
    main([str(recipe)])
    out = tmp_path / "out"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "model").resolve())
    card = (out / "adapter" / "README.md").read_text()
    assert "[More Information Needed]" not in card
    run = json.loads(next((out / "checkpoints").glob("step-*/run.json")).read_text())
    final = json.loads((out / "final_metrics.json").read_text())
    assert f"base_model: {(tmp_path / 'model').resolve()}" in card
    assert str(tmp_path / "data" / "train.jsonl") in card and run["fingerprints"]["data.train"] in card
    assert run["fingerprints"]["data.eval"] in card
    assert "`dpo` (beta=0.5" in card and "4 optimizer steps" in card
    accuracy = final["eval_after"]["rewards/accuracies"]
    assert f"| `rewards/accuracies` | 0.5000 | {accuracy:.4f} |" in card
    assert "PeftModel.from_pretrained" in card and "dpo-train 0." in card
    readme = (out / "README.md").read_text()
    for name in ("recipe.yaml", "metrics.jsonl", "train.log", "curves.png", "final_metrics.json", "adapter/",
                 "checkpoints/step-NNNNNN/", "run.json", "state.json", "rng.json", "manifest.json",
                 "optimizer.safetensors", ".dpo-train"):
        assert f"`{name}`" in readme, name
    assert "Finished after 4 optimizer steps" in readme


def test_the_adapter_loads_from_a_copied_folder_anywhere(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    recipe = tiny_recipe(tmp_path)
    # a relative model.path, as the shipped recipes have
    monkeypatch.chdir(tmp_path)
    main([str(recipe), "--set", "model.path=model"])
    copy = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(tmp_path / "out" / "adapter", copy)
    other = tmp_path / "other-cwd"
    other.mkdir()
    os.chdir(other)  # "model" means nothing here
    model = AutoPeftModelForCausalLM.from_pretrained(str(copy))
    ids = torch.tensor([[1, 5, 6, 7]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
