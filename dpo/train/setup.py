"""What the training loop trains, per task: model, data, step module, loss and batch source, built once per run.

A task's setup function (:data:`SETUPS`, by the recipe's ``task``) turns the recipe into a
:class:`TrainSetup`; the loop (:mod:`dpo.train.loop`) reads nothing else. ``preference`` (the DPO family):
data, the policy with a fresh adapter wrapped in the step module, reference log-probs computed once before
training (by the loop, through :attr:`TrainSetup.references`, once an engine has prepared the step module),
and the registered loss, whose flags (needs a reference? paired?) it reads, never its name. ``reward``: a
Bradley–Terry reward model (:mod:`dpo.reward`), no reference pass. ``sft``: the same step module, the
completion's negative log-prob per token. ``ppo`` and ``rloo``: online RL (:mod:`dpo.online`), whose batch
source samples a rollout at the start of each of the loop's epochs.

The batch source is what makes one loop serve both: the offline tasks' :class:`RowBatches` cuts shuffled
training rows into micro-batches; an online task's source runs its rollout phase and hands back that
rollout's micro-batches. The loop asks each only for an epoch's micro-batches, their count, and (for
checkpoints) the tensors it must keep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from torch import Tensor

from dpo.data import choose_collate, kto_balance_warning, prepare_data
from dpo.data.collate import collate_completions
from dpo.losses import LossOutput, LossSpec, PairedLogps, UnpairedLogps, get_loss
from dpo.model import (
    LogprobSettings,
    PackedAttention,
    SequenceLogprobs,
    add_lora,
    load_base_model,
    load_tokenizer,
    resolve_packing,
)
from dpo.recipe import Recipe
from dpo.reference import Processes, ReferenceLogps
from dpo.reference import reference_logps as cached_reference_logps
from dpo.train.checkpoint import tensor_fingerprint
from dpo.train.guards import logprob_metrics
from dpo.train.parallel import shard
from dpo.train.plan import count_micro_batches

Log = Callable[[str], None]


class BatchSource(Protocol):
    """Where the loop's micro-batches come from (see the module docstring)."""

    def micro_batches(self, batch_size: int, world: int, log: Log) -> int:
        """Micro-batches of one epoch over all processes (refusing a setting that leaves a process none)."""

    def epochs(self, epochs: int) -> int:
        """The loop's epochs in ``train.epochs`` (an online task's: rollouts)."""

    def epoch(self, number: int, rank: int, world: int) -> Sequence[dict[str, Tensor]]:
        """Process ``rank``'s micro-batches of epoch ``number``, collated."""

    def state(self) -> dict[str, Tensor]:
        """Tensors a checkpoint keeps so that a resumed run gets the same batches (empty when the epoch
        number and position are enough)."""

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Continue from :meth:`state`'s tensors."""

    def summary(self) -> dict[str, Any]:
        """What ``final_metrics.json`` adds about the batches (an online task's budget)."""


def epoch_batches(num_rows: int, batch_size: int, seed: int, epoch: int, drop_last: bool) -> list[list[int]]:
    """Row positions of every micro-batch of one epoch, in order.

    The shuffle depends only on ``(seed, epoch)``, so a resumed run rebuilds the order from its
    checkpointed position instead of replaying a data loader's hidden state.
    """
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    batches = [order[i : i + batch_size] for i in range(0, num_rows, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


class CollatedBatches(Sequence):
    """Micro-batches of row positions, collated when taken."""

    def __init__(self, rows, positions: list[list[int]], collate: Callable[[list[dict]], dict[str, Tensor]]):
        self.rows, self.positions, self.collate = rows, positions, collate

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.collate([self.rows[i] for i in self.positions[index]])


@dataclass
class RowBatches:
    """The offline tasks' batch source: each epoch a shuffle of the training rows (by ``(seed, epoch)``), cut
    into micro-batches of ``batch_size`` and dealt round robin to the processes."""

    rows: Any
    collate: Callable[[list[dict]], dict[str, Tensor]]
    batch_size: int
    seed: int
    drop_last: bool = False

    def micro_batches(self, batch_size: int, world: int, log: Log) -> int:
        return count_micro_batches(len(self.rows), batch_size, drop_last=self.drop_last, world=world)

    def epochs(self, epochs: int) -> int:
        return epochs

    def epoch(self, number: int, rank: int, world: int) -> CollatedBatches:
        positions = epoch_batches(len(self.rows), self.batch_size, self.seed, number, self.drop_last)
        return CollatedBatches(self.rows, shard(positions, rank, world, whole_rounds=True), self.collate)

    def state(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, state: dict[str, Tensor]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {}


@dataclass
class TrainSetup:
    """What the loop trains and how it scores a batch; built once per run by the task's setup function.

    Attributes:
        model: the trainable model (a peft model; only adapter parameters require grad). The optimizer and
            checkpoints name its parameters by its own ``named_parameters()``; it is saved as the adapter.
        step_module: the module the loop runs and an engine wraps (train and eval mode, the model handed to
            ``loss_fn``): its forward computes what the loss needs from a batch, through ``model``'s parameters.
            For the preference losses a :class:`dpo.model.SequenceLogprobs` around ``model``; for a reward model
            a :class:`dpo.reward.SequenceRewards`.
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
        batches: where the training micro-batches come from; by default :class:`RowBatches` over
            ``train_rows`` (an online task's source samples rollouts).
        batch_size, seed: ``train.batch_size`` and ``train.seed``, for the default batch source.
        lr_of: the learning rate of a trainable parameter by name, or None for ``train.lr`` (an online task's
            value head learns at ``online.value_lr``).
        references: the reference pass, ``(step, processes) -> None``, or None when the task needs none. The
            loop calls it once, before the first step, with the step module as the engine prepared it (the
            pass goes through its forward with the adapter disabled) and a
            :class:`dpo.reference.Processes` (the processes share the pass); it fills the values
            ``loss_fn`` looks up and adds their fingerprints.
    """

    model: torch.nn.Module
    step_module: torch.nn.Module
    tokenizer: object
    train_rows: object
    eval_rows: object
    collate: Callable[[list[dict]], dict[str, Tensor]]
    loss_fn: Callable[[torch.nn.Module, dict[str, Tensor], str], LossOutput]
    headline: tuple[str, str] = ("rewards/accuracies", "held-out preference accuracy")
    drop_last: bool = False
    fingerprints: dict[str, str] = field(default_factory=dict)
    batches: BatchSource | None = None
    batch_size: int = 1
    seed: int = 0
    lr_of: Callable[[str], float | None] | None = None
    references: Callable[[torch.nn.Module, Processes], None] | None = None
    eval_prompts: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.batches is None:
            self.batches = RowBatches(self.train_rows, self.collate, self.batch_size, self.seed, self.drop_last)

    def param_groups(self, trainable: list[tuple[str, torch.nn.Parameter]]
                     ) -> list[tuple[list[tuple[str, torch.nn.Parameter]], dict[str, float]]]:
        """The optimizer's parameter groups as ``(named parameters, options)``: one group at ``train.lr``, and
        one per other learning rate ``lr_of`` gives (in the order the parameters first appear)."""
        groups: dict[float | None, list[tuple[str, torch.nn.Parameter]]] = {}
        for name, param in trainable:
            groups.setdefault(self.lr_of(name) if self.lr_of else None, []).append((name, param))
        return [(members, {} if lr is None else {"lr": lr}) for lr, members in groups.items()]


def preference_setup(recipe: Recipe, device, log: Log, shardable: bool = False) -> TrainSetup:
    """DPO-family training: data, policy with a fresh adapter, reference log-probs, registered loss.

    ``shardable``: the model will be sharded by FSDP (see :func:`dpo.model.quantization_config`).
    """
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
    collate = choose_collate(spec.paired, tokenizer.pad_token_id, cfg.packing, cfg.max_batch_tokens, device)
    base = load_base_model(recipe.model, device=device, shardable=shardable)
    policy = add_lora(base, recipe.lora, recipe.model.gradient_checkpointing, recipe.model.adapter)
    settings = LogprobSettings(cfg.logprob_impl, cfg.logprob_chunk_size)
    packing = resolve_packing(cfg.packing, policy, recipe.data.max_length, device, log)
    references: dict[str, ReferenceLogps | None] = {"train": None, "eval": None}
    fingerprints = {"data.train": data.train_fingerprint, "data.eval": data.eval_fingerprint}

    def fill_references(step: torch.nn.Module, processes: Processes) -> None:
        # Reference log-probs, once, before any training step; the step only looks them up.
        references["train"], references["eval"] = compute_references(recipe, policy, data, collate, settings,
                                                                     device, log, step=step, processes=processes,
                                                                     packing=packing)
        for split, values in references.items():
            fingerprints[f"reference.{split}"] = tensor_fingerprint(values.first, values.second,
                                                                    values.first_tokens, values.second_tokens)

    # The default reference is the policy's own starting point (the base with the fresh adapter off), so
    # policy minus reference log-probs are the change since the start (see dpo.train.guards).
    starts_at_reference = recipe.reference.model_path is None and recipe.reference.adapter is None

    def loss_fn(logprobs, batch, split):
        return batch_loss(logprobs, batch, spec, options, references[split], starts_at_reference)

    headline = (("rewards/accuracies", "held-out preference accuracy") if spec.paired
                else ("rewards/gap", "held-out reward gap, desirable minus undesirable"))
    return TrainSetup(policy, SequenceLogprobs(policy, settings, packing), tokenizer, data.train, data.eval, collate,
                      loss_fn, headline, drop_last=not spec.paired, fingerprints=fingerprints,
                      batch_size=cfg.batch_size, seed=cfg.seed,
                      references=fill_references if spec.needs_reference else None, eval_prompts=data.eval_prompts)


def reward_setup(recipe: Recipe, device, log: Log, shardable: bool = False) -> TrainSetup:
    """Bradley–Terry reward model on the same pairs (see :mod:`dpo.reward`); no reference pass."""
    from dpo.reward import reward_parts

    parts = reward_parts(recipe, device, log, shardable)
    return TrainSetup(parts.model, parts.step_module, parts.tokenizer, parts.train_rows, parts.eval_rows,
                      parts.collate, parts.loss_fn, headline=("rewards/accuracies", "held-out reward-model accuracy"),
                      fingerprints=parts.fingerprints, batch_size=recipe.train.batch_size, seed=recipe.train.seed)


def sft_setup(recipe: Recipe, device, log: Log, shardable: bool = False) -> TrainSetup:
    """Supervised fine-tuning: the chosen side of each pair (or each demonstration, or each desirable
    unpaired row) under the policy's step module; the loss is the completion's negative log-prob per token."""
    cfg = recipe.train
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, unpaired=False, seed=cfg.seed, log=log, completions=True)
    train_rows, eval_rows = desirable(data.train, log, "data.train"), desirable(data.eval, log, "data.eval")
    if len(train_rows) == 0:
        raise ValueError(f"data.train: no usable training examples in {recipe.data.train}")
    collate = partial(collate_completions, pad_token_id=tokenizer.pad_token_id)
    base = load_base_model(recipe.model, device=device, shardable=shardable)
    policy = add_lora(base, recipe.lora, recipe.model.gradient_checkpointing, recipe.model.adapter)
    settings = LogprobSettings(cfg.logprob_impl, cfg.logprob_chunk_size)

    def loss_fn(logprobs, batch, split):
        return sft_loss(*logprobs(batch))

    fingerprints = {"data.train": data.train_fingerprint, "data.eval": data.eval_fingerprint}
    return TrainSetup(policy, SequenceLogprobs(policy, settings), tokenizer, train_rows, eval_rows, collate, loss_fn,
                      ("loss", "held-out NLL per completion token"), fingerprints=fingerprints,
                      batch_size=cfg.batch_size, seed=cfg.seed, eval_prompts=data.eval_prompts)


def desirable(rows, log: Log, key: str):
    """Rows an SFT run imitates: all of them, or of unpaired (labelled) rows the desirable ones."""
    if "label" not in getattr(rows, "column_names", ()) or len(rows) == 0:
        return rows
    keep = [i for i, label in enumerate(rows["label"]) if label]
    if len(keep) < len(rows):
        log(f"{key}: {len(rows) - len(keep)} undesirable rows (label false) left out of supervised fine-tuning")
    return rows.select(keep)


def sft_loss(logps: Tensor, counts: Tensor) -> LossOutput:
    """Supervised fine-tuning's loss on a batch of B completions: their negative log-likelihood per token,
    over every completion token of the batch, ``−Σ_i log π(y_i|x_i) / Σ_i |y_i|``.

    Args:
        logps: ``[B]`` summed log-probs of each completion (EOS included).
        counts: ``[B]`` their token counts.

    Returns:
        ``losses [B]``: each completion's share of the per-token mean (their mean is the loss), and metrics
        ``logps/completion [B]`` (summed log-probs) and ``logps/per_token [B]`` (each one's mean per token).
    """
    counts = counts.to(logps.dtype)
    losses = -logps * logps.shape[0] / counts.sum().clamp(min=1)
    metrics = {"logps/completion": logps.detach(), "logps/per_token": (logps / counts.clamp(min=1)).detach()}
    return LossOutput(losses, metrics)


def online_setup(recipe: Recipe, device, log: Log, shardable: bool = False) -> TrainSetup:
    """PPO or RLOO against a reward model (see :mod:`dpo.online`): every role on one base, rollouts as batches.
    Runs in one process (its batch source refuses more), so ``shardable`` is never set."""
    from dpo.online import online_parts

    parts = online_parts(recipe, device, log)
    return TrainSetup(parts.model, parts.step_module, parts.tokenizer, parts.train_rows, parts.eval_rows,
                      parts.collate, parts.loss_fn, ("reward/proxy", "held-out reward-model score"),
                      fingerprints=parts.fingerprints, batches=parts.batches, lr_of=parts.lr_of)


# The setup function of each recipe task.
# ``(recipe, device, log, shardable) -> TrainSetup``; ``shardable``: an engine will shard the model (FSDP).
SETUPS: dict[str, Callable[..., TrainSetup]] = {
    "preference": preference_setup,
    "reward": reward_setup,
    "sft": sft_setup,
    "ppo": online_setup,
    "rloo": online_setup,
}


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


def compute_references(recipe: Recipe, policy, data, collate, settings: LogprobSettings, device, log: Log, *,
                       step: torch.nn.Module | None = None, processes: Processes | None = None,
                       packing: PackedAttention | None = None) -> tuple[ReferenceLogps, ReferenceLogps]:
    """Reference log-probs for both splits through the on-disk cache (``dpo.reference.setup``): read on a
    hit, without loading or running anything; computed on a miss by a separate model if the recipe names
    one (loaded only meanwhile), else by the policy's base with the adapter disabled (through ``step``, the
    step module as the engine prepared it, taking packed batches as the policy does, ``packing``), shared
    between ``processes``."""
    return cached_reference_logps(recipe, data, collate, settings, device, log, policy=policy, step=step,
                                  processes=processes, policy_packing=packing)
