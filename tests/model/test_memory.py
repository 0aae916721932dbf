"""Memory estimator: hand-computed arithmetic for a small config, and each term against the real thing on CPU
(the bytes of a loaded 4/8-bit model, the optimizer's state tensors, the tensors autograd saves)."""

from __future__ import annotations

import pytest
import torch

from dpo.model.memory import (
    LINEAR_NAMES,
    Batch,
    GiB,
    ModelShape,
    TrainingPlan,
    estimate_engine,
    estimate_no_grad_pass,
    estimate_step,
    longest_batch,
    memory_report,
    optimizer_state_bytes,
    quantized_linear_bytes,
    weight_bytes,
)
from dpo.recipe import recipe_from_dict

# A config small enough to follow by hand.
SHAPE = ModelShape(vocab=100, hidden=16, layers=2, heads=4, kv_heads=2, head_dim=4, intermediate=32)
PLAN = TrainingPlan(weight_bits=4, double_quant=True, compute_dtype="bfloat16", lora_r=2, lora_targets=LINEAR_NAMES,
                    lora_dropout=False, optimizer="adamw", checkpointing=False, logprob_impl="torch",
                    logprob_chunk=8, input_grads=True)
BATCH = Batch(rows=2, tokens=10, completion_tokens=8, padded=False)


def test_quantized_linear_bytes_by_hand():
    # 4-bit, double quant, [16, 16]: 256 values -> 128 bytes of codes, 4 blocks of 64 -> 4 one-byte scales,
    # ceil(4 / 256) = 1 float32 second-level scale, a 256-entry float32 code book and a 16-entry one.
    assert quantized_linear_bytes(16, 16, 4, True) == 128 + 4 + 4 + 1024 + 64
    # Without double quant the 4 scales are float32.
    assert quantized_linear_bytes(16, 16, 4, False) == 128 + 16 + 64
    # LLM.int8: one byte a value and a float32 scale per output row.
    assert quantized_linear_bytes(16, 16, 8, False) == 256 + 4 * 16
    # An odd count rounds the codes up: 3 x 5 = 15 values -> 8 bytes, 1 block.
    assert quantized_linear_bytes(3, 5, 4, False) == 8 + 4 + 64


def test_weights_lora_and_optimizer_by_hand():
    # Per layer: q [16->16] 256 values, k and v [16->8] 128, o 256, gate and up [16->32] 512, down 512.
    q = 128 + 4 + 4 + 1088
    kv = 64 + 2 + 4 + 1088
    mlp = 256 + 8 + 4 + 1088
    quantized, other = weight_bytes(SHAPE, PLAN)
    assert quantized == 2 * (2 * q + 2 * kv + 3 * mlp) == 17664
    # Untied embedding and head (2 x 100 x 16) plus 2 L + 1 = 5 norms of 16, two bytes each.
    assert other == (2 * 100 * 16 + 5 * 16) * 2 == 6560
    estimate = estimate_step(SHAPE, PLAN, BATCH)
    # LoRA r=2: A is [2, in], B is [out, 2]. q 32+32, k 32+16, v 32+16, o 32+32, gate 32+64, up 32+64,
    # down 64+32 = 512 values a layer, 1024 in all, float32.
    assert estimate.lora_params == estimate.lora_grads == 1024 * 4
    assert estimate.optimizer_states == 1024 * 8
    # 8-bit AdamW: tensors under 4096 values keep float32 moments.
    assert optimizer_state_bytes(SHAPE, PLAN.__class__(**{**PLAN.__dict__, "optimizer": "adamw_8bit"})) == 1024 * 8
    # A rank large enough for 8-bit moments: r=256 makes q's A [256, 16] = 4096 values: 2 bytes each and two
    # float32 scales per 256 values; the optimizer's two 256-entry float32 code books are shared.
    big = PLAN.__class__(**{**PLAN.__dict__, "optimizer": "adamw_8bit", "lora_r": 256, "lora_targets": ("q_proj",)})
    per_tensor = 2 * 4096 + 2 * 4 * 16
    assert optimizer_state_bytes(SHAPE, big) == 2 * 2 * per_tensor + 2 * 256 * 4  # A and B of q, two layers


def test_activations_and_peak_by_hand():
    estimate = estimate_step(SHAPE, PLAN, BATCH)
    # Per position and layer, bf16 (a = 2):
    #   adapter inputs in float32: 4 x (6 x 16 + 32)    = 512
    #   adapter A outputs: 4 x r x 7                    = 56
    #   two norms: 2 x (4 x 16 + 4)                      = 136
    #   attention: 2 x (2 x 16 + 2 x 8) + 4 x 4 heads    = 112
    #   MLP: 3 x 2 x 32                                  = 192   -> 1008, times 2 rows x 10 tokens
    assert estimate.layer_activations == 1008 * 20 == 20160
    # Outside the layers: final norm 68 x 20 = 1360; kernel (float32 d logp / d hidden) 4 x 8 x 16 + 32 x 8 =
    # 768; rotary 2 x 10 x 4 x 2 = 160; label mask 2 x 9 = 18.
    outside = 1360 + 768 + 160 + 18
    assert estimate.saved_activations == 2 * 20160 + outside == 42626
    # Log-prob chunk of 8 tokens: 8 x 100 x 16 bytes, plus the gathered [8, 16] bf16 hidden states.
    assert estimate.logprob_workspace == 8 * 100 * 16 + 2 * 8 * 16 == 13056
    # Backward working set: (2 x 2 x 16 + (4 + 3 x 2) x 32) x 20 + one dequantized [32, 16] bf16 weight.
    assert estimate.backward_working_set == 384 * 20 + 512 * 2 == 8704
    persistent = 17664 + 6560 + 4096 + 8192
    assert estimate.forward_peak == persistent + 42626 + 13056 == 92194
    # The kernel's backward only scales what its forward kept; then the layers' backward.
    assert estimate.backward_peak == persistent + 4096 + 42626 + 8704 == 91938
    assert estimate.peak == 92194


def test_checkpointing_and_padding_by_hand():
    checkpointed = estimate_step(SHAPE, PLAN.__class__(**{**PLAN.__dict__, "checkpointing": True}), BATCH)
    # Each layer keeps only its bf16 input: 2 x 16 x 20 per layer; its activations come back one layer at a time.
    assert checkpointed.saved_activations == 2 * (2 * 16 * 20) + 2306
    assert checkpointed.recompute == 20160
    persistent = 17664 + 6560 + 4096 + 8192
    assert checkpointed.backward_peak == persistent + 4096 + 3586 + 20160 + 8704 == 73058
    assert checkpointed.peak == 73058
    padded = estimate_step(SHAPE, PLAN, Batch(rows=2, tokens=10, completion_tokens=8, padded=True))
    # Padding: keys and values expanded to 16 (+2 x 2 x 8 a position) and a bf16 [2, 1, 10, 10] mask a layer.
    assert padded.layer_activations == 20160 + 2 * 2 * 8 * 20 + 2 * 2 * 10 * 10


def test_no_grad_pass_by_hand():
    # Weights and adapter, one layer's live tensors 2 x (4 x 16 + 2 x 8 + 4 x 32) + 4 x 32 = 544 a position,
    # and a float32 [8, 100] logits chunk.
    assert estimate_no_grad_pass(SHAPE, PLAN, BATCH) == 17664 + 6560 + 4096 + 544 * 20 + 4 * 8 * 100


def test_engines_by_hand():
    """Per GPU: DDP adds its gradient buckets; ZeRO-2 splits the optimizer; FSDP2 splits weights, adapter,
    gradients and optimizer, and holds the head and two blocks in full; offloaded, only what is gathered."""
    step = estimate_step(SHAPE, PLAN, BATCH)  # persistent 36512, peak 92194 (test_activations_and_peak_by_hand)
    assert estimate_engine(SHAPE, PLAN, BATCH, "single", 4) == step
    ddp = estimate_engine(SHAPE, PLAN, BATCH, "ddp", 2)
    assert ddp.engine_buffers == 4096 and ddp.peak == step.peak + 4096
    zero2 = estimate_engine(SHAPE, PLAN, BATCH, "zero2", 2)
    assert zero2.optimizer_states == 4096 and zero2.engine_buffers == 2048 + 2048
    assert zero2.peak == step.peak - 4096 + 4096
    fsdp = estimate_engine(SHAPE, PLAN, BATCH, "fsdp2", 2)
    # The head [100, 16] in bf16, and two blocks of (quantized + adapter) / 2 layers = (17664 + 4096) / 2.
    assert fsdp.gathered_weights == 100 * 16 * 2 + 2 * 10880 == 24960
    assert (fsdp.quantized_weights, fsdp.other_weights, fsdp.lora_params, fsdp.optimizer_states) == (
        8832, 3280, 2048, 4096)
    assert fsdp.lora_grads == 2048 + 2048  # its share, and one block's in full before reduce-scatter
    persistent = 8832 + 3280 + 2048 + 4096 + 24960
    assert fsdp.backward_peak == persistent + 4096 + 42626 + 8704
    assert estimate_engine(SHAPE, PLAN, BATCH, "zero3", 2).peak == fsdp.peak + 2048
    offload = estimate_engine(SHAPE, PLAN, BATCH, "fsdp2-offload", 2)
    # Its peak is now the end of the forward: the kept activations and the log-prob chunk.
    assert offload.persistent == 24960 and offload.peak == 24960 + 42626 + 13056
    # More processes, smaller shares; the activations are each process's own batch.
    assert estimate_engine(SHAPE, PLAN, BATCH, "fsdp2", 4).peak < fsdp.peak
    assert estimate_no_grad_pass(SHAPE, PLAN, BATCH, "fsdp2", 2) == (
        estimate_no_grad_pass(SHAPE, PLAN, BATCH) - (17664 + 6560 + 4096) + (8832 + 3280 + 2048 + 24960))
    with pytest.raises(ValueError, match="one of single, ddp"):
        estimate_engine(SHAPE, PLAN, BATCH, "fsdp1", 2)


def test_llama3_8b_qlora_is_in_the_expected_range():
    shape = ModelShape(vocab=128256, hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, intermediate=14336)
    plan = PLAN.__class__(**{**PLAN.__dict__, "lora_r": 16, "checkpointing": True, "logprob_impl": "triton",
                              "logprob_chunk": None})
    estimate = estimate_step(shape, plan, Batch(rows=2, tokens=2048, completion_tokens=2048))
    # 6.98e9 linear weights at ~0.516 bytes (NF4 + double-quantized scales) is ~3.35 GiB; the bf16 embedding
    # and head 2 x 128256 x 4096 x 2 bytes ~ 1.96 GiB.
    assert 3.3 * GiB < estimate.quantized_weights < 3.45 * GiB
    assert abs(estimate.other_weights - 2 * 128256 * 4096 * 2) < 1e6
    assert 8 * GiB < estimate.peak < 16 * GiB


# ------------------------------------------------------------------------------ against the real thing


def _llama(directory, hidden=64, intermediate=128, vocab=120):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return config


def _storage_bytes(tensors) -> int:
    storages = {}
    for tensor in tensors:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_bytes_match_a_loaded_quantized_model(tmp_path, bits):
    from dpo.model import load_base_model
    from dpo.recipe import ModelConfig

    config = _llama(tmp_path)
    model = load_base_model(ModelConfig(path=str(tmp_path), quantization={"bits": bits}), device="cpu")
    tensors = []
    for param in model.parameters():
        tensors.append(param)
        state = getattr(param, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
        if getattr(param, "SCB", None) is not None:
            tensors.append(param.SCB)
    plan = PLAN.__class__(**{**PLAN.__dict__, "weight_bits": bits})
    assert sum(weight_bytes(ModelShape.from_config(config), plan)) == _storage_bytes(tensors)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_optimizer_state_bytes_match_the_optimizer(optimizer):
    from dpo.recipe import TrainConfig
    from dpo.train.loop import build_optimizer

    # Adapter tensors of a layer with hidden 512, intermediate 1024, r=8: some over 4096 values, some under.
    shape = ModelShape(vocab=10, hidden=512, layers=1, heads=4, kv_heads=2, head_dim=128, intermediate=1024)
    plan = PLAN.__class__(**{**PLAN.__dict__, "optimizer": optimizer, "lora_r": 8})
    params = []
    for n_in, n_out in shape.linears().values():
        params += [torch.nn.Parameter(torch.randn(8, n_in)), torch.nn.Parameter(torch.randn(n_out, 8))]
    opt = build_optimizer(params, TrainConfig(optimizer=optimizer))
    sum(p.square().sum() for p in params).backward()
    opt.step()
    states = [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0]
    assert optimizer_state_bytes(shape, plan) == _storage_bytes(states)


def _saved_tensor_bytes(model, input_ids, attention_mask, labels) -> tuple[int, int]:
    """Bytes autograd keeps between the forward and backward (parameters excluded), and the labelled tokens."""
    from dpo.model import LogprobSettings, sequence_logprobs

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in parameters:
            kept[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, counts = sequence_logprobs(model, input_ids, attention_mask, labels, LogprobSettings(impl="torch"))
    return sum(kept.values()), int(counts.sum())


@pytest.mark.parametrize(
    ("bits", "dtype", "checkpointing", "padded"),
    [(4, "bfloat16", False, False), (None, "bfloat16", False, False), (4, "float32", False, False),
     (None, "float32", False, False), (4, "bfloat16", False, True), (4, "bfloat16", True, False),
     (8, "bfloat16", False, False)],
)
def test_saved_activations_match_autograd(tmp_path, bits, dtype, checkpointing, padded):
    """Every saved tensor is accounted for, to the byte (checkpointing hides the rotary tables from the hook)."""
    from dpo.model import add_lora, load_base_model
    from dpo.recipe import LoraConfig, ModelConfig

    config = _llama(tmp_path)
    quantization = {"bits": bits, "compute_dtype": dtype} if bits else None
    model_config = ModelConfig(path=str(tmp_path), dtype=dtype, quantization=quantization,
                               gradient_checkpointing=checkpointing, attn_implementation="sdpa")
    model = add_lora(load_base_model(model_config, device="cpu"), LoraConfig(r=4), checkpointing)
    model.train()
    rows, tokens = 2, 40
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, config.vocab_size, (rows, tokens), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :15] = -100
    if padded:
        attention_mask[1, -6:] = 0
        labels[1, -6:] = -100
    measured, completion_tokens = _saved_tensor_bytes(model, input_ids, attention_mask, labels)
    plan = TrainingPlan(weight_bits=bits, double_quant=True, compute_dtype=dtype, lora_r=4, lora_targets=LINEAR_NAMES,
                        lora_dropout=False, optimizer="adamw", checkpointing=checkpointing, logprob_impl="torch",
                        logprob_chunk=None, input_grads=bits is not None or checkpointing)
    shape = ModelShape.from_config(config)
    estimate = estimate_step(shape, plan, Batch(rows, tokens, completion_tokens, padded))
    hidden_by_checkpoint = 2 * tokens * shape.head_dim * plan.compute_bytes if checkpointing else 0
    assert estimate.saved_activations - hidden_by_checkpoint == measured


# ------------------------------------------------------------------------------------- for a recipe


def test_longest_batch_pairs_the_longest_examples():
    rows = [
        {"prompt_ids": [1] * 5, "chosen_ids": [2] * 3, "rejected_ids": [2] * 7},  # 12 tokens
        {"prompt_ids": [1] * 2, "chosen_ids": [2] * 2, "rejected_ids": [2] * 2},  # 4
        {"prompt_ids": [1] * 6, "chosen_ids": [2] * 4, "rejected_ids": [2] * 4},  # 10
    ]
    batch = longest_batch(rows, 2)
    # Examples 0 and 2: rows 5+3, 6+4, 5+7, 6+4 -> padded to 12; completions 3+7+4+4.
    assert batch == Batch(rows=4, tokens=12, completion_tokens=18, padded=True)
    assert longest_batch(rows[1:2], 8) == Batch(rows=2, tokens=4, completion_tokens=4, padded=False)


def _recipe(tmp_path, **model):
    if not (tmp_path / "model" / "config.json").exists():
        _llama(tmp_path / "model")
    tree = {"model": {"path": str(tmp_path / "model"), "gradient_checkpointing": True,
                      "quantization": {"bits": 4}, **model},
            "data": {"train": "unused.jsonl"}, "train": {"batch_size": 1}, "reference": {"batch_size": 1},
            "output": {"dir": str(tmp_path / "out")}}
    return recipe_from_dict(tree)


def test_memory_report_warns_over_the_budget(tmp_path):
    rows = [{"prompt_ids": [1] * 20, "chosen_ids": [2] * 10, "rejected_ids": [2] * 12}]
    text, fits = memory_report(_recipe(tmp_path, max_memory_gb=1.0), rows, device_bytes=None)
    assert fits and "fits:" in text and "(model.max_memory_gb)" in text
    assert "estimated peak" in text and "quantized weights" in text and "reference / eval pass" in text
    # 1e-4 GiB is 107 kB, less than the weights alone.
    text, fits = memory_report(_recipe(tmp_path, max_memory_gb=1e-4), rows, device_bytes=None)
    assert not fits and "warning: the estimated peak" in text and "exceeds" in text
    # A detected device is the budget when the recipe gives none.
    text, fits = memory_report(_recipe(tmp_path), rows, device_bytes=10_000)
    assert not fits and "(the detected device)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a CUDA device")
def test_memory_report_without_device_or_budget_says_how_to_check(tmp_path):
    rows = [{"prompt_ids": [1] * 20, "chosen_ids": [2] * 10, "rejected_ids": [2] * 12}]
    text, fits = memory_report(_recipe(tmp_path), rows)
    assert fits and "set model.max_memory_gb" in text


def test_recipe_plan_reads_the_recipe(tmp_path):
    import yaml

    recipe = _recipe(tmp_path)
    plan = TrainingPlan.from_recipe(recipe, device_type="cpu")
    assert plan.weight_bits == 4 and plan.double_quant and plan.compute_dtype == "bfloat16"
    assert plan.checkpointing and plan.input_grads and plan.logprob_impl == "torch"
    assert plan.lora_targets == LINEAR_NAMES and plan.lora_r == 16
    tree = yaml.safe_load(recipe.to_yaml())
    tree["lora"]["target_modules"] = ["q_proj", "v_proj"]
    assert TrainingPlan.from_recipe(recipe_from_dict(tree), "cpu").lora_targets == ("q_proj", "v_proj")


def test_dry_run_prints_the_memory_plan_and_warns(tmp_path, capsys):
    from dpo.cli import main
    from tests.helpers import build_tiny_model, write_pairs, write_recipe

    model = build_tiny_model(tmp_path / "model")
    train, eval_ = write_pairs(tmp_path / "data", train=16, eval=8)
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "model": {"path": str(model), "quantization": {"bits": 4}, "gradient_checkpointing": True},
        "data": {"train": str(train), "eval": str(eval_), "max_length": 64, "max_prompt_length": 48},
        "train": {"batch_size": 4},
        "output": {"dir": str(tmp_path / "out")},
    })
    main([str(recipe), "--dry-run", "--set", "model.max_memory_gb=0.0001"])
    out = capsys.readouterr().out
    assert "# memory (estimated peak on a CUDA device, 4-bit base, LoRA r=16)" in out
    assert "batch of 8 rows" in out  # 4 pairs, two rows each
    assert "warning: the estimated peak" in out and "(model.max_memory_gb)" in out
    assert not (tmp_path / "out").exists()

    # The plan per GPU of a sharded run, and the advice that fits it.
    main([str(recipe), "--dry-run", "--set", "model.max_memory_gb=0.0001", "--set", "reference.batch_size=1",
          "--engine", "fsdp2", "--processes", "2"])
    out = capsys.readouterr().out
    assert "# memory (estimated peak per GPU, FSDP2 over 2 GPUs, 4-bit base, LoRA r=16)" in out
    assert "gathered in full (head, 2 blocks)" in out and "more GPUs (--processes 4)" in out
    assert "adamw_8bit" not in out.split("# memory")[1]  # refused under FSDP: not advised
    # Outside a dry run the launch decides the engine.
    with pytest.raises(SystemExit):
        main([str(recipe), "--processes", "2"])
    assert "only shape the --dry-run memory plan" in capsys.readouterr().err
