"""``dpo-train pairs``: preference pairs from the model's own samples, best against worst by a scorer.

Pairs written by someone else (another model, a human, a template) can be far from anything the model
would say; DPO then learns to tell the two sides apart by what is easy (style, length) and pushes both
down (see :mod:`dpo.train.guards`). Pairs sampled from the model itself and ranked by the task's own
rule are what it can learn from: the chosen answer is one it already gives sometimes. Repeating
sample -> rank -> train with the new policy is iterative (online) DPO.

For each prompt: ``k`` completions are sampled (temperature, top-p, seed), each is scored (a gold
``module:function`` or a ``task: reward`` run), and the best and worst one become a pair. Left out:

* samples cut at ``max_new_tokens`` without an EOS (unless ``keep_unfinished``: training appends an EOS
  to every completion, so a cut-off answer would be taught as a finished one) and empty ones;
* prompts with fewer than two samples left; prompts whose samples all scored the same ("all equal": no
  preference); prompts whose best and worst differ by no more than ``min_margin`` ("ties"), or only in
  whitespace.

Each left-out case is counted in the summary. Rows are written in the explicit layout (text prompts) or
the conversational one (chat prompts, or text prompts with ``layout: conversational``, which are then
sampled through the chat template as one user message), with ``score_chosen`` and ``score_rejected``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpo.compare import PromptSet, read_prompts
from dpo.data.chat import resolve_chat_template
from dpo.data.validate import DataError
from dpo.files import write_text_atomic, writing
from dpo.model import (
    ModelError,
    SamplingSettings,
    completion_text,
    encode_prompt,
    load_base_model,
    load_tokenizer,
    model_location,
    sample_completions,
)
from dpo.recipe import ModelConfig, Recipe, RecipeError, load_recipe
from dpo.reward import load_gold, load_reward_run, run_recipe, score_texts

Log = Callable[[str], None]
Scorer = Callable[[list[dict[str, Any]]], list[float]]


@dataclass(frozen=True)
class PairSettings:
    """How pairs are sampled and chosen (see the module docstring)."""

    k: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8
    layout: str = "auto"
    min_margin: float = 0.0
    keep_unfinished: bool = False
    max_prompt_length: int | None = None
    max_prompts: int | None = None


@dataclass
class Sampler:
    """The model pairs are sampled from.

    Attributes:
        model: a causal LM (a peft model, adapter active, for a run or an adapter).
        tokenizer: its tokenizer.
        description: what it is, for the log.
        recipe: the run's or recipe's settings (chat template, prompt length), or None.
    """

    model: nn.Module
    tokenizer: Any
    description: str
    recipe: Recipe | None = None


@dataclass
class PairsReport:
    """What ``build_pairs`` wrote and left out."""

    out: Path
    prompts: int
    pairs: int
    dropped: Counter = field(default_factory=Counter)
    left_out: Counter = field(default_factory=Counter)


# --------------------------------------------------------------------------------------------- sources


def _with_adapter(base: nn.Module, adapter: Path) -> nn.Module:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"{adapter}: cannot load this adapter onto its base model: {exc}") from None


def load_sampler(source: str, device, dtype: str = "float32", base: str | None = None) -> Sampler:
    """The model ``source`` names: a recipe file (its base model), a finished run (base + its adapter), an
    adapter folder (onto ``base``, or the base its ``adapter_config.json`` names), a ``.gguf`` file or a
    model folder.

    Args:
        source: the RECIPE_OR_MODEL argument.
        device: where to put the model.
        dtype: weights of a model named by a folder or file (a recipe or run uses its own ``model.dtype``).
        base: the base for an adapter folder (a folder or a ``.gguf`` file).
    """
    path = Path(source).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        recipe = load_recipe(path)
        model = load_base_model(recipe.model, device=device).eval()
        named = f" ({recipe.model.gguf_file})" if recipe.model.gguf_file else ""
        return Sampler(model, load_tokenizer(recipe.model), f"{recipe.model.path}{named} (the base of {path})", recipe)
    if (path / "recipe.yaml").is_file() and (path / "adapter").is_dir():
        recipe = run_recipe(path, "RECIPE_OR_MODEL")
        if recipe.task != "preference":
            raise RecipeError(f"RECIPE_OR_MODEL: {path} is a {recipe.task} model, not a policy; pass it as --scorer")
        model = _with_adapter(load_base_model(recipe.model, device=device), path / "adapter")
        tokenizer = load_tokenizer(recipe.model, path=str(path / "adapter"))
        return Sampler(model, tokenizer, f"the run {path} (its base + adapter)", recipe)
    if (path / "adapter_config.json").is_file():
        named_base = base or json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not named_base:
            raise ModelError(f"{path}: the adapter does not name its base model; pass --base (a folder or .gguf file)")
        folder, gguf_file = model_location(named_base)
        config = ModelConfig(path=folder, gguf_file=gguf_file, dtype=dtype)
        model = _with_adapter(load_base_model(config, device=device), path)
        tokenizer = load_tokenizer(config, path=str(path)) if (path / "tokenizer_config.json").is_file() \
            else load_tokenizer(config)
        return Sampler(model, tokenizer, f"the adapter {path} on {named_base}")
    folder, gguf_file = model_location(source)
    config = ModelConfig(path=folder, gguf_file=gguf_file, dtype=dtype)
    return Sampler(load_base_model(config, device=device).eval(), load_tokenizer(config), source)


def load_scorer(spec: str, device, batch_size: int) -> tuple[Scorer, str]:
    """A ``task: reward`` run directory, or a gold ``module:function`` / ``file.py:function``; returns a
    function of ``{"prompt", "completion"}`` rows and its description."""
    if Path(spec).expanduser().is_dir():
        run = load_reward_run(spec, device, what="--scorer")
        return (lambda rows: score_texts(run, rows, batch_size, device, "samples")), f"the reward model {spec}"
    gold = load_gold(spec, what="--scorer")

    def score(rows: list[dict[str, Any]]) -> list[float]:
        return [gold(row["prompt"], row["text"]) for row in rows]

    return score, f"the gold scorer {spec}"


# ------------------------------------------------------------------------------------------------ pairs


def as_chat(prompt: Any, layout: str) -> Any:
    """The prompt as it is sampled and written: text prompts become one user message under
    ``conversational``; chat prompts cannot be written in the explicit layout."""
    if isinstance(prompt, list):
        if layout == "explicit":
            raise DataError("--layout explicit: the prompts are chat messages; use --layout conversational (or auto)")
        return prompt
    return [{"role": "user", "content": prompt}] if layout == "conversational" else prompt


def choose_pair(scored: list[tuple[float, str]], min_margin: float) -> tuple[tuple[float, str], tuple[float, str]] | str:
    """The best and worst of one prompt's ``(score, text)`` samples, or why there is no pair.

    The first of equal best (or worst) scores is taken, so a result depends only on the samples' order.
    """
    if len(scored) < 2:
        return "fewer than 2 usable samples"
    best = max(scored, key=lambda item: item[0])
    worst = min(scored, key=lambda item: item[0])
    margin = best[0] - worst[0]
    if margin == 0:
        return "all samples scored the same"
    if margin <= min_margin:
        return f"a tie (best - worst <= --min-margin {min_margin:g})"
    if best[1].split() == worst[1].split():
        return "best and worst differ only in whitespace"
    return best, worst


def build_pairs(sampler: Sampler, prompts_file: str, scorer: Scorer, scorer_name: str, out: str | Path,
                settings: PairSettings, device, log: Log = print) -> PairsReport:
    """Sample, score and pair; write the pairs as JSON lines to ``out`` (replaced atomically)."""
    recipe_data = sampler.recipe.data if sampler.recipe is not None else None
    max_prompt_length = settings.max_prompt_length or (recipe_data.max_prompt_length if recipe_data else 256)
    prompt_set = PromptSet(path=prompts_file, max_prompt_length=max_prompt_length, max_prompts=settings.max_prompts)
    prompts = [as_chat(p, settings.layout) for p in read_prompts(prompt_set, log)]
    template, _ = resolve_chat_template(recipe_data.chat_template if recipe_data else None, sampler.tokenizer)
    try:
        prompt_ids = [encode_prompt(sampler.tokenizer, p, template, max_prompt_length) for p in prompts]
    except ValueError as exc:
        raise DataError(f"--prompts: {exc}") from None
    sampling = SamplingSettings(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                top_p=settings.top_p, samples_per_prompt=settings.k, seed=settings.seed,
                                batch_size=settings.batch_size)
    log(f"pairs: sampling {settings.k} completions for each of {len(prompts)} prompts from {sampler.description}")
    samples = sample_completions(sampler.model, sampler.tokenizer, prompt_ids, sampling, device)
    decode = lambda ids: sampler.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    report = PairsReport(Path(out), len(prompts), 0)
    usable: list[dict[str, Any]] = []
    for prompt_index, ids, ended in zip(samples.prompt_index, samples.completion_ids, samples.ended):
        text = completion_text(ids, decode, sampler.tokenizer.eos_token_id)
        if not ended and not settings.keep_unfinished:
            report.left_out[f"cut at --max-new-tokens {settings.max_new_tokens} without an EOS"] += 1
        elif not text.strip():
            report.left_out["empty"] += 1
        else:
            usable.append({"index": prompt_index, "prompt": prompts[prompt_index], "text": text,
                           "completion": [{"role": "assistant", "content": text}]
                           if isinstance(prompts[prompt_index], list) else text})
    log(f"pairs: scoring {len(usable)} samples with {scorer_name}")
    scores = scorer(usable) if usable else []
    by_prompt: dict[int, list[tuple[float, str]]] = {}
    for row, score in zip(usable, scores):
        by_prompt.setdefault(row["index"], []).append((score, row["text"]))
    lines, chosen_scores, rejected_scores = [], [], []
    for index, prompt in enumerate(prompts):
        choice = choose_pair(by_prompt.get(index, []), settings.min_margin)
        if isinstance(choice, str):
            report.dropped[choice] += 1
            continue
        (best_score, best), (worst_score, worst) = choice
        chat = isinstance(prompt, list)
        row = {"prompt": prompt,
               "chosen": [{"role": "assistant", "content": best}] if chat else best,
               "rejected": [{"role": "assistant", "content": worst}] if chat else worst,
               "score_chosen": best_score, "score_rejected": worst_score}
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        chosen_scores.append(best_score)
        rejected_scores.append(worst_score)
    text = "".join(lines)
    with writing(report.out, "pairs", len(text.encode("utf-8"))):
        report.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(report.out, text)
    report.pairs = len(lines)
    means = (f" (mean score: chosen {sum(chosen_scores) / len(lines):.4g}, rejected "
             f"{sum(rejected_scores) / len(lines):.4g})" if lines else "")
    log(f"pairs: wrote {report.pairs} pairs from {report.prompts} prompts to {report.out}{means}")
    for reason, count in sorted(report.dropped.items()):
        log(f"pairs: {count} prompts without a pair: {reason}")
    for reason, count in sorted(report.left_out.items()):
        log(f"pairs: {count} samples left out: {reason}")
    return report


def pairs_command(source: str, prompts_file: str, scorer_spec: str, out: str | Path, settings: PairSettings,
                  dtype: str = "float32", base: str | None = None, overwrite: bool = False,
                  log: Log = print) -> PairsReport:
    """``dpo-train pairs``: check the output and the scorer first (the slow model load comes last)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise DataError(f"--out {out}: exists; choose another file or pass --overwrite to replace it")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not Path(prompts_file).expanduser().exists():
        raise DataError(f"--prompts: {prompts_file} does not exist")
    scorer, scorer_name = load_scorer(scorer_spec, device, settings.batch_size)
    sampler = load_sampler(source, device, dtype=dtype, base=base)
    return build_pairs(sampler, prompts_file, scorer, scorer_name, out, settings, device, log)
