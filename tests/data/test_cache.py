"""The tokenization cache: a hit when nothing changed, a miss when anything that shapes the ids changed."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest

from dpo.data import prepare_data
from dpo.data.cache import CHECKSUMS, DamagedEntry, content_hash, verify_entry
from tests.data_helpers import FIXTURES, build_word_tokenizer, data_config


def run(path, cache, tokenizer=None, **fields):
    logged: list[str] = []
    prepared = prepare_data(
        data_config(path, cache, **fields), tokenizer or build_word_tokenizer(), unpaired=False, seed=0, log=logged.append
    )
    hits = sum("reused from the cache" in line for line in logged)
    misses = sum("tokenizing" in line for line in logged)
    return prepared, hits, misses


def test_second_run_reuses_both_splits_with_identical_content(tmp_path):
    first, hits, misses = run(FIXTURES / "explicit_prompt.jsonl", tmp_path)
    assert (hits, misses) == (0, 2)
    second, hits, misses = run(FIXTURES / "explicit_prompt.jsonl", tmp_path)
    assert (hits, misses) == (2, 0)
    assert second.train_fingerprint == first.train_fingerprint
    assert second.eval_fingerprint == first.eval_fingerprint
    assert second.train[:] == first.train[:]
    assert second.train._fingerprint == first.train_fingerprint
    assert second.stats == first.stats


def test_every_setting_that_shapes_the_ids_is_a_miss(tmp_path):
    data = tmp_path / "d.jsonl"
    shutil.copy(FIXTURES / "conversational.jsonl", data)
    base, _, _ = run(data, tmp_path / "cache")
    changes = {
        "max_length": {"max_length": 20, "max_prompt_length": 10},
        "max_prompt_length": {"max_prompt_length": 100},
        "truncation": {"truncation": "keep_start"},
        "template": {"chat_template": "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                                      "{% if add_generation_prompt %}<|assistant|>{% endif %}"},
    }
    for name, fields in changes.items():
        _, hits, misses = run(data, tmp_path / "cache", **fields)
        assert (name, hits, misses) == (name, 0, 2)
    _, hits, misses = run(data, tmp_path / "cache", tokenizer=build_word_tokenizer(adds_bos=False))
    assert (hits, misses) == (0, 2)
    # Changing the data file changes only the split that holds the changed row.
    lines = data.read_text(encoding="utf-8").splitlines()
    in_train = base.train.num_rows
    row = json.loads(lines[0])
    row["chosen"][0]["content"] = "Paris, of course."
    lines[0] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    changed, hits, misses = run(data, tmp_path / "cache")
    assert (hits, misses) == (1, 1)  # the split is fixed by positions and seed, so only one split changed
    assert changed.train.num_rows == in_train
    assert (changed.train_fingerprint, changed.eval_fingerprint) != (base.train_fingerprint, base.eval_fingerprint)
    # And unchanged settings still hit after all that.
    _, hits, misses = run(data, tmp_path / "cache")
    assert (hits, misses) == (2, 0)


def test_fingerprints_depend_on_token_ids_not_on_file_identity(tmp_path):
    copy = tmp_path / "copy.jsonl"
    shutil.copy(FIXTURES / "explicit_prompt.jsonl", copy)
    original, _, _ = run(FIXTURES / "explicit_prompt.jsonl", tmp_path / "a")
    copied, _, _ = run(copy, tmp_path / "b")
    assert copied.train_fingerprint == original.train_fingerprint
    truncated, _, _ = run(copy, tmp_path / "b", max_length=12, max_prompt_length=6)
    assert truncated.train_fingerprint != original.train_fingerprint


def test_content_hash_sees_row_boundaries_and_ignores_chunking():
    ids = pa.list_(pa.int32())
    a = pa.table({"x": pa.array([[1, 2], [3]], ids)})
    b = pa.table({"x": pa.array([[1], [2, 3]], ids)})
    assert content_hash(a) != content_hash(b)
    chunked = pa.Table.from_batches([a.slice(0, 1).to_batches()[0], a.slice(1, 1).to_batches()[0]])
    assert chunked.column("x").num_chunks == 2
    assert content_hash(chunked) == content_hash(a)
    assert content_hash(pa.table({"y": pa.array([[1, 2], [3]], ids)})) != content_hash(a)


def entries(cache) -> list:
    return sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete a file", "add a file", "drop the checksums"])
def test_an_entry_that_does_not_match_its_checksums_is_named_and_tokenized_again(tmp_path, damage):
    first, _, _ = run(FIXTURES / "explicit_prompt.jsonl", tmp_path)
    entry = entries(tmp_path)[0]
    verify_entry(entry)
    arrays = entry / "arrays.npz"
    if damage == "flip a byte":
        data = bytearray(arrays.read_bytes())
        data[-30] ^= 1
        arrays.write_bytes(bytes(data))
    elif damage == "truncate":
        arrays.write_bytes(arrays.read_bytes()[:-1])
    elif damage == "delete a file":
        arrays.unlink()
    elif damage == "add a file":
        (entry / "dataset" / "extra.arrow").write_bytes(b"")
    else:
        (entry / CHECKSUMS).unlink()
    with pytest.raises(DamagedEntry):
        verify_entry(entry)
    logged: list[str] = []
    again = prepare_data(data_config(FIXTURES / "explicit_prompt.jsonl", tmp_path), build_word_tokenizer(),
                         unpaired=False, seed=0, log=logged.append)
    assert sum(f"{entry} does not match its checksums" in line for line in logged) == 1
    assert again.train[:] == first.train[:] and again.eval[:] == first.eval[:]
    verify_entry(entry)  # replaced by a good one
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder left
    _, hits, misses = run(FIXTURES / "explicit_prompt.jsonl", tmp_path)
    assert (hits, misses) == (2, 0)
