"""Sampling completions from a policy, with the policy's per-token entropy along the way.

Prompts are tokenized as training prompts are (one BOS, the chat template's generation prompt, the prompt
cut to ``max_prompt_length`` keeping its end). Batches are left-padded so that every row's next token
follows its prompt directly. The entropy of each step comes from the raw logits the model produced at that
step (``[rows, V]``, before temperature and top-p), so it is the policy's own entropy, not the sampler's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from dpo.data.chat import render
from dpo.data.tokenize import cut_prompt, special_tokens, with_single_bos


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn. ``temperature: 0`` is greedy decoding (top-p is then unused)."""

    max_new_tokens: int
    temperature: float
    top_p: float
    samples_per_prompt: int
    seed: int
    batch_size: int


@dataclass
class Samples:
    """Completions of one policy, ``samples_per_prompt`` per prompt, prompt-major order.

    Attributes:
        prompt_index: ``[S]`` the prompt each sample answers.
        completion_ids: ``[S]`` generated token ids, ending with EOS when the model emitted one.
        ended: ``[S]`` whether the model emitted EOS within ``max_new_tokens``.
        entropy_sum: ``[S]`` sum over the completion's tokens (EOS included) of the policy's entropy, in nats.
    """

    prompt_index: list[int] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    entropy_sum: list[float] = field(default_factory=list)


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]], template: str | None,
                  max_prompt_length: int) -> list[int]:
    """Token ids of one prompt, as the data module tokenizes training prompts."""
    if isinstance(prompt, list):
        if template is None:
            raise ValueError("chat prompts need a chat template (the tokenizer has none)")
        text = render(tokenizer, template, prompt, generation_prompt=True)
    else:
        text = prompt
    bos_id = special_tokens(tokenizer).bos_id
    ids = with_single_bos(tokenizer(text, add_special_tokens=False)["input_ids"], bos_id)
    return cut_prompt(ids, max_prompt_length, "keep_end", bos_id)


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """``(input_ids [N, T], attention_mask [N, T])`` with padding on the left."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[i, width - len(prompt):] = 1
    return input_ids, attention_mask


def step_entropy(logits: Tensor) -> Tensor:
    """``[N]`` entropy (nats) of ``softmax(logits)`` for ``logits [N, V]``, in float32."""
    logits = logits.float()
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def completion_text(ids: list[int], decode, eos_id: int) -> str:
    """The completion as text, without its EOS (``decode``: the tokenizer's, skipping special tokens)."""
    return decode(ids[:-1] if ids and ids[-1] == eos_id else ids)


def cut_at_eos(ids: list[int], eos_id: int) -> tuple[list[int], bool]:
    """The ids up to and including the first EOS, and whether there was one."""
    if eos_id in ids:
        return ids[: ids.index(eos_id) + 1], True
    return ids, False


@torch.no_grad()
def sample_completions(model, tokenizer: Any, prompts: list[list[int]], settings: SamplingSettings,
                       device) -> Samples:
    """Draw ``samples_per_prompt`` completions for every prompt.

    The global torch generator is seeded with ``settings.seed`` first, so the same model, prompts and
    settings give the same samples; every policy of a comparison draws with the same seed.

    Args:
        model: a causal LM, or a peft model (its adapter is active while generating).
        tokenizer: the model's tokenizer (EOS and pad ids).
        prompts: token ids of each prompt (see :func:`encode_prompt`).
        settings: sampling settings.
        device: where the model is.
    """
    from transformers import GenerationConfig

    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    greedy = settings.temperature == 0
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens, do_sample=not greedy,
        temperature=None if greedy else settings.temperature, top_p=None if greedy else settings.top_p,
        top_k=None if greedy else 0, eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
        output_logits=True, return_dict_in_generate=True,
    )
    was_training = model.training
    model.eval()
    torch.manual_seed(settings.seed)
    rows = [i for i in range(len(prompts)) for _ in range(settings.samples_per_prompt)]
    samples = Samples()
    for start in range(0, len(rows), settings.batch_size):
        chunk = rows[start : start + settings.batch_size]
        input_ids, attention_mask = left_pad([prompts[i] for i in chunk], pad_id)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config)
        generated = out.sequences[:, input_ids.shape[1]:].cpu()
        entropies = torch.stack([step_entropy(step) for step in out.logits], dim=1).cpu()  # [N, steps]
        for row, prompt_index in enumerate(chunk):
            ids, ended = cut_at_eos(generated[row].tolist(), eos_id)
            samples.prompt_index.append(prompt_index)
            samples.completion_ids.append(ids)
            samples.ended.append(ended)
            samples.entropy_sum.append(float(entropies[row, : len(ids)].sum()))
    model.train(was_training)
    return samples
