"""What the training loop trains, per task: model, data, step module and loss, built once per run.

A task's setup function turns the recipe into a :class:`TrainSetup`; the loop (:mod:`dpo.train.loop`)
reads nothing else. ``preference`` (the DPO family): data, the policy with a fresh adapter wrapped in the
step module, reference log-probs computed once before training, and the registered loss, whose flags
(needs a reference? paired?) it reads, never its name. ``reward``: a Bradley–Terry reward model
(:mod:`dpo.reward`), no reference pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from dpo.data import collate_paired, collate_unpaired, kto_balance_warning, prepare_data
from dpo.losses import LossOutput, LossSpec, PairedLogps, UnpairedLogps, get_loss
from dpo.model import LogprobSettings, SequenceLogprobs, add_lora, load_base_model, load_tokenizer
from dpo.recipe import Recipe
from dpo.reference import ReferenceLogps
from dpo.reference import reference_logps as cached_reference_logps
from dpo.train.checkpoint import tensor_fingerprint
from dpo.train.guards import logprob_metrics

Log = Callable[[str], None]


@dataclass
class TrainSetup:
    """What the loop trains and how it scores a batch; built once per run by the task's setup function.

    Attributes:
        model: the trainable model (a peft model; only adapter parameters require grad). The optimizer and
            checkpoints name its parameters by its own ``named_parameters()``; it is saved as the adapter.
        step_module: the module the loop runs (train and eval mode, the model handed to ``loss_fn``): its
            forward computes what the loss needs from a batch, through ``model``'s parameters. For the
            preference losses a :class:`dpo.model.SequenceLogprobs` around ``model``; for a reward model the
            model itself.
        tokenizer: saved beside the adapter.
        train_rows: tokenized training examples.
        eval_rows: tokenized held-out examples.
        eval_prompts: the held-out prompts as the data holds them (text or messages), in order; the
            loop answers the first few greedily at each evaluation (none for a reward model).
        collate: list of rows -> batch of tensors.
        loss_fn: ``(step_module, batch, split) -> LossOutput``; ``split`` is "train" or "eval" (which rows'
            precomputed values to look up).
        headline: metric printed before and after training, with its label.
        drop_last: whether the last short training batch is dropped (losses whose estimate needs full batches).
        fingerprints: content hashes of what the run was built from (tokenized data, reference log-probs);
            a checkpoint records them and a resume must match them.
    """

    model: torch.nn.Module
    step_module: torch.nn.Module
    tokenizer: object
    train_rows: object
    eval_rows: object
    eval_prompts: list
    collate: Callable[[list[dict]], dict[str, Tensor]]
    loss_fn: Callable[[torch.nn.Module, dict[str, Tensor], str], LossOutput]
    headline: tuple[str, str] = ("rewards/accuracies", "held-out preference accuracy")
    drop_last: bool = False
    fingerprints: dict[str, str] = field(default_factory=dict)


def preference_setup(recipe: Recipe, device, log: Log) -> TrainSetup:
    """DPO-family training: data, policy with a fresh adapter, reference log-probs, registered loss."""
    cfg = recipe.train
    spec = get_loss(recipe.loss.name)
    options = recipe.loss.options()
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, unpaired=not spec.paired, seed=cfg.seed, log=log)
    if len(data.train) == 0:
        raise ValueError(f"data.train: no usable training examples in {recipe.data.train}")
    if not spec.paired:
        labels = data.train["label"]
        warning = kto_balance_warning(sum(labels), len(labels) - sum(labels),
                                      options["desirable_weight"], options["undesirable_weight"])
        if warning:
            log(f"warning: {warning}")
    collate = partial(collate_paired if spec.paired else collate_unpaired, pad_token_id=tokenizer.pad_token_id)
    base = load_base_model(recipe.model, device=device)
    policy = add_lora(base, recipe.lora, recipe.model.gradient_checkpointing)
    settings = LogprobSettings(cfg.logprob_impl, cfg.logprob_chunk_size)
    # Reference log-probs, once, before any training step; the step only looks them up.
    reference_train = reference_eval = None
    if spec.needs_reference:
        reference_train, reference_eval = compute_references(recipe, policy, data, collate, settings, device, log)

    references = {"train": reference_train, "eval": reference_eval}
    fingerprints = {"data.train": data.train_fingerprint, "data.eval": data.eval_fingerprint}
    for split, values in references.items():
        if values is not None:
            fingerprints[f"reference.{split}"] = tensor_fingerprint(values.first, values.second,
                                                                    values.first_tokens, values.second_tokens)

    # The default reference is the policy's own starting point (the base with the fresh adapter off), so
    # policy minus reference log-probs are the change since the start (see dpo.train.guards).
    starts_at_reference = recipe.reference.model_path is None and recipe.reference.adapter is None

    def loss_fn(logprobs, batch, split):
        return batch_loss(logprobs, batch, spec, options, references[split], starts_at_reference)

    headline = (("rewards/accuracies", "held-out preference accuracy") if spec.paired
                else ("rewards/gap", "held-out reward gap, desirable minus undesirable"))
    return TrainSetup(policy, SequenceLogprobs(policy, settings), tokenizer, data.train, data.eval, data.eval_prompts,
                      collate, loss_fn, headline, drop_last=not spec.paired, fingerprints=fingerprints)


def reward_setup(recipe: Recipe, device, log: Log) -> TrainSetup:
    """Bradley–Terry reward model on the same pairs (see :mod:`dpo.reward`); no reference pass."""
    from dpo.reward import reward_parts

    parts = reward_parts(recipe, device, log)
    return TrainSetup(parts.model, parts.model, parts.tokenizer, parts.train_rows, parts.eval_rows, [],
                      parts.collate, parts.loss_fn, headline=("rewards/accuracies", "held-out reward-model accuracy"),
                      fingerprints=parts.fingerprints)


def split_logps(first: Tensor, second: Tensor, first_tokens: Tensor, second_tokens: Tensor,
                batch: dict[str, Tensor], spec: LossSpec) -> PairedLogps | UnpairedLogps:
    """Arrange per-row values of a ``2B``-row batch as the loss's input type."""
    if spec.paired:
        return PairedLogps(first, second, first_tokens, second_tokens)
    return UnpairedLogps(first, first_tokens, second, second_tokens, batch["label"])


def batch_loss(logprobs: SequenceLogprobs, batch: dict[str, Tensor], spec: LossSpec, options: dict[str, float],
               reference: ReferenceLogps | None, starts_at_reference: bool = False) -> LossOutput:
    """Policy log-probs for one collated batch (through the step module), looked-up reference values, and the
    registered loss, whose metrics get the guards' log-prob values (:func:`dpo.train.guards.logprob_metrics`;
    the change since the start when ``starts_at_reference``: the reference is the starting policy)."""
    sums, counts = logprobs(batch)
    b = batch["index"].shape[0]
    counts = counts.float()
    policy_logps = split_logps(sums[:b], sums[b:], counts[:b], counts[b:], batch, spec)
    reference_logps = None
    if reference is not None:
        ref_first, ref_second = reference.lookup(batch["index"])
        reference_logps = split_logps(ref_first, ref_second, counts[:b], counts[b:], batch, spec)
    out = spec.compute(policy_logps, reference_logps, options)
    out.metrics.update(logprob_metrics(policy_logps, reference_logps if starts_at_reference else None))
    return out


def compute_references(recipe: Recipe, policy, data, collate, settings: LogprobSettings,
                       device, log: Log) -> tuple[ReferenceLogps, ReferenceLogps]:
    """Reference log-probs for both splits through the on-disk cache (``dpo.reference.setup``): read on a
    hit, without loading or running anything; computed on a miss by a separate model if the recipe names
    one (loaded only meanwhile), else by the policy's base with the adapter disabled."""
    return cached_reference_logps(recipe, data, collate, settings, device, log, policy=policy)
