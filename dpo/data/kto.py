"""Unpaired (KTO) rows: converting pairs, mismatched KL completions, label checks and balance.

KTO estimates its KL reference point from completions paired with prompts they do not belong to.
Because reference log-probs are computed once before training, those mismatched pairs are fixed in
advance: row ``i`` gets ``kl_completion_ids``, the completion of row ``partner[i]``, where ``partner``
follows a seeded random cycle through all rows (so no row is its own partner) and, where the data
allows, a partner with a different prompt. The KL completion is cut at its end so that the row's
prompt plus it fits ``max_length``; since the row's own completion kept at least one token, so does it.
"""

from __future__ import annotations

import numpy as np

from dpo.data.validate import DataError

RATIO_LOW, RATIO_HIGH = 1.0, 4.0 / 3.0


def pairs_to_unpaired(
    prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], seed: int
) -> dict[str, list]:
    """Every pair as two unpaired rows (chosen desirable, rejected undesirable), shuffled with ``seed``.

    Returns:
        Columns ``prompt_ids``, ``completion_ids``, ``label``; each completion appears exactly once.
    """
    all_prompts = prompts + prompts
    completions = chosen + rejected
    labels = [True] * len(chosen) + [False] * len(rejected)
    order = np.random.default_rng([seed, 0]).permutation(len(completions))
    return {
        "prompt_ids": [all_prompts[i] for i in order],
        "completion_ids": [completions[i] for i in order],
        "label": [labels[i] for i in order],
    }


def mismatched_partners(prompts: list[list[int]], seed: int) -> list[int]:
    """For each row, another row whose completion serves as its KL completion.

    A seeded random cycle visits every row once, so ``partner[i] != i`` and every completion is used
    once. Rows whose partner shares their prompt are then repaired by swapping partners with another
    row, when a swap gives both rows a partner with a different prompt.

    Args:
        prompts: the prompt token ids of each row (at least two rows).
        seed: the run's seed.
    """
    n = len(prompts)
    if n < 2:
        raise DataError(
            f"a split of unpaired rows has {n} row(s) but needs at least 2: each row's KL completion comes "
            "from another row (add rows, or raise data.eval_fraction or name a larger data.eval)"
        )
    rng = np.random.default_rng([seed, 1])
    cycle = rng.permutation(n)
    partner = [0] * n
    for position, row in enumerate(cycle):
        partner[row] = int(cycle[(position + 1) % n])
    keys = [tuple(p) for p in prompts]

    def fits(row: int, other: int) -> bool:
        return other != row and keys[other] != keys[row]

    for row in range(n):
        if fits(row, partner[row]):
            continue
        for other in (int(j) for j in rng.permutation(n)):
            if fits(row, partner[other]) and fits(other, partner[row]):
                partner[row], partner[other] = partner[other], partner[row]
                break
    return partner


def kl_completions(
    prompts: list[list[int]], completions: list[list[int]], seed: int, max_length: int
) -> list[list[int]]:
    """Each row's mismatched completion, cut at its end so that prompt + it fits ``max_length``."""
    partner = mismatched_partners(prompts, seed)
    return [completions[partner[i]][: max_length - len(prompts[i])] for i in range(len(prompts))]


def require_both_labels(labels: list[bool], source: str) -> None:
    """KTO needs desirable and undesirable rows."""
    desirable = sum(labels)
    if desirable == 0 or desirable == len(labels):
        kind = "desirable" if desirable else "undesirable"
        raise DataError(
            f"{source}: all {len(labels)} rows are {kind}; KTO needs both desirable and undesirable "
            "completions (check the label column and data.columns)"
        )


def kto_balance_warning(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """A warning when the weighted class ratio is outside the range the KTO paper recommends.

    The KTO paper (Ethayarajh et al., 2024, eq. 8) recommends
    ``1 <= desirable_weight * n_desirable / (undesirable_weight * n_undesirable) <= 4/3``.

    Returns:
        ``None`` inside that range; otherwise a message with the weights that would bring it inside.
    """
    if n_desirable <= 0 or n_undesirable <= 0:
        raise ValueError("kto_balance_warning needs at least one desirable and one undesirable row")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if RATIO_LOW <= ratio <= RATIO_HIGH:
        return None
    desirable_low = RATIO_LOW * undesirable_weight * n_undesirable / n_desirable
    undesirable_high = desirable_weight * n_desirable / (RATIO_LOW * n_undesirable)
    undesirable_low = desirable_weight * n_desirable / (RATIO_HIGH * n_undesirable)
    return (
        f"KTO class balance: desirable_weight * n_desirable / (undesirable_weight * n_undesirable) = "
        f"{desirable_weight:g} * {n_desirable} / ({undesirable_weight:g} * {n_undesirable}) = {ratio:.3f}, "
        f"outside [1, 4/3] (KTO paper, eq. 8). Set loss.desirable_weight in "
        f"[{desirable_low:.4g}, {RATIO_HIGH * desirable_low:.4g}] (keeping undesirable_weight "
        f"{undesirable_weight:g}), or loss.undesirable_weight in [{undesirable_low:.4g}, {undesirable_high:.4g}] "
        f"(keeping desirable_weight {desirable_weight:g})."
    )
