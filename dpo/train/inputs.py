"""Every input a run reads, checked before anything is created: one message per problem, naming the
recipe key, the path and what to do.

A run (and ``--dry-run``) calls :func:`check_inputs` before it creates its output directory, so a
placeholder ``model.path`` (``/path/to/Meta-Llama-3-8B-Instruct`` in the shipped recipes), a missing data
file or a folder that is not a model ends in one line and leaves nothing behind. The checks read only what
is cheap: that each local path exists and holds what it should (a model folder's ``config.json``, an
adapter's ``adapter_config.json``), and the tokenizer, which is small and which the run loads first anyway.
Weights are loaded by the run itself; their errors name the key too (:mod:`dpo.model.load`).
"""

from __future__ import annotations

from pathlib import Path

from dpo.data import DataError
from dpo.model import ModelError, load_tokenizer
from dpo.recipe import Recipe

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def looks_like_hub_id(text: str) -> bool:
    """``name`` or ``namespace/name``, as the hub spells its ids: not a path a user would type for a local
    file (nothing starting with ``/``, ``.`` or ``~``, at most one ``/``, no file suffix)."""
    return (not text.startswith(("/", ".", "~")) and text.count("/") <= 1 and "\\" not in text
            and not text.lower().endswith(DATA_SUFFIXES + (".gguf", ".yaml", ".yml")))


def model_folder_problem(key: str, path: str) -> str | None:
    """What is wrong with a model path (None if it may load): it does not exist, or is not a model folder."""
    local = Path(path)
    if local.is_file() and local.suffix.lower() == ".gguf":
        return None
    if local.is_dir():
        if (local / "config.json").is_file() or any(local.glob("*.gguf")):
            return None
        return (f"{key}: {path} is a folder but not a Hugging Face model folder (it has no config.json); set "
                f"{key} to the folder that holds config.json, the weights and the tokenizer: --set {key}=...")
    if local.exists():
        return f"{key}: {path} is not a folder; set {key} to a local Hugging Face model folder: --set {key}=..."
    if looks_like_hub_id(path):
        return None  # a hub id: the loader tries it, and says so if it cannot be had
    return (f"{key}: {path} does not exist; set {key} to a local Hugging Face model folder (config.json, weights "
            f"and tokenizer): --set {key}=/path/to/model")


def adapter_problem(key: str, path: str) -> str | None:
    """What is wrong with a LoRA adapter folder (None if it may load)."""
    local = Path(path)
    if (local / "adapter_config.json").is_file():
        return None
    if local.is_dir():
        return (f"{key}: {path} holds no adapter_config.json, so it is not a LoRA adapter folder; set {key} to "
                "a folder written by peft's save_pretrained (a dpo-train run's OUT/adapter)")
    if looks_like_hub_id(path) and not local.exists():
        return None
    return (f"{key}: {path} does not exist; set {key} to a LoRA adapter folder (a dpo-train run's OUT/adapter), "
            f"or remove {key}")


def data_problem(key: str, spec: str) -> str | None:
    """What is wrong with a data source (None if it may load): a local file or folder that is not there."""
    local = Path(spec)
    if local.exists() or looks_like_hub_id(spec):
        return None
    return (f"{key}: {spec} does not exist; set {key} to a .jsonl, .json, .parquet or .csv file or a "
            f"save_to_disk folder: --set {key}=/path/to/pairs.jsonl")


def check_inputs(recipe: Recipe) -> None:
    """Check every path the run reads, and load its tokenizer; write nothing.

    Raises:
        ModelError: ``model.path``, ``reference.model_path`` or ``reference.adapter`` cannot be used, or the
            tokenizer does not load; the message names the key, the path and what to do.
        DataError: ``data.train``, ``data.eval`` or ``data.chat_template`` names a file that is not there.
    """
    problems = [model_folder_problem("model.path", recipe.model.path)]
    if recipe.reference.model_path is not None:
        problems.append(model_folder_problem("reference.model_path", recipe.reference.model_path))
    if recipe.reference.adapter is not None:
        problems.append(adapter_problem("reference.adapter", recipe.reference.adapter))
    problem = next((p for p in problems if p), None)
    if problem:
        raise ModelError(problem)
    data = recipe.data
    data_problems = [data_problem("data.train", data.train)]
    if data.eval is not None:
        data_problems.append(data_problem("data.eval", data.eval))
    template = data.chat_template
    if template is not None and "{{" not in template and "{%" not in template and not Path(template).is_file():
        data_problems.append(f"data.chat_template: {template} is neither a file nor a Jinja template; set it to "
                             "a template file, or write the template itself (it holds {{ or {%)")
    problem = next((p for p in data_problems if p), None)
    if problem:
        raise DataError(problem)
    load_tokenizer(recipe.model)
