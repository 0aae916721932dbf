"""Per-sequence log-probs of a causal LM, and the training step's forward as a module.

The forward never builds ``[tokens, vocab]`` logits: the trunk returns final hidden states, and
:func:`dpo.kernels.token_logprobs` turns the hidden states at completion positions plus the LM head's
weight into log-probs of the targets (:class:`LogprobHead`). :class:`SequenceLogprobs` is that computation as an
``nn.Module`` whose ``forward(batch)`` the training step, evaluation and the reference precompute call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpo.kernels import token_logprobs
from dpo.model.load import causal_lm

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LogprobSettings:
    """How per-token log-probs are computed: which kernel, and how many tokens a chunk.

    Not part of the reference cache's key: every implementation computes the same function.
    """

    impl: str = "auto"
    chunk_size: int | None = None


def trunk(model: nn.Module) -> nn.Module:
    """The decoder stack that returns final (normed) hidden states, e.g. ``LlamaModel``."""
    lm = causal_lm(model)
    return getattr(lm, lm.base_model_prefix)


def final_logit_softcap(model: nn.Module) -> float | None:
    """Gemma-2 style ``cap * tanh(z / cap)`` on the logits, if the model uses it."""
    cap = getattr(causal_lm(model).config, "final_logit_softcapping", None)
    return float(cap) if cap else None


class LogprobHead(nn.Module):
    """The frozen LM head as the log-prob kernel: ``forward(hidden [N, H], targets [N]) -> [N]`` float32.

    The kernel reads the head's whole ``[V, H]`` weight, never the head's own forward. Calling it through a
    module of its own lets an engine that shards parameters (FSDP) treat the head as one more unit: the full
    weight is gathered around this forward (and again for its backward) and freed after it, as a decoder
    layer's are, instead of staying gathered for the whole step.

    Args:
        head: the model's output embedding (``get_output_embeddings()``), registered here as a child, so its
            weight is this module's parameter too (the same tensor, listed once by ``parameters()``).
        softcap: Gemma-2 style final-logit softcap, or None.
        settings: kernel choice and chunking.
    """

    def __init__(self, head: nn.Module, softcap: float | None = None, settings: LogprobSettings = LogprobSettings()):
        super().__init__()
        self.head = head
        self.softcap = softcap
        self.settings = settings

    def forward(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Log-probs of ``targets [N]`` under ``softmax(hidden [N, H] @ weight.T)``, float32 ``[N]``."""
        return token_logprobs(hidden, self.head.weight, targets, softcap=self.softcap, impl=self.settings.impl,
                              chunk_size=self.settings.chunk_size)


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    settings: LogprobSettings = LogprobSettings(),
    head: LogprobHead | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the labelled tokens of each row.

    Position ``t`` predicts token ``t + 1``; only positions whose next label is not -100 reach the kernel.

    Args:
        model: the policy (peft-wrapped or plain causal LM).
        input_ids: ``[R, T]`` token ids.
        attention_mask: ``[R, T]``, 1 on real tokens.
        labels: ``[R, T]``, the token id on completion positions, -100 elsewhere.
        settings: kernel choice and chunking.
        head: the model's head as a :class:`LogprobHead` (the step module's own); None builds one here.

    Returns:
        ``(logps [R] float32, token_counts [R] int64)``.
    """
    hidden = trunk(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    rows = selected.nonzero(as_tuple=True)[0]
    if head is None:
        head = LogprobHead(causal_lm(model).get_output_embeddings(), final_logit_softcap(model), settings)
    per_token = head(hidden[:, :-1][selected], targets[selected])
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, per_token)
    return sums, selected.sum(dim=1)


class SequenceLogprobs(nn.Module):
    """The log-prob path as one module: ``forward(batch) -> (logps [R] float32, token_counts [R] int64)``.

    :func:`sequence_logprobs` calls the trunk and the kernels directly, never the wrapped model's own
    forward, so hooks registered on that model (an engine such as DDP, FSDP or DeepSpeed wraps a module and
    works through its forward) would not see a step. This module's forward is that step: the training
    step, evaluation and the reference precompute all go through it, so it is the object such an engine
    wraps (``accelerator.prepare``).

    Its parameters are the wrapped model's (``parameters()`` yields the same tensors), named with the
    prefix ``model.``; optimizer state and checkpoints name them by the wrapped model's own
    ``named_parameters()``. ``train()`` / ``eval()`` set the wrapped model's mode too. The LM head is also
    reachable as ``head`` (a :class:`LogprobHead`), whose forward is the kernel call.

    What FSDP's transformer auto-wrap reads (``_no_split_modules``, ``get_input_embeddings``) is forwarded
    from the wrapped model, so each decoder block, the input embedding and the head become units of their
    own. A head tied to the input embedding (one tensor) stays with the root unit, which gathers it for the
    whole forward and backward.

    Args:
        model: the policy (peft-wrapped or plain causal LM), or a reference network.
        settings: kernel choice and chunking.
    """

    def __init__(self, model: nn.Module, settings: LogprobSettings = LogprobSettings()):
        super().__init__()
        self.model = model
        self.settings = settings
        self.head = LogprobHead(causal_lm(model).get_output_embeddings(), final_logit_softcap(model), settings)

    @property
    def tied_head(self) -> bool:
        """The LM head and the input embedding are one tensor."""
        lm = causal_lm(self.model)
        return lm.get_output_embeddings().weight is lm.get_input_embeddings().weight

    @property
    def _no_split_modules(self) -> list[str]:
        """Classes an FSDP transformer auto-wrap shards as units: the model's blocks, and the head unless tied."""
        blocks = list(getattr(causal_lm(self.model), "_no_split_modules", None) or [])
        return blocks if self.tied_head else [*blocks, type(self.head).__name__]

    def get_input_embeddings(self) -> nn.Module | None:
        """The input embedding for an engine to shard as its own unit (None when tied to the head)."""
        return None if self.tied_head else causal_lm(self.model).get_input_embeddings()

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed log-probs of each row's labelled tokens, and how many there are.

        Args:
            batch: ``input_ids [R, T]``, ``attention_mask [R, T]`` (1 on real tokens) and ``labels [R, T]``
                (the token id on completion positions, -100 elsewhere); other keys are ignored.

        Returns:
            ``(logps [R] float32, token_counts [R] int64)``.
        """
        return sequence_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                 self.settings, self.head)
