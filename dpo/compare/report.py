"""The comparison report: every number in ``report.json``, the same numbers in ``report.md``, and plots.

The Markdown is rendered from the JSON content alone (each number through :func:`fmt`), so the two cannot
disagree. Nothing time- or machine-dependent beyond the device and library versions is written, so the same
compare file and seed give byte-identical JSON and Markdown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from dpo.compare import metrics as cm
from dpo.model import completion_text

Log = Callable[[str], None]

# Below this held-out accuracy a reward model ranks pairs little better than a coin: its scores say little,
# and the report and the log say so in words.
INFORMATIVE_ACCURACY = 0.6

# (JSON section, key, column heading) of the per-model table, in order.
COLUMNS = [
    ("reward", "mean", "reward"),
    ("reward", "standard_error", "reward s.e."),
    ("reward", "std", "reward s.d."),
    ("gold", "mean", "gold"),
    ("gold", "standard_error", "gold s.e."),
    ("gold", "std", "gold s.d."),
    ("reward", "win_rate", "win rate"),
    ("reward", "win_rate_length_controlled", "win rate, length ±10%"),
    ("reward", "length_controlled_pairs", "pairs, length ±10%"),
    ("preference_accuracy", "value", "preference accuracy"),
    ("drift", "kl", "KL(π‖π_ref)"),
    ("drift", "kl_standard_error", "KL s.e."),
    ("verbosity", "mean_length", "mean length"),
    ("verbosity", "median_length", "median length"),
    ("verbosity", "ended_fraction", "ended with EOS"),
    ("diversity", "distinct_1", "distinct-1"),
    ("diversity", "distinct_2", "distinct-2"),
    ("diversity", "mean_token_entropy", "entropy/token"),
]


def fmt(value: Any) -> str:
    """How a number appears in the Markdown: integers as they are, floats with 4 decimals, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def lengths(samples) -> list[int]:
    """Completion lengths in tokens, without the EOS."""
    return [len(ids) - int(ended) for ids, ended in zip(samples.completion_ids, samples.ended)]


def model_numbers(result, reference) -> dict[str, Any]:
    """Every per-model number of the report (see the module docstring of :mod:`dpo.compare.metrics`)."""
    samples = result.samples
    own_lengths, reference_lengths = lengths(samples), lengths(reference.samples)
    controlled, controlled_pairs = cm.length_controlled_win_rate(result.scores, reference.scores, own_lengths,
                                                                 reference_lengths)
    kl, kl_se = cm.mean_and_standard_error([a - b for a, b in zip(result.logps, result.reference_logps)])
    reward, reward_se = cm.mean_and_standard_error(result.scores)
    reward_std = reward_se * math.sqrt(len(result.scores)) if reward_se is not None else None
    tokens = sum(len(ids) for ids in samples.completion_ids)
    contents = [ids[:length] for ids, length in zip(samples.completion_ids, own_lengths)]
    proxy_gain, proxy_se = cm.paired_gain(result.scores, reference.scores)
    gold = {"mean": None, "standard_error": None, "std": None, "gain": None, "gain_standard_error": None}
    if result.gold is not None:
        gold_mean, gold_mean_se = cm.mean_and_standard_error(result.gold)
        gold_gain, gold_se = cm.paired_gain(result.gold, reference.gold)
        gold = {"mean": gold_mean, "standard_error": gold_mean_se,
                "std": gold_mean_se * math.sqrt(len(result.gold)) if gold_mean_se is not None else None,
                "gain": gold_gain, "gain_standard_error": gold_se}
    return {
        "name": result.name,
        "reward": {
            "mean": reward,
            "standard_error": reward_se,
            "std": reward_std,
            "win_rate": cm.win_rate(result.scores, reference.scores),
            "win_rate_length_controlled": controlled,
            "length_controlled_pairs": controlled_pairs,
            "gain": proxy_gain,
            "gain_standard_error": proxy_se,
        },
        "gold": gold,
        "reward_hacking": result is not reference and cm.reward_hacking(proxy_gain, proxy_se, gold["gain"]),
        "budget": result.budget,
        "preference_accuracy": {"value": result.preference_accuracy, "method": result.accuracy_method},
        "drift": {"kl": kl, "kl_standard_error": kl_se, "samples": len(result.logps)},
        "verbosity": {
            "mean_length": cm.mean(own_lengths),
            "median_length": cm.median(own_lengths),
            "ended_fraction": cm.mean([float(e) for e in samples.ended]),
        },
        "diversity": {
            "distinct_1": cm.distinct_n(contents, 1),
            "distinct_2": cm.distinct_n(contents, 2),
            "mean_token_entropy": math.fsum(samples.entropy_sum) / tokens if tokens else None,
        },
    }


def software() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"torch": str(torch.__version__), "transformers": str(transformers.__version__), "peft": str(peft.__version__)}


def reward_model_warning(reward: dict[str, Any]) -> str | None:
    """The words the report and the log say when the reward model's own held-out accuracy is near chance
    (below :data:`INFORMATIVE_ACCURACY`); None otherwise, or when it is unknown."""
    accuracy = reward.get("preference_accuracy")
    if accuracy is None:
        accuracy, where = reward.get("training_accuracy"), "on its own held-out pairs when it was trained"
    else:
        where = f"on the {reward['pairs']} held-out pairs"
    if accuracy is None or accuracy >= INFORMATIVE_ACCURACY:
        return None
    return (f"the reward model ranks only {accuracy:.1%} of pairs right {where} (chance is 50%), so its scores "
            "carry little information: the rewards and win rates below are close to noise. Train it longer or on "
            "more data before reading them")


def build_report(config, source: str, prompts: list[Any], results: list, reward: dict[str, Any],
                 device) -> dict[str, Any]:
    """The JSON content of the report: settings, per-model numbers, the reward model's own accuracy (and, when
    that is near chance, a warning in words)."""
    reference = next(r for r in results if r.name == config.reference_name)
    settings = config.model_dump(mode="json", exclude={"output"})
    settings.update(compare_file=source, reference=config.reference_name, prompt_count=len(prompts),
                    samples_per_model=len(prompts) * config.generation.samples_per_prompt,
                    device=str(device), software=software())
    reward = {**reward, "warning": reward_model_warning(reward)}
    return {
        "settings": settings,
        "models": [model_numbers(r, reference) for r in results],
        "reward_model": reward,
    }


def markdown(report: dict[str, Any]) -> str:
    """``report.md``, from the JSON content only."""
    settings = report["settings"]
    reference = settings["reference"]
    generation = settings["generation"]
    gold = settings.get("gold")
    columns = [c for c in COLUMNS if gold or c[0] != "gold"]
    lines = [
        "# Model comparison",
        "",
        f"{len(report['models'])} models, {settings['prompt_count']} prompts, "
        f"{generation['samples_per_prompt']} sample(s) per prompt ({settings['samples_per_model']} per model), "
        f"reference model **{reference}**, reward model `{report['reward_model']['path']}`"
        + (f", gold scorer `{gold}`." if gold else "."),
        "",
        *([f"**Warning: {report['reward_model']['warning']}.**", ""] if report["reward_model"].get("warning") else []),
        "| model | " + " | ".join(heading for _, _, heading in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for model in report["models"]:
        cells = [fmt(model[section][key]) for section, key, _ in columns]
        lines.append(f"| {model['name']} | " + " | ".join(cells) + " |")
    lines += gains_section(report)
    lines += budget_section(report)
    reward = report["reward_model"]
    lines += ["", "## Preference accuracy on the held-out pairs", ""]
    if reward["pairs"]:
        lines.append(f"Reward model (its own score): **{fmt(reward['preference_accuracy'])}** on {reward['pairs']} pairs.")
        lines.append("")
        for model in report["models"]:
            accuracy = model["preference_accuracy"]
            lines.append(f"- {model['name']}: {fmt(accuracy['value'])}, by {accuracy['method']}")
    else:
        lines.append("No held-out pairs were given (`pairs:`), so no preference accuracy was measured.")
    if reward.get("training_accuracy") is not None:
        lines += ["", f"The reward model's own held-out accuracy at the end of its training: "
                      f"{fmt(reward['training_accuracy'])} (its `final_metrics.json`)."]
    lines += [
        "",
        "## What the columns mean",
        "",
        "- **reward**: mean reward-model score of the model's samples, with its standard error (**reward s.e.**, "
        "s/√n over samples) and the spread of single samples' scores (**reward s.d.**); **gold**, **gold s.e.**, "
        "**gold s.d.** the same for the gold scorer when one is given. "
        f"**win rate**: against {reference}'s sample "
        "with the same prompt and sample number, scored by the reward model; a tie counts half.",
        "- **win rate, length ±10%**: the same, over only the pairs whose lengths differ by under 10% of the longer "
        "(equal lengths included), a length-controlled view; **pairs, length ±10%** is how many pairs that is.",
        "- **KL(π‖π_ref)**: mean over the model's own samples of log π(y|x) − log π_ref(y|x) (summed over completion "
        f"tokens, EOS included; π_ref = {reference}), with its standard error s/√n. Log-probs are taken at the "
        "sampling temperature (the logits divided by it; greedy sampling: the models' own), without top-p, so with "
        "top-p this estimates drift, not the sampler's KL.",
        "- **mean / median length**: completion tokens without the EOS. **ended with EOS**: the fraction of samples "
        "that stopped before max_new_tokens.",
        "- **distinct-1 / distinct-2**: distinct token unigrams / bigrams over all the model's samples (within "
        "samples). **entropy/token**: the policy's entropy (nats) at each sampled position, from its raw logits, "
        "averaged over all completion tokens.",
        "",
        "## Plots",
        "",
        "![reward against KL](reward_vs_kl.png)",
        "",
        "![length distributions](lengths.png)",
        "",
        "## Settings",
        "",
        "```yaml",
        yaml.safe_dump(settings, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def reward_axis_limits(models: list[dict[str, Any]], section: str = "reward") -> tuple[float, float]:
    """A reward axis of ``reward_vs_kl.png`` (``section``: "reward" or "gold"): every mean with two standard
    errors either side, and never narrower than the larger per-sample spread (one standard deviation of single samples' scores), so that a
    difference far smaller than how much single samples vary is drawn small, not blown up to fill the plot."""
    means = [m[section]["mean"] for m in models if m[section]["mean"] is not None]
    if not means:
        return 0.0, 1.0
    errors = [2 * (m[section]["standard_error"] or 0.0) for m in models if m[section]["mean"] is not None]
    low = min(mean - error for mean, error in zip(means, errors))
    high = max(mean + error for mean, error in zip(means, errors))
    spread = max((m[section]["std"] or 0.0 for m in models), default=0.0)
    if high - low < spread:
        middle = (high + low) / 2
        low, high = middle - spread / 2, middle + spread / 2
    pad = 0.08 * (high - low) or 0.5
    return low - pad, high + pad


def gains_section(report: dict[str, Any]) -> list[str]:
    """Each model's proxy (and gold) gain over the reference, and the models flagged for reward hacking."""
    reference = report["settings"]["reference"]
    gold = report["settings"].get("gold")
    lines = ["", "## Gains over the reference" + (": proxy against gold" if gold else ""), "",
             f"Mean difference from **{reference}** on the same prompts and sample numbers, ± its standard error."]
    if gold:
        lines.append("A model is flagged when its reward-model score rose by more than two standard errors while its "
                     "gold reward did not rise: the proxy is being optimised past what it measures (reward hacking, "
                     "Gao et al. 2022). `reward_vs_kl.png` shows both against KL.")
    else:
        lines.append("No gold scorer was given (`gold:`), so no gold gain and no reward-hacking flag.")
    lines += ["", "| policy | proxy gain | gold gain | KL(π‖π_ref) | flag |", "|---|---:|---:|---:|---|"]
    for model in report["models"]:
        if model["name"] == reference:
            continue
        proxy, gold_numbers = model["reward"], model["gold"]
        flag = "**reward hacking**: proxy up, gold not" if model["reward_hacking"] else ""
        lines.append(f"| {model['name']} | {fmt(proxy['gain'])} ± {fmt(proxy['gain_standard_error'])} | "
                     f"{fmt(gold_numbers['gain'])} ± {fmt(gold_numbers['gain_standard_error'])} | "
                     f"{fmt(model['drift']['kl'])} | {flag} |")
    return lines


def budget_section(report: dict[str, Any]) -> list[str]:
    """Each trained run's budget: optimizer steps, and for online runs the samples generated and wall time."""
    runs = [m for m in report["models"] if m.get("budget")]
    if not runs:
        return []
    lines = ["", "## Training budget", "",
             "| run | optimizer steps | samples generated | tokens generated | rollouts | wall time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for model in runs:
        budget = model["budget"]
        cells = [fmt(budget.get(key)) for key in ("optimizer_steps", "samples_generated", "tokens_generated",
                                                  "rollouts", "wall_time_s")]
        lines.append(f"| {model['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Samples and wall time are an online run's (rollouts sampled in training, wall time from its first "
              "rollout to its end, over resumed runs); an offline run shows its optimizer steps."]
    return lines


def plot(report: dict[str, Any], model_lengths: dict[str, list[int]], out_dir: Path) -> list[Path]:
    """``reward_vs_kl.png`` (mean reward against KL, each with its standard error as an error bar, on an axis no
    narrower than the spread of single samples' scores; with a gold scorer a second panel, the gold reward
    against KL) and ``lengths.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    panels = [("reward", "mean reward-model score (proxy)")]
    if report["settings"].get("gold"):
        panels.append(("gold", "mean gold reward"))
    figure, all_axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.8), squeeze=False)
    # KL is zero for the reference and not negative in expectation: the axis starts at zero.
    kls = [(m["drift"]["kl"] or 0.0) + 2 * (m["drift"]["kl_standard_error"] or 0.0) for m in models]
    lows = [(m["drift"]["kl"] or 0.0) - 2 * (m["drift"]["kl_standard_error"] or 0.0) for m in models]
    for axes, (section, label) in zip(all_axes[0], panels):
        for model in models:
            kl, kl_se = model["drift"]["kl"], model["drift"]["kl_standard_error"]
            value, value_se = model[section]["mean"], model[section]["standard_error"]
            axes.errorbar([kl], [value], xerr=[kl_se or 0.0], yerr=[value_se or 0.0], fmt="o", capsize=4,
                          label=model["name"])
            axes.annotate(model["name"], (kl, value), textcoords="offset points", xytext=(6, 6))
        axes.set_ylim(*reward_axis_limits(models, section))
        axes.set_xlim(min(0.0, *lows) - 0.05 * (max(kls) or 1.0), 1.1 * max(max(kls), 1e-3))
        axes.set_xlabel(f"KL(π ‖ π_ref), nats per sample (π_ref = {report['settings']['reference']})")
        axes.set_ylabel(label)
        spread = max((m[section]["std"] or 0.0 for m in models), default=0.0)
        axes.set_title(f"{label.split(' (')[0].capitalize()} against drift from the reference\n"
                       f"error bars: ±1 standard error; axis at least one sample s.d. ({spread:.3g}) tall",
                       fontsize="medium")
        axes.grid(alpha=0.3)
    warning = report["reward_model"].get("warning")
    if warning:
        all_axes[0][0].text(0.5, 0.02, "reward model near chance: its scores carry little information",
                            color="darkred", transform=all_axes[0][0].transAxes, ha="center", va="bottom",
                            fontsize="small")
    figure.tight_layout()
    reward_path = out_dir / "reward_vs_kl.png"
    figure.savefig(reward_path, dpi=120, metadata={"Software": None})
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6, 4.5))
    longest = max((max(values, default=0) for values in model_lengths.values()), default=0)
    bins = [b - 0.5 for b in range(longest + 2)]
    for name, values in model_lengths.items():
        axes.hist(values, bins=bins, histtype="step", linewidth=1.5, label=name)
    axes.set_xlabel("completion length (tokens, without EOS)")
    axes.set_ylabel("samples")
    axes.set_title("Length distributions")
    axes.legend()
    figure.tight_layout()
    lengths_path = out_dir / "lengths.png"
    figure.savefig(lengths_path, dpi=120, metadata={"Software": None})
    plt.close(figure)
    return [reward_path, lengths_path]


def write_report(report: dict[str, Any], results: list, prompts: list[Any], decode, eos_id: int, out_dir: Path,
                 log: Log) -> None:
    """``report.json``, ``report.md``, ``samples.jsonl`` (every sample with its numbers) and the plots."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(markdown(report), encoding="utf-8")
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as handle:
        for result in results:
            samples, sample_lengths = result.samples, lengths(result.samples)
            for i, prompt_index in enumerate(samples.prompt_index):
                handle.write(json.dumps({
                    "model": result.name, "prompt_index": prompt_index, "prompt": prompts[prompt_index],
                    "completion": completion_text(samples.completion_ids[i], decode, eos_id),
                    "length": sample_lengths[i], "ended": samples.ended[i], "score": result.scores[i],
                    "gold": result.gold[i] if result.gold is not None else None,
                    "logp": result.logps[i], "reference_logp": result.reference_logps[i],
                }, ensure_ascii=False) + "\n")
    plot(report, {r.name: lengths(r.samples) for r in results}, out_dir)
    log(f"report written to {out_dir / 'report.md'} (numbers in report.json, samples in samples.jsonl)")
