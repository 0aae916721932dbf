"""QLoRA: a 4/8-bit base (bitsandbytes, on CPU here) with a LoRA adapter, trained from a recipe.

The base is prepared the way the trainer prepares it: frozen, unquantized weights left in the compute dtype,
LM head unquantized, input gradients on, non-reentrant checkpointing. Training must move held-out preference
accuracy, and the saved adapter must reproduce its log-probs on a freshly quantized base.
"""

from __future__ import annotations

import json

import pytest
import torch

from dpo.cli import main
from dpo.data import collate_paired, prepare_data
from dpo.model import (
    LogprobSettings,
    add_lora,
    is_quantized,
    load_base_model,
    load_tokenizer,
    sequence_logprobs,
)
from dpo.recipe import LoraConfig, ModelConfig, TrainConfig, load_recipe
from dpo.train.loop import build_optimizer
from tests.helpers import build_tiny_model, qlora_recipe

pytest.importorskip("bitsandbytes")


def mean_eval_logps(model, recipe, settings=LogprobSettings()) -> tuple[float, float]:
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, unpaired=False, seed=recipe.train.seed, log=lambda _: None)
    batch = collate_paired([data.eval[i] for i in range(len(data.eval))], pad_token_id=tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        sums, _ = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"], settings)
    b = batch["index"].shape[0]
    return sums[:b].mean().item(), sums[b:].mean().item()


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_4bit_recipe_trains_improves_held_out_accuracy_and_the_adapter_reloads(tmp_path, optimizer):
    from peft import PeftModel

    recipe_path = qlora_recipe(tmp_path, optimizer=optimizer)
    main([str(recipe_path)])
    final = json.loads((tmp_path / "out" / "final_metrics.json").read_text())
    assert final["eval_before"]["rewards/accuracies"] == 0.5  # policy == reference: every pair ties
    assert final["eval_after"]["rewards/accuracies"] >= 0.9
    assert final["eval_after"]["rewards/margins"] > 0

    # The adapter on a freshly quantized base gives the log-probs the run measured after training.
    recipe = load_recipe(recipe_path)
    base = load_base_model(recipe.model, device="cpu")
    assert is_quantized(base)
    base_chosen, _ = mean_eval_logps(base, recipe)
    reloaded = PeftModel.from_pretrained(load_base_model(recipe.model, device="cpu"), tmp_path / "out" / "adapter")
    chosen, rejected = mean_eval_logps(reloaded, recipe)
    assert chosen == pytest.approx(final["eval_after"]["logps/chosen"], abs=1e-4)
    assert rejected == pytest.approx(final["eval_after"]["logps/rejected"], abs=1e-4)
    assert chosen - base_chosen > 0.1  # training raised the chosen side: the adapter is not a no-op


def test_kbit_preparation_keeps_the_head_in_compute_dtype_and_trains_only_the_adapter(tmp_path):
    from bitsandbytes.nn import Linear4bit

    build_tiny_model(tmp_path)
    config = ModelConfig(path=str(tmp_path), quantization={"bits": 4, "compute_dtype": "bfloat16"},
                         gradient_checkpointing=True)
    assert config.dtype == "bfloat16"  # follows compute_dtype
    policy = add_lora(load_base_model(config, device="cpu"), LoraConfig(r=4), gradient_checkpointing=True)
    lm = policy.get_base_model()
    linears = [m for name, m in lm.named_modules() if name.endswith(("q_proj", "down_proj")) and hasattr(m, "base_layer")]
    assert linears and all(isinstance(m.base_layer, Linear4bit) for m in linears)
    head = lm.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.bfloat16 and not head.weight.requires_grad
    assert lm.get_input_embeddings().weight.dtype == torch.bfloat16  # not upcast to float32
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in policy.parameters() if p.requires_grad)
    # Non-reentrant checkpointing on every decoder layer, and the embedding output requires grad.
    assert getattr(lm, "is_activation_checkpointing", None) or lm.is_gradient_checkpointing
    assert lm.model.layers[0]._gradient_checkpointing_func.keywords.get("use_reentrant") is False
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    assert lm.get_input_embeddings()(ids).requires_grad

    # A step reaches every adapter matrix through the 4-bit base (lora_B starts at zero, so lora_A's first
    # gradient is zero; two steps make both non-zero).
    policy.train()
    labels = ids.clone()
    labels[:, :2] = -100
    optimizer = build_optimizer([p for p in policy.parameters() if p.requires_grad],
                                TrainConfig(optimizer="adamw", lr=0.01))
    for _ in range(2):
        sums, _ = sequence_logprobs(policy, ids, torch.ones_like(ids), labels)
        (-sums.sum()).backward()
        optimizer.step()
        grads = {name: p.grad for name, p in policy.named_parameters() if p.requires_grad}
        optimizer.zero_grad()
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_an_eval_pass_does_not_stop_gradients_through_the_4bit_base(tmp_path):
    """bitsandbytes repacks 4-bit weights for CPU inference on the first no-grad eval forward (on CPUs with
    AVX512-BF16), into a layout with no backward; the loader turns that off."""
    build_tiny_model(tmp_path, hidden_size=64)
    config = ModelConfig(path=str(tmp_path), quantization={"bits": 4, "compute_dtype": "float32"})
    policy = add_lora(load_base_model(config, device="cpu"), LoraConfig(r=4))
    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    labels = ids.clone()
    labels[:, :2] = -100
    policy.eval()
    with torch.no_grad():
        reference = sequence_logprobs(policy, ids, torch.ones_like(ids), labels)[0]
    policy.train()
    logps = sequence_logprobs(policy, ids, torch.ones_like(ids), labels)[0]
    assert torch.equal(logps.detach(), reference)  # the same matmul with and without gradients
    logps.sum().backward()
    first_layer_adapter = policy.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert first_layer_adapter.grad.abs().sum() > 0  # gradient reached layer 0 through every 4-bit matmul


def test_8bit_base_trains_a_step(tmp_path):
    from bitsandbytes.nn import Linear8bitLt

    build_tiny_model(tmp_path)
    config = ModelConfig(path=str(tmp_path), quantization={"bits": 8, "compute_dtype": "float32"})
    policy = add_lora(load_base_model(config, device="cpu"), LoraConfig(r=4))
    assert isinstance(policy.get_base_model().model.layers[0].mlp.up_proj.base_layer, Linear8bitLt)
    ids = torch.tensor([[1, 40, 41, 42, 43, 44], [1, 50, 51, 52, 53, 54]])
    labels = ids.clone()
    labels[:, :3] = -100
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, TrainConfig(optimizer="adamw", lr=0.05))
    before = sequence_logprobs(policy, ids, torch.ones_like(ids), labels)[0].sum().item()
    for _ in range(3):
        (-sequence_logprobs(policy, ids, torch.ones_like(ids), labels)[0].sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert sequence_logprobs(policy, ids, torch.ones_like(ids), labels)[0].sum().item() > before


def test_a_quantized_head_is_refused(tmp_path, monkeypatch):
    """An empty skip list lets transformers quantize the head too; the fused log-prob path cannot use it."""
    from transformers import BitsAndBytesConfig

    import dpo.model.load as model_module
    from dpo.model import ModelError

    build_tiny_model(tmp_path)
    config = ModelConfig(path=str(tmp_path), quantization={"bits": 4})
    assert torch.is_floating_point(load_base_model(config, device="cpu").get_output_embeddings().weight)
    monkeypatch.setattr(model_module, "quantization_config",
                        lambda *_: BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=[]))
    with pytest.raises(ModelError, match="LM head was quantized"):
        load_base_model(config, device="cpu")


def test_shardable_4bit_storage_holds_the_same_codes_and_computes_the_same_values(tmp_path):
    """Under FSDP the 4-bit codes are stored in compute-dtype tensors (so they flat-shard): the same bytes, so
    the same log-probs, bit for bit."""
    recipe = load_recipe(qlora_recipe(tmp_path))
    default = load_base_model(recipe.model, device="cpu")
    shardable = load_base_model(recipe.model, device="cpu", shardable=True)
    weight = shardable.model.layers[0].self_attn.q_proj.weight
    assert weight.dtype == torch.float32  # the compute dtype (uint8 by default)
    reference = default.model.layers[0].self_attn.q_proj.weight
    assert reference.dtype == torch.uint8
    assert torch.equal(weight.data.view(torch.uint8).reshape(-1), reference.data.reshape(-1))
    assert mean_eval_logps(shardable, recipe) == mean_eval_logps(default, recipe)
