"""The online objectives on hand-built tensors, against values computed by hand (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from dpo.online import objectives as obj

F64 = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual.to(F64), t(expected), rtol=1e-9, atol=1e-12)


def test_clipped_surrogate_clips_on_both_sides_and_stops_the_gradient_there():
    # Ratios 1.5, 0.5, 1.1, 0.7 with advantages +1, +1, -1, -1 and eps 0.2:
    #   1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped above)   0.5, A=+1: max(-0.5, -0.8) = -0.5 (unclipped)
    #   1.1, A=-1: max(1.1, 1.1) = 1.1 (inside the range)   0.7, A=-1: max(0.7, 0.8) = 0.8 (clipped below)
    ratios = t([[1.5, 0.5, 1.1, 0.7]])
    old = t([[-1.0, -2.0, -0.3, -1.2]])
    logps = (old + ratios.log()).requires_grad_()
    advantages = t([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    losses, clipped, approx_kl = obj.clipped_surrogate(logps, old, advantages, mask, 0.2)
    close(losses, [[-1.2, -0.5, 1.1, 0.8]])
    assert clipped.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    expected_kl = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 0.7)]
    close(approx_kl, [expected_kl])
    losses.sum().backward()
    # d/dlogp of -A * ratio is -A * ratio where unclipped; 0 where the clipped term is active.
    close(logps.grad, [[0.0, -0.5, 1.1, 0.0]])


def test_gae_on_a_three_step_toy():
    # r = (0, 0, 1), V = (0.5, 0.6, 0.7), gamma 1, lambda 0.5, V after the last token 0:
    #   d2 = 1 - 0.7 = 0.3                 A2 = 0.3
    #   d1 = 0 + 0.7 - 0.6 = 0.1           A1 = 0.1 + 0.5 * 0.3 = 0.25
    #   d0 = 0 + 0.6 - 0.5 = 0.1           A0 = 0.1 + 0.5 * 0.25 = 0.225
    # A second row of two tokens, padded: r = (0, 2), V = (1, 1), gamma 0.9, lambda 1 below.
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = t([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = obj.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert advantages[0].tolist() == pytest.approx([0.225, 0.25, 0.3])
    assert returns[0].tolist() == pytest.approx([0.725, 0.85, 1.0])
    # Row 2 (gamma 1, lambda 0.5): d1 = 2 - 1 = 1, A1 = 1; d0 = 0 + 1 - 1 = 0, A0 = 0.5. The padded value 9 is unused.
    assert advantages[1].tolist() == pytest.approx([0.5, 1.0, 0.0])
    # gamma 0.9, lambda 1: A_t = discounted return - V_t: A2 = 1 - 0.7 = 0.3, A1 = 0.9 - 0.6 = 0.3, A0 = 0.81 - 0.5.
    advantages, returns = obj.gae(rewards, values, mask, gamma=0.9, lam=1.0)
    assert advantages[0].tolist() == pytest.approx([0.31, 0.3, 0.3])
    assert returns[0].tolist() == pytest.approx([0.81, 0.9, 1.0])


def test_token_rewards_put_the_kl_penalty_on_every_token_and_the_score_on_the_last():
    logps = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref_logps = t([[-1.5, -1.0, -0.5], [-2.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    rewards = obj.token_rewards(t([1.0, -2.0]), logps, ref_logps, mask, kl_coef=0.1)
    # k1 = logp - ref = (0.5, -1, 0) and (1, -, -): rewards -0.1 * k1, plus the score at the last token.
    close(rewards, [[-0.05, 0.1, 1.0], [-0.1 - 2.0, 0.0, 0.0]])


def test_kl_estimators_per_token():
    logps = t([[-1.0, -2.0, -0.5]])
    ref_logps = t([[-1.5, -1.0, -0.5]])
    k1, k3 = obj.kl_per_token(logps, ref_logps, torch.ones(1, 3, dtype=torch.bool))
    close(k1, [[0.5, -1.0, 0.0]])
    # k3 = (rho - 1) - log rho with log rho = ref - logp = (-0.5, 1, 0).
    close(k3, [[math.exp(-0.5) - 1 + 0.5, math.e - 1 - 1, 0.0]])
    assert (k3 >= 0).all()


def test_leave_one_out_baseline():
    rewards = t([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0])
    # Group 1: baselines (2+3+6)/3, (1+3+6)/3, (1+2+6)/3, (1+2+3)/3; group 2: 4/3, 4/3, 4/3, 0.
    expected = [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0, -4 / 3, -4 / 3, -4 / 3, 4.0]
    assert obj.rloo_advantages(rewards, 4).tolist() == pytest.approx(expected)
    assert obj.rloo_advantages(t([5.0, 1.0]), 2).tolist() == pytest.approx([4.0, -4.0])


def test_group_normalisation():
    rewards = t([1.0, 2.0, 3.0, 6.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(14 / 3)  # deviations -2, -1, 0, 3: unbiased variance 14 / 3
    advantages = obj.grpo_advantages(rewards, 4, eps=0.0)
    assert advantages[:4].tolist() == pytest.approx([-2 / std, -1 / std, 0.0, 3 / std])
    # A group whose rewards are all equal has nothing to learn: advantage 0 (eps keeps it finite).
    assert obj.grpo_advantages(rewards, 4)[4:].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_ppo_objective_clips_the_value_and_averages_over_tokens():
    mask = torch.tensor([[True, True], [True, False]])
    values = t([[1.0, 0.0], [2.0, 0.0]]).requires_grad_()
    old_values = t([[0.5, 0.0], [2.0, 0.0]])
    returns = t([[0.0, 1.0], [3.0, 0.0]])
    logps = t([[-1.0, -1.0], [-1.0, 0.0]])
    advantages = t([[1.0, -1.0], [2.0, 0.0]])
    out = obj.ppo_objective(logps, logps.clone(), values, old_values, advantages, returns, mask, clip_range=0.2,
                            value_clip_range=0.2, value_coef=0.5)
    # Ratios are 1: policy losses -A = (-1, 1, -2), mean over 3 tokens -2/3.
    # Values: token 1: V=1, clipped 0.5+0.2=0.7, R=0: max(1, 0.49) = 1; token 2: V=0, R=1: 1; token 3: V=2, R=3: 1.
    # Value loss 0.5 * mean(1, 1, 1) = 0.5; total -2/3 + 0.5 * 0.5.
    assert out.metrics["policy/loss"].item() == pytest.approx(-2 / 3)
    assert out.metrics["value/loss"].item() == pytest.approx(0.5)
    assert out.losses.mean().item() == pytest.approx(-2 / 3 + 0.25)
    # Row shares: row 1 holds tokens 1-2 (policy -1 + 1, value 0.5 * 0.5 * 2), row 2 token 3; times rows / tokens.
    assert out.losses.tolist() == pytest.approx([(0.0 + 0.5) * 2 / 3, (-2.0 + 0.25) * 2 / 3])
    assert out.metrics["value/clip_fraction"].item() == pytest.approx(0.0)
    out.losses.mean().backward()
    # dL/dV = value_coef * (V - R) / tokens on the unclipped terms: 0.5 * (1, -1, -1) / 3.
    close(values.grad, [[0.5 / 3, -0.5 / 3], [-0.5 / 3, 0.0]])


def test_value_clipping_keeps_the_larger_loss():
    mask = torch.ones(1, 1, dtype=torch.bool)
    # V moved from 0 to 1 with R = 2: clipped value 0.2 has loss (1.8)^2 > (1)^2, so the clipped term counts.
    out = obj.ppo_objective(t([[0.0]]), t([[0.0]]), t([[1.0]]), t([[0.0]]), t([[0.0]]), t([[2.0]]), mask,
                            clip_range=0.2, value_clip_range=0.2, value_coef=1.0)
    assert out.metrics["value/loss"].item() == pytest.approx(0.5 * 1.8**2)
    assert out.metrics["value/clip_fraction"].item() == 1.0


def test_policy_gradient_objective_is_reinforce_on_the_first_pass():
    old = t([[-1.0, -2.0], [-0.5, 0.0]])
    logps = old.clone().requires_grad_()
    mask = torch.tensor([[True, True], [True, False]])
    out = obj.policy_gradient_objective(logps, old, t([2.0, -1.0]), mask, clip_range=0.2)
    assert out.losses.tolist() == pytest.approx([-4.0, 1.0])  # -A_i * (number of tokens) at ratio 1
    out.losses.mean().backward()
    # -A_i / B on every token of sample i: REINFORCE's -A grad log pi(y|x), averaged over the batch.
    close(logps.grad, [[-1.0, -1.0], [0.5, 0.0]])


def test_whiten_and_explained_variance():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    values = t([[1.0, 2.0, 100.0], [6.0, 100.0, 100.0]])
    white = obj.whiten(values, mask, eps=0.0)
    assert obj.masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert obj.masked_var(white, mask).item() == pytest.approx(1.0)
    assert white[0, 2] == 0 and white[1, 1] == 0
    assert obj.explained_variance(values, values, mask).item() == pytest.approx(1.0)
    mean = obj.masked_mean(values, mask)
    assert obj.explained_variance(torch.full_like(values, mean.item()), values, mask).item() == pytest.approx(0.0)


def test_adaptive_kl_coefficient():
    # KL 6 against target 4: error 0.5 clipped to 0.2; 64 samples of a 1000-sample horizon.
    assert obj.adaptive_kl_coef(0.1, 6.0, 4.0, 1000, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 1000))
    assert obj.adaptive_kl_coef(0.1, 3.8, 4.0, 1000, 64) == pytest.approx(0.1 * (1 - 0.05 * 64 / 1000))


def test_explained_variance_is_left_out_when_the_returns_do_not_vary():
    mask = torch.ones(1, 2, dtype=torch.bool)
    out = obj.ppo_objective(t([[0.0, 0.0]]), t([[0.0, 0.0]]), t([[0.5, 0.2]]), t([[0.5, 0.2]]), t([[0.0, 0.0]]),
                            t([[1.0, 1.0]]), mask, clip_range=0.2, value_clip_range=0.2, value_coef=1.0)
    assert out.metrics["value/explained_variance"].numel() == 0  # the metric window skips it
