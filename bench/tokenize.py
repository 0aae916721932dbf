"""Benchmark: tokenizing 100,000 short synthetic pairs through ``prepare_data``.

Run from the repository root:

    python bench/tokenize.py --pairs 100000 --num-proc 2

Writes a JSON-lines file of synthetic pairs and trains a byte-level BPE tokenizer on it (both in a temporary
folder; nothing is downloaded), then times ``prepare_data`` twice with a fresh cache: the first run reads,
validates, splits and tokenizes everything (``datasets.map`` with ``--num-proc`` workers) and writes the cache;
the second reuses the cache.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file shares its name with the standard library's tokenize module, which torch imports: run as a script,
# its own folder must not shadow that module. The repository root goes first so that `dpo` imports uninstalled.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have this from or had by word "
    "but what some we can out other were all there when up use your how said an each she which do their time if will "
    "way about many then them write would like so these her long make thing see him two has look more day could go "
    "come did number sound no most people my over know water than call first who may down side been now find"
).split()


def synthetic_pairs(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` pairs: a 6-20 word prompt and two different 3-15 word completions."""
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    pairs = []
    for i in range(n):
        chosen, rejected = " " + text(3, 15), " " + text(3, 15)
        if chosen == rejected:
            rejected += " no"
        pairs.append({"prompt": f"Question {i}: {text(6, 20)}?", "chosen": chosen, "rejected": rejected})
    return pairs


def bpe_tokenizer(lines: list[str]):
    """A byte-level BPE fast tokenizer trained on ``lines``, with BOS added in front of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    core.train_from_iterator(lines, trainer=trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from dpo.data import prepare_data
    from dpo.recipe import DataConfig

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        pairs = synthetic_pairs(args.pairs, args.seed)
        data = work / "pairs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
        tokenizer = bpe_tokenizer([p["prompt"] + p["chosen"] + p["rejected"] for p in pairs[:20_000]])
        config = DataConfig(
            train=str(data), cache_dir=str(work / "cache"), num_proc=args.num_proc, max_length=128, max_prompt_length=64
        )
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            prepared = prepare_data(config, tokenizer, unpaired=False, seed=args.seed, log=lambda _: None)
            timings.append(time.perf_counter() - start)
        print(prepared.stats.format())
        print(f"pairs: {args.pairs}, num_proc: {args.num_proc}")
        print(f"first run (read, validate, tokenize, write cache): {timings[0]:.1f} s")
        print(f"second run (cache hit):                            {timings[1]:.1f} s")


if __name__ == "__main__":
    main()
