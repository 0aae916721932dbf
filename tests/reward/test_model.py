"""Reward model: the Bradley–Terry loss by hand, rewards read at the last real token, training on the
quickstart task, and a 4-bit (QLoRA) reward model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpo.cli import main
from dpo.data import collate_paired, prepare_data
from dpo.recipe import LoraConfig, ModelConfig
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


def test_packed_rewards_are_read_at_the_last_token_of_each_branch(tmp_path):
    from dpo.data import collate_packed_paired, collate_paired
    from dpo.model import plan_packing
    from dpo.reward.model import pair_rewards

    model = load_reward_base(ModelConfig(path=str(build_tiny_model(tmp_path / "model")))).eval()
    plan = plan_packing(model, 64, "cpu")
    rows = [{"index": 0, "prompt_ids": [1, 10, 11], "chosen_ids": [12, 13, 2], "rejected_ids": [14, 2]},
            {"index": 1, "prompt_ids": [1], "chosen_ids": [20, 2], "rejected_ids": [21, 22, 23, 2]},
            {"index": 2, "prompt_ids": [1, 30, 31, 32], "chosen_ids": [2], "rejected_ids": [33, 2]}]
    with torch.no_grad():
        padded = pair_rewards(model, collate_paired(rows, 0))
        packed = pair_rewards(model, collate_packed_paired(rows, 0, row_tokens=10_000), plan)
        relaid = pair_rewards(model, collate_packed_paired(rows, 0))  # no plan: re-laid as a padded batch
    for ours, theirs in zip(packed + relaid, padded + padded):
        assert ours.tolist() == pytest.approx(theirs.tolist(), abs=1e-5)


def test_lora_adapts_the_trunk_and_trains_the_head_in_full(tmp_path):
    model = load_reward_base(ModelConfig(path=str(build_tiny_model(tmp_path / "model"))))
    wrapped = add_reward_lora(model, LoraConfig(r=4, alpha=8))
    trainable = [name for name, p in wrapped.named_parameters() if p.requires_grad]
    assert any("lora_A" in n and "layers.0" in n for n in trainable)
    head = [n for n in trainable if f".{HEAD}." in n]
    assert head and all("modules_to_save" in n for n in head)  # a trained copy of the whole head
    assert not any(f"{HEAD}.lora" in n for n in trainable)  # the head is not LoRA-adapted
    assert all("lora" in n or "modules_to_save" in n for n in trainable)


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


def test_a_reward_model_started_from_a_causal_lm_adapter_copies_it_into_its_trunk(tmp_path):
    from peft import get_peft_model_state_dict

    from dpo.model import add_lora, load_base_model

    path = build_tiny_model(tmp_path / "m")
    config = ModelConfig(path=str(path))
    sft = add_lora(load_base_model(config), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    sft.save_pretrained(tmp_path / "sft")
    # The recipe's lora section (r=8) gives way to the adapter's own rank (r=4).
    reward = add_reward_lora(load_reward_base(config), LoraConfig(r=8, alpha=16), adapter=str(tmp_path / "sft"))
    copied, saved = get_peft_model_state_dict(reward), get_peft_model_state_dict(sft)
    for key, value in saved.items():
        assert torch.equal(copied[key], value), key
    assert any(HEAD in key for key in copied)  # and the new head is trained (saved) beside the trunk
