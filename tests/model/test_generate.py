"""Sampling: prompts tokenized as training prompts are, left padding, seeds, and the policy's entropy."""

from __future__ import annotations

import math

import pytest
import torch

from dpo.data.tokenize import RowTokenizer
from dpo.model import load_base_model, load_tokenizer
from dpo.model.generate import (
    SamplingSettings,
    completion_text,
    cut_at_eos,
    encode_prompt,
    left_pad,
    sample_completions,
    step_entropy,
)
from dpo.quickstart import CHAT_TEMPLATE
from dpo.recipe import ModelConfig
from tests.helpers import build_tiny_model

PROMPTS = ["Is 12 even or odd? Answer:", "What is 7 mod 5? Answer:", "What is the last digit of 875? Answer:"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("model"))
    config = ModelConfig(path=str(path))
    return load_base_model(config).eval(), load_tokenizer(config)


def test_prompts_are_tokenized_as_training_prompts(tiny):
    _, tokenizer = tiny
    training = RowTokenizer(tokenizer, sides=("completion",), chat_template=CHAT_TEMPLATE, template_label="t",
                            max_length=128, max_prompt_length=100, truncation="keep_end", source="s", unit="line")
    text = PROMPTS[0]
    chat = [{"role": "user", "content": text}]
    for prompt in (text, chat):
        expected = training({"number": [1], "prompt": [prompt], "completion": [" even" if prompt is text else
                                                                             [{"role": "assistant", "content": "even"}]]})
        assert encode_prompt(tokenizer, prompt, CHAT_TEMPLATE, 100) == expected["prompt_ids"][0]
    ids = encode_prompt(tokenizer, text, None, 48)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id not in ids
    # keep_end: BOS, then the last 4 characters
    assert encode_prompt(tokenizer, text, None, 5) == [tokenizer.bos_token_id, *tokenizer("wer:", add_special_tokens=False)["input_ids"]]


def test_left_padding_by_hand():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_step_entropy_by_hand():
    # probabilities 1/4, 1/4, 1/2: H = 2·(1/4)·log 4 + (1/2)·log 2 = 1.5·log 2
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)], [3.0, 3.0, 3.0]])
    assert step_entropy(logits).tolist() == pytest.approx([1.5 * math.log(2.0), math.log(3.0)])


def test_cut_at_eos_and_text():
    assert cut_at_eos([5, 6, 2, 0, 0], eos_id=2) == ([5, 6, 2], True)
    assert cut_at_eos([5, 6, 7], eos_id=2) == ([5, 6, 7], False)
    assert completion_text([40, 41, 2], lambda ids: ",".join(map(str, ids)), eos_id=2) == "40,41"


def test_batched_greedy_decoding_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = [encode_prompt(tokenizer, p, None, 48) for p in PROMPTS]
    greedy = SamplingSettings(max_new_tokens=6, temperature=0.0, top_p=1.0, samples_per_prompt=1, seed=0,
                              batch_size=8)
    batched = sample_completions(model, tokenizer, prompts, greedy, "cpu")
    alone = [sample_completions(model, tokenizer, [p], greedy, "cpu").completion_ids[0] for p in prompts]
    assert batched.completion_ids == alone
    assert batched.prompt_index == [0, 1, 2]


def test_seed_fixes_the_samples(tiny):
    model, tokenizer = tiny
    prompts = [encode_prompt(tokenizer, p, None, 48) for p in PROMPTS]
    settings = SamplingSettings(max_new_tokens=5, temperature=1.0, top_p=0.9, samples_per_prompt=3, seed=7,
                                batch_size=4)
    first = sample_completions(model, tokenizer, prompts, settings, "cpu")
    again = sample_completions(model, tokenizer, prompts, settings, "cpu")
    other = sample_completions(model, tokenizer, prompts,
                               SamplingSettings(**{**settings.__dict__, "seed": 8}), "cpu")
    assert first.completion_ids == again.completion_ids and first.entropy_sum == again.entropy_sum
    assert first.completion_ids != other.completion_ids
    assert first.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_entropy_is_the_policys_own_at_each_sampled_position(tiny):
    model, tokenizer = tiny
    prompts = [encode_prompt(tokenizer, p, None, 48) for p in PROMPTS]
    # temperature 2 and top-p 0.5 change what is drawn, not the entropy reported: it comes from the raw logits
    settings = SamplingSettings(max_new_tokens=4, temperature=2.0, top_p=0.5, samples_per_prompt=2, seed=0,
                                batch_size=6)
    samples = sample_completions(model, tokenizer, prompts, settings, "cpu")
    model64 = model.to(torch.float64)
    try:
        for prompt_index, ids, entropy in zip(samples.prompt_index, samples.completion_ids, samples.entropy_sum):
            sequence = torch.tensor([prompts[prompt_index] + ids])
            with torch.no_grad():
                logits = model64(input_ids=sequence).logits[0]
            start = len(prompts[prompt_index]) - 1  # the position that predicts the first completion token
            positions = logits[start : start + len(ids)]
            expected = -(positions.softmax(-1) * positions.log_softmax(-1)).sum().item()
            assert entropy == pytest.approx(expected, rel=1e-4)
    finally:
        model.to(torch.float32)
