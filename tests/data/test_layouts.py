"""Every layout, from its fixture to token ids, with the prompt/completion boundary read by hand."""

from __future__ import annotations

import json

import pytest

from dpo.data import DataError, prepare_data
from dpo.data.layouts import CANONICAL_COLUMNS, detect_layout, split_conversations, split_transcripts
from dpo.data.validate import EMPTY_TEXT, MISMATCHED_PROMPTS, RowProblem
from dpo.recipe import DATA_COLUMNS, DataConfig
from tests.data_helpers import FIXTURES, build_word_tokenizer, data_config, tokens


def prepare(path, tmp_path, **fields):
    """Prepare ``path`` without an eval split, so train row i is the file's i-th valid row."""
    tokenizer = build_word_tokenizer()
    logged: list[str] = []
    fields.setdefault("eval_fraction", 0.0)
    prepared = prepare_data(data_config(path, tmp_path, **fields), tokenizer, unpaired=False, seed=0, log=logged.append)
    return prepared, tokenizer, logged


def row_tokens(prepared, tokenizer, i):
    row = prepared.train[i]
    return (tokens(tokenizer, row["prompt_ids"]), tokens(tokenizer, row["chosen_ids"]), tokens(tokenizer, row["rejected_ids"]))


def test_explicit_layout_line_1(tmp_path):
    prepared, tokenizer, logged = prepare(FIXTURES / "explicit_prompt.jsonl", tmp_path)
    assert prepared.layout == "explicit"
    assert any("layout explicit (detected" in line for line in logged)
    assert len(prepared.train) == 27
    prompt, chosen, rejected = row_tokens(prepared, tokenizer, 0)
    # {"prompt": "Which city is the capital of France?", "chosen": " The capital of France is Paris.", ...}
    assert prompt == ["<bos>", "Which", "city", "is", "the", "capital", "of", "France", "?"]
    assert chosen == ["The", "capital", "of", "France", "is", "Paris", ".", "<eos>"]
    assert rejected == ["The", "capital", "of", "France", "is", "Geneva", ".", "<eos>"]
    assert prepared.train["index"][:] == list(range(27))


def test_conversational_layout_with_system_turn_uses_the_chat_template(tmp_path):
    prepared, tokenizer, _ = prepare(FIXTURES / "conversational.jsonl", tmp_path)
    assert prepared.layout == "conversational"
    prompt, chosen, rejected = row_tokens(prepared, tokenizer, 0)
    # Line 1: system "You are a concise assistant." + user "Which city is the capital of France?".
    assert prompt == [
        "<bos>", "<|system|>", "You", "are", "a", "concise", "assistant", ".", "<|end|>",
        "<|user|>", "Which", "city", "is", "the", "capital", "of", "France", "?", "<|end|>", "<|assistant|>",
    ]
    # The template closes the turn with <|end|>; EOS is appended once after it.
    assert chosen == ["The", "capital", "of", "France", "is", "Paris", ".", "<|end|>", "<eos>"]
    assert rejected == ["The", "capital", "of", "France", "is", "Geneva", ".", "<|end|>", "<eos>"]


def test_conversational_multi_turn_prompt_keeps_every_earlier_turn_in_the_prompt(tmp_path):
    row = {
        "prompt": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "Name the capital city of Italy."},
        ],
        "chosen": [{"role": "assistant", "content": "Rome."}],
        "rejected": [{"role": "assistant", "content": "Sydney."}],
    }
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "rejected": [{"role": "assistant", "content": "Lima."}]}) + "\n")
    prepared, tokenizer, _ = prepare(path, tmp_path / "cache")
    prompt, chosen, rejected = row_tokens(prepared, tokenizer, 0)
    assert prompt == [
        "<bos>", "<|system|>", "You", "are", "a", "concise", "assistant", ".", "<|end|>",
        "<|user|>", "Hi", "!", "<|end|>",
        "<|assistant|>", "Hello", ",", "how", "can", "I", "help", "?", "<|end|>",
        "<|user|>", "Name", "the", "capital", "city", "of", "Italy", ".", "<|end|>", "<|assistant|>",
    ]
    assert chosen == ["Rome", ".", "<|end|>", "<eos>"]
    assert rejected == ["Sydney", ".", "<|end|>", "<eos>"]


def test_hh_rlhf_multi_turn_transcript_splits_after_the_last_shared_assistant_marker(tmp_path):
    prepared, tokenizer, _ = prepare(FIXTURES / "hh_rlhf_style.jsonl", tmp_path)
    assert prepared.layout == "hh_rlhf"
    prompt, chosen, rejected = row_tokens(prepared, tokenizer, 0)
    # Line 1: "\n\nHuman: Hi!\n\nAssistant: Hello, how can I help?\n\nHuman: Which city is the capital of
    # France?\n\nAssistant: The capital of France is Paris." (rejected ends "... is Geneva.")
    assert prompt == [
        "<bos>", "Human", ":", "Hi", "!", "Assistant", ":", "Hello", ",", "how", "can", "I", "help", "?",
        "Human", ":", "Which", "city", "is", "the", "capital", "of", "France", "?", "Assistant", ":",
    ]
    assert chosen == ["The", "capital", "of", "France", "is", "Paris", ".", "<eos>"]
    assert rejected == ["The", "capital", "of", "France", "is", "Geneva", ".", "<eos>"]


def test_hh_rlhf_split_never_cuts_into_a_completion_prefix_both_sides_share():
    # Fixture line 15: both answers start with "The capital of Ghana is ".
    chosen = "\n\nHuman: What is the capital of Ghana?\n\nAssistant: The capital of Ghana is Accra."
    rejected = "\n\nHuman: What is the capital of Ghana?\n\nAssistant: The capital of Ghana is Cusco."
    prompt, chosen_turn, rejected_turn = split_transcripts(chosen, rejected)
    assert prompt == "\n\nHuman: What is the capital of Ghana?\n\nAssistant:"
    assert chosen_turn == " The capital of Ghana is Accra."
    assert rejected_turn == " The capital of Ghana is Cusco."


def test_hh_rlhf_transcripts_that_differ_before_the_last_turn_are_mismatched_prompts():
    chosen = "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: Name a colour.\n\nAssistant: Red."
    rejected = "\n\nHuman: Hi!\n\nAssistant: Hello.\n\nHuman: Name a fruit.\n\nAssistant: Apple."
    with pytest.raises(RowProblem) as problem:
        split_transcripts(chosen, rejected)
    assert problem.value.reason == MISMATCHED_PROMPTS
    with pytest.raises(RowProblem) as problem:
        split_transcripts("\n\nHuman: a\n\nAssistant: b", "Something else entirely")
    assert problem.value.reason == MISMATCHED_PROMPTS
    with pytest.raises(RowProblem) as problem:
        split_transcripts("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant:")
    assert problem.value.reason == EMPTY_TEXT


def test_message_lists_layout_takes_the_prompt_from_the_messages(tmp_path):
    prepared, tokenizer, logged = prepare(FIXTURES / "ultrafeedback_binarized_style.jsonl", tmp_path)
    assert prepared.layout == "message_lists"
    prompt, chosen, rejected = row_tokens(prepared, tokenizer, 0)
    assert prompt == ["<bos>", "<|user|>", "Which", "city", "is", "the", "capital", "of", "France", "?", "<|end|>", "<|assistant|>"]
    assert chosen == ["The", "capital", "of", "France", "is", "Paris", ".", "<|end|>", "<eos>"]
    assert rejected == ["The", "capital", "of", "France", "is", "Geneva", ".", "<|end|>", "<eos>"]


def test_message_lists_split_multi_turn_and_refuse_different_prompts():
    user = {"role": "user", "content": "Hi"}
    hello = {"role": "assistant", "content": "Hello"}
    ask = {"role": "user", "content": "Colour?"}
    prompt, chosen, rejected = split_conversations(
        [user, hello, ask, {"role": "assistant", "content": "Red"}],
        [user, hello, ask, {"role": "assistant", "content": "Blue"}],
    )
    assert prompt == [user, hello, ask]
    assert chosen == [{"role": "assistant", "content": "Red"}]
    assert rejected == [{"role": "assistant", "content": "Blue"}]
    with pytest.raises(RowProblem) as problem:
        split_conversations([user, {"role": "assistant", "content": "A"}], [ask, {"role": "assistant", "content": "B"}])
    assert problem.value.reason == MISMATCHED_PROMPTS
    assert "first at message 0" in problem.value.detail


def test_stack_exchange_layout_through_a_column_mapping(tmp_path):
    columns = {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}
    prepared, tokenizer, _ = prepare(FIXTURES / "stack_exchange_paired_style.jsonl", tmp_path, columns=columns)
    assert prepared.layout == "explicit"
    prompt, chosen, rejected = row_tokens(prepared, tokenizer, 0)
    assert prompt == ["<bos>", "Which", "city", "is", "the", "capital", "of", "France", "?"]
    assert chosen == ["The", "capital", "of", "France", "is", "Paris", ".", "<eos>"]
    assert rejected == ["The", "capital", "of", "France", "is", "Geneva", ".", "<eos>"]


def test_stack_exchange_without_a_mapping_is_an_error_that_suggests_one(tmp_path):
    with pytest.raises(DataError, match="data.columns"):
        prepare(FIXTURES / "stack_exchange_paired_style.jsonl", tmp_path)


def test_mapping_a_column_the_data_lacks_is_an_error_naming_it(tmp_path):
    with pytest.raises(DataError, match="prompt -> 'title'"):
        prepare(FIXTURES / "stack_exchange_paired_style.jsonl", tmp_path, columns={"prompt": "title", "chosen": "response_j", "rejected": "response_k"})


def test_shp_layout_picks_the_chosen_side_from_the_label(tmp_path):
    columns = {"prompt": "history", "response_a": "human_ref_A", "response_b": "human_ref_B", "preference": "labels"}
    prepared, tokenizer, _ = prepare(FIXTURES / "shp_style.jsonl", tmp_path, columns=columns)
    assert prepared.layout == "explicit"
    # Line 1: labels 0, so B ("... Paris.") is preferred over A ("... Geneva.").
    _, chosen, rejected = row_tokens(prepared, tokenizer, 0)
    assert chosen == ["The", "capital", "of", "France", "is", "Paris", ".", "<eos>"]
    assert rejected == ["The", "capital", "of", "France", "is", "Geneva", ".", "<eos>"]
    # Line 3: labels 1, so A ("... Brussels.") is preferred.
    _, chosen, rejected = row_tokens(prepared, tokenizer, 2)
    assert chosen == ["The", "capital", "of", "Belgium", "is", "Brussels", ".", "<eos>"]
    assert rejected == ["The", "capital", "of", "Belgium", "is", "Geneva", ".", "<eos>"]


def test_unpaired_fixture_keeps_labels_and_counts(tmp_path):
    tokenizer = build_word_tokenizer()
    config = data_config(FIXTURES / "kto_unpaired.jsonl", tmp_path, eval_fraction=0.0)
    prepared = prepare_data(config, tokenizer, unpaired=True, seed=0, log=lambda _: None)
    assert prepared.layout == "unpaired"
    labels = [json.loads(line)["label"] for line in (FIXTURES / "kto_unpaired.jsonl").read_text().splitlines()]
    assert prepared.train["label"][:] == labels
    row = prepared.train[0]
    # Line 1: user "What is 40 + 21?" -> assistant "40 + 21 = 61.", desirable.
    assert tokens(tokenizer, row["prompt_ids"]) == ["<bos>", "<|user|>", "What", "is", "40", "+", "21", "?", "<|end|>", "<|assistant|>"]
    assert tokens(tokenizer, row["completion_ids"]) == ["40", "+", "21", "=", "61", ".", "<|end|>", "<eos>"]
    assert row["label"] is True


def test_unpaired_rows_need_an_unpaired_loss(tmp_path):
    with pytest.raises(DataError, match="loss.name: kto"):
        prepare(FIXTURES / "kto_unpaired.jsonl", tmp_path)


def test_a_layout_set_in_the_recipe_that_does_not_fit_reports_every_row(tmp_path):
    with pytest.raises(DataError) as error:
        prepare(FIXTURES / "explicit_prompt.jsonl", tmp_path, layout="conversational")
    message = str(error.value)
    assert "27 bad row(s)" in message
    assert "line 1: malformed messages: 'prompt' is a string" in message


@pytest.mark.parametrize(
    ("columns", "sample", "layout"),
    [
        (["prompt", "chosen", "rejected"], {"prompt": "p", "chosen": "c"}, "explicit"),
        (["prompt", "chosen", "rejected"], {"prompt": [{}], "chosen": [{}]}, "conversational"),
        (["chosen", "rejected"], {"chosen": "\n\nHuman: a"}, "hh_rlhf"),
        (["chosen", "rejected"], {"chosen": [{}]}, "message_lists"),
        (["prompt", "chosen", "rejected", "messages"], {"prompt": "p", "chosen": [{}]}, "message_lists"),
        (["prompt", "completion", "label"], {"prompt": "p"}, "unpaired"),
        (["prompt", "response_a", "response_b", "preference"], {"prompt": "p", "response_a": "a"}, "explicit"),
    ],
)
def test_detect_layout_from_columns_and_types(columns, sample, layout):
    assert detect_layout(columns, sample, "data.jsonl") == layout


def test_undetectable_columns_are_an_error_listing_them():
    with pytest.raises(DataError, match="cannot tell the layout from the columns question, answer"):
        detect_layout(["question", "answer"], {}, "data.jsonl")


def test_recipe_column_names_match_the_data_path():
    assert tuple(DATA_COLUMNS) == tuple(CANONICAL_COLUMNS)
    with pytest.raises(ValueError, match="unknown column name"):
        DataConfig(train="x.jsonl", columns={"question": "prompt"})
    with pytest.raises(ValueError, match="response_a, response_b and preference"):
        DataConfig(train="x.jsonl", columns={"response_a": "human_ref_A"})


def test_demonstrations_are_detected_and_normalised():
    from dpo.data.layouts import normalise_row, uses_chat

    text = {"prompt": "Q?", "completion": " A."}
    assert detect_layout(["prompt", "completion"], text, "d") == "demonstrations"
    assert detect_layout(["prompt", "completion", "label"], {**text, "label": True}, "d") == "unpaired"
    assert normalise_row(text, "demonstrations", chat=False) == {"prompt": "Q?", "completion": " A.", "label": True}
    conversation = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    assert detect_layout(["messages"], conversation, "d") == "demonstrations"
    assert uses_chat("demonstrations", conversation) and not uses_chat("demonstrations", text)
    assert normalise_row(conversation, "demonstrations", chat=True) == {
        "prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello"}],
        "label": True}
    for bad in ([{"role": "assistant", "content": "Hello"}],
                [{"role": "user", "content": "Hi"}, {"role": "user", "content": "there"}],
                [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]):
        with pytest.raises(RowProblem):
            normalise_row({"messages": bad}, "demonstrations", chat=True)


def test_demonstrations_train_only_with_completions(tmp_path):
    config = DataConfig(train=str(FIXTURES / "demonstrations.jsonl"), eval_fraction=0.25, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="train with task: sft"):
        prepare_data(config, build_word_tokenizer(), unpaired=False, seed=0, log=lambda _: None)
    data = prepare_data(config, build_word_tokenizer(), unpaired=False, seed=0, log=lambda _: None, completions=True)
    assert data.layout == "demonstrations" and len(data.train) == 3 and len(data.eval) == 1
    assert all(data.train["label"]) and data.stats.unit == "rows"
