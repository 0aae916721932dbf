"""Recipe: the YAML file a run is described by, parsed once into frozen, validated objects.

Every section is a pydantic model with ``extra="forbid"`` and ``frozen=True``: an unknown key, a wrong
type or an out-of-range value is a :class:`RecipeError` that names the key path (``loss.beta``) and
says what is allowed. Nothing downstream re-reads the YAML.

Sections: ``model``, ``data``, ``lora``, ``loss``, ``train``, ``eval``, ``reference``, ``output`` (and ``task``);
``reward`` with ``task: reward``, ``online`` with the online tasks (``ppo``, ``rloo``).
Paths are resolved against the current working directory, as a shell would, after ``~`` is expanded (in
every path key, so the resolved recipe shows the real folder).

A recipe file is read with YAML's safe loader and bounded: a file over :data:`MAX_RECIPE_BYTES`, or one
whose aliases expand to more than :data:`MAX_RECIPE_VALUES` values, is refused before anything is built
from it, and error messages quote at most a short excerpt of an offending value.
"""

from __future__ import annotations

import os
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

# A recipe is a few hundred values; these bounds only stop files that are not recipes (a 50 MB dump, an
# alias "billion laughs") before they cost minutes and gigabytes.
MAX_RECIPE_BYTES = 1_000_000
MAX_RECIPE_VALUES = 10_000


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def expand_user(value: str) -> str:
    """``~`` and ``~/...`` (and ``~user/...``) as the home folder, as a shell expands them; else unchanged."""
    return os.path.expanduser(value) if value.startswith("~") else value


# A path (or hub id) in a recipe: ``~`` is expanded once, here, so every stage and the resolved recipe see it.
PathText = Annotated[str, AfterValidator(expand_user)]


# --------------------------------------------------------------------------------------------- model


_COMPUTE_DTYPES = ("bfloat16", "float16", "float32")


class QuantizationConfig(_Section):
    """A k-bit base model through bitsandbytes (QLoRA). The LM head, embeddings and norms stay unquantized.

    ``bits: 4`` stores each linear weight as 4-bit ``quant_type`` codes with one scale per 64 weights;
    ``double_quant`` stores those scales in 8 bits (about 0.37 bits a weight saved). ``quant_type`` and
    ``double_quant`` apply to 4 bits only; ``bits: 8`` is LLM.int8. ``compute_dtype`` is the dtype the
    matmuls run in and the dtype of every unquantized weight and activation.
    """

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class ModelConfig(_Section):
    """The policy's base model: a local Hugging Face causal-LM directory, or a hub id where the network allows.

    With ``quantization`` the unquantized weights load in ``quantization.compute_dtype``; ``dtype`` then
    defaults to it and may not name another. ``max_memory_gb`` is the accelerator memory (GiB) the dry run
    checks its peak estimate against, instead of the detected device's. ``adapter`` names a LoRA adapter
    folder (e.g. an SFT run's ``OUT/adapter``) that the policy starts from instead of a fresh adapter; a
    task with a reference then also uses it as the reference (``reference.adapter``). ``gguf_file`` names a
    GGUF checkpoint in ``path``'s folder: transformers reads its weights (dequantized to ``dtype``), config and
    tokenizer.
    """

    path: PathText
    adapter: PathText | None = None
    gguf_file: Annotated[str | None, AfterValidator(_gguf_name)] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    quantization: QuantizationConfig | None = None
    max_memory_gb: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _dtype_follows_quantization(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("quantization") is None:
            return data
        quant = data["quantization"]
        compute = quant.get("compute_dtype", "bfloat16") if isinstance(quant, dict) else quant.compute_dtype
        if compute not in _COMPUTE_DTYPES:
            return data  # reported at quantization.compute_dtype
        if "dtype" in data and data["dtype"] != compute:
            raise ValueError(
                f"model.dtype ({data['dtype']}) differs from model.quantization.compute_dtype ({compute}): a "
                "quantized base keeps its unquantized weights in compute_dtype; drop model.dtype or make them equal"
            )
        return {**data, "dtype": compute}

    @model_validator(mode="after")
    def _gguf_alone(self) -> ModelConfig:
        if self.gguf_file is not None and self.quantization is not None:
            raise ValueError(
                "model.gguf_file with model.quantization: a GGUF checkpoint is dequantized to model.dtype when it "
                "is loaded and cannot be quantized again by bitsandbytes; drop model.quantization (or convert the "
                "model to a safetensors folder first: dpo-train merge writes one)"
            )
        return self


def _gguf_name(value: str | None) -> str | None:
    if value is not None and (not value.strip() or Path(value).is_absolute()):
        raise ValueError("a file name inside the model folder, e.g. model.Q4_K_M.gguf")
    return value


# ---------------------------------------------------------------------------------------------- data


# Canonical column names of preference rows (``data.columns`` keys); dpo.data.layouts uses the same list.
DATA_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label", "response_a", "response_b", "preference",
                "messages")


class DataConfig(_Section):
    """Where the preference data is and how it is turned into token ids."""

    train: PathText
    eval: PathText | None = None
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split: str = "train"
    layout: Literal["auto", "explicit", "conversational", "hh_rlhf", "message_lists", "unpaired",
                    "demonstrations"] = "auto"
    columns: dict[str, str] = Field(default_factory=dict)
    chat_template: str | None = None
    max_length: int = Field(512, ge=2)
    max_prompt_length: int = Field(256, ge=1)
    truncation: Literal["keep_end", "keep_start"] = "keep_end"
    on_bad_row: Literal["error", "skip"] = "error"
    num_proc: int = Field(1, ge=1)
    cache_dir: PathText | None = None
    max_rows: int | None = Field(None, ge=1)

    @field_validator("chat_template")
    @classmethod
    def _template_file(cls, value: str | None) -> str | None:
        # A template file's path gets ~ expanded; an inline Jinja template is left as written.
        if value is None or "{{" in value or "{%" in value:
            return value
        return expand_user(value)

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(DATA_COLUMNS))
        if unknown:
            raise ValueError(
                f"unknown column name(s) {', '.join(unknown)}: the keys are the names the data path knows "
                f"({', '.join(DATA_COLUMNS)}), the values your data's column names (e.g. prompt: question)"
            )
        preference = [c for c in ("response_a", "response_b", "preference") if c in value]
        if preference and len(preference) < 3:
            raise ValueError(
                "pairs with a preference label need all of response_a, response_b and preference mapped "
                f"(got only {', '.join(preference)})"
            )
        return value

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be smaller than max_length "
                f"({self.max_length}) so that a completion token fits"
            )
        return self


# ---------------------------------------------------------------------------------------------- lora


class LoraConfig(_Section):
    """LoRA adapter settings (peft). ``target_modules: all-linear`` adapts every linear layer but the head."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"


# ---------------------------------------------------------------------------------------------- loss
# One class per loss; the fields are exactly the options the loss takes (see dpo.losses.LOSSES), so an
# option a loss does not take is an "extra inputs are not permitted" error at loss.<option>.

Beta = Annotated[float, Field(gt=0)]
NllWeight = Annotated[float, Field(ge=0)]


class _Loss(_Section):
    def options(self) -> dict[str, float]:
        """The loss options as the registry names them (``lambda`` for ORPO), without ``name``."""
        return {k: v for k, v in self.model_dump(by_alias=True).items() if k != "name"}


class DPOLoss(_Loss):
    name: Literal["dpo"]
    beta: Beta = 0.1
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5)
    nll_weight: NllWeight = 0.0


class RobustLoss(_Loss):
    name: Literal["robust"]
    beta: Beta = 0.1
    label_smoothing: float = Field(0.1, ge=0.0, lt=0.5)
    nll_weight: NllWeight = 0.0


class HingeLoss(_Loss):
    name: Literal["hinge"]
    beta: Beta = 0.1
    nll_weight: NllWeight = 0.0


class DPOPLoss(_Loss):
    name: Literal["dpop"]
    beta: Beta = 0.1
    lambda_: float = Field(50.0, ge=0, alias="lambda")
    nll_weight: NllWeight = 0.0


class IPOLoss(_Loss):
    name: Literal["ipo"]
    beta: Beta = 0.1
    nll_weight: NllWeight = 0.0


class KTOLoss(_Loss):
    name: Literal["kto"]
    beta: Beta = 0.1
    desirable_weight: float = Field(1.0, gt=0)
    undesirable_weight: float = Field(1.0, gt=0)


class SimPOLoss(_Loss):
    name: Literal["simpo"]
    beta: Beta = 2.0
    gamma: float = Field(0.5, ge=0)
    nll_weight: NllWeight = 0.0


class ORPOLoss(_Loss):
    name: Literal["orpo"]
    lambda_: float = Field(0.1, gt=0, alias="lambda")
    nll_weight: NllWeight = 0.0


LossConfig = Annotated[
    DPOLoss | RobustLoss | HingeLoss | DPOPLoss | IPOLoss | KTOLoss | SimPOLoss | ORPOLoss,
    Field(discriminator="name"),
]
LOSS_CONFIGS: dict[str, type[_Loss]] = {
    "dpo": DPOLoss,
    "robust": RobustLoss,
    "hinge": HingeLoss,
    "dpop": DPOPLoss,
    "ipo": IPOLoss,
    "kto": KTOLoss,
    "simpo": SimPOLoss,
    "orpo": ORPOLoss,
}


# --------------------------------------------------------------------------------------------- train


class TrainConfig(_Section):
    """Optimisation settings. A step is one optimizer step (``batch_size * grad_accum`` pairs per process).

    Checkpoints (``output.dir/checkpoints``) are written every ``save_every`` steps (null: only at the end
    and on SIGINT/SIGTERM), the ``keep_last`` newest kept. A step whose loss or gradient norm is not finite
    is skipped; ``max_bad_steps`` such steps in a row stop the run.

    ``packing`` lays each pair out once as ``[prompt | chosen | rejected]`` and packs a micro-batch's pairs into
    rows without padding between them (``auto``: where the model's attention can take that mask, else padded
    batches with a log line saying why; ``on``: an error where it cannot; ``off``: padded batches). It changes
    how the same numbers are computed, not which: the micro-batches, log-probs and losses are the padded path's
    up to float rounding. ``max_batch_tokens`` is the most tokens of one packed row (null: on CPU rows of one to
    two times the micro-batch's longest pair, whichever needs the fewest positions; on CUDA the whole micro-batch
    in one row).

    ``warn`` turns the run's guards on or off
    (likelihood displacement, a saturated loss: :mod:`dpo.train.guards`); ``sample_every`` writes greedy
    completions of a few held-out prompts (``eval.samples``) to ``samples.jsonl`` every that many steps.
    """

    seed: int = 0
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    loss_scaler: bool = False
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1)
    save_every: int | None = Field(200, ge=1)
    keep_last: int = Field(2, ge=1)
    max_bad_steps: int = Field(5, ge=1)
    logprob_impl: Literal["auto", "torch", "triton"] = "auto"
    logprob_chunk_size: int | None = Field(None, ge=1)
    packing: Literal["auto", "on", "off"] = "auto"
    max_batch_tokens: int | None = Field(None, ge=1)

    @field_validator("packing", mode="before")
    @classmethod
    def _packing_switch(cls, value: Any) -> Any:
        # YAML reads a bare on/off (and yes/no, true/false) as a boolean.
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    warn: bool = True
    sample_every: int | None = Field(None, ge=1)


# ------------------------------------------------------------------------------------------------ eval


def gold_spec(value: str | None) -> str | None:
    """``value`` if it names a gold scorer (``module:function`` or ``path/to/file.py:function``; None: none),
    else a ValueError saying the form. Loading it is :func:`dpo.reward.load_gold`'s."""
    module, sep, function = (value or "").rpartition(":")
    if value is not None and (not sep or not module.strip() or not function.strip().isidentifier()):
        raise ValueError("expected module:function or path/to/file.py:function (e.g. dpo.quickstart:gold), "
                         f"got {excerpt(value)}")
    return value


class EvalConfig(_Section):
    """What each evaluation adds to the held-out pairs' metrics: greedy answers to held-out prompts.

    ``generate`` held-out prompts (the first unique ones of the eval split) are answered greedily, at most
    ``max_new_tokens`` tokens each, at every evaluation; the record gets their mean length, the share that
    ended with EOS and, with ``gold``, the mean of that scorer. ``gold`` is ``module:function`` (or
    ``path/to/file.py:function``), a Python function of (prompt, completion) returning a number: the user's
    own code, run in the training process. The greedy answers to the first ``samples`` prompts go to
    ``samples.jsonl`` at every evaluation (and every ``train.sample_every`` steps) and the first is shown in
    the log.
    """

    generate: int = Field(0, ge=0)
    max_new_tokens: int = Field(64, ge=1)
    gold: str | None = None
    samples: int = Field(2, ge=0)

    @field_validator("gold")
    @classmethod
    def _gold_form(cls, value: str | None) -> str | None:
        return gold_spec(value)


# ------------------------------------------------------------------------------------------ reference


class ReferenceConfig(_Section):
    """How reference log-probs are computed (once per fingerprint, kept in a cache folder).

    ``batch_size`` is the batch of every no-grad pass: the reference precompute and evaluation (which batch
    the same way, so an untrained policy reproduces the reference exactly); a precompute batch that runs out
    of accelerator memory is halved. ``model_path`` names a separate reference model (``gguf_file``: a GGUF
    checkpoint in its folder) and ``adapter`` a LoRA adapter applied to the reference (to ``model_path``, or
    else to ``model.path``). ``cache_dir`` defaults
    to ``$XDG_CACHE_HOME/dpo-train/reference`` (``~/.cache`` when unset). ``verify`` recomputes that many
    random cached examples at start-up and stops the run if any differs beyond tolerance.
    """

    model_path: PathText | None = None
    gguf_file: Annotated[str | None, AfterValidator(_gguf_name)] = None
    adapter: PathText | None = None
    batch_size: int = Field(16, ge=1)
    cache_dir: PathText | None = None
    verify: int = Field(0, ge=0)


# --------------------------------------------------------------------------------------------- reward


class RewardConfig(_Section):
    """A Bradley–Terry reward model (``task: reward``): per pair −log σ(r_c − r_r − m) + c·(r_c + r_r)².

    ``margin_column`` names a numeric column of the data holding m for each pair (m = 0 without it);
    ``center_weight`` is c, which keeps rewards near zero so that their scale stays comparable.
    """

    margin_column: str | None = None
    center_weight: float = Field(0.0, ge=0)

# --------------------------------------------------------------------------------------------- online


ONLINE_TASKS = ("ppo", "rloo")


class OnlineGeneration(_Section):
    """How rollouts are sampled; the keys of the compare file's ``generation`` section.

    ``temperature`` also divides the logits whose log-probs PPO's ratios and the KL penalty use, so the
    objective is that of the distribution sampled from (``top_p`` below 1 truncates the sampler only).
    ``samples_per_prompt`` is k, the group size of ``rloo``; ``seed`` with the rollout's number seeds its
    sampling; ``batch_size`` is sequences per ``generate`` call.
    """

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    samples_per_prompt: int = Field(1, ge=1)
    seed: int = 0
    batch_size: int = Field(16, ge=1)


# Keys of ``online`` that only one online task reads (the other refuses them when set).
PPO_ONLY = ("value_clip_range", "value_coef", "value_lr", "gamma", "gae_lambda", "whiten_advantages")
RLOO_ONLY = ("advantage",)


class OnlineConfig(_Section):
    """Online RL against a reward model (``task: ppo`` or ``task: rloo``), see :mod:`dpo.online`.

    Each rollout samples ``generation.samples_per_prompt`` completions for each of ``prompts_per_rollout``
    training prompts with the policy, scores them with ``reward_model`` (a ``task: reward`` run; minus
    ``missing_eos_penalty`` for a completion that never ends) and takes ``ppo_epochs`` passes of
    ``train.batch_size`` samples over them. The reward of a sample is its score minus ``kl_coef`` times
    its per-token KL to the reference (adapted toward ``kl_target`` per sample over ``kl_horizon``
    samples when set, Ziegler et al. 2019). ``gold`` is an optional ``module:function`` scoring
    (prompt, completion) -> float, logged beside the reward model's score (it runs your code).

    PPO only: ``value_clip_range``, ``value_coef`` (the value loss's weight), ``value_lr`` (the value head's
    learning rate; null: ``train.lr``), ``gamma`` and ``gae_lambda`` (GAE) and ``whiten_advantages``. RLOO only: ``advantage``: ``rloo`` (leave-one-out
    baseline) or ``grpo`` (group-normalised).
    """

    reward_model: PathText
    gold: str | None = None
    prompts_per_rollout: int = Field(16, ge=1)
    generation: OnlineGeneration = OnlineGeneration()
    ppo_epochs: int = Field(1, ge=1)
    clip_range: float = Field(0.2, gt=0)
    kl_coef: float = Field(0.05, ge=0)
    kl_target: float | None = Field(None, gt=0)
    kl_horizon: int = Field(10000, ge=1)
    missing_eos_penalty: float | None = Field(None, ge=0)
    max_eval_prompts: int | None = Field(None, ge=1)
    value_clip_range: float = Field(0.2, gt=0)
    value_coef: float = Field(0.1, ge=0)
    value_lr: float | None = Field(None, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    advantage: Literal["rloo", "grpo"] = "rloo"

    @field_validator("gold")
    @classmethod
    def _gold_spec(cls, value: str | None) -> str | None:
        return gold_spec(value)


# --------------------------------------------------------------------------------------------- output


TRACKERS = ("tensorboard", "wandb", "mlflow")


class OutputConfig(_Section):
    """Where a run writes its recipe, metrics, adapter and checkpoints, and which experiment trackers get
    its metrics.

    ``report_to`` lists trackers (through accelerate's tracker integration): every ``metrics.jsonl`` record
    goes to each, as ``<split>/<metric>`` at its step. Their files go into the output folder:
    ``dir/tensorboard/``, ``dir/wandb/`` (offline unless ``WANDB_MODE`` says otherwise; ``wandb sync`` uploads
    it) and ``dir/mlflow/`` (a local file store unless ``MLFLOW_TRACKING_URI`` names a server). ``project``
    names the wandb project and the MLflow experiment. ``tensorboard: true`` is the older spelling of
    ``report_to: [tensorboard]`` and still works.
    """

    dir: PathText
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(default_factory=list)
    project: str = Field("dpo-train", min_length=1)
    tensorboard: bool = False

    def trackers(self) -> list[str]:
        """The trackers this run reports to, each once, in ``report_to`` order (``tensorboard: true`` adds
        TensorBoard)."""
        named = [*self.report_to, *(["tensorboard"] if self.tensorboard else [])]
        return [name for name in TRACKERS if name in named]


# --------------------------------------------------------------------------------------------- recipe


class Recipe(_Section):
    """A whole run. ``task: preference`` trains a policy adapter with a loss from ``dpo.losses``;
    ``task: reward`` trains a Bradley–Terry reward model (``reward:``) on the same pairs, with no loss section;
    ``task: sft`` fine-tunes on the chosen answers (or demonstrations), with no loss section; ``task: ppo``
    and ``task: rloo`` train the policy online against a reward model (``online:``)."""

    task: Literal["preference", "reward", "sft", "ppo", "rloo"] = "preference"
    model: ModelConfig
    data: DataConfig
    lora: LoraConfig = LoraConfig()
    loss: LossConfig = DPOLoss(name="dpo")
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    reference: ReferenceConfig = ReferenceConfig()
    reward: RewardConfig = RewardConfig()
    online: OnlineConfig | None = None
    output: OutputConfig

    @model_validator(mode="before")
    @classmethod
    def _start_adapter_is_the_reference(cls, data: Any) -> Any:
        # A policy started from model.adapter (an SFT adapter) is held to it: it is the reference too,
        # unless the recipe names another reference. Written into the resolved recipe.
        if not isinstance(data, dict) or data.get("task", "preference") not in ("preference", *ONLINE_TASKS):
            return data
        model, reference = data.get("model"), data.get("reference") or {}
        if not isinstance(model, dict) or not model.get("adapter") or not isinstance(reference, dict):
            return data
        if reference.get("adapter") is None and reference.get("model_path") is None:
            return {**data, "reference": {**reference, "adapter": model["adapter"]}}
        return data

    @field_validator("loss", mode="before")
    @classmethod
    def _default_loss_name(cls, value: Any) -> Any:
        if isinstance(value, dict) and "name" not in value:
            return {"name": "dpo", **value}
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        if self.model.dtype == "float16" and not self.train.loss_scaler:
            raise ValueError(
                "model.dtype: float16 needs train.loss_scaler: true (float16 gradients underflow without "
                "loss scaling); or use bfloat16 or float32"
            )
        self._task_sections()
        if self.reference.gguf_file is not None and self.reference.model_path is None:
            raise ValueError("reference.gguf_file names a GGUF file in reference.model_path's folder; set "
                             "reference.model_path (the policy's own GGUF is model.gguf_file)")
        if self.eval.gold is not None and self.eval.generate == 0:
            raise ValueError("eval.gold scores the held-out answers that eval.generate asks for; set "
                             "eval.generate: N (prompts answered at each evaluation)")
        if self.loss.name == "kto" and self.train.batch_size < 2:
            raise ValueError(
                "train.batch_size: kto needs at least 2 rows per batch (its KL estimate pairs each prompt "
                "with another row's completion)"
            )
        return self

    def _task_sections(self) -> None:
        """Settings for the other task are refused rather than silently ignored (its section may only hold
        defaults, as a resolved recipe does)."""
        if self.task != "reward" and self.reward != RewardConfig():
            raise ValueError("reward: this section is used only with task: reward; remove it or set task: reward")
        if self.task not in ONLINE_TASKS and self.online is not None:
            raise ValueError(f"online: this section is used only with task: ppo or rloo, not task: {self.task}")
        if self.task in ("sft", *ONLINE_TASKS) and self.loss != DPOLoss(name="dpo"):
            raise ValueError(f"loss: task: {self.task} takes no loss section (its objective is fixed); remove it")
        if self.task == "sft":
            if self.reference.model_path is not None or self.reference.adapter is not None:
                key = "reference.model_path" if self.reference.model_path is not None else "reference.adapter"
                raise ValueError(f"{key}: supervised fine-tuning has no reference model; remove it")
            return
        if self.task in ONLINE_TASKS:
            self._online_sections()
            return
        if self.data.layout == "demonstrations":
            raise ValueError(f"data.layout: demonstrations (prompt, completion) train with task: sft, not "
                             f"task: {self.task}, which needs preference pairs")
        if self.task != "reward":
            return
        if self.loss != DPOLoss(name="dpo"):
            raise ValueError(
                "loss: task: reward trains a Bradley–Terry reward model and takes no loss section; remove it "
                "(the reward model's options are reward.margin_column and reward.center_weight)"
            )
        if self.reference.model_path is not None or self.reference.adapter is not None:
            key = "reference.model_path" if self.reference.model_path is not None else "reference.adapter"
            raise ValueError(f"{key}: a reward model has no reference model; remove it")
        generation = {"eval.generate": self.eval.generate > 0, "eval.gold": self.eval.gold is not None,
                      "train.sample_every": self.train.sample_every is not None}
        if any(generation.values()):
            key = next(key for key, used in generation.items() if used)
            raise ValueError(f"{key}: a reward model scores text and does not generate any; remove it")
        if self.data.layout == "unpaired":
            raise ValueError("data.layout: a reward model ranks pairs; unpaired rows (prompt, completion, label) "
                             "have none to rank")

    def _online_sections(self) -> None:
        online = self.online
        if online is None:
            raise ValueError(f"online: task: {self.task} needs an online section with at least reward_model "
                             "(a task: reward run)")
        if self.reference.model_path is not None:
            raise ValueError(f"reference.model_path: task: {self.task} keeps every role on the one base model "
                             "(the reference is the base with the adapters off, or reference.adapter on it); "
                             "remove it")
        defaults = OnlineConfig(reward_model=online.reward_model)
        others = RLOO_ONLY if self.task == "ppo" else PPO_ONLY
        for key in others:
            if getattr(online, key) != getattr(defaults, key):
                raise ValueError(f"online.{key}: used only with task: {'rloo' if self.task == 'ppo' else 'ppo'}; "
                                 f"remove it or change task")
        if self.task == "rloo" and online.generation.samples_per_prompt < 2:
            raise ValueError("online.generation.samples_per_prompt: rloo needs at least 2 samples per prompt (each "
                             "sample's baseline is the mean reward of the others)")

    def to_yaml(self) -> str:
        """The fully resolved recipe (every default filled in) as YAML."""
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


# ---------------------------------------------------------------------------------------------- loading


def _format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        loss_name = None
        # The discriminated union adds the loss name to the location; drop it for readability.
        if len(loc) >= 2 and loc[0] == "loss" and loc[1] in LOSS_CONFIGS:
            loss_name = loc[1]
            loc = [loc[0], *loc[2:]]
        key = ".".join(loc) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden" and loss_name is not None:
            takes = [f.alias or n for n, f in LOSS_CONFIGS[loss_name].model_fields.items() if n != "name"]
            message = f"loss '{loss_name}' does not take this option; it takes: {', '.join(takes)}"
        elif item["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            message = "unknown key" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
        elif item["type"] == "missing":
            message = "required key is missing"
        elif "input" in item and not isinstance(item["input"], dict):
            message += f" (got {excerpt(item['input'])})"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


_EXCERPT = reprlib.Repr()
_EXCERPT.maxlevel, _EXCERPT.maxlist, _EXCERPT.maxdict, _EXCERPT.maxstring, _EXCERPT.maxother = 2, 4, 4, 40, 40


def excerpt(value: Any, limit: int = 60) -> str:
    """A short ``repr`` of ``value`` for an error message, however large the value (bounded work too)."""
    text = _EXCERPT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _allowed_keys(section_path: list[str]) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in section_path:
        if model is Recipe and part == "loss":
            return []  # the loss's allowed keys depend on its name; the message names the option
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        nested = next((c for c in candidates if issubclass(c, BaseModel)), None)
        if nested is None:
            return []
        model = nested
    return [f.alias or name for name, f in model.model_fields.items()]


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key.path=value`` override; the value is read as YAML (``0.1``, ``true``, ``[a, b]``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {excerpt(text)}: expected key.path=value, e.g. --set loss.beta=0.2")
    try:
        value = safe_yaml(raw, f"--set {key.strip()}") if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise RecipeError(f"--set {excerpt(text)}: value is not valid YAML: {exc}") from None
    return key.strip(), value


def _expanded_size(root: yaml.Node, limit: int) -> int | None:
    """How many values ``root`` holds once every alias is expanded, or None past ``limit`` (or for a
    cycle). Aliases point at the same node object, so sizes are memoized per node: no expansion happens."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        if isinstance(node, yaml.ScalarNode):
            sizes[key] = 1
            continue
        children = (node.value if isinstance(node, yaml.SequenceNode)
                    else [item for pair in node.value for item in pair])
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[key] > limit:
                return None
            continue
        if key in open_nodes:
            return None  # a node that contains itself
        open_nodes.add(key)
        stack.append((node, True))
        stack += [(child, False) for child in children if id(child) not in sizes]
    return sizes[id(root)]


def safe_yaml(text: str, source: str) -> Any:
    """Parse YAML with the safe loader, refusing a document whose aliases expand past
    :data:`MAX_RECIPE_VALUES` values (before anything is built from it).

    Raises:
        RecipeError: too many values, or nesting too deep to parse.
        yaml.YAMLError: not valid YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_RECIPE_VALUES) is None:
            raise RecipeError(f"{source}: its YAML aliases expand to more than {MAX_RECIPE_VALUES:,} values (or "
                              "refer to themselves); a recipe needs a few hundred, so this is not read")
        return loader.construct_document(node)
    except RecursionError:
        raise RecipeError(f"{source}: its YAML is nested too deeply to be a recipe") from None
    finally:
        loader.dispose()


def recipe_from_dict(tree: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a parsed recipe tree. Raises :class:`RecipeError` naming each bad key."""
    if not isinstance(tree, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections (model, data, ...), got {type(tree).__name__}")
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise RecipeError(_format_validation_error(exc, source)) from None


def read_yaml_file(path: Path, what: str = "recipe") -> Any:
    """Read a small YAML file (a recipe, a compare file) with the bounded safe loader (Python tags are
    refused); a file over :data:`MAX_RECIPE_BYTES` is refused before it is parsed.

    Raises:
        RecipeError: missing, unreadable, too big, not UTF-8, not YAML, or an alias bomb.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)  # not stat: a pipe or /dev/zero has no size
    except FileNotFoundError:
        raise RecipeError(f"{path}: {what} file not found") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: over 1 MB, which no {what} is (a recipe is a few kilobytes); not read")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text ({exc})") from None
    try:
        return safe_yaml(text, str(path))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML (only plain YAML is accepted, no Python tags):\n{exc}") from None


def load_recipe_tree(path: str | Path) -> dict[str, Any]:
    """Read a recipe file (see :func:`read_yaml_file`)."""
    tree = read_yaml_file(Path(path))
    return tree if tree is not None else {}


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, override and validate a recipe.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings applied in order before validation.

    Returns:
        The frozen :class:`Recipe`.
    """
    tree = load_recipe_tree(path)
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, data, ...)")
    if "models" in tree and "model" not in tree:  # the sections of a compare file (dpo.compare.config)
        raise RecipeError(f"{path} is a compare file (it lists models to compare), not a training recipe: run it "
                          f"with `dpo-train compare {path}`")
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    return recipe_from_dict(tree, str(path))
