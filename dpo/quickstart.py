"""Builds the quickstart's assets: a character-level tokenizer, a tiny random-weight Llama and a
synthetic preference set whose preferred answer is checkable by a rule.

Everything is deterministic from a seed and needs no download. ``python -m dpo.quickstart DIR`` writes
``DIR/model`` (config, safetensors weights, tokenizer) and ``DIR/data/{train,eval}.jsonl``; the recipe
``recipes/quickstart.yaml`` points at ``recipes/quickstart``, which ships these files.

The task (see ``data_cards/quickstart-arithmetic.md``): questions about an integer whose answer depends
only on its last digit ("Parity of 347:", "Last digit of 347:", "Mod 5 of 347:").
The chosen completion is the correct answer, the rejected one a wrong answer of the same form, so a
policy that learns the rule ranks held-out pairs correctly; :func:`gold` is the rule as a gold scorer.
"""

from __future__ import annotations

import json
import random
import string
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = list(string.printable[:95]) + ["\n", "\t"]  # printable ASCII and the usual whitespace
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A character-level fast tokenizer with BOS ``<s>``, EOS ``</s>`` and pad ``<pad>``.

    Every printable ASCII character is one token, so token boundaries are easy to check by hand.
    BOS is prepended by the post-processor (``add_special_tokens=True``), EOS is not.
    """
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + [c for c in CHARACTERS if c not in SPECIAL_TOKENS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=4096,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def build_model(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A tiny random-weight ``LlamaForCausalLM`` (untied head, no biases)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _question(number: int, kind: str) -> tuple[str, str, list[str]]:
    """Return (prompt, correct answer, wrong answers) for one question.

    The prompt ends with the number, so the deciding digit sits two tokens before the answer's first letter.
    """
    last = number % 10
    if kind == "parity":
        correct = "even" if number % 2 == 0 else "odd"
        return f"Parity of {number}:", f" {correct}", [f" {'odd' if correct == 'even' else 'even'}"]
    if kind == "last_digit":
        return f"Last digit of {number}:", f" {last}", [f" {d}" for d in range(10) if d != last]
    if kind == "mod5":
        return f"Mod 5 of {number}:", f" {number % 5}", [f" {d}" for d in range(5) if d != number % 5]
    raise ValueError(f"unknown question kind {kind!r}")


def make_pairs(count: int, seed: int, numbers: range | list[int] = range(10, 1000)) -> list[dict[str, str]]:
    """``count`` preference pairs ``{prompt, chosen, rejected}``; chosen is correct by the rule."""
    rng = random.Random(seed)
    kinds = ["parity", "last_digit", "mod5"]
    pairs = []
    for _ in range(count):
        prompt, correct, wrong = _question(rng.choice(numbers), rng.choice(kinds))
        pairs.append({"prompt": prompt, "chosen": correct, "rejected": rng.choice(wrong)})
    return pairs


# The kinds of rejected answer in the reward model's pairs, and how often each is drawn (see make_reward_pairs).
REJECTED_KINDS = {"value": 0.4, "form": 0.15, "truncated": 0.15, "extended": 0.15, "garbled": 0.15}
ANSWER_WORDS = ("even", "odd")
GARBLE = string.ascii_letters + string.digits + string.punctuation  # printable, no whitespace


def _malformed(rng: random.Random, prompt: str, correct: str, wrong: list[str], kind: str) -> str:
    """A rejected answer of ``kind`` (see :data:`REJECTED_KINDS`) to ``prompt``: wrong by :func:`is_correct`."""
    digits = [f" {d}" for d in range(10)]
    words = [f" {w}" for w in ANSWER_WORDS]
    if kind == "value":  # the right form, the wrong value
        return rng.choice(wrong)
    if kind == "form":  # an answer of another question's form
        if prompt.startswith("Parity of"):
            return rng.choice(digits)
        if prompt.startswith("Mod 5 of"):
            return rng.choice(words + digits[5:])
        return rng.choice(words)
    if kind == "truncated":  # a word answer cut short
        word = rng.choice(ANSWER_WORDS)
        return " " + word[: rng.randint(1, len(word) - 1)]
    if kind == "extended":  # an answer with more after it: a repeat, a second answer, a second digit
        first = rng.choice([correct] + wrong)
        second = rng.choice(digits + words)
        return first + (second if rng.random() < 0.5 else second.lstrip())
    if kind == "garbled":  # an answer with a character replaced or added, or a few random characters
        if rng.random() < 0.3:
            return " " + "".join(rng.choice(GARBLE) for _ in range(rng.randint(1, 3)))
        text = rng.choice([correct] + wrong + words)
        at = rng.randrange(len(text) + 1)
        cut = at + (rng.random() < 0.5 and at < len(text))  # replace the character at `at`, or insert there
        return text[:at] + rng.choice(GARBLE) + text[cut:]
    raise ValueError(f"unknown rejected kind {kind!r}")


def make_reward_pairs(count: int, seed: int, numbers: range | list[int] = range(10, 1000)) -> list[dict[str, str]]:
    """``count`` pairs for a reward model: chosen is the correct answer as in :func:`make_pairs`, rejected an
    answer that is wrong in one of the ways of :data:`REJECTED_KINDS`: a wrong value of the right form, an answer
    of another question's form, a word cut short, or an answer with more after it.

    A reward model trained only on wrong values never sees an answer of the wrong form and may score one
    higher than any right answer; a policy optimised against it finds such answers (reward hacking).
    """
    rng = random.Random(seed)
    kinds = ["parity", "last_digit", "mod5"]
    rejected_kinds, weights = list(REJECTED_KINDS), list(REJECTED_KINDS.values())
    pairs = []
    for _ in range(count):
        prompt, correct, wrong = _question(rng.choice(numbers), rng.choice(kinds))
        kind = rng.choices(rejected_kinds, weights)[0]
        rejected = _malformed(rng, prompt, correct, wrong, kind)
        while is_correct(prompt, rejected):  # a garbled answer can come out right ("5" for " 5"): draw again
            rejected = _malformed(rng, prompt, correct, wrong, kind)
        pairs.append({"prompt": prompt, "chosen": correct, "rejected": rejected})
    return pairs


def is_correct(prompt: str, answer: str) -> bool:
    """The rule that labels the data: does ``answer`` correctly answer ``prompt``?"""
    number = int(prompt.rstrip(":").split()[-1])
    if prompt.startswith("Parity of"):
        return answer.strip() == ("even" if number % 2 == 0 else "odd")
    if prompt.startswith("Mod 5 of"):
        return answer.strip() == str(number % 5)
    if prompt.startswith("Last digit of"):
        return answer.strip() == str(number % 10)
    raise ValueError(f"not a quickstart question: {prompt!r}")


def gold(prompt: str, completion: str) -> float:
    """The quickstart's gold reward (``dpo.quickstart:gold``): 1.0 if ``completion`` is the correct answer to
    ``prompt`` by the rule that labels the data (:func:`is_correct`; surrounding whitespace ignored), else 0.0.
    """
    return 1.0 if is_correct(prompt, completion) else 0.0


def write_assets(directory: str | Path, *, train_pairs: int = 2000, eval_pairs: int = 200, seed: int = 0) -> Path:
    """Write the tokenizer, model and data under ``directory``. Train and eval numbers do not overlap."""
    directory = Path(directory)
    model_dir = directory / "model"
    data_dir = directory / "data"
    model_dir.mkdir(parents=True, exist_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(model_dir)
    build_model(len(tokenizer), seed=seed).save_pretrained(model_dir, safe_serialization=True)
    # Held-out pairs use numbers the training pairs never contain, so accuracy measures the rule.
    numbers = list(range(10, 1000))
    random.Random(seed).shuffle(numbers)
    eval_numbers = sorted(numbers[:100])
    train_numbers = sorted(numbers[100:])
    splits = {
        "train.jsonl": make_pairs(train_pairs, seed + 1, numbers=train_numbers),
        "eval.jsonl": make_pairs(eval_pairs, seed + 2, numbers=eval_numbers),
        # The reward model's pairs: the same split of the numbers, rejected answers wrong in every way.
        "reward-train.jsonl": make_reward_pairs(train_pairs, seed + 3, numbers=train_numbers),
        "reward-eval.jsonl": make_reward_pairs(eval_pairs, seed + 4, numbers=eval_numbers),
    }
    for name, rows in splits.items():
        with open(data_dir / name, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return directory


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "recipes/quickstart"
    print(f"wrote {write_assets(target)}")
