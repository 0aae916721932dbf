"""The rollout phase of online RL and the micro-batches the training loop takes from it.

:class:`Rollouts` is what the task setup hands the loop as its batch source: for the loop's epoch ``n`` it
runs rollout ``n`` (sample completions of the next ``online.prompts_per_rollout`` training prompts with the
policy, score them, compute the advantages) and returns its ``online.ppo_epochs`` shuffled passes of
``train.batch_size`` samples. A rollout is a function of the policy's weights and ``(seeds, n)`` alone:
sampling runs under a forked generator seeded from ``online.generation.seed`` and ``n``, and the passes are
shuffled by a generator seeded from ``train.seed`` and ``n``, so the training run's own generator (dropout)
is untouched. A checkpoint keeps the current rollout's tensors and counters (:meth:`Rollouts.state`): a
run resumed in the middle of a rollout continues on the same samples, bit for bit.

Per rollout, in order: sampling (policy adapter on, ``use_cache``), per-token log-probs of the policy and
the reference and (PPO) the values through the fused kernels (:mod:`dpo.online.logprobs`), the reward
model's score at the last real token of (prompt, completion) tokenized as its training data was
(:func:`dpo.reward.score_texts`), the gold scorer, and the objective's advantages.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dpo.data.chat import resolve_chat_template
from dpo.data.collate import pad_sequences
from dpo.data.prepare import split_rows
from dpo.data.prompts import read_prompts
from dpo.losses import LossOutput
from dpo.model import (
    LogprobSettings,
    Samples,
    SamplingSettings,
    completion_text,
    encode_prompt,
    sample_completions,
)
from dpo.online import objectives as obj
from dpo.online.logprobs import completion_logprobs, completion_values
from dpo.online.roles import OnlineModel
from dpo.recipe import Recipe
from dpo.reward import load_gold, score_texts

Log = Callable[[str], None]

# Seeds of held-out sampling: far from the rollouts' (generation.seed + 1 + n), and fixed, so every
# evaluation of a run samples its prompts with the same draws.
EVAL_SEED_OFFSET = 1_000_000_007
# Rollout tensors that are per sequence position [S, T], per completion token [S, L], and per sample [S].
SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")
TOKEN_KEYS = ("mask", "old_logps", "old_values", "advantages", "returns")
STAT_KEYS = ("reward/proxy", "reward/total", "reward/gold", "kl/k1", "kl/k3", "length", "ended", "entropy",
             "kl_coef", "advantages/mean", "advantages/std", "rollout/tokens_per_s", "rollout/seconds")


@dataclass
class OnlinePrompts:
    """Training and held-out prompts, as the data holds them and as token ids."""

    train: list[Any]
    train_ids: list[list[int]]
    eval: list[Any]
    eval_ids: list[list[int]]

    def fingerprints(self) -> dict[str, str]:
        """SHA-256 of each split's token ids (a resumed run must see the same prompts)."""
        return {f"data.{split}": hashlib.sha256(json.dumps(ids).encode()).hexdigest()
                for split, ids in (("train", self.train_ids), ("eval", self.eval_ids))}


def read_online_prompts(recipe: Recipe, tokenizer: Any, log: Log) -> OnlinePrompts:
    """The unique prompts of ``data.train`` and of ``data.eval`` (else ``data.eval_fraction`` of the training
    prompts, split off by ``train.seed``), at most ``online.max_eval_prompts`` held out, encoded as the policy
    samples them (:func:`dpo.model.encode_prompt`)."""
    data = recipe.data
    train = read_prompts(data, data.train, "data.train", log)
    if data.eval is not None:
        held_out = read_prompts(data, data.eval, "data.eval", log)
    elif data.eval_fraction > 0:
        train, held_out = split_rows(train, data.eval_fraction, recipe.train.seed, data.train)
    else:
        held_out = []
    held_out = held_out[: recipe.online.max_eval_prompts]
    template, _ = resolve_chat_template(data.chat_template, tokenizer)

    def encode(prompts: list[Any], key: str) -> list[list[int]]:
        try:
            return [encode_prompt(tokenizer, p, template, data.max_prompt_length) for p in prompts]
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}; set data.chat_template") from None

    log(f"online: {len(train)} training prompts, {len(held_out)} held-out prompts")
    return OnlinePrompts(train, encode(train, "data.train"), held_out, encode(held_out, "data.eval"))


@dataclass
class Budget:
    """What a run has spent on rollouts, summed over resumed runs."""

    samples: int = 0
    tokens: int = 0
    rollouts: int = 0
    wall_time_s: float = 0.0
    started: float | None = None  # when this process took its first rollout (or resumed)

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.wall_time_s + (time.perf_counter() - self.started if self.started is not None else 0.0)


class Rollouts:
    """The online tasks' batch source (see the module docstring), their step's loss and their evaluation.

    Args:
        recipe: the run's recipe (``task: ppo`` or ``rloo``).
        model: every role on one base (:func:`dpo.online.roles.build_online_model`).
        prompts: training and held-out prompts.
        device: where the model is.
        log: progress messages.
    """

    def __init__(self, recipe: Recipe, model: OnlineModel, prompts: OnlinePrompts, device, log: Log):
        self.recipe, self.model, self.prompts, self.device, self.log = recipe, model, prompts, device, log
        self.online = recipe.online
        self.generation = recipe.online.generation
        self.ppo = recipe.task == "ppo"
        self.settings = LogprobSettings(recipe.train.logprob_impl, recipe.train.logprob_chunk_size)
        self.gold = load_gold(self.online.gold, what="online.gold") if self.online.gold else None
        self.kl_coef = self.online.kl_coef
        self.current: tuple[int, dict[str, Tensor]] | None = None
        self.budget = Budget()
        tokenizer = model.tokenizer
        self.decode = lambda ids: completion_text(ids, lambda i: tokenizer.decode(i, skip_special_tokens=True),
                                                  tokenizer.eos_token_id)

    # ------------------------------------------------------------------------------- loop interface

    @property
    def samples_per_rollout(self) -> int:
        return self.online.prompts_per_rollout * self.generation.samples_per_prompt

    def micro_batches(self, batch_size: int, world: int, log: Log) -> int:
        """Micro-batches of one rollout: ``ppo_epochs`` passes of ``ceil(samples / batch_size)``."""
        if world > 1:
            raise ValueError(f"task: {self.recipe.task} runs in one process (the rollout is sampled by one "
                             f"policy); start it without torchrun/accelerate launch ({world} processes now)")
        return self.online.ppo_epochs * math.ceil(self.samples_per_rollout / batch_size)

    def epochs(self, epochs: int) -> int:
        """Rollouts in ``epochs`` passes over the training prompts."""
        return epochs * math.ceil(len(self.prompts.train) / self.online.prompts_per_rollout)

    def epoch(self, number: int, rank: int = 0, world: int = 1) -> list[dict[str, Tensor]]:
        """The micro-batches of rollout ``number``, sampled now unless the restored one is that rollout. Each
        carries its samples' numbers (reward, KL, length, ...), which the loss reports as metrics."""
        self.budget.start()
        if self.current is None or self.current[0] != number:
            self.current = (number, self.collect(number))
        return self.passes(number, self.current[1])

    def state(self) -> dict[str, Tensor]:
        """Tensors a checkpoint keeps: the current rollout, the KL coefficient and the budget so far."""
        state = {"number": torch.tensor([self.current[0] if self.current else -1]),
                 "kl_coef": torch.tensor([self.kl_coef], dtype=torch.float64),
                 "budget": torch.tensor([self.budget.samples, self.budget.tokens, self.budget.rollouts]),
                 "wall_time_s": torch.tensor([self.budget.elapsed()], dtype=torch.float64)}
        if self.current is not None:
            state.update({f"rollout.{key}": value for key, value in self.current[1].items()})
        return state

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Continue from :meth:`state`'s tensors (a checkpoint)."""
        if not state:
            return
        number = int(state["number"][0])
        rollout = {key.removeprefix("rollout."): value for key, value in state.items() if key.startswith("rollout.")}
        self.current = (number, rollout) if number >= 0 else None
        self.kl_coef = float(state["kl_coef"][0])
        samples, tokens, rollouts = (int(v) for v in state["budget"])
        self.budget = Budget(samples, tokens, rollouts, float(state["wall_time_s"][0]))
        self.budget.start()

    def summary(self) -> dict[str, Any]:
        """The run's training budget, for ``final_metrics.json``."""
        return {"budget": {"samples_generated": self.budget.samples, "tokens_generated": self.budget.tokens,
                           "rollouts": self.budget.rollouts, "wall_time_s": round(self.budget.elapsed(), 3)}}

    # ------------------------------------------------------------------------------------ the rollout

    def prompt_positions(self, number: int) -> list[int]:
        """The training prompts of rollout ``number``: consecutive slices of one shuffled order per pass over
        them, each pass's order drawn from ``(train.seed, pass)``."""
        n, size = len(self.prompts.train), self.online.prompts_per_rollout
        orders: dict[int, list[int]] = {}
        positions = []
        for q in range(number * size, (number + 1) * size):
            if q // n not in orders:
                generator = torch.Generator().manual_seed(self.recipe.train.seed + q // n)
                orders[q // n] = torch.randperm(n, generator=generator).tolist()
            positions.append(orders[q // n][q % n])
        return positions

    def sample(self, prompt_ids: list[list[int]], samples_per_prompt: int, seed: int) -> tuple[Samples, float]:
        """Completions from the policy (adapter on, KV cache on) under a forked generator; and the seconds taken."""
        settings = SamplingSettings(self.generation.max_new_tokens, self.generation.temperature,
                                    self.generation.top_p, samples_per_prompt, seed, self.generation.batch_size)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        start = time.perf_counter()
        with torch.random.fork_rng(devices=devices), self.model.role("policy") as policy:
            samples = sample_completions(policy, self.model.tokenizer, prompt_ids, settings, self.device)
        return samples, time.perf_counter() - start

    @torch.no_grad()
    def per_token(self, batch: dict[str, Tensor], role: str) -> tuple[Tensor, Tensor]:
        """``[S, L]`` log-probs (or values for ``role`` "value") of every sample, in no-grad passes of
        ``reference.batch_size`` samples, and the completion mask."""
        size = self.recipe.reference.batch_size
        chunks, masks = [], []
        width = int((batch["labels"][:, 1:] != -100).sum(dim=1).max())
        for start in range(0, batch["input_ids"].shape[0], size):
            part = {k: v[start : start + size].to(self.device) for k, v in batch.items()}
            with self.model.role(role) as model:
                if role == "value":
                    values = completion_values(model, part)
                    mask = torch.zeros_like(values, dtype=torch.bool)
                else:
                    values, mask = completion_logprobs(model, part, self.settings, self.generation.temperature)
            pad = width - values.shape[1]
            chunks.append(torch.nn.functional.pad(values.cpu(), (0, pad)))
            masks.append(torch.nn.functional.pad(mask.cpu(), (0, pad)))
        return torch.cat(chunks), torch.cat(masks)

    def score(self, prompts: list[Any], texts: list[str], source: str) -> Tensor:
        """``[S]`` reward-model scores of (prompt, completion text), chat prompts getting an assistant turn."""
        rows = [{"prompt": p, "completion": [{"role": "assistant", "content": t}] if isinstance(p, list) else t}
                for p, t in zip(prompts, texts)]
        with self.model.role("reward"):
            return torch.tensor(score_texts(self.model.reward, rows, self.recipe.reference.batch_size, self.device,
                                            source), dtype=torch.float32)

    def measure(self, prompts: list[Any], prompt_ids: list[list[int]], samples: Samples,
                source: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Everything known about a set of samples: the padded batch and per-token log-probs
        (``tensors``), and per-sample numbers (``stats``)."""
        pairs = [(prompt_ids[p], ids) for p, ids in zip(samples.prompt_index, samples.completion_ids)]
        batch = pad_sequences(pairs, self.model.tokenizer.pad_token_id)
        logps, mask = self.per_token(batch, "policy")
        ref_logps, _ = self.per_token(batch, "reference")
        ended = torch.tensor(samples.ended)
        texts = [self.decode(ids) for ids in samples.completion_ids]
        sample_prompts = [prompts[p] for p in samples.prompt_index]
        k1, k3 = obj.kl_per_token(logps, ref_logps, mask)
        counts = mask.sum(dim=1)
        stats = {"reward/proxy": self.score(sample_prompts, texts, source), "kl/k1": k1.sum(dim=1),
                 "kl/k3": k3.sum(dim=1), "length": (counts - ended.long()).float(), "ended": ended.float(),
                 "entropy": torch.tensor(samples.entropy_sum) / counts.float()}
        if self.gold is not None:
            stats["reward/gold"] = torch.tensor([self.gold(p, t) for p, t in zip(sample_prompts, texts)],
                                                dtype=torch.float32)
        return {**batch, "mask": mask, "old_logps": logps, "ref_logps": ref_logps}, stats

    def collect(self, number: int) -> dict[str, Tensor]:
        """Sample, score and compute the advantages of rollout ``number``."""
        start = time.perf_counter()
        was_training = self.model.peft.training
        self.model.peft.eval()  # no dropout in any role while the rollout is measured
        try:
            positions = self.prompt_positions(number)
            prompts = [self.prompts.train[p] for p in positions]
            prompt_ids = [self.prompts.train_ids[p] for p in positions]
            samples, seconds = self.sample(prompt_ids, self.generation.samples_per_prompt,
                                           self.generation.seed + 1 + number)
            tensors, stats = self.measure(prompts, prompt_ids, samples, f"rollout {number}")
            if self.ppo:
                tensors["old_values"], _ = self.per_token({k: tensors[k] for k in SEQUENCE_KEYS}, "value")
        finally:
            self.model.peft.train(was_training)
        mask, score = tensors["mask"], stats["reward/proxy"]
        if self.online.missing_eos_penalty is not None:
            score = score - self.online.missing_eos_penalty * (1 - stats["ended"])
        stats["reward/total"] = score - self.kl_coef * stats["kl/k1"]
        if self.ppo:
            rewards = obj.token_rewards(score, tensors["old_logps"], tensors.pop("ref_logps"), mask, self.kl_coef)
            advantages, tensors["returns"] = obj.gae(rewards, tensors["old_values"], mask, self.online.gamma,
                                                     self.online.gae_lambda)
            raw_mean, raw_std = obj.masked_mean(advantages, mask), obj.masked_var(advantages, mask).sqrt()
            tensors["advantages"] = obj.whiten(advantages, mask) if self.online.whiten_advantages else advantages
        else:
            tensors.pop("ref_logps")
            k = self.generation.samples_per_prompt
            advantage_fn = obj.grpo_advantages if self.online.advantage == "grpo" else obj.rloo_advantages
            tensors["advantages"] = advantage_fn(stats["reward/total"], k)
            raw_mean, raw_std = tensors["advantages"].mean(), tensors["advantages"].std()
        size = mask.shape[0]
        tokens = int(sum(len(ids) for ids in samples.completion_ids))
        stats.update({"kl_coef": torch.full((size,), self.kl_coef), "advantages/mean": raw_mean.expand(size),
                      "advantages/std": raw_std.expand(size),
                      "rollout/tokens_per_s": torch.full((size,), tokens / seconds if seconds > 0 else math.nan),
                      "rollout/seconds": torch.full((size,), time.perf_counter() - start)})
        if self.online.kl_target is not None:
            self.kl_coef = obj.adaptive_kl_coef(self.kl_coef, float(stats["kl/k1"].mean()), self.online.kl_target,
                                                self.online.kl_horizon, size)
        self.budget.samples += size
        self.budget.tokens += tokens
        self.budget.rollouts += 1
        return {**tensors, **{key: value.float().contiguous() for key, value in stats.items()}}

    def passes(self, number: int, rollout: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """``ppo_epochs`` shuffled passes over the rollout in micro-batches of ``train.batch_size`` samples, each
        cut to its own longest sequence and completion."""
        size, batch_size = rollout["input_ids"].shape[0], self.recipe.train.batch_size
        batches = []
        for epoch in range(self.online.ppo_epochs):
            seed = (self.recipe.train.seed * 1_000_003 + number) * 131 + epoch
            order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
            for start in range(0, size, batch_size):
                rows = order[start : start + batch_size]
                width = int(rollout["attention_mask"][rows].sum(dim=1).max())
                tokens = int(rollout["mask"][rows].sum(dim=1).max())
                batch = {}
                for key, value in rollout.items():
                    value = value[rows]
                    if key in SEQUENCE_KEYS:
                        value = value[:, :width]
                    elif key in TOKEN_KEYS and value.dim() == 2:
                        value = value[:, :tokens]
                    batch[key] = value
                batch["sequence_lengths"] = batch["attention_mask"].sum(dim=1)  # real tokens, for tokens/s
                batches.append(batch)
        return batches

    # ------------------------------------------------------------------------------- loss and eval

    def loss(self, step, batch: dict[str, Tensor], split: str) -> LossOutput:
        """The training objective on a rollout micro-batch, or (``split`` "eval") held-out sampling metrics."""
        if split == "eval":
            return self.evaluate(batch["index"].tolist())
        logps, mask, values = step(batch)
        online = self.online
        if self.ppo:
            out = obj.ppo_objective(logps, batch["old_logps"], values, batch["old_values"], batch["advantages"],
                                    batch["returns"], mask, clip_range=online.clip_range,
                                    value_clip_range=online.value_clip_range, value_coef=online.value_coef)
        else:
            out = obj.policy_gradient_objective(logps, batch["old_logps"], batch["advantages"], mask,
                                                online.clip_range)
        return LossOutput(out.losses, {**out.metrics, **{key: batch[key] for key in STAT_KEYS if key in batch}})

    @torch.no_grad()
    def evaluate(self, indices: list[int]) -> LossOutput:
        """One sample per held-out prompt (the rollouts' settings, fixed seeds): proxy and gold reward, KL to
        the reference, length, EOS share and entropy. No loss (the loop's ``loss`` is absent from eval)."""
        prompts = [self.prompts.eval[i] for i in indices]
        prompt_ids = [self.prompts.eval_ids[i] for i in indices]
        samples, _ = self.sample(prompt_ids, 1, self.generation.seed + EVAL_SEED_OFFSET + indices[0])
        _, stats = self.measure(prompts, prompt_ids, samples, "held-out samples")
        return LossOutput(torch.zeros(0), stats)


def prompt_rows(prompt_ids: list[list[int]]) -> list[dict[str, Any]]:
    """Held-out prompts as the loop's eval rows (batched by length like every no-grad pass)."""
    return [{"index": i, "prompt_ids": ids} for i, ids in enumerate(prompt_ids)]


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, Tensor]:
    """An eval batch: the held-out prompts' positions (``index [B]``); :meth:`Rollouts.evaluate` samples them."""
    return {"index": torch.tensor([row["index"] for row in rows], dtype=torch.long)}
