"""One base model in memory for every role of online RL.

The policy is a LoRA adapter (``default``: fresh, or a copy of ``model.adapter`` trained on); the reference
is the same base with the adapters off, or with the frozen ``reference.adapter`` (an SFT adapter) on; the
value model (PPO) is a further adapter, ``value``, with a one-output head ``value_head`` on the causal LM;
the reward model is the frozen adapter ``reward`` with its ``score`` head when its run was trained on the
same base (path, dtype, quantization), and otherwise a model of its own, loaded beside.

peft switches adapters by marking the active one's parameters trainable and the others frozen; a role
switch here puts back the run's own set (policy and value adapters trainable, nothing else), so a forward
in one role never freezes the other role's parameters for the backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpo.model import ModelError, add_lora, causal_lm, load_base_model, load_tokenizer
from dpo.online.logprobs import VALUE_HEAD
from dpo.recipe import ModelConfig, Recipe, RecipeError
from dpo.reward import HEAD, RewardRun, load_reward_run, run_recipe

Log = Callable[[str], None]
POLICY, VALUE, REWARD, REFERENCE = "default", "value", "reward", "reference"


def same_base(policy: ModelConfig, reward: ModelConfig) -> bool:
    """Whether a reward model trained on ``reward`` runs on the policy's loaded base as an adapter."""
    return (Path(policy.path).resolve() == Path(reward.path).resolve() and policy.dtype == reward.dtype
            and policy.quantization == reward.quantization and policy.trust_remote_code == reward.trust_remote_code)


@dataclass
class OnlineModel:
    """The peft model holding every role, and the reward model used through it or beside it.

    Attributes:
        peft: the peft model (policy adapter ``default`` active outside a role switch).
        tokenizer: the policy's tokenizer.
        reward: the reward model as :func:`dpo.reward.score_texts` takes it; its ``model`` is ``peft`` when
            shared (score under :meth:`role` ``"reward"``).
        shared_reward: the reward model is the ``reward`` adapter of ``peft``.
        has_value: PPO's value adapter and head exist.
        reference_adapter: the reference is the ``reference`` adapter (else the base, adapters off).
        trainable: names of the parameters trained (policy and value adapters, value head).
    """

    peft: nn.Module
    tokenizer: Any
    reward: RewardRun
    shared_reward: bool
    has_value: bool
    reference_adapter: bool
    trainable: frozenset[str]

    def fix_trainable(self) -> None:
        """Exactly the run's trained parameters require grad (peft's adapter switch changes the flags)."""
        for name, param in self.peft.named_parameters():
            param.requires_grad_(name in self.trainable)

    @contextmanager
    def role(self, name: str) -> Iterator[nn.Module]:
        """Within the block, ``peft`` computes as ``name``: "policy", "reference", "value" or "reward"."""
        if name == "reference" and not self.reference_adapter:
            with self.peft.disable_adapter():
                yield self.peft
            return
        if name == "reward" and not self.shared_reward:
            yield self.reward.model
            return
        adapter = {"policy": POLICY, "value": VALUE, "reward": REWARD, "reference": REFERENCE}[name]
        self.peft.set_adapter(adapter)
        self.fix_trainable()
        try:
            yield self.peft
        finally:
            self.peft.set_adapter(POLICY)
            self.fix_trainable()


def _attach_head(model: nn.Module, name: str, dtype: torch.dtype, bias: bool) -> None:
    """A new ``[1, H]`` linear head named ``name`` on the causal LM, on its device, zero-initialised."""
    lm = causal_lm(model)
    reference = lm.get_output_embeddings().weight
    head = nn.Linear(lm.config.hidden_size, 1, bias=bias, dtype=dtype, device=reference.device)
    nn.init.zeros_(head.weight)
    if bias:
        nn.init.zeros_(head.bias)
    setattr(lm, name, head)


def build_online_model(recipe: Recipe, device, log: Log) -> OnlineModel:
    """Load the base once and put every role on it (see the module docstring).

    Raises:
        RecipeError: ``online.reward_model`` is not a finished ``task: reward`` run.
        ModelError: an adapter does not fit the base.
    """
    from peft import LoraConfig as PeftLoraConfig

    online = recipe.online
    reward_recipe = run_recipe(online.reward_model, "online.reward_model")
    if reward_recipe.task != "reward":
        raise RecipeError(f"online.reward_model: {online.reward_model} was trained with task: {reward_recipe.task}, "
                          "not a reward model (train one with task: reward)")
    tokenizer = load_tokenizer(recipe.model)
    base = load_base_model(recipe.model, device=device)
    peft = add_lora(base, recipe.lora, recipe.model.gradient_checkpointing, recipe.model.adapter)
    # New adapters adapt the policy's own linears (peft's all-linear would also take the heads added below).
    targets = sorted(peft.peft_config[POLICY].target_modules)
    if recipe.reference.adapter is not None:
        try:
            peft.load_adapter(recipe.reference.adapter, adapter_name=REFERENCE, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"reference.adapter: cannot load {recipe.reference.adapter!r} onto {recipe.model.path}: "
                             f"{exc}") from None
    shared = same_base(recipe.model, reward_recipe.model)
    if shared:
        _attach_head(peft, HEAD, causal_lm(peft).get_output_embeddings().weight.dtype, bias=False)
        adapter = str(Path(online.reward_model) / "adapter")
        try:
            peft.load_adapter(adapter, adapter_name=REWARD, is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ModelError(f"online.reward_model: cannot load {adapter!r} onto the policy's base: {exc}") from None
        reward = RewardRun(peft, load_tokenizer(reward_recipe.model, path=adapter), reward_recipe,
                           Path(online.reward_model))
        log(f"reward model: {online.reward_model} as an adapter on the policy's base (one copy of the base)")
    else:
        reward = load_reward_run(online.reward_model, device, what="online.reward_model")
        log(f"reward model: {online.reward_model} loaded beside the policy (trained on another base: "
            f"{reward_recipe.model.path})")
    if recipe.task == "ppo":
        _attach_head(peft, VALUE_HEAD, torch.float32, bias=True)
        lora = recipe.lora
        peft.add_adapter(VALUE, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                               target_modules=targets, modules_to_save=[VALUE_HEAD],
                                               task_type="CAUSAL_LM", bias="none"))
    peft.set_adapter(POLICY)
    trainable = frozenset(name for name, _ in peft.named_parameters()
                          if (("lora_" in name and (f".{POLICY}." in name or f".{VALUE}." in name))
                              or f"modules_to_save.{VALUE}." in name))
    model = OnlineModel(peft, tokenizer, reward, shared, recipe.task == "ppo", recipe.reference.adapter is not None,
                        trainable)
    model.fix_trainable()
    return model
