"""Tests for dpo.kernels.triton_logprobs: the fused Triton path of ``token_logprobs``.

Without a GPU the kernels run on CPU tensors under the Triton interpreter. ``TRITON_INTERPRET=1`` has
to be in the environment before ``triton`` itself is imported (its own ``tl.max``/``tl.sum`` are
decorated then) and while the interpreter runs, and another test module may well have imported triton
already. So on a CPU-only machine ``test_interpreter_suite`` runs this file again in a child pytest
process with ``TRITON_INTERPRET=1`` set from the start; the interpreter tests skip in the parent and run
in the child, and the parent process's environment is never changed. Running this file with
``TRITON_INTERPRET=1`` already set runs them directly. With a CUDA device the kernels are compiled, the
interpreter tests are skipped and the CUDA tests (bf16 and fp32 at real vocabulary sizes) run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

HAS_CUDA = torch.cuda.is_available()
REPO_ROOT = Path(__file__).resolve().parents[2]
IGNORE = -100


INTERPRETED = not HAS_CUDA and os.environ.get("TRITON_INTERPRET") == "1"

from dpo.kernels import token_logprobs  # noqa: E402
from dpo.kernels import triton_logprobs as tlp  # noqa: E402

interpreter_only = pytest.mark.skipif(
    not INTERPRETED, reason="runs under TRITON_INTERPRET=1 (in the child process of test_interpreter_suite)"
)
parent_only = pytest.mark.skipif(HAS_CUDA or INTERPRETED, reason="CPU-only machine, compiled kernels")
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@parent_only
def test_interpreter_suite():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not cuda"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary


def reference_with_grads(hidden, weight, targets, upstream, softcap=None):
    """float64 log_softmax + gather (0.0 where ignored) and the gradients of sum(upstream * values)."""
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    logits = hidden64 @ weight64.T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    picked = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    values = torch.where(targets != IGNORE, picked, torch.zeros_like(picked))
    grad_hidden, grad_weight = torch.autograd.grad(values, (hidden64, weight64), upstream.double())
    return values.detach(), grad_hidden, grad_weight


def rel_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def make_inputs(num_tokens, hidden_size, vocab_size, seed=0, every_masked=4):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen)
    weight = 2.0 * torch.randn(vocab_size, hidden_size, generator=gen) / math.sqrt(hidden_size)
    targets = torch.randint(vocab_size, (num_tokens,), generator=gen)
    if every_masked is not None:
        targets[::every_masked] = IGNORE
    return hidden, weight, targets, torch.randn(num_tokens, generator=gen)


def peaked_inputs(num_tokens, hidden_size, vocab_size, dtype, seed=0, device="cuda"):
    """LM-like logits (std about 3; 60% of tokens point toward their target), 1 position in 7 masked."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(vocab_size, hidden_size, device=device, generator=gen) / math.sqrt(hidden_size)
    hidden = 3.0 * torch.randn(num_tokens, hidden_size, device=device, generator=gen)
    targets = torch.randint(vocab_size, (num_tokens,), device=device, generator=gen)
    peaked = torch.rand(num_tokens, device=device, generator=gen) < 0.6
    boost = 8.0 + 12.0 * torch.rand(num_tokens, device=device, generator=gen)
    direction = weight[targets] / weight[targets].square().sum(dim=1, keepdim=True)
    hidden = hidden + (peaked * boost)[:, None] * direction
    targets[torch.rand(num_tokens, device=device, generator=gen) < 1 / 7] = IGNORE
    upstream = torch.randn(num_tokens, device=device, generator=gen)
    return hidden.to(dtype), weight.to(dtype), targets, upstream


# ------------------------------------------------------------------------- chunk-size arithmetic


def test_default_token_chunk_from_the_workspace():
    # 512 MiB / (128256 * (4 + 2) B) = 536870912 / 769536 = 697.6 -> 697 -> 640 (multiple of 64).
    assert tlp.default_token_chunk(128256, torch.bfloat16) == 640
    # fp32 head: the gradient reuses the logits block, 4 B a logit: 536870912 / 513024 = 1046.5 -> 1024.
    assert tlp.default_token_chunk(128256, torch.float32) == 1024
    # Tiny budgets are not rounded to 64: 512 MiB / (5e6 * 6 B) = 17.9 -> 17.
    assert tlp.default_token_chunk(5_000_000, torch.float16) == 17


def test_vocab_slice_matches_the_forward_workspace():
    # 640 tokens * 128256 columns over 14043 tokens = 5845.2 -> 5845 -> 5760 (multiple of 128).
    assert tlp.vocab_slice(640 * 128256, 14043, 128256) == 5760
    assert tlp.vocab_slice(10**9, 10, 301) == 301  # never more than V
    assert tlp.vocab_slice(301, 10, 301) == 30  # no rounding below 256 columns
    assert tlp.vocab_slice(5, 10, 301) == 1


# ----------------------------------------------------------------------- kernels (interpreter)


@interpreter_only
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_lse_kernel_over_several_blocks(monkeypatch, softcap):
    # V = 301 with 64-wide blocks: four full blocks and a 45-wide tail per row.
    monkeypatch.setattr(tlp, "MAX_BLOCK", 64)
    gen = torch.Generator().manual_seed(1)
    logits = 4.0 * torch.randn(7, 301, generator=gen)
    targets = torch.randint(301, (7,), generator=gen)
    lse, logprobs = torch.empty(7), torch.empty(7)
    tlp._launch_lse_target(logits, targets, lse, logprobs, softcap)

    capped = logits.double() if softcap is None else softcap * torch.tanh(logits.double() / softcap)
    expected_lse = torch.logsumexp(capped, dim=1)
    torch.testing.assert_close(lse.double(), expected_lse, rtol=1e-6, atol=1e-6)
    expected = capped.gather(1, targets[:, None]).squeeze(1) - expected_lse
    torch.testing.assert_close(logprobs.double(), expected, rtol=1e-6, atol=1e-6)


@interpreter_only
@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_logit_grad_kernel_on_a_vocabulary_slice(monkeypatch, softcap, out_dtype):
    # Columns [200, 300) of a 301-wide row: targets inside the slice get the one-hot, others do not.
    monkeypatch.setattr(tlp, "MAX_BLOCK", 64)
    gen = torch.Generator().manual_seed(2)
    logits = 4.0 * torch.randn(6, 301, generator=gen)
    targets = torch.tensor([205, 299, 0, 300, 250, 199])
    scale = torch.randn(6, generator=gen)
    capped = logits.double() if softcap is None else softcap * torch.tanh(logits.double() / softcap)
    lse = torch.logsumexp(capped, dim=1).float()
    grad = torch.empty(6, 100, dtype=out_dtype)
    tlp._launch_logit_grad(logits[:, 200:300], grad, targets, lse, scale, 200, softcap)

    expected = -torch.softmax(capped, dim=1)
    expected[torch.arange(6), targets] += 1.0
    if softcap is not None:
        expected *= 1.0 - (capped / softcap) ** 2
    expected = (expected * scale.double()[:, None])[:, 200:300]
    tolerance = 1e-6 if out_dtype == torch.float32 else 2**-8
    assert rel_error(grad, expected) < tolerance


@interpreter_only
def test_logit_grad_kernel_in_place():
    gen = torch.Generator().manual_seed(3)
    logits = 3.0 * torch.randn(4, 77, generator=gen)
    targets = torch.tensor([0, 76, 5, 40])
    lse = torch.logsumexp(logits, dim=1)
    expected = -torch.softmax(logits.double(), dim=1)
    expected[torch.arange(4), targets] += 1.0
    tlp._launch_logit_grad(logits, logits, targets, lse, None, 0, None)
    assert rel_error(logits, expected) < 1e-6


# ---------------------------------------------------------------- token_logprobs (interpreter)


@interpreter_only
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("trainable", [False, True])
def test_matches_float64_on_awkward_shapes(monkeypatch, softcap, trainable):
    # N = 13, H = 10, V = 301 are multiples of no block. Every 4th of the 13 positions is masked, so 9 are
    # kept: 5-token chunks give a full chunk and a partial one; 64-wide blocks give 4 full and a 45-wide tail.
    monkeypatch.setattr(tlp, "MAX_BLOCK", 64)
    hidden, weight, targets, upstream = make_inputs(13, 10, 301)
    hidden.requires_grad_()
    weight.requires_grad_(trainable)
    values = token_logprobs(hidden, weight, targets, softcap=softcap, chunk_size=5, impl="triton")
    inputs = (hidden, weight) if trainable else (hidden,)
    grads = torch.autograd.grad(values, inputs, upstream)
    ref_values, ref_grad_hidden, ref_grad_weight = reference_with_grads(
        hidden, weight, targets, upstream, softcap
    )

    assert values.dtype == torch.float32
    assert torch.equal(values[targets == IGNORE], torch.zeros(int((targets == IGNORE).sum())))
    assert rel_error(values, ref_values) < 1e-6
    assert rel_error(grads[0], ref_grad_hidden) < 1e-5
    if trainable:
        assert rel_error(grads[1], ref_grad_weight) < 1e-5


@interpreter_only
def test_trainable_backward_over_many_vocabulary_slices():
    # chunk_size 1 -> workspace of 1 * V = 301 logits over 12 kept tokens = 25 columns a slice:
    # 12 full slices and a 1-column tail.
    hidden, weight, targets, upstream = make_inputs(12, 6, 301, every_masked=None)
    assert tlp.vocab_slice(1 * 301, 12, 301) == 25
    hidden.requires_grad_()
    weight.requires_grad_()
    values = token_logprobs(hidden, weight, targets, softcap=3.0, chunk_size=1, impl="triton")
    grad_hidden, grad_weight = torch.autograd.grad(values, (hidden, weight), upstream)
    _, ref_grad_hidden, ref_grad_weight = reference_with_grads(hidden, weight, targets, upstream, 3.0)
    assert rel_error(grad_hidden, ref_grad_hidden) < 1e-5
    assert rel_error(grad_weight, ref_grad_weight) < 1e-5


@interpreter_only
@pytest.mark.parametrize("trainable", [False, True])
def test_all_masked_rows(trainable):
    hidden, weight, _, _ = make_inputs(5, 8, 40)
    hidden.requires_grad_()
    weight.requires_grad_(trainable)
    values = token_logprobs(hidden, weight, torch.full((5,), IGNORE), impl="triton")
    assert torch.equal(values, torch.zeros(5))
    values.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros(5, 8))
    if trainable:
        assert torch.equal(weight.grad, torch.zeros(40, 8))


@interpreter_only
@pytest.mark.parametrize("trainable", [False, True])
def test_single_token(trainable):
    hidden, weight, targets, upstream = make_inputs(1, 7, 53, every_masked=None)
    hidden.requires_grad_()
    weight.requires_grad_(trainable)
    values = token_logprobs(hidden, weight, targets, softcap=2.0, impl="triton")
    (grad_hidden,) = torch.autograd.grad(values, hidden, upstream)
    ref_values, ref_grad_hidden, _ = reference_with_grads(hidden, weight, targets, upstream, 2.0)
    assert rel_error(values, ref_values) < 1e-6
    assert rel_error(grad_hidden, ref_grad_hidden) < 1e-5


@interpreter_only
def test_same_function_as_the_torch_path_without_grad():
    hidden, weight, targets, _ = make_inputs(17, 9, 120)
    hidden.requires_grad_()
    with torch.no_grad():
        fused = token_logprobs(hidden, weight, targets, impl="triton")
    assert fused.grad_fn is None
    reference = token_logprobs(hidden.detach(), weight, targets, impl="torch")
    torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-6)


@interpreter_only
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("trainable", [False, True])
def test_bf16_numerics_of_the_gpu_path(monkeypatch, softcap, trainable):
    # On CUDA the head stays bf16: logits come out of a bf16 matmul in float32, onehot - softmax is
    # stored in bf16 for the next matmul, and gradients return in bf16. Emulated here by keeping the head
    # bf16 and multiplying in float32 (as cuBLAS accumulates), on LM-like peaked inputs: the errors
    # against float64 on the same bf16 inputs must stay within the CUDA tests' 3e-3.
    monkeypatch.setattr(tlp, "matmul_operand", lambda weight: weight)
    monkeypatch.setattr(tlp, "float32_matmul", lambda a, b: a.float() @ b.float())
    monkeypatch.setattr(tlp, "MAX_BLOCK", 512)
    hidden, weight, targets, upstream = peaked_inputs(96, 64, 2000, torch.bfloat16, device="cpu")
    hidden.requires_grad_()
    weight.requires_grad_(trainable)
    values = token_logprobs(hidden, weight, targets, softcap=softcap, chunk_size=40, impl="triton")
    inputs = (hidden, weight) if trainable else (hidden,)
    grads = torch.autograd.grad(values, inputs, upstream)
    ref_values, ref_grad_hidden, ref_grad_weight = reference_with_grads(
        hidden, weight, targets, upstream, softcap
    )

    assert grads[0].dtype == torch.bfloat16
    assert rel_error(values, ref_values) < 1e-5
    assert rel_error(grads[0], ref_grad_hidden) <= 3e-3
    if trainable:
        assert rel_error(grads[1], ref_grad_weight) <= 5e-3


@parent_only
def test_triton_on_cpu_without_the_interpreter_is_refused():
    assert not tlp.is_interpreted()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        token_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), impl="triton")


# ------------------------------------------------------------------------------------- CUDA


@cuda_only
@pytest.mark.cuda
@pytest.mark.parametrize("vocab_size", [32000, 128256, 151936, 256000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("trainable", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_cuda_matches_float64(vocab_size, dtype, trainable, softcap):
    hidden, weight, targets, upstream = peaked_inputs(700, 512, vocab_size, dtype)
    hidden.requires_grad_()
    weight.requires_grad_(trainable)
    values = token_logprobs(hidden, weight, targets, softcap=softcap)  # auto: Triton on CUDA
    inputs = (hidden, weight) if trainable else (hidden,)
    grads = torch.autograd.grad(values, inputs, upstream)
    ref_values, ref_grad_hidden, ref_grad_weight = reference_with_grads(
        hidden, weight, targets, upstream, softcap
    )

    assert not values.isnan().any() and not grads[0].isnan().any()
    assert rel_error(values, ref_values) <= 3e-3
    assert rel_error(grads[0], ref_grad_hidden) <= 3e-3
    if trainable:
        assert not grads[1].isnan().any()
        assert rel_error(grads[1], ref_grad_weight) <= 5e-3


@cuda_only
@pytest.mark.cuda
def test_cuda_frozen_head_peak_memory_is_bounded():
    # 4096 tokens x 128256 vocabulary: full float32 logits would be 2 GiB; the fused path holds one
    # chunk (under 512 MiB) plus the [M, H] float32 hidden-state gradient.
    hidden, weight, targets, upstream = peaked_inputs(4096, 1024, 128256, torch.bfloat16)
    hidden.requires_grad_()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    token_logprobs(hidden, weight, targets).backward(upstream)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - baseline
    assert extra < tlp.TRITON_WORKSPACE_BYTES + 64 * 2**20
