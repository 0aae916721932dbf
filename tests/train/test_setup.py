"""The preference task's setup: reference log-probs computed once, before the first step, and not at all for
reference-free losses."""

from __future__ import annotations

import torch

from dpo.recipe import load_recipe
from tests.train.test_loop import tiny_recipe


def test_no_reference_pass_for_reference_free_losses(tmp_path, monkeypatch):
    import dpo.train.loop as trainer
    import dpo.train.setup as train_setup

    calls = []
    monkeypatch.setattr(train_setup, "compute_references", lambda *a, **k: calls.append(1))
    recipe_path = tiny_recipe(tmp_path, loss={"name": "simpo", "beta": 2.0})
    summary = trainer.train(load_recipe(recipe_path, ["train.max_steps=2"]), log=lambda _: None)
    assert calls == [] and summary["steps"] == 2


def test_reference_is_computed_before_the_first_step_and_never_inside_it(tmp_path, monkeypatch):
    import dpo.train.loop as trainer
    import dpo.train.setup as train_setup

    events: list[str] = []
    real_compute, real_batch_loss = train_setup.compute_references, train_setup.batch_loss

    def compute(*args, **kwargs):
        events.append("reference")
        return real_compute(*args, **kwargs)

    def batch_loss(policy, batch, spec, options, reference, *rest):
        events.append("step" if policy.training else "eval")
        assert reference is not None
        return real_batch_loss(policy, batch, spec, options, reference, *rest)

    monkeypatch.setattr(train_setup, "compute_references", compute)
    monkeypatch.setattr(train_setup, "batch_loss", batch_loss)
    trainer.train(load_recipe(tiny_recipe(tmp_path), ["train.max_steps=2"]), log=lambda _: None)
    assert events[0] == "reference" and events.count("reference") == 1
    assert events.count("step") == 2


def test_a_policy_started_from_an_adapter_starts_at_its_reference(tmp_path):
    """model.adapter: the policy is that adapter, trained on, and the reference is it too: before training every
    held-out pair ties exactly."""
    import dpo.train.loop as trainer
    from dpo.model import add_lora, load_base_model

    recipe = load_recipe(tiny_recipe(tmp_path), ["train.max_steps=1"])
    sft = add_lora(load_base_model(recipe.model), recipe.lora)
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    sft.save_pretrained(tmp_path / "sft")
    started = load_recipe(tiny_recipe(tmp_path), ["train.max_steps=1", f"model.adapter={tmp_path / 'sft'}"])
    assert started.reference.adapter == str(tmp_path / "sft")
    summary = trainer.train(started, log=lambda _: None)
    assert summary["eval_before"]["rewards/accuracies"] == 0.5 and summary["eval_before"]["rewards/margins"] == 0.0
    plain = trainer.train(load_recipe(tiny_recipe(tmp_path / "plain"), ["train.max_steps=1"]), log=lambda _: None)
    assert summary["eval_before"]["logps/chosen"] != plain["eval_before"]["logps/chosen"]  # it is not the base
