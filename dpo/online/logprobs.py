"""Per-token log-probs and values of sampled completions, laid out ``[R, L]`` as :mod:`dpo.online.objectives`
expects.

Log-probs go the way the training step's do (:func:`dpo.model.sequence_logprobs`): the trunk's final hidden
states at the positions that predict completion tokens, then the fused kernel :func:`dpo.kernels.token_logprobs`
with the LM head's weight, never the ``[tokens, vocab]`` logits; only the per-token values are kept instead of
their sum. A sampling temperature T divides the hidden states (so the logits) before the kernel: the
log-probs are those of the distribution sampled from.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpo.data import IGNORE_INDEX
from dpo.kernels import token_logprobs
from dpo.model import LogprobSettings, causal_lm, final_logit_softcap, trunk

VALUE_HEAD = "value_head"  # the value model's head, a module added to the causal LM (see dpo.online.roles)


def _completion_hidden(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(hidden [M, H], targets [M], selected [R, T-1])``: the hidden states predicting each completion token."""
    hidden = trunk(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    return hidden[:, :-1][selected], targets[selected], selected


def left_aligned(flat: Tensor, selected: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token values of each row (row-major, as ``selected`` picks them) as ``([R, L], mask [R, L])``,
    ``L`` the most tokens of a row; 0 off the mask. Differentiable in ``flat``."""
    counts = selected.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    mask = torch.arange(width, device=flat.device)[None, :] < counts[:, None]
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    return out.masked_scatter(mask, flat), mask


def completion_logprobs(model: nn.Module, batch: dict[str, Tensor], settings: LogprobSettings = LogprobSettings(),
                        temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Log-prob of each completion token under ``model`` (its active adapter) at ``temperature``.

    Args:
        model: a causal LM or peft model.
        batch: ``input_ids``, ``attention_mask``, ``labels`` ``[R, T]`` (right-padded; labels -100 off the
            completion, see :func:`dpo.data.collate.pad_sequences`).
        settings: kernel choice and chunking.
        temperature: T > 0; the logits are divided by it.

    Returns:
        ``(logps [R, L] float32, mask [R, L] bool)``, completion tokens left-aligned.
    """
    hidden, targets, selected = _completion_hidden(model, batch)
    softcap = final_logit_softcap(model)
    if temperature != 1.0:
        if softcap is not None:
            raise ValueError("online.generation.temperature: a model with a final-logit softcap samples at "
                             "temperature 1 only here (the cap is applied before the temperature)")
        hidden = hidden / temperature
    head = causal_lm(model).get_output_embeddings()
    per_token = token_logprobs(hidden, head.weight, targets, softcap=softcap, impl=settings.impl,
                               chunk_size=settings.chunk_size)
    return left_aligned(per_token, selected)


def completion_values(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The value head on the hidden state of each state that precedes a completion token: ``[R, L]`` float32,
    aligned with :func:`completion_logprobs` (``model``'s active adapter should be the value model's)."""
    hidden, _, selected = _completion_hidden(model, batch)
    head = getattr(causal_lm(model), VALUE_HEAD)
    return left_aligned(head(hidden.float()).squeeze(-1), selected)[0]
