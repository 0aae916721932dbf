"""Tests for dpo.kernels: the dispatching ``token_logprobs`` and its chunked PyTorch path.

Values and gradients are compared with float64 ``log_softmax`` + ``gather`` on the same inputs; a
hand-derived two-token case pins the formula; peak memory is measured in a fresh process from the
kernel's resident-set high-water mark (``ru_maxrss``), against a full-logits control that must exceed it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dpo.kernels import token_logprobs
from dpo.kernels.torch_logprobs import TORCH_BYTES_PER_LOGIT, TORCH_WORKSPACE_BYTES, default_token_chunk

REPO_ROOT = Path(__file__).resolve().parents[2]
IGNORE = -100


def reference_logprobs(hidden, weight, targets, softcap=None, ignore_index=IGNORE):
    """float64 log_softmax + gather over the full [N, V] logits; 0.0 at ignored positions."""
    logits = hidden.double() @ weight.double().T
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    keep = targets != ignore_index
    picked = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(keep, picked, torch.zeros_like(picked))


def reference_with_grads(hidden, weight, targets, upstream, softcap=None):
    """float64 values and the gradients of ``sum(upstream * values)`` for hidden and weight."""
    hidden64 = hidden.detach().double().requires_grad_()
    weight64 = weight.detach().double().requires_grad_()
    values = reference_logprobs(hidden64, weight64, targets, softcap)
    grad_hidden, grad_weight = torch.autograd.grad(values, (hidden64, weight64), upstream.double())
    return values.detach(), grad_hidden, grad_weight


def rel_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def make_inputs(num_tokens, hidden_size, vocab_size, dtype=torch.float32, seed=0, every_masked=5):
    """Random hidden/head with logit std about 2 and every ``every_masked``-th position ignored (None: none)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen).to(dtype)
    weight = (2.0 * torch.randn(vocab_size, hidden_size, generator=gen) / math.sqrt(hidden_size)).to(dtype)
    targets = torch.randint(vocab_size, (num_tokens,), generator=gen)
    if every_masked is not None:
        targets[::every_masked] = IGNORE
    upstream = torch.randn(num_tokens, generator=gen)
    return hidden, weight, targets, upstream


# ------------------------------------------------------------------------------------ hand-derived


def test_two_token_vocabulary_by_hand():
    # h = [1], W = [[0], [ln 3]] -> logits [0, ln 3] -> softmax [1/4, 3/4].
    # logp(target 1) = ln(3/4); logp(target 0) = ln(1/4).
    # d logp_1 / d h = W[1] - (1/4 W[0] + 3/4 W[1]) = ln 3 - 3/4 ln 3 = ln(3) / 4.
    # d logp_1 / d W = (onehot - p) h = [-1/4, 1/4].
    hidden = torch.tensor([[1.0], [1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [math.log(3.0)]], requires_grad=True)
    values = token_logprobs(hidden, weight, torch.tensor([1, 0]), impl="torch")
    torch.testing.assert_close(values, torch.tensor([math.log(0.75), math.log(0.25)]))
    values[0].backward()
    torch.testing.assert_close(hidden.grad, torch.tensor([[math.log(3.0) / 4], [0.0]]))
    torch.testing.assert_close(weight.grad, torch.tensor([[-0.25], [0.25]]))


def test_softcap_by_hand():
    # cap c = 2 ln 3 and raw logit z = (ln 3)^2: c * tanh(z / c) = 2 ln 3 * tanh(ln(3) / 2) = 2 ln 3 * 1/2
    # = ln 3 (tanh(ln(3) / 2) = (3 - 1) / (3 + 1) = 1/2). Capped logits [0, ln 3] -> logp_1 = ln(3/4).
    # d logp_1 / d h = sum_v (onehot - p)_v * (1 - tanh^2)_v * W_v = 1/4 * (1 - 1/4) * (ln 3)^2
    # = 3 (ln 3)^2 / 16.
    ln3 = math.log(3.0)
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [ln3**2]])
    value = token_logprobs(hidden, weight, torch.tensor([1]), softcap=2 * ln3, impl="torch")
    torch.testing.assert_close(value, torch.tensor([math.log(0.75)]))
    value.sum().backward()
    torch.testing.assert_close(hidden.grad, torch.tensor([[3 * ln3**2 / 16]]))


# --------------------------------------------------------------------------- float64 references


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("trainable", [False, True])
def test_matches_float64_on_odd_shapes(softcap, trainable):
    # N = 37 and V = 1003 are multiples of no chunk; chunk 8 leaves a partial last chunk of 5 kept tokens.
    hidden, weight, targets, upstream = make_inputs(37, 24, 1003)
    hidden.requires_grad_()
    weight.requires_grad_(trainable)
    values = token_logprobs(hidden, weight, targets, softcap=softcap, chunk_size=8, impl="torch")
    inputs = (hidden, weight) if trainable else (hidden,)
    grads = torch.autograd.grad(values, inputs, upstream)
    ref_values, ref_grad_hidden, ref_grad_weight = reference_with_grads(
        hidden, weight, targets, upstream, softcap
    )

    assert values.dtype == torch.float32
    assert rel_error(values, ref_values) < 1e-6
    assert rel_error(grads[0], ref_grad_hidden) < 1e-5
    if trainable:
        assert rel_error(grads[1], ref_grad_weight) < 1e-5


def test_bfloat16_inputs_accumulate_in_float32():
    # Against float64 on the same bf16 values: the log-probs are float32 all the way (error ~1e-7),
    # while the gradients come back in bf16, so their only error is one rounding (relative 2^-9).
    hidden, weight, targets, upstream = make_inputs(29, 40, 517, dtype=torch.bfloat16)
    hidden.requires_grad_()
    weight.requires_grad_()
    values = token_logprobs(hidden, weight, targets, chunk_size=6, impl="torch")
    grad_hidden, grad_weight = torch.autograd.grad(values, (hidden, weight), upstream)
    ref_values, ref_grad_hidden, ref_grad_weight = reference_with_grads(hidden, weight, targets, upstream)

    assert values.dtype == torch.float32
    assert grad_hidden.dtype == grad_weight.dtype == torch.bfloat16
    assert rel_error(values, ref_values) < 1e-6
    assert rel_error(grad_hidden, ref_grad_hidden) < 2**-8
    assert rel_error(grad_weight, ref_grad_weight) < 2**-8


def test_chunk_size_does_not_change_the_result():
    hidden, weight, targets, _ = make_inputs(23, 16, 301)
    one_chunk = token_logprobs(hidden, weight, targets, chunk_size=1000, impl="torch")
    for chunk_size in (1, 7, 22):
        chunked = token_logprobs(hidden, weight, targets, chunk_size=chunk_size, impl="torch")
        torch.testing.assert_close(chunked, one_chunk, rtol=1e-6, atol=1e-6)


def test_auto_on_cpu_is_the_torch_path():
    hidden, weight, targets, _ = make_inputs(11, 8, 97)
    assert torch.equal(
        token_logprobs(hidden, weight, targets), token_logprobs(hidden, weight, targets, impl="torch")
    )


# -------------------------------------------------------------------------------------- masking


def test_masked_positions_get_zero_value_and_zero_gradient():
    hidden, weight, targets, upstream = make_inputs(20, 12, 50, every_masked=3)
    hidden.requires_grad_()
    values = token_logprobs(hidden, weight, targets, chunk_size=4, impl="torch")
    (grad_hidden,) = torch.autograd.grad(values, hidden, upstream)
    masked = targets == IGNORE
    assert torch.equal(values[masked], torch.zeros(int(masked.sum())))
    assert torch.equal(grad_hidden[masked], torch.zeros(int(masked.sum()), 12))
    assert (values[~masked] < 0).all()
    assert (grad_hidden[~masked].abs().sum(dim=1) > 0).all()


def test_custom_ignore_index():
    hidden, weight, targets, _ = make_inputs(10, 8, 30, every_masked=None)
    targets[[2, 7]] = 29
    values = token_logprobs(hidden, weight, targets, ignore_index=29, impl="torch")
    expected = reference_logprobs(hidden, weight, targets, ignore_index=29)
    assert values[2] == 0.0 and values[7] == 0.0
    assert rel_error(values, expected) < 1e-6


def test_all_masked_returns_zeros_and_backpropagates_zeros():
    hidden, weight, _, _ = make_inputs(6, 8, 30)
    hidden.requires_grad_()
    weight.requires_grad_()
    values = token_logprobs(hidden, weight, torch.full((6,), IGNORE), impl="torch")
    assert torch.equal(values, torch.zeros(6))
    values.sum().backward()
    assert torch.equal(hidden.grad, torch.zeros(6, 8))
    assert torch.equal(weight.grad, torch.zeros(30, 8))


def test_single_token():
    hidden, weight, targets, _ = make_inputs(1, 5, 13, every_masked=None)
    values = token_logprobs(hidden, weight, targets, impl="torch")
    assert values.shape == (1,)
    assert rel_error(values, reference_logprobs(hidden, weight, targets)) < 1e-6


# ------------------------------------------------------------------------------ head gradients


def test_frozen_head_gets_no_gradient_even_if_it_requires_grad():
    hidden, weight, targets, _ = make_inputs(9, 8, 40)
    hidden.requires_grad_()
    weight.requires_grad_()
    token_logprobs(hidden, weight, targets, head_trainable=False, impl="torch").sum().backward()
    assert weight.grad is None
    assert hidden.grad is not None


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_frozen_head_forward_gradient_equals_the_recompute_backward(softcap):
    # The frozen-head path forms d logp / d hidden in the forward; the trainable-head path recomputes the
    # logits in the backward. Same function, same float32 arithmetic up to the order of one scaling.
    hidden, weight, targets, upstream = make_inputs(37, 24, 1003)
    hidden.requires_grad_()
    frozen = token_logprobs(hidden, weight, targets, softcap=softcap, chunk_size=8, impl="torch")
    (frozen_grad,) = torch.autograd.grad(frozen, hidden, upstream)
    trainable_weight = weight.clone().requires_grad_()
    recomputed = token_logprobs(hidden, trainable_weight, targets, softcap=softcap, chunk_size=8, impl="torch")
    (recomputed_grad,) = torch.autograd.grad(recomputed, hidden, upstream)

    assert torch.equal(frozen, recomputed)
    assert rel_error(frozen_grad, recomputed_grad) < 1e-6


def test_frozen_head_bfloat16_gradient_is_rounded_once():
    # The forward's [M, H] gradient is kept in float32 and rounded to bf16 only after the upstream scale.
    hidden, weight, targets, upstream = make_inputs(29, 40, 517, dtype=torch.bfloat16)
    hidden.requires_grad_()
    values = token_logprobs(hidden, weight, targets, chunk_size=6, impl="torch")
    (grad_hidden,) = torch.autograd.grad(values, hidden, upstream)
    ref_values, ref_grad_hidden, _ = reference_with_grads(hidden, weight, targets, upstream)

    assert grad_hidden.dtype == torch.bfloat16
    assert rel_error(values, ref_values) < 1e-6
    assert rel_error(grad_hidden, ref_grad_hidden) < 2**-8


def test_frozen_head_values_do_not_depend_on_grad_mode():
    # Under no_grad (the reference pass) the forward skips the gradient; the values are the same numbers.
    hidden, weight, targets, _ = make_inputs(21, 16, 301)
    with torch.no_grad():
        without_grad = token_logprobs(hidden.requires_grad_(), weight, targets, chunk_size=5, impl="torch")
    with_grad = token_logprobs(hidden, weight, targets, chunk_size=5, impl="torch")
    assert without_grad.grad_fn is None and with_grad.grad_fn is not None
    assert torch.equal(without_grad, with_grad)


def test_default_head_trainable_follows_requires_grad():
    hidden, weight, targets, _ = make_inputs(9, 8, 40)
    weight.requires_grad_()
    token_logprobs(hidden, weight, targets, impl="torch").sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ bad input


def test_unknown_impl_is_refused():
    hidden, weight, targets, _ = make_inputs(4, 8, 10)
    with pytest.raises(ValueError, match="impl must be one of"):
        token_logprobs(hidden, weight, targets, impl="cuda")


def test_target_outside_vocabulary_names_the_position():
    hidden, weight, targets, _ = make_inputs(6, 8, 10, every_masked=None)
    targets[4] = 10
    with pytest.raises(ValueError, match=r"positions \[4\] are outside \[0, 10\)"):
        token_logprobs(hidden, weight, targets)


def test_head_trainable_true_needs_requires_grad():
    hidden, weight, targets, _ = make_inputs(4, 8, 10)
    with pytest.raises(ValueError, match="head_trainable=True"):
        token_logprobs(hidden, weight, targets, head_trainable=True)


@pytest.mark.parametrize(
    ("hidden_shape", "weight_shape", "num_targets", "message"),
    [
        ((4, 8), (10, 7), 4, "shapes do not match"),
        ((4, 8), (10, 8), 5, "shapes do not match"),
        ((2, 2, 8), (10, 8), 4, r"hidden \[N, H\]"),
    ],
)
def test_shape_mismatch_is_refused(hidden_shape, weight_shape, num_targets, message):
    with pytest.raises(ValueError, match=message):
        token_logprobs(
            torch.zeros(hidden_shape), torch.zeros(weight_shape), torch.zeros(num_targets, dtype=torch.long)
        )


def test_mixed_dtypes_and_bad_softcap_are_refused():
    hidden, weight, targets, _ = make_inputs(4, 8, 10)
    with pytest.raises(ValueError, match="must share one of"):
        token_logprobs(hidden.bfloat16(), weight, targets)
    with pytest.raises(ValueError, match="softcap must be a positive"):
        token_logprobs(hidden, weight, targets, softcap=0.0)
    with pytest.raises(ValueError, match="targets must be integer"):
        token_logprobs(hidden, weight, targets.float())


# -------------------------------------------------------------------------------------- memory


def test_default_chunk_fits_the_workspace():
    # V = 16384 at 16 bytes per logit: 128 MiB / (16384 * 16 B) = 512 tokens per chunk.
    assert default_token_chunk(16384, TORCH_BYTES_PER_LOGIT, TORCH_WORKSPACE_BYTES) == 512
    # A vocabulary row larger than the whole budget still gets one token per chunk.
    assert default_token_chunk(10**8, 16, 1024) == 1


_PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from dpo.kernels import token_logprobs

    torch.set_num_threads(1)
    mode = sys.argv[1]
    N, H, V = 4096, 64, 16384
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / 8).requires_grad_()
    targets = torch.randint(V, (N,), generator=gen)
    upstream = torch.randn(N, generator=gen)

    def step():
        if mode == "full-logits":
            values = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
        elif mode == "default-chunk":
            values = token_logprobs(hidden, weight, targets, softcap=30.0, impl="torch")
        else:
            values = token_logprobs(hidden, weight, targets, chunk_size=int(mode), impl="torch")
        values.backward(upstream)
        hidden.grad = weight.grad = None

    def status_bytes(field):
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    # The first step pages in library code for these shapes. Then the high-water mark is reset (Linux:
    # "5" to clear_refs), so the peak holds only the second step's transient allocations, whatever the
    # allocator did or did not hand back to the system after the first.
    step()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    baseline = status_bytes("VmRSS")
    step()
    print(status_bytes("VmHWM") - baseline)
    """
)


def _peak_extra_bytes(mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY_SCRIPT, mode],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_peak_memory_stays_far_below_full_logits():
    full_logits_bytes = 4096 * 16384 * 4  # N * V * 4 = 256 MiB
    # Control: materializing the logits (plus log_softmax and their gradients) must show up, or the
    # measurement could not fail.
    assert _peak_extra_bytes("full-logits") > full_logits_bytes
    # 128-token chunks: 8 MiB logits blocks, plus the float32 [V, H] head gradient.
    assert _peak_extra_bytes("128") < full_logits_bytes / 4
    # The default chunk (with the softcap's extra temporary) keeps to the advertised workspace.
    assert _peak_extra_bytes("default-chunk") < TORCH_WORKSPACE_BYTES


def test_imports_and_runs_without_triton():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        from dpo.kernels import token_logprobs
        values = token_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, -100, 4]))
        assert values.shape == (3,) and values[1] == 0.0
        assert "dpo.kernels.triton_logprobs" not in sys.modules
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
