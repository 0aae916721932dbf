"""Tests for dpo/losses.py: hand-derived values, float64 gradient checks, invariants and the registry.

Notation as in the module: Δc = πc − rc, Δr = πr − rr (summed log-probs), δ = Δc − Δr,
sp(x) = −log σ(x) = log(1 + e^−x), and sp(−x) = sp(x) + x.
"""

import math
from dataclasses import fields, replace

import pytest
import torch

from dpo.losses import (
    LOSSES,
    LossOutput,
    PairedLogps,
    UnpairedLogps,
    dpo_loss,
    dpop_loss,
    get_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    length_normalised_nll,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)


def f32(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def f64(*values: float, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def close(actual: torch.Tensor, *expected: float, tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=tol)


def to_float32(batch: PairedLogps | UnpairedLogps) -> PairedLogps | UnpairedLogps:
    values = {field.name: getattr(batch, field.name) for field in fields(batch)}
    return replace(
        batch, **{name: value.float() for name, value in values.items() if value.is_floating_point()}
    )


def random_policy_and_reference(batch: int, seed: int) -> tuple[PairedLogps, PairedLogps]:
    generator = torch.Generator().manual_seed(seed)
    tokens_c = torch.randint(1, 20, (batch,), generator=generator)
    tokens_r = torch.randint(1, 20, (batch,), generator=generator)

    # Mean token log-probs in (−3, −0.05), so every sequence probability is < 1 (ORPO needs log p < 0).
    def logps(tokens: torch.Tensor) -> torch.Tensor:
        return -(0.05 + 2.95 * torch.rand(batch, generator=generator, dtype=torch.float64)) * tokens

    policy = PairedLogps(logps(tokens_c), logps(tokens_r), tokens_c, tokens_r)
    reference = PairedLogps(logps(tokens_c), logps(tokens_r), tokens_c, tokens_r)
    return policy, reference


def random_unpaired(batch: int, seed: int) -> tuple[UnpairedLogps, UnpairedLogps]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 20, (batch,), generator=generator)
    kl_tokens = tokens.roll(1)

    def logps(count: torch.Tensor) -> torch.Tensor:
        return -(0.05 + 2.95 * torch.rand(batch, generator=generator, dtype=torch.float64)) * count

    desirable = torch.arange(batch) % 2 == 0
    policy = UnpairedLogps(logps(tokens), tokens, logps(kl_tokens), kl_tokens, desirable)
    reference = UnpairedLogps(logps(tokens), tokens, logps(kl_tokens), kl_tokens, desirable)
    return policy, reference


# Options with every non-default knob switched on, so the registry tests exercise all terms.
SAMPLE_OPTIONS = {
    "dpo": {"beta": 0.1, "label_smoothing": 0.1, "nll_weight": 0.5},
    "robust": {"beta": 0.1, "label_smoothing": 0.2, "nll_weight": 0.5},
    "hinge": {"beta": 0.1, "nll_weight": 0.5},
    "dpop": {"beta": 0.1, "lambda": 5.0, "nll_weight": 0.5},
    "ipo": {"beta": 0.5, "nll_weight": 0.5},
    "kto": {"beta": 0.5, "desirable_weight": 1.0, "undesirable_weight": 2.0},
    "simpo": {"beta": 2.0, "gamma": 0.5, "nll_weight": 0.5},
    "orpo": {"lambda": 0.1, "nll_weight": 0.5},
}


def run_registered(name: str, policy, reference, options: dict | None = None) -> LossOutput:
    spec = get_loss(name)
    return spec.compute(policy, reference if spec.needs_reference else None, options or SAMPLE_OPTIONS[name])


# ---------------------------------------------------------------------------------------------
# DPO / cDPO


def test_dpo_hand_values():
    # Row 0, β=0.1: Δc = −1 − (−2) = 1; Δr = −3 − (−2.5) = −0.5; δ = 1.5; βδ = 0.15; sp(0.15) = 0.6209570.
    # Row 1, β=0.1: Δc = −4 − (−3) = −1; Δr = −2 − (−3) = 1; δ = −2; βδ = −0.2; sp(−0.2) = 0.7981389.
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        f32(-1.0, -4.0), f32(-3.0, -2.0), f32(-2.0, -3.0), f32(-2.5, -3.0), beta=0.1
    )
    close(losses, 0.6209570477895321, math.log1p(math.exp(0.2)))
    close(chosen_rewards, 0.1, -0.1)  # β·Δc
    close(rejected_rewards, -0.05, 0.1)  # β·Δr


def test_dpo_hand_value_second_beta():
    # β=0.5: Δc = −4 − (−3) = −1; Δr = −2 − (−3) = 1; δ = −2; βδ = −1; sp(−1) = log(1 + e) = 1.3132617.
    losses, _, _ = dpo_loss(f32(-4.0), f32(-2.0), f32(-3.0), f32(-3.0), beta=0.5)
    close(losses, 1.3132616875182228)


def test_conservative_dpo_hand_value():
    # ε=0.1, βδ = 0.15 (row 0 above): 0.9·sp(0.15) + 0.1·sp(−0.15) = sp(0.15) + 0.1·0.15
    # = 0.6209570 + 0.015 = 0.6359570.
    losses, _, _ = dpo_loss(f32(-1.0), f32(-3.0), f32(-2.0), f32(-2.5), beta=0.1, label_smoothing=0.1)
    close(losses, 0.6359570477895321)


def test_dpo_gradient_matches_closed_form():
    # d sp(βδ)/d πc = −β σ(−βδ) = −0.1 · σ(−0.15) = −0.1 · 0.4625702 = −0.04625702; d/d πr is its negative.
    policy_chosen, policy_rejected = f32(-1.0).requires_grad_(), f32(-3.0).requires_grad_()
    losses, _, _ = dpo_loss(policy_chosen, policy_rejected, f32(-2.0), f32(-2.5), beta=0.1)
    losses.sum().backward()
    close(policy_chosen.grad, -0.04625701546562505)
    close(policy_rejected.grad, 0.04625701546562505)


def test_dpo_gradcheck_float64():
    reference_chosen, reference_rejected = f64(-2.0, -3.0, -7.5), f64(-2.5, -3.0, -1.0)

    def loss(policy_chosen, policy_rejected):
        return dpo_loss(
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            beta=0.3,
            label_smoothing=0.15,
        )[0]

    assert torch.autograd.gradcheck(
        loss, (f64(-1.0, -4.0, -6.0, requires_grad=True), f64(-3.0, -2.0, -1.2, requires_grad=True))
    )


def test_dpo_equal_policy_and_reference_gives_log_two():
    # δ = 0 ⇒ −(1−ε) log σ(0) − ε log σ(0) = log 2 for every β and ε.
    policy, _ = random_policy_and_reference(batch=5, seed=0)
    for beta, label_smoothing in [(0.1, 0.0), (2.0, 0.0), (0.5, 0.3)]:
        losses, _, _ = dpo_loss(
            policy.chosen,
            policy.rejected,
            policy.chosen,
            policy.rejected,
            beta=beta,
            label_smoothing=label_smoothing,
        )
        close(losses, *[math.log(2.0)] * 5)


def test_label_smoothing_zero_is_plain_dpo():
    policy, reference = random_policy_and_reference(batch=6, seed=1)
    args = (policy.chosen, policy.rejected, reference.chosen, reference.rejected)
    plain, _, _ = dpo_loss(*args, beta=0.2)
    smoothed, _, _ = dpo_loss(*args, beta=0.2, label_smoothing=0.0)
    assert torch.equal(plain, smoothed)
    assert not torch.allclose(plain, dpo_loss(*args, beta=0.2, label_smoothing=0.1)[0])


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    policy, reference = random_policy_and_reference(batch=8, seed=2)
    policy_chosen = policy.chosen.clone().requires_grad_()
    policy_rejected = policy.rejected.clone().requires_grad_()
    losses, _, _ = dpo_loss(policy_chosen, policy_rejected, reference.chosen, reference.rejected, beta=0.1)
    losses.sum().backward()
    # Gradient descent moves against the gradient: chosen log-probs go up, rejected go down.
    assert (policy_chosen.grad < 0).all()
    assert (policy_rejected.grad > 0).all()


def test_reference_receives_no_gradient():
    reference_chosen = f32(-2.0).requires_grad_()
    losses, _, _ = dpo_loss(f32(-1.0).requires_grad_(), f32(-3.0), reference_chosen, f32(-2.5), beta=0.1)
    (gradient,) = torch.autograd.grad(losses.sum(), [reference_chosen], allow_unused=True)
    assert gradient is None


@pytest.mark.parametrize("label_smoothing", [-0.1, 0.51, 0.7])
def test_dpo_rejects_bad_label_smoothing(label_smoothing):
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(f32(-1.0), f32(-3.0), f32(-2.0), f32(-2.5), beta=0.1, label_smoothing=label_smoothing)


def test_conservative_dpo_accepts_one_half():
    # ε = 0.5, x = βδ = 0.15: 0.5·sp(0.15) + 0.5·sp(−0.15) = sp(0.15) + 0.5·0.15 = 0.6209570 + 0.075 = 0.6959570.
    losses, _, _ = dpo_loss(f32(-1.0), f32(-3.0), f32(-2.0), f32(-2.5), beta=0.1, label_smoothing=0.5)
    close(losses, 0.6959570477895321)


def test_dpo_rejects_non_positive_beta():
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(f32(-1.0), f32(-3.0), f32(-2.0), f32(-2.5), beta=0.0)


def test_half_precision_inputs_compute_in_float32():
    # βδ = 0.15 as in test_dpo_hand_values; every input is exactly representable in bfloat16.
    inputs = [f32(v).to(torch.bfloat16) for v in (-1.0, -3.0, -2.0, -2.5)]
    losses, chosen_rewards, _ = dpo_loss(*inputs, beta=0.1)
    assert losses.dtype == torch.float32 and chosen_rewards.dtype == torch.float32
    close(losses, 0.6209570477895321)


def test_mismatched_shapes_are_rejected():
    with pytest.raises(ValueError, match="1-D tensors of one non-zero batch size"):
        dpo_loss(f32(-1.0, -2.0), f32(-3.0), f32(-2.0), f32(-2.5), beta=0.1)
    with pytest.raises(ValueError, match="1-D"):
        dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), beta=0.1)


# ---------------------------------------------------------------------------------------------
# Robust DPO


def test_robust_hand_values():
    # Numerator −(1−ε) log σ(x) + ε log σ(−x) = (1−ε) sp(x) − ε (sp(x) + x) = (1−2ε) sp(x) − ε x,
    # so the loss is sp(x) − ε x / (1 − 2ε).
    # Row 0: x = βδ = 0.15, ε = 0.2: 0.6209570 − 0.2·0.15/0.6 = 0.6209570 − 0.05 = 0.5709570.
    losses, chosen_rewards, _ = robust_dpo_loss(
        f32(-1.0), f32(-3.0), f32(-2.0), f32(-2.5), beta=0.1, label_smoothing=0.2
    )
    close(losses, 0.570957047789532)
    close(chosen_rewards, 0.1)
    # Row 1: β=0.5, δ = −2, x = −1, ε = 0.25: 1.3132617 − 0.25·(−1)/0.5 = 1.3132617 + 0.5 = 1.8132617.
    losses, _, _ = robust_dpo_loss(f32(-4.0), f32(-2.0), f32(-3.0), f32(-3.0), beta=0.5, label_smoothing=0.25)
    close(losses, 1.8132616875182228)


def test_robust_with_zero_noise_is_dpo():
    policy, reference = random_policy_and_reference(batch=6, seed=3)
    args = (policy.chosen, policy.rejected, reference.chosen, reference.rejected)
    close(
        robust_dpo_loss(*args, beta=0.3, label_smoothing=0.0)[0],
        *dpo_loss(*args, beta=0.3)[0].tolist(),
        tol=1e-12,
    )


def test_robust_gradcheck_float64():
    reference_chosen, reference_rejected = f64(-2.0, -3.0), f64(-2.5, -1.0)

    def loss(policy_chosen, policy_rejected):
        return robust_dpo_loss(
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            beta=0.4,
            label_smoothing=0.3,
        )[0]

    assert torch.autograd.gradcheck(
        loss, (f64(-1.0, -4.0, requires_grad=True), f64(-3.0, -2.0, requires_grad=True))
    )


@pytest.mark.parametrize("label_smoothing", [0.5, 0.6, -0.01])
def test_robust_rejects_noise_rate_outside_range(label_smoothing):
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_dpo_loss(f32(-1.0), f32(-3.0), f32(-2.0), f32(-2.5), beta=0.1, label_smoothing=label_smoothing)
    policy = PairedLogps(f32(-1.0), f32(-3.0), f32(1.0), f32(1.0))
    reference = PairedLogps(f32(-2.0), f32(-2.5), f32(1.0), f32(1.0))
    with pytest.raises(ValueError, match="label_smoothing"):
        get_loss("robust").compute(
            policy, reference, {"beta": 0.1, "label_smoothing": label_smoothing, "nll_weight": 0.0}
        )


# ---------------------------------------------------------------------------------------------
# Hinge


def test_hinge_hand_values():
    # β=0.1, δ=1.5: max(0, 1 − 0.15) = 0.85.   β=0.5, δ=−2: max(0, 1 − (−1)) = 2.
    close(hinge_loss(f32(-1.0), f32(-3.0), f32(-2.0), f32(-2.5), beta=0.1)[0], 0.85)
    close(hinge_loss(f32(-4.0), f32(-2.0), f32(-3.0), f32(-3.0), beta=0.5)[0], 2.0)
    # β=1, δ=1.5: max(0, 1 − 1.5) = 0, and a satisfied margin passes no gradient.
    policy_chosen = f32(-1.0).requires_grad_()
    losses, _, _ = hinge_loss(policy_chosen, f32(-3.0), f32(-2.0), f32(-2.5), beta=1.0)
    losses.sum().backward()
    close(losses, 0.0)
    close(policy_chosen.grad, 0.0)


def test_hinge_gradcheck_float64():
    # Points keep 1 − βδ away from the kink at 0 (βδ = 0.15 and −1).
    reference_chosen, reference_rejected = f64(-2.0, -3.0), f64(-2.5, -3.0)

    def loss(policy_chosen, policy_rejected):
        return hinge_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.1)[0]

    assert torch.autograd.gradcheck(
        loss, (f64(-1.0, -4.0, requires_grad=True), f64(-3.0, 6.0, requires_grad=True))
    )


# ---------------------------------------------------------------------------------------------
# DPO-Positive


def test_dpop_hand_values():
    # Row 0, β=0.1, λ=2: Δc = 1 ≥ 0, so the penalty is 0 and the loss is DPO's: sp(0.15) = 0.6209570.
    # Row 1: Δc = −4 − (−3) = −1, penalty max(0, 1) = 1; Δr = 1; δ = −2;
    # β(δ − λ·1) = 0.1·(−2 − 2) = −0.4; sp(−0.4) = log(1 + e^0.4) = 0.9130153.
    losses, chosen_rewards, rejected_rewards, penalty = dpop_loss(
        f32(-1.0, -4.0), f32(-3.0, -2.0), f32(-2.0, -3.0), f32(-2.5, -3.0), beta=0.1, lambda_=2.0
    )
    close(losses, 0.6209570477895321, 0.9130152523999526)
    close(chosen_rewards, 0.1, -0.1)
    close(rejected_rewards, -0.05, 0.1)
    close(penalty, 0.0, 1.0)


def test_dpop_gradient_matches_closed_form():
    # Row 1 above: x = −0.4; d sp(x)/d πc = −σ(−x)·β(1 + λ) = −σ(0.4)·0.3 = −0.1796063 (DPO's slope β
    # times 1 + λ); d/d πr = σ(0.4)·β = 0.0598688.
    policy_chosen, policy_rejected = f32(-4.0).requires_grad_(), f32(-2.0).requires_grad_()
    losses, _, _, _ = dpop_loss(policy_chosen, policy_rejected, f32(-3.0), f32(-3.0), beta=0.1, lambda_=2.0)
    losses.sum().backward()
    close(policy_chosen.grad, -0.1796062980337356)
    close(policy_rejected.grad, 0.0598687660112452)


def test_dpop_is_dpo_while_the_chosen_side_has_not_fallen_and_at_lambda_zero():
    policy, reference = random_policy_and_reference(batch=6, seed=11)
    args = (policy.chosen, policy.rejected, reference.chosen, reference.rejected)
    dpo = dpo_loss(*args, beta=0.2)[0]
    torch.testing.assert_close(dpop_loss(*args, beta=0.2, lambda_=0.0)[0], dpo)
    risen = policy.chosen >= reference.chosen
    assert risen.any() and (~risen).any()
    with_penalty = dpop_loss(*args, beta=0.2, lambda_=50.0)[0]
    torch.testing.assert_close(with_penalty[risen], dpo[risen])
    assert (with_penalty[~risen] > dpo[~risen]).all()


def test_dpop_gradcheck_float64():
    # Points keep Δc away from the penalty's kink at 0 (Δc = 1, −1, −4.5).
    reference_chosen, reference_rejected = f64(-2.0, -3.0, -1.5), f64(-2.5, -3.0, -1.0)

    def loss(policy_chosen, policy_rejected):
        return dpop_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.3,
                         lambda_=4.0)[0]

    assert torch.autograd.gradcheck(
        loss, (f64(-1.0, -4.0, -6.0, requires_grad=True), f64(-3.0, -2.0, -1.2, requires_grad=True))
    )


def test_dpop_rejects_negative_lambda():
    with pytest.raises(ValueError, match="lambda must be >= 0"):
        dpop_loss(f32(-1.0), f32(-2.0), f32(-1.0), f32(-2.0), beta=0.1, lambda_=-1.0)


# ---------------------------------------------------------------------------------------------
# IPO


def test_ipo_hand_values():
    # Row 0, β=0.5 (target 1/(2β) = 1): Δc/|yc| = (−6 − (−8))/4 = 0.5; Δr/|yr| = (−9 − (−6))/3 = −1;
    # h = 1.5; (1.5 − 1)² = 0.25.
    # Row 1, β=0.5: Δc/|yc| = (−10 − (−12))/2 = 1; Δr/|yr| = (−5 − (−5))/5 = 0; h = 1; (1 − 1)² = 0.
    losses, chosen_rewards, rejected_rewards = ipo_loss(
        f32(-6.0, -10.0), f32(-9.0, -5.0), f32(-8.0, -12.0), f32(-6.0, -5.0), f32(4, 2), f32(3, 5), beta=0.5
    )
    close(losses, 0.25, 0.0)
    close(chosen_rewards, 0.5, 1.0)  # per-token log-ratios, no β
    close(rejected_rewards, -1.0, 0.0)
    # β=0.1 (target 5) on row 1: (1 − 5)² = 16.
    losses, _, _ = ipo_loss(f32(-10.0), f32(-5.0), f32(-12.0), f32(-5.0), f32(2), f32(5), beta=0.1)
    close(losses, 16.0)


def test_ipo_averages_per_token_not_summed():
    # Same summed log-ratios as row 0 above but |yc| = 1, |yr| = 1: h = 2 − (−3) = 5, (5 − 1)² = 16.
    losses, _, _ = ipo_loss(f32(-6.0), f32(-9.0), f32(-8.0), f32(-6.0), f32(1), f32(1), beta=0.5)
    close(losses, 16.0)


def test_ipo_equal_policy_and_reference_gives_squared_target():
    policy, _ = random_policy_and_reference(batch=4, seed=4)
    for beta in (0.1, 0.5, 2.0):
        losses, _, _ = ipo_loss(
            policy.chosen,
            policy.rejected,
            policy.chosen,
            policy.rejected,
            policy.chosen_tokens,
            policy.rejected_tokens,
            beta=beta,
        )
        close(losses, *[(1.0 / (2.0 * beta)) ** 2] * 4, tol=1e-10)


def test_ipo_gradcheck_float64():
    reference_chosen, reference_rejected = f64(-8.0, -12.0), f64(-6.0, -5.0)
    chosen_tokens, rejected_tokens = torch.tensor([4, 2]), torch.tensor([3, 5])

    def loss(policy_chosen, policy_rejected):
        return ipo_loss(
            policy_chosen,
            policy_rejected,
            reference_chosen,
            reference_rejected,
            chosen_tokens,
            rejected_tokens,
            beta=0.5,
        )[0]

    assert torch.autograd.gradcheck(
        loss, (f64(-6.0, -10.0, requires_grad=True), f64(-9.0, -5.0, requires_grad=True))
    )


def test_token_counts_below_one_are_rejected():
    with pytest.raises(ValueError, match="rejected_tokens must be >= 1"):
        ipo_loss(f32(-6.0), f32(-9.0), f32(-8.0), f32(-6.0), f32(4), f32(0), beta=0.5)


# ---------------------------------------------------------------------------------------------
# KTO

# β=0.5, λD=1, λU=2. Δ = [−2 − (−3), −5 − (−4), −3 − (−3)] = [1, −1, 0].
# KL log-ratios: [−4 − (−4.5), −6 − (−6.25), −5 − (−5.75)] = [0.5, 0.25, 0.75]; z = max(0, mean) = 0.5.
KTO_POLICY = UnpairedLogps(
    f32(-2.0, -5.0, -3.0),
    f32(2, 5, 3),
    f32(-4.0, -6.0, -5.0),
    f32(4, 6, 5),
    torch.tensor([True, False, True]),
)
KTO_REFERENCE = UnpairedLogps(
    f32(-3.0, -4.0, -3.0), f32(2, 5, 3), f32(-4.5, -6.25, -5.75), f32(4, 6, 5), KTO_POLICY.desirable
)


def kto_on(policy: UnpairedLogps, reference: UnpairedLogps, **kwargs):
    return kto_loss(
        policy.completion,
        reference.completion,
        policy.kl_completion,
        reference.kl_completion,
        policy.desirable,
        **kwargs,
    )


def test_kto_hand_values():
    # Row 0 desirable:   1·(1 − σ(0.5·(1 − 0.5)))    = 1 − σ(0.25) = σ(−0.25) = 0.4378235.
    # Row 1 undesirable: 2·(1 − σ(0.5·(0.5 − (−1)))) = 2·σ(−0.75)               = 0.6416426.
    # Row 2 desirable:   1·(1 − σ(0.5·(0 − 0.5)))    = 1 − σ(−0.25) = σ(0.25)  = 0.5621765.
    losses, rewards, kl = kto_on(
        KTO_POLICY, KTO_REFERENCE, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0
    )
    close(losses, 0.43782349911420193, 0.641642601649214, 0.5621765008857981)
    close(rewards, 0.5, -0.5, 0.0)  # β·Δ
    close(kl, 0.5)
    assert kl.shape == (1,)


def test_kto_reference_point_is_clamped_at_zero():
    # KL log-ratios all −1 ⇒ mean −1 ⇒ z = max(0, −1) = 0. Row 0: 1 − σ(0.5·(1 − 0)) = σ(−0.5) = 0.3775407.
    reference = UnpairedLogps(
        KTO_REFERENCE.completion,
        KTO_REFERENCE.tokens,
        KTO_POLICY.kl_completion + 1.0,
        KTO_REFERENCE.kl_tokens,
        KTO_POLICY.desirable,
    )
    losses, _, kl = kto_on(KTO_POLICY, reference, beta=0.5)
    close(kl, 0.0)
    close(losses[:1], 0.3775406687981454)


def test_kto_reference_point_is_detached():
    policy_kl = KTO_POLICY.kl_completion.clone().requires_grad_()
    policy_completion = KTO_POLICY.completion.clone().requires_grad_()
    losses, _, kl = kto_loss(
        policy_completion,
        KTO_REFERENCE.completion,
        policy_kl,
        KTO_REFERENCE.kl_completion,
        KTO_POLICY.desirable,
        beta=0.5,
    )
    gradient_kl, gradient_completion = torch.autograd.grad(
        losses.sum(), [policy_kl, policy_completion], allow_unused=True
    )
    assert gradient_kl is None
    assert gradient_completion is not None and (gradient_completion != 0).all()
    assert not kl.requires_grad


def test_kto_gradcheck_float64():
    reference_completion = f64(-3.0, -4.0, -3.0)
    policy_kl, reference_kl = f64(-4.0, -6.0, -5.0), f64(-4.5, -6.25, -5.75)
    desirable = torch.tensor([True, False, True])

    def loss(policy_completion):
        return kto_loss(
            policy_completion,
            reference_completion,
            policy_kl,
            reference_kl,
            desirable,
            beta=0.5,
            desirable_weight=1.0,
            undesirable_weight=2.0,
        )[0]

    assert torch.autograd.gradcheck(loss, (f64(-2.0, -5.0, -3.0, requires_grad=True),))


def test_kto_batch_of_one_is_rejected():
    with pytest.raises(ValueError, match="at least 2 rows"):
        kto_loss(f32(-2.0), f32(-3.0), f32(-4.0), f32(-4.5), torch.tensor([True]), beta=0.5)


def test_kto_desirable_must_be_bool():
    with pytest.raises(ValueError, match="bool"):
        kto_loss(
            f32(-2.0, -1.0), f32(-3.0, -1.0), f32(-4.0, -1.0), f32(-4.5, -1.0), torch.tensor([1, 0]), beta=0.5
        )


# ---------------------------------------------------------------------------------------------
# SimPO


def test_simpo_hand_values():
    # Row 0, β=2, γ=0.5: rewards 2·(−4/4) = −2 and 2·(−9/6) = −3; margin 1; sp(1 − 0.5) = sp(0.5) = 0.4740770.
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        f32(-4.0), f32(-9.0), f32(4), f32(6), beta=2.0, gamma=0.5
    )
    close(losses, 0.4740769841801067)
    close(chosen_rewards, -2.0)
    close(rejected_rewards, -3.0)
    # Row 1, β=2.5, γ=1: rewards 2.5·(−6/3) = −5 and 2.5·(−4/4) = −2.5; sp(−2.5 − 1) = sp(−3.5) = 3.5297504.
    losses, _, _ = simpo_loss(f32(-6.0), f32(-4.0), torch.tensor([3]), torch.tensor([4]), beta=2.5, gamma=1.0)
    close(losses, 3.5297504182726205)


def test_simpo_gradcheck_float64():
    chosen_tokens, rejected_tokens = torch.tensor([4, 3]), torch.tensor([6, 4])

    def loss(policy_chosen, policy_rejected):
        return simpo_loss(
            policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, beta=2.0, gamma=0.5
        )[0]

    assert torch.autograd.gradcheck(
        loss, (f64(-4.0, -6.0, requires_grad=True), f64(-9.0, -4.0, requires_grad=True))
    )


# ---------------------------------------------------------------------------------------------
# ORPO


def test_orpo_hand_values():
    # Row 0, λ=0.1: chosen mean log p = −2 ln 2 / 2 = ln 0.5, odds = 0.5/0.5 = 1, log odds = 0;
    # rejected mean log p = −3 ln 4 / 3 = ln 0.25, odds = 0.25/0.75 = 1/3, log odds = −ln 3;
    # log odds ratio = ln 3; −log σ(ln 3) = −log(3/4) = ln(4/3) = 0.2876821;
    # NLL = −ln 0.5 = ln 2 = 0.6931472; loss = 0.6931472 + 0.1·0.2876821 = 0.7219154.
    losses, chosen_rewards, rejected_rewards, log_odds_ratio = orpo_loss(
        f32(-2 * math.log(2)), f32(-3 * math.log(4)), f32(2), f32(3), odds_ratio_weight=0.1
    )
    close(losses, 0.7219153878051233)
    close(chosen_rewards, math.log(0.5))  # mean token log-probs
    close(rejected_rewards, math.log(0.25))
    close(log_odds_ratio, math.log(3))


def test_orpo_hand_value_near_probability_one():
    # λ=0.5: chosen p = 0.2 (|yc| = 1), odds 0.25, log odds = −ln 4;
    # rejected p = 0.8 (|yr| = 2, summed 2 ln 0.8), odds 4, log odds = ln 4 (this side takes the expm1 branch);
    # log odds ratio = −2 ln 4 = −ln 16; −log σ(−ln 16) = ln(1 + 16) = ln 17 = 2.8332133;
    # loss = ln 5 + 0.5·ln 17 = 1.6094379 + 1.4166067 = 3.0260446.
    losses, _, _, log_odds_ratio = orpo_loss(
        f32(math.log(0.2)), f32(2 * math.log(0.8)), f32(1), f32(2), odds_ratio_weight=0.5
    )
    close(losses, 3.026044584462208, tol=1e-5)
    close(log_odds_ratio, -math.log(16), tol=1e-5)


def test_orpo_log_odds_stay_finite_at_the_extremes():
    # log p = −1e−6: log odds = −1e−6 − log(1 − e^−1e−6) ≈ 13.8155 (float64 reference below);
    # log p = −60: log odds = −60 − log(1 − e^−60) ≈ −60 (1 − e^−60 rounds to 1).
    chosen = torch.tensor([-1e-6], dtype=torch.float32)
    rejected = torch.tensor([-60.0], dtype=torch.float32)
    _, _, _, log_odds_ratio = orpo_loss(chosen, rejected, f32(1), f32(1), odds_ratio_weight=1.0)
    expected = (-1e-6 - math.log(-math.expm1(-1e-6))) - (-60.0)
    close(log_odds_ratio, expected, tol=1e-4)


def test_orpo_gradcheck_float64():
    chosen_tokens, rejected_tokens = torch.tensor([2, 1]), torch.tensor([3, 2])

    def loss(policy_chosen, policy_rejected):
        return orpo_loss(
            policy_chosen, policy_rejected, chosen_tokens, rejected_tokens, odds_ratio_weight=0.5
        )[0]

    # Mean log-probs −0.6 and −0.223 take the expm1 branch, −1.609 and −1.386 the log1p branch.
    assert torch.autograd.gradcheck(
        loss, (f64(-1.2, -1.609, requires_grad=True), f64(-4.159, -0.446, requires_grad=True))
    )


def test_length_normalised_nll_hand_value():
    # −(−6)/4 = 1.5; −(−1)/2 = 0.5.
    close(length_normalised_nll(f32(-6.0, -1.0), torch.tensor([4, 2])), 1.5, 0.5)


# ---------------------------------------------------------------------------------------------
# Float32 against a float64 reference, for every registered loss.


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float32_matches_float64_reference(name):
    spec = get_loss(name)
    policy64, reference64 = (random_policy_and_reference if spec.paired else random_unpaired)(batch=6, seed=5)
    output64 = run_registered(name, policy64, reference64)
    output32 = run_registered(name, to_float32(policy64), to_float32(reference64))
    assert output32.losses.dtype == torch.float32
    torch.testing.assert_close(output32.losses.double(), output64.losses, atol=1e-5, rtol=1e-5)
    for key, value in output64.metrics.items():
        torch.testing.assert_close(output32.metrics[key].double(), value, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Registry adapters and metrics


def test_registry_flags():
    flags = {
        name: (spec.needs_reference, spec.paired, spec.uses_token_counts, spec.reward_kind)
        for name, spec in LOSSES.items()
    }
    assert flags == {
        "dpo": (True, True, False, "sum"),
        "robust": (True, True, False, "sum"),
        "hinge": (True, True, False, "sum"),
        "dpop": (True, True, False, "sum"),
        "ipo": (True, True, True, "mean"),
        "kto": (True, False, False, "sum"),
        "simpo": (False, True, True, "mean"),
        "orpo": (False, True, True, "mean"),
    }
    assert all(spec.name == name for name, spec in LOSSES.items())


def test_registry_option_names():
    assert {name: spec.options for name, spec in LOSSES.items()} == {
        "dpo": ("beta", "label_smoothing", "nll_weight"),
        "robust": ("beta", "label_smoothing", "nll_weight"),
        "hinge": ("beta", "nll_weight"),
        "dpop": ("beta", "lambda", "nll_weight"),
        "ipo": ("beta", "nll_weight"),
        "kto": ("beta", "desirable_weight", "undesirable_weight"),
        "simpo": ("beta", "gamma", "nll_weight"),
        "orpo": ("lambda", "nll_weight"),
    }


def test_get_loss_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as error:
        get_loss("dpoo")
    message = str(error.value)
    assert "dpoo" in message
    for name in LOSSES:
        assert name in message


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compute_rejects_unknown_and_missing_options(name):
    policy, reference = (random_policy_and_reference if LOSSES[name].paired else random_unpaired)(
        batch=4, seed=6
    )
    with pytest.raises(ValueError, match="unknown: \\['temperature'\\]"):
        run_registered(name, policy, reference, {**SAMPLE_OPTIONS[name], "temperature": 1.0})
    first, *rest = LOSSES[name].options
    with pytest.raises(ValueError, match=f"missing: \\['{first}'\\]"):
        run_registered(name, policy, reference, {key: SAMPLE_OPTIONS[name][key] for key in rest})
    with pytest.raises(ValueError, match=f"option '{first}' must be a finite number"):
        run_registered(name, policy, reference, {**SAMPLE_OPTIONS[name], first: "0.1"})


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compute_output_contract(name):
    spec = get_loss(name)
    policy, reference = (random_policy_and_reference if spec.paired else random_unpaired)(batch=4, seed=7)
    output = run_registered(name, policy, reference)
    assert output.losses.shape == (4,)
    assert torch.isfinite(output.losses).all()
    expected_keys = (
        {"kl", "rewards/desirable", "rewards/undesirable", "logps/desirable", "logps/undesirable"}
        if not spec.paired
        else {
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/accuracies",
            "logps/chosen",
            "logps/rejected",
            "nll",
        }
        | ({"log_odds_ratio"} if name == "orpo" else set())
        | ({"penalty"} if name == "dpop" else set())
    )
    assert set(output.metrics) == expected_keys
    for key, value in output.metrics.items():
        assert value.dim() == 1, key
        assert not value.requires_grad, key


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compute_matches_plain_function(name):
    spec = get_loss(name)
    policy, reference = (random_policy_and_reference if spec.paired else random_unpaired)(batch=5, seed=8)
    options = SAMPLE_OPTIONS[name]
    output = run_registered(name, policy, reference)
    args = (policy.chosen, policy.rejected, reference.chosen, reference.rejected) if spec.paired else ()
    tokens = (policy.chosen_tokens, policy.rejected_tokens) if spec.paired else ()
    if name == "dpo":
        expected = dpo_loss(*args, beta=options["beta"], label_smoothing=options["label_smoothing"])[0]
    elif name == "robust":
        expected = robust_dpo_loss(*args, beta=options["beta"], label_smoothing=options["label_smoothing"])[0]
    elif name == "hinge":
        expected = hinge_loss(*args, beta=options["beta"])[0]
    elif name == "dpop":
        expected = dpop_loss(*args, beta=options["beta"], lambda_=options["lambda"])[0]
    elif name == "ipo":
        expected = ipo_loss(*args, *tokens, beta=options["beta"])[0]
    elif name == "simpo":
        expected = simpo_loss(
            policy.chosen, policy.rejected, *tokens, beta=options["beta"], gamma=options["gamma"]
        )[0]
    elif name == "orpo":
        expected = orpo_loss(policy.chosen, policy.rejected, *tokens, odds_ratio_weight=options["lambda"])[0]
    else:
        expected = kto_on(
            policy,
            reference,
            beta=options["beta"],
            desirable_weight=options["desirable_weight"],
            undesirable_weight=options["undesirable_weight"],
        )[0]
    if spec.paired:
        # Every paired sample option has nll_weight = 0.5: the RPO term is added on top.
        expected = expected + 0.5 * length_normalised_nll(policy.chosen, policy.chosen_tokens)
    torch.testing.assert_close(output.losses, expected, atol=1e-12, rtol=1e-12)


def test_dpo_metrics_hand_values():
    # Row 0 of test_dpo_hand_values: β·Δc = 0.1, β·Δr = −0.05, margin 0.15, chosen ahead.
    # Row 1: β·Δc = −0.1, β·Δr = 0.1, margin −0.2, rejected ahead.
    # RPO, nll_weight=0.5 with |yc| = [4, 2]: NLL = [1/4, 4/2] = [0.25, 2];
    # losses = [0.6209570 + 0.125, 0.7981389 + 1] = [0.7459570, 1.7981389].
    policy = PairedLogps(f32(-1.0, -4.0), f32(-3.0, -2.0), torch.tensor([4, 2]), torch.tensor([3, 3]))
    reference = PairedLogps(f32(-2.0, -3.0), f32(-2.5, -3.0), torch.tensor([4, 2]), torch.tensor([3, 3]))
    output = get_loss("dpo").compute(
        policy, reference, {"beta": 0.1, "label_smoothing": 0.0, "nll_weight": 0.5}
    )
    close(output.losses, 0.6209570477895321 + 0.125, math.log1p(math.exp(0.2)) + 1.0)
    close(output.metrics["rewards/chosen"], 0.1, -0.1)
    close(output.metrics["rewards/rejected"], -0.05, 0.1)
    close(output.metrics["rewards/margins"], 0.15, -0.2)
    close(output.metrics["rewards/accuracies"], 1.0, 0.0)
    close(output.metrics["logps/chosen"], -1.0, -4.0)
    close(output.metrics["logps/rejected"], -3.0, -2.0)
    close(output.metrics["nll"], 0.25, 2.0)


@pytest.mark.parametrize("name", [name for name, spec in LOSSES.items() if spec.paired])
def test_zero_nll_weight_changes_nothing(name):
    policy, reference = random_policy_and_reference(batch=5, seed=9)
    policy_chosen = policy.chosen.clone().requires_grad_()
    policy = PairedLogps(policy_chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens)
    without = run_registered(name, policy, reference, {**SAMPLE_OPTIONS[name], "nll_weight": 0.0})
    (gradient_without,) = torch.autograd.grad(without.losses.sum(), [policy_chosen])
    with_rpo = run_registered(name, policy, reference, {**SAMPLE_OPTIONS[name], "nll_weight": 0.3})
    (gradient_with,) = torch.autograd.grad(with_rpo.losses.sum(), [policy_chosen])
    plain_losses = {
        "dpo": lambda: dpo_loss(
            policy_chosen,
            policy.rejected,
            reference.chosen,
            reference.rejected,
            beta=0.1,
            label_smoothing=0.1,
        ),
        "robust": lambda: robust_dpo_loss(
            policy_chosen,
            policy.rejected,
            reference.chosen,
            reference.rejected,
            beta=0.1,
            label_smoothing=0.2,
        ),
        "hinge": lambda: hinge_loss(
            policy_chosen, policy.rejected, reference.chosen, reference.rejected, beta=0.1
        ),
        "dpop": lambda: dpop_loss(
            policy_chosen, policy.rejected, reference.chosen, reference.rejected, beta=0.1, lambda_=5.0
        ),
        "ipo": lambda: ipo_loss(
            policy_chosen,
            policy.rejected,
            reference.chosen,
            reference.rejected,
            policy.chosen_tokens,
            policy.rejected_tokens,
            beta=0.5,
        ),
        "simpo": lambda: simpo_loss(
            policy_chosen, policy.rejected, policy.chosen_tokens, policy.rejected_tokens, beta=2.0, gamma=0.5
        ),
        "orpo": lambda: orpo_loss(
            policy_chosen,
            policy.rejected,
            policy.chosen_tokens,
            policy.rejected_tokens,
            odds_ratio_weight=0.1,
        ),
    }
    assert torch.equal(without.losses, plain_losses[name]()[0])
    assert ("nll" in without.metrics) == (name == "orpo")
    # The RPO term's gradient on πc is −nll_weight/|yc|, exactly the difference between the two runs.
    torch.testing.assert_close(gradient_with - gradient_without, -0.3 / policy.chosen_tokens.double())


def test_orpo_metrics_report_nll_and_log_odds_ratio():
    # Row 0 of test_orpo_hand_values: NLL = ln 2, log odds ratio = ln 3, rewards = mean log-probs.
    policy = PairedLogps(f32(-2 * math.log(2)), f32(-3 * math.log(4)), f32(2), f32(3))
    output = get_loss("orpo").compute(policy, None, {"lambda": 0.1, "nll_weight": 0.0})
    close(output.losses, 0.7219153878051233)
    close(output.metrics["nll"], math.log(2))
    close(output.metrics["log_odds_ratio"], math.log(3))
    close(output.metrics["rewards/margins"], math.log(0.5) - math.log(0.25))
    close(output.metrics["rewards/accuracies"], 1.0)


def test_ipo_and_simpo_metrics_are_per_token():
    # IPO row 0: rewards Δc/|yc| = 0.5, Δr/|yr| = −1, margin 1.5 = h.
    policy = PairedLogps(f32(-6.0), f32(-9.0), f32(4), f32(3))
    reference = PairedLogps(f32(-8.0), f32(-6.0), f32(4), f32(3))
    output = get_loss("ipo").compute(policy, reference, {"beta": 0.5, "nll_weight": 0.0})
    close(output.metrics["rewards/margins"], 1.5)
    # SimPO: 2·(−6/4) = −3 and 2·(−9/3) = −6, margin 3.
    output = get_loss("simpo").compute(policy, None, {"beta": 2.0, "gamma": 0.5, "nll_weight": 0.0})
    close(output.metrics["rewards/chosen"], -3.0)
    close(output.metrics["rewards/margins"], 3.0)


def test_kto_metrics_split_by_kind():
    options = {"beta": 0.5, "desirable_weight": 1.0, "undesirable_weight": 2.0}
    output = get_loss("kto").compute(KTO_POLICY, KTO_REFERENCE, options)
    close(output.metrics["kl"], 0.5)
    close(output.metrics["rewards/desirable"], 0.5, 0.0)  # β·Δ on rows 0 and 2
    close(output.metrics["rewards/undesirable"], -0.5)
    close(output.metrics["logps/desirable"], -2.0, -3.0)
    close(output.metrics["logps/undesirable"], -5.0)
    # A batch with no undesirable row yields empty tensors for that kind.
    all_desirable = torch.tensor([True, True, True])
    policy = UnpairedLogps(
        KTO_POLICY.completion,
        KTO_POLICY.tokens,
        KTO_POLICY.kl_completion,
        KTO_POLICY.kl_tokens,
        all_desirable,
    )
    output = get_loss("kto").compute(policy, KTO_REFERENCE, options)
    assert output.metrics["rewards/undesirable"].shape == (0,)
    assert output.metrics["logps/undesirable"].shape == (0,)


def test_compute_checks_reference_presence_and_batch_kind():
    paired = PairedLogps(f32(-1.0), f32(-3.0), f32(1), f32(1))
    unpaired = UnpairedLogps(
        f32(-2.0, -1.0), f32(2, 1), f32(-4.0, -1.0), f32(4, 1), torch.tensor([True, False])
    )
    with pytest.raises(ValueError, match="needs reference"):
        get_loss("dpo").compute(paired, None, SAMPLE_OPTIONS["dpo"])
    with pytest.raises(ValueError, match="reference-free"):
        get_loss("simpo").compute(paired, paired, SAMPLE_OPTIONS["simpo"])
    with pytest.raises(TypeError, match="UnpairedLogps"):
        get_loss("kto").compute(paired, paired, SAMPLE_OPTIONS["kto"])
    with pytest.raises(TypeError, match="PairedLogps"):
        get_loss("ipo").compute(unpaired, unpaired, SAMPLE_OPTIONS["ipo"])


def test_tied_rewards_count_half():
    # policy == reference ⇒ β·Δc = β·Δr = 0: an exact tie is right half the time, so accuracy is 0.5 (chance).
    policy, _ = random_policy_and_reference(batch=3, seed=10)
    output = get_loss("dpo").compute(policy, policy, {"beta": 0.1, "label_smoothing": 0.0, "nll_weight": 0.0})
    close(output.metrics["rewards/accuracies"], 0.5, 0.5, 0.5)
    close(output.losses, *[math.log(2.0)] * 3)
