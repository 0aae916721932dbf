"""Preference-optimisation objectives (the DPO family) as pure tensor functions plus a registry.

Notation, for a pair (x, y_c, y_r) and per-sequence log-probs summed over completion tokens:
Δc = log πθ(y_c|x) − log πref(y_c|x), Δr likewise, δ = Δc − Δr, |y| = completion token count.

Every loss is a plain function with explicit [B] tensor arguments and a thin registry adapter
(``LossSpec.compute``) that the trainer calls without ever branching on the loss name. Inputs in
half precision are upcast to float32; float64 inputs stay float64 so gradients can be checked in
double precision.

What the ``rewards/*`` metrics hold, per loss (always the quantity the loss itself compares):

======  =========  ======  ============  ===========  ============================================
loss    reference  paired  token counts  reward_kind  rewards/chosen, rewards/rejected
======  =========  ======  ============  ===========  ============================================
dpo     yes        yes     no            sum          β·Δc, β·Δr
robust  yes        yes     no            sum          β·Δc, β·Δr
hinge   yes        yes     no            sum          β·Δc, β·Δr
dpop    yes        yes     no            sum          β·Δc, β·Δr
ipo     yes        yes     yes           mean         Δc/|y_c|, Δr/|y_r| (per-token log-ratio, no β)
kto     yes        no      no            sum          rewards/desirable, rewards/undesirable: β·Δ
simpo   no         yes     yes           mean         β·log πθ(y_c|x)/|y_c|, β·log πθ(y_r|x)/|y_r|
orpo    no         yes     yes           mean         log πθ(y_c|x)/|y_c|, log πθ(y_r|x)/|y_r|
======  =========  ======  ============  ===========  ============================================

``rewards/margins`` is chosen − rejected and ``rewards/accuracies`` is 1.0 where chosen > rejected, 0.5 on an
exact tie (a ranker that cannot tell the two apart is right half the time, so an untrained policy scores
chance, 0.5, not 0) and 0.0 otherwise.
``logps/chosen`` and ``logps/rejected`` are the policy's summed log-probs. ORPO also reports
``log_odds_ratio`` (the quantity inside its sigmoid); DPOP reports ``penalty``, max(0, −Δc), the
chosen log-prob lost below the reference. ``nll`` (the length-normalised NLL of the
chosen completion, −log πθ(y_c|x)/|y_c|) is reported for orpo and whenever ``nll_weight`` > 0.
KTO reports ``kl`` (its reference point z, shape [1]) and ``logps/desirable``,
``logps/undesirable`` (summed policy log-probs of each kind; empty when the batch has none).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PairedLogps:
    """Per-sequence log-probs of one model (policy or reference) on a batch of B preference pairs.

    Attributes:
        chosen: [B] log p(y_c|x) summed over completion tokens.
        rejected: [B] log p(y_r|x) summed over completion tokens.
        chosen_tokens: [B] completion token counts |y_c| (float or int, every value >= 1).
        rejected_tokens: [B] completion token counts |y_r|.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


@dataclass(frozen=True)
class UnpairedLogps:
    """Per-sequence log-probs of one model on a KTO batch of B unpaired rows.

    Attributes:
        completion: [B] log p(y|x) summed over completion tokens.
        tokens: [B] completion token counts |y|.
        kl_completion: [B] log p(y'|x): the row's prompt with another row's completion.
        kl_tokens: [B] token counts of y'.
        desirable: [B] bool, True where the row's completion is desirable.
    """

    completion: Tensor
    tokens: Tensor
    kl_completion: Tensor
    kl_tokens: Tensor
    desirable: Tensor


@dataclass(frozen=True)
class LossOutput:
    """What a registered loss hands the trainer.

    Attributes:
        losses: [B] per-example loss, differentiable; the trainer takes ``.mean()``.
        metrics: name -> detached 1-D tensor of per-example values (or shape [1] per-batch values).
    """

    losses: Tensor
    metrics: dict[str, Tensor]


LossInputs = PairedLogps | UnpairedLogps


@dataclass(frozen=True)
class LossSpec:
    """A registered objective and the facts the trainer needs to drive it.

    Attributes:
        name: registry key, as written in the recipe (``loss: {name: ...}``).
        compute: ``compute(policy, reference, options) -> LossOutput``; ``reference`` is None
            iff ``needs_reference`` is False; ``options`` holds exactly the names in ``options``.
        needs_reference: False when the objective is reference-free (the trainer skips the
            reference model entirely).
        paired: True for PairedLogps batches, False for UnpairedLogps (KTO) batches.
        uses_token_counts: True when the objective itself normalises by completion length.
            Any paired loss also reads ``chosen_tokens`` when ``nll_weight`` > 0, so the batch
            always carries token counts.
        options: option names the loss accepts; the recipe validates against this tuple.
        reward_kind: "sum" (rewards are β·Δ over summed log-ratios) or "mean" (rewards are
            per-token averages); see the module docstring for each loss.
    """

    name: str
    compute: Callable[[LossInputs, LossInputs | None, Mapping[str, float]], LossOutput]
    needs_reference: bool
    paired: bool
    uses_token_counts: bool
    options: tuple[str, ...]
    reward_kind: str


# ---------------------------------------------------------------------------------------------
# Input checks shared by the plain functions.


def _upcast(values: Tensor) -> Tensor:
    # float64 is kept so gradcheck can run in double precision; half precision would lose the
    # small differences between policy and reference log-probs.
    return values if values.dtype == torch.float64 else values.to(torch.float32)


def _check_batch(**tensors: Tensor) -> None:
    """Raise ValueError unless every tensor is 1-D with the same non-zero length."""
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    lengths = {shape[0] if len(shape) == 1 else None for shape in shapes.values()}
    if None in lengths or len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"loss inputs must be 1-D tensors of one non-zero batch size, got shapes {shapes}")


def _token_counts(tokens: Tensor, like: Tensor, name: str) -> Tensor:
    counts = tokens.to(like.dtype)
    if bool((counts < 1).any()):
        raise ValueError(
            f"{name} must be >= 1 for every row, got minimum {counts.min().item()}; "
            "rows with an empty completion should be dropped by the data pipeline"
        )
    return counts


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _check_label_smoothing(label_smoothing: float, *, allow_half: bool) -> None:
    upper_ok = label_smoothing <= 0.5 if allow_half else label_smoothing < 0.5
    if not (label_smoothing >= 0.0 and upper_ok):
        bound = "<= 0.5" if allow_half else "< 0.5"
        raise ValueError(f"label_smoothing must satisfy 0 <= label_smoothing {bound}, got {label_smoothing}")


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


# ---------------------------------------------------------------------------------------------
# The objectives.


def length_normalised_nll(policy_chosen: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Length-normalised negative log-likelihood of the chosen completion, −log πθ(y_c|x)/|y_c|.

    The SFT term of RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization") and of
    ORPO (Hong et al. 2024), normalised here by the completion's token count.

    Args:
        policy_chosen: [B] summed log πθ(y_c|x).
        chosen_tokens: [B] |y_c|, every value >= 1.

    Returns:
        [B] per-example NLL, differentiable.
    """
    _check_batch(policy_chosen=policy_chosen, chosen_tokens=chosen_tokens)
    policy_chosen = _upcast(policy_chosen)
    return -policy_chosen / _token_counts(chosen_tokens, policy_chosen, "chosen_tokens")


def _summed_log_ratios(
    policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor, reference_rejected: Tensor
) -> tuple[Tensor, Tensor]:
    _check_batch(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        reference_chosen=reference_chosen,
        reference_rejected=reference_rejected,
    )
    # The reference never receives gradient: its log-probs are cached constants.
    chosen_ratio = _upcast(policy_chosen) - _upcast(reference_chosen).detach()
    rejected_ratio = _upcast(policy_rejected) - _upcast(reference_rejected).detach()
    return chosen_ratio, rejected_ratio


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023, eq. 7), with conservative DPO (cDPO) label smoothing.

    loss = −(1−ε) log σ(β δ) − ε log σ(−β δ), δ = Δc − Δr over summed log-probs; ε = 0 is DPO.
    cDPO treats each preference label as flipped with probability ε.

    Args:
        policy_chosen: [B] summed log πθ(y_c|x).
        policy_rejected: [B] summed log πθ(y_r|x).
        reference_chosen: [B] summed log πref(y_c|x).
        reference_rejected: [B] summed log πref(y_r|x).
        beta: β > 0, strength of the implicit KL constraint.
        label_smoothing: ε in [0, 0.5]; at 0.5 the loss is symmetric in δ and carries no preference.

    Returns:
        losses [B] (differentiable), chosen_rewards [B] = β·Δc and rejected_rewards [B] = β·Δr
        (both detached).
    """
    _check_beta(beta)
    _check_label_smoothing(label_smoothing, allow_half=True)
    chosen_ratio, rejected_ratio = _summed_log_ratios(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def robust_dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    *,
    beta: float,
    label_smoothing: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Robust DPO, rDPO (Chowdhury et al. 2024, "Provably Robust DPO"), unbiased under label noise ε.

    loss = [−(1−ε) log σ(β δ) + ε log σ(−β δ)] / (1 − 2ε), δ = Δc − Δr over summed log-probs.

    Args:
        policy_chosen: [B] summed log πθ(y_c|x).
        policy_rejected: [B] summed log πθ(y_r|x).
        reference_chosen: [B] summed log πref(y_c|x).
        reference_rejected: [B] summed log πref(y_r|x).
        beta: β > 0.
        label_smoothing: assumed label-flip rate ε in [0, 0.5); at 0.5 the correction divides by 0.

    Returns:
        losses [B], chosen_rewards [B] = β·Δc, rejected_rewards [B] = β·Δr (rewards detached).
    """
    _check_beta(beta)
    _check_label_smoothing(label_smoothing, allow_half=False)
    chosen_ratio, rejected_ratio = _summed_log_ratios(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = (-(1.0 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1.0 - 2.0 * label_smoothing
    )
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def hinge_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """SLiC calibration hinge (Zhao et al. 2023) on the DPO log-ratio, as in RSO (Liu et al. 2024).

    loss = max(0, 1 − β δ), δ = Δc − Δr over summed log-probs; 1/β is the required margin on δ.

    Args:
        policy_chosen: [B] summed log πθ(y_c|x).
        policy_rejected: [B] summed log πθ(y_r|x).
        reference_chosen: [B] summed log πref(y_c|x).
        reference_rejected: [B] summed log πref(y_r|x).
        beta: β > 0.

    Returns:
        losses [B], chosen_rewards [B] = β·Δc, rejected_rewards [B] = β·Δr (rewards detached).
    """
    _check_beta(beta)
    chosen_ratio, rejected_ratio = _summed_log_ratios(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    losses = torch.relu(1.0 - beta * (chosen_ratio - rejected_ratio))
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def dpop_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    *,
    beta: float,
    lambda_: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DPO-Positive, DPOP (Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive", eq. 3).

    loss = −log σ(β·(δ − λ·max(0, log πref(y_c|x) − log πθ(y_c|x)))), δ = Δc − Δr over summed log-probs.

    Plain DPO only widens the margin δ, which it can do by lowering both sides' likelihood at once (the
    likelihood displacement of DPO: the chosen answer itself becomes less likely). The penalty
    max(0, −Δc) is zero while the chosen completion is at least as likely as under the reference and grows
    with every nat it loses below it, so the loss can no longer be lowered that way. With Δc ≥ 0 the loss
    is DPO's; below, the sigmoid's argument moves with log πθ(y_c|x) at slope β·(1 + λ) instead of β.

    Args:
        policy_chosen: [B] summed log πθ(y_c|x).
        policy_rejected: [B] summed log πθ(y_r|x).
        reference_chosen: [B] summed log πref(y_c|x).
        reference_rejected: [B] summed log πref(y_r|x).
        beta: β > 0.
        lambda_: λ >= 0, the weight of the penalty (the recipe option ``lambda``; the paper uses 50).

    Returns:
        losses [B]; chosen_rewards [B] = β·Δc and rejected_rewards [B] = β·Δr (detached); penalty [B] =
        max(0, −Δc) (detached).
    """
    _check_beta(beta)
    _check_non_negative("lambda", lambda_)
    chosen_ratio, rejected_ratio = _summed_log_ratios(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    penalty = torch.relu(-chosen_ratio)
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio - lambda_ * penalty))
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach(), penalty.detach()


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", empirical IPO loss), token-averaged.

    loss = ((Δc/|y_c| − Δr/|y_r|) − 1/(2β))². The log-ratios are averaged per token rather than
    summed: the paper writes sequence-level log-ratios, and the per-token average is the choice
    its authors confirmed for token-level language models. It keeps the target 1/(2β)
    independent of completion length.

    Args:
        policy_chosen: [B] summed log πθ(y_c|x).
        policy_rejected: [B] summed log πθ(y_r|x).
        reference_chosen: [B] summed log πref(y_c|x).
        reference_rejected: [B] summed log πref(y_r|x).
        chosen_tokens: [B] |y_c|, every value >= 1.
        rejected_tokens: [B] |y_r|, every value >= 1.
        beta: β > 0 (regularisation; the regression target is 1/(2β)).

    Returns:
        losses [B], chosen_rewards [B] = Δc/|y_c| and rejected_rewards [B] = Δr/|y_r| (per-token
        log-ratios, no β factor; detached).
    """
    _check_beta(beta)
    chosen_ratio, rejected_ratio = _summed_log_ratios(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected
    )
    _check_batch(policy_chosen=policy_chosen, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens)
    chosen_per_token = chosen_ratio / _token_counts(chosen_tokens, chosen_ratio, "chosen_tokens")
    rejected_per_token = rejected_ratio / _token_counts(rejected_tokens, rejected_ratio, "rejected_tokens")
    losses = (chosen_per_token - rejected_per_token - 1.0 / (2.0 * beta)) ** 2
    return losses, chosen_per_token.detach(), rejected_per_token.detach()


def kto_loss(
    policy_completion: Tensor,
    reference_completion: Tensor,
    policy_kl_completion: Tensor,
    reference_kl_completion: Tensor,
    desirable: Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"), L_KTO.

    With Δ = log πθ(y|x) − log πref(y|x) (summed) and the reference point
    z = max(0, mean_batch[log πθ(y'|x) − log πref(y'|x)]) estimated on mismatched pairs (each
    prompt with another row's completion y') and detached:
    desirable rows: λD·(1 − σ(β(Δ − z))); undesirable rows: λU·(1 − σ(β(z − Δ))).
    z is a batch-level baseline, so it cannot be computed from a single row.

    Args:
        policy_completion: [B] summed log πθ(y|x).
        reference_completion: [B] summed log πref(y|x).
        policy_kl_completion: [B] summed log πθ(y'|x) on the mismatched pairs.
        reference_kl_completion: [B] summed log πref(y'|x) on the mismatched pairs.
        desirable: [B] bool, True for desirable rows.
        beta: β > 0.
        desirable_weight: λD >= 0.
        undesirable_weight: λU >= 0.

    Returns:
        losses [B], rewards [B] = β·Δ (detached) and kl [1] = z (detached).
    """
    _check_beta(beta)
    _check_non_negative("desirable_weight", desirable_weight)
    _check_non_negative("undesirable_weight", undesirable_weight)
    _check_batch(
        policy_completion=policy_completion,
        reference_completion=reference_completion,
        policy_kl_completion=policy_kl_completion,
        reference_kl_completion=reference_kl_completion,
        desirable=desirable,
    )
    if policy_completion.shape[0] < 2:
        raise ValueError(
            "KTO needs a batch of at least 2 rows: its KL reference point pairs each prompt with "
            "another row's completion; raise the batch size"
        )
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    log_ratio = _upcast(policy_completion) - _upcast(reference_completion).detach()
    kl_log_ratio = _upcast(policy_kl_completion) - _upcast(reference_kl_completion)
    # The reference point is a baseline, not something to optimise: no gradient flows through it.
    kl = kl_log_ratio.mean().clamp(min=0).detach().reshape(1)
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (log_ratio - kl)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (kl - log_ratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    return losses, (beta * log_ratio).detach(), kl


def simpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float,
    gamma: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization..."), reference-free.

    loss = −log σ(β·log πθ(y_c|x)/|y_c| − β·log πθ(y_r|x)/|y_r| − γ): the implicit reward is the
    length-averaged policy log-prob scaled by β (the paper's r_SimPO), γ a target reward margin.

    Args:
        policy_chosen: [B] summed log πθ(y_c|x).
        policy_rejected: [B] summed log πθ(y_r|x).
        chosen_tokens: [B] |y_c|, every value >= 1.
        rejected_tokens: [B] |y_r|, every value >= 1.
        beta: β > 0.
        gamma: γ >= 0, target reward margin.

    Returns:
        losses [B], chosen_rewards [B] = β·log πθ(y_c|x)/|y_c| and rejected_rewards [B] =
        β·log πθ(y_r|x)/|y_r| (detached).
    """
    _check_beta(beta)
    _check_non_negative("gamma", gamma)
    _check_batch(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    )
    policy_chosen, policy_rejected = _upcast(policy_chosen), _upcast(policy_rejected)
    chosen_rewards = beta * policy_chosen / _token_counts(chosen_tokens, policy_chosen, "chosen_tokens")
    rejected_rewards = (
        beta * policy_rejected / _token_counts(rejected_tokens, policy_rejected, "rejected_tokens")
    )
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def _log_odds(mean_logps: Tensor) -> Tensor:
    """log(p/(1−p)) from log p < 0, [B] -> [B], accurate at both ends.

    log(1 − p) = log(−expm1(log p)) near p = 1 and log1p(−exp(log p)) for small p (the usual
    split at log p = −log 2); both branches are finite for log p < 0, so torch.where's unused
    branch never poisons the gradient.
    """
    log_one_minus_p = torch.where(
        mean_logps > -math.log(2.0),
        torch.log(-torch.expm1(mean_logps)),
        torch.log1p(-torch.exp(mean_logps)),
    )
    return mean_logps - log_one_minus_p


def orpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    odds_ratio_weight: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization...", eq. 6), reference-free.

    loss = −log πθ(y_c|x)/|y_c| − λ·log σ(log odds(y_c) − log odds(y_r)), where
    odds(y) = p/(1−p) with log p = log πθ(y|x)/|y|, the mean token log-prob (the paper's
    length-normalised likelihood). Every completion needs log p < 0, which holds for any
    non-degenerate model; log p = 0 (a completion predicted with probability exactly 1) gives
    infinite odds.

    Args:
        policy_chosen: [B] summed log πθ(y_c|x).
        policy_rejected: [B] summed log πθ(y_r|x).
        chosen_tokens: [B] |y_c|, every value >= 1.
        rejected_tokens: [B] |y_r|, every value >= 1.
        odds_ratio_weight: λ >= 0 (the recipe option ``lambda``).

    Returns:
        losses [B]; chosen_rewards [B] = log πθ(y_c|x)/|y_c| and rejected_rewards [B] =
        log πθ(y_r|x)/|y_r| (mean token log-probs, detached); log_odds_ratio [B] =
        log odds(y_c) − log odds(y_r) (detached).
    """
    _check_non_negative("lambda", odds_ratio_weight)
    _check_batch(
        policy_chosen=policy_chosen,
        policy_rejected=policy_rejected,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
    )
    policy_chosen, policy_rejected = _upcast(policy_chosen), _upcast(policy_rejected)
    chosen_mean = policy_chosen / _token_counts(chosen_tokens, policy_chosen, "chosen_tokens")
    rejected_mean = policy_rejected / _token_counts(rejected_tokens, policy_rejected, "rejected_tokens")
    log_odds_ratio = _log_odds(chosen_mean) - _log_odds(rejected_mean)
    losses = -chosen_mean - odds_ratio_weight * F.logsigmoid(log_odds_ratio)
    return losses, chosen_mean.detach(), rejected_mean.detach(), log_odds_ratio.detach()


# ---------------------------------------------------------------------------------------------
# Registry adapters: batch dataclasses + options mapping -> LossOutput.


def _read_options(
    loss_name: str, options: Mapping[str, float], expected: tuple[str, ...]
) -> dict[str, float]:
    unknown = sorted(set(options) - set(expected))
    missing = [name for name in expected if name not in options]
    if unknown or missing:
        raise ValueError(
            f"loss '{loss_name}' takes exactly the options {list(expected)}; "
            f"unknown: {unknown}, missing: {missing}"
        )
    values = {}
    for name in expected:
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"loss '{loss_name}' option '{name}' must be a finite number, got {value!r}")
        values[name] = float(value)
    return values


def _check_models(
    loss_name: str, policy: LossInputs, reference: LossInputs | None, spec_paired: bool, needs_reference: bool
) -> None:
    expected_type = PairedLogps if spec_paired else UnpairedLogps
    if not isinstance(policy, expected_type):
        raise TypeError(
            f"loss '{loss_name}' expects policy log-probs as {expected_type.__name__}, got {type(policy).__name__}"
        )
    if needs_reference and not isinstance(reference, expected_type):
        raise ValueError(
            f"loss '{loss_name}' needs reference log-probs as {expected_type.__name__}, got {type(reference).__name__}"
        )
    if not needs_reference and reference is not None:
        raise ValueError(f"loss '{loss_name}' is reference-free; pass reference=None")


def _ranking_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """1.0 where chosen ranks above rejected, 0.5 on an exact tie, 0.0 below; [B], [B] -> [B]."""
    return (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype) + 0.5 * (
        chosen_rewards == rejected_rewards
    ).to(chosen_rewards.dtype)


def _paired_output(
    losses: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy: PairedLogps,
    nll_weight: float,
) -> LossOutput:
    """Builds the shared paired metrics and adds the RPO term nll_weight·NLL(y_c) when nll_weight > 0."""
    _check_non_negative("nll_weight", nll_weight)
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": _ranking_accuracy(chosen_rewards, rejected_rewards),
        "logps/chosen": _upcast(policy.chosen).detach(),
        "logps/rejected": _upcast(policy.rejected).detach(),
    }
    # Skipped entirely at 0 so the default leaves losses and gradients bit-for-bit unchanged.
    if nll_weight > 0:
        nll = length_normalised_nll(policy.chosen, policy.chosen_tokens)
        losses = losses + nll_weight * nll
        metrics["nll"] = nll.detach()
    return LossOutput(losses=losses, metrics=metrics)


_DPO_OPTIONS = ("beta", "label_smoothing", "nll_weight")
_ROBUST_OPTIONS = ("beta", "label_smoothing", "nll_weight")
_HINGE_OPTIONS = ("beta", "nll_weight")
_DPOP_OPTIONS = ("beta", "lambda", "nll_weight")
_IPO_OPTIONS = ("beta", "nll_weight")
_KTO_OPTIONS = ("beta", "desirable_weight", "undesirable_weight")
_SIMPO_OPTIONS = ("beta", "gamma", "nll_weight")
_ORPO_OPTIONS = ("lambda", "nll_weight")


def _compute_dpo(
    policy: LossInputs, reference: LossInputs | None, options: Mapping[str, float]
) -> LossOutput:
    _check_models("dpo", policy, reference, spec_paired=True, needs_reference=True)
    values = _read_options("dpo", options, _DPO_OPTIONS)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy.chosen,
        policy.rejected,
        reference.chosen,
        reference.rejected,
        beta=values["beta"],
        label_smoothing=values["label_smoothing"],
    )
    return _paired_output(losses, chosen_rewards, rejected_rewards, policy, values["nll_weight"])


def _compute_robust(
    policy: LossInputs, reference: LossInputs | None, options: Mapping[str, float]
) -> LossOutput:
    _check_models("robust", policy, reference, spec_paired=True, needs_reference=True)
    values = _read_options("robust", options, _ROBUST_OPTIONS)
    losses, chosen_rewards, rejected_rewards = robust_dpo_loss(
        policy.chosen,
        policy.rejected,
        reference.chosen,
        reference.rejected,
        beta=values["beta"],
        label_smoothing=values["label_smoothing"],
    )
    return _paired_output(losses, chosen_rewards, rejected_rewards, policy, values["nll_weight"])


def _compute_hinge(
    policy: LossInputs, reference: LossInputs | None, options: Mapping[str, float]
) -> LossOutput:
    _check_models("hinge", policy, reference, spec_paired=True, needs_reference=True)
    values = _read_options("hinge", options, _HINGE_OPTIONS)
    losses, chosen_rewards, rejected_rewards = hinge_loss(
        policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta=values["beta"]
    )
    return _paired_output(losses, chosen_rewards, rejected_rewards, policy, values["nll_weight"])


def _compute_dpop(
    policy: LossInputs, reference: LossInputs | None, options: Mapping[str, float]
) -> LossOutput:
    _check_models("dpop", policy, reference, spec_paired=True, needs_reference=True)
    values = _read_options("dpop", options, _DPOP_OPTIONS)
    losses, chosen_rewards, rejected_rewards, penalty = dpop_loss(
        policy.chosen,
        policy.rejected,
        reference.chosen,
        reference.rejected,
        beta=values["beta"],
        lambda_=values["lambda"],
    )
    output = _paired_output(losses, chosen_rewards, rejected_rewards, policy, values["nll_weight"])
    output.metrics["penalty"] = penalty
    return output


def _compute_ipo(
    policy: LossInputs, reference: LossInputs | None, options: Mapping[str, float]
) -> LossOutput:
    _check_models("ipo", policy, reference, spec_paired=True, needs_reference=True)
    values = _read_options("ipo", options, _IPO_OPTIONS)
    losses, chosen_rewards, rejected_rewards = ipo_loss(
        policy.chosen,
        policy.rejected,
        reference.chosen,
        reference.rejected,
        policy.chosen_tokens,
        policy.rejected_tokens,
        beta=values["beta"],
    )
    return _paired_output(losses, chosen_rewards, rejected_rewards, policy, values["nll_weight"])


def _compute_kto(
    policy: LossInputs, reference: LossInputs | None, options: Mapping[str, float]
) -> LossOutput:
    _check_models("kto", policy, reference, spec_paired=False, needs_reference=True)
    values = _read_options("kto", options, _KTO_OPTIONS)
    losses, rewards, kl = kto_loss(
        policy.completion,
        reference.completion,
        policy.kl_completion,
        reference.kl_completion,
        policy.desirable,
        beta=values["beta"],
        desirable_weight=values["desirable_weight"],
        undesirable_weight=values["undesirable_weight"],
    )
    desirable = policy.desirable
    logps = _upcast(policy.completion).detach()
    metrics = {
        "kl": kl,
        "rewards/desirable": rewards[desirable],
        "rewards/undesirable": rewards[~desirable],
        "logps/desirable": logps[desirable],
        "logps/undesirable": logps[~desirable],
    }
    return LossOutput(losses=losses, metrics=metrics)


def _compute_simpo(
    policy: LossInputs, reference: LossInputs | None, options: Mapping[str, float]
) -> LossOutput:
    _check_models("simpo", policy, reference, spec_paired=True, needs_reference=False)
    values = _read_options("simpo", options, _SIMPO_OPTIONS)
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        policy.chosen,
        policy.rejected,
        policy.chosen_tokens,
        policy.rejected_tokens,
        beta=values["beta"],
        gamma=values["gamma"],
    )
    return _paired_output(losses, chosen_rewards, rejected_rewards, policy, values["nll_weight"])


def _compute_orpo(
    policy: LossInputs, reference: LossInputs | None, options: Mapping[str, float]
) -> LossOutput:
    _check_models("orpo", policy, reference, spec_paired=True, needs_reference=False)
    values = _read_options("orpo", options, _ORPO_OPTIONS)
    losses, chosen_rewards, rejected_rewards, log_odds_ratio = orpo_loss(
        policy.chosen,
        policy.rejected,
        policy.chosen_tokens,
        policy.rejected_tokens,
        odds_ratio_weight=values["lambda"],
    )
    output = _paired_output(losses, chosen_rewards, rejected_rewards, policy, values["nll_weight"])
    # ORPO's own SFT term is the chosen NLL, so it is always reported.
    output.metrics["nll"] = length_normalised_nll(policy.chosen, policy.chosen_tokens).detach()
    output.metrics["log_odds_ratio"] = log_odds_ratio
    return output


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            "dpo",
            _compute_dpo,
            needs_reference=True,
            paired=True,
            uses_token_counts=False,
            options=_DPO_OPTIONS,
            reward_kind="sum",
        ),
        LossSpec(
            "robust",
            _compute_robust,
            needs_reference=True,
            paired=True,
            uses_token_counts=False,
            options=_ROBUST_OPTIONS,
            reward_kind="sum",
        ),
        LossSpec(
            "hinge",
            _compute_hinge,
            needs_reference=True,
            paired=True,
            uses_token_counts=False,
            options=_HINGE_OPTIONS,
            reward_kind="sum",
        ),
        LossSpec(
            "dpop",
            _compute_dpop,
            needs_reference=True,
            paired=True,
            uses_token_counts=False,
            options=_DPOP_OPTIONS,
            reward_kind="sum",
        ),
        LossSpec(
            "ipo",
            _compute_ipo,
            needs_reference=True,
            paired=True,
            uses_token_counts=True,
            options=_IPO_OPTIONS,
            reward_kind="mean",
        ),
        LossSpec(
            "kto",
            _compute_kto,
            needs_reference=True,
            paired=False,
            uses_token_counts=False,
            options=_KTO_OPTIONS,
            reward_kind="sum",
        ),
        LossSpec(
            "simpo",
            _compute_simpo,
            needs_reference=False,
            paired=True,
            uses_token_counts=True,
            options=_SIMPO_OPTIONS,
            reward_kind="mean",
        ),
        LossSpec(
            "orpo",
            _compute_orpo,
            needs_reference=False,
            paired=True,
            uses_token_counts=True,
            options=_ORPO_OPTIONS,
            reward_kind="mean",
        ),
    )
}


def get_loss(name: str) -> LossSpec:
    """Look up a registered loss by its recipe name.

    Raises:
        ValueError: unknown name; the message lists the known names.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss '{name}'; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]
