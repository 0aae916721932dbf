"""The online stage: PPO and RLOO against a reward model, on one base model that holds every role.

Takes the recipe (``task: ppo`` or ``rloo``, its ``online`` section), the prompts of its data and a trained
reward model (a ``task: reward`` run). Hands the training loop a batch source whose epochs are rollouts
(:class:`dpo.online.rollout.Rollouts`: sample, score, advantages), the update's step module and loss
(:func:`online_parts`), and the dry run's memory plan (:mod:`dpo.online.memory`). The objectives are pure
functions (:mod:`dpo.online.objectives`); the roles (policy, reference, value, reward) are adapters of the
one base (:mod:`dpo.online.roles`).
"""

from dpo.online.objectives import (
    adaptive_kl_coef,
    clipped_surrogate,
    gae,
    grpo_advantages,
    kl_per_token,
    policy_gradient_objective,
    ppo_objective,
    rloo_advantages,
    token_rewards,
    whiten,
)
from dpo.online.roles import OnlineModel, build_online_model
from dpo.online.rollout import Rollouts
from dpo.online.setup import OnlineParts, OnlineStep, online_parts

__all__ = [
    "OnlineModel",
    "OnlineParts",
    "OnlineStep",
    "Rollouts",
    "adaptive_kl_coef",
    "build_online_model",
    "clipped_surrogate",
    "gae",
    "grpo_advantages",
    "kl_per_token",
    "online_parts",
    "policy_gradient_objective",
    "ppo_objective",
    "rloo_advantages",
    "token_rewards",
    "whiten",
]
