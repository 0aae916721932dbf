"""Benchmark: the reference log-prob cache (weight hashing, precompute speed, start-up time on a hit).

Run from the repository root:

    python bench/reference.py --preset tiny --pairs 2000                       # CPU, the quickstart-sized Llama
    python bench/reference.py --preset 1b --pairs 4000 --dtype bfloat16 --batch-size 64   # GPU

Everything is built in a temporary folder (a random-weight Llama saved with ``save_pretrained``, the
character-level quickstart tokenizer, synthetic pairs of the requested length); nothing is downloaded.
Measured, in order:

1. SHA-256 throughput on a ``--hash-mb`` file just written (so in the page cache: the hashing speed, not
   the disk's), extrapolated to a 16 GB checkpoint; the first identity computation of the saved model and
   a second one, answered from the memo;
2. the precompute, as ``dpo-train cache RECIPE`` runs it: sequences/s of the reference forward, and the
   whole command's time;
3. time from entering ``dpo.train.loop.train`` to the first training step, with an empty cache (miss) and
   with the cache filled by step 2 (hit).

Prints one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

# bench/tokenize.py would shadow the standard library's tokenize module (torch imports it), so this folder
# leaves the path; the repository root goes first so that `dpo` imports without installing.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

PRESETS = {  # hidden, layers, heads, kv heads, intermediate, vocabulary (the LM head's cost grows with it)
    "tiny": (64, 2, 4, 2, 128, None),
    "160m": (768, 12, 12, 4, 2048, 32000),
    "1b": (2048, 16, 32, 8, 5632, 32000),
}


def build_model(directory: Path, preset: str, dtype: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo.quickstart import build_tokenizer

    tokenizer = build_tokenizer()
    hidden, layers, heads, kv_heads, intermediate, vocab = PRESETS[preset]
    config = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def synthetic_pairs(count: int, prompt_chars: int, completion_chars: int, seed: int) -> list[dict[str, str]]:
    """Pairs of random lowercase text; the char-level tokenizer makes one token per character."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     "

    def text(mean: int) -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(mean // 2, 3 * mean // 2)))

    return [{"prompt": text(prompt_chars), "chosen": " " + text(completion_chars),
             "rejected": " " + text(completion_chars)} for _ in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--pairs", type=int, default=2000, help="training pairs (eval: a tenth)")
    parser.add_argument("--prompt-chars", type=int, default=60)
    parser.add_argument("--completion-chars", type=int, default=40)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batch-size", type=int, default=16, help="reference.batch_size")
    parser.add_argument("--hash-mb", type=int, default=1024, help="size of the file whose SHA-256 speed is timed")
    args = parser.parse_args(argv)

    import torch

    from dpo.recipe import recipe_from_dict
    from dpo.reference.fingerprint import HashIndex, folder_identity, network_files, sha256_of_file
    from dpo.reference.setup import precompute_references

    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, object] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                  "threads": torch.get_num_threads(), **vars(args)}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        build_model(work / "model", args.preset, args.dtype)
        pairs = synthetic_pairs(args.pairs + args.pairs // 10, args.prompt_chars, args.completion_chars, seed=0)
        for name, rows in (("train", pairs[: args.pairs]), ("eval", pairs[args.pairs :])):
            (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

        # 1. Identity of the weights: full hash once, memo afterwards; raw SHA-256 speed on a large file.
        blob = work / "blob.bin"
        with open(blob, "wb") as out:
            for _ in range(args.hash_mb):
                out.write(os.urandom(1 << 20))
        start = time.perf_counter()
        sha256_of_file(blob)
        rate = args.hash_mb * (1 << 20) / (time.perf_counter() - start) / 1e6
        blob.unlink()
        size = sum(p.stat().st_size for p in network_files(work / "model"))
        start = time.perf_counter()
        folder_identity(str(work / "model"), HashIndex(work / "hashes.json"), "model.path")
        hashed = time.perf_counter() - start
        start = time.perf_counter()
        folder_identity(str(work / "model"), HashIndex(work / "hashes.json"), "model.path")
        memo = time.perf_counter() - start
        results["hash"] = {"sha256_MB_per_s": round(rate), "extrapolated_16GB_s": round(16e9 / 1e6 / rate, 1),
                           "model_bytes": size, "model_first_identity_s": round(hashed, 3),
                           "model_memo_hit_s": round(memo, 4)}

        tree = {
            "model": {"path": str(work / "model"), "dtype": args.dtype},
            "data": {"train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl"),
                     "max_length": 2 * (args.prompt_chars + args.completion_chars) + 8,
                     "max_prompt_length": 2 * args.prompt_chars + 4, "cache_dir": str(work / "tokenized")},
            "loss": {"name": "dpo"},
            "train": {"max_steps": 1, "batch_size": 4, "log_every": 1},
            "reference": {"batch_size": args.batch_size, "cache_dir": str(work / "cache")},
            "output": {"dir": str(work / "out-precompute")},
        }

        # 2. The precompute as `dpo-train cache` runs it.
        lines: list[str] = []
        start = time.perf_counter()
        precompute_references(recipe_from_dict(tree), log=lines.append)
        results["precompute_command_s"] = round(time.perf_counter() - start, 2)
        rates = [re.search(r"computed (\d+) sequences in ([\d.]+)s \(([\d.]+) sequences/s\)", line) for line in lines]
        results["precompute"] = [{"sequences": int(m[1]), "seconds": float(m[2]), "sequences_per_s": float(m[3])}
                                 for m in rates if m]

        # 3. Start to first training step, cache miss then hit.
        results["start_to_first_step_s"] = {
            "miss": first_step_time({**tree, "reference": {**tree["reference"], "cache_dir": str(work / "cold")},
                                     "output": {"dir": str(work / "out-miss")}}),
            "hit": first_step_time({**tree, "output": {"dir": str(work / "out-hit")}}),
        }
    print(json.dumps(results, indent=2))


def first_step_time(tree: dict) -> float:
    """Seconds from calling ``train`` to the start of the first training step's loss."""
    import dpo.train.loop as trainer
    import dpo.train.setup as train_setup
    from dpo.recipe import recipe_from_dict

    real_batch_loss = train_setup.batch_loss
    marks: list[float] = []

    def timed_batch_loss(policy, *args, **kwargs):
        if policy.training and not marks:
            marks.append(time.perf_counter())
        return real_batch_loss(policy, *args, **kwargs)

    train_setup.batch_loss = timed_batch_loss
    try:
        start = time.perf_counter()
        trainer.train(recipe_from_dict(tree), log=lambda _: None)
    finally:
        train_setup.batch_loss = real_batch_loss
    return round(marks[0] - start, 2)


if __name__ == "__main__":
    main()
