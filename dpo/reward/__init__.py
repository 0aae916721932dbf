"""The reward stage: a Bradley–Terry reward model on the same preference pairs, and scoring with it.

Takes the recipe (``task: reward``) and the tokenized pairs. Hands on the reward model and its loss for
the training loop (:func:`reward_parts`), a trained run loaded back (:func:`load_reward_run`), and scores
of (prompt, completion) rows (:func:`score_texts`, :func:`score_file`; ``dpo-train score``), and a gold
scorer, a Python function judging (prompt, completion) (:func:`load_gold`).
"""

from dpo.reward.gold import Gold, GoldError, load_gold
from dpo.reward.model import (
    HEAD,
    RewardParts,
    RewardRun,
    SequenceRewards,
    add_reward_lora,
    bradley_terry_loss,
    load_reward_base,
    load_reward_run,
    pair_rewards,
    reward_parts,
    run_recipe,
    sequence_rewards,
)
from dpo.reward.scoring import score_file, score_texts

__all__ = [
    "Gold",
    "GoldError",
    "HEAD",
    "RewardParts",
    "RewardRun",
    "SequenceRewards",
    "add_reward_lora",
    "bradley_terry_loss",
    "load_gold",
    "load_reward_base",
    "load_reward_run",
    "pair_rewards",
    "reward_parts",
    "run_recipe",
    "score_file",
    "score_texts",
    "sequence_rewards",
]
