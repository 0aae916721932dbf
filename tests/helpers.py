"""Builders for tests: local tokenizers and tiny random-weight models saved with ``save_pretrained``.

Nothing is downloaded; every model is loaded back through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dpo.quickstart import build_tokenizer, make_pairs

__all__ = ["build_tokenizer", "build_tiny_model", "write_jsonl", "write_pairs", "write_recipe"]


def build_tiny_model(directory: str | Path, arch: str = "llama", *, vocab_size: int | None = None,
                     hidden_size: int = 32, seed: int = 0) -> Path:
    """Save a tiny random model of the given architecture plus the test tokenizer to ``directory``.

    Args:
        directory: where to write (created).
        arch: "llama", "qwen2" (attention biases) or "gemma2" (final-logit softcap, tied head).
        vocab_size: defaults to the tokenizer's size.
        hidden_size: width of the tiny model.
        seed: weight initialisation seed.
    """
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    directory = Path(directory)
    tokenizer = build_tokenizer()
    vocab = vocab_size or len(tokenizer)
    common = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        config, cls = LlamaConfig(tie_word_embeddings=False, **common), LlamaForCausalLM
    elif arch == "qwen2":
        config, cls = Qwen2Config(tie_word_embeddings=False, **common), Qwen2ForCausalLM
    elif arch == "gemma2":
        config = Gemma2Config(head_dim=hidden_size // 4, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                              sliding_window=16, tie_word_embeddings=True, **common)
        cls = Gemma2ForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}")
    torch.manual_seed(seed)
    model = cls(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def write_pairs(directory: str | Path, train: int = 64, eval: int = 32, seed: int = 0) -> tuple[Path, Path]:
    """Quickstart-task pairs (train and held-out eval) as jsonl files."""
    directory = Path(directory)
    return (write_jsonl(directory / "train.jsonl", make_pairs(train, seed, numbers=range(10, 500))),
            write_jsonl(directory / "eval.jsonl", make_pairs(eval, seed + 1, numbers=range(500, 1000))))


def write_recipe(path: str | Path, tree: dict) -> Path:
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(tree, sort_keys=False), encoding="utf-8")
    return path
