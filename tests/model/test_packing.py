"""Packed, prefix-shared batches through the model: the padded path's log-probs and gradients (float64 and
float32, four architectures), no contamination between sides or pairs, and the capability check."""

from __future__ import annotations

import json

import pytest
import torch

from dpo.data import collate_packed_paired, collate_paired
from dpo.model import (
    LogprobSettings,
    ModelError,
    SequenceLogprobs,
    add_lora,
    final_logit_softcap,
    load_base_model,
    plan_packing,
    resolve_packing,
    trunk,
)
from dpo.model.packing import PackedAttention, packed_hidden_states, static_problem
from dpo.model.segment_attention import SEGMENT_SDPA
from dpo.recipe import LoraConfig, ModelConfig
from tests.helpers import build_tiny_model

ARCHS = {"llama": {}, "qwen2": {}, "mistral": {"sliding_window": 6}, "gemma2": {}}  # gemma2: window 16
# (prompt, chosen, rejected) lengths: odd, a one-token prompt, sides longer than the sliding windows.
LENGTHS = [(5, 9, 3), (1, 4, 11), (13, 2, 7), (8, 17, 5), (3, 3, 3)]
MAX_LENGTH = 64


def make_rows(vocab: int, lengths=LENGTHS, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    return [{"index": i, "prompt_ids": tokens(p), "chosen_ids": tokens(c), "rejected_ids": tokens(r)}
            for i, (p, c, r) in enumerate(lengths)]


def load(tmp_path, arch: str, **kwargs):
    return load_base_model(ModelConfig(path=str(build_tiny_model(tmp_path / arch, arch, **kwargs))))


def plan_of(model) -> PackedAttention:
    plan = plan_packing(model, MAX_LENGTH, "cpu")
    assert isinstance(plan, PackedAttention), plan
    return plan


@pytest.fixture(params=["dense", "segments"])
def attention_path(request, monkeypatch):
    """An sdpa model's packed batches through dense SDPA over the mask (what the cost model picks for these tiny
    models) or one segment at a time (what it picks for wide rows of a real model); eager models are unaffected."""
    import dpo.model.packing as packing

    monkeypatch.setattr(packing, "segments_pay", lambda *args: request.param == "segments")
    return request.param


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------ float64: the definition, both layouts


def float64_logits_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ model.get_output_embeddings().weight.T
    cap = final_logit_softcap(model)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def float64_alone(model, rows) -> torch.Tensor:
    """Each sequence run on its own (a padded batch of one, with no padding): the padded path's values.

    Not a padded batch of several: in float64, transformers' eager attention casts the additive mask to float32
    for its softmax, where the float64 minimum becomes -inf, so a padding query with every key masked (a
    Gemma-2 sliding-window layer) gives NaN, which the next layer spreads.
    """
    sums = []
    for side in ("chosen_ids", "rejected_ids"):
        for row in rows:
            batch = collate_paired([{**row, "rejected_ids": row[side], "chosen_ids": row[side]}], 0)
            hidden = trunk(model)(input_ids=batch["input_ids"][:1]).last_hidden_state[0, :-1]
            targets = batch["labels"][0, 1:]
            sums.append(float64_logits_logprobs(model, hidden[targets != -100], targets[targets != -100]).sum())
    return torch.stack(sums)


def float64_packed(model, batch, plan) -> torch.Tensor:
    hidden = packed_hidden_states(model, batch, plan)
    flat = hidden.reshape(-1, hidden.shape[-1])[batch["target_sources"]]
    per_token = float64_logits_logprobs(model, flat, batch["target_ids"])
    count = batch["sequence_lengths"].shape[0]
    return torch.zeros(count, dtype=torch.float64).index_add(0, batch["target_sequences"], per_token)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_float64_log_probs_and_gradients_equal_the_padded_path(tmp_path, arch, attention_path):
    model = load(tmp_path, arch, **ARCHS[arch]).double()
    plan = plan_of(model)
    rows = make_rows(model.config.vocab_size)
    packed = collate_packed_paired(rows, pad_token_id=0, row_tokens=24)
    assert packed["input_ids"].shape[0] >= 3  # several rows, several pairs in a row
    weights = torch.randn(2 * len(rows), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = []
    for compute in (lambda: float64_alone(model, rows), lambda: float64_packed(model, packed, plan)):
        model.zero_grad()
        logps = compute()
        (weights * logps).sum().backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        results.append((logps.detach(), grads))
    (padded, padded_grads), (ours, our_grads) = results
    assert relative_error(ours, padded) < 1e-6
    assert our_grads.numel() == padded_grads.numel() and relative_error(our_grads, padded_grads) < 1e-6


# ------------------------------------------------------------------ float32: the step module with LoRA


@pytest.mark.parametrize("arch", list(ARCHS))
def test_float32_step_module_log_probs_and_adapter_gradients_equal_the_padded_path(tmp_path, arch, attention_path):
    policy = add_lora(load(tmp_path, arch, **ARCHS[arch]), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:  # move the adapter off its zero start so its gradients depend on the inputs
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    plan = plan_of(policy)
    rows = make_rows(policy.config.vocab_size)
    settings = LogprobSettings(impl="torch", chunk_size=16)
    weights = torch.randn(2 * len(rows), generator=torch.Generator().manual_seed(0))
    results = []
    for module, batch in ((SequenceLogprobs(policy, settings), collate_paired(rows, 0)),
                          (SequenceLogprobs(policy, settings, plan), collate_packed_paired(rows, 0, row_tokens=24))):
        policy.zero_grad()
        logps, counts = module(batch)
        (weights * logps).sum().backward()
        grads = torch.cat([p.grad.reshape(-1) for n, p in policy.named_parameters() if "lora_" in n])
        results.append((logps.detach(), counts, grads))
    (padded, padded_counts, padded_grads), (ours, our_counts, our_grads) = results
    assert torch.equal(our_counts, padded_counts)
    assert relative_error(ours, padded) < 1e-4
    assert relative_error(our_grads, padded_grads) < 1e-4


# ------------------------------------------------------------------ contamination


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # a boolean mask (sdpa) and an additive one (eager)
def test_a_side_never_sees_the_other_and_a_pair_never_sees_its_row_neighbours(tmp_path, arch, attention_path):
    model = load(tmp_path, arch).eval()
    step = SequenceLogprobs(model, LogprobSettings(impl="torch"), plan_of(model))
    rows = make_rows(model.config.vocab_size, lengths=[(4, 6, 5), (3, 5, 7), (6, 2, 4)])
    b = len(rows)
    vocab = model.config.vocab_size

    def logps(changed_rows):
        batch = collate_packed_paired(changed_rows, 0, row_tokens=10_000)
        assert batch["input_ids"].shape[0] == 1  # every pair in one row
        with torch.no_grad():
            return step(batch)[0]

    base = logps(rows)
    other = [{**r} for r in rows]
    other[1]["rejected_ids"] = [(t + 7) % vocab for t in rows[1]["rejected_ids"]]
    changed = logps(other)
    assert torch.equal(changed[1], base[1])  # chosen of pair 1: bit-identical
    assert not torch.equal(changed[b + 1], base[b + 1])
    other = [{**r} for r in rows]
    other[1]["chosen_ids"] = [(t + 7) % vocab for t in rows[1]["chosen_ids"]]
    changed = logps(other)
    assert torch.equal(changed[b + 1], base[b + 1]) and not torch.equal(changed[1], base[1])
    other = [{**r} for r in rows]
    other[0]["prompt_ids"] = [(t + 7) % vocab for t in rows[0]["prompt_ids"]]
    changed = logps(other)
    untouched = [i for i in range(2 * b) if i not in (0, b)]
    assert torch.equal(changed[untouched], base[untouched])  # the other pairs of the row
    assert not torch.equal(changed[0], base[0]) and not torch.equal(changed[b], base[b])


# ------------------------------------------------------------------ capability check and fallback


def remote_code_model(tmp_path):
    """A model folder whose class comes from its own modelling file (loaded with trust_remote_code)."""
    folder = build_tiny_model(tmp_path / "remote", "llama")
    (folder / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\n\nclass CustomForCausalLM(LlamaForCausalLM):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_models_fall_back_with_the_reason_and_on_is_an_error(tmp_path):
    folder = remote_code_model(tmp_path)
    model = load_base_model(ModelConfig(path=str(folder), trust_remote_code=True))
    assert not type(model).__module__.startswith("transformers.")
    reason = plan_packing(model, MAX_LENGTH, "cpu")
    assert isinstance(reason, str) and "trust_remote_code" in reason
    lines = []
    assert resolve_packing("auto", model, MAX_LENGTH, "cpu", lines.append) is None
    assert len(lines) == 1 and "packing: off" in lines[0] and "trust_remote_code" in lines[0]
    with pytest.raises(ModelError, match="train.packing: on, but the policy cannot take packed batches"):
        resolve_packing("on", model, MAX_LENGTH, "cpu", lines.append)
    assert resolve_packing("off", model, MAX_LENGTH, "cpu", lines.append) is None and len(lines) == 1
    # A module without packing re-lays packed batches as padded ones: same values.
    rows = make_rows(model.config.vocab_size)
    step = SequenceLogprobs(model.eval(), LogprobSettings(impl="torch"))
    with torch.no_grad():
        assert torch.equal(step(collate_packed_paired(rows, 0))[0], step(collate_paired(rows, 0))[0])


def test_the_probe_catches_a_mask_the_attention_does_not_honour(tmp_path, monkeypatch):
    import dpo.model.packing as packing

    model = load(tmp_path, "llama")
    plan_of(model)

    def causal_only(self, batch, dtype):  # what a model ignoring segments and branches would compute
        rows, width = batch["input_ids"].shape
        return torch.ones(width, width, dtype=torch.bool).tril().expand(rows, 1, width, width)

    monkeypatch.setattr(PackedAttention, "masks", causal_only)
    monkeypatch.setattr(packing, "use_segment_attention", lambda model, plan: plan)  # the dense mask alone
    reason = plan_packing(model, MAX_LENGTH, "cpu")
    assert isinstance(reason, str) and "probe pair" in reason


def test_segment_attention_that_fails_its_probe_falls_back_to_the_dense_mask(tmp_path, monkeypatch):
    import dpo.model.packing as packing

    model = load(tmp_path, "llama")
    assert plan_of(model).implementation == SEGMENT_SDPA
    assert plan_of(load(tmp_path, "gemma2")).implementation == "eager"  # softcap: eager, dense additive mask

    real_spans = packing.segment_spans

    def second_side_without_prompt(segment_ids, branch_ids):  # spans that hide the prompt from the second side
        rows = real_spans(segment_ids, branch_ids)
        return tuple(tuple((start, start, sides) for start, _, sides in row) for row in rows)

    monkeypatch.setattr(packing, "segment_spans", second_side_without_prompt)
    lines = []
    plan = plan_packing(model, MAX_LENGTH, "cpu", lines.append)
    assert isinstance(plan, PackedAttention) and plan.implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"
    assert len(lines) == 1 and "failed its probe" in lines[0] and "dense boolean mask" in lines[0]


def test_sliding_windows_and_attention_implementations(tmp_path, monkeypatch):
    import dpo.model.packing as packing

    mistral = load(tmp_path, "mistral", sliding_window=6)
    assert static_problem(mistral, MAX_LENGTH).windows == (("sliding_attention", 6),)
    assert static_problem(mistral, 6).windows == (("sliding_attention", None),)  # a window that never cuts
    gemma = load(tmp_path, "gemma2")
    plan = static_problem(gemma, MAX_LENGTH)
    assert plan.per_layer_type and dict(plan.windows) == {"full_attention": None, "sliding_attention": 16}
    assert not static_problem(gemma, 16).per_layer_type
    monkeypatch.setattr(packing, "_MASK_MAPPING", packing.re.compile("no model says this"))
    assert "mixes full and sliding-window layers" in static_problem(gemma, MAX_LENGTH)
    monkeypatch.undo()
    llama = load(tmp_path, "llama")
    llama.config._attn_implementation = "flash_attention_2"
    assert "takes no 4-D mask" in static_problem(llama, MAX_LENGTH)
    gemma.config._attn_implementation = "sdpa"
    assert "softcap" in static_problem(gemma, MAX_LENGTH)
    llama.config._attn_implementation = "sdpa"
    llama.config.layer_types = ["chunked_attention"] * llama.config.num_hidden_layers
    assert "chunked_attention" in static_problem(llama, MAX_LENGTH)


@pytest.mark.slow
def test_flex_attention_block_mask_gives_the_padded_values(tmp_path):
    """The CUDA path's mask (a FlexAttention BlockMask from the same mask function), forward only: FlexAttention
    has no backward on CPU. Compiles flex_attention for the CPU (about half a minute)."""
    model = load(tmp_path, "mistral", sliding_window=6).eval()
    plan = plan_of(model)
    rows = make_rows(model.config.vocab_size, lengths=LENGTHS[:3])
    settings = LogprobSettings(impl="torch")
    with torch.no_grad():
        padded = SequenceLogprobs(model, settings, plan)(collate_paired(rows, 0))[0]
        model.set_attn_implementation("flex_attention")
        flex = PackedAttention("flex_attention", plan.windows, plan.per_layer_type)
        ours = SequenceLogprobs(model, settings, flex)(collate_packed_paired(rows, 0, row_tokens=10_000))[0]
    assert relative_error(ours, padded) < 1e-4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_cuda_flex_attention_log_probs_and_gradients_equal_the_padded_path(tmp_path, arch):
    """On CUDA an sdpa model takes packed batches through FlexAttention (forward and backward). Triton's float32
    dots run in TF32, hence a looser bound than on the CPU; a wrong mask moves values by O(1)."""
    kwargs = {"sliding_window": 6} if arch == "mistral" else {}
    config = ModelConfig(path=str(build_tiny_model(tmp_path / arch, arch, **kwargs)))
    rows = make_rows(64, lengths=LENGTHS * 3)
    settings = LogprobSettings(impl="torch")
    weights = torch.randn(2 * len(rows), generator=torch.Generator().manual_seed(0)).cuda()
    results = []
    for packed in (False, True):
        policy = add_lora(load_base_model(config, device="cuda"), LoraConfig(r=4, alpha=8))
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
        plan = plan_packing(policy, MAX_LENGTH, "cuda") if packed else None
        if packed:
            assert isinstance(plan, PackedAttention) and plan.implementation == "flex_attention", plan
        collate = collate_packed_paired(rows, 0, row_tokens=10_000) if packed else collate_paired(rows, 0)
        batch = {k: v.cuda() for k, v in collate.items()}
        logps, _ = SequenceLogprobs(policy, settings, plan)(batch)
        (weights * logps).sum().backward()
        grads = torch.cat([p.grad.reshape(-1) for n, p in policy.named_parameters() if "lora_" in n])
        results.append((logps.detach().cpu(), grads.cpu()))
    (padded, padded_grads), (ours, our_grads) = results
    assert relative_error(ours, padded) < 1e-2
    assert relative_error(our_grads, padded_grads) < 1e-2
