"""``dpo-train merge``: a QLoRA run's adapter folded into its full-precision base, saved as a plain model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dpo.cli import main
from dpo.model import LogprobSettings, load_base_model, sequence_logprobs
from dpo.model.merge import FLOAT32_TOLERANCE, MergeError, merge_run, sample_batch
from dpo.recipe import ModelConfig
from tests.helpers import build_tiny_model, write_jsonl, write_recipe

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory) -> Path:
    """A finished 4-bit run whose adapter moved the model (chosen " yes" over rejected " no")."""
    root = tmp_path_factory.mktemp("merge-run")
    model = build_tiny_model(root / "model")
    rng = random.Random(0)
    pairs = [{"prompt": f"Is {n} a number? Answer:", "chosen": " yes", "rejected": " no"}
             for n in rng.sample(range(100, 999), 40)]
    write_jsonl(root / "train.jsonl", pairs[:32])
    write_jsonl(root / "eval.jsonl", pairs[32:])
    recipe = write_recipe(root / "recipe.yaml", {
        "model": {"path": str(model), "quantization": {"bits": 4, "compute_dtype": "float32"}},
        "data": {"train": str(root / "train.jsonl"), "eval": str(root / "eval.jsonl"), "max_length": 32,
                 "max_prompt_length": 24},
        "lora": {"r": 8, "alpha": 16},
        "loss": {"name": "dpo", "beta": 0.5},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 0.02, "warmup_steps": 0, "log_every": 3},
        "reference": {"cache_dir": str(root / "cache")},
        "output": {"dir": str(root / "run")},
    })
    main([str(recipe)])
    final = json.loads((root / "run" / "final_metrics.json").read_text())
    assert final["eval_after"]["rewards/accuracies"] > 0.5
    return root / "run"


def adapter_logps(run: Path, batch, dtype: str = "float32") -> torch.Tensor:
    """Mean per-token log-probs of base (full precision) + adapter, unmerged."""
    from peft import PeftModel

    base = load_base_model(ModelConfig(path=_recipe_model(run)["path"], dtype=dtype), device="cpu")
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    return _mean_logps(model, batch)


def _recipe_model(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "recipe.yaml").read_text())["model"]


def _mean_logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                         LogprobSettings())
    return sums / counts


@pytest.mark.parametrize(("flag", "dtype", "tolerance"), [("fp32", torch.float32, 1e-5),
                                                         ("bf16", torch.bfloat16, 2e-3)])
def test_merge_saves_a_plain_model_whose_log_probs_match_the_adapter(qlora_run, tmp_path, flag, dtype, tolerance):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    main(["merge", str(qlora_run), "--out", str(out), "--dtype", flag])
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "adapter_config.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config

    merged = AutoModelForCausalLM.from_pretrained(out)  # no peft, no quantization
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    assert not any("lora" in name for name, _ in merged.named_parameters())
    batch = sample_batch(merged.config.vocab_size, seed=1)
    same_dtype = adapter_logps(qlora_run, batch, dtype=str(dtype).removeprefix("torch."))  # unmerged
    float32 = adapter_logps(qlora_run, batch)
    base_only = _mean_logps(load_base_model(ModelConfig(path=_recipe_model(qlora_run)["path"]), device="cpu"), batch)
    merged_logps = _mean_logps(merged, batch)
    # Merging is exact up to the merged weights' rounding, and the adapter's effect is far larger than that
    # (this tiny random model is near uniform, so every difference here is small in absolute terms).
    assert (merged_logps - same_dtype).abs().max() <= tolerance
    assert (merged_logps - float32).abs().max() <= tolerance
    assert (float32 - base_only).abs().max() > 10 * tolerance


def test_merge_checks_in_float32_states_the_criterion_and_reports_the_cast(qlora_run, tmp_path):
    messages: list[str] = []
    report = merge_run(qlora_run, tmp_path / "m", dtype="bfloat16", device="cpu", log=messages.append)
    assert report.dtype == "bfloat16" and report.tolerance == FLOAT32_TOLERANCE
    assert 0.0 <= report.max_difference <= report.tolerance
    assert report.adapter_effect > 10 * report.max_difference
    assert 0.0 < report.rounding < report.adapter_effect  # casting rounds; it does not undo the adapter
    checked = next(m for m in messages if m.startswith("merge: checked in float32"))
    assert f"differ from base + adapter by at most {report.max_difference:.2e} (must be <= 0.0001" in checked
    assert any(m.startswith("merge: cast to bfloat16: rounding the merged weights moves") for m in messages)
    assert merge_run(qlora_run, tmp_path / "m32", dtype="fp32", log=lambda _: None).rounding == 0.0


def test_a_merge_that_changes_the_function_is_refused_and_nothing_is_saved(qlora_run, tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    # Dropping the adapter instead of merging it: the check must catch the lost adapter effect.
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    with pytest.raises(MergeError, match="differ from the adapter's"):
        merge_run(qlora_run, tmp_path / "bad", dtype="fp32", device="cpu", log=lambda _: None)
    assert not (tmp_path / "bad").exists()


def test_merge_errors_name_the_problem(qlora_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "no adapter_config.json" in capsys.readouterr().err

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    with pytest.raises(SystemExit):
        main(["merge", str(qlora_run), "--out", str(taken)])
    assert "not an empty directory" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["merge", str(qlora_run), "--out", str(tmp_path / "o"), "--dtype", "int4"])
    assert "--dtype 'int4'" in capsys.readouterr().err


def test_a_run_on_a_gguf_base_merges_into_a_plain_safetensors_model(tmp_path):
    """The GGUF is dequantized for training and for the merge; the merged folder holds no GGUF and no
    quantization config, reloads with from_pretrained and answers as base + adapter."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import build_tiny_gguf, yes_no_pairs

    pytest.importorskip("gguf")
    build_tiny_gguf(tmp_path / "gguf", "tiny.gguf")
    write_jsonl(tmp_path / "train.jsonl", yes_no_pairs(24, 0, range(100, 500)))
    write_jsonl(tmp_path / "eval.jsonl", yes_no_pairs(8, 1, range(500, 999)))
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "model": {"path": str(tmp_path / "gguf"), "gguf_file": "tiny.gguf"},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 48,
                 "max_prompt_length": 32},
        "lora": {"r": 8, "alpha": 16},
        "loss": {"name": "dpo", "beta": 0.5},
        "train": {"max_steps": 4, "batch_size": 8, "lr": 0.02, "warmup_steps": 0, "log_every": 2},
        "eval": {"samples": 1, "max_new_tokens": 4},
        "reference": {"cache_dir": str(tmp_path / "cache")},
        "output": {"dir": str(tmp_path / "run")},
    })
    main([str(recipe)])
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["eval_after"]["rewards/accuracies"] > 0.5
    out = tmp_path / "merged"
    main(["merge", str(tmp_path / "run"), "--out", str(out)])
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.gguf"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    from peft import PeftModel

    gguf_base = load_base_model(ModelConfig(path=str(tmp_path / "gguf"), gguf_file="tiny.gguf"), device="cpu")
    adapter = PeftModel.from_pretrained(gguf_base, tmp_path / "run" / "adapter").eval()
    batch = sample_batch(merged.config.vocab_size, seed=2)
    assert (_mean_logps(merged.float(), batch) - _mean_logps(adapter, batch)).abs().max() < 2e-2
