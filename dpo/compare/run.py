"""``dpo-train compare``: any set of policies side by side on the same prompts, judged by one reward model.

For each model: sample completions (same prompts, settings and seed for all), score them with the reward
model (the proxy) and, when the compare file names one, the gold scorer, and measure what reward training
is known to trade for reward: drift from the reference (KL(π ‖ π_ref) estimated on the model's own samples),
verbosity and diversity. With held-out pairs, also each model's preference accuracy by its implicit reward,
and the reward model's own accuracy. A run's training budget (optimizer steps; an online run's samples
generated and wall time) comes from its ``final_metrics.json``.

One model at a time is loaded beside the reference model; the reward model is loaded last.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dpo.compare.config import CompareConfig, CompareError, ModelEntry, PromptSet
from dpo.compare.report import build_report, write_report
from dpo.data import collate_paired, prepare_data
from dpo.data.chat import resolve_chat_template
from dpo.data.prompts import read_prompts as read_prompt_file
from dpo.data.validate import DataError
from dpo.losses import PairedLogps, get_loss
from dpo.model import (
    LogprobSettings,
    Samples,
    SamplingSettings,
    SequenceLogprobs,
    completion_text,
    encode_prompt,
    load_base_model,
    load_tokenizer,
    sample_completions,
    sequence_logprobs,
)
from dpo.recipe import ModelConfig, RecipeError
from dpo.reference import ReferenceLogps, compute_reference_logps, open_reference
from dpo.reward import (
    GoldError,
    load_gold,
    load_reward_run,
    pair_rewards,
    run_recipe,
    score_texts,
)

Log = Callable[[str], None]
POLICY_TASKS = ("preference", "sft", "ppo", "rloo")


@dataclass
class Policy:
    """A loaded model to compare.

    Attributes:
        entry: its entry in the compare file.
        model: the causal LM (a peft model, adapter active, for runs).
        tokenizer: its tokenizer.
        recipe: the run's recipe for ``run`` entries, else None.
    """

    entry: ModelEntry
    model: nn.Module
    tokenizer: Any
    recipe: Any = None


@dataclass
class ModelResult:
    """Per-sample values of one model (prompt-major, aligned with every other model's)."""

    name: str
    samples: Samples
    logps: list[float]
    reference_logps: list[float]
    preference_accuracy: float | None = None
    accuracy_method: str | None = None
    scores: list[float] = field(default_factory=list)
    gold: list[float] | None = None
    budget: dict[str, Any] | None = None


# ------------------------------------------------------------------------------------------- models


def load_policy(entry: ModelEntry, device) -> Policy:
    """A ``path`` entry as a plain causal LM, a ``run`` entry as its base plus its trained adapter."""
    if entry.path is not None:
        config = ModelConfig(path=entry.path, gguf_file=entry.gguf_file, dtype=entry.dtype,
                             trust_remote_code=entry.trust_remote_code)
        return Policy(entry, load_base_model(config, device=device).eval(), load_tokenizer(config))
    from peft import PeftModel

    recipe = run_recipe(entry.run, f"models.{entry.name}.run")
    if recipe.task not in POLICY_TASKS:
        raise CompareError(f"models.{entry.name}.run: {entry.run} is a {recipe.task} model, not a policy; name "
                           "a reward model under reward_model")
    adapter = str(Path(entry.run) / "adapter")
    base = load_base_model(recipe.model, device=device)
    model = PeftModel.from_pretrained(base, adapter).eval()
    return Policy(entry, model, load_tokenizer(recipe.model, path=adapter), recipe)


def check_same_vocabulary(policy: Policy, reference: Policy) -> None:
    """KL and lengths are per token, so every model must share the reference model's tokenizer."""
    same = (policy.tokenizer.get_vocab() == reference.tokenizer.get_vocab()
            and policy.tokenizer.eos_token_id == reference.tokenizer.eos_token_id)
    if not same:
        raise CompareError(
            f"models.{policy.entry.name}: its tokenizer differs from the reference model's ({reference.entry.name}); "
            "KL and token lengths are compared per token, so every model must use the reference's vocabulary"
        )


# ------------------------------------------------------------------------------------------ prompts


def read_prompts(prompt_set: PromptSet, log: Log) -> list[Any]:
    """Unique prompts (text or messages) in file order, from any supported layout or prompt-only rows."""
    return read_prompt_file(prompt_set.data_config(), prompt_set.path, "prompts.path", log, prompt_set.max_prompts)


def run_budget(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's training budget from its ``final_metrics.json``: optimizer steps, and for an online run the
    samples and tokens generated, rollouts and wall time; None when the file is missing."""
    path = Path(run_dir) / "final_metrics.json"
    if not path.is_file():
        return None
    final = json.loads(path.read_text(encoding="utf-8"))
    return {"optimizer_steps": final.get("steps"), **final.get("budget", {})}


# ------------------------------------------------------------------------------------------- log-probs


@torch.no_grad()
def sample_logps(model: nn.Module, prompt_ids: list[list[int]], samples: Samples, pad_token_id: int,
                 batch_size: int, device, temperature: float = 1.0) -> list[float]:
    """Summed log-probs of each sample's completion tokens (EOS included) under ``model``, at the sampling
    ``temperature`` (the logits divided by it, as :mod:`dpo.online` trains), so that their difference between a
    model and the reference estimates the KL of the samplers themselves."""
    from dpo.data.collate import pad_sequences
    from dpo.online.logprobs import completion_logprobs

    values: list[float] = []
    pairs = [(prompt_ids[p], c) for p, c in zip(samples.prompt_index, samples.completion_ids)]
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in pad_sequences(pairs[start : start + batch_size], pad_token_id).items()}
        if temperature == 1.0:
            sums, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                        LogprobSettings())
        else:
            sums = completion_logprobs(model, batch, LogprobSettings(), temperature)[0].sum(dim=1)
        values.extend(sums.cpu().tolist())
    return values


def pair_logps(model: nn.Module, rows, collate, batch_size: int, device, desc: str, log: Log) -> ReferenceLogps:
    """Summed log-probs of chosen (``first``) and rejected (``second``) of every held-out pair."""
    return compute_reference_logps(rows, collate, SequenceLogprobs(model), batch_size, device, desc, log)


def implicit_accuracy(policy: Policy, rows, collate, reference_pairs: ReferenceLogps, batch_size: int,
                      device, log: Log) -> tuple[float | None, str]:
    """Held-out preference accuracy by the model's implicit reward, and how that reward is defined.

    A dpo-train run uses its own loss's reward (``rewards/chosen`` against ``rewards/rejected`` as the loss
    reports them) against its own reference (the base with the adapter off, or its ``reference.model_path``).
    Any other model uses log π − log π_ref against the comparison's reference model; every β > 0 ranks the same.
    """
    from dpo.compare.metrics import ranking_accuracy

    name = policy.entry.name
    own = pair_logps(policy.model, rows, collate, batch_size, device, f"{name} (held-out pairs)", log)
    if policy.recipe is None or policy.recipe.task != "preference":  # no loss of its own: SFT, PPO, RLOO runs
        chosen = (own.first - reference_pairs.first).tolist()
        rejected = (own.second - reference_pairs.second).tolist()
        return ranking_accuracy(chosen, rejected), "implicit reward log π − log π_ref, π_ref = the reference model"
    recipe = policy.recipe
    spec, options = get_loss(recipe.loss.name), recipe.loss.options()
    reference = None
    if spec.needs_reference or not spec.paired:
        reference = run_reference_pairs(policy, rows, collate, batch_size, device, log)
    if spec.paired:
        as_paired = partial(_paired, tokens=(own.first_tokens.float(), own.second_tokens.float()))
        metrics = spec.compute(as_paired(own), as_paired(reference) if reference else None, options).metrics
        chosen, rejected = metrics["rewards/chosen"].tolist(), metrics["rewards/rejected"].tolist()
    else:  # KTO trains on unpaired rows; its reward β·(log π − log π_ref) still ranks the pair's two sides
        chosen = (options["beta"] * (own.first - reference.first)).tolist()
        rejected = (options["beta"] * (own.second - reference.second)).tolist()
    shown = ", ".join(f"{k}={v:g}" for k, v in options.items())
    against = (" against its own reference" if reference is not None else " (reference-free)")
    return ranking_accuracy(chosen, rejected), f"implicit reward of its loss, {recipe.loss.name} ({shown}){against}"


def _paired(logps: ReferenceLogps, tokens: tuple[Tensor, Tensor]) -> PairedLogps:
    return PairedLogps(logps.first, logps.second, tokens[0], tokens[1])


def run_reference_pairs(policy: Policy, rows, collate, batch_size: int, device, log: Log) -> ReferenceLogps:
    """A run's own reference on the held-out pairs, built as its trainer built it (``reference.model_path``
    and ``reference.adapter``, else its base with the adapter off)."""
    desc = f"{policy.entry.name} reference (held-out pairs)"
    with open_reference(policy.recipe, LogprobSettings(), device, policy=policy.model) as logp_fn:
        return compute_reference_logps(rows, collate, logp_fn, batch_size, device, desc, log)


# ------------------------------------------------------------------------------------------ the run


def run_compare(config: CompareConfig, source: str = "compare file", log: Log = print) -> dict[str, Any]:
    """Sample, score and measure every model; write the report; return its JSON content."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    entries = {m.name: m for m in config.models}
    reference = load_policy(entries[config.reference_name], device)
    log(f"reference model: {config.reference_name}")
    prompts = read_prompts(config.prompts, log)
    template, _ = resolve_chat_template(config.prompts.chat_template, reference.tokenizer)
    try:
        prompt_ids = [encode_prompt(reference.tokenizer, p, template, config.prompts.max_prompt_length) for p in prompts]
    except ValueError as exc:
        raise DataError(f"prompts.path: {exc}; set prompts.chat_template") from None
    sampling = SamplingSettings(**config.generation.model_dump())
    pair_rows = pair_collate = reference_pairs = None
    if config.pairs is not None:
        pair_rows = prepare_data(config.pairs.data_config(), reference.tokenizer, unpaired=False, seed=0, log=log).train
        pair_collate = partial(collate_paired, pad_token_id=reference.tokenizer.pad_token_id)
        reference_pairs = pair_logps(reference.model, pair_rows, pair_collate, config.pairs.batch_size, device,
                                     "reference (held-out pairs)", log)

    results = []
    for entry in config.models:
        policy = reference if entry.name == config.reference_name else load_policy(entry, device)
        check_same_vocabulary(policy, reference)
        log(f"{entry.name}: sampling {sampling.samples_per_prompt} completion(s) for each of {len(prompts)} prompts")
        samples = sample_completions(policy.model, policy.tokenizer, prompt_ids, sampling, device)
        pad = reference.tokenizer.pad_token_id
        temperature = sampling.temperature or 1.0  # greedy samples: the models' own log-probs
        logps = sample_logps(policy.model, prompt_ids, samples, pad, sampling.batch_size, device, temperature)
        reference_logps = (logps if policy is reference else sample_logps(
            reference.model, prompt_ids, samples, pad, sampling.batch_size, device, temperature))
        result = ModelResult(entry.name, samples, logps, reference_logps,
                             budget=run_budget(entry.run) if entry.run is not None else None)
        if pair_rows is not None:
            result.preference_accuracy, result.accuracy_method = implicit_accuracy(
                policy, pair_rows, pair_collate, reference_pairs, config.pairs.batch_size, device, log)
        results.append(result)
        del policy  # the next model loads with this one freed (the reference stays held by `reference`)
    decode = partial(reference.tokenizer.decode, skip_special_tokens=True)
    eos_id = reference.tokenizer.eos_token_id
    del reference
    reward = score_all(config, prompts, results, decode, eos_id, device, log)
    if config.gold is not None:
        score_gold(config.gold, prompts, results, decode, eos_id, log)
    report = build_report(config, source, prompts, results, reward, device)
    if report["reward_model"]["warning"]:
        log(f"warning: {report['reward_model']['warning']}")
    write_report(report, results, prompts, decode, eos_id, Path(config.output), log)
    return report


def training_accuracy(run_dir: str | Path) -> float | None:
    """The reward model's held-out accuracy after its own training (``final_metrics.json``), if recorded."""
    try:
        final = json.loads((Path(run_dir) / "final_metrics.json").read_text(encoding="utf-8"))
        value = final["eval_after"]["rewards/accuracies"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def score_gold(spec: str, prompts: list[Any], results: list[ModelResult], decode, eos_id: int, log: Log) -> None:
    """The gold scorer on every sample (prompt as the data holds it, completion as text without its EOS)."""
    try:
        scorer = load_gold(spec, what="gold")
        for result in results:
            texts = [completion_text(ids, decode, eos_id) for ids in result.samples.completion_ids]
            result.gold = [scorer(prompts[p], text) for p, text in zip(result.samples.prompt_index, texts)]
            log(f"{result.name}: scored {len(texts)} samples with the gold scorer {spec}")
    except GoldError as exc:
        raise CompareError(f"gold: {exc}") from None


def score_all(config: CompareConfig, prompts: list[Any], results: list[ModelResult], decode, eos_id: int,
              device, log: Log) -> dict[str, Any]:
    """Reward-model scores of every sample (as text, so the reward model uses its own tokenization), and the
    reward model's own held-out accuracy."""
    from dpo.compare.metrics import ranking_accuracy

    try:
        run = load_reward_run(config.reward_model, device, what="reward_model")
    except RecipeError as exc:
        raise CompareError(str(exc)) from None
    for result in results:
        rows = []
        for prompt_index, ids in zip(result.samples.prompt_index, result.samples.completion_ids):
            prompt = prompts[prompt_index]
            text = completion_text(ids, decode, eos_id)
            completion = [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
            rows.append({"prompt": prompt, "completion": completion})
        result.scores = score_texts(run, rows, config.generation.batch_size, device, f"samples of {result.name}")
        log(f"{result.name}: scored {len(rows)} samples with the reward model")
    summary: dict[str, Any] = {"path": config.reward_model, "preference_accuracy": None, "pairs": 0,
                               "training_accuracy": training_accuracy(config.reward_model)}
    if config.pairs is not None:
        data = run.recipe.data
        pairs_cfg = config.pairs.data_config().model_copy(update={
            "chat_template": config.pairs.chat_template or data.chat_template,
        })
        rows = prepare_data(pairs_cfg, run.tokenizer, unpaired=False, seed=0, log=log).train
        collate = partial(collate_paired, pad_token_id=run.tokenizer.pad_token_id)
        chosen, rejected = [], []
        with torch.no_grad():
            for start in range(0, len(rows), config.pairs.batch_size):
                batch = collate([rows[i] for i in range(start, min(start + config.pairs.batch_size, len(rows)))])
                c, r = pair_rewards(run.model, {k: v.to(device) for k, v in batch.items()})
                chosen += c.cpu().tolist()
                rejected += r.cpu().tolist()
        summary.update(preference_accuracy=ranking_accuracy(chosen, rejected), pairs=len(rows))
    return summary
