"""``dpo-train compare``: the reference against itself, a DPO adapter against the base, reproducibility from
the seed, generation through the adapter, prompts from any layout, and a shared vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpo.cli import main
from dpo.compare.config import CompareError, ModelEntry, PromptSet, load_compare_config
from dpo.compare.run import load_policy, read_prompts
from dpo.model import add_lora, load_base_model
from dpo.model.generate import SamplingSettings, encode_prompt, sample_completions
from dpo.recipe import LoraConfig, ModelConfig, recipe_from_dict
from tests.helpers import build_tiny_model, write_jsonl, write_recipe

QUICKSTART = Path("recipes/quickstart")
EVAL = str(QUICKSTART / "data" / "eval.jsonl")


def numbers(report_dir: Path) -> dict:
    return json.loads((report_dir / "report.json").read_text())


def by_name(report_dir: Path) -> dict[str, dict]:
    return {m["name"]: m for m in numbers(report_dir)["models"]}


def test_reference_against_itself_has_zero_kl_and_half_win_rate(report):
    base = by_name(report)["base"]
    assert base["drift"]["kl"] == 0.0 and base["drift"]["kl_standard_error"] == 0.0
    assert base["reward"]["win_rate"] == 0.5  # every pair a tie
    assert base["reward"]["win_rate_length_controlled"] == 0.5
    assert base["reward"]["length_controlled_pairs"] == 36  # 12 prompts × 3 samples, all equal lengths
    assert base["preference_accuracy"]["value"] == 0.5  # log π − log π_ref is 0 on both sides: ties


def test_dpo_adapter_beats_the_base_on_held_out_preference(report):
    models = by_name(report)
    dpo, base = models["dpo"], models["base"]
    assert dpo["preference_accuracy"]["value"] >= base["preference_accuracy"]["value"] + 0.1, (dpo, base)
    assert "dpo (beta=0.5" in dpo["preference_accuracy"]["method"]
    assert "against its own reference" in dpo["preference_accuracy"]["method"]
    # drift is measured on the adapter's own samples: positive once it has moved from the base
    assert dpo["drift"]["kl"] > 0 and dpo["drift"]["samples"] == 36
    assert 0.0 <= dpo["reward"]["win_rate"] <= 1.0
    reward_model = numbers(report)["reward_model"]
    assert reward_model["pairs"] == 200 and 0.0 <= reward_model["preference_accuracy"] <= 1.0


def test_identical_seeds_give_identical_reports(runs, report):
    path = runs["tmp"] / "compare.yaml"  # written by the report fixture, whose output is report-a
    again = runs["tmp"] / "report-b"
    main(["compare", str(path), "--set", f"output={again}"])
    for name in ("report.json", "report.md", "samples.jsonl"):
        assert (again / name).read_bytes() == (report / name).read_bytes(), name
    other = runs["tmp"] / "report-c"
    main(["compare", str(path), "--set", f"output={other}", "--set", "generation.seed=1"])
    assert (other / "samples.jsonl").read_bytes() != (report / "samples.jsonl").read_bytes()


def test_plots_are_written(report):
    for name in ("reward_vs_kl.png", "lengths.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------- the adapter


def random_adapter_run(tmp: Path) -> tuple[Path, Path]:
    """A run directory whose adapter moves the model far from its base (large random LoRA weights)."""
    model_dir = build_tiny_model(tmp / "model")
    config = ModelConfig(path=str(model_dir))
    policy = add_lora(load_base_model(config), LoraConfig(r=4, alpha=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
    run = tmp / "run"
    policy.save_pretrained(run / "adapter", safe_serialization=True)
    recipe = recipe_from_dict({"model": {"path": str(model_dir)}, "data": {"train": "t"}, "output": {"dir": str(run)}})
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    from dpo.model import load_tokenizer

    load_tokenizer(config).save_pretrained(run / "adapter")
    return run, model_dir


def test_generation_uses_the_adapter(tmp_path):
    from peft import PeftModel

    run, model_dir = random_adapter_run(tmp_path)
    adapted = load_policy(ModelEntry(name="tuned", run=str(run)), "cpu")
    base = load_policy(ModelEntry(name="base", path=str(model_dir)), "cpu")
    merged = PeftModel.from_pretrained(load_base_model(ModelConfig(path=str(model_dir))),
                                       str(run / "adapter")).merge_and_unload().eval()
    prompts = [encode_prompt(base.tokenizer, p, None, 48) for p in ("Is 12 even or odd? Answer:", "What is 3?")]
    greedy = SamplingSettings(max_new_tokens=8, temperature=0.0, top_p=1.0, samples_per_prompt=1, seed=0,
                              batch_size=4)
    with_adapter = sample_completions(adapted.model, adapted.tokenizer, prompts, greedy, "cpu").completion_ids
    without = sample_completions(base.model, base.tokenizer, prompts, greedy, "cpu").completion_ids
    folded_in = sample_completions(merged, base.tokenizer, prompts, greedy, "cpu").completion_ids
    assert with_adapter == folded_in  # the adapter's weights, folded into the base, generate the same
    assert with_adapter != without


# ---------------------------------------------------------------------------------------- inputs


def test_prompts_from_pairs_and_prompt_only_files(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "A?", "chosen": " x", "rejected": " y"},
        {"prompt": "B?", "chosen": " x", "rejected": " y"},
        {"prompt": "A?", "chosen": " z", "rejected": " y"},
    ])
    assert read_prompts(PromptSet(path=str(pairs)), log=lambda _: None) == ["A?", "B?"]  # unique, in order
    transcripts = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go."}])
    assert read_prompts(PromptSet(path=str(transcripts)), log=lambda _: None) == ["\n\nHuman: Hi?\n\nAssistant:"]
    only = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "C?"}, {"prompt": [{"role": "user", "content": "D"}]},
                                                   {"prompt": "E?"}])
    assert read_prompts(PromptSet(path=str(only), max_prompts=2), log=lambda _: None) == [
        "C?", [{"role": "user", "content": "D"}]]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "C?"}, {"prompt": ""}])
    with pytest.raises(ValueError, match="bad.jsonl, line 2: empty text"):
        read_prompts(PromptSet(path=str(bad)), log=lambda _: None)


def test_models_must_share_the_reference_vocabulary(tmp_path, runs):
    other = build_tiny_model(tmp_path / "other")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(other)
    path = write_recipe(tmp_path / "c.yaml", {
        "models": [{"name": "base", "path": str(QUICKSTART / "model")}, {"name": "other", "path": str(other)}],
        "reward_model": str(runs["reward"]), "prompts": {"path": EVAL, "max_prompts": 2},
        "generation": {"max_new_tokens": 2, "samples_per_prompt": 1}, "output": str(tmp_path / "out"),
    })
    with pytest.raises(CompareError, match="models.other: its tokenizer differs from the reference model's"):
        from dpo.compare.run import run_compare

        run_compare(load_compare_config(path), log=lambda _: None)
