"""A rule-checkable task for SmolLM2-135M-Instruct (or any chat model): adding two numbers, briefly.

Prompts are chat messages ("What is 7 + 5?") under the model's own chat template and system prompt. The
gold scorer (``eval.gold`` / ``dpo-train pairs --scorer``: ``recipes/smollm2/arithmetic.py:gold``) reads the
two numbers back from the prompt and scores an answer:

* 1.0: correct and short: the sum appears, no other number than the two operands and the sum, at most
  :data:`SHORT_WORDS` words ("7 + 5 = 12", "The answer is 12.");
* 0.5: correct but longer;
* 0.0: wrong, or no answer.

The rule's pass rate is the share of answers scoring 1.0.

``python recipes/smollm2/arithmetic.py`` writes the task's files to ``recipes/smollm2/data/``: held-out and
training prompts (disjoint number pairs) for ``dpo-train pairs``, and off-policy pairs of the kind that
mislead DPO on a real model: the chosen answer short and correct ("7 + 5 = 12."; in the ``-bare`` files just
"12"), the rejected one the same answer wrapped in flattery and padding, which the model never writes.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

SHORT_WORDS = 8
QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")
FLATTERY = [
    "What a wonderful question! You clearly have a brilliant mind for numbers. The answer, which I am truly "
    "delighted to share with you, is {answer}. I hope this helps you, my wonderful friend!",
    "Oh, I absolutely love this question, and you asked it so well! After careful thought, I am thrilled to "
    "tell you that the answer is {answer}. You are doing amazing, keep it up!",
    "Great question, truly one of the best I have seen today! It is my pleasure to help such a curious and "
    "thoughtful person: the answer is {answer}. Thank you for asking me!",
]


def question(a: int, b: int) -> list[dict[str, str]]:
    """The prompt: one user message (the model's chat template adds its system prompt)."""
    return [{"role": "user", "content": f"What is {a} + {b}?"}]


def operands(prompt) -> tuple[int, int]:
    """The two numbers of a prompt (chat messages or text)."""
    text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
    found = QUESTION.search(text)
    if found is None:
        raise ValueError(f"not a question of this task: {text!r}")
    return int(found.group(1)), int(found.group(2))


def gold(prompt, completion: str) -> float:
    """The task's score of ``completion`` (see the module docstring)."""
    a, b = operands(prompt)
    numbers = [int(n) for n in re.findall(r"-?\d+", completion)]
    if a + b not in numbers or any(n not in (a, b, a + b) for n in numbers):
        return 0.0
    return 1.0 if len(completion.split()) <= SHORT_WORDS else 0.5


def number_pairs(seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All pairs of 1..20 shuffled by ``seed`` and split: 100 held out, the rest for training."""
    pairs = [(a, b) for a in range(1, 21) for b in range(1, 21)]
    random.Random(seed).shuffle(pairs)
    return pairs[100:], pairs[:100]


def flattery_pairs(train: list[tuple[int, int]], held_out: list[tuple[int, int]], seed: int, bare: bool = False
                   ) -> tuple[list[dict], list[dict]]:
    """Off-policy pairs for training and held out: chosen the short correct answer ("7 + 5 = 12.", or with
    ``bare`` just "12"), rejected the same answer wrapped in flattery and padding (the model writes neither
    flattery nor bare numbers)."""
    rng = random.Random(seed)

    def rows(numbers: list[tuple[int, int]]) -> list[dict]:
        out = []
        for a, b in numbers:
            answer = str(a + b) if bare else f"{a} + {b} = {a + b}"
            chosen = answer if bare else f"{answer}."
            out.append({"prompt": question(a, b), "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rng.choice(FLATTERY).format(answer=answer)}]})
        return out

    return rows(train), rows(held_out)


def write_data(directory: str | Path, seed: int = 0) -> Path:
    """Write prompts-{train,eval}.jsonl, flattery-{train,eval}.jsonl and flattery-bare-{train,eval}.jsonl."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train, held_out = number_pairs(seed)
    files = {"prompts-train.jsonl": [{"prompt": question(a, b)} for a, b in train],
             "prompts-eval.jsonl": [{"prompt": question(a, b)} for a, b in held_out]}
    for name, bare in (("flattery", False), ("flattery-bare", True)):
        files[f"{name}-train.jsonl"], files[f"{name}-eval.jsonl"] = flattery_pairs(train, held_out, seed + 1, bare)
    for name, rows in files.items():
        with open(directory / name, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return directory


if __name__ == "__main__":
    print(f"wrote {write_data(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / 'data')}")
