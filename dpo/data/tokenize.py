"""Tokenizing canonical rows: the prompt/completion boundary, BOS/EOS, and truncation.

Text rows: the prompt and each completion are tokenized separately without special tokens; the
prompt gets the tokenizer's BOS exactly once (if the tokenizer adds one), each completion gets EOS
exactly once. Chat rows: the template renders the prompt (with the generation prompt) and the prompt +
completion; the completion's tokens are what follows the prompt's tokens (see :mod:`dpo.data.chat`).

Truncation of one row, given ``max_length`` and ``max_prompt_length``: when the prompt plus its longest
completion is longer than ``max_length``, the prompt is first cut to ``max_prompt_length`` (``keep_end``
keeps its end and its BOS, ``keep_start`` its start); then each completion is cut at its end to fit
``max_length``. The prompt is cut once for both sides of a pair, so chosen and rejected share it
exactly. A row whose completion would be left with no token is dropped and counted.

Before any of that, a text far longer than ``max_length`` tokens could hold is cut to
:func:`char_budget` characters (the end of a prompt under ``keep_end``, else the start), so a 5 MB line
costs what a page does; such a row counts as truncated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dpo.data.chat import prefix_error, prefix_mismatch, render
from dpo.data.validate import DataError


@dataclass(frozen=True)
class SpecialTokens:
    """``bos_id`` is set only if the tokenizer puts BOS in front of text; ``eos_id`` always."""

    bos_id: int | None
    eos_id: int


def special_tokens(tokenizer: Any) -> SpecialTokens:
    """The BOS the model expects (if any) and its EOS."""
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no eos_token, so completions cannot be ended; set eos_token in the model's "
            "tokenizer_config.json"
        )
    bos_id = tokenizer.bos_token_id
    # A tokenizer may define a BOS it never adds (GPT-2); only one that adds it gets it in prompts.
    if bos_id is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] != [bos_id]:
        bos_id = None
    return SpecialTokens(bos_id=bos_id, eos_id=tokenizer.eos_token_id)


def char_budget(tokenizer: Any, max_length: int) -> int:
    """Characters of text that always hold more than ``max_length`` tokens: twice ``max_length`` times the
    longest token of the vocabulary (special tokens aside; a token never spans more text than its own
    string). Cutting a text to this many characters keeps every token that truncation could keep."""
    special = set(getattr(tokenizer, "all_special_tokens", []))
    longest = max((len(token) for token in tokenizer.get_vocab() if token not in special), default=1)
    return 2 * max_length * max(longest, 1)


def cut_text(text: str, budget: int, keep_end: bool) -> tuple[str, bool]:
    """``text`` cut to ``budget`` characters (its end if ``keep_end``), and whether it was cut."""
    if len(text) <= budget:
        return text, False
    return (text[-budget:] if keep_end else text[:budget]), True


def with_single_bos(ids: list[int], bos_id: int | None) -> list[int]:
    """``ids`` starting with exactly one ``bos_id`` (unchanged when ``bos_id`` is ``None``)."""
    if bos_id is None:
        return ids
    start = 0
    while start < len(ids) and ids[start] == bos_id:
        start += 1
    return [bos_id, *ids[start:]]


def with_single_eos(ids: list[int], eos_id: int, is_blank: Callable[[list[int]], bool]) -> list[int]:
    """``ids`` ending with exactly one ``eos_id``.

    An EOS already at the end (a template closing the turn with it) is kept, also when only blank
    tokens follow it (``<|im_end|>\\n``); a run of EOS there is reduced to one.
    """
    last = len(ids) - 1 - ids[::-1].index(eos_id) if eos_id in ids else -1
    if last < 0 or not is_blank(ids[last + 1 :]):
        return [*ids, eos_id]
    first = last
    while first > 0 and ids[first - 1] == eos_id:
        first -= 1
    return ids[: first + 1] + ids[last + 1 :]


def cut_prompt(ids: list[int], max_prompt_length: int, truncation: str, bos_id: int | None) -> list[int]:
    """The prompt cut to ``max_prompt_length`` tokens; ``keep_end`` keeps a leading BOS."""
    if len(ids) <= max_prompt_length:
        return ids
    if truncation == "keep_start":
        return ids[:max_prompt_length]
    if bos_id is not None and ids[:1] == [bos_id]:
        return [bos_id, *ids[len(ids) - max_prompt_length + 1 :]]
    return ids[len(ids) - max_prompt_length :]


def truncate(
    prompt: list[int],
    completions: list[list[int]],
    *,
    max_length: int,
    max_prompt_length: int,
    truncation: str,
    bos_id: int | None,
) -> tuple[list[int], list[list[int]], bool]:
    """Fit a prompt and its completions (one per side) into ``max_length`` tokens each.

    Returns:
        ``(prompt, completions, truncated)``; a completion may come back empty (the row must be dropped).
    """
    truncated = False
    if len(prompt) + max(len(c) for c in completions) > max_length and len(prompt) > max_prompt_length:
        prompt = cut_prompt(prompt, max_prompt_length, truncation, bos_id)
        truncated = True
    room = max(max_length - len(prompt), 0)
    if any(len(c) > room for c in completions):
        completions = [c[:room] for c in completions]
        truncated = True
    return prompt, completions, truncated


class RowTokenizer:
    """The ``datasets.map`` function (batched) turning canonical rows into token ids.

    Output columns: ``prompt_ids`` and ``<side>_ids`` (truncated), ``prompt_length`` and
    ``<side>_length`` (before truncation), ``truncated`` and ``dropped`` (a completion left empty).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        sides: tuple[str, ...],
        chat_template: str | None,
        template_label: str,
        max_length: int,
        max_prompt_length: int,
        truncation: str,
        source: str,
        unit: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.sides = sides
        self.chat_template = chat_template
        self.template_label = template_label
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.source = source
        self.unit = unit
        self.special = special_tokens(tokenizer)
        self.char_budget = char_budget(tokenizer, max_length)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        chat = bool(batch["prompt"]) and isinstance(batch["prompt"][0], list)
        batch, cut = self._cut_long_texts(batch, chat)
        prompts, completions = self._chat_ids(batch) if chat else self._text_ids(batch)
        out: dict[str, list[Any]] = {k: [] for k in ("prompt_ids", "prompt_length", "truncated", "dropped")}
        for side in self.sides:
            out[f"{side}_ids"], out[f"{side}_length"] = [], []
        for i, prompt in enumerate(prompts):
            prompt = with_single_bos(prompt, self.special.bos_id)
            sides = [with_single_eos(completions[s][i], self.special.eos_id, self._is_blank) for s in self.sides]
            out["prompt_length"].append(len(prompt))
            for side, ids in zip(self.sides, sides):
                out[f"{side}_length"].append(len(ids))
            prompt, sides, truncated = truncate(
                prompt,
                sides,
                max_length=self.max_length,
                max_prompt_length=self.max_prompt_length,
                truncation=self.truncation,
                bos_id=self.special.bos_id,
            )
            out["prompt_ids"].append(prompt)
            for side, ids in zip(self.sides, sides):
                out[f"{side}_ids"].append(ids)
            out["truncated"].append(truncated or cut[i])
            out["dropped"].append(any(not ids for ids in sides))
        return out

    def _cut_long_texts(self, batch: dict[str, list[Any]], chat: bool) -> tuple[dict[str, list[Any]], list[bool]]:
        """The batch with every text (every message's content) cut to the character budget, and per row
        whether anything was cut. A prompt keeps its end under ``keep_end``; completions keep their start."""
        cut = [False] * len(batch["prompt"])
        out = dict(batch)
        for column in ("prompt", *self.sides):
            keep_end = column == "prompt" and self.truncation == "keep_end"
            values = []
            for i, value in enumerate(batch[column]):
                if chat:
                    messages = []
                    for message in value:
                        content, was_cut = cut_text(message["content"], self.char_budget, keep_end)
                        messages.append({**message, "content": content})
                        cut[i] = cut[i] or was_cut
                    values.append(messages)
                else:
                    text, was_cut = cut_text(value, self.char_budget, keep_end)
                    values.append(text)
                    cut[i] = cut[i] or was_cut
            out[column] = values
        return out, cut

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _is_blank(self, ids: list[int]) -> bool:
        return not ids or not self.tokenizer.decode(ids).strip()

    def _text_ids(self, batch: dict[str, list[Any]]) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
        return self._encode(batch["prompt"]), {side: self._encode(batch[side]) for side in self.sides}

    def _chat_ids(self, batch: dict[str, list[Any]]) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
        if self.chat_template is None:
            raise DataError(
                f"{self.source}: the rows are chat messages, but the tokenizer has no chat template; set "
                "data.chat_template to a Jinja template or a file holding one"
            )
        prompt_texts = [render(self.tokenizer, self.chat_template, p, generation_prompt=True) for p in batch["prompt"]]
        prompt_ids = self._encode(prompt_texts)
        completions: dict[str, list[list[int]]] = {}
        for side in self.sides:
            wholes = [
                render(self.tokenizer, self.chat_template, p + c, generation_prompt=False)
                for p, c in zip(batch["prompt"], batch[side])
            ]
            for i, (prompt, whole) in enumerate(zip(prompt_texts, wholes)):
                at = prefix_mismatch(prompt, whole)
                if at is not None:
                    raise prefix_error(self._where(batch, i), self.template_label, side, prompt, whole, at)
            whole_ids = self._encode(wholes)
            for i, (prompt, whole) in enumerate(zip(prompt_ids, whole_ids)):
                at = prefix_mismatch(prompt, whole)
                if at is not None:
                    tokens = self.tokenizer.convert_ids_to_tokens
                    raise prefix_error(
                        self._where(batch, i), self.template_label, side, tokens(prompt), tokens(whole), at
                    )
            completions[side] = [whole[len(prompt) :] for prompt, whole in zip(prompt_ids, whole_ids)]
        return prompt_ids, completions

    def _where(self, batch: dict[str, list[Any]], i: int) -> str:
        return f"{self.source}, {self.unit} {batch['number'][i]}"
