"""Scoring (prompt, completion) rows with a trained reward model: ``dpo-train score``, and the compare report.

Rows are tokenized exactly as the reward model's training pairs were (its recipe's chat template, BOS/EOS
rules and truncation, through :class:`dpo.data.tokenize.RowTokenizer`), so a completion is scored at the
EOS the model was trained to read. Prompts and completions are text, or messages rendered by the chat
template (a completion then being the assistant turn).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dpo.data.chat import resolve_chat_template
from dpo.data.collate import pad_sequences
from dpo.data.load import load_rows
from dpo.data.tokenize import RowTokenizer
from dpo.data.validate import BadRow, DataError, RowProblem, handle_bad_rows, require_messages, require_text
from dpo.reference import length_sorted_batches
from dpo.reward.model import RewardRun, sequence_rewards


def tokenize_completions(rows: Sequence[dict[str, Any]], run: RewardRun, source: str) -> list[dict[str, Any]]:
    """Token ids of each (prompt, completion) row, as the reward model's training data was tokenized.

    Args:
        rows: ``{"prompt", "completion"}`` rows, all text or all messages (see :func:`validate_rows`).
        run: the reward model (its tokenizer and recipe's data settings are used).
        source: the rows' origin, for messages.

    Returns:
        ``{"index", "prompt_ids", "completion_ids"}`` per row, in order.
    """
    if not rows:
        return []
    data = run.recipe.data
    template, label = resolve_chat_template(data.chat_template, run.tokenizer)
    tokenizer = RowTokenizer(
        run.tokenizer, sides=("completion",), chat_template=template, template_label=label,
        max_length=data.max_length, max_prompt_length=data.max_prompt_length, truncation=data.truncation,
        source=source, unit="row",
    )
    out = tokenizer({"number": [r.get("number", i + 1) for i, r in enumerate(rows)],
                     "prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]})
    return [{"index": i, "prompt_ids": p, "completion_ids": c}
            for i, (p, c) in enumerate(zip(out["prompt_ids"], out["completion_ids"]))]


@torch.no_grad()
def score_tokenized(run: RewardRun, rows: Sequence[dict[str, Any]], batch_size: int, device) -> Tensor:
    """Reward of each tokenized row (``prompt_ids`` + ``completion_ids``), batched by length.

    Returns:
        ``[n]`` float32 scores on the CPU, in the order of ``rows``.
    """
    scores = torch.full((len(rows),), float("nan"))
    for positions in length_sorted_batches(rows, batch_size):
        batch = pad_sequences([(rows[p]["prompt_ids"], rows[p]["completion_ids"]) for p in positions],
                              run.tokenizer.pad_token_id)
        rewards = sequence_rewards(run.model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        scores[positions] = rewards.cpu()
    return scores


def score_texts(run: RewardRun, rows: Sequence[dict[str, Any]], batch_size: int, device, source: str) -> list[float]:
    """Scores of (prompt, completion) rows; identical rows are scored once, so they get identical scores."""
    keys = [json.dumps([r["prompt"], r["completion"]], sort_keys=True) for r in rows]
    first: dict[str, dict[str, Any]] = {}
    for key, row in zip(keys, rows):
        first.setdefault(key, row)
    tokenized = tokenize_completions(list(first.values()), run, source)
    by_key = dict(zip(first, score_tokenized(run, tokenized, batch_size, device).tolist()))
    return [by_key[k] for k in keys]


def validate_rows(rows: list[tuple[int, dict[str, Any]]], source: str, unit: str) -> tuple[list[dict[str, Any]], list[BadRow]]:
    """``{"number", "prompt", "completion"}`` rows; the first row decides text or messages for all."""
    chat = bool(rows) and isinstance(rows[0][1].get("prompt"), list)
    good, bad = [], []
    for number, row in rows:
        try:
            if chat:
                prompt = require_messages(row, "prompt", completion=False)
                completion = require_messages(row, "completion", completion=True)
            else:
                prompt, completion = require_text(row, "prompt"), require_text(row, "completion")
        except RowProblem as problem:
            bad.append(BadRow(source, unit, number, problem.reason, problem.detail))
            continue
        good.append({"number": number, "prompt": prompt, "completion": completion})
    return good, bad


def default_output(data: Path) -> Path:
    """``DIR/NAME.scores.jsonl`` beside ``DIR/NAME.EXT``."""
    return data.with_name(f"{data.stem}.scores.jsonl")


def score_file(run: RewardRun, data: str | Path, out: str | Path | None, batch_size: int, device,
               log: Callable[[str], None] = print) -> Path:
    """Score every (prompt, completion) row of a data file and write them with a ``score`` field.

    Args:
        run: the reward model.
        data: a .jsonl/.json/.parquet/.csv file or ``save_to_disk`` folder with ``prompt`` and ``completion``.
        out: the JSON-lines file to write (default: ``NAME.scores.jsonl`` beside ``data``).
        batch_size: rows per forward pass.
        device: where the model is.
        log: where the summary line goes.

    Returns:
        The path written: one line per input row, its fields plus ``score``, in the input order.
    """
    data = Path(data)
    raw = load_rows(str(data), split="train", key="--data")
    rows, bad = validate_rows(raw.rows, raw.source, raw.unit)
    handle_bad_rows(sorted(raw.bad + bad, key=lambda b: b.number), "error", log)
    if not rows:
        raise DataError(f"--data: {raw.source} has no rows to score (each needs prompt and completion)")
    scores = score_texts(run, rows, batch_size, device, raw.source)
    out = Path(out) if out is not None else default_output(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    originals = dict(raw.rows)
    with open(out, "w", encoding="utf-8") as handle:
        for row, score in zip(rows, scores):
            handle.write(json.dumps({**originals[row["number"]], "score": score}, ensure_ascii=False) + "\n")
    mean = sum(scores) / len(scores)
    spread = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    log(f"scored {len(scores)} rows of {raw.source} with {run.path} (mean {mean:.4f}, std {spread:.4f}): {out}")
    return out
