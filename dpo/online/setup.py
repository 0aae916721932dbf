"""The online tasks' parts for the training loop: one model for every role, the step module, prompts, the
rollout batch source and the loss (wrapped into a ``TrainSetup`` by :func:`dpo.train.setup.online_setup`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from dpo.losses import LossOutput
from dpo.model import LogprobSettings
from dpo.online.logprobs import VALUE_HEAD, completion_logprobs, completion_values
from dpo.online.roles import OnlineModel, build_online_model
from dpo.online.rollout import Rollouts, collate_prompts, prompt_rows, read_online_prompts
from dpo.recipe import Recipe

Log = Callable[[str], None]


class OnlineStep(nn.Module):
    """The update's forward as one module: ``forward(batch) -> (logps [R, L], mask [R, L], values [R, L] or
    None)``, the policy's per-token log-probs of a rollout micro-batch at the sampling temperature and (PPO)
    the value model's values, each role through its own adapter of the one base.

    Its parameters are the peft model's (policy and value adapters trainable), so it is what the loop's
    optimizer, checkpoints and accumulation see.
    """

    def __init__(self, model: OnlineModel, settings: LogprobSettings, temperature: float):
        super().__init__()
        self.model = model.peft
        self.roles = model
        self.settings = settings
        self.temperature = temperature

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        with self.roles.role("policy") as policy:
            logps, mask = completion_logprobs(policy, batch, self.settings, self.temperature)
        values = None
        if self.roles.has_value:
            with self.roles.role("value") as value:
                values = completion_values(value, batch)
        return logps, mask, values


@dataclass
class OnlineParts:
    """What the training loop needs for ``task: ppo`` or ``rloo``."""

    model: nn.Module
    step_module: nn.Module
    tokenizer: object
    train_rows: list[dict]
    eval_rows: list[dict]
    collate: Callable[[list[dict]], dict[str, Tensor]]
    loss_fn: Callable[[nn.Module, dict[str, Tensor], str], LossOutput]
    batches: Rollouts
    fingerprints: dict[str, str]
    lr_of: Callable[[str], float | None]


def online_parts(recipe: Recipe, device, log: Log) -> OnlineParts:
    """Load the roles onto one base, read the prompts and build the rollout batch source."""
    model = build_online_model(recipe, device, log)
    prompts = read_online_prompts(recipe, model.tokenizer, log)
    rollouts = Rollouts(recipe, model, prompts, device, log)
    settings = LogprobSettings(recipe.train.logprob_impl, recipe.train.logprob_chunk_size)
    step = OnlineStep(model, settings, recipe.online.generation.temperature)
    log(f"online ({recipe.task}): {rollouts.samples_per_rollout} samples a rollout "
        f"({recipe.online.prompts_per_rollout} prompts x {recipe.online.generation.samples_per_prompt}), "
        f"{recipe.online.ppo_epochs} pass(es) over each in micro-batches of {recipe.train.batch_size}")
    value_lr = recipe.online.value_lr

    def lr_of(name: str) -> float | None:
        # The value head starts from zero and has a whole value range to learn; the adapters only nudge.
        return value_lr if value_lr is not None and f"{VALUE_HEAD}.modules_to_save." in name else None

    return OnlineParts(model.peft, step, model.tokenizer, prompt_rows(prompts.train_ids),
                       prompt_rows(prompts.eval_ids), collate_prompts, rollouts.loss, rollouts,
                       prompts.fingerprints(), lr_of)
