"""``dpo-train merge RUN_DIR --out DIR``: fold a run's LoRA adapter into its base, as a plain model directory.

The base is loaded in full precision (``--dtype``), never quantized: a QLoRA run's adapter was trained
against the 4-bit base, and merging it into 4-bit weights would round the merged weights again. The result
is the full-precision base plus the adapter, so it differs from the 4-bit policy the run evaluated by the
base's quantization error, as any QLoRA merge does.

Before saving, the merged model's per-token log-probs on sample sequences are compared with the unmerged
base + adapter in the same dtype: a merge that changed the function beyond that dtype's rounding is an
error, not a saved model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dpo.model.load import load_base_model, load_tokenizer
from dpo.model.logprobs import LogprobSettings, sequence_logprobs
from dpo.recipe import RecipeError, load_recipe

Log = Callable[[str], None]

DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}
# Largest allowed difference of a sequence's mean per-token log-prob, merged minus unmerged, both in the
# merged dtype. They differ only in where rounding happens (the merged weight W + s * B A is rounded once;
# the unmerged model rounds W and adds the float32 adapter output), which moves a bf16 forward by well
# under 1e-2 nats a token; a wrong merge (missing scale, wrong layer, adapter dropped) moves it by the
# adapter's whole effect, which the log line shows beside it.
MATCH_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.02, "float16": 0.005}

class MergeError(ValueError):
    """A run directory that cannot be merged, or a merge whose log-probs do not match the adapter's."""


@dataclass(frozen=True)
class MergeReport:
    """What ``merge`` did.

    Attributes:
        out_dir: the saved model directory.
        dtype: the merged weights' dtype name.
        max_difference: largest |merged - unmerged| mean per-token log-prob over the sample sequences.
        tolerance: the bound it was checked against.
        adapter_effect: largest |unmerged - base| on the same sequences: what a lost adapter would show.
    """

    out_dir: Path
    dtype: str
    max_difference: float
    tolerance: float
    adapter_effect: float


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
    """Merge ``RUN_DIR/adapter`` into the run's base model and save it to ``out_dir``.

    Args:
        run_dir: a finished run's ``output.dir`` (``recipe.yaml`` and ``adapter/``).
        out_dir: where the merged model and tokenizer go; must not exist or be empty.
        dtype: weights of the merged model: bf16, fp16 or fp32 (or the long names).
        base_path: the base model, if not where the run's recipe says (``model.path``).
        device: where the merge runs; None: CUDA if available, else CPU.
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
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The full-precision base: the recipe's model section without quantization, in the requested dtype.
    base_config = recipe.model.model_copy(update={"quantization": None, "dtype": dtype_name,
                                                  "gradient_checkpointing": False})
    source = base_path or base_config.path
    log(f"merge: loading {source} in {dtype_name} and the adapter {adapter_dir}")
    model = PeftModel.from_pretrained(load_base_model(base_config, path=source, device=device), adapter_dir)
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
    tolerance = MATCH_TOLERANCE[dtype_name]
    log(f"merge: mean per-token log-prob on {batch['input_ids'].shape[0]} sample sequences: merged vs adapter "
        f"differ by at most {difference:.2e} (tolerance {tolerance:g} in {dtype_name}); the adapter itself moves "
        f"them by up to {effect:.2e}")
    if effect <= tolerance:
        log("merge: note: on these sequences the adapter moves log-probs less than the tolerance, so the check "
            "cannot tell a merged adapter from a missing one")
    if not difference <= tolerance:
        raise MergeError(f"the merged model's log-probs differ from the adapter's by {difference:.3g} per token "
                         f"(tolerance {tolerance:g} in {dtype_name}); nothing was saved")
    out_dir.mkdir(parents=True, exist_ok=True)
    merged_model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    log(f"merge: saved {out_dir} (load it with AutoModelForCausalLM.from_pretrained)")
    return MergeReport(out_dir, dtype_name, difference, tolerance, effect)

