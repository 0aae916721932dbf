"""Tokenization: BOS/EOS exactly once, truncation arithmetic, and chat templates that break the boundary."""

from __future__ import annotations

import json

import pytest

from dpo.data import DataError, prepare_data
from dpo.data.tokenize import (
    RowTokenizer,
    char_budget,
    cut_prompt,
    cut_text,
    special_tokens,
    truncate,
    with_single_bos,
    with_single_eos,
)
from tests.data_helpers import CHAT_TEMPLATE, FIXTURES, build_word_tokenizer, data_config, tokens

BOS, EOS = 1, 2


def never_blank(ids):
    return False


def blank_if_99(ids):
    return all(i == 99 for i in ids)


def test_bos_exactly_once():
    assert with_single_bos([5, 6], BOS) == [1, 5, 6]
    assert with_single_bos([1, 5, 6], BOS) == [1, 5, 6]
    assert with_single_bos([1, 1, 5], BOS) == [1, 5]
    assert with_single_bos([5, 6], None) == [5, 6]


def test_eos_exactly_once():
    assert with_single_eos([5, 6], EOS, never_blank) == [5, 6, 2]
    assert with_single_eos([5, 6, 2], EOS, blank_if_99) == [5, 6, 2]
    assert with_single_eos([5, 2, 2, 2], EOS, blank_if_99) == [5, 2]
    # A template closing the turn with EOS and a newline (99 plays the newline): kept as it is.
    assert with_single_eos([5, 2, 99], EOS, blank_if_99) == [5, 2, 99]
    # An EOS inside the text is not an ending.
    assert with_single_eos([5, 2, 6], EOS, blank_if_99) == [5, 2, 6, 2]


def test_cut_prompt_keep_end_keeps_bos_and_the_last_tokens():
    prompt = [1, 10, 11, 12, 13, 14]
    # 4 tokens: BOS + the last 3 of the 5 after it.
    assert cut_prompt(prompt, 4, "keep_end", BOS) == [1, 12, 13, 14]
    assert cut_prompt(prompt, 4, "keep_start", BOS) == [1, 10, 11, 12]
    assert cut_prompt([10, 11, 12, 13], 2, "keep_end", None) == [12, 13]
    assert cut_prompt(prompt, 6, "keep_end", BOS) == prompt


def test_truncate_cuts_the_prompt_first_then_completions_at_the_end():
    prompt = [1, 10, 11, 12, 13, 14]  # 6 tokens
    chosen, rejected = [20, 21, 2], [30, 31, 32, 33, 34, 2]  # 3 and 6 tokens
    # max_length 10: 6 + 6 > 10, so the prompt is cut to max_prompt_length 4 (BOS + 12, 13, 14);
    # room 10 - 4 = 6: chosen (3) fits whole, rejected (6) fits whole.
    p, (c, r), truncated = truncate(prompt, [chosen, rejected], max_length=10, max_prompt_length=4, truncation="keep_end", bos_id=BOS)
    assert (p, c, r, truncated) == ([1, 12, 13, 14], chosen, rejected, True)
    # max_length 8: prompt cut to 4, room 4: rejected loses its last 2 tokens (EOS included).
    p, (c, r), truncated = truncate(prompt, [chosen, rejected], max_length=8, max_prompt_length=4, truncation="keep_start", bos_id=BOS)
    assert (p, c, r, truncated) == ([1, 10, 11, 12], chosen, [30, 31, 32, 33], True)


def test_truncate_leaves_fitting_rows_alone_and_cuts_one_shared_prompt_for_both_sides():
    prompt = [1, 10, 11]
    p, sides, truncated = truncate(prompt, [[20, 2], [30, 2]], max_length=5, max_prompt_length=2, truncation="keep_end", bos_id=BOS)
    assert (p, sides, truncated) == (prompt, [[20, 2], [30, 2]], False)
    # Only rejected (4 tokens) overflows 3 + 4 > 6; the one prompt both sides share is cut to 2.
    p, sides, truncated = truncate(prompt, [[20, 2], [30, 31, 32, 2]], max_length=6, max_prompt_length=2, truncation="keep_end", bos_id=BOS)
    assert (p, sides, truncated) == ([1, 11], [[20, 2], [30, 31, 32, 2]], True)


def test_truncate_can_leave_a_completion_empty_when_the_prompt_fills_max_length():
    # max_prompt_length >= max_length (the recipe refuses this, the function must still be honest):
    # the prompt of 5 is not longer than max_prompt_length 5, room = 5 - 5 = 0.
    p, sides, truncated = truncate([1, 10, 11, 12, 13], [[20, 2]], max_length=5, max_prompt_length=5, truncation="keep_end", bos_id=BOS)
    assert (p, sides, truncated) == ([1, 10, 11, 12, 13], [[]], True)


def test_special_tokens_only_uses_a_bos_the_tokenizer_adds():
    assert special_tokens(build_word_tokenizer(adds_bos=True)).bos_id == 1
    assert special_tokens(build_word_tokenizer(adds_bos=False)).bos_id is None
    assert special_tokens(build_word_tokenizer()).eos_id == 2


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_plain_text_without_a_bos_tokenizer_and_literal_special_tokens_get_each_once(tmp_path):
    rows = [
        {"prompt": "<bos> Which city is the capital of France?", "chosen": " Paris.<eos>", "rejected": " Geneva."},
    ]
    path = write_rows(tmp_path / "d.jsonl", rows)
    tokenizer = build_word_tokenizer()
    prepared = prepare_data(data_config(path, tmp_path / "c", eval_fraction=0.0), tokenizer, unpaired=False, seed=0, log=lambda _: None)
    row = prepared.train[0]
    assert tokens(tokenizer, row["prompt_ids"]) == ["<bos>", "Which", "city", "is", "the", "capital", "of", "France", "?"]
    assert tokens(tokenizer, row["chosen_ids"]) == ["Paris", ".", "<eos>"]
    assert tokens(tokenizer, row["rejected_ids"]) == ["Geneva", ".", "<eos>"]

    no_bos = build_word_tokenizer(adds_bos=False)
    rows[0]["prompt"] = "Which city is the capital of France?"
    write_rows(path, rows)
    prepared = prepare_data(data_config(path, tmp_path / "c", eval_fraction=0.0), no_bos, unpaired=False, seed=0, log=lambda _: None)
    assert tokens(no_bos, prepared.train[0]["prompt_ids"])[0] == "Which"


def test_truncation_end_to_end_counts_and_cuts(tmp_path):
    rows = [
        # prompt 1 + 9 = 10 tokens, chosen 3, rejected 3: 13 > 8 -> prompt cut to 4, completions fit.
        {"prompt": "alpha beta gamma delta alpha beta gamma delta alpha", "chosen": " Paris.", "rejected": " Rome."},
        # prompt 3 tokens, completions 3: fits max_length 8.
        {"prompt": "alpha beta", "chosen": " Paris.", "rejected": " Rome."},
    ]
    path = write_rows(tmp_path / "d.jsonl", rows)
    tokenizer = build_word_tokenizer()
    for truncation, kept in (("keep_end", ["<bos>", "gamma", "delta", "alpha"]), ("keep_start", ["<bos>", "alpha", "beta", "gamma"])):
        config = data_config(path, tmp_path / "c", eval_fraction=0.0, max_length=8, max_prompt_length=4, truncation=truncation)
        prepared = prepare_data(config, tokenizer, unpaired=False, seed=0, log=lambda _: None)
        assert tokens(tokenizer, prepared.train[0]["prompt_ids"]) == kept
        assert tokens(tokenizer, prepared.train[0]["chosen_ids"]) == ["Paris", ".", "<eos>"]
        assert tokens(tokenizer, prepared.train[1]["prompt_ids"]) == ["<bos>", "alpha", "beta"]
        assert prepared.stats.truncated == 1
        assert prepared.stats.dropped == 0
        # Lengths are reported before truncation: prompts 10 and 3.
        assert prepared.stats.prompt_lengths.max == 10


# Injects a date line into the system turn only when the generation prompt is asked for.
INJECTING_TEMPLATE = (
    "{{ bos_token }}{% if add_generation_prompt %}<|system|> today <|end|> {% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_template_that_changes_the_prompt_when_a_completion_follows_is_refused(tmp_path):
    path = FIXTURES / "conversational.jsonl"
    config = data_config(path, tmp_path, eval_fraction=0.0, chat_template=INJECTING_TEMPLATE)
    with pytest.raises(DataError) as error:
        prepare_data(config, build_word_tokenizer(), unpaired=False, seed=0, log=lambda _: None)
    message = str(error.value)
    assert "conversational.jsonl, line 1" in message
    assert "data.chat_template (inline)" in message
    assert "breaks the prompt/completion boundary" in message


def test_a_boundary_that_only_breaks_in_tokens_is_refused_too(tmp_path):
    # Text: "alpha" + "beta" renders "alphabeta", which starts with "alpha"; but "alphabeta" is one
    # (unknown) word, so its tokens do not start with the prompt's token "alpha".
    template_file = tmp_path / "glued.jinja"
    template_file.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    path = write_rows(tmp_path / "d.jsonl", [
        {"prompt": [{"role": "user", "content": "alpha"}], "chosen": [{"role": "assistant", "content": "beta"}],
         "rejected": [{"role": "assistant", "content": " gamma"}]},
    ])
    config = data_config(path, tmp_path / "c", eval_fraction=0.0, chat_template=str(template_file))
    with pytest.raises(DataError) as error:
        prepare_data(config, build_word_tokenizer(), unpaired=False, seed=0, log=lambda _: None)
    message = str(error.value)
    assert "d.jsonl, line 1" in message and "glued.jinja" in message and "token 0" in message


def test_chat_rows_without_any_template_are_an_error(tmp_path):
    config = data_config(FIXTURES / "conversational.jsonl", tmp_path, eval_fraction=0.0)
    with pytest.raises(DataError, match="no chat template"):
        prepare_data(config, build_word_tokenizer(chat_template=None), unpaired=False, seed=0, log=lambda _: None)


def test_a_chat_template_setting_that_is_neither_template_nor_file_is_an_error(tmp_path):
    config = data_config(FIXTURES / "conversational.jsonl", tmp_path, chat_template="templates/missing.jinja")
    with pytest.raises(DataError, match="neither a Jinja template"):
        prepare_data(config, build_word_tokenizer(), unpaired=False, seed=0, log=lambda _: None)


def test_a_template_ending_turns_with_eos_gets_no_second_eos(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %} <|end|>{% endif %} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    config = data_config(FIXTURES / "conversational.jsonl", tmp_path, eval_fraction=0.0, chat_template=template)
    tokenizer = build_word_tokenizer()
    prepared = prepare_data(config, tokenizer, unpaired=False, seed=0, log=lambda _: None)
    # Line 2: "Name the capital city of Italy." -> "The capital of Italy is Rome."
    assert tokens(tokenizer, prepared.train[1]["chosen_ids"]) == ["The", "capital", "of", "Italy", "is", "Rome", ".", "<eos>"]


def test_the_character_budget_always_holds_more_tokens_than_max_length():
    tokenizer = build_word_tokenizer()
    longest = max(len(t) for t in tokenizer.get_vocab() if t not in tokenizer.all_special_tokens)
    assert char_budget(tokenizer, 10) == 2 * 10 * longest
    text = " ".join(["alpha", "gamma", "delta"] * 200)
    cut, was_cut = cut_text(text, char_budget(tokenizer, 10), keep_end=False)
    assert was_cut and len(tokenizer(cut, add_special_tokens=False)["input_ids"]) > 10
    assert cut_text("short", 100, keep_end=True) == ("short", False)
    assert cut_text("abcdef", 3, keep_end=True) == ("def", True)


def test_long_chat_messages_are_cut_before_rendering_and_count_as_truncated():
    tokenizer = build_word_tokenizer()
    row_tokenizer = RowTokenizer(tokenizer, sides=("chosen", "rejected"), chat_template=CHAT_TEMPLATE,
                                 template_label="test", max_length=12, max_prompt_length=6, truncation="keep_end",
                                 source="d.jsonl", unit="line")
    budget = row_tokenizer.char_budget
    long = "alpha " * budget
    batch = {"number": [1, 2],
             "prompt": [[{"role": "user", "content": long + "beta"}], [{"role": "user", "content": "gamma"}]],
             "chosen": [[{"role": "assistant", "content": "delta"}]] * 2,
             "rejected": [[{"role": "assistant", "content": "beta"}]] * 2}
    cut, flags = row_tokenizer._cut_long_texts(batch, chat=True)
    assert flags == [True, False] and len(cut["prompt"][0][0]["content"]) == budget
    assert cut["prompt"][0][0]["content"].endswith("beta")  # keep_end keeps the end of the prompt
    out = row_tokenizer(batch)
    assert out["truncated"] == [True, False]
