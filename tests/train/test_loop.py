"""End to end: a tiny random Llama saved with save_pretrained, trained from a recipe file through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dpo.cli import main
from dpo.data import collate_paired, prepare_data
from dpo.model import load_base_model, load_tokenizer, sequence_logprobs
from dpo.recipe import load_recipe
from dpo.train.loop import MetricWindow
from tests.helpers import build_tiny_model, write_pairs, write_recipe

TRAIN_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected", "grad_norm", "lr", "tokens_per_s", "step", "epoch"}


def tiny_recipe(tmp_path: Path, *, train_pairs: int = 48, eval_pairs: int = 24, **sections) -> Path:
    model = build_tiny_model(tmp_path / "model")
    train, eval_ = write_pairs(tmp_path / "data", train=train_pairs, eval=eval_pairs)
    tree = {
        "model": {"path": str(model)},
        "data": {"train": str(train), "eval": str(eval_), "max_length": 64, "max_prompt_length": 48},
        "lora": {"r": 8, "alpha": 16},
        "loss": {"name": "dpo", "beta": 0.5},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 0.003, "log_every": 2, "seed": 3},
        "reference": {"batch_size": 16},
        "output": {"dir": str(tmp_path / "out")},
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return write_recipe(tmp_path / "recipe.yaml", tree)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trains_from_a_recipe_file_and_writes_every_output(tmp_path):
    recipe_path = tiny_recipe(tmp_path)
    main([str(recipe_path), "--set", "train.max_steps=4"])
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "tokenizer.json").is_file()
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved == yaml.safe_load(load_recipe(recipe_path).to_yaml())
    records = read_jsonl(out / "metrics.jsonl")
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [2, 4]
    for record in train_records:
        assert TRAIN_KEYS <= set(record)
        assert all(isinstance(record[k], (int, float)) for k in TRAIN_KEYS)
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4]
    assert evals[0]["rewards/accuracies"] == 0.5  # untrained policy == reference exactly: every pair ties
    assert evals[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["steps"] == 4 and final["eval_after"] == {k: v for k, v in evals[1].items() if k not in ("split", "step")}


def test_adapter_reloads_with_peft_and_reproduces_the_trained_log_probs(tmp_path):
    from peft import PeftModel

    recipe_path = tiny_recipe(tmp_path)
    main([str(recipe_path)])
    recipe = load_recipe(recipe_path)
    final = json.loads((tmp_path / "out" / "final_metrics.json").read_text())["eval_after"]

    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, unpaired=False, seed=recipe.train.seed, log=lambda _: None)
    batch = collate_paired([data.eval[i] for i in range(len(data.eval))], pad_token_id=tokenizer.pad_token_id)

    def mean_logps(model) -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            sums, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        b = batch["index"].shape[0]
        return sums[:b].mean().item(), sums[b:].mean().item()

    base = load_base_model(recipe.model)
    base_chosen, _ = mean_logps(base)
    reloaded = PeftModel.from_pretrained(load_base_model(recipe.model), tmp_path / "out" / "adapter")
    chosen, rejected = mean_logps(reloaded)
    assert chosen == pytest.approx(final["logps/chosen"], abs=1e-4)
    assert rejected == pytest.approx(final["logps/rejected"], abs=1e-4)
    assert abs(chosen - base_chosen) > 1e-3  # the adapter is not a no-op


@pytest.mark.slow
def test_quickstart_task_held_out_accuracy_improves(tmp_path):
    """The shipped quickstart model and data, shortened: accuracy rises well above chance."""
    out = tmp_path / "qs"
    main(["recipes/quickstart.yaml", "--set", f"output.dir={out}", "--set", "train.epochs=2",
          "--set", "train.eval_every=100000"])
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["eval_before"]["rewards/accuracies"] == 0.5
    assert final["eval_after"]["rewards/accuracies"] >= 0.75


def test_metric_window_averages_over_all_values_not_batch_means():
    window = MetricWindow()
    window.add({"acc": torch.tensor([1.0, 1.0, 1.0])})
    window.add({"acc": torch.tensor([0.0]), "kl": torch.tensor([2.0])})
    window.add({"acc": torch.tensor([])})
    assert window.means() == {"acc": 0.75, "kl": 2.0}  # a mean of batch means would give 0.5
    window.reset()
    assert window.means() == {}


def test_every_step_and_evaluation_runs_the_step_modules_forward_and_checkpoints_keep_the_peft_names(
        tmp_path, monkeypatch):
    """An engine that wraps the step module sees every forward of the loop through its hooks; the optimizer
    state in a checkpoint is named by the peft model's own parameter names, not the wrapper's."""
    import dpo.train.loop as trainer
    import dpo.train.setup as train_setup
    from dpo.model import SequenceLogprobs, add_lora
    from dpo.recipe import LoraConfig

    seen: list[bool] = []

    class Hooked(SequenceLogprobs):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_forward_hook(lambda module, args, output: seen.append(module.training))

    monkeypatch.setattr(train_setup, "SequenceLogprobs", Hooked)
    recipe = load_recipe(tiny_recipe(tmp_path), ["train.max_steps=2", "train.save_every=1"])
    trainer.train(recipe, log=lambda _: None)
    assert seen.count(True) == 2  # one micro-batch per step
    assert seen.count(False) == 2 * 2  # 24 held-out pairs in batches of 16, before and after training

    optimizer = json.loads((tmp_path / "out" / "checkpoints" / "step-000002" / "optimizer.json").read_text())
    policy = add_lora(load_base_model(recipe.model), LoraConfig(r=8, alpha=16))
    assert optimizer["param_names"] == [n for n, p in policy.named_parameters() if p.requires_grad]
