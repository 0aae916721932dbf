"""Benchmark: peak GPU memory and tokens/s of one QLoRA DPO step, beside the dry run's memory estimate.

Run from the repository root on a CUDA machine:

    python bench/memory.py                              # Llama-3-8B shape, pairs of 512..4096 tokens per side
    python bench/memory.py --lengths 1024 2048 --optimizer paged_adamw_8bit
    python bench/memory.py --smoke                      # tiny shape on CPU: runs every stage, no figures

Workload: a random-weight model with the Llama-3-8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads,
intermediate 14336, vocabulary 128256, untied head), built once and saved with ``save_pretrained`` under
``--model-dir``, loaded back in 4 bits (NF4, double quantization, bf16 compute) the way the trainer loads
it, with a LoRA adapter (r=16, alpha 32, all linear layers), gradient checkpointing and the fused log-prob
kernel. One pair a step, every side ``L`` tokens (prompt ``L/2``, completion ``L/2``, so no padding);
reference log-probs precomputed (the step only looks them up, as with a cache hit); DPO, beta 0.1.

For each ``L`` it runs ``--warmup`` steps (so the optimizer state exists), then ``--repeats`` timed steps,
and prints the peak of ``torch.cuda.max_memory_allocated`` over the timed steps, the median step time,
tokens/s (both sides' ``2 L`` tokens per step) and the estimate of :mod:`dpo.model.memory` for the same batch.
The default optimizer is ``adamw_8bit``: a paged optimizer's state lives in unified memory, which the
allocator's counter does not see. When TRL is installed, its DPOTrainer runs the same workload (same
4-bit base, LoRA, checkpointing, precomputed reference log-probs, optimizer) and its figures are printed
beside ours.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py would shadow the standard library's tokenize module (torch imports it), so this folder
# leaves the path; the repository root goes first so that `dpo` imports without installing.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402

import torch  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocabulary
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256),
    "tiny": (64, 2, 4, 2, 128, 128),
}
COMPLETE = "bench-model-complete"  # written after the weights, so an interrupted save is rebuilt


def default_model_dir(shape: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dpo-train" / "bench" / f"{shape}-random"


def build_model(directory: Path, shape: str, device: str) -> None:
    """Save a random-weight bf16 Llama of ``shape`` and the character-level tokenizer to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo.quickstart import build_tokenizer

    if (directory / COMPLETE).is_file():
        return
    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    print(f"building a random {shape} model in {directory} (once)", flush=True)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: 16 GB, not 32 GB in float32 first
    try:
        with torch.device(device):  # initialising 8B values takes minutes on a CPU, seconds on a GPU
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer().save_pretrained(directory)
    del model
    (directory / COMPLETE).write_text("ok\n")


def bench_recipe(model_dir: Path, args: argparse.Namespace):
    """The recipe this benchmark trains with (the data section is not read)."""
    from dpo.recipe import recipe_from_dict

    compute = "float32" if args.smoke else "bfloat16"
    return recipe_from_dict({
        "model": {"path": str(model_dir), "gradient_checkpointing": True, "attn_implementation": "sdpa",
                  "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": compute}},
        "data": {"train": "unused.jsonl", "max_length": 8192, "max_prompt_length": 4096},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {"batch_size": 1, "lr": 5e-5, "optimizer": args.optimizer},
        "output": {"dir": "unused"},
    }, source="bench/memory.py")


def synthetic_rows(length: int, vocab: int, pairs: int = 1, seed: int = 0) -> list[dict]:
    """``pairs`` examples whose sides are ``length`` tokens: prompt ``length/2``, completion ``length/2``."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    half = length // 2
    return [{"index": i, "prompt_ids": ids(length - half), "chosen_ids": ids(half), "rejected_ids": ids(half)}
            for i in range(pairs)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_ours(policy, recipe, rows: list[dict], device: str, warmup: int, repeats: int) -> dict:
    """Median step time and peak allocated memory of ``repeats`` DPO steps after ``warmup`` ones."""
    from dpo.data import collate_paired
    from dpo.losses import get_loss
    from dpo.model import LogprobSettings, SequenceLogprobs
    from dpo.reference.compute import compute_reference_logps
    from dpo.train.loop import build_optimizer
    from dpo.train.setup import batch_loss

    logprobs = SequenceLogprobs(policy, LogprobSettings(recipe.train.logprob_impl, recipe.train.logprob_chunk_size))
    collate = partial(collate_paired, pad_token_id=0)

    def adapter_off(batch):
        with policy.disable_adapter():
            return logprobs(batch)

    logprobs.eval()
    with torch.no_grad():
        reference = compute_reference_logps(rows, collate, adapter_off, 1, device, "reference", lambda _: None)
    logprobs.train()
    spec, options = get_loss("dpo"), recipe.loss.options()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, recipe.train)
    batch = {k: v.to(device) for k, v in collate(rows).items()}

    def step() -> None:
        out = batch_loss(logprobs, batch, spec, options, reference)
        out.losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"ms": 1000 * statistics.median(times), "peak": peak}


def measure_trl(model_dir: Path, recipe, length: int, warmup: int, repeats: int) -> dict | str:
    """TRL's DPOTrainer on the same workload, or why it did not run."""
    try:
        import trl
    except ImportError:
        return "not installed"
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from dpo.model import quantization_config

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.peak = 0
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            if state.global_step == warmup:
                torch.cuda.reset_peak_memory_stats()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            if state.global_step > warmup:
                self.times.append(time.perf_counter() - self._start)
                self.peak = max(self.peak, torch.cuda.max_memory_allocated())

    # Our policy stays loaded meanwhile: TRL's figure is its peak above what was allocated before it started.
    baseline = torch.cuda.memory_allocated()
    half = length // 2
    # The character-level tokenizer makes one token per character; TRL adds BOS to the prompt and EOS to
    # each completion, so every side is length + 1 tokens.
    dataset = Dataset.from_list([{"prompt": "a" * (length - half - 1), "chosen": "b" * half,
                                  "rejected": "c" * half}] * (warmup + repeats))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization_config(recipe.model),
                                                 dtype=torch.bfloat16, device_map={"": 0},
                                                 attn_implementation="sdpa")
    wanted = dict(output_dir=str(model_dir / "trl-out"), per_device_train_batch_size=1, max_steps=warmup + repeats,
                  learning_rate=recipe.train.lr, beta=recipe.loss.beta, bf16=True, gradient_checkpointing=True,
                  gradient_checkpointing_kwargs={"use_reentrant": False}, precompute_ref_log_probs=True,
                  max_length=2 * length, max_prompt_length=length, max_completion_length=length,
                  optim=recipe.train.optimizer.replace("adamw_8bit", "adamw_bnb_8bit")
                  if recipe.train.optimizer == "adamw_8bit" else recipe.train.optimizer,
                  logging_steps=1000, save_strategy="no", report_to="none", dataloader_num_workers=0)
    # TRL's config fields change between releases: pass the ones this version has.
    config = trl.DPOConfig(**{k: v for k, v in wanted.items() if k in trl.DPOConfig.__dataclass_fields__})
    timer = StepTimer()
    peft_config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    try:
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=peft_config, callbacks=[timer])
        trainer.train()
    except Exception as exc:  # a comparison must not stop the benchmark; say what failed
        return f"failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    finally:
        del model
        torch.cuda.empty_cache()
    if not timer.times:
        return "no timed steps"
    return {"ms": 1000 * statistics.median(timer.times), "peak": timer.peak - baseline, "version": trl.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="tokens per side (default 512 1024 2048 4096; smoke: 32 64)")
    parser.add_argument("--optimizer", choices=("adamw", "adamw_8bit", "paged_adamw_8bit"), default="adamw_8bit")
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random model is saved once")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model on the CPU: checks that every stage runs; its figures mean nothing")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench/memory.py measures GPU memory and needs a CUDA device; none is visible here. "
                 "Run it on a GPU machine, or pass --smoke to check on the CPU that every stage runs.")
    from dpo.model import add_lora, load_base_model
    from dpo.model.memory import Batch, GiB, ModelShape, TrainingPlan, estimate_step, format_bytes

    shape_name = "tiny" if args.smoke else "llama3-8b"
    device = "cpu" if args.smoke else "cuda"
    lengths = args.lengths or ([32, 64] if args.smoke else [512, 1024, 2048, 4096])
    model_dir = args.model_dir or default_model_dir(shape_name)
    build_model(model_dir, shape_name, device)
    recipe = bench_recipe(model_dir, args)
    from transformers import AutoConfig

    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_dir))
    plan = TrainingPlan.from_recipe(recipe, device_type="cuda")  # the estimate is for a CUDA device
    policy = add_lora(load_base_model(recipe.model, device=device), recipe.lora, recipe.model.gradient_checkpointing)
    run_trl = not (args.no_trl or args.smoke)

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke run: figures mean nothing)"
    print(f"# QLoRA DPO step, {shape_name} shape, 4-bit NF4 + LoRA r={recipe.lora.r}, {args.optimizer}, "
          f"checkpointing; one pair a step; {name}")
    print("| tokens per side | peak | estimate | estimate vs peak | ms/step | tokens/s |"
          + (" TRL peak | TRL tokens/s |" if run_trl else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if run_trl else ""))
    for length in lengths:
        rows = synthetic_rows(length, shape.vocab)
        estimate = estimate_step(shape, plan, Batch(rows=2, tokens=length, completion_tokens=2 * (length // 2)))
        try:
            ours = measure_ours(policy, recipe, rows, device, args.warmup, args.repeats)
        except torch.cuda.OutOfMemoryError:
            ours = None
        if device == "cuda":
            torch.cuda.empty_cache()
        cells = [str(length)]
        if ours is None:
            cells += ["out of memory", format_bytes(estimate.peak).strip(), "", "", ""]
        else:
            peak = ours["peak"]
            cells += [format_bytes(peak).strip() if peak else "-", format_bytes(estimate.peak).strip(),
                      f"{100 * (estimate.peak / peak - 1):+.1f}%" if peak else "-",
                      f"{ours['ms']:.0f}", f"{2 * length / (ours['ms'] / 1000):,.0f}"]
        if run_trl:
            trl_result = measure_trl(model_dir, recipe, length, args.warmup, args.repeats)
            if isinstance(trl_result, dict):
                cells += [format_bytes(trl_result["peak"]).strip(),
                          f"{2 * (length + 1) / (trl_result['ms'] / 1000):,.0f}"]
            else:
                cells += [trl_result, ""]
        print("| " + " | ".join(cells) + " |", flush=True)
        if length == 2048 and ours is not None and ours["peak"]:
            verdict = "met" if ours["peak"] <= 16 * GiB else "NOT met"
            print(f"target (2048 tokens per side at most 16 GiB): {verdict}", file=sys.stderr)


if __name__ == "__main__":
    main()
