"""Held-out answers during training: what the policy writes, beside what its preference metrics say.

At every evaluation (before, during and after training) the first ``eval.generate`` unique held-out prompts
are answered greedily, at most ``eval.max_new_tokens`` tokens each, and the evaluation record gets:

==================  ============================================================================
``generate/length``  mean completion length in tokens (the EOS not counted)
``generate/eos``     share of answers that ended with EOS within ``max_new_tokens``
``generate/gold``    mean of the ``eval.gold`` scorer over the answers (with a scorer)
==================  ============================================================================

The greedy answers to the first ``eval.samples`` prompts are appended to ``samples.jsonl`` (one line per
prompt: ``split``, ``step``, ``prompt``, ``completion``, ``tokens``, ``ended``, and ``gold`` with a
scorer) at every evaluation and every ``train.sample_every`` steps, and the first is shown in the log, so
a change of behaviour (or a collapse) shows while the run goes on.

Prompts are tokenized as training prompts are (:func:`dpo.model.encode_prompt`). Decoding runs with the
adapter on, in eval mode, under a saved and restored RNG state: answering changes nothing in the run's
result. In a multi-process run the main process answers alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from dpo.data.chat import resolve_chat_template
from dpo.files import writing
from dpo.model import SamplingSettings, completion_text, encode_prompt, sample_completions
from dpo.recipe import Recipe
from dpo.reward import Gold
from dpo.train.output_dir import SAMPLES_FILE

Log = Callable[[str], None]
_SHOWN_CHARACTERS = 160


def prompt_label(prompt: Any) -> str:
    """A prompt as one short line: text as it is, chat messages as their last message's content."""
    text = prompt[-1]["content"] if isinstance(prompt, list) and prompt else str(prompt)
    return text if len(text) <= _SHOWN_CHARACTERS else text[: _SHOWN_CHARACTERS - 3] + "..."


@dataclass
class HeldOutAnswers:
    """Greedy answers to held-out prompts (see the module docstring).

    Attributes:
        prompts: the unique held-out prompts answered (the first ``max(measured, written)``).
        prompt_ids: their token ids.
        measured: how many are answered for the metrics at each evaluation (``eval.generate``).
        written: how many go to ``samples.jsonl`` (``eval.samples``).
        gold: the ``eval.gold`` scorer, or None.
        run_dir: the output directory (None on processes other than the main one: they answer nothing).
    """

    tokenizer: Any
    prompts: list
    prompt_ids: list[list[int]]
    measured: int
    written: int
    settings: SamplingSettings
    gold: Gold | None
    run_dir: Any
    log: Log

    @classmethod
    def build(cls, recipe: Recipe, tokenizer: Any, eval_prompts: list, gold: Gold | None, run_dir,
              log: Log) -> HeldOutAnswers:
        """The first unique prompts of the held-out split, tokenized as training prompts are."""
        count = max(recipe.eval.generate, recipe.eval.samples) if run_dir is not None else 0
        unique: dict[str, Any] = {}
        for prompt in eval_prompts:
            if len(unique) >= count:
                break
            unique.setdefault(json.dumps(prompt, sort_keys=True), prompt)
        prompts = list(unique.values())
        template, _ = resolve_chat_template(recipe.data.chat_template, tokenizer)
        prompt_ids = [encode_prompt(tokenizer, p, template, recipe.data.max_prompt_length) for p in prompts]
        settings = SamplingSettings(max_new_tokens=recipe.eval.max_new_tokens, temperature=0.0, top_p=1.0,
                                    samples_per_prompt=1, seed=0, batch_size=recipe.reference.batch_size)
        return cls(tokenizer, prompts, prompt_ids, min(recipe.eval.generate, len(prompts)),
                   min(recipe.eval.samples, len(prompts)), settings, gold, run_dir, log)

    def evaluate(self, model, step: int, device) -> dict[str, float]:
        """Answer for an evaluation: the ``generate/*`` metrics, and the samples written and shown."""
        answers = self._answer(model, max(self.measured, self.written), device, score=self.measured)
        self._write(answers[: self.written], "eval", step)
        measured = answers[: self.measured]
        if not measured:
            return {}
        metrics = {"generate/length": sum(a["tokens"] for a in measured) / len(measured),
                   "generate/eos": sum(a["ended"] for a in measured) / len(measured)}
        if self.gold is not None:
            metrics["generate/gold"] = sum(a["gold"] for a in measured) / len(measured)
        return metrics

    def sample(self, model, step: int, device) -> None:
        """Answer the first ``written`` prompts between evaluations (``train.sample_every``)."""
        self._write(self._answer(model, self.written, device, score=self.written), "train", step)

    def _answer(self, model, count: int, device, score: int) -> list[dict[str, Any]]:
        """Greedy answers to the first ``count`` prompts; the first ``score`` are scored by the gold scorer."""
        if count == 0:
            return []
        # Greedy decoding draws nothing, but the sampler seeds the global generator: the dropout masks of
        # the steps to come must not depend on whether (or how often) answers were generated.
        devices = [device.index or 0] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            samples = sample_completions(model, self.tokenizer, self.prompt_ids[:count], self.settings, device)
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        eos_id = self.tokenizer.eos_token_id
        answers = []
        for position, (ids, ended) in enumerate(zip(samples.completion_ids, samples.ended)):
            text = completion_text(ids, decode, eos_id)
            answer = {"prompt": self.prompts[position], "completion": text, "tokens": len(ids) - int(ended),
                      "ended": ended}
            if self.gold is not None and position < score:
                answer["gold"] = self.gold(self.prompts[position], text)
            answers.append(answer)
        return answers

    def _write(self, answers: list[dict[str, Any]], split: str, step: int) -> None:
        if not answers:
            return
        lines = "".join(json.dumps({"split": split, "step": step, **a}, ensure_ascii=False) + "\n" for a in answers)
        self.run_dir.record(files=[SAMPLES_FILE])
        path = self.run_dir.root / SAMPLES_FILE
        with writing(path, "samples", len(lines.encode("utf-8"))), open(path, "a", encoding="utf-8") as handle:
            handle.write(lines)
        first = answers[0]
        self.log(f"sample at step {step}: {prompt_label(first['prompt'])!r} -> {prompt_label(first['completion'])!r}"
                 + ("" if first["ended"] else " (no EOS)"))
