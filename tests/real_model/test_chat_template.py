"""The prompt/completion boundary on real chat text, with the real model's ChatML template from its GGUF."""

from __future__ import annotations

from dpo.data import prepare_data
from dpo.model import load_tokenizer
from dpo.recipe import DataConfig, ModelConfig
from tests.helpers import write_jsonl

ROWS = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "I think it might be Lyon, but I am not sure."}]},
    {"prompt": [{"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": "Bonjour !"},
                {"role": "user", "content": "And goodbye?"}],
     "chosen": [{"role": "assistant", "content": "Au revoir !"}],
     "rejected": [{"role": "assistant", "content": "Goodbye!"}]},
]


def test_the_boundary_falls_after_the_generation_prompt_and_each_side_ends_with_one_eos(tmp_path, gguf_model):
    tokenizer = load_tokenizer(ModelConfig(**gguf_model))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    data_file = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    data = prepare_data(DataConfig(train=str(data_file), eval_fraction=0.0, cache_dir=str(tmp_path / "cache")),
                        tokenizer, unpaired=False, seed=0, log=lambda _: None)
    assert len(data.train) == 2
    for row, source in zip(data.train, ROWS):
        prompt = tokenizer.decode(row["prompt_ids"])
        # The template's own system prompt is injected when the conversation has none, on both renderings.
        if source["prompt"][0]["role"] != "system":
            assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        else:
            assert prompt.startswith("<|im_start|>system\nAnswer in French.<|im_end|>")
        assert prompt.endswith("<|im_start|>assistant\n")
        for side in ("chosen", "rejected"):
            ids = row[f"{side}_ids"]
            assert tokenizer.decode(ids) == source[side][0]["content"] + "<|im_end|>\n"
            assert ids.count(tokenizer.eos_token_id) == 1
            whole = tokenizer.apply_chat_template(source["prompt"] + source[side], tokenize=False)
            assert tokenizer(whole, add_special_tokens=False)["input_ids"] == row["prompt_ids"] + ids
