"""The memory plan of an online step (``--dry-run`` of a ``ppo`` or ``rloo`` recipe), from the model's shape.

The three phases of a rollout-and-update cycle hold different things on top of what stays resident:

* **Resident:** the base's weights once (every role shares them); the policy adapter and, for PPO, the value
  adapter and head, each with its float32 gradient and optimizer moments (:mod:`dpo.model.memory`'s terms);
  the frozen reward adapter and head, or a separate reward model's weights when it was trained on another
  base; the frozen reference adapter when there is one.
* **Rollout:** ``generate`` at ``generation.batch_size`` sequences of ``max_prompt_length + max_new_tokens``
  tokens: the KV cache (``2 · layers · kv_dim`` values a token in the compute dtype) and the float32 logits
  of every step, which sampling keeps to report the policy's entropy (``steps · V`` a sequence).
* **Scoring:** the no-grad passes (policy and reference log-probs, values, the reward model) at
  ``reference.batch_size`` sequences: :func:`dpo.model.memory.estimate_no_grad_pass` less the weights.
* **Update:** one micro-batch of ``train.batch_size`` samples through the policy and, for PPO, the value
  model, both kept for one backward: :func:`dpo.model.memory.estimate_step` of twice the rows.

The peak is the resident memory plus the largest phase. Like the offline plan it leaves out the CUDA
context and fragmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

from dpo.model.memory import (
    LORA_BYTES,
    Batch,
    ModelShape,
    TrainingPlan,
    estimate_no_grad_pass,
    estimate_step,
    format_bytes,
    lora_tensor_sizes,
    memory_budget,
    optimizer_state_bytes,
    weight_bytes,
)
from dpo.online.roles import same_base
from dpo.recipe import Recipe, RecipeError
from dpo.reward import run_recipe


@dataclass(frozen=True)
class OnlineMemory:
    """Bytes of each term and the peak (see the module docstring)."""

    weights: int
    policy_adapter: int
    value_adapter: int
    reward: int
    reference_adapter: int
    kv_cache: int
    generation_logits: int
    scoring: int
    update: int
    reward_note: str

    @property
    def resident(self) -> int:
        return self.weights + self.policy_adapter + self.value_adapter + self.reward + self.reference_adapter

    @property
    def phases(self) -> dict[str, int]:
        return {"rollout": self.kv_cache + self.generation_logits, "scoring": self.scoring, "update": self.update}

    @property
    def peak(self) -> int:
        return self.resident + max(self.phases.values())


def adapter_bytes(shape: ModelShape, plan: TrainingPlan, trained: bool) -> int:
    """An adapter's float32 values, with (``trained``) a gradient and the optimizer's moments."""
    values = LORA_BYTES * sum(lora_tensor_sizes(shape, plan))
    return values + (values + optimizer_state_bytes(shape, plan) if trained else 0)


def estimate_online(recipe: Recipe, shape: ModelShape, reward_shape: ModelShape | None = None,
                    device_type: str = "cuda") -> OnlineMemory:
    """The memory plan of ``recipe``'s online step on ``shape`` (``reward_shape``: a reward model trained on
    another base, loaded beside; None when it is an adapter on this base)."""
    plan = TrainingPlan.from_recipe(recipe, device_type)
    online, a = recipe.online, plan.compute_bytes
    quantized, other = weight_bytes(shape, plan)
    head = a * shape.hidden  # a one-output head
    value = adapter_bytes(shape, plan, trained=True) + 3 * 4 * (shape.hidden + 1) if recipe.task == "ppo" else 0
    if reward_shape is None:
        reward, note = adapter_bytes(shape, plan, trained=False) + head, "reward adapter + head (frozen)"
    else:
        reward_quantized, reward_other = weight_bytes(reward_shape, plan)
        reward = reward_quantized + reward_other + adapter_bytes(reward_shape, plan, trained=False)
        note = "reward model (its own base)"
    reference = adapter_bytes(shape, plan, trained=False) if recipe.reference.adapter is not None else 0
    prompt, new = recipe.data.max_prompt_length, online.generation.max_new_tokens
    sequences, length = online.generation.batch_size, prompt + new
    kv_cache = 2 * shape.layers * shape.kv_dim * a * sequences * length
    logits = 4 * sequences * new * shape.vocab
    rows = recipe.reference.batch_size
    scoring_batch = Batch(rows=rows, tokens=length, completion_tokens=rows * new, padded=True)
    scoring = estimate_no_grad_pass(shape, plan, scoring_batch) - quantized - other
    roles = 2 if recipe.task == "ppo" else 1
    rows = recipe.train.batch_size * roles
    step = estimate_step(shape, plan, Batch(rows=rows, tokens=length, completion_tokens=rows * new, padded=True))
    update = step.peak - step.persistent - step.lora_grads  # the adapters' gradients are resident above
    return OnlineMemory(quantized + other, adapter_bytes(shape, plan, trained=True), value, reward, reference,
                        kv_cache, logits, scoring, update, note)


def _shape(path: str, trust_remote_code: bool) -> ModelShape:
    from transformers import AutoConfig

    return ModelShape.from_config(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))


def online_memory_report(recipe: Recipe, device_bytes: int | None = None) -> tuple[str, bool]:
    """The ``--dry-run`` memory section of an online recipe; ``(text, fits)`` as
    :func:`dpo.model.memory_report` returns them."""
    shape = _shape(recipe.model.path, recipe.model.trust_remote_code)
    reward_shape, reward_line = None, ""
    try:
        reward_recipe = run_recipe(recipe.online.reward_model, "online.reward_model")
        if not same_base(recipe.model, reward_recipe.model):
            reward_shape = _shape(reward_recipe.model.path, reward_recipe.model.trust_remote_code)
    except (RecipeError, OSError):
        reward_line = (f"  note: {recipe.online.reward_model} is not a finished reward run yet; planned as an "
                       "adapter on this base (train it with the same model section)")
    memory = estimate_online(recipe, shape, reward_shape)
    generation = recipe.online.generation
    length = recipe.data.max_prompt_length + generation.max_new_tokens
    plan = TrainingPlan.from_recipe(recipe)
    base = f"{plan.weight_bits}-bit" if plan.weight_bits else plan.compute_dtype
    rows = [
        ("base weights (once, for every role)", memory.weights),
        ("policy adapter, gradient, optimizer", memory.policy_adapter),
        ("value adapter + head, gradient, optimizer", memory.value_adapter),
        (memory.reward_note, memory.reward),
        ("reference adapter (frozen)", memory.reference_adapter),
        (f"rollout: KV cache ({generation.batch_size} x {length} tokens)", memory.kv_cache),
        (f"rollout: logits kept ({generation.max_new_tokens} steps x V)", memory.generation_logits),
        (f"scoring: no-grad passes ({recipe.reference.batch_size} sequences)", memory.scoring),
        (f"update: {'policy + value' if recipe.task == 'ppo' else 'policy'} forward and backward "
         f"({recipe.train.batch_size} samples)", memory.update),
    ]
    phase = max(memory.phases, key=memory.phases.get)
    lines = [f"# memory of the online step (estimated peak on a CUDA device, {base} base, LoRA r={plan.lora_r})"]
    lines += [f"  {name:<60}{format_bytes(value)}" for name, value in rows]
    lines.append(f"  {'estimated peak':<60}{format_bytes(memory.peak)} (resident {format_bytes(memory.resident).strip()} "
                 f"+ the {phase} phase)")
    if reward_line:
        lines.append(reward_line)
    budget, source = memory_budget(recipe, device_bytes)
    if budget is None:
        lines.append("  no CUDA device detected: set model.max_memory_gb to check the estimate against your card")
        return "\n".join(lines), True
    fits = memory.peak <= budget
    if fits:
        lines.append(f"  fits: {format_bytes(memory.peak).strip()} of {format_bytes(budget).strip()} ({source})")
    else:
        advice = {"rollout": "lower online.generation.batch_size or max_new_tokens",
                  "scoring": "lower reference.batch_size",
                  "update": "lower train.batch_size (raise train.grad_accum), or set model.gradient_checkpointing"}
        lines.append(f"warning: the estimated peak {format_bytes(memory.peak).strip()} exceeds "
                     f"{format_bytes(budget).strip()} ({source}); the {phase} phase is the largest: {advice[phase]}")
    return "\n".join(lines), fits


def describe_online(recipe: Recipe, log=print) -> str:
    """The dry run of an online recipe: its prompts, the rollout plan and the memory plan."""
    import math

    from dpo.model import load_tokenizer
    from dpo.online.rollout import read_online_prompts

    tokenizer = load_tokenizer(recipe.model)
    prompts = read_online_prompts(recipe, tokenizer, log)
    online = recipe.online
    samples = online.prompts_per_rollout * online.generation.samples_per_prompt
    micro = online.ppo_epochs * math.ceil(samples / recipe.train.batch_size)
    lengths = sorted(len(ids) for ids in prompts.train_ids)
    lines = [f"# prompts: {len(prompts.train)} for training, {len(prompts.eval)} held out; prompt tokens "
             f"median {lengths[len(lengths) // 2]}, max {lengths[-1]} (cut to {recipe.data.max_prompt_length})",
             f"# rollouts: {samples} samples each ({online.prompts_per_rollout} prompts x "
             f"{online.generation.samples_per_prompt}), {micro} micro-batches of {recipe.train.batch_size} "
             f"({online.ppo_epochs} pass(es)), {max(1, micro // recipe.train.grad_accum)} optimizer step(s) each"]
    try:
        lines.append(online_memory_report(recipe)[0])
    except (OSError, ValueError, TypeError) as exc:
        lines.append(f"# memory\n  no estimate: cannot read the model's config.json ({exc})")
    return "\n".join(lines)
