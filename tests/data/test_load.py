"""Reading rows from every supported source: JSON lines, JSON arrays, Parquet, CSV, save_to_disk folders."""

from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo.data import DataError
from dpo.data.load import load_rows
from tests.data_helpers import FIXTURES

ROWS = [
    {"prompt": "Which city is the capital of France?", "chosen": " Paris.", "rejected": " Geneva."},
    {"prompt": "Name the capital city of Italy.", "chosen": " Rome.", "rejected": " Sydney."},
]


def load(spec, split="train"):
    return load_rows(str(spec), split=split, key="data.train")


def test_json_lines_number_rows_by_line_and_skip_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\ufeff" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n[1, 2]\n", encoding="utf-8")
    raw = load(path)
    assert raw.unit == "line"
    assert raw.rows == [(1, ROWS[0]), (3, ROWS[1])]
    assert [(b.number, b.reason) for b in raw.bad] == [(4, "row is not an object")]


def test_a_json_array_numbers_rows_by_item_and_a_broken_one_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=1), encoding="utf-8")
    raw = load(path)
    assert (raw.unit, raw.rows) == ("item", [(1, ROWS[0]), (2, ROWS[1])])
    path.write_text('[\n{"prompt": "a"},\n{"prompt": \n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json, line 4: not valid JSON"):
        load(path)


def test_a_json_file_holding_json_lines_is_read_as_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    assert load(path).rows == [(1, ROWS[0]), (2, ROWS[1])]


def test_parquet_and_csv(tmp_path):
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    assert load(tmp_path / "d.parquet").rows == [(1, ROWS[0]), (2, ROWS[1])]
    (tmp_path / "d.csv").write_text('prompt,chosen,rejected\n"Which city, then?", Paris., Geneva.\n', encoding="utf-8")
    raw = load(tmp_path / "d.csv")
    assert raw.rows == [(1, {"prompt": "Which city, then?", "chosen": " Paris.", "rejected": " Geneva."})]


def test_csv_cells_stay_text_even_when_they_look_like_numbers(tmp_path):
    (tmp_path / "d.csv").write_text('prompt,chosen,rejected\n1 + 1 =, 2,02\n', encoding="utf-8")
    assert load(tmp_path / "d.csv").rows == [(1, {"prompt": "1 + 1 =", "chosen": " 2", "rejected": "02"})]


@pytest.mark.parametrize("name, content", [("d.csv", "prompt,chosen,rejected\n"), ("d.csv", ""), ("d.json", "[]"),
                                           ("d.jsonl", "\n\n")])
def test_a_source_without_rows_says_it_is_empty(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=rf"data.train: .*{name} is empty: it holds no rows"):
        load(tmp_path / name)


def test_a_jsonl_file_holding_an_array_or_no_object_line_says_it_is_not_json_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    with pytest.raises(DataError, match="is not JSON Lines .*line 1 opens a JSON array"):
        load(path)
    path.write_text("prompt: a\n[1]\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"is not JSON Lines .*no line holds a row; line 1: not valid JSON"):
        load(path)


def test_save_to_disk_folders_with_and_without_splits(tmp_path):
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert load(tmp_path / "one").rows == [(1, ROWS[0]), (2, ROWS[1])]
    both = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])})
    both.save_to_disk(str(tmp_path / "dict"))
    assert load(tmp_path / "dict", split="test").rows == [(1, ROWS[0])]
    with pytest.raises(DataError, match="no split 'validation'; its splits are train, test"):
        load(tmp_path / "dict", split="validation")


def test_missing_or_unusable_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="data.train: .*missing.jsonl: no such file"):
        load(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load(tmp_path / "d.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a dataset written by save_to_disk"):
        load(tmp_path / "folder")


def test_head_keeps_the_first_rows_of_the_file_counting_unreadable_lines():
    raw = load(FIXTURES / "bad_rows.jsonl")
    head = raw.head(3)
    assert [n for n, _ in head.rows] == [1, 2, 3]
    all_lines = raw.head(100)
    assert [n for n, _ in all_lines.rows] == [1, 2, 3, 4, 5, 6, 7] and [b.number for b in all_lines.bad] == [8]
