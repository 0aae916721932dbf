"""A word-level test tokenizer and data-config builder for the data tests.

Every word and every run of punctuation is one token (the ``Whitespace`` pre-tokenizer splits on
``\\w+|[^\\w\\s]+``), so a prompt/completion boundary can be checked by reading token strings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from dpo.recipe import DataConfig

FIXTURES = Path(__file__).parent / "fixtures"
SPECIAL = ["<pad>", "<bos>", "<eos>", "<unk>"]
MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Each turn renders as "<|role|> content <|end|> "; the generation prompt is "<|assistant|>", which is
# also how the next assistant turn starts, so the prompt is a prefix of prompt + completion.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EXTRA_WORDS = ["alpha", "beta", "gamma", "delta"]


def fixture_words() -> list[str]:
    """Every word and punctuation run in the fixture files' strings, sorted."""
    words: set[str] = set(EXTRA_WORDS)
    for path in FIXTURES.glob("*.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            for text in _strings(row):
                words.update(re.findall(r"\w+|[^\w\s]+", text))
    return sorted(words)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def build_word_tokenizer(*, adds_bos: bool = True, chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A fast word-level tokenizer with ``<bos>`` (added in front of text when ``adds_bos``), ``<eos>``, ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + MARKERS + fixture_words())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece()
    if adds_bos:
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": MARKERS})
    tokenizer.chat_template = chat_template
    return tokenizer


def data_config(train: str | Path, cache_dir: str | Path, **fields: Any) -> DataConfig:
    """A ``DataConfig`` for ``train`` with its cache in ``cache_dir``; ``fields`` override defaults."""
    return DataConfig(train=str(train), cache_dir=str(cache_dir), **fields)


def tokens(tokenizer: Any, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(ids))
