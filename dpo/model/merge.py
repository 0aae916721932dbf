"""``dpo-train merge RUN_DIR --out DIR``: fold a run's LoRA adapter into its base, as a plain model directory.

The base is loaded in full precision, never quantized: a QLoRA run's adapter was trained against the 4-bit
base, and merging it into 4-bit weights would round the merged weights again. The result is the
full-precision base plus the adapter, so it differs from the 4-bit policy the run evaluated by the base's
quantization error, as any QLoRA merge does. A GGUF base (``model.gguf_file``) is dequantized the same way
and the result is an ordinary safetensors folder.

The merge itself always runs in float32, where it is exact up to float32 rounding, and is checked there:
before anything is saved, the merged model's per-token log-probs on sample sequences must match the
unmerged base + adapter (both float32) within :data:`FLOAT32_TOLERANCE`; otherwise the merge is an error,
not a saved model. Only then are the weights cast to the requested dtype and saved. A check in bfloat16
would compare two different roundings (merged ``W + s·BA`` rounded once against ``W`` and the adapter
rounded apart), which on a real model differ by more than any fixed bound, while a wrong merge (a missing
scale, a dropped adapter) moves log-probs by the adapter's whole effect in any dtype. What the cast costs
is measured and reported beside the adapter's effect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dpo.model.load import load_base_model, load_tokenizer, model_location, torch_dtype
from dpo.model.logprobs import LogprobSettings, sequence_logprobs
from dpo.recipe import RecipeError, load_recipe

Log = Callable[[str], None]

DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}
# Largest allowed difference of a sequence's mean per-token log-prob, float32 merge minus float32 base +
# adapter. They differ only in float32 rounding (measured ~4e-6 nats a token on a 30-layer model); a wrong
# merge moves them by the adapter's whole effect, which the log line shows beside it.
FLOAT32_TOLERANCE = 1e-4


class MergeError(ValueError):
    """A run directory that cannot be merged, or a merge whose log-probs do not match the adapter's."""


@dataclass(frozen=True)
class MergeReport:
    """What ``merge`` did.

    Attributes:
        out_dir: the saved model directory.
        dtype: the saved weights' dtype name.
        max_difference: largest |merged - unmerged| mean per-token log-prob over the sample sequences, both
            float32.
        tolerance: the bound it was checked against (:data:`FLOAT32_TOLERANCE`).
        adapter_effect: largest |unmerged - base| on the same sequences: what a lost adapter would show.
        rounding: largest |saved - float32 merged|: what casting to ``dtype`` moved (0 for float32).
    """

    out_dir: Path
    dtype: str
    max_difference: float
    tolerance: float
    adapter_effect: float
    rounding: float


def sample_batch(vocab_size: int, rows: int = 4, tokens: int = 48, seed: int = 0) -> dict[str, Tensor]:
    """Seeded random token ids, every position after the first labelled; the same function is compared, so
    the text need not be natural."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (rows, tokens), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


@torch.no_grad()
def mean_token_logps(model, batch: dict[str, Tensor], device) -> Tensor:
    """``[rows]`` mean log-prob per labelled token (float32, on the CPU)."""
    batch = {k: v.to(device) for k, v in batch.items()}
    sums, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                     LogprobSettings())
    return (sums / counts.clamp(min=1)).float().cpu()


def merge_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "bf16", base_path: str | None = None,
              device: torch.device | str | None = None, log: Log = print) -> MergeReport:
    """Merge ``RUN_DIR/adapter`` into the run's base model in float32, check it, save it in ``dtype``.

    The float32 base is held in memory (4 bytes a parameter) on ``device``, by default the CPU: its memory
    takes a float32 8B model (32 GB) that a 24 GB GPU does not, and the check is one short forward.

    Args:
        run_dir: a finished run's ``output.dir`` (``recipe.yaml`` and ``adapter/``).
        out_dir: where the merged model and tokenizer go; must not exist or be empty.
        dtype: weights of the saved model: bf16, fp16 or fp32 (or the long names).
        base_path: the base model, if not where the run's recipe says (``model.path`` and ``model.gguf_file``):
            a model folder or a ``.gguf`` file.
        device: where the merge runs; None: the CPU.
        log: where progress goes.

    Returns:
        A :class:`MergeReport`.
    """
    from peft import PeftModel

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    dtype_name = DTYPE_NAMES.get(dtype)
    if dtype_name is None:
        raise MergeError(f"--dtype {dtype!r}: use one of bf16, fp16, fp32")
    adapter_dir = run_dir / "adapter"
    if not (adapter_dir / "adapter_config.json").is_file():
        raise MergeError(f"{adapter_dir}: no adapter_config.json; RUN_DIR is a run's output.dir after training")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MergeError(f"--out {out_dir}: exists and is not an empty directory; choose a new one")
    try:
        recipe = load_recipe(run_dir / "recipe.yaml")
    except RecipeError as exc:
        raise MergeError(f"{run_dir / 'recipe.yaml'}: cannot read the run's recipe: {exc}") from None
    device = torch.device("cpu") if device is None else device
    # The full-precision base: the recipe's model section without quantization, in float32.
    source = dict(zip(("path", "gguf_file"), model_location(base_path))) if base_path else {}
    base_config = recipe.model.model_copy(update={"quantization": None, "dtype": "float32",
                                                  "gradient_checkpointing": False, **source})
    named = f" ({base_config.gguf_file})" if base_config.gguf_file else ""
    log(f"merge: loading {base_config.path}{named} in float32 and the adapter {adapter_dir}")
    model = PeftModel.from_pretrained(load_base_model(base_config, device=device), adapter_dir)
    model.eval()
    tokenizer = load_tokenizer(base_config, path=str(adapter_dir))
    batch = sample_batch(model.get_base_model().config.vocab_size)
    unmerged = mean_token_logps(model, batch, device)
    with model.disable_adapter():
        base = mean_token_logps(model, batch, device)
    merged_model = model.merge_and_unload()
    merged = mean_token_logps(merged_model, batch, device)
    difference = float((merged - unmerged).abs().max())
    effect = float((unmerged - base).abs().max())
    rows = batch["input_ids"].shape[0]
    log(f"merge: checked in float32 on {rows} sample sequences: the merged model's mean per-token log-probs "
        f"differ from base + adapter by at most {difference:.2e} (must be <= {FLOAT32_TOLERANCE:g}: a float32 "
        f"merge is exact up to rounding); the adapter itself moves them by up to {effect:.2e}")
    if effect <= FLOAT32_TOLERANCE:
        log("merge: note: on these sequences the adapter moves log-probs less than the tolerance, so the check "
            "cannot tell a merged adapter from a missing one")
    if not difference <= FLOAT32_TOLERANCE:
        raise MergeError(f"the float32 merge's log-probs differ from the adapter's by {difference:.3g} per token "
                         f"(tolerance {FLOAT32_TOLERANCE:g}: a float32 merge is exact up to rounding); nothing was "
                         "saved")
    rounding = 0.0
    if dtype_name != "float32":
        merged_model.to(torch_dtype(dtype_name))
        rounding = float((mean_token_logps(merged_model, batch, device) - merged).abs().max())
        log(f"merge: cast to {dtype_name}: rounding the merged weights moves the mean per-token log-probs by up "
            f"to {rounding:.2e} (the adapter's effect: {effect:.2e})")
        if rounding >= effect:
            log(f"merge: note: in {dtype_name} the adapter's effect is within rounding; --dtype fp32 keeps it")
    out_dir.mkdir(parents=True, exist_ok=True)
    merged_model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log(f"merge: saved {out_dir} in {dtype_name} (load it with AutoModelForCausalLM.from_pretrained)")
    return MergeReport(out_dir, dtype_name, difference, FLOAT32_TOLERANCE, effect, rounding)
