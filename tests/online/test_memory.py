"""The online step's memory plan: each term by hand, and the dry run that prints it."""

from __future__ import annotations

from dpo.cli import main
from dpo.model.memory import LORA_BYTES, ModelShape, TrainingPlan, lora_tensor_sizes, weight_bytes
from dpo.online.memory import adapter_bytes, estimate_online
from dpo.recipe import recipe_from_dict
from tests.online.conftest import online_recipe

SHAPE = ModelShape(vocab=100, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128)
OTHER = ModelShape(vocab=100, hidden=32, layers=3, heads=4, kv_heads=2, head_dim=8, intermediate=64)


def recipe(task: str = "ppo", **online):
    generation = {"max_new_tokens": 10, "batch_size": 6, "samples_per_prompt": 2 if task == "rloo" else 1}
    return recipe_from_dict({
        "task": task, "model": {"path": "m", "dtype": "float32"}, "lora": {"r": 4, "alpha": 8},
        "data": {"train": "t", "max_length": 64, "max_prompt_length": 22},
        "online": {"reward_model": "rm", "generation": generation, **online},
        "train": {"batch_size": 3}, "reference": {"batch_size": 5}, "output": {"dir": "o"},
    })


def test_online_memory_terms_by_hand():
    ppo = recipe()
    plan = TrainingPlan.from_recipe(ppo, "cpu")
    memory = estimate_online(ppo, SHAPE, device_type="cpu")
    quantized, other = weight_bytes(SHAPE, plan)
    assert memory.weights == quantized + other
    lora = LORA_BYTES * sum(lora_tensor_sizes(SHAPE, plan))  # float32 adapter values
    assert memory.policy_adapter == lora + lora + 8 * sum(lora_tensor_sizes(SHAPE, plan))  # + gradient + 2 moments
    assert memory.value_adapter == memory.policy_adapter + 3 * 4 * (64 + 1)  # and a head with its bias, trained
    assert memory.reward == lora + 4 * 64 and memory.reward_note.startswith("reward adapter")
    assert memory.reference_adapter == 0
    # KV cache: keys and values (2) x layers x kv_dim (2 x 16) x 4 bytes x 6 sequences x (22 + 10) tokens.
    assert memory.kv_cache == 2 * 2 * 32 * 4 * 6 * 32
    assert memory.generation_logits == 4 * 6 * 10 * 100  # float32 logits of every step
    assert memory.peak == memory.resident + max(memory.phases.values())
    # RLOO has no value model and one role in the update; a reward model of another base costs its weights.
    rloo = estimate_online(recipe("rloo"), SHAPE, reward_shape=OTHER, device_type="cpu")
    assert rloo.value_adapter == 0 and rloo.update < memory.update
    assert rloo.reward == sum(weight_bytes(OTHER, plan)) + LORA_BYTES * sum(lora_tensor_sizes(OTHER, plan))
    with_reference = recipe_from_dict({**recipe().model_dump(mode="json"), "reference": {"adapter": "sft"}})
    assert estimate_online(with_reference, SHAPE, device_type="cpu").reference_adapter == adapter_bytes(SHAPE, plan, False)


def test_dry_run_prints_the_online_plan_and_warns(tiny, tmp_path, capsys):
    path = online_recipe(tiny, tmp_path / "ppo")
    main([str(path), "--dry-run", "--set", "model.max_memory_gb=0.00001"])
    out = capsys.readouterr().out
    assert "# rollouts: 4 samples each (4 prompts x 1), 4 micro-batches of 2 (2 pass(es)), 4 optimizer step(s)" in out
    assert "# memory of the online step" in out and "rollout: KV cache (8 x 29 tokens)" in out
    assert "reward adapter + head (frozen)" in out  # the tiny reward run was trained on this base
    assert "warning: the estimated peak" in out and "phase is the largest" in out
    assert not (tmp_path / "ppo").exists()
