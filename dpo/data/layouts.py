"""Preference layouts: detecting them from the columns, and normalising rows to one canonical form.

Canonical rows are ``{"number", "prompt", "chosen", "rejected"}`` (paired) or
``{"number", "prompt", "completion", "label"}`` (unpaired). In text rows the prompt and completions
are strings that are tokenized as they are; in chat rows the prompt is a list of messages and each
completion a list of assistant messages, rendered later by a chat template.

Layouts:
    explicit: ``prompt``, ``chosen``, ``rejected`` strings.
    conversational: ``prompt`` a list of messages, ``chosen`` / ``rejected`` lists of assistant messages.
    hh_rlhf: ``chosen`` / ``rejected`` whole ``\\n\\nHuman: ... \\n\\nAssistant: ...`` transcripts; the
        prompt is their shared prefix up to and including the last ``\\n\\nAssistant:`` both share.
    message_lists: ``chosen`` / ``rejected`` whole conversations; the prompt is every message before
        the final assistant turn and must be the same on both sides (a ``prompt`` column is ignored).
    unpaired: ``prompt``, ``completion``, ``label`` (true = desirable), as text or messages.
    demonstrations: ``prompt`` and ``completion`` without a label (text or messages), or ``messages``, a
        whole conversation whose final assistant turn is the completion; for supervised fine-tuning only.
        Canonical rows are unpaired rows with ``label`` true.

Pairs whose preferred side is given by a label (SHP) map ``response_a``, ``response_b`` and
``preference`` (1/true: ``response_a`` is preferred) and then follow ``explicit`` or ``conversational``.
"""

from __future__ import annotations

import os
from typing import Any

from dpo.data.validate import (
    EMPTY_TEXT,
    IDENTICAL,
    MALFORMED_MESSAGES,
    MISMATCHED_PROMPTS,
    DataError,
    RowProblem,
    require_flag,
    require_messages,
    require_present,
    require_text,
)

LAYOUTS = ("explicit", "conversational", "hh_rlhf", "message_lists", "unpaired", "demonstrations")
# Layouts whose canonical rows hold one completion each (unpaired rows), not a pair.
SINGLE_LAYOUTS = ("unpaired", "demonstrations")
CANONICAL_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label", "response_a", "response_b", "preference",
                     "messages")
PREFERENCE_COLUMNS = ("response_a", "response_b", "preference")
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"


def rename_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The row with each mapped source column under its canonical name (``columns``: canonical -> source)."""
    if not columns:
        return row
    renamed = {k: v for k, v in row.items() if k not in columns}
    for canonical, source in columns.items():
        if source in row:
            renamed[canonical] = row[source]
    return renamed


def check_mapped_columns(column_names: list[str], columns: dict[str, str], source: str) -> None:
    """Every source column named in ``data.columns`` must exist in the data."""
    missing = {c: s for c, s in columns.items() if s not in column_names}
    if missing:
        wanted = ", ".join(f"{c} -> '{s}'" for c, s in missing.items())
        raise DataError(
            f"{source}: data.columns maps {wanted}, but there is no such column; the columns are: "
            f"{', '.join(column_names)}"
        )


def detect_layout(column_names: list[str], sample: dict[str, Any], source: str) -> str:
    """The layout implied by the (canonical) column names and the value types of one row.

    Args:
        column_names: every column of the data, after ``data.columns`` renaming.
        sample: one row, after renaming, whose types decide between text and messages.
        source: the data source, for the error message.
    """
    names = set(column_names)
    if {"completion", "label"} <= names:
        return "unpaired"
    if set(PREFERENCE_COLUMNS) <= names:
        names |= {"chosen", "rejected"}
        sample = {**sample, "chosen": sample.get("response_a")}
    if {"chosen", "rejected"} <= names:
        chosen_is_text = isinstance(sample.get("chosen"), str)
        if "prompt" in names and isinstance(sample.get("prompt"), list):
            return "conversational"
        if "prompt" in names and chosen_is_text:
            return "explicit"
        return "hh_rlhf" if chosen_is_text else "message_lists"
    if {"prompt", "completion"} <= names or "messages" in names:
        return "demonstrations"
    raise DataError(
        f"{source}: cannot tell the layout from the columns {', '.join(column_names) or '(none)'}. Expected prompt/chosen/"
        "rejected, chosen/rejected transcripts or conversations, prompt/completion/label, or response_a/"
        "response_b/preference (or, for task: sft, prompt/completion or messages); map other names with data.columns (e.g. prompt: question, chosen: "
        "response_j, rejected: response_k) or set data.layout."
    )


def uses_chat(layout: str, sample: dict[str, Any]) -> bool:
    """Whether rows of ``layout`` are messages rendered by a chat template (else plain text)."""
    if layout in ("conversational", "message_lists"):
        return True
    if layout == "unpaired":
        return isinstance(sample.get("prompt"), list)
    if layout == "demonstrations":
        return "prompt" not in sample or isinstance(sample.get("prompt"), list)
    return False


def normalise_row(row: dict[str, Any], layout: str, *, chat: bool) -> dict[str, Any]:
    """One canonical row (without ``number``); a defect raises :class:`RowProblem`.

    Args:
        row: the raw row after ``data.columns`` renaming.
        layout: one of :data:`LAYOUTS`.
        chat: the dataset's rows are messages (see :func:`uses_chat`).
    """
    if layout == "unpaired":
        return _unpaired(row, chat=chat)
    if layout == "demonstrations":
        return _demonstration(row, chat=chat)
    row = _resolve_preference(row)
    if layout == "explicit":
        prompt = require_text(row, "prompt")
        chosen, rejected = require_text(row, "chosen"), require_text(row, "rejected")
    elif layout == "conversational":
        prompt = require_messages(row, "prompt", completion=False)
        chosen = require_messages(row, "chosen", completion=True)
        rejected = require_messages(row, "rejected", completion=True)
    elif layout == "hh_rlhf":
        chosen, rejected = require_text(row, "chosen"), require_text(row, "rejected")
        _require_different(chosen, rejected)
        prompt, chosen, rejected = split_transcripts(chosen, rejected)
    elif layout == "message_lists":
        chosen = require_messages(row, "chosen", completion=False)
        rejected = require_messages(row, "rejected", completion=False)
        _require_different(chosen, rejected)
        prompt, chosen, rejected = split_conversations(chosen, rejected)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    _require_different(chosen, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _resolve_preference(row: dict[str, Any]) -> dict[str, Any]:
    if not all(c in row for c in PREFERENCE_COLUMNS) or ("chosen" in row and "rejected" in row):
        return row
    a_preferred = require_flag(row, "preference", "1 means response_a is preferred")
    a, b = require_present(row, "response_a"), require_present(row, "response_b")
    return {**row, "chosen": a if a_preferred else b, "rejected": b if a_preferred else a}


def _unpaired(row: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    if chat:
        prompt = require_messages(row, "prompt", completion=False)
        completion = require_messages(row, "completion", completion=True)
    else:
        prompt, completion = require_text(row, "prompt"), require_text(row, "completion")
    return {"prompt": prompt, "completion": completion, "label": require_flag(row, "label", "true means desirable")}


def _demonstration(row: dict[str, Any], *, chat: bool) -> dict[str, Any]:
    if "prompt" not in row and "messages" in row:
        messages = require_messages(row, "messages", completion=False)
        if messages[-1]["role"] != "assistant":
            raise RowProblem(MALFORMED_MESSAGES, "messages does not end with an assistant turn")
        if len(messages) < 2:
            raise RowProblem(EMPTY_TEXT, "messages holds only the assistant turn, no prompt")
        if not messages[-1]["content"].strip():
            raise RowProblem(EMPTY_TEXT, "the final assistant turn of messages is empty")
        return {"prompt": messages[:-1], "completion": messages[-1:], "label": True}
    if chat:
        prompt = require_messages(row, "prompt", completion=False)
        completion = require_messages(row, "completion", completion=True)
    else:
        prompt, completion = require_text(row, "prompt"), require_text(row, "completion")
    return {"prompt": prompt, "completion": completion, "label": True}


def _squeezed(value: Any) -> Any:
    """Text with every run of whitespace made one space and the ends stripped; messages likewise."""
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, list):
        return [_squeezed(item) for item in value]
    if isinstance(value, dict):
        return {key: _squeezed(item) for key, item in value.items()}
    return value


def _require_different(chosen: Any, rejected: Any) -> None:
    # Equal sides give a zero DPO gradient; sides that differ only in whitespace teach only whitespace.
    if chosen == rejected:
        raise RowProblem(IDENTICAL, "chosen and rejected are the same, so the pair carries no preference")
    if _squeezed(chosen) == _squeezed(rejected):
        raise RowProblem(IDENTICAL, "chosen and rejected differ only in whitespace, so the pair carries no "
                                    "preference")


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two hh-rlhf transcripts into the shared prompt and the two final assistant turns.

    The prompt ends with the last ``\\n\\nAssistant:`` inside the shared prefix, so it never ends in the
    middle of a word or of a completion prefix both sides happen to share.

    Returns:
        ``(prompt, chosen_completion, rejected_completion)``.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise RowProblem(MISMATCHED_PROMPTS, "chosen and rejected share no '\\n\\nAssistant:' turn")
    end = cut + len(ASSISTANT)
    prompt, chosen_turn, rejected_turn = chosen[:end], chosen[end:], rejected[end:]
    for side, turn in (("chosen", chosen_turn), ("rejected", rejected_turn)):
        if HUMAN in turn or ASSISTANT in turn:
            raise RowProblem(
                MISMATCHED_PROMPTS,
                f"the transcripts differ before their last assistant turn ({side} has further turns after "
                "the last shared '\\n\\nAssistant:')",
            )
        if not turn.strip():
            raise RowProblem(EMPTY_TEXT, f"the final assistant turn of {side} is empty")
    return prompt, chosen_turn, rejected_turn


def split_conversations(
    chosen: list[dict[str, str]], rejected: list[dict[str, str]]
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]]]:
    """Split two whole conversations into the shared prompt messages and the two final assistant turns."""
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise RowProblem(MALFORMED_MESSAGES, f"{side} does not end with an assistant turn")
        if len(messages) < 2:
            raise RowProblem(EMPTY_TEXT, f"{side} holds only the assistant turn, no prompt")
        if not messages[-1]["content"].strip():
            raise RowProblem(EMPTY_TEXT, f"the final assistant turn of {side} is empty")
    if chosen[:-1] != rejected[:-1]:
        first = next(
            (i for i, (c, r) in enumerate(zip(chosen[:-1], rejected[:-1])) if c != r), min(len(chosen), len(rejected)) - 1
        )
        raise RowProblem(
            MISMATCHED_PROMPTS, f"the messages before the final assistant turn differ (first at message {first})"
        )
    return chosen[:-1], chosen[-1:], rejected[-1:]
