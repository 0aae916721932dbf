"""Packed, prefix-shared batches through the model's own attention: the mask, the capability check, the probe.

A packed batch (:mod:`dpo.data.pack`) lays each pair out once as ``[prompt | first | second]`` and packs several
such segments into a row. Its attention mask is a function of each token's segment, branch and position ids:
a query attends to a key of the same segment that is not after it and belongs to the prompt or to the query's
own side (and, in a sliding-window layer, lies less than the window before it by position id). Every side
then sees exactly what it sees in its own padded row, so hidden states, log-probs and their gradients are
the padded path's up to float rounding.

The mask goes to the model through transformers' attention interface, not a forked model: the mask function
is handed to the mask builder registered for the model's attention implementation
(``transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS``), and the resulting 4-D mask is passed as the
trunk's ``attention_mask`` (with ``position_ids``), which transformers uses as is. That is a boolean mask for
``sdpa``, an additive float mask for ``eager`` and a block-sparse ``BlockMask`` for ``flex_attention``, whose
kernel skips the blocks the mask rules out. On CUDA an ``sdpa`` model is switched to ``flex_attention`` for
packed batches; elsewhere (or where FlexAttention fails) to :data:`~dpo.model.segment_attention.SEGMENT_SDPA`,
SDPA one segment at a time over slices of the same boolean mask, so that neither scores the keys the mask rules
out (a dense mask makes a row cost its width squared).

:func:`plan_packing` decides whether a model can take this mask. It cannot when its code is not transformers'
(``trust_remote_code``: nothing says its attention honours a 4-D mask and position ids), when its attention
implementation takes no 4-D mask (flash-attention kernels take only a padding mask), when an attention
softcap (Gemma-2) meets an implementation that cannot apply it, or when it has layer kinds other than full
and sliding-window attention, or full and sliding-window layers mixed, with a window short enough to cut a
sequence, in a model whose forward takes one mask for all layers. Then, as a last check, a small probe pair
runs through both layouts and must agree. A model that fails falls back to padded batches with one log line
saying why.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpo.data.pack import PROMPT, pack_segments, sequence_positions, unpack_to_padded
from dpo.model.load import ModelError, causal_lm
from dpo.model.segment_attention import (
    SEGMENT_SDPA,
    SPANS_KWARG,
    register_segment_sdpa,
    segment_spans,
    segments_pay,
)

Log = Callable[[str], None]

PACKABLE_ATTENTION = ("sdpa", "eager", "flex_attention", SEGMENT_SDPA)
FULL, SLIDING = "full_attention", "sliding_attention"
# Largest relative difference of probe hidden states between the two layouts that counts as rounding: a
# wrong mask or wrong positions move them by O(1).
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
# The transformers idiom by which a decoder's forward accepts one prepared mask per layer type.
_MASK_MAPPING = re.compile(r"isinstance\(\s*\w+\s*:=\s*attention_mask\s*,\s*dict\s*\)")


def packed_mask_function(segment_ids: Tensor, branch_ids: Tensor, position_ids: Tensor,
                         window: int | None = None) -> Callable:
    """The mask of a packed batch as an index function ``(batch, head, q, kv) -> bool``.

    The form transformers' mask builders and FlexAttention's ``create_block_mask`` take: it is evaluated on
    broadcast index tensors (or traced), so it only indexes and compares.

    Args:
        segment_ids: ``[R, W]`` segment of each token (-1 on row padding).
        branch_ids: ``[R, W]`` 0 on prompt tokens (and padding), the side's number on a side's tokens.
        position_ids: ``[R, W]`` position of each token within its own sequence.
        window: a sliding window: a key at least this many positions before the query is masked.
    """

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        same_segment = segment_ids[batch_idx, q_idx] == segment_ids[batch_idx, kv_idx]
        key_branch = branch_ids[batch_idx, kv_idx]
        visible_branch = (key_branch == PROMPT) | (key_branch == branch_ids[batch_idx, q_idx])
        allowed = same_segment & (kv_idx <= q_idx) & visible_branch
        if window is not None:
            allowed = allowed & (position_ids[batch_idx, q_idx] - position_ids[batch_idx, kv_idx] < window)
        return allowed

    return mask


@dataclass(frozen=True)
class PackedAttention:
    """How a model takes packed batches.

    Attributes:
        implementation: the attention implementation the mask is built for (``sdpa``, ``eager``,
            ``flex_attention``, :data:`SEGMENT_SDPA`).
        windows: ``(layer type, sliding window or None)`` of each mask the model needs.
        per_layer_type: pass ``{layer type: mask}`` (the model mixes full and sliding-window layers whose
            window can cut a sequence); else one mask for every layer.
    """

    implementation: str
    windows: tuple[tuple[str, int | None], ...] = ((FULL, None),)
    per_layer_type: bool = False

    def describe(self) -> str:
        kind = {"sdpa": "boolean 4-D mask through SDPA", "eager": "additive 4-D mask through eager attention",
                "flex_attention": "FlexAttention block mask",
                SEGMENT_SDPA: "SDPA one segment at a time, boolean 4-D mask"}[self.implementation]
        windows = [f"{layer} window {w}" for layer, w in self.windows if w is not None]
        return kind + (f" ({', '.join(windows)})" if windows else "")

    def masks(self, batch: dict[str, Tensor], dtype: torch.dtype):
        """The ``attention_mask`` argument of the trunk for a packed batch (one mask, or one per layer type)."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        build = ALL_MASK_ATTENTION_FUNCTIONS[self.implementation]
        rows, width = batch["input_ids"].shape
        built = {}
        for layer_type, window in self.windows:
            function = packed_mask_function(batch["segment_ids"], batch["branch_ids"], batch["position_ids"], window)
            built[layer_type] = build(batch_size=rows, q_length=width, kv_length=width, mask_function=function,
                                      attention_mask=None, allow_is_causal_skip=False, dtype=dtype,
                                      device=batch["input_ids"].device)
        return built if self.per_layer_type else built[self.windows[0][0]]


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack of a (possibly peft-wrapped) model, which returns final hidden states."""
    lm = causal_lm(model)
    return getattr(lm, lm.base_model_prefix)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the residual stream (the input embeddings'), which an additive mask must match."""
    return causal_lm(model).get_input_embeddings().weight.dtype


def packed_hidden_states(model: nn.Module, batch: dict[str, Tensor], attention: PackedAttention,
                         segments: bool | None = None) -> Tensor:
    """Final hidden states ``[R, W, H]`` of a packed batch (``input_ids``, ``position_ids``, segment and branch ids).

    ``segments`` (:data:`SEGMENT_SDPA` only): None runs the batch one segment at a time where that pays
    (:func:`~dpo.model.segment_attention.segments_pay`), else as dense SDPA over the mask; True always one segment
    at a time (the probe checks that path).
    """
    masks = attention.masks(batch, compute_dtype(model))
    extra = {}
    if attention.implementation == SEGMENT_SDPA:
        spans = segment_spans(batch["segment_ids"], batch["branch_ids"])
        config = causal_lm(model).config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if segments or (segments is None and segments_pay(spans, batch["input_ids"].shape[1],
                                                          config.num_attention_heads * head_dim)):
            extra[SPANS_KWARG] = spans  # else the model's attention is dense SDPA over the mask
    return decoder(model)(input_ids=batch["input_ids"], attention_mask=masks, position_ids=batch["position_ids"],
                          use_cache=False, **extra).last_hidden_state


# --------------------------------------------------------------------------------------- capability


def layer_kinds(config) -> list[tuple[str, int | None]]:
    """``(layer type, sliding window or None)`` of every decoder layer, as the model's forward masks it."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:  # Mistral-style: one window for every layer when set
        types = [SLIDING if window else FULL] * config.num_hidden_layers
    return [(t, window if t == SLIDING else None) for t in types]


def static_problem(model: nn.Module, max_length: int | None) -> str | PackedAttention:
    """Why ``model`` cannot take packed batches, or how it takes them (before the probe)."""
    lm = causal_lm(model)
    config = lm.config
    if not type(lm).__module__.startswith("transformers."):
        return (f"its modelling code ({type(lm).__module__}) is not transformers' own (trust_remote_code), so nothing "
                "says its attention honours a 4-D mask and position ids")
    implementation = config._attn_implementation
    if implementation == SEGMENT_SDPA:  # switched by an earlier plan (the policy's, for its reference pass)
        implementation = "sdpa"
    if implementation not in PACKABLE_ATTENTION:
        return (f"its attention implementation {implementation!r} takes no 4-D mask (packing needs "
                f"{', '.join(PACKABLE_ATTENTION)})")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap and implementation == "sdpa":
        return f"its attention softcap ({softcap}) cannot be applied by sdpa (eager and flex_attention apply it)"
    kinds = layer_kinds(config)
    unknown = sorted({t for t, _ in kinds} - {FULL, SLIDING})
    if unknown:
        return f"it has {', '.join(unknown)} layers (only full and sliding-window attention are masked this way)"
    # A window no shorter than the longest sequence never cuts anything: such a layer is a full one.
    windows = {t: (w if w is not None and (max_length is None or w < max_length) else None) for t, w in kinds}
    if len(set(windows.values())) == 1:
        layer_type, window = next(iter(windows.items()))
        return PackedAttention(implementation, ((layer_type, window),), per_layer_type=False)
    try:
        takes_mapping = bool(_MASK_MAPPING.search(inspect.getsource(type(decoder(model)).forward)))
    except (OSError, TypeError):
        takes_mapping = False
    if not takes_mapping:
        return ("it mixes full and sliding-window layers (window "
                f"{next(w for w in windows.values() if w is not None)} tokens, shorter than data.max_length) and its "
                "forward takes one mask for all layers")
    return PackedAttention(implementation, tuple(sorted(windows.items())), per_layer_type=True)


def use_flex_attention(model: nn.Module, attention: PackedAttention, device) -> PackedAttention:
    """On CUDA, switch an ``sdpa`` model to ``flex_attention`` (block-sparse: masked-out blocks are skipped)."""
    lm = causal_lm(model)
    if (torch.device(device).type != "cuda" or attention.implementation != "sdpa"
            or not getattr(lm, "_supports_flex_attn", False)):
        return attention
    try:
        lm.set_attn_implementation("flex_attention")
    except (ImportError, ValueError, RuntimeError):
        return attention
    if lm.config._attn_implementation != "flex_attention":
        return attention
    return PackedAttention("flex_attention", attention.windows, attention.per_layer_type)


def use_segment_attention(model: nn.Module, attention: PackedAttention) -> PackedAttention:
    """Switch an ``sdpa`` model to :data:`SEGMENT_SDPA` (plain ``sdpa`` for anything but packed batches)."""
    if attention.implementation != "sdpa":
        return attention
    register_segment_sdpa()
    lm = causal_lm(model)
    try:
        lm.set_attn_implementation(SEGMENT_SDPA)
    except (ImportError, ValueError, RuntimeError):
        return attention
    if lm.config._attn_implementation != SEGMENT_SDPA:
        return attention
    return PackedAttention(SEGMENT_SDPA, attention.windows, attention.per_layer_type)


def probe_pairs(vocab_size: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Two small pairs (prompt, first, second) of odd lengths, one with a one-token prompt."""
    generator = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=generator).tolist()

    return [(tokens(5), tokens(4), tokens(7)), (tokens(1), tokens(3), tokens(2))]


@torch.no_grad()
def probe_difference(model: nn.Module, attention: PackedAttention) -> float:
    """Largest relative difference between the hidden states of probe pairs packed and padded."""
    lm = causal_lm(model)
    pairs = probe_pairs(lm.config.vocab_size)
    segments = [(p, [(i, a), (len(pairs) + i, b)]) for i, (p, a, b) in enumerate(pairs)]
    device = lm.get_input_embeddings().weight.device
    packed = {k: v.to(device) for k, v in pack_segments(segments, 2 * len(pairs), 0).items()}
    padded = unpack_to_padded(packed)
    was_training = model.training
    model.eval()
    try:
        packed_hidden = packed_hidden_states(model, packed, attention, segments=True)
        padded_hidden = decoder(model)(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                                       use_cache=False).last_hidden_state
    finally:
        model.train(was_training)
    flat = packed_hidden.reshape(-1, packed_hidden.shape[-1])
    worst = 0.0
    for s, positions in enumerate(sequence_positions(packed)):
        ours = flat[positions.to(device)].float()
        theirs = padded_hidden[s, : positions.numel()].float()
        scale = float(theirs.abs().max().clamp(min=1e-6))
        worst = max(worst, float((ours - theirs).abs().max()) / scale)
    return worst


def plan_packing(model: nn.Module, max_length: int | None, device, log: Log | None = None) -> PackedAttention | str:
    """How ``model`` takes packed batches, or why it cannot (see the module docstring).

    Args:
        model: the policy, a reference network or a reward model (peft-wrapped or not).
        max_length: the longest sequence (prompt + one side) the data can hold, which decides whether a
            sliding window can cut one; None: any window may.
        device: where the model runs (on CUDA an ``sdpa`` model is switched to ``flex_attention``; if that fails
            to run, it goes back to ``sdpa`` with a boolean mask, said in ``log``).
        log: where that is said.
    """
    plan = static_problem(model, max_length)
    if isinstance(plan, str):
        return plan
    if any(hasattr(param, "ds_id") for param in model.parameters()):
        # DeepSpeed ZeRO-3 partitions the weights as they load: a forward outside its engine (the probe) sees
        # empty shards, and a packed layout that was never probed is not trusted.
        return "the weights are partitioned by DeepSpeed ZeRO-3 as they load, so the probe pair cannot run"
    flex = use_flex_attention(model, plan, device)
    if flex is not plan:
        try:
            return checked(model, flex)
        except Exception as exc:  # a compiler or kernel failure: the boolean mask through sdpa still works
            causal_lm(model).set_attn_implementation(plan.implementation)
            if log is not None:
                log(f"packing: FlexAttention failed here ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                    "using SDPA one segment at a time")
    segmented = use_segment_attention(model, plan)
    if segmented is not plan:
        try:
            result = checked(model, segmented)
        except Exception as exc:  # noqa: BLE001 - any failure here leaves the dense mask, which is checked next
            result = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        if isinstance(result, PackedAttention):
            return result
        causal_lm(model).set_attn_implementation(plan.implementation)
        if log is not None:
            log(f"packing: SDPA one segment at a time failed its probe ({result}); using the dense boolean mask")
    return checked(model, plan)


def checked(model: nn.Module, plan: PackedAttention) -> PackedAttention | str:
    """``plan`` if a probe pair agrees between the packed and padded layouts, else why not."""
    difference = probe_difference(model, plan)
    tolerance = PROBE_TOLERANCE.get(compute_dtype(model), 5e-2)
    if not difference <= tolerance:  # also catches NaN
        return (f"a probe pair's hidden states differ between packed and padded batches by {difference:.3g} "
                f"(relative; rounding allows {tolerance:g}), so its attention does not take the mask as built")
    return plan


def resolve_packing(mode: str, model: nn.Module, max_length: int | None, device, log: Log,
                    what: str = "the policy") -> PackedAttention | None:
    """``train.packing`` for one network: how it takes packed batches, or None for padded ones.

    ``off``: None. ``auto``: packed where :func:`plan_packing` allows, else padded with one log line saying
    why. ``on``: packed, and a model that cannot take them is an error naming the reason.
    """
    if mode == "off":
        return None
    plan = plan_packing(model, max_length, device, log)
    if isinstance(plan, str):
        if mode == "on":
            raise ModelError(f"train.packing: on, but {what} cannot take packed batches: {plan}. Set train.packing: "
                             "auto (falls back to padded batches) or off")
        log(f"packing: off for {what} (padded batches): {plan}")
        return None
    log(f"packing: on for {what}: each prompt once, pairs packed into rows ({plan.describe()})")
    return plan
