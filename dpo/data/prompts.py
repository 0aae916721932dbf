"""Prompts alone, from any supported layout (the prompts of its rows) or from rows holding only ``prompt``.

What sampling needs: the comparison's prompts and an online task's rollout and held-out prompts. Each
prompt is text or a list of messages, as the data holds it; duplicates are dropped, keeping file order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from dpo.data.layouts import rename_columns
from dpo.data.load import load_rows
from dpo.data.prepare import read_canonical
from dpo.data.validate import BadRow, DataError, RowProblem, handle_bad_rows, require_messages, require_text

# Columns that make a row more than a prompt: such rows are read through their layout.
COMPLETION_COLUMNS = {"chosen", "rejected", "completion", "response_a", "response_b", "messages"}


def read_prompts(data_cfg: Any, path: str, key: str, log: Callable[[str], None],
                 max_prompts: int | None = None) -> list[Any]:
    """Unique prompts (text or messages) of ``path``, in file order.

    Args:
        data_cfg: a data section (:class:`dpo.recipe.DataConfig`): split, layout, columns, ``on_bad_row``
            and ``max_rows`` are used.
        path: the file, folder or hub id to read.
        key: how messages name the source (``data.train``, ``prompts.path``).
        log: where summaries go.
        max_prompts: keep at most this many (the first ones).

    Raises:
        DataError: a bad row (under ``on_bad_row: error``), or no prompt at all.
    """
    raw = load_rows(path, split=data_cfg.split, key=key)
    names = {name for _, row in raw.rows for name in rename_columns(row, data_cfg.columns)}
    if "prompt" in names and not names & COMPLETION_COLUMNS:
        rows = raw.head(data_cfg.max_rows) if data_cfg.max_rows is not None else raw
        prompts, bad = [], list(rows.bad)
        for number, row in rows.rows:
            row = rename_columns(row, data_cfg.columns)
            try:
                value = row.get("prompt")
                prompts.append(require_messages(row, "prompt", completion=False) if isinstance(value, list)
                               else require_text(row, "prompt"))
            except RowProblem as problem:
                bad.append(BadRow(raw.source, raw.unit, number, problem.reason, problem.detail))
        handle_bad_rows(sorted(bad, key=lambda b: b.number), data_cfg.on_bad_row, log)
    else:
        prompts = [row["prompt"] for row in read_canonical(data_cfg, path, key, log).rows]
    first: dict[str, Any] = {}
    for prompt in prompts:
        first.setdefault(json.dumps(prompt, sort_keys=True), prompt)
    unique = list(first.values())
    if max_prompts is not None:
        unique = unique[:max_prompts]
    if not unique:
        raise DataError(f"{key}: {raw.source} holds no usable prompt")
    return unique
