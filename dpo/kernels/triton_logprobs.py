"""Fused log-probs of target tokens: cuBLAS matmuls around Triton passes over float32 logits blocks.

Laid out as kernels, then one ``torch.autograd.Function`` per path, then the launcher.

Frozen head (LoRA): for each token t, ``d logp_t / d h_t = sum_v (onehot(t) - softmax(z))_v W_v`` does not
depend on the loss, so the forward forms it chunk by chunk: a logits block ``z = h W^T`` (float32 out),
one Triton pass for the log-sum-exp and target log-prob, one that writes ``onehot - softmax`` (times the
softcap slope) in the head's dtype, and one matmul of that with W. The backward is an elementwise scale
by the upstream gradient: two matmuls in all, against three for a recompute backward.

Trainable head: the weight gradient needs the softmax scaled by the upstream gradient, so the forward
keeps only the log-sum-exp and the backward recomputes the logits in vocabulary slices over all tokens:
each slice's weight gradient is then one complete matmul, written once.

``onehot - softmax`` is formed in float32 before it is rounded to the head's dtype, so a near-certain
target (p ~ 1) does not lose its gradient to cancellation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .torch_logprobs import float32_matmul, matmul_operand

# Memory for one chunk: float32 logits plus the gradient block in the head's dtype.
TRITON_WORKSPACE_BYTES = 512 * 2**20
# Widest vocabulary block one program handles at a time; a module constant so tests can force
# several blocks per row at small vocabularies.
MAX_BLOCK = 4096
NUM_WARPS = 8


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _tanh(x):
    # From exp, so it needs no libdevice and runs under the interpreter; exact at +-inf where exp
    # saturates, absolute error ~1e-7 near 0.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _lse_target_kernel(
    logits_ptr,
    logits_row_stride,
    targets_ptr,
    lse_ptr,
    logprob_ptr,
    n_cols,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row per program: online log-sum-exp over the row's blocks, then the target's log-prob."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    lanes = tl.arange(0, BLOCK)
    # Per-lane running max and sum; the finite start value keeps exp(m - m_new) free of inf - inf.
    lane_max = tl.full([BLOCK], -1.0e38, tl.float32)
    lane_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + lanes
        in_row = cols < n_cols
        z = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(in_row, z, float("-inf"))
        new_max = tl.maximum(lane_max, z)
        lane_sum = lane_sum * tl.exp(lane_max - new_max) + tl.exp(z - new_max)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    lse = row_max + tl.log(tl.sum(lane_sum * tl.exp(lane_max - row_max), axis=0))
    target = tl.load(targets_ptr + row)
    z_target = tl.load(row_ptr + target).to(tl.float32)
    if HAS_SOFTCAP:
        z_target = softcap * _tanh(z_target / softcap)
    tl.store(lse_ptr + row, lse)
    tl.store(logprob_ptr + row, z_target - lse)


@triton.jit
def _logit_grad_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,
    grad_row_stride,
    targets_ptr,
    lse_ptr,
    scale_ptr,
    n_cols,
    col_offset,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ROUND_TO_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad = scale * (onehot(target) - softmax(z)) * softcap slope, for one block of one row.

    The block holds vocabulary columns ``col_offset + [0, n_cols)``; ``grad`` may alias ``logits``
    (each element is read and written by the same lane).
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    z = tl.load(logits_ptr + row * logits_row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    probs = tl.exp(z - tl.load(lse_ptr + row))
    target_col = tl.load(targets_ptr + row) - col_offset
    grad = tl.where(cols == target_col, 1.0, 0.0) - probs
    if HAS_SOFTCAP:
        capped = z / softcap
        grad = grad * (1.0 - capped * capped)
    if HAS_SCALE:
        grad = grad * tl.load(scale_ptr + row)
    if ROUND_TO_BF16:
        # Round to nearest even on the float32 bits, so the cast below is exact everywhere: the GPU would
        # round by itself, but the interpreter truncates, and the CPU tests should see the GPU's numbers.
        bits = grad.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        grad = bits.to(tl.float32, bitcast=True)
    tl.store(grad_ptr + row * grad_row_stride + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _block(n_cols: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(max(n_cols, 1)))


def _launch_lse_target(
    logits: Tensor, targets: Tensor, lse: Tensor, logprobs: Tensor, softcap: float | None
) -> None:
    """Fill lse [m] and logprobs [m] from logits [m, V] (float32) and targets [m]."""
    _lse_target_kernel[(logits.shape[0],)](
        logits,
        logits.stride(0),
        targets,
        lse,
        logprobs,
        logits.shape[1],
        softcap or 1.0,
        HAS_SOFTCAP=softcap is not None,
        BLOCK=_block(logits.shape[1]),
        num_warps=NUM_WARPS,
    )


def _launch_logit_grad(
    logits: Tensor,
    grad: Tensor,
    targets: Tensor,
    lse: Tensor,
    scale: Tensor | None,
    col_offset: int,
    softcap: float | None,
) -> None:
    """Write grad [m, Vc] = scale * (onehot - softmax) * softcap slope for columns col_offset + [0, Vc)."""
    block = _block(logits.shape[1])
    grid = (logits.shape[0], triton.cdiv(logits.shape[1], block))
    _logit_grad_kernel[grid](
        logits,
        logits.stride(0),
        grad,
        grad.stride(0),
        targets,
        lse,
        scale if scale is not None else lse,
        logits.shape[1],
        col_offset,
        softcap or 1.0,
        HAS_SOFTCAP=softcap is not None,
        HAS_SCALE=scale is not None,
        ROUND_TO_BF16=grad.dtype == torch.bfloat16,
        BLOCK=block,
        num_warps=NUM_WARPS,
    )


# ---------------------------------------------------------------------------- autograd functions


def _grad_buffer(logits: Tensor, dtype: torch.dtype) -> Tensor:
    # A float32 head takes the gradient in place of the logits it is made from.
    return logits if dtype == torch.float32 else torch.empty(logits.shape, dtype=dtype, device=logits.device)


class FrozenHeadLogprobs(torch.autograd.Function):
    """Log-probs with a frozen head; d logp / d hidden is formed in the forward (two matmuls in all)."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        softcap: float | None,
        chunk_size: int,
        wants_hidden_grad: bool,
    ):
        """Log-probs [M] float32 of targets [M] under hidden [M, H] and weight [V, H], chunk_size tokens a chunk.

        ``wants_hidden_grad`` False (no grad mode, or hidden does not require grad) skips the second matmul.
        """
        head = matmul_operand(weight)
        num_tokens = hidden.shape[0]
        logprobs = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logprobs)
        dlogp_dhidden = (
            torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
            if wants_hidden_grad
            else None
        )
        for start in range(0, num_tokens, chunk_size):
            stop = min(start + chunk_size, num_tokens)
            logits = float32_matmul(hidden[start:stop].to(head.dtype), head.T)
            _launch_lse_target(logits, targets[start:stop], lse[start:stop], logprobs[start:stop], softcap)
            if dlogp_dhidden is not None:
                grad_logits = _grad_buffer(logits, head.dtype)
                _launch_logit_grad(
                    logits, grad_logits, targets[start:stop], lse[start:stop], None, 0, softcap
                )
                dlogp_dhidden[start:stop] = float32_matmul(grad_logits, head)
            del logits
        ctx.save_for_backward(dlogp_dhidden)
        ctx.hidden_dtype = hidden.dtype
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor):
        """grad_hidden [M, H] = upstream [M] times the stored d logp / d hidden."""
        (dlogp_dhidden,) = ctx.saved_tensors
        grad_hidden = (grad_logprobs.float()[:, None] * dlogp_dhidden).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None


class TrainableHeadLogprobs(torch.autograd.Function):
    """Log-probs with a trainable head: log-sum-exp in the forward, logits recomputed in the backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, softcap: float | None, chunk_size: int):
        """Log-probs [M] float32 of targets [M] under hidden [M, H] and weight [V, H], chunk_size tokens a chunk."""
        head = matmul_operand(weight)
        num_tokens = hidden.shape[0]
        logprobs = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logprobs)
        for start in range(0, num_tokens, chunk_size):
            stop = min(start + chunk_size, num_tokens)
            logits = float32_matmul(hidden[start:stop].to(head.dtype), head.T)
            _launch_lse_target(logits, targets[start:stop], lse[start:stop], logprobs[start:stop], softcap)
            del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.softcap = softcap
        ctx.chunk_size = chunk_size
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs: Tensor):
        """Gradients for hidden [M, H] and weight [V, H], recomputing the logits one vocabulary slice at a time."""
        hidden, weight, targets, lse = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
        if num_tokens == 0:
            grad_weight = torch.zeros_like(weight) if needs_weight else None
            return (torch.zeros_like(hidden) if needs_hidden else None), grad_weight, None, None, None
        head = matmul_operand(weight)
        hidden_mm = hidden.to(head.dtype)
        scale = grad_logprobs.float().contiguous()
        # Summed over vocabulary slices, so it is kept in float32 until the end.
        grad_hidden = (
            torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if needs_hidden else None
        )
        grad_weight = torch.empty_like(weight) if needs_weight else None
        slice_cols = vocab_slice(ctx.chunk_size * vocab_size, num_tokens, vocab_size)
        for col_start in range(0, vocab_size, slice_cols):
            col_stop = min(col_start + slice_cols, vocab_size)
            head_slice = head[col_start:col_stop]
            logits = float32_matmul(hidden_mm, head_slice.T)
            grad_logits = _grad_buffer(logits, head.dtype)
            _launch_logit_grad(logits, grad_logits, targets, lse, scale, col_start, ctx.softcap)
            del logits
            if grad_hidden is not None:
                grad_hidden += float32_matmul(grad_logits, head_slice)
            if grad_weight is not None:
                grad_weight[col_start:col_stop] = float32_matmul(grad_logits.T, hidden_mm)
            del grad_logits
        grad_hidden = grad_hidden.to(hidden.dtype) if grad_hidden is not None else None
        return grad_hidden, grad_weight, None, None, None


# ---------------------------------------------------------------------------------------- launcher


def default_token_chunk(vocab_size: int, head_dtype: torch.dtype) -> int:
    """Tokens per chunk so that float32 logits plus the gradient block fit TRITON_WORKSPACE_BYTES.

    Rounded down to a multiple of 64 (tensor-core friendly) once there are at least 128.
    """
    bytes_per_logit = 4 + (0 if head_dtype == torch.float32 else torch.finfo(head_dtype).bits // 8)
    rows = max(1, TRITON_WORKSPACE_BYTES // (vocab_size * bytes_per_logit))
    return rows // 64 * 64 if rows >= 128 else rows


def vocab_slice(workspace_logits: int, num_tokens: int, vocab_size: int) -> int:
    """Vocabulary columns per backward slice so that ``num_tokens * columns <= workspace_logits``.

    Rounded down to a multiple of 128 once there are at least 256; at least 1, at most V.
    """
    cols = max(1, workspace_logits // max(num_tokens, 1))
    cols = cols // 128 * 128 if cols >= 256 else cols
    return min(cols, vocab_size)


def is_interpreted() -> bool:
    """Whether this module's kernels were built by the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_lse_target_kernel, triton.runtime.jit.JITFunction)


def triton_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Log-probs [M] float32 of compacted targets [M] (all in [0, V)) under hidden [M, H] and weight [V, H].

    The head is trainable when ``weight.requires_grad``; detach it for the frozen-head path.
    """
    if not hidden.is_cuda and not is_interpreted():
        raise ValueError(
            "token_logprobs: impl='triton' needs CUDA tensors (or the Triton interpreter, TRITON_INTERPRET=1 "
            "set before dpo.kernels.triton_logprobs is imported); use impl='torch' or 'auto' on CPU"
        )
    if chunk_size is None:
        chunk_size = default_token_chunk(weight.shape[0], matmul_operand(weight).dtype)
    hidden = hidden.contiguous()
    targets = targets.contiguous()
    if weight.requires_grad:
        return TrainableHeadLogprobs.apply(hidden, weight, targets, softcap, chunk_size)
    wants_hidden_grad = torch.is_grad_enabled() and hidden.requires_grad
    return FrozenHeadLogprobs.apply(hidden, weight, targets, softcap, chunk_size, wants_hidden_grad)
