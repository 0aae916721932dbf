"""Rollout log-probs through the fused kernel (never the LM head's [tokens, vocab] output), at the sampling
temperature, against a float64 reference; sampling with the policy's adapter on and the KV cache."""

from __future__ import annotations

import torch

from dpo.model import causal_lm, encode_prompt
from dpo.online.logprobs import completion_logprobs
from dpo.online.roles import build_online_model
from dpo.online.rollout import Rollouts, read_online_prompts
from dpo.recipe import load_recipe
from tests.online.conftest import online_recipe
from tests.online.test_roles import batch_of, perturb


def test_completion_logprobs_match_float64_at_the_temperature_and_skip_the_head(tiny, tmp_path):
    recipe = load_recipe(online_recipe(tiny, tmp_path / "ppo"))
    model = build_online_model(recipe, "cpu", lambda _: None)
    model.peft.eval()
    batch = batch_of(model.tokenizer)
    lm = causal_lm(model.peft)
    calls = []
    hook = lm.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        logps, mask = completion_logprobs(model.peft, batch, temperature=0.5)
    hook.remove()
    assert calls == []  # the LM head module never ran: no [tokens, vocab] logits
    with torch.no_grad():
        hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = hidden.double() @ lm.get_output_embeddings().weight.double().T / 0.5
        all_logps = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch["labels"][:, 1:]
    for row in range(labels.shape[0]):
        positions = (labels[row] != -100).nonzero().squeeze(1)
        expected = all_logps[row, positions, labels[row, positions]]
        assert mask[row].sum() == len(positions)
        torch.testing.assert_close(logps[row, : len(positions)].double(), expected, rtol=1e-5, atol=1e-5)


def test_sampling_runs_the_policy_adapter_with_the_kv_cache(tiny, tmp_path):
    from peft import PeftModel

    from dpo.model import SamplingSettings, load_base_model, sample_completions

    recipe = load_recipe(online_recipe(tiny, tmp_path / "ppo", online={"generation": {"temperature": 1.0,
                                                                                    "max_new_tokens": 6}}))
    model = build_online_model(recipe, "cpu", lambda _: None)
    perturb(model.peft, "default")
    perturb(model.peft, "value")  # a value adapter that leaked into sampling would change the samples
    prompts = read_online_prompts(recipe, model.tokenizer, lambda _: None)
    rollouts = Rollouts(recipe, model, prompts, "cpu", lambda _: None)
    lengths = []
    hook = causal_lm(model.peft).model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    samples, _ = rollouts.sample(prompts.train_ids[:4], 1, seed=3)
    hook.remove()
    # One pass over the prompts, then one token a step: the cache holds the rest.
    assert lengths[0] > 1 and set(lengths[1:]) == {1}
    model.peft.save_pretrained(tmp_path / "saved", selected_adapters=["default"])
    alone = PeftModel.from_pretrained(load_base_model(recipe.model), str(tmp_path / "saved"))
    settings = SamplingSettings(6, 1.0, 1.0, 1, 3, recipe.online.generation.batch_size)
    expected = sample_completions(alone, model.tokenizer, prompts.train_ids[:4], settings, "cpu")
    assert samples.completion_ids == expected.completion_ids
    plain = sample_completions(load_base_model(recipe.model), model.tokenizer, prompts.train_ids[:4], settings, "cpu")
    assert samples.completion_ids != plain.completion_ids
    # The training run's own generator is untouched by sampling.
    torch.manual_seed(11)
    before = torch.get_rng_state()
    rollouts.sample(prompts.train_ids[:2], 1, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert encode_prompt(model.tokenizer, prompts.train[0], None, 24) == prompts.train_ids[0]
