"""Per-sequence log-probs and the step module: equal to a full-logits float64 reference, never the full
logits, with gradients reaching the adapter."""

from __future__ import annotations

import pytest
import torch

from dpo.model import (
    LogprobSettings,
    SequenceLogprobs,
    add_lora,
    final_logit_softcap,
    load_base_model,
    sequence_logprobs,
)
from dpo.recipe import LoraConfig, ModelConfig
from tests.helpers import build_tiny_model


def full_logits_reference(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """Plain transformers forward with full logits and float64 log_softmax: the definition."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = labels[:, 1:]
    mask = targets != -100
    gathered = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (gathered * mask).sum(dim=1)


def make_batch(vocab: int):
    torch.manual_seed(1)
    input_ids = torch.randint(4, vocab, (3, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 8:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :5] = -100  # prompt
    labels[2, 8:] = -100  # padding
    return input_ids, attention_mask, labels


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_sequence_logprobs_match_full_logits(tmp_path, arch):
    path = build_tiny_model(tmp_path / arch, arch)
    config = ModelConfig(path=str(path))
    model = load_base_model(config)
    model.eval()
    if arch == "gemma2":
        assert final_logit_softcap(model) == 30.0
    input_ids, attention_mask, labels = make_batch(model.config.vocab_size)
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, input_ids, attention_mask, labels, LogprobSettings(impl="torch"))
    expected = full_logits_reference(model, input_ids, attention_mask, labels)
    assert counts.tolist() == [6, 6, 3]
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-4)


def test_lora_starts_equal_to_base_and_disable_adapter_gives_base(tmp_path):
    path = build_tiny_model(tmp_path / "m")
    config = ModelConfig(path=str(path))
    base_logps = None
    model = load_base_model(config)
    input_ids, attention_mask, labels = make_batch(model.config.vocab_size)
    with torch.no_grad():
        base_logps, _ = sequence_logprobs(model, input_ids, attention_mask, labels)
    policy = add_lora(model, LoraConfig(r=4, alpha=8))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05)  # move the adapter away from its zero init
        moved, _ = sequence_logprobs(policy, input_ids, attention_mask, labels)
        with policy.disable_adapter():
            reference, _ = sequence_logprobs(policy, input_ids, attention_mask, labels)
    assert not torch.allclose(moved, base_logps)
    torch.testing.assert_close(reference, base_logps)


def test_gradients_reach_lora_parameters(tmp_path):
    path = build_tiny_model(tmp_path / "m")
    policy = add_lora(load_base_model(ModelConfig(path=str(path))), LoraConfig(r=4), gradient_checkpointing=True)
    input_ids, attention_mask, labels = make_batch(policy.config.vocab_size)
    policy.train()
    sums, _ = sequence_logprobs(policy, input_ids, attention_mask, labels)
    sums.sum().backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------------ the step module


def as_batch(input_ids, attention_mask, labels) -> dict[str, torch.Tensor]:
    # the keys a collated batch has besides these three are ignored
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "index": torch.arange(input_ids.shape[0])}


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_step_module_forward_is_sequence_logprobs_and_matches_full_logits(tmp_path, arch):
    model = load_base_model(ModelConfig(path=str(build_tiny_model(tmp_path / arch, arch)))).eval()
    input_ids, attention_mask, labels = make_batch(model.config.vocab_size)
    settings = LogprobSettings(impl="torch", chunk_size=4)
    with torch.no_grad():
        sums, counts = SequenceLogprobs(model, settings)(as_batch(input_ids, attention_mask, labels))
        direct_sums, direct_counts = sequence_logprobs(model, input_ids, attention_mask, labels, settings)
    assert torch.equal(sums, direct_sums) and torch.equal(counts, direct_counts)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64 and counts.tolist() == [6, 6, 3]
    expected = full_logits_reference(model, input_ids, attention_mask, labels)
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=1e-4)


def test_gradients_reach_lora_parameters_through_the_step_module(tmp_path):
    policy = add_lora(load_base_model(ModelConfig(path=str(build_tiny_model(tmp_path / "m")))), LoraConfig(r=4))
    step = SequenceLogprobs(policy)
    step.eval()
    assert not policy.training  # the mode reaches the wrapped model
    step.train()
    assert policy.training
    sums, _ = step(as_batch(*make_batch(policy.config.vocab_size)))
    sums.sum().backward()
    grads = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_step_module_parameters_are_the_wrapped_models(tmp_path):
    policy = add_lora(load_base_model(ModelConfig(path=str(build_tiny_model(tmp_path / "m")))), LoraConfig(r=4))
    step = SequenceLogprobs(policy)
    assert [id(p) for p in step.parameters()] == [id(p) for p in policy.parameters()]
    own = [name for name, _ in policy.named_parameters()]
    assert [name for name, _ in step.named_parameters()] == [f"model.{name}" for name in own]
    assert all(name.startswith("base_model.model.") for name in own)  # what optimizer state and checkpoints use
