"""One base model for every role: policy, reference (adapters off, or an SFT adapter), value and reward
adapters; the reward model loaded beside only when it was trained on another base."""

from __future__ import annotations

import torch

from dpo.data.collate import pad_sequences
from dpo.model import causal_lm
from dpo.online.logprobs import completion_logprobs, completion_values
from dpo.online.roles import build_online_model
from dpo.recipe import load_recipe
from dpo.reward import load_reward_run, score_texts
from tests.helpers import build_tiny_model
from tests.online.conftest import online_recipe

ROWS = [{"prompt": "Parity of 12:", "completion": " even"}, {"prompt": "Mod 5 of 13:", "completion": " 3 3"}]


def batch_of(tokenizer) -> dict[str, torch.Tensor]:
    pairs = [(tokenizer(r["prompt"])["input_ids"], tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
              + [tokenizer.eos_token_id]) for r in ROWS]
    return pad_sequences(pairs, tokenizer.pad_token_id)


def perturb(model, adapter: str) -> None:
    """Move an adapter (and its head) away from its start (LoRA B = 0, a zero value head), so that it changes
    what the model computes."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter}." in name and ("lora_B" in name or "modules_to_save" in name):
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))


def test_every_role_on_one_base(tiny, tmp_path):
    recipe = load_recipe(online_recipe(tiny, tmp_path / "ppo"))
    model = build_online_model(recipe, "cpu", lambda _: None)
    assert model.shared_reward and set(model.peft.peft_config) == {"default", "value", "reward"}
    bases = {id(m) for m in (causal_lm(model.peft), causal_lm(model.reward.model))}
    assert len(bases) == 1  # the reward model is the same network, not a second copy
    # Only the policy and value adapters (and the value head) train, whatever role was switched to last.
    for role in ("value", "reward", "policy"):
        with model.role(role):
            pass
        trained = {name for name, p in model.peft.named_parameters() if p.requires_grad}
        assert trained == model.trainable and trained
        assert all(".default." in n or ".value." in n for n in trained)

    # The shared reward adapter scores exactly as the reward run loaded on its own.
    own = load_reward_run(tiny["reward"])
    with model.role("reward"):
        shared = score_texts(model.reward, ROWS, 4, "cpu", "rows")
    assert shared == score_texts(own, ROWS, 4, "cpu", "rows")

    batch = batch_of(model.tokenizer)
    model.peft.eval()
    perturb(model.peft, "default")
    perturb(model.peft, "value")
    with torch.no_grad(), model.role("reference") as reference:
        ref, mask = completion_logprobs(reference, batch)
    with torch.no_grad(), model.role("policy") as policy:
        pol, _ = completion_logprobs(policy, batch)
    plain = load_recipe(online_recipe(tiny, tmp_path / "plain")).model
    from dpo.model import load_base_model

    with torch.no_grad():
        base, _ = completion_logprobs(load_base_model(plain), batch)
    assert torch.equal(ref, base)  # the reference is the base with every adapter off
    assert not torch.allclose(pol, ref)  # the policy is its adapter
    with torch.no_grad(), model.role("value") as value:
        values = completion_values(value, batch)
    assert values.shape == mask.shape and (values[mask] != 0).all()


def test_a_reward_model_of_another_base_is_loaded_beside(tiny, tmp_path):
    other = build_tiny_model(tmp_path / "other", seed=5)
    recipe = load_recipe(online_recipe(tiny, tmp_path / "rloo", task="rloo", model={"path": str(other)}))
    model = build_online_model(recipe, "cpu", lambda _: None)
    assert not model.shared_reward and set(model.peft.peft_config) == {"default"}
    with model.role("reward") as reward:
        assert reward is model.reward.model
    assert score_texts(model.reward, ROWS, 4, "cpu", "x") == score_texts(load_reward_run(tiny["reward"]), ROWS, 4,
                                                                         "cpu", "x")


def test_the_start_adapter_is_the_policy_and_the_reference(tiny, tmp_path):
    from peft import PeftModel

    from dpo.model import load_base_model

    # An "SFT" adapter: a fresh one moved off its identity start, saved as a run saves it.
    base_recipe = load_recipe(online_recipe(tiny, tmp_path / "sft-like"))
    from dpo.model import add_lora

    sft = add_lora(load_base_model(base_recipe.model), base_recipe.lora)
    perturb(sft, "default")
    sft.save_pretrained(tmp_path / "sft-adapter")
    recipe = load_recipe(online_recipe(tiny, tmp_path / "ppo", model={"adapter": str(tmp_path / "sft-adapter")}))
    assert recipe.reference.adapter == str(tmp_path / "sft-adapter")
    model = build_online_model(recipe, "cpu", lambda _: None)
    model.peft.eval()
    batch = batch_of(model.tokenizer)
    loaded = PeftModel.from_pretrained(load_base_model(recipe.model), str(tmp_path / "sft-adapter")).eval()
    with torch.no_grad():
        expected, _ = completion_logprobs(loaded, batch)
        with model.role("reference") as reference:
            ref, _ = completion_logprobs(reference, batch)
        with model.role("policy") as policy:
            pol, _ = completion_logprobs(policy, batch)
    assert torch.equal(ref, expected) and torch.equal(pol, expected)
    assert {name for name, p in model.peft.named_parameters() if p.requires_grad} == model.trainable
    assert not any(".reference." in name for name in model.trainable)
