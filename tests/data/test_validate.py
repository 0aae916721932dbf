"""Bad rows: each reported with file, line and reason; skip drops exactly them; nothing silently."""

from __future__ import annotations

import json

import pytest

from dpo.data import DataError, prepare_data
from dpo.data.validate import (
    MALFORMED_MESSAGES,
    NOT_TEXT,
    NULL_FIELD,
    UNKNOWN_ROLE,
    RowProblem,
    require_flag,
    require_messages,
    require_number,
)
from tests.data_helpers import FIXTURES, build_word_tokenizer, data_config, tokens

# tests/fixtures/bad_rows.jsonl, one defect per line (line 6 only has an extra column, which is valid).
EXPECTED = {
    1: "line 1: chosen identical to rejected",
    2: "line 2: empty text: 'chosen' is empty",
    3: "line 3: missing field: no 'rejected' field",
    4: "line 4: null field: 'prompt' is null",
    5: "line 5: non-string text: 'chosen' is int 4",
    7: "line 7: empty text: 'prompt' is empty",
    8: "line 8: unparsable line: not valid JSON",
}


def run(path, tmp_path, **fields):
    logged: list[str] = []
    tokenizer = build_word_tokenizer()
    config = data_config(path, tmp_path / "cache", eval_fraction=0.0, **fields)
    return prepare_data(config, tokenizer, unpaired=False, seed=0, log=logged.append), tokenizer, logged


def test_every_bad_row_is_reported_with_its_line_number(tmp_path):
    with pytest.raises(DataError) as error:
        run(FIXTURES / "bad_rows.jsonl", tmp_path)
    message = str(error.value)
    assert "7 bad row(s)" in message
    for expected in EXPECTED.values():
        assert f"bad_rows.jsonl, {expected}" in message
    assert "line 6" not in message
    assert "data.on_bad_row: skip" in message


def test_skip_drops_exactly_the_bad_rows_and_counts_them_per_reason(tmp_path):
    prepared, tokenizer, logged = run(FIXTURES / "bad_rows.jsonl", tmp_path, on_bad_row="skip")
    # Only line 6 survives: {"prompt": "What is 2 + 2?", "chosen": " 4.", "rejected": " 5.", "extra": ...}.
    assert len(prepared.train) == 1 and len(prepared.eval) == 0
    row = prepared.train[0]
    assert tokens(tokenizer, row["prompt_ids"]) == ["<bos>", "What", "is", "2", "+", "2", "?"]
    assert tokens(tokenizer, row["chosen_ids"]) == ["4", ".", "<eos>"]
    assert prepared.stats.bad_rows == {
        "chosen identical to rejected": 1,
        "empty text": 2,
        "missing field": 1,
        "null field": 1,
        "non-string text": 1,
        "unparsable line": 1,
    }
    summary = "\n".join(logged)
    assert "skipped 7 bad row(s)" in summary
    for expected in EXPECTED.values():
        assert expected in summary
    assert "bad rows skipped:   7" in prepared.stats.format()


def test_rows_kept_plus_rows_skipped_is_every_line(tmp_path):
    good = [json.loads(line) for line in (FIXTURES / "explicit_prompt.jsonl").read_text().splitlines()]
    lines = [json.dumps(r) for r in good[:10]]
    lines[3] = lines[3].replace('"chosen"', '"chosn"')  # line 4: missing chosen
    lines[8] = json.dumps({**good[8], "rejected": good[8]["chosen"]})  # line 9: identical
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepared, _, _ = run(path, tmp_path, on_bad_row="skip")
    assert len(prepared.train) + len(prepared.eval) + sum(prepared.stats.bad_rows.values()) == 10
    assert prepared.stats.bad_rows == {"missing field": 1, "chosen identical to rejected": 1}


def test_non_utf8_input_is_an_error_with_the_line_number_even_when_skipping(tmp_path):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps({"prompt": "a", "chosen": " b", "rejected": " c"}).encode()] * 2
    lines.append('{"prompt": "caf\xe9", "chosen": " b", "rejected": " c"}'.encode("latin-1"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl, line 3: not UTF-8 text \(byte 0xe9"):
        run(path, tmp_path, on_bad_row="skip")


def test_message_rows_with_unknown_roles_and_mismatched_prompts_are_reported(tmp_path):
    user = {"role": "user", "content": "Hi"}
    rows = [
        {"chosen": [user, {"role": "assistant", "content": "Hello"}], "rejected": [user, {"role": "assistant", "content": "Go"}]},
        {"chosen": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "B"}]},
        {"chosen": [user, {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "B"}]},
        {"chosen": [user, {"role": "assistant", "content": "A"}], "rejected": [user, {"role": "user", "content": "B"}]},
    ]
    path = tmp_path / "messages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError) as error:
        run(path, tmp_path)
    message = str(error.value)
    assert "line 2: unknown role: chosen[0] has role 'human'" in message
    assert "line 3: mismatched prompts" in message
    assert "line 4: malformed messages: rejected does not end with an assistant turn" in message
    assert "line 1" not in message


def test_message_checks():
    with pytest.raises(RowProblem) as problem:
        require_messages({"prompt": [{"role": "user", "content": ["a", "b"]}]}, "prompt", completion=False)
    assert problem.value.reason == NOT_TEXT
    with pytest.raises(RowProblem) as problem:
        require_messages({"prompt": [{"role": "user", "content": None}]}, "prompt", completion=False)
    assert problem.value.reason == NULL_FIELD
    with pytest.raises(RowProblem) as problem:
        require_messages({"chosen": [{"role": "user", "content": "x"}]}, "chosen", completion=True)
    assert problem.value.reason == MALFORMED_MESSAGES
    with pytest.raises(RowProblem) as problem:
        require_messages({"prompt": [{"role": "tool", "content": "x"}]}, "prompt", completion=False)
    assert problem.value.reason == UNKNOWN_ROLE
    assert require_messages(
        {"prompt": [{"role": "user", "content": "x", "name": "n"}]}, "prompt", completion=False
    ) == [{"role": "user", "content": "x"}]


def test_labels_accept_booleans_and_0_1_also_written_as_text():
    assert require_flag({"label": True}, "label", "") is True
    assert require_flag({"label": 0}, "label", "") is False
    # CSV cells are read as text.
    assert [require_flag({"label": v}, "label", "") for v in ("true", " False", "1", "0")] == [True, False, True, False]
    for value in (2, "yes", 0.5, "", "2"):
        with pytest.raises(RowProblem):
            require_flag({"label": value}, "label", "")


def test_numbers_may_be_written_as_text_but_must_be_finite():
    assert require_number({"m": "1.5"}, "m") == 1.5 and require_number({"m": 2}, "m") == 2.0
    for value in ("x", "nan", "inf", True, None, ""):
        with pytest.raises(RowProblem):
            require_number({"m": value}, "m")
