"""The compare file (``dpo-train compare compare.yaml``): which models, on which prompts, judged how.

Like a recipe, it is parsed once into frozen, validated objects; an unknown key, a wrong type or an
out-of-range value is a :class:`CompareError` naming the key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dpo.recipe import DataConfig, RecipeError, gold_spec, parse_override, read_yaml_file


class CompareError(ValueError):
    """A compare file that cannot be used; the message names the file and key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Section):
    """One policy to compare: a Hugging Face causal-LM directory (``path``; ``gguf_file``: a GGUF checkpoint in
    it) or a dpo-train run (``run``, loaded as its recipe says, a GGUF base included)."""

    name: str = Field(min_length=1)
    path: str | None = None
    gguf_file: str | None = None
    run: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        if (self.path is None) == (self.run is None):
            raise ValueError(
                f"model '{self.name}': give exactly one of path (a Hugging Face model directory, e.g. a PPO "
                "checkpoint) or run (a dpo-train run directory holding adapter/ and recipe.yaml)"
            )
        if self.gguf_file is not None and self.path is None:
            raise ValueError(f"model '{self.name}': gguf_file names a file in path's folder; a run's recipe names its own")
        return self


class PromptSet(_Section):
    """Prompts to sample from: any supported data layout (the prompts of its rows), or rows with only ``prompt``."""

    path: str
    split: str = "train"
    layout: Literal["auto", "explicit", "conversational", "hh_rlhf", "message_lists", "unpaired"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    chat_template: str | None = None
    max_prompt_length: int = Field(256, ge=1)
    max_prompts: int | None = Field(None, ge=1)
    on_bad_row: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _columns(self) -> PromptSet:
        self.data_config()  # the data section's own column-name checks
        return self

    def data_config(self) -> DataConfig:
        """The prompt file as a data section (its rows are read and validated as training rows are)."""
        return DataConfig(train=self.path, eval_fraction=0.0, split=self.split, layout=self.layout,
                          columns=self.columns, chat_template=self.chat_template, on_bad_row=self.on_bad_row,
                          max_length=self.max_prompt_length + 1, max_prompt_length=self.max_prompt_length)


class PairSet(_Section):
    """Held-out preference pairs for preference accuracy (any paired layout; tokenized as training data is)."""

    path: str
    split: str = "train"
    layout: Literal["auto", "explicit", "conversational", "hh_rlhf", "message_lists"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    chat_template: str | None = None
    max_length: int = Field(512, ge=2)
    max_prompt_length: int = Field(256, ge=1)
    truncation: Literal["keep_end", "keep_start"] = "keep_end"
    on_bad_row: Literal["error", "skip"] = "error"
    max_rows: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _prompt_fits(self) -> PairSet:
        self.data_config()  # the data section's own checks (column names, prompt shorter than max_length)
        return self

    def data_config(self) -> DataConfig:
        """The pairs as a data section: all rows, none split off."""
        return DataConfig(train=self.path, eval_fraction=0.0, **self.model_dump(exclude={"path", "batch_size"}))


class Generation(_Section):
    """Sampling settings, the same for every model. ``temperature: 0`` is greedy decoding."""

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    samples_per_prompt: int = Field(4, ge=1)
    seed: int = 0
    batch_size: int = Field(16, ge=1)


class CompareConfig(_Section):
    """A whole comparison. ``gold`` is an optional gold scorer, a Python function ``module:function`` taking
    (prompt, completion) -> float (it runs your code), reported beside the reward model's score."""

    models: list[ModelEntry] = Field(min_length=1)
    reference: str | None = None
    reward_model: str
    gold: str | None = None
    prompts: PromptSet
    pairs: PairSet | None = None
    generation: Generation = Generation()
    output: str

    @field_validator("gold")
    @classmethod
    def _gold_spec(cls, value: str | None) -> str | None:
        return gold_spec(value)

    @model_validator(mode="after")
    def _names(self) -> CompareConfig:
        names = [m.name for m in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"models: each name must be unique ({', '.join(repeated)} repeated)")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference: '{self.reference}' is not a model name; the names are {', '.join(names)}")
        return self

    @property
    def reference_name(self) -> str:
        """The model every other is measured against (default: the first listed)."""
        return self.reference or self.models[0].name


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a parsed tree; a number after a list selects its item (``models.1.run``)."""
    parts = dotted.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise CompareError(f"--set {dotted}: '{part}' is not an item number of a list of {len(node)}")
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            raise CompareError(f"--set {dotted}: '{parts[depth - 1]}' is a value, not a section")
        if depth == len(parts) - 1:
            node[key] = value
            return
        if isinstance(node, dict) and node.get(key) is None:
            node[key] = {}
        node = node[key]


def load_compare_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CompareConfig:
    """Read, override (``key.path=value``) and validate a compare file."""
    path = Path(path)
    try:
        tree = read_yaml_file(path, "compare")
    except RecipeError as exc:
        raise CompareError(str(exc)) from None
    if not isinstance(tree, dict):
        raise CompareError(f"{path}: a compare file is a mapping (models, reward_model, prompts, output, ...)")
    if "models" not in tree and ("model" in tree or "data" in tree):  # the sections of a training recipe
        raise CompareError(f"{path} is a training recipe (it has {'model' if 'model' in tree else 'data'}:), not a "
                           f"compare file: train with `dpo-train {path}`; a compare file lists models, reward_model, "
                           "prompts and output (see recipes/compare-quickstart.yaml)")
    for text in overrides:
        set_path(tree, *parse_override(text))
    try:
        return CompareConfig.model_validate(tree)
    except ValidationError as exc:
        lines = [f"{path}: invalid compare file"]
        for item in exc.errors():
            where = ".".join(str(p) for p in item["loc"]) or "(top level)"
            message = item["msg"].removeprefix("Value error, ")
            if item["type"] == "extra_forbidden":
                message = "unknown key"
            elif item["type"] == "missing":
                message = "required key is missing"
            lines.append(f"  {where}: {message}")
        raise CompareError("\n".join(lines)) from None
