"""Per-sequence log-probs of a causal LM, and the training step's forward as a module.

The forward never builds ``[tokens, vocab]`` logits: the trunk returns final hidden states, and
:func:`dpo.kernels.token_logprobs` turns the hidden states at completion positions plus the LM head's
weight into log-probs of the targets. :class:`SequenceLogprobs` is that computation as an ``nn.Module``
whose ``forward(batch)`` the training step, evaluation and the reference precompute call, on padded batches
(:func:`sequence_logprobs`) or packed, prefix-shared ones (:func:`packed_sequence_logprobs`, see
:mod:`dpo.model.packing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpo.data.pack import is_packed, unpack_to_padded
from dpo.kernels import token_logprobs
from dpo.model.load import causal_lm
from dpo.model.packing import PackedAttention, packed_hidden_states

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


def sequence_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    settings: LogprobSettings = LogprobSettings(),
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of the labelled tokens of each row.

    Position ``t`` predicts token ``t + 1``; only positions whose next label is not -100 reach the kernel.

    Args:
        model: the policy (peft-wrapped or plain causal LM).
        input_ids: ``[R, T]`` token ids.
        attention_mask: ``[R, T]``, 1 on real tokens.
        labels: ``[R, T]``, the token id on completion positions, -100 elsewhere.
        settings: kernel choice and chunking.

    Returns:
        ``(logps [R] float32, token_counts [R] int64)``.
    """
    hidden = trunk(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    rows = selected.nonzero(as_tuple=True)[0]
    head = causal_lm(model).get_output_embeddings()
    per_token = token_logprobs(
        hidden[:, :-1][selected],
        head.weight,
        targets[selected],
        softcap=final_logit_softcap(model),
        impl=settings.impl,
        chunk_size=settings.chunk_size,
    )
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device).index_add(0, rows, per_token)
    return sums, selected.sum(dim=1)


def packed_sequence_logprobs(
    model: nn.Module,
    batch: dict[str, Tensor],
    attention: PackedAttention,
    settings: LogprobSettings = LogprobSettings(),
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each sequence of a packed batch (:mod:`dpo.data.pack`), the padded path's function.

    The trunk runs once over the packed rows; the hidden states at ``target_sources`` (the last prompt token
    predicts the first token of both sides) go to the kernel with ``target_ids``, and each result is added to
    its sequence ``target_sequences``. No ``[tokens, vocab]`` logits are built.

    Args:
        model: the policy (peft-wrapped or plain causal LM).
        batch: a packed batch: ``input_ids``, ``position_ids``, ``segment_ids``, ``branch_ids`` [R, W];
            ``target_ids``, ``target_sources``, ``target_sequences`` [N]; ``sequence_lengths`` [S].
        attention: how the model takes the packed mask (:func:`dpo.model.packing.plan_packing`).
        settings: kernel choice and chunking.

    Returns:
        ``(logps [S] float32, token_counts [S] int64)``, sequences numbered as the padded layout's rows.
    """
    hidden = packed_hidden_states(model, batch, attention)
    flat = hidden.reshape(-1, hidden.shape[-1])
    head = causal_lm(model).get_output_embeddings()
    per_token = token_logprobs(
        flat.index_select(0, batch["target_sources"]),
        head.weight,
        batch["target_ids"],
        softcap=final_logit_softcap(model),
        impl=settings.impl,
        chunk_size=settings.chunk_size,
    )
    owners = batch["target_sequences"]
    count = batch["sequence_lengths"].shape[0]
    sums = torch.zeros(count, dtype=torch.float32, device=owners.device).index_add(0, owners, per_token)
    return sums, torch.bincount(owners, minlength=count)


class SequenceLogprobs(nn.Module):
    """The log-prob path as one module: ``forward(batch) -> (logps [R] float32, token_counts [R] int64)``.

    :func:`sequence_logprobs` calls the trunk and the kernels directly, never the wrapped model's own
    forward, so hooks registered on that model (an engine such as DDP, FSDP or DeepSpeed wraps a module and
    works through its forward) would not see a step. This module's forward is that step: the training
    step, evaluation and the reference precompute all go through it, so it is the object such an engine
    wraps (``accelerator.prepare``).

    Its parameters are the wrapped model's (``parameters()`` yields the same tensors), named with the
    prefix ``model.``; optimizer state and checkpoints name them by the wrapped model's own
    ``named_parameters()``. ``train()`` / ``eval()`` set the wrapped model's mode too.

    A packed batch runs through the packed path when ``packing`` says how the model takes it; a network
    that cannot (``packing`` None) gets the same sequences re-laid as a padded batch.

    Under FSDP: what its transformer auto-wrap reads is forwarded from the wrapped model
    (``_no_split_modules``: each decoder block becomes a unit; ``get_input_embeddings``: so does the input
    embedding). The LM head stays in this module's own (root) unit, because the kernel reads its whole
    ``[V, H]`` weight without calling the head's forward: the root's hooks gather it when this forward starts
    and free it after the backward, so during a step every process holds the full head (``V * H`` values in
    the model's dtype). A head tied to the input embedding keeps the embedding there too.

    Args:
        model: the policy (peft-wrapped or plain causal LM), or a reference network.
        settings: kernel choice and chunking.
        packing: how the model takes packed batches (:func:`dpo.model.packing.resolve_packing`), or None.
    """

    def __init__(self, model: nn.Module, settings: LogprobSettings = LogprobSettings(),
                 packing: PackedAttention | None = None):
        super().__init__()
        self.model = model
        self.settings = settings
        self.packing = packing

    @property
    def _no_split_modules(self) -> list[str]:
        """The model's block classes (e.g. ``LlamaDecoderLayer``), for an FSDP transformer auto-wrap."""
        return list(getattr(causal_lm(self.model), "_no_split_modules", None) or [])

    def get_input_embeddings(self) -> nn.Module | None:
        """The input embedding, for an engine to shard as a unit of its own (None when the head shares it)."""
        lm = causal_lm(self.model)
        embedding = lm.get_input_embeddings()
        return None if lm.get_output_embeddings().weight is embedding.weight else embedding

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Summed log-probs of each row's labelled tokens, and how many there are.

        Args:
            batch: padded: ``input_ids [R, T]``, ``attention_mask [R, T]`` (1 on real tokens) and ``labels [R, T]``
                (the token id on completion positions, -100 elsewhere); or packed (see
                :func:`packed_sequence_logprobs`). Other keys are ignored.

        Returns:
            ``(logps [R] float32, token_counts [R] int64)``, one per sequence.
        """
        if is_packed(batch):
            if self.packing is not None:
                return packed_sequence_logprobs(self.model, batch, self.packing, self.settings)
            batch = unpack_to_padded(batch)
        return sequence_logprobs(self.model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                 self.settings)
