"""The memory plan per GPU of each engine: which engine for which model size and number of GPUs.

Run from the repository root (no GPU needed: this is the arithmetic of :mod:`dpo.model.memory`, the same
estimate ``dpo-train RECIPE --dry-run --engine E --processes N`` prints, not a measurement):

    python bench/engines.py                       # 1024 tokens per side, one pair per micro-batch
    python bench/engines.py --tokens 2048 --lora-r 64

Shapes are the public configs' sizes (Llama-3.2-1B, Llama-3-8B, Llama-3-70B); the base is 4-bit NF4 with
double quantization and bf16 compute (``--bits 16``: a bf16 base), LoRA on every linear layer, gradient
checkpointing, the fused Triton log-prob kernel, AdamW. Prints a Markdown table: the estimated peak per GPU
of one training step, and of the no-grad pass (reference precompute, evaluation) at ``--reference-pairs``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402

SHAPES = {  # vocab, hidden, layers, heads, kv heads, head dim, intermediate, tied head
    "Llama-3.2-1B": (128256, 2048, 16, 32, 8, 64, 8192, True),
    "Llama-3-8B": (128256, 4096, 32, 32, 8, 128, 14336, False),
    "Llama-3-70B": (128256, 8192, 80, 64, 8, 128, 28672, False),
}
# (engine, GPUs) rows of the table, per model.
LAYOUTS = [("single", 1), ("ddp", 2), ("zero2", 2), ("fsdp2", 2), ("fsdp2", 4), ("fsdp2", 8), ("fsdp2-offload", 2),
           ("zero3", 2)]


def main(argv: list[str] | None = None) -> None:
    from dpo.model.memory import (
        ENGINE_NAMES,
        LINEAR_NAMES,
        Batch,
        GiB,
        ModelShape,
        TrainingPlan,
        estimate_engine,
        estimate_no_grad_pass,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per side (prompt + completion)")
    parser.add_argument("--pairs", type=int, default=1, help="pairs per micro-batch (train.batch_size)")
    parser.add_argument("--reference-pairs", type=int, default=4, help="pairs per no-grad pass")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--bits", type=int, choices=(4, 16), default=4)
    parser.add_argument("--models", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args(argv)

    plan = TrainingPlan(weight_bits=4 if args.bits == 4 else None, double_quant=True, compute_dtype="bfloat16",
                        lora_r=args.lora_r, lora_targets=LINEAR_NAMES, lora_dropout=False, optimizer="adamw",
                        checkpointing=True, logprob_impl="triton", logprob_chunk=None, input_grads=True)
    half = args.tokens // 2  # prompt half, completion half: no padding
    step_batch = Batch(rows=2 * args.pairs, tokens=args.tokens, completion_tokens=2 * args.pairs * half)
    pass_batch = Batch(rows=2 * args.reference_pairs, tokens=args.tokens,
                       completion_tokens=2 * args.reference_pairs * half)
    base = "4-bit NF4" if args.bits == 4 else "bf16"
    print(f"Estimated peak per GPU (GiB; dpo.model.memory): {base} base, LoRA r={args.lora_r} on all linears, "
          f"checkpointing, AdamW, {args.pairs} pair(s) of {args.tokens} tokens per side a micro-batch; no-grad "
          f"pass at {args.reference_pairs} pairs. Not measured.\n")
    print("| model | engine | GPUs | training step | no-grad pass |")
    print("|---|---|---:|---:|---:|")
    for name in args.models:
        vocab, hidden, layers, heads, kv_heads, head_dim, intermediate, tied = SHAPES[name]
        shape = ModelShape(vocab=vocab, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                           head_dim=head_dim, intermediate=intermediate, tied_head=tied)
        for engine, gpus in LAYOUTS:
            step = estimate_engine(shape, plan, step_batch, engine, gpus)
            no_grad = estimate_no_grad_pass(shape, plan, pass_batch, engine, gpus)
            print(f"| {name} | {ENGINE_NAMES[engine]} | {gpus} | {step.peak / GiB:.1f} | {no_grad / GiB:.1f} |")


if __name__ == "__main__":
    main()
