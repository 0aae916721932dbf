"""The preference task's setup: reference log-probs computed once, before the first step, and not at all for
reference-free losses."""

from __future__ import annotations

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
