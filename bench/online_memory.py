"""The dry run's memory plan of an online recipe on a model shape, without the model's weights.

    python bench/online_memory.py                                   # recipes/llama3-8b-qlora-ppo-24gb.yaml, Llama-3-8B
    python bench/online_memory.py --recipe R.yaml --shape llama3-8b --set train.batch_size=2

Writes the shape's ``config.json`` and the quickstart tokenizer to a temporary folder (no weights: the plan
needs only the shape), a few prompts to read, and runs ``dpo-train RECIPE --dry-run`` with ``model.path``,
``data.train`` and ``output.dir`` pointed there, and ``model.adapter`` at an adapter folder holding only its
``adapter_config.json`` (the dry run checks that the folder is an adapter; the plan reads its rank). The
recipe's reward run need not exist yet. What it prints is arithmetic (:mod:`dpo.online.memory`), not a
measurement.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocabulary
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256),
    "tiny": (64, 2, 4, 2, 128, 128),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(_HERE.parent / "recipes" / "llama3-8b-qlora-ppo-24gb.yaml"))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    args = parser.parse_args()

    from transformers import LlamaConfig

    from dpo.cli import main as cli
    from dpo.quickstart import build_tokenizer

    hidden, layers, heads, kv_heads, intermediate, vocab = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(model)
        build_tokenizer().save_pretrained(model)
        adapter = Path(tmp) / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "base_model_name_or_path":
            str(model), "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"]}))
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"Parity of {n}:"}) + "\n" for n in range(10, 110)))
        overrides = [f"model.path={model}", f"model.adapter={adapter}", f"data.train={prompts}",
                     f"output.dir={Path(tmp) / 'out'}", *args.set]
        cli([args.recipe, "--dry-run", *[a for o in overrides for a in ("--set", o)]])


if __name__ == "__main__":
    main()
