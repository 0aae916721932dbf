"""The files that explain a run: ``OUT/README.md`` (what each file of the folder is) and the adapter's model
card ``OUT/adapter/README.md`` (what it was trained from, how, with what result, and how to load it).

The adapter's ``adapter_config.json`` names its base by the resolved absolute path (or the hub id), not the
recipe's relative path, so the adapter loads from any folder (:func:`resolved_base`).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from dpo.recipe import Recipe

RUN_README = "README.md"


def resolved_base(path: str) -> str:
    """A model path as an adapter should store it: the absolute path of a local folder or file, else the hub
    id as written."""
    local = Path(path).expanduser()
    return str(local.resolve()) if local.exists() else path


def set_adapter_base(model, path: str) -> None:
    """Make every adapter of a peft ``model`` name its base by :func:`resolved_base` (written to
    ``adapter_config.json`` as ``base_model_name_or_path`` when the adapter is saved)."""
    for config in getattr(model, "peft_config", {}).values():
        config.base_model_name_or_path = resolved_base(path)


def dpo_train_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dpo-train")
    except PackageNotFoundError:
        return "(not installed)"


def run_readme(recipe: Recipe, summary: dict[str, Any] | None = None) -> str:
    """``OUT/README.md``: every file and folder a run writes there, and (once finished) its result."""
    out = recipe.output.dir
    trackers = ", ".join(recipe.output.trackers()) or "none"
    lines = [
        f"# dpo-train run: {Path(out).name}",
        "",
        f"Task `{recipe.task}`" + (f", loss `{recipe.loss.name}`" if recipe.task == "preference" else "")
        + f", base model `{resolved_base(recipe.model.path)}`, written by dpo-train {dpo_train_version()}.",
        "",
    ]
    if summary is not None:
        lines += [f"Finished after {summary['steps']} optimizer steps; held-out metrics before and after training "
                  "are in `final_metrics.json`, the adapter's own README.md shows them.", ""]
    else:
        lines += ["The run has not finished (or was stopped): `checkpoints/` holds what it can resume from "
                  "(`dpo-train recipe.yaml --resume`).", ""]
    lines += [
        "| file | what it is |",
        "|---|---|",
        "| `README.md` | this file |",
        "| `recipe.yaml` | the resolved recipe, every default filled in; `dpo-train recipe.yaml --resume` continues "
        "the run from it |",
        "| `train.log` | every line the run printed (the progress bar aside), and the libraries' warnings |",
        "| `metrics.jsonl` | one JSON record per logging step (`\"split\": \"train\"`, averaged over every example "
        "since the last one) and per evaluation (`\"split\": \"eval\"`, step 0 is before training) |",
        "| `curves.png` | loss, accuracy, rewards, log-probs, gradient norm, learning rate and throughput against "
        "the step, redrawn at each evaluation and at the end (`dpo-train plot RUN ...` overlays runs) |",
        "| `final_metrics.json` | held-out metrics before and after training, and the number of steps |",
        "| `adapter/` | the trained LoRA adapter (`adapter_model.safetensors`, `adapter_config.json`), the tokenizer "
        "and a model card (`README.md`) that says how to load it |",
        "| `checkpoints/step-NNNNNN/` | a resumable checkpoint of step N (the last `train.keep_last` are kept): "
        "`adapter/` (the adapter at that step), `optimizer.safetensors` and `optimizer.json` (optimizer state), "
        "`scheduler.json` (learning-rate schedule), `scaler.json` (fp16 loss scaler, when one runs), `rng.json` "
        "(random generator states of every process), `state.json` (position in the data, step, counters), "
        "`run.json` (resolved recipe, data and reference fingerprints, library versions) and `manifest.json` "
        "(size and SHA-256 of each file, written last: a folder without it is not a checkpoint) |",
        f"| `tensorboard/`, `wandb/`, `mlflow/` | the experiment trackers' files, for those in `output.report_to` "
        f"(here: {trackers}) |",
        "| `.dpo-train` | the run marker: the list of every path dpo-train wrote here (`--overwrite` deletes those "
        "and nothing else) |",
        "| `.dpo-train.lock` | the run lock, held by the run writing here |",
        "",
    ]
    return "\n".join(lines)


def _metric_rows(before: dict[str, float], after: dict[str, float]) -> list[str]:
    rows = ["| metric | before training | after training |", "|---|---:|---:|"]
    for key in sorted(set(before) | set(after)):
        cells = [f"{values[key]:.4f}" if key in values else "n/a" for values in (before, after)]
        rows.append(f"| `{key}` | {cells[0]} | {cells[1]} |")
    return rows


def model_card(recipe: Recipe, summary: dict[str, Any], fingerprints: dict[str, str],
               headline: tuple[str, str]) -> str:
    """``OUT/adapter/README.md``: base model, data files with their fingerprints, loss and options, steps,
    held-out metrics before and after, how to load the adapter, and the dpo-train version."""
    base = resolved_base(recipe.model.path)
    data, train, lora = recipe.data, recipe.train, recipe.lora
    key, label = headline
    before, after = summary["eval_before"], summary["eval_after"]
    result = (f"{label}: **{before[key]:.3f}** before, **{after[key]:.3f}** after training."
              if key in before and key in after else "No held-out examples: no held-out metrics.")
    kind = "reward model (Bradley–Terry)" if recipe.task == "reward" else "policy"
    loss = ("Bradley–Terry reward loss, " + ", ".join(f"{k}={v}" for k, v in recipe.reward.model_dump().items())
            if recipe.task == "reward" else
            f"`{recipe.loss.name}` (" + ", ".join(f"{k}={v}" for k, v in recipe.loss.options().items()) + ")")
    data_rows = [f"| `data.train` | `{data.train}` | `{fingerprints.get('data.train', 'n/a')}` |"]
    data_rows.append(f"| `data.eval` | `{data.eval}` | `{fingerprints.get('data.eval', 'n/a')}` |" if data.eval
                     else f"| `data.eval` | {data.eval_fraction:g} of data.train, held out with seed {train.seed} | "
                          f"`{fingerprints.get('data.eval', 'n/a')}` |")
    for name, value in sorted(fingerprints.items()):
        if name.startswith("reference."):
            data_rows.append(f"| reference log-probs ({name.split('.', 1)[1]}) | reference cache | `{value}` |")
    loader = ("AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)" if recipe.task == "reward"
              else "AutoModelForCausalLM.from_pretrained(base)")
    quant = recipe.model.quantization
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        f"tags: [dpo-train, {recipe.loss.name if recipe.task == 'preference' else 'reward-model'}, lora]",
        "---",
        "",
        f"# LoRA {kind} adapter trained with dpo-train",
        "",
        result,
        "",
        "## Base model",
        "",
        f"`{base}` in {recipe.model.dtype}"
        + (f", loaded in {quant.bits}-bit ({quant.quant_type if quant.bits == 4 else 'LLM.int8'}) for training"
           if quant else "") + ".",
        "",
        "## Data",
        "",
        "Fingerprints are content hashes of the token ids the run trained and evaluated on (and of the "
        "reference log-probs); a resumed run checks them.",
        "",
        "| what | source | fingerprint |",
        "|---|---|---|",
        *data_rows,
        "",
        f"Layout `{data.layout}`, max_length {data.max_length}, max_prompt_length {data.max_prompt_length}, "
        f"truncation `{data.truncation}`.",
        "",
        "## Training",
        "",
        f"- loss: {loss}",
        f"- LoRA: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, target modules: {lora.target_modules}",
        f"- {summary['steps']} optimizer steps; batch {train.batch_size} x grad_accum {train.grad_accum}, "
        f"lr {train.lr:g} ({train.scheduler}, warmup), optimizer {train.optimizer}, seed {train.seed}",
        "",
        "## Held-out metrics",
        "",
        *(_metric_rows(before, after) if before or after else ["none (no held-out examples)"]),
        "",
        "## How to load it",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {loader.split('.')[0]}, AutoTokenizer",
        "",
        f'base = "{base}"',
        f"model = PeftModel.from_pretrained({loader}, \"path/to/this/adapter\")",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/adapter")',
        "```",
        "",
        "or merge it into its base: `dpo-train merge RUN_DIR --out merged/` (RUN_DIR is the folder above this one).",
        "",
        f"Written by dpo-train {dpo_train_version()} on {datetime.now().astimezone().date().isoformat()}; the "
        "whole recipe is `../recipe.yaml`.",
        "",
    ]
    return "\n".join(lines)
