"""Bad rows: every defect becomes a :class:`BadRow` that names the file, the row and the reason.

Rows are validated before anything is tokenized. With ``data.on_bad_row: error`` (the default) all bad
rows are listed in one :class:`DataError`; with ``skip`` exactly those rows are dropped and a count per
reason is printed. Nothing is dropped without being counted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Reasons are short fixed phrases so that the skip summary can count rows per reason.
UNPARSABLE = "unparsable line"
NOT_AN_OBJECT = "row is not an object"
MISSING_FIELD = "missing field"
NULL_FIELD = "null field"
NOT_TEXT = "non-string text"
EMPTY_TEXT = "empty text"
IDENTICAL = "chosen identical to rejected"
MISMATCHED_PROMPTS = "mismatched prompts"
UNKNOWN_ROLE = "unknown role"
MALFORMED_MESSAGES = "malformed messages"
BAD_LABEL = "bad label"
NOT_A_NUMBER = "non-numeric value"

ROLES = ("system", "user", "assistant")
MAX_LISTED = 50


class DataError(ValueError):
    """Data that cannot be used; the message names the file, the row and what to do."""


class RowProblem(Exception):
    """Raised while normalising one row; the caller turns it into a :class:`BadRow`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class BadRow:
    """One rejected row.

    Attributes:
        source: the data file or dataset as the recipe names it.
        unit: what ``number`` counts: ``line`` (JSON lines), ``item`` (a JSON array) or ``row``.
        number: 1-based position of the row in ``source``.
        reason: one of the fixed reasons of this module.
        detail: what exactly is wrong.
    """

    source: str
    unit: str
    number: int
    reason: str
    detail: str

    def describe(self) -> str:
        return f"{self.source}, {self.unit} {self.number}: {self.reason}: {self.detail}"


def require_present(row: dict[str, Any], field: str) -> Any:
    """The value of ``field``; a missing key or a null value is a :class:`RowProblem`."""
    if field not in row:
        raise RowProblem(MISSING_FIELD, f"no '{field}' field")
    value = row[field]
    if value is None:
        raise RowProblem(NULL_FIELD, f"'{field}' is null")
    return value


def require_text(row: dict[str, Any], field: str) -> str:
    """A non-empty string field (whitespace alone counts as empty)."""
    value = require_present(row, field)
    if not isinstance(value, str):
        raise RowProblem(NOT_TEXT, f"'{field}' is {type(value).__name__} {_short(value)}, expected a string")
    if not value.strip():
        raise RowProblem(EMPTY_TEXT, f"'{field}' is empty")
    return value


def require_messages(row: dict[str, Any], field: str, *, completion: bool) -> list[dict[str, str]]:
    """A non-empty list of ``{"role", "content"}`` messages, reduced to those two keys.

    Args:
        row: the raw row.
        field: the field holding the messages.
        completion: the messages are a completion, so every one must be an assistant turn with content.
    """
    value = require_present(row, field)
    if isinstance(value, str):
        raise RowProblem(MALFORMED_MESSAGES, f"'{field}' is a string; this layout needs a list of messages")
    if not isinstance(value, list) or not value:
        raise RowProblem(MALFORMED_MESSAGES, f"'{field}' must be a non-empty list of messages, got {_short(value)}")
    return [_message(item, f"{field}[{i}]", completion=completion) for i, item in enumerate(value)]


def _message(item: Any, where: str, *, completion: bool) -> dict[str, str]:
    if not isinstance(item, dict) or "role" not in item or "content" not in item:
        raise RowProblem(MALFORMED_MESSAGES, f"{where} is {_short(item)}; a message is {{role, content}}")
    role, content = item["role"], item["content"]
    if role not in ROLES:
        raise RowProblem(UNKNOWN_ROLE, f"{where} has role {role!r}; roles are {', '.join(ROLES)}")
    if completion and role != "assistant":
        raise RowProblem(MALFORMED_MESSAGES, f"{where} has role {role!r}; a completion holds assistant turns only")
    if content is None:
        raise RowProblem(NULL_FIELD, f"{where}.content is null")
    if not isinstance(content, str):
        raise RowProblem(NOT_TEXT, f"{where}.content is {type(content).__name__}, expected a string")
    if completion and not content.strip():
        raise RowProblem(EMPTY_TEXT, f"{where}.content is empty")
    return {"role": role, "content": content}


_FLAG_WORDS = {"true": True, "false": False, "1": True, "0": False}


def require_flag(row: dict[str, Any], field: str, meaning: str) -> bool:
    """A boolean field; the integers 0 and 1, and the words true/false/1/0 (CSV cells are text), are accepted."""
    value = require_present(row, field)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _FLAG_WORDS:
        return _FLAG_WORDS[value.strip().lower()]
    raise RowProblem(BAD_LABEL, f"'{field}' is {_short(value)}; expected true/false or 1/0 ({meaning})")


def require_number(row: dict[str, Any], field: str) -> float:
    """A finite number, or a string holding one (CSV cells are text); booleans are refused: a flag is not a
    magnitude."""
    value = require_present(row, field)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowProblem(NOT_A_NUMBER, f"'{field}' is {_short(value)}, expected a finite number")
    return float(value)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def handle_bad_rows(bad: list[BadRow], on_bad_row: str, log: Callable[[str], None]) -> None:
    """Raise on bad rows, or print how many are skipped per reason.

    Args:
        bad: every bad row of one data source.
        on_bad_row: ``error`` or ``skip`` (the recipe's ``data.on_bad_row``).
        log: where the skip summary is printed.
    """
    if not bad:
        return
    listed = [f"  {b.describe()}" for b in bad[:MAX_LISTED]]
    if len(bad) > MAX_LISTED:
        listed.append(f"  ... and {len(bad) - MAX_LISTED} more")
    if on_bad_row == "error":
        raise DataError(
            f"{len(bad)} bad row(s) in {bad[0].source}:\n" + "\n".join(listed)
            + "\nFix these rows, or set data.on_bad_row: skip to drop exactly these rows."
        )
    counts = Counter(b.reason for b in bad)
    summary = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
    log(f"skipped {len(bad)} bad row(s) in {bad[0].source} ({summary}):\n" + "\n".join(listed))
