"""Reward models: a Bradley–Terry scorer trained on the same preference pairs as the policy losses.

The model is the base network with a one-output sequence-classification head (``*ForSequenceClassification``
with ``num_labels=1``). LoRA adapts the trunk; the head (``score``) is new and trained fully through peft's
``modules_to_save``, so the saved adapter holds both. The reward of a sequence is the head applied to the
trunk's final hidden state at the sequence's last real token (the completion's EOS). That position is read
from the attention mask, not from the pad id, because a tokenizer whose pad token is its EOS would otherwise
score the token before the EOS. In a packed batch (``train.packing``, :mod:`dpo.data.pack`) a pair is one
segment ``[prompt | chosen | rejected]`` and each reward is read at the last token of its branch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpo.data import choose_collate, is_packed, prepare_data, unpack_to_padded
from dpo.losses import LossOutput
from dpo.model import (
    ModelError,
    PackedAttention,
    check_gguf,
    enable_checkpointing,
    from_pretrained_kwargs,
    keep_4bit_layout_trainable,
    resolve_packing,
    trunk,
)
from dpo.model.packing import packed_hidden_states
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


def load_reward_base(config: ModelConfig, device: torch.device | str | None = None, shardable: bool = False):
    """The base model with a new one-output score head (``AutoModelForSequenceClassification``).

    Args:
        config: the recipe's model section (path, dtype, quantization as for the policy).
        device: where to put the weights (quantized models are placed by bitsandbytes).
        shardable: the base will be sharded by FSDP (4-bit storage: see :func:`dpo.model.quantization_config`).
    """
    from transformers import AutoModelForSequenceClassification

    check_gguf(config)
    kwargs = {**from_pretrained_kwargs(config, device, shardable), "num_labels": 1}
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


def add_reward_lora(model: nn.Module, lora: LoraConfig, gradient_checkpointing: bool = False,
                    adapter: str | None = None):
    """Wrap ``model`` with a LoRA adapter on the trunk; the score head is trained in full.

    The adapter is fresh, or with ``adapter`` (``model.adapter``, e.g. an SFT run's) a copy of that saved
    causal-LM adapter, with its rank and targets, trained on from where it is.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import (
        PeftConfig,
        get_peft_model,
        get_peft_model_state_dict,
        prepare_model_for_kbit_training,
        set_peft_model_state_dict,
    )

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif gradient_checkpointing:
        enable_checkpointing(model)
        model.enable_input_require_grads()
    r, alpha, dropout, targets = lora.r, lora.alpha, lora.dropout, lora.target_modules
    if adapter is not None:
        try:
            start = PeftConfig.from_pretrained(adapter)
        except (OSError, ValueError) as exc:
            raise ModelError(f"model.adapter: {adapter!r} is not a LoRA adapter folder: {exc}") from None
        r, alpha, dropout, targets = start.r, start.lora_alpha, start.lora_dropout, sorted(start.target_modules)
    peft_config = PeftLoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
        task_type="SEQ_CLS", modules_to_save=[HEAD], bias="none",
    )
    peft_model = get_peft_model(model, peft_config)
    if adapter is not None:
        from safetensors.torch import load_file

        start = load_file(str(Path(adapter) / "adapter_model.safetensors"))
        state = get_peft_model_state_dict(peft_model)  # the new head's weights, and the trunk's to replace
        unknown = sorted(set(start) - set(state))
        if unknown:
            raise ModelError(f"model.adapter: {adapter!r} does not fit this base's trunk (unexpected: {unknown[:3]})")
        set_peft_model_state_dict(peft_model, {**state, **start})
    return peft_model


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


class SequenceRewards(nn.Module):
    """A reward model's step as one module: ``forward(batch) -> rewards [R]`` float32, one per sequence.

    The module an engine wraps for a reward model (``accelerate.prepare``), as :class:`dpo.model.SequenceLogprobs`
    is for a policy: :func:`sequence_rewards` calls the trunk and the head directly, so hooks on the model's
    own forward would not see a step. Its parameters are the model's, named with the prefix ``model.``; the
    decoder blocks are forwarded as ``_no_split_modules`` for an FSDP transformer auto-wrap (the score head
    stays with the root unit: it is small and trained).

    A packed batch runs packed when ``packing`` says how the model takes it (each reward read at the last
    token of its branch); otherwise it is re-laid as a padded batch.

    Args:
        model: the reward model (peft-wrapped or plain ``*ForSequenceClassification``).
        packing: how the model takes a packed batch, or None (padded batches only).
    """

    def __init__(self, model: nn.Module, packing: PackedAttention | None = None):
        super().__init__()
        self.model = model
        self.packing = packing

    @property
    def _no_split_modules(self) -> list[str]:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return list(getattr(base, "_no_split_modules", None) or [])

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Rewards ``[R]`` of the sequences of ``batch``: its rows (``input_ids``, ``attention_mask`` ``[R, T]``,
        right-padded), or the sequences of a packed batch."""
        if is_packed(batch) and self.packing is not None:
            return packed_sequence_rewards(self.model, batch, self.packing)
        padded = unpack_to_padded(batch) if is_packed(batch) else batch
        return sequence_rewards(self.model, padded["input_ids"], padded["attention_mask"])


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


def packed_sequence_rewards(model: nn.Module, batch: dict[str, Tensor], packing: PackedAttention) -> Tensor:
    """One scalar reward per sequence of a packed batch: the head on the hidden state of its last token.

    Args:
        model: a reward model (peft-wrapped or plain ``*ForSequenceClassification``).
        batch: a packed batch (:mod:`dpo.data.pack`); ``sequence_ends`` [S] are the flat positions read.
        packing: how the model takes packed batches.

    Returns:
        ``[S]`` float32 rewards, sequences numbered as the padded layout's rows.
    """
    hidden = packed_hidden_states(model, batch, packing)
    final = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["sequence_ends"])
    return score_head(model)(final).squeeze(-1).float()


def pair_rewards(model: nn.Module, batch: dict[str, Tensor],
                 packing: PackedAttention | None = None) -> tuple[Tensor, Tensor]:
    """``(chosen [B], rejected [B])`` rewards of a collated paired batch (sequences ``0..B-1`` chosen).

    A packed batch runs packed when ``packing`` says how the model takes it, else re-laid as a padded one.
    """
    rewards = SequenceRewards(model, packing)(batch)
    b = batch["index"].shape[0]
    return rewards[:b], rewards[b:]


@dataclass
class RewardParts:
    """What the training loop needs for a reward model (wrapped into the trainer's ``TrainSetup``)."""

    model: nn.Module
    step_module: nn.Module
    tokenizer: object
    train_rows: object
    eval_rows: object
    collate: Callable[[list[dict]], dict[str, Tensor]]
    loss_fn: Callable[[nn.Module, dict[str, Tensor], str], LossOutput]
    fingerprints: dict[str, str]


def reward_parts(recipe: Recipe, device, log: Callable[[str], None], shardable: bool = False) -> RewardParts:
    """Data (with the margin column, if any), the reward model with a fresh adapter, and the BT loss.

    ``shardable``: the model will be sharded by FSDP (see :func:`load_reward_base`).
    """
    from dpo.model import load_tokenizer

    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, unpaired=False, seed=recipe.train.seed, log=log,
                        margin_column=recipe.reward.margin_column)
    train = recipe.train
    collate = choose_collate(True, tokenizer.pad_token_id, train.packing, train.max_batch_tokens, device)
    base = load_reward_base(recipe.model, device=device, shardable=shardable)
    base.config.pad_token_id = tokenizer.pad_token_id
    model = add_reward_lora(base, recipe.lora, recipe.model.gradient_checkpointing, recipe.model.adapter)
    trunk_adapter = (f"the trunk's LoRA started from {recipe.model.adapter}" if recipe.model.adapter
                     else f"LoRA r={recipe.lora.r} on the trunk")
    log(f"reward model: {recipe.model.path} with a new one-output '{HEAD}' head (trained in full) and {trunk_adapter}")
    packing = resolve_packing(train.packing, model, recipe.data.max_length, device, log, what="the reward model")
    center_weight = recipe.reward.center_weight

    def loss_fn(step, batch, split):
        rewards = step(batch)  # the step module (SequenceRewards, or the engine's wrapper around it)
        b = batch["index"].shape[0]
        return bradley_terry_loss(rewards[:b], rewards[b:], batch.get("margin"), center_weight)

    fingerprints = {"data.train": data.train_fingerprint, "data.eval": data.eval_fingerprint}
    return RewardParts(model, SequenceRewards(model, packing), tokenizer, data.train, data.eval, collate, loss_fn, fingerprints)


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
