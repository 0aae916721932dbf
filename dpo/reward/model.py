"""Reward models: a Bradley–Terry scorer trained on the same preference pairs as the policy losses.

The model is the base network with a one-output sequence-classification head (``*ForSequenceClassification``
with ``num_labels=1``). LoRA adapts the trunk; the head (``score``) is new and trained fully through peft's
``modules_to_save``, so the saved adapter holds both. The reward of a sequence is the head applied to the
trunk's final hidden state at the sequence's last real token (the completion's EOS). That position is read
from the attention mask, not from the pad id, because a tokenizer whose pad token is its EOS would otherwise
score the token before the EOS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpo.data import collate_paired, prepare_data
from dpo.losses import LossOutput
from dpo.model import (
    ModelError,
    check_gguf,
    enable_checkpointing,
    from_pretrained_kwargs,
    keep_4bit_layout_trainable,
    trunk,
)
from dpo.recipe import LoraConfig, ModelConfig, Recipe, RecipeError, load_recipe

HEAD = "score"  # the name transformers gives the one-output head of every *ForSequenceClassification


@contextmanager
def quiet_load_report():
    """Silence transformers' load report, which lists the fresh head and the unused LM head as problems."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def load_reward_base(config: ModelConfig, device: torch.device | str | None = None):
    """The base model with a new one-output score head (``AutoModelForSequenceClassification``).

    Args:
        config: the recipe's model section (path, dtype, quantization as for the policy).
        device: where to put the weights (quantized models are placed by bitsandbytes).
    """
    from transformers import AutoModelForSequenceClassification

    check_gguf(config)
    kwargs = {**from_pretrained_kwargs(config, device), "num_labels": 1}
    quant = kwargs.get("quantization_config")
    if quant is not None:
        quant.llm_int8_skip_modules = [HEAD]  # the head is trained in full precision, as the LM head is kept
    try:
        with quiet_load_report():
            model = AutoModelForSequenceClassification.from_pretrained(config.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: cannot load {config.path!r} with a sequence-classification head: {exc}") from None
    except ImportError as exc:
        if quant is None:
            raise
        raise ModelError(f"model.quantization: loading a {config.quantization.bits}-bit base needs bitsandbytes "
                         f"(pip install 'dpo-train[quant]'): {exc}") from None
    head = getattr(model, HEAD, None)
    if not isinstance(head, nn.Linear) or not torch.is_floating_point(head.weight):
        raise ModelError(f"model.path: {config.path}'s sequence-classification model has no full-precision linear "
                         f"'{HEAD}' head")
    # A head of the size of a whole hidden state's reading (std 1/√(H+1)) instead of transformers' 0.02: with
    # rewards ~0.02 apart, training sits on the log 2 plateau until the adapter happens to move the features.
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(head.in_features + 1))
    if quant is not None:
        keep_4bit_layout_trainable(model)
    if quant is None and device is not None:
        model.to(device)
    return model


def add_reward_lora(model: nn.Module, lora: LoraConfig, gradient_checkpointing: bool = False):
    """Wrap ``model`` with a fresh LoRA adapter on the trunk; the score head is trained in full."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        enable_checkpointing(model)
        model.enable_input_require_grads()
    peft_config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="SEQ_CLS", modules_to_save=[HEAD], bias="none",
    )
    return get_peft_model(model, peft_config)


def score_head(model: nn.Module) -> nn.Module:
    """The (possibly peft-wrapped) score head of a reward model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, HEAD)


def sequence_rewards(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """One scalar reward per right-padded row: the head on the hidden state of the last real token.

    Args:
        model: a reward model (peft-wrapped or plain ``*ForSequenceClassification``).
        input_ids: ``[R, T]`` token ids, right-padded.
        attention_mask: ``[R, T]``, 1 on real tokens.

    Returns:
        ``[R]`` float32 rewards.
    """
    hidden = trunk(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(dim=1) - 1
    final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return score_head(model)(final).squeeze(-1).float()


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                       center_weight: float = 0.0) -> LossOutput:
    """Bradley–Terry loss of a reward model on B pairs, with an optional margin and reward centering.

    Per pair: ``ℓ = −log σ(r_c − r_r − m) + c·(r_c + r_r)²``, so the batch mean is
    ``mean(−log σ(r_c − r_r − m)) + c·mean((r_c + r_r)²)``. The margin m asks the chosen reward to exceed the
    rejected one by at least m (pairs rated far apart get a larger m); the centering term with weight c pulls
    rewards towards zero, which fixes the otherwise free offset of Bradley–Terry rewards.

    Args:
        chosen: ``[B]`` rewards r_c of the chosen completions.
        rejected: ``[B]`` rewards r_r of the rejected completions.
        margin: ``[B]`` margins m, or None for m = 0.
        center_weight: c >= 0.

    Returns:
        ``losses [B]`` and metrics: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (r_c − r_r),
        ``rewards/accuracies`` (1 if r_c > r_r, 0.5 on a tie, else 0), ``rewards/mean`` ((r_c + r_r)/2) [B],
        and ``rewards/std`` [1]: the spread (population standard deviation) of the batch's 2B rewards.
    """
    if chosen.dtype in (torch.float16, torch.bfloat16):  # float64 stays float64 for gradient checks
        chosen, rejected = chosen.float(), rejected.float()
    difference = chosen - rejected
    logits = difference if margin is None else difference - margin.to(difference.dtype)
    losses = -F.logsigmoid(logits)
    if center_weight > 0:
        losses = losses + center_weight * (chosen + rejected) ** 2
    metrics = {
        "rewards/chosen": chosen.detach(),
        "rewards/rejected": rejected.detach(),
        "rewards/margins": difference.detach(),
        "rewards/accuracies": (difference > 0).to(difference.dtype).detach() + 0.5 * (difference == 0).detach(),
        "rewards/mean": ((chosen + rejected) / 2).detach(),
        "rewards/std": torch.cat([chosen, rejected]).detach().std(unbiased=False).reshape(1),
    }
    return LossOutput(losses, metrics)


def pair_rewards(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(chosen [B], rejected [B])`` rewards of a collated paired batch (rows ``0..B-1`` chosen)."""
    rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
    b = batch["index"].shape[0]
    return rewards[:b], rewards[b:]


@dataclass
class RewardParts:
    """What the training loop needs for a reward model (wrapped into the trainer's ``TrainSetup``)."""

    model: nn.Module
    tokenizer: object
    train_rows: object
    eval_rows: object
    collate: Callable[[list[dict]], dict[str, Tensor]]
    loss_fn: Callable[[nn.Module, dict[str, Tensor], str], LossOutput]
    fingerprints: dict[str, str]


def reward_parts(recipe: Recipe, device, log: Callable[[str], None]) -> RewardParts:
    """Data (with the margin column, if any), the reward model with a fresh adapter, and the BT loss."""
    from dpo.model import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, unpaired=False, seed=recipe.train.seed, log=log,
                        margin_column=recipe.reward.margin_column)
    collate = partial(collate_paired, pad_token_id=tokenizer.pad_token_id)
    base = load_reward_base(recipe.model, device=device)
    base.config.pad_token_id = tokenizer.pad_token_id
    model = add_reward_lora(base, recipe.lora, recipe.model.gradient_checkpointing)
    log(f"reward model: {recipe.model.path} with a new one-output '{HEAD}' head (trained in full) and LoRA r="
        f"{recipe.lora.r} on the trunk")
    center_weight = recipe.reward.center_weight

    def loss_fn(model, batch, split):
        chosen, rejected = pair_rewards(model, batch)
        return bradley_terry_loss(chosen, rejected, batch.get("margin"), center_weight)

    fingerprints = {"data.train": data.train_fingerprint, "data.eval": data.eval_fingerprint}
    return RewardParts(model, tokenizer, data.train, data.eval, collate, loss_fn, fingerprints)


# --------------------------------------------------------------------------------------- trained runs


@dataclass
class RewardRun:
    """A trained reward model loaded back from its run directory.

    Attributes:
        model: the reward model in eval mode (base + adapter + trained head).
        tokenizer: the tokenizer saved beside the adapter.
        recipe: the run's resolved recipe (data settings: chat template, lengths, truncation).
        path: the run directory.
    """

    model: nn.Module
    tokenizer: object
    recipe: Recipe
    path: Path


def run_recipe(run_dir: str | Path, what: str) -> Recipe:
    """The resolved recipe of a finished run (``RUN_DIR/recipe.yaml``), with its adapter present."""
    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file() or not (run_dir / "adapter").is_dir():
        raise RecipeError(f"{what}: {run_dir} is not a finished dpo-train run (expected recipe.yaml and adapter/ "
                          "in it, as `dpo-train RECIPE` writes to output.dir)")
    return load_recipe(run_dir / "recipe.yaml")


def load_reward_run(run_dir: str | Path, device: torch.device | str = "cpu", what: str = "--reward-model") -> RewardRun:
    """Load a ``task: reward`` run for scoring.

    Args:
        run_dir: the run's ``output.dir``.
        device: where to put the model.
        what: how the caller names this directory in messages.
    """
    from peft import PeftModel

    from dpo.model import load_tokenizer

    recipe = run_recipe(run_dir, what)
    if recipe.task != "reward":
        raise RecipeError(f"{what}: {run_dir} was trained with task: {recipe.task}, not a reward model "
                          "(train one with task: reward)")
    adapter = Path(run_dir) / "adapter"
    tokenizer = load_tokenizer(recipe.model, path=str(adapter))
    base = load_reward_base(recipe.model, device=device)
    base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, str(adapter))
    if recipe.model.quantization is None:
        model.to(device)
    model.eval()
    return RewardRun(model, tokenizer, recipe, Path(run_dir))
