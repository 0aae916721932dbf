"""A run on the real GGUF model merges with the default settings (bf16) and reloads as a plain model."""

from __future__ import annotations

import json

import torch

from dpo.cli import main
from dpo.model import LogprobSettings, load_base_model, sequence_logprobs
from dpo.recipe import ModelConfig
from tests.helpers import write_jsonl, write_recipe
from tests.real_model.conftest import TASK


def test_a_gguf_run_merges_in_bf16_by_default_and_reloads(tmp_path, gguf_model, smollm2, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in (TASK / "data" / "flattery-train.jsonl").read_text().splitlines()[:8]]
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "model": gguf_model,
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "eval_fraction": 0.0,
                 "max_length": 96, "max_prompt_length": 64},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1.0e-3, "warmup_steps": 0, "log_every": 1},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "output": {"dir": str(tmp_path / "run")},
    })
    main([str(recipe)])
    out = tmp_path / "merged"
    main(["merge", str(tmp_path / "run"), "--out", str(out)])  # the default: bf16
    logged = capsys.readouterr().out
    checked = next(line for line in logged.splitlines() if line.startswith("merge: checked in float32"))
    assert "(must be <= 0.0001" in checked
    assert not list(out.glob("*.gguf")) and "quantization_config" not in json.loads((out / "config.json").read_text())

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"},
                                         {"role": "assistant", "content": "7 + 5 = 12"}], tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    adapter = PeftModel.from_pretrained(load_base_model(ModelConfig(path=str(smollm2))), tmp_path / "run" / "adapter")

    def per_token(model) -> float:
        with torch.no_grad():
            sums, counts = sequence_logprobs(model.eval(), ids, torch.ones_like(ids), ids.clone(), LogprobSettings())
        return float(sums[0] / counts[0])

    # bf16 weights round each layer; over 30 layers that moves a token's log-prob by a few hundredths.
    assert abs(per_token(merged.float()) - per_token(adapter)) < 0.1
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    answer = merged.generate(**prompt_ids, max_new_tokens=12, do_sample=False)[0, prompt_ids["input_ids"].shape[1]:]
    assert tokenizer.decode(answer, skip_special_tokens=True).strip()
