"""Chunked PyTorch log-probs of target tokens: the reference implementation and the CPU path.

The forward walks the tokens in chunks of whole vocabulary rows: one ``[chunk, V]`` float32 logits block
at a time gives each token's log-sum-exp and target logit. Peak memory is a few ``[chunk, V]`` blocks,
never ``[M, V]``. Two autograd functions, as in :mod:`dpo.kernels.triton_logprobs`:

* :class:`TorchTokenLogprobs` (trainable head): the forward keeps only the ``[M]`` log-sum-exps; the
  backward recomputes each block, turns it into ``d logp / d logits = onehot - softmax`` (times the
  softcap derivative), scales it by the upstream gradient and multiplies it back through the head. Three
  matmuls in all.
* :class:`TorchFrozenHeadLogprobs` (frozen head, LoRA): each token's log-prob depends on its own hidden
  state only, so ``d logp_t / d h_t = (onehot(t) - softmax(z_t)) @ W`` does not depend on the loss. The
  forward forms it from the block it already holds (one more matmul) and keeps it, ``[M, H]`` float32;
  the backward scales it by the upstream gradient. Two matmuls in all, and the softmax is formed once.
"""

from __future__ import annotations

import torch
from torch import Tensor

# A float32 logits block plus the same-sized temporaries made from it (log-sum-exp, softcap slope, casts).
TORCH_BYTES_PER_LOGIT = 16
TORCH_WORKSPACE_BYTES = 128 * 2**20

_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def default_token_chunk(vocab_size: int, bytes_per_logit: int, workspace_bytes: int) -> int:
    """Tokens per chunk so that ``tokens * vocab_size * bytes_per_logit`` fits the workspace.

    Args:
        vocab_size: V, the number of logits per token.
        bytes_per_logit: Bytes the implementation holds per logit of a chunk (all temporaries).
        workspace_bytes: Memory budget for one chunk.

    Returns:
        At least 1, even when a single vocabulary row exceeds the budget.
    """
    return max(1, workspace_bytes // (vocab_size * bytes_per_logit))


def matmul_operand(weight: Tensor) -> Tensor:
    """The head as the matmuls of this module consume it.

    CUDA multiplies bf16/fp16 operands into a float32 result directly (``torch.mm(..., out_dtype=)``);
    elsewhere the head is upcast once per call so every product is float32 throughout.

    Args:
        weight: [V, H] head weight.

    Returns:
        [V, H] tensor in ``weight.dtype`` (CUDA with out_dtype support, or already float32) or float32.
    """
    if weight.dtype == torch.float32 or (weight.is_cuda and _HAS_MM_OUT_DTYPE):
        return weight
    return weight.float()


def float32_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with a float32 result, accumulating in float32.

    Args:
        a: [M, K]; same dtype as ``b``.
        b: [K, N].

    Returns:
        [M, N] float32.
    """
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda and _HAS_MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def softcap_(logits: Tensor, softcap: float | None) -> Tensor:
    """Gemma-2 final-logit softcap ``z -> softcap * tanh(z / softcap)``, in place; identity for None."""
    if softcap is None:
        return logits
    return logits.div_(softcap).tanh_().mul_(softcap)


def softcap_slope(capped_logits: Tensor, softcap: float | None) -> Tensor | None:
    """Chain rule through the softcap: ``d(c tanh(z / c)) / dz = 1 - tanh(z / c)^2``, from the capped logits.

    Args:
        capped_logits: [T, V] logits after :func:`softcap_`.
        softcap: The cap ``c``, or None.

    Returns:
        [T, V] float32 slope, or None without a softcap.
    """
    if softcap is None:
        return None
    return (capped_logits / softcap).square_().neg_().add_(1.0)


def logprob_grad_logits_(
    logits: Tensor, log_normalizers: Tensor, targets: Tensor, cap_slope: Tensor | None
) -> Tensor:
    """``d logp_t / d z = onehot(t) - softmax(z)`` (times the softcap slope), built in place over ``logits``.

    The one-hot is added in float32, before any rounding to the head's dtype, so that a near-certain target
    (p_t ~ 1) does not cancel catastrophically.

    Args:
        logits: [T, V] float32 (capped) logits; overwritten.
        log_normalizers: [T] their log-sum-exps.
        targets: [T] int64 target ids.
        cap_slope: [T, V] from :func:`softcap_slope`, or None.

    Returns:
        ``logits``, now holding [T, V] float32 ``d logp / d z``.
    """
    grad_logits = logits.sub_(log_normalizers[:, None]).exp_().neg_()
    rows = torch.arange(logits.shape[0], device=logits.device)
    grad_logits[rows, targets] += 1.0
    if cap_slope is not None:
        grad_logits.mul_(cap_slope)
    return grad_logits


class TorchTokenLogprobs(torch.autograd.Function):
    """Log-prob of each target token, chunked over tokens, recomputing the logits in the backward.

    The path for a trainable head (its gradient needs the upstream gradient). Inputs are already compacted
    to the positions that count (no ignore_index left).
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        softcap: float | None,
        chunk_size: int,
    ) -> Tensor:
        """Log-probs of the targets.

        Args:
            hidden: [M, H] final hidden states.
            weight: [V, H] LM head.
            targets: [M] int64 token ids in [0, V).
            softcap: Final-logit softcap, or None.
            chunk_size: Tokens per chunk.

        Returns:
            [M] float32 log-probs.
        """
        head = matmul_operand(weight)
        num_tokens = hidden.shape[0]
        logprobs = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        log_normalizers = torch.empty_like(logprobs)
        for start in range(0, num_tokens, chunk_size):
            stop = min(start + chunk_size, num_tokens)
            logits = softcap_(float32_matmul(hidden[start:stop].to(head.dtype), head.T), softcap)
            lse = torch.logsumexp(logits, dim=1)
            target_logits = logits.gather(1, targets[start:stop, None]).squeeze(1)
            logprobs[start:stop] = target_logits - lse
            log_normalizers[start:stop] = lse
            del logits
        ctx.save_for_backward(hidden, weight, targets, log_normalizers)
        ctx.softcap = softcap
        ctx.chunk_size = chunk_size
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor):
        """Gradients for hidden [M, H] and weight [V, H] from the upstream [M] gradient."""
        hidden, weight, targets, log_normalizers = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        softcap, chunk_size = ctx.softcap, ctx.chunk_size
        head = matmul_operand(weight)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        # Summed over every chunk, so it is kept in float32 until the end.
        grad_head = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        )
        grad_logprobs = grad_logprobs.float()
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            hidden_chunk = hidden[start:stop].to(head.dtype)
            logits = softcap_(float32_matmul(hidden_chunk, head.T), softcap)
            cap_slope = softcap_slope(logits, softcap)
            grad_logits = logprob_grad_logits_(logits, log_normalizers[start:stop], targets[start:stop], cap_slope)
            del cap_slope
            grad_logits.mul_(grad_logprobs[start:stop, None])
            grad_logits = grad_logits.to(head.dtype)
            if grad_hidden is not None:
                grad_hidden[start:stop] = float32_matmul(grad_logits, head).to(hidden.dtype)
            if grad_head is not None:
                grad_head += float32_matmul(grad_logits.T, hidden_chunk)
        grad_weight = grad_head.to(weight.dtype) if grad_head is not None else None
        return grad_hidden, grad_weight, None, None, None


class TorchFrozenHeadLogprobs(torch.autograd.Function):
    """Log-prob of each target token with a frozen head; ``d logp / d hidden`` formed in the forward.

    Inputs are already compacted to the positions that count (no ignore_index left); ``weight`` gets no
    gradient.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        softcap: float | None,
        chunk_size: int,
        wants_hidden_grad: bool,
    ) -> Tensor:
        """Log-probs of the targets, and their gradients for the hidden states when they will be needed.

        Args:
            hidden: [M, H] final hidden states.
            weight: [V, H] LM head (frozen).
            targets: [M] int64 token ids in [0, V).
            softcap: Final-logit softcap, or None.
            chunk_size: Tokens per chunk.
            wants_hidden_grad: Form ``d logp_t / d h_t`` ([M, H] float32, kept for the backward). False
                under ``torch.no_grad`` or for hidden states that need no gradient (the reference pass).

        Returns:
            [M] float32 log-probs.
        """
        head = matmul_operand(weight)
        num_tokens = hidden.shape[0]
        logprobs = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        jacobian = (
            torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if wants_hidden_grad else None
        )
        for start in range(0, num_tokens, chunk_size):
            stop = min(start + chunk_size, num_tokens)
            logits = softcap_(float32_matmul(hidden[start:stop].to(head.dtype), head.T), softcap)
            lse = torch.logsumexp(logits, dim=1)
            logprobs[start:stop] = logits.gather(1, targets[start:stop, None]).squeeze(1) - lse
            if jacobian is not None:
                cap_slope = softcap_slope(logits, softcap)
                grad_logits = logprob_grad_logits_(logits, lse, targets[start:stop], cap_slope)
                del cap_slope
                jacobian[start:stop] = float32_matmul(grad_logits.to(head.dtype), head)
            del logits
        ctx.save_for_backward(jacobian if jacobian is not None else logprobs.new_empty(0))
        ctx.hidden_dtype = hidden.dtype
        ctx.has_jacobian = jacobian is not None
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor):
        """Gradient for hidden [M, H]: the kept Jacobian scaled by the upstream [M] gradient."""
        if not ctx.has_jacobian:
            raise RuntimeError(
                "token_logprobs: these log-probs were computed without a gradient for the hidden states "
                "(under torch.no_grad, or from hidden states that did not require one)"
            )
        (jacobian,) = ctx.saved_tensors
        grad_hidden = (jacobian * grad_logprobs.float()[:, None]).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None
