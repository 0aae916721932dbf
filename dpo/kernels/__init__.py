"""Log-probs of target tokens straight from final hidden states and the LM head.

``token_logprobs(hidden, weight, targets)`` returns ``log softmax(hidden @ weight.T)[target]`` per token
without ever holding the ``[N, V]`` logits: the work is chunked, accumulates in float32 whatever the
input dtype, and runs only on the positions whose target is not ``ignore_index`` (they are compacted out
before any matmul; the others get 0.0 and no gradient).

Two implementations compute the same function:

* ``"torch"`` (:mod:`dpo.kernels.torch_logprobs`): chunked PyTorch. The reference, and the path for CPU
  tensors. With a frozen head the forward forms the hidden states' gradient as below (two matmuls); a
  trainable head recomputes the logits in the backward (three).
* ``"triton"`` (:mod:`dpo.kernels.triton_logprobs`): cuBLAS matmuls around fused Triton passes. With a
  frozen head the gradient with respect to the hidden states, ``W[t] - softmax(z) @ W``, does not depend
  on the loss, so the forward forms it chunk by chunk and the backward is a scale by the upstream
  gradient: two matmuls in all. A trainable head recomputes the logits in the backward instead.

``impl="auto"`` picks Triton for CUDA tensors and the PyTorch path otherwise. Triton is imported only
when that path is used, so this module works where Triton is missing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .torch_logprobs import (
    TORCH_BYTES_PER_LOGIT,
    TORCH_WORKSPACE_BYTES,
    TorchFrozenHeadLogprobs,
    TorchTokenLogprobs,
    default_token_chunk,
)

__all__ = ["IMPLEMENTATIONS", "token_logprobs"]

IMPLEMENTATIONS = ("auto", "torch", "triton")


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    softcap: float | None = None,
    ignore_index: int = -100,
    head_trainable: bool | None = None,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> Tensor:
    """Log-prob of each target token under ``softmax(hidden @ weight.T)``.

    Args:
        hidden: [N, H] final hidden states (float32, bfloat16 or float16).
        weight: [V, H] LM head (output embedding), same dtype and device as ``hidden``. No bias: a head
            with a bias must be refused by the caller.
        targets: [N] integer token ids; ``ignore_index`` marks positions that do not count.
        softcap: Gemma-2 final-logit softcap, logits ``z -> softcap * tanh(z / softcap)``; None for none.
        ignore_index: Target value of the positions to skip.
        head_trainable: Whether ``weight`` receives a gradient. None: ``weight.requires_grad``. False
            treats the head as frozen even if it requires grad (the fast path); True needs
            ``weight.requires_grad``.
        chunk_size: Tokens per chunk (the Triton trainable-head backward chunks the vocabulary to the
            same workspace). None: chosen from V and a fixed memory budget.
        impl: "auto" (CUDA tensors: Triton, otherwise PyTorch), "torch" or "triton".

    Returns:
        [N] float32 log-probs; 0.0 (and no gradient) where ``targets == ignore_index``.

    Raises:
        ValueError: Unknown ``impl``, mismatched shapes/dtypes/devices, a non-positive softcap, or a
            target outside ``[0, V)`` that is not ``ignore_index``.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"token_logprobs: impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    _check_inputs(hidden, weight, targets, softcap, chunk_size)
    trainable = weight.requires_grad if head_trainable is None else head_trainable
    if trainable and not weight.requires_grad:
        raise ValueError(
            "token_logprobs: head_trainable=True but weight.requires_grad is False; "
            "set requires_grad on the head or pass head_trainable=None/False"
        )
    head = weight if trainable else weight.detach()

    positions = (targets != ignore_index).nonzero().squeeze(1)
    kept_targets = targets.index_select(0, positions).long()
    vocab_size = weight.shape[0]
    if kept_targets.numel() and bool(((kept_targets < 0) | (kept_targets >= vocab_size)).any()):
        bad = positions[(kept_targets < 0) | (kept_targets >= vocab_size)][:5].tolist()
        raise ValueError(
            f"token_logprobs: targets at positions {bad} are outside [0, {vocab_size}) and are not "
            f"ignore_index={ignore_index}; mask such positions with ignore_index or check the tokenizer "
            "against the model's vocabulary size"
        )
    kept_hidden = hidden.index_select(0, positions)

    use_triton = impl == "triton" or (impl == "auto" and hidden.is_cuda)
    if use_triton:
        try:
            from .triton_logprobs import triton_token_logprobs
        except ImportError as err:
            raise RuntimeError(
                "token_logprobs: impl='triton' needs the triton package (pip install 'dpo-train[gpu]'); "
                f"it could not be imported: {err}"
            ) from err

        kept_logprobs = triton_token_logprobs(
            kept_hidden, head, kept_targets, softcap=softcap, chunk_size=chunk_size
        )
    else:
        if chunk_size is None:
            chunk_size = default_token_chunk(vocab_size, TORCH_BYTES_PER_LOGIT, TORCH_WORKSPACE_BYTES)
        if trainable:
            kept_logprobs = TorchTokenLogprobs.apply(kept_hidden, head, kept_targets, softcap, chunk_size)
        else:
            wants_hidden_grad = torch.is_grad_enabled() and kept_hidden.requires_grad
            kept_logprobs = TorchFrozenHeadLogprobs.apply(
                kept_hidden, head, kept_targets, softcap, chunk_size, wants_hidden_grad
            )

    logprobs = torch.zeros(targets.shape[0], dtype=torch.float32, device=hidden.device)
    return logprobs.index_copy(0, positions, kept_logprobs)


def _check_inputs(
    hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float | None, chunk_size: int | None
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            "token_logprobs: expected hidden [N, H], weight [V, H], targets [N]; got "
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)} "
            "(flatten batch and sequence dimensions first)"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"token_logprobs: shapes do not match: hidden {tuple(hidden.shape)}, weight "
            f"{tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype or hidden.dtype == torch.float64:
        raise ValueError(
            f"token_logprobs: hidden and weight must share one of float32/bfloat16/float16; got "
            f"{hidden.dtype} and {weight.dtype}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"token_logprobs: targets must be integer token ids, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"token_logprobs: tensors on different devices: hidden {hidden.device}, weight "
            f"{weight.device}, targets {targets.device}"
        )
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"token_logprobs: softcap must be a positive finite number or None, got {softcap}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be a positive integer or None, got {chunk_size}")
