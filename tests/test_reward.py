"""Reward model: the Bradley–Terry loss by hand, the margin column through the data path, rewards read at the
last real token, training on the quickstart task, and ``dpo-train score``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dpo.cli import main
from dpo.data import DataError, collate_paired, prepare_data
from dpo.model import load_tokenizer
from dpo.quickstart import is_correct
from dpo.recipe import DataConfig, LoraConfig, ModelConfig, RecipeError, recipe_from_dict
from dpo.reward.model import (
    HEAD,
    add_reward_lora,
    bradley_terry_loss,
    load_reward_base,
    load_reward_run,
    pair_rewards,
    sequence_rewards,
)
from dpo.reward.scoring import score_texts
from tests.helpers import build_tiny_model, write_jsonl, write_recipe

QUICKSTART = Path("recipes/quickstart")


def softplus(x: float) -> float:
    return math.log1p(math.exp(-x)) if x > 0 else -x + math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------- the loss


def test_bradley_terry_loss_by_hand():
    chosen = torch.tensor([2.0, 0.5], dtype=torch.float64)
    rejected = torch.tensor([1.0, 0.5], dtype=torch.float64)
    out = bradley_terry_loss(chosen, rejected)
    # pair 1: −log σ(2 − 1) = log(1 + e^−1) = 0.3132617; pair 2: −log σ(0) = log 2 = 0.6931472
    assert out.losses.tolist() == pytest.approx([0.31326169, 0.69314718], abs=1e-7)
    assert out.metrics["rewards/accuracies"].tolist() == [1.0, 0.5]  # a tie counts half
    assert out.metrics["rewards/margins"].tolist() == [1.0, 0.0]
    assert out.metrics["rewards/mean"].tolist() == [1.5, 0.5]
    # spread of the four rewards 2, 0.5, 1, 0.5: mean 1, squared deviations 1 + 0.25 + 0 + 0.25 = 1.5, /4, √
    assert out.metrics["rewards/std"].tolist() == pytest.approx([math.sqrt(0.375)])


def test_margin_shifts_the_sigmoid_argument_as_the_formula_says():
    chosen = torch.tensor([2.0, 0.5], dtype=torch.float64)
    rejected = torch.tensor([1.0, 0.5], dtype=torch.float64)
    margin = torch.tensor([0.5, -1.0], dtype=torch.float64)
    out = bradley_terry_loss(chosen, rejected, margin)
    # pair 1: −log σ(2 − 1 − 0.5) = log(1 + e^−0.5) = 0.4740770; pair 2: −log σ(0 + 1) = log(1 + e^−1) = 0.3132617
    assert out.losses.tolist() == pytest.approx([0.47407698, 0.31326169], abs=1e-7)
    assert out.losses.tolist() == pytest.approx([softplus(0.5), softplus(1.0)], abs=1e-12)
    # the margin changes the loss, not the ranking metrics
    assert out.metrics["rewards/accuracies"].tolist() == [1.0, 0.5]


def test_centering_term_and_its_gradient_by_hand():
    chosen = torch.tensor([2.0, 0.5], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([1.0, 0.5], dtype=torch.float64, requires_grad=True)
    margin = torch.tensor([0.5, 0.0], dtype=torch.float64)
    out = bradley_terry_loss(chosen, rejected, margin, center_weight=0.1)
    # pair 1: 0.4740770 + 0.1·(2 + 1)² = 1.3740770; pair 2: 0.6931472 + 0.1·(0.5 + 0.5)² = 0.7931472
    assert out.losses.tolist() == pytest.approx([1.37407698, 0.79314718], abs=1e-7)
    out.losses.sum().backward()
    # d/dr_c = −σ(−(d − m)) + 2c(r_c + r_r): pair 1: −(1 − σ(0.5)) + 0.6 = −0.3775407 + 0.6 = 0.2224593
    # pair 2: −0.5 + 2·0.1·1 = −0.3; and d/dr_r = +σ(−(d − m)) + 2c(r_c + r_r): 0.9775407, 0.7
    assert chosen.grad.tolist() == pytest.approx([0.22245933, -0.3], abs=1e-7)
    assert rejected.grad.tolist() == pytest.approx([0.97754067, 0.7], abs=1e-7)


# -------------------------------------------------------------------------------- margin through the data


def margin_rows() -> list[dict]:
    return [{"prompt": f"Is {n} even or odd? Answer:", "chosen": " even" if n % 2 == 0 else " odd",
             "rejected": " odd" if n % 2 == 0 else " even", "gap": 0.25 * i} for i, n in enumerate(range(20, 28))]


def test_margin_column_is_carried_to_the_batch(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", margin_rows())
    tokenizer = load_tokenizer(ModelConfig(path=str(QUICKSTART / "model")))
    cfg = DataConfig(train=str(path), eval_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, tokenizer, unpaired=False, seed=0, log=lambda _: None, margin_column="gap")
    batch = collate_paired([data.train[i] for i in (2, 5, 7)], pad_token_id=tokenizer.pad_token_id)
    assert batch["margin"].tolist() == [0.5, 1.25, 1.75]
    without = prepare_data(cfg, tokenizer, unpaired=False, seed=0, log=lambda _: None)
    assert "margin" not in collate_paired([without.train[0]], pad_token_id=tokenizer.pad_token_id)
    assert without.train_fingerprint != data.train_fingerprint  # a margin is part of what the data is


def test_missing_or_non_numeric_margins_are_bad_rows(tmp_path):
    rows = margin_rows()
    rows[3]["gap"] = "high"
    del rows[5]["gap"]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    tokenizer = load_tokenizer(ModelConfig(path=str(QUICKSTART / "model")))
    cfg = DataConfig(train=str(path), eval_fraction=0.0, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError) as info:
        prepare_data(cfg, tokenizer, unpaired=False, seed=0, log=lambda _: None, margin_column="gap")
    message = str(info.value)
    assert "line 4: non-numeric value: 'gap' is 'high'" in message and "line 6: missing field" in message
    with pytest.raises(DataError, match="reward.margin_column is 'rating', but there is no such column"):
        prepare_data(cfg, tokenizer, unpaired=False, seed=0, log=lambda _: None, margin_column="rating")


# ------------------------------------------------------------------------------------------ the recipe


def test_reward_recipe_refuses_loss_settings_and_round_trips():
    import yaml

    base = {"model": {"path": "m"}, "data": {"train": "t"}, "output": {"dir": "o"}}
    recipe = recipe_from_dict({**base, "task": "reward", "reward": {"margin_column": "gap", "center_weight": 0.01}})
    assert recipe.reward.margin_column == "gap" and recipe.reward.center_weight == 0.01
    # a resolved recipe holds every section, the other task's at its defaults: it loads back as it was
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    policy = recipe_from_dict(base)
    assert recipe_from_dict(yaml.safe_load(policy.to_yaml())) == policy
    with pytest.raises(RecipeError, match="takes no loss section"):
        recipe_from_dict({**base, "task": "reward", "loss": {"beta": 0.2}})
    with pytest.raises(RecipeError, match="used only with task: reward"):
        recipe_from_dict({**base, "reward": {"center_weight": 0.1}})
    with pytest.raises(RecipeError, match="reward.center_weight"):
        recipe_from_dict({**base, "task": "reward", "reward": {"center_weight": -1}})


# ---------------------------------------------------------------------------------------- the model


def test_reward_is_the_head_at_the_last_real_token(tmp_path):
    model_dir = build_tiny_model(tmp_path / "model")
    model = load_reward_base(ModelConfig(path=str(model_dir))).eval()
    assert isinstance(getattr(model, HEAD), torch.nn.Linear) and getattr(model, HEAD).out_features == 1
    rows = [[1, 10, 11, 12, 2], [1, 20, 21, 2], [1, 30, 2]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        batched = sequence_rewards(model, ids, mask)
        alone = [sequence_rewards(model, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)) for r in rows]
        # transformers' own forward finds the last token through the pad id (0, never inside these rows)
        reference = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert batched.shape == (3,) and batched.dtype == torch.float32
    assert batched.tolist() == pytest.approx([float(a) for a in alone], abs=1e-5)
    assert batched.tolist() == pytest.approx(reference.tolist(), abs=1e-5)


def test_lora_adapts_the_trunk_and_trains_the_head_in_full(tmp_path):
    model = load_reward_base(ModelConfig(path=str(build_tiny_model(tmp_path / "model"))))
    wrapped = add_reward_lora(model, LoraConfig(r=4, alpha=8))
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lora_A" in n and "layers.0" in n for n in trainable)
    head = [n for n in trainable if f".{HEAD}." in n]
    assert head and all("modules_to_save" in n for n in head)  # a trained copy of the whole head
    assert not any(f"{HEAD}.lora" in n for n in trainable)  # the head is not LoRA-adapted
    assert all("lora" in n or "modules_to_save" in n for n in trainable)


# ------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained_reward_model(tmp_path_factory) -> Path:
    """A reward model trained briefly on the quickstart task (its own model, train and held-out pairs)."""
    tmp = tmp_path_factory.mktemp("reward")
    recipe = write_recipe(tmp / "reward.yaml", {
        "task": "reward",
        "model": {"path": str(QUICKSTART / "model")},
        "data": {"train": str(QUICKSTART / "data" / "train.jsonl"), "eval": str(QUICKSTART / "data" / "eval.jsonl"),
                 "max_length": 64, "max_prompt_length": 48, "cache_dir": str(tmp / "cache")},
        "lora": {"r": 32, "alpha": 64},
        "reward": {"center_weight": 0.01},
        "train": {"seed": 0, "max_steps": 500, "batch_size": 16, "lr": 0.001, "warmup_ratio": 0.05,
                  "log_every": 100},
        "output": {"dir": str(tmp / "run")},
    })
    main([str(recipe)])
    return tmp / "run"


def test_reward_model_ranks_held_out_quickstart_pairs_well_above_chance(trained_reward_model):
    final = json.loads((trained_reward_model / "final_metrics.json").read_text())
    before, after = final["eval_before"], final["eval_after"]
    # 200 held-out pairs whose numbers never occur in training; chance is 0.5 (binomial s.d. 0.035)
    assert after["rewards/accuracies"] >= 0.65, (before, after)
    assert after["loss"] < before["loss"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/mean", "rewards/std"):
        assert key in after


def test_saved_run_reproduces_its_held_out_accuracy(trained_reward_model):
    run = load_reward_run(trained_reward_model)
    final = json.loads((trained_reward_model / "final_metrics.json").read_text())
    data = prepare_data(run.recipe.data, run.tokenizer, unpaired=False, seed=0, log=lambda _: None)
    batch = collate_paired([data.eval[i] for i in range(len(data.eval))], pad_token_id=run.tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected = pair_rewards(run.model, batch)
    accuracy = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean().item()
    # the trained head is saved with the adapter: a fresh head would rank at chance, not at the run's accuracy
    assert accuracy == pytest.approx(final["eval_after"]["rewards/accuracies"], abs=1e-6)


def test_score_command_writes_one_score_per_row(trained_reward_model, tmp_path):
    rows = []
    for line in (QUICKSTART / "data" / "eval.jsonl").read_text().splitlines()[:40]:
        pair = json.loads(line)
        rows.append({"id": len(rows), "prompt": pair["prompt"], "completion": pair["chosen"]})
        rows.append({"id": len(rows), "prompt": pair["prompt"], "completion": pair["rejected"]})
    data = write_jsonl(tmp_path / "answers.jsonl", rows)
    main(["score", "--reward-model", str(trained_reward_model), "--data", str(data)])
    written = [json.loads(line) for line in (tmp_path / "answers.scores.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "score"} for r in written] == rows  # every row, in order, intact
    run = load_reward_run(trained_reward_model)
    expected = score_texts(run, rows, 16, "cpu", "test")
    assert [r["score"] for r in written] == pytest.approx(expected, abs=1e-5)
    correct = [r["score"] for r in written if is_correct(r["prompt"], r["completion"])]
    wrong = [r["score"] for r in written if not is_correct(r["prompt"], r["completion"])]
    assert sum(correct) / len(correct) > sum(wrong) / len(wrong)


def test_score_names_the_bad_row(trained_reward_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Is 4 even? Answer:", "completion": " even"},
                                                {"prompt": "Is 5 even? Answer:"}])
    with pytest.raises(SystemExit) as info:
        main(["score", "--reward-model", str(trained_reward_model), "--data", str(data)])
    assert info.value.code == 2
    assert "bad.jsonl, line 2: missing field: no 'completion' field" in capsys.readouterr().err


def test_score_refuses_a_policy_run(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    write_recipe(run / "recipe.yaml", {"model": {"path": "m"}, "data": {"train": "t"}, "output": {"dir": str(run)}})
    with pytest.raises(SystemExit):
        main(["score", "--reward-model", str(run), "--data", str(tmp_path / "x.jsonl")])
    assert "trained with task: preference, not a reward model" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- QLoRA


def test_qlora_reward_model_trains_and_reloads(tmp_path):
    pytest.importorskip("bitsandbytes")
    model_dir = build_tiny_model(tmp_path / "model")
    # chosen " yes", rejected " no": the last token before EOS decides, so a few steps suffice
    pairs = [{"prompt": f"Is {n} a number? Answer:", "chosen": " yes", "rejected": " no"} for n in range(100, 148)]
    write_jsonl(tmp_path / "train.jsonl", pairs[:32])
    write_jsonl(tmp_path / "eval.jsonl", pairs[32:])
    recipe = write_recipe(tmp_path / "reward.yaml", {
        "task": "reward",
        "model": {"path": str(model_dir), "quantization": {"bits": 4, "compute_dtype": "float32"}},
        "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"), "max_length": 32,
                 "max_prompt_length": 24, "cache_dir": str(tmp_path / "cache")},
        "lora": {"r": 8, "alpha": 16},
        "train": {"max_steps": 12, "batch_size": 8, "lr": 0.01, "warmup_steps": 0, "log_every": 6},
        "output": {"dir": str(tmp_path / "run")},
    })
    main([str(recipe)])
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["eval_after"]["rewards/accuracies"] == 1.0
    assert final["eval_after"]["loss"] < final["eval_before"]["loss"] - 0.1
    run = load_reward_run(tmp_path / "run")
    head = getattr(run.model.get_base_model(), HEAD)
    assert torch.is_floating_point(head.weight)  # the head stays in full precision; the trunk is 4-bit
    assert any(type(m).__name__ == "Linear4bit" for m in run.model.modules())
    scores = score_texts(run, [{"prompt": p["prompt"], "completion": side} for p in pairs[32:36]
                               for side in (" yes", " no")], 8, "cpu", "test")
    assert all(yes > no for yes, no in zip(scores[0::2], scores[1::2]))
