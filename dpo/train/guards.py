"""Guards: what a run's own numbers say about failures its loss cannot see, said once, in words.

A preference loss is satisfied by any policy that ranks the chosen answer above the rejected one, also by
one that makes both answers (and so its own answers) less likely: on pairs far from what the model would
write, DPO-family losses widen the margin mostly by pushing the rejected side down fast and the chosen side
down too (likelihood displacement; Razin et al. 2024, Pal et al. 2024). Held-out preference accuracy then
rises while the answers get worse. Two signs of it are checked at every log and evaluation:

* **Likelihood displacement.** The chosen answers' log-probability has fallen, since the start, by more
  than :data:`DISPLACEMENT_NATS_PER_TOKEN` nats per completion token on average, while preference
  accuracy has risen by at least :data:`DISPLACEMENT_ACCURACY_RISE` above its start (0.5 for training
  logs, where the untrained policy ties every pair; the before-training evaluation's for evaluations).
* **A saturated loss.** For :data:`SATURATION_LOGS` training logs in a row, the loss was at most
  :data:`SATURATION_LOSS` and the gradient norm at most :data:`SATURATION_GRAD_FRACTION` of the largest
  one logged: the pairs no longer teach anything, and what further steps still do is mostly displacement.

Each warning is given once per run, with what to try; ``train.warn: false`` turns both off.

"Since the start" is exact on evaluations: the before-training evaluation ran on the same held-out pairs.
On training logs it is the policy's log-prob minus the reference's on the same examples, which is the
change since the start when the reference is the policy's own starting point (the default: the base with
the adapter off); with ``reference.model_path`` or ``reference.adapter``, or a reference-free loss, training
logs carry no change values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from dpo.losses import PairedLogps, UnpairedLogps

Log = Callable[[str], None]

DISPLACEMENT_NATS_PER_TOKEN = 0.5
DISPLACEMENT_ACCURACY_RISE = 0.1
SATURATION_LOSS = 0.01
SATURATION_GRAD_FRACTION = 0.05
SATURATION_LOGS = 3

TRY = ("lower train.lr, raise loss.beta, add loss.nll_weight (RPO: keeps the chosen answers likely), use "
       "loss.name: dpop (DPO-Positive), or train on pairs the model itself wrote (dpo-train pairs)")


def logprob_metrics(policy: PairedLogps | UnpairedLogps, start: PairedLogps | UnpairedLogps | None
                    ) -> dict[str, Tensor]:
    """Per-example log-prob values for the guards: each side's log-prob per completion token, and with
    ``start`` (the same examples' log-probs at the start) the change since then, summed and per token.

    Args:
        policy: the policy's summed log-probs and token counts of a batch (``[B]`` tensors).
        start: the starting policy's values on the same examples, or None.

    Returns:
        ``logps/<side>_per_token`` and, with ``start``, ``change/<side>`` and ``change/<side>_per_token``,
        each a detached ``[B]`` (or, for an unpaired batch's sides, ``[rows of that kind]``) tensor;
        sides are chosen/rejected, or desirable/undesirable for unpaired rows.
    """
    if isinstance(policy, PairedLogps):
        sides = {"chosen": (policy.chosen, policy.chosen_tokens, start.chosen if start else None),
                 "rejected": (policy.rejected, policy.rejected_tokens, start.rejected if start else None)}
    else:
        kinds = {"desirable": policy.desirable, "undesirable": ~policy.desirable}
        sides = {name: (policy.completion[mask], policy.tokens[mask],
                        start.completion[mask] if start else None) for name, mask in kinds.items()}
    metrics: dict[str, Tensor] = {}
    for side, (logps, tokens, begin) in sides.items():
        logps, tokens = logps.detach().float(), tokens.float()
        metrics[f"logps/{side}_per_token"] = logps / tokens
        if begin is not None:
            change = logps - begin.detach().float()
            metrics[f"change/{side}"] = change
            metrics[f"change/{side}_per_token"] = change / tokens
    return metrics


@dataclass
class Guards:
    """Checks each metric record (see the module docstring) and says each warning once.

    Args:
        enabled: ``train.warn``.
        log: where warnings go.
        start: the before-training evaluation's metrics (the first evaluation checked, unless set, as a
            resumed run does).

    Attributes:
        said: the warnings given, in order (kept in ``final_metrics.json``).
    """

    enabled: bool
    log: Log
    start: dict[str, float] = field(default_factory=dict)
    said: list[str] = field(default_factory=list)
    saturated_logs: int = 0
    peak_grad_norm: float = 0.0
    _fired: set[str] = field(default_factory=set)

    def since_start(self, metrics: dict[str, float]) -> dict[str, float]:
        """Evaluation metrics completed with ``change/<side>`` and ``change/<side>_per_token`` from the
        before-training evaluation (the same pairs, so a difference of means is the mean of the differences),
        where the loss's own reference did not already give them. The first evaluation is the start."""
        if not self.start:
            self.start = dict(metrics)
        for key, value in list(metrics.items()):
            if key.startswith("logps/") and key in self.start:
                metrics.setdefault("change/" + key.removeprefix("logps/"), value - self.start[key])
        return metrics

    def check(self, record: dict) -> dict:
        """Check a train or eval record (``split``, ``step`` and metrics); returns it unchanged."""
        if self.enabled:
            self._displacement(record)
            if record.get("split") == "train":
                self._saturation(record)
        return record

    def _say(self, name: str, message: str) -> None:
        if name in self._fired:
            return
        self._fired.add(name)
        self.said.append(message)
        self.log(f"warning: {message} (said once; train.warn: false turns this off)")

    def _displacement(self, record: dict) -> None:
        fall = record.get("change/chosen_per_token")
        accuracy = record.get("rewards/accuracies")
        if fall is None or accuracy is None:
            return
        start = self.start.get("rewards/accuracies", 0.5) if record["split"] == "eval" else 0.5
        if fall <= -DISPLACEMENT_NATS_PER_TOKEN and accuracy >= start + DISPLACEMENT_ACCURACY_RISE:
            where = "held-out" if record["split"] == "eval" else "training"
            self._say("displacement", (
                f"likelihood displacement at step {record['step']}: on the {where} pairs the chosen answers' "
                f"log-probability has fallen by {-fall:.2f} nats per token ({-record['change/chosen']:.1f} summed) "
                f"since the start while preference accuracy rose from {start:.2f} to {accuracy:.2f}. The policy "
                "widens the margin by making the chosen answers less likely too, so its own answers can get "
                f"worse while these metrics improve (typical of pairs far from what the model writes). Try: {TRY}"))

    def _saturation(self, record: dict) -> None:
        loss, grad_norm = record.get("loss"), record.get("grad_norm")
        if loss is None or grad_norm is None or grad_norm != grad_norm:  # NaN: a skipped step
            return
        self.peak_grad_norm = max(self.peak_grad_norm, grad_norm)
        quiet = loss <= SATURATION_LOSS and grad_norm <= SATURATION_GRAD_FRACTION * self.peak_grad_norm
        self.saturated_logs = self.saturated_logs + 1 if quiet else 0
        if self.saturated_logs >= SATURATION_LOGS:
            self._say("saturation", (
                f"the loss has saturated: at most {SATURATION_LOSS:g} with gradient norms under "
                f"{SATURATION_GRAD_FRACTION:.0%} of their peak for the last {SATURATION_LOGS} logs (step "
                f"{record['step']}: loss {loss:.2g}, grad_norm {grad_norm:.2g}). The pairs no longer teach the "
                "policy anything: it tells chosen from rejected by something easy (length, style, a phrase), and "
                "getting there may have changed its own answers far more than these metrics show (see generate/* "
                f"with eval.generate, and samples.jsonl). Train fewer steps, or: {TRY}"))
