"""Reading raw rows from a data file, a ``save_to_disk`` folder or a hub dataset.

JSON lines are read line by line here rather than by ``datasets``' json loader, because that loader
stops at the first unparsable line without saying which: here every unparsable line becomes a bad row
with its line number, and non-UTF-8 bytes are an error with the line number. A source with no row at all
is an error that says why (empty, or not JSON Lines). Parquet and CSV files are read with pyarrow (the
readers ``datasets`` itself uses); every CSV cell is read as a string, so a completion such as `` 0``
stays text. Folders are read with ``datasets.load_from_disk``; any other name is tried as a hub dataset
id with ``datasets.load_dataset``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo.data.validate import NOT_AN_OBJECT, UNPARSABLE, BadRow, DataError

JSON_SUFFIXES = (".jsonl", ".json")
TABLE_SUFFIXES = (".parquet", ".csv")


@dataclass
class RawRows:
    """Rows as read, before any validation.

    Attributes:
        source: the data as the recipe names it (used in every message).
        unit: what a row number counts: ``line``, ``item`` or ``row``.
        rows: ``(number, row)`` pairs; ``number`` is the 1-based line/item/row.
        bad: rows that could not even be read (unparsable lines, non-objects).
    """

    source: str
    unit: str
    rows: list[tuple[int, dict[str, Any]]]
    bad: list[BadRow] = field(default_factory=list)

    def column_names(self) -> list[str]:
        """Every key seen in any row, in first-seen order."""
        seen: dict[str, None] = {}
        for _, row in self.rows:
            seen.update(dict.fromkeys(row))
        return list(seen)

    def head(self, max_rows: int) -> RawRows:
        """The first ``max_rows`` rows of the source, counting unreadable ones."""
        numbers = sorted([n for n, _ in self.rows] + [b.number for b in self.bad])[:max_rows]
        last = numbers[-1] if numbers else 0
        return RawRows(
            self.source, self.unit, [(n, r) for n, r in self.rows if n <= last], [b for b in self.bad if b.number <= last]
        )


def load_rows(spec: str, *, split: str, key: str) -> RawRows:
    """Read every row of a data source.

    Args:
        spec: a file path (.jsonl, .json, .parquet, .csv), a ``save_to_disk`` folder or a hub dataset id.
        split: the split to take from a dataset dictionary or hub dataset.
        key: the recipe key naming ``spec`` (``data.train``), for messages.

    Returns:
        The rows, and the lines that could not be parsed as bad rows.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl" and _starts_with_bracket(path):
            raise DataError(f"{key}: {spec} is not JSON Lines (one JSON object per line): line 1 opens a JSON array "
                            "('['); a JSON array of rows goes in a .json file, so rename it, or write one object per "
                            "line")
        if suffix == ".jsonl" or (suffix == ".json" and not _starts_with_bracket(path)):
            return _require_rows(_read_json_lines(path, spec), key, lines=True)
        if suffix == ".json":
            return _require_rows(_read_json_array(path, spec), key)
        if suffix in TABLE_SUFFIXES:
            return _require_rows(_read_table(path, spec), key)
        raise DataError(
            f"{key}: {spec}: unsupported file type '{path.suffix}'; use .jsonl, .json, .parquet or .csv, "
            "or a folder written by datasets' save_to_disk"
        )
    if path.is_dir():
        return _read_saved_dataset(path, spec, split=split, key=key)
    if path.suffix.lower() in JSON_SUFFIXES + TABLE_SUFFIXES or spec.startswith((".", "/", "~")):
        raise DataError(f"{key}: {spec}: no such file or folder")
    return _read_hub_dataset(spec, split=split, key=key)


def _require_rows(raw: RawRows, key: str, *, lines: bool = False) -> RawRows:
    """``raw``, if it holds at least one row object; otherwise an error saying why there is none."""
    if raw.rows:
        return raw
    if not raw.bad:
        raise DataError(f"{key}: {raw.source} is empty: it holds no rows")
    if lines:
        first = raw.bad[0]
        raise DataError(f"{key}: {raw.source} is not JSON Lines (one JSON object per line): no line holds a row; "
                        f"{first.unit} {first.number}: {first.detail}")
    return raw  # unreadable items only: listed as bad rows downstream


def _starts_with_bracket(path: Path) -> bool:
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _read_json_lines(path: Path, source: str) -> RawRows:
    raw = RawRows(source, "line", [])
    with path.open("rb") as handle:
        for number, data in enumerate(handle, start=1):
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{source}, line {number}: not UTF-8 text (byte {data[exc.start]:#04x} at column "
                    f"{exc.start + 1}); re-encode the file as UTF-8"
                ) from None
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue  # a blank line holds no row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raw.bad.append(BadRow(source, "line", number, UNPARSABLE, f"not valid JSON ({exc.msg} at column {exc.colno})"))
                continue
            if not isinstance(row, dict):
                raw.bad.append(BadRow(source, "line", number, NOT_AN_OBJECT, f"a JSON {type(row).__name__}, expected an object"))
                continue
            raw.rows.append((number, row))
    return raw


def _read_json_array(path: Path, source: str) -> RawRows:
    text = _decode_utf8(path, source)
    try:
        items = json.loads(text.removeprefix("\ufeff"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{source}, line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(items, list):
        raise DataError(f"{source}: a .json data file is a list of row objects or one JSON object per line")
    raw = RawRows(source, "item", [])
    for number, row in enumerate(items, start=1):
        if isinstance(row, dict):
            raw.rows.append((number, row))
        else:
            raw.bad.append(BadRow(source, "item", number, NOT_AN_OBJECT, f"a JSON {type(row).__name__}, expected an object"))
    return raw


def _decode_utf8(path: Path, source: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            f"{source}, line {line}: not UTF-8 text (byte {data[exc.start]:#04x}); re-encode the file as UTF-8"
        ) from None


def _read_table(path: Path, source: str) -> RawRows:
    import pyarrow
    import pyarrow.csv
    import pyarrow.parquet

    if path.suffix.lower() == ".csv":
        if not _decode_utf8(path, source).strip():  # pyarrow's own error would not say which line
            return RawRows(source, "row", [])
        try:
            # Every cell as a string: type inference would read a completion " 0" as the integer 0.
            names = pyarrow.csv.open_csv(path).schema.names
            options = pyarrow.csv.ConvertOptions(column_types=dict.fromkeys(names, pyarrow.string()))
            table = pyarrow.csv.read_csv(path, convert_options=options)
        except Exception as exc:  # pyarrow raises several error types for malformed CSV
            raise DataError(f"{source}: cannot read as CSV: {exc}") from None
    else:
        try:
            table = pyarrow.parquet.read_table(path)
        except Exception as exc:
            raise DataError(f"{source}: cannot read as Parquet: {exc}") from None
    return RawRows(source, "row", list(enumerate(table.to_pylist(), start=1)))


def _read_saved_dataset(path: Path, source: str, *, split: str, key: str) -> RawRows:
    import datasets

    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise DataError(
            f"{key}: {source} is a folder but not a dataset written by save_to_disk (no state.json or "
            "dataset_dict.json); name a data file or such a folder"
        )
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{key}: {source} has no split '{split}'; its splits are {', '.join(loaded)} (set data.split)")
        loaded = loaded[split]
    return RawRows(source, "row", list(enumerate(loaded.to_list(), start=1)))


def _read_hub_dataset(spec: str, *, split: str, key: str) -> RawRows:
    import datasets

    try:
        loaded = datasets.load_dataset(spec, split=split)
    except Exception as exc:  # offline, unknown id, missing split: all end the same way for the user
        raise DataError(
            f"{key}: '{spec}' is not a local file or folder, and loading it as a hub dataset failed: {exc}"
        ) from None
    return RawRows(spec, "row", list(enumerate(loaded.to_list(), start=1)))
