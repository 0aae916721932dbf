"""The objectives of online RL as pure tensor functions: KL estimates, per-token rewards, GAE, PPO's clipped
policy and value losses, REINFORCE with a leave-one-out or group-normalised baseline, the adaptive KL
coefficient.

Layout: a sample's completion tokens (EOS included when it ended) are left-aligned in ``[B, L]`` tensors,
``mask [B, L]`` true on its ``n_i`` tokens. Position ``t`` of a sample is the state after its prompt and
first ``t`` completion tokens; ``logps[i, t]`` is log π(y_t | x, y_<t), ``values[i, t]`` the value of that
state. Nothing here knows about models; every function is checked against hand-computed values in
``tests/online/test_objectives.py``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dpo.losses import LossOutput


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the true positions of ``mask`` (any shape); 0 when there are none."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance (n − 1) of ``values`` over the true positions of ``mask``; 0 with fewer than two."""
    mask = mask.to(values.dtype)
    n = mask.sum()
    mean = (values * mask).sum() / n.clamp(min=1)
    return (((values - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """``(values − mean) / sqrt(var + eps)`` over the masked positions (mean 0, variance 1 there); 0 elsewhere."""
    mean = masked_mean(values, mask)
    return (values - mean) * torch.rsqrt(masked_var(values, mask) + eps) * mask.to(values.dtype)


def kl_per_token(logps: Tensor, ref_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Two per-token estimators of KL(π ‖ π_ref) on samples from π (Schulman, "Approximating KL divergence").

    ``k1 = log π − log π_ref`` (unbiased, can be negative) and ``k3 = (ρ − 1) − log ρ`` with ``ρ = π_ref / π``
    (unbiased, never negative, lower variance); both 0 off ``mask``.

    Args:
        logps, ref_logps: ``[B, L]`` per-token log-probs of the sampled tokens under π and π_ref.
        mask: ``[B, L]`` completion tokens.

    Returns:
        ``(k1 [B, L], k3 [B, L])``.
    """
    m = mask.to(logps.dtype)
    log_ratio = (ref_logps - logps) * m
    return -log_ratio, (torch.expm1(log_ratio) - log_ratio) * m


def token_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """The reward of each token (Ziegler et al. 2019; Ouyang et al. 2022): ``−β·(log π − log π_ref)`` at every
    completion token, plus the sequence's score at its last token.

    Args:
        scores: ``[B]`` reward-model scores (any penalty already applied).
        logps, ref_logps: ``[B, L]`` per-token log-probs under the sampling policy and the reference.
        mask: ``[B, L]`` completion tokens (left-aligned, at least one per row).
        kl_coef: β >= 0.

    Returns:
        ``[B, L]`` per-token rewards, 0 off ``mask``.
    """
    k1, _ = kl_per_token(logps, ref_logps, mask)
    rewards = -kl_coef * k1
    last = mask.sum(dim=1) - 1
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    return rewards.index_put((rows, last), scores.to(rewards.dtype), accumulate=True)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each sample's completion tokens.

    ``δ_t = r_t + γ·V_{t+1} − V_t`` with ``V_{n} = 0`` after the last token, ``A_t = δ_t + γλ·A_{t+1}``;
    the returns (value targets) are ``A_t + V_t``.

    Args:
        rewards: ``[B, L]`` per-token rewards (:func:`token_rewards`).
        values: ``[B, L]`` value estimates of the states, from the rollout.
        mask: ``[B, L]`` completion tokens, left-aligned.
        gamma: discount γ in [0, 1].
        lam: λ in [0, 1]: 0 is the one-step TD error, 1 the Monte-Carlo return minus the value.

    Returns:
        ``(advantages [B, L], returns [B, L])``, 0 off ``mask``.
    """
    m = mask.to(values.dtype)
    length = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantages[:, t] = (delta + gamma * lam * next_advantage) * m[:, t]
        next_value, next_advantage = values[:, t] * m[:, t], advantages[:, t]
    return advantages, (advantages + values) * m


def clipped_surrogate(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                      clip_range: float) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017): ``max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))``,
    ``ρ = π/π_old``.

    Args:
        logps: ``[B, L]`` log-probs under the policy being trained (with gradient).
        old_logps: ``[B, L]`` log-probs under the policy that sampled (no gradient).
        advantages: ``[B, L]`` per-token advantages (or ``[B, 1]``, a sequence's, broadcast).
        mask: ``[B, L]`` completion tokens.
        clip_range: ε > 0.

    Returns:
        ``(losses [B, L], clipped [B, L], approx_kl [B, L])``, 0 off ``mask``: the per-token loss, whether the
        clipped term was the larger (so the token passes no gradient), and ``(ρ − 1) − log ρ``, an estimate
        of KL(π_old ‖ π).
    """
    m = mask.to(logps.dtype)
    log_ratio = (logps - old_logps) * m
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    losses = torch.maximum(unclipped, clipped) * m
    return losses, (clipped > unclipped).to(logps.dtype) * m, ((ratio - 1) - log_ratio).detach() * m


def ppo_objective(logps: Tensor, old_logps: Tensor, values: Tensor, old_values: Tensor, advantages: Tensor,
                  returns: Tensor, mask: Tensor, *, clip_range: float, value_clip_range: float,
                  value_coef: float) -> LossOutput:
    """PPO's loss on a micro-batch of rollout samples: clipped surrogate plus the clipped value loss, as a mean
    over every completion token of the micro-batch (Ziegler et al. 2019; Ouyang et al. 2022).

    ``L = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1±ε)) + c_v · ½ mean_t max((V_t − R_t)², (V̂_t − R_t)²)`` with
    ``V̂_t = V_old,t + clip(V_t − V_old,t, ±ε_v)`` (the value may not move further than ε_v from the
    rollout's value in one rollout's updates).

    Args:
        logps, old_logps: ``[B, L]`` per-token log-probs, current (with gradient) and at sampling.
        values, old_values: ``[B, L]`` value estimates, current (with gradient) and at sampling.
        advantages: ``[B, L]`` (whitened) GAE advantages. returns: ``[B, L]`` value targets.
        mask: ``[B, L]`` completion tokens.
        clip_range: ε. value_clip_range: ε_v. value_coef: c_v.

    Returns:
        ``losses [B]``: each sample's share of the token mean (their mean is ``L``), and metrics ``[1]``:
        ``policy/loss``, ``policy/clip_fraction``, ``policy/approx_kl``, ``value/loss``,
        ``value/clip_fraction``, ``value/explained_variance`` (``[0]`` when the returns do not vary).
    """
    tokens = mask.sum().clamp(min=1)
    rows = mask.shape[0]
    variance_explained = explained_variance(values.detach(), returns, mask)
    pg, pg_clipped, approx_kl = clipped_surrogate(logps, old_logps, advantages, mask, clip_range)
    m = mask.to(values.dtype)
    value_clipped = old_values + torch.clamp(values - old_values, -value_clip_range, value_clip_range)
    vf_unclipped, vf_clipped = (values - returns) ** 2, (value_clipped - returns) ** 2
    vf = 0.5 * torch.maximum(vf_unclipped, vf_clipped) * m
    per_token = pg + value_coef * vf
    losses = per_token.sum(dim=1) * rows / tokens
    metrics = {
        "policy/loss": (pg.sum() / tokens).detach().reshape(1),
        "policy/clip_fraction": (pg_clipped.sum() / tokens).reshape(1),
        "policy/approx_kl": (approx_kl.sum() / tokens).reshape(1),
        "value/loss": (vf.sum() / tokens).detach().reshape(1),
        "value/clip_fraction": (((vf_clipped > vf_unclipped).to(m.dtype) * m).sum() / tokens).reshape(1),
        # Undefined when the returns do not vary: left out (an empty tensor) rather than logged as NaN.
        "value/explained_variance": (variance_explained.reshape(1) if torch.isfinite(variance_explained)
                                     else variance_explained.new_zeros(0)),
    }
    return LossOutput(losses, metrics)


def policy_gradient_objective(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                              clip_range: float) -> LossOutput:
    """REINFORCE on whole sequences with a baseline already in the advantage (RLOO, Ahmadian et al. 2024;
    GRPO's group-normalised advantage, Shao et al. 2024), through PPO's clipped ratio so that several passes
    over a rollout stay near it.

    Per sample ``L_i = Σ_t max(−A_i ρ_it, −A_i clip(ρ_it, 1±ε))``; on the first pass (``ρ = 1``) its gradient is
    ``−A_i ∇ log π(y_i|x)``, REINFORCE's. The loss is the mean over samples.

    Args:
        logps, old_logps: ``[B, L]`` per-token log-probs, current (with gradient) and at sampling.
        advantages: ``[B]`` sequence advantages.
        mask: ``[B, L]`` completion tokens.
        clip_range: ε.

    Returns:
        ``losses [B]`` and metrics ``[1]``: ``policy/clip_fraction`` and ``policy/approx_kl`` (over tokens).
    """
    pg, pg_clipped, approx_kl = clipped_surrogate(logps, old_logps, advantages[:, None], mask, clip_range)
    tokens = mask.sum().clamp(min=1)
    metrics = {"policy/clip_fraction": (pg_clipped.sum() / tokens).reshape(1),
               "policy/approx_kl": (approx_kl.sum() / tokens).reshape(1)}
    return LossOutput(pg.sum(dim=1), metrics)


def rloo_advantages(rewards: Tensor, k: int) -> Tensor:
    """Leave-one-out advantages (Ahmadian et al. 2024): ``A_i = R_i − mean_{j≠i} R_j`` within each group.

    Args:
        rewards: ``[G·k]`` sequence rewards, prompt-major (samples ``g·k .. g·k+k−1`` answer prompt g).
        k: samples per prompt, >= 2.

    Returns:
        ``[G·k]`` advantages; each group's sum to 0.
    """
    groups = rewards.reshape(-1, k)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).reshape(-1)


def grpo_advantages(rewards: Tensor, k: int, eps: float = 1e-4) -> Tensor:
    """Group-normalised advantages (Shao et al. 2024): ``A_i = (R_i − mean_g) / (std_g + eps)`` with the
    group's unbiased (n − 1) standard deviation.

    Args:
        rewards: ``[G·k]`` sequence rewards, prompt-major. k: samples per prompt, >= 2. eps: keeps a group
            of equal rewards at advantage 0.

    Returns:
        ``[G·k]`` advantages.
    """
    groups = rewards.reshape(-1, k)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """``1 − Var(R − V) / Var(R)`` over the masked positions: 1 for perfect values, 0 for a constant guess,
    negative for worse (NaN when the returns do not vary)."""
    var_returns = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_returns if var_returns > 0 else torch.tensor(math.nan)


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, samples: int) -> float:
    """The adaptive KL coefficient of Ziegler et al. 2019: ``β ← β·(1 + e·n/H)``, ``e = clip(KL/target − 1, ±0.2)``.

    Args:
        kl_coef: β now. kl: the rollout's mean KL per sample. target: the KL per sample aimed at.
        horizon: H, in samples. samples: n, the rollout's samples.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * samples / horizon)
