"""Benchmark: per-token log-probs of the targets under the LM head, forward + backward.

Run from the repository root on a CUDA machine:

    python bench/logprob.py                       # N=16384, H=4096, V=128256, bf16
    python bench/logprob.py --n 4096 --v 32000    # smaller shapes
    python bench/logprob.py --device cpu --n 256 --h 64 --v 1000   # smoke test without a GPU

Workload: bf16 hidden states and head, 1 position in 7 masked (-100), LM-like peaked logits (the hidden
state points toward its target's output embedding 60% of the time, logit std about 3: a random hidden
state would give p ~ 1/V everywhere and flatter kernels that skip small gradients), a random upstream
gradient per token. For each implementation it prints the median forward+backward time of 10 runs after
3 warm-ups (CUDA events), that time over one bf16 N x H x V matmul measured in the same run, the peak
memory beyond the inputs, and the relative L2 error of the values and of the hidden-state gradient
against float64 on the same bf16 inputs (the larger of the two); frozen head, then trainable head.

Compared: full logits (fp32 log_softmax + gather), this package's PyTorch and Triton paths, and, when
installed, Cut Cross-Entropy (default gradient filter and exact) and Liger's fused linear cross-entropy.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds a script named tokenize.py, which would shadow the standard library module torch
# imports; it leaves sys.path, and the repository root goes first so that `dpo` imports uninstalled.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from dpo.kernels import token_logprobs  # noqa: E402

IGNORE = -100
# Largest N * V a CPU run accepts: the float64 reference and the full-logits baseline hold [N, V].
CPU_MAX_LOGITS = 2**24

LogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float | None], torch.Tensor]


def make_workload(n: int, h: int, v: int, dtype: torch.dtype, device: str, seed: int = 0):
    """hidden [n, h], weight [v, h], targets [n] (1 in 7 ignored) and upstream [n], LM-like and peaked."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(v, h, device=device, generator=gen) / math.sqrt(h)
    # Rows of W have norm ~1 and hidden entries std 3, so logits h . W_v have std ~3.
    hidden = 3.0 * torch.randn(n, h, device=device, generator=gen)
    targets = torch.randint(v, (n,), device=device, generator=gen)
    peaked = torch.rand(n, device=device, generator=gen) < 0.6
    boost = 8.0 + 12.0 * torch.rand(n, device=device, generator=gen)
    # Adding boost * W_t / |W_t|^2 raises the target's logit by `boost` (8..20 over a noise max ~15).
    direction = weight[targets] / weight[targets].square().sum(dim=1, keepdim=True)
    hidden += (peaked * boost)[:, None] * direction
    targets[torch.rand(n, device=device, generator=gen) < 1 / 7] = IGNORE
    upstream = torch.randn(n, device=device, generator=gen)
    return hidden.to(dtype), weight.to(dtype), targets, upstream


def float64_reference(hidden, weight, targets, upstream, softcap, chunk: int = 256):
    """float64 values [n] and hidden-state gradient [n, h] of sum(upstream * values), chunked over tokens."""
    weight64 = weight.double()
    values = torch.zeros(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        stop = min(start + chunk, hidden.shape[0])
        hidden64 = hidden[start:stop].double().requires_grad_()
        logits = hidden64 @ weight64.T
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        kept = targets[start:stop] != IGNORE
        picked = torch.log_softmax(logits, -1).gather(1, targets[start:stop].clamp(min=0)[:, None]).squeeze(1)
        chunk_values = picked * kept
        (grad_hidden[start:stop],) = torch.autograd.grad(
            chunk_values, hidden64, upstream[start:stop].double()
        )
        values[start:stop] = chunk_values.detach()
    return values, grad_hidden


# -------------------------------------------------------------------------------- implementations


def full_logits(hidden, weight, targets, softcap):
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    picked = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return picked * (targets != IGNORE)


def ours(impl: str) -> LogprobFn:
    def run(hidden, weight, targets, softcap):
        return token_logprobs(hidden, weight, targets, softcap=softcap, impl=impl)

    return run


def cut_cross_entropy(filter_eps: str | None) -> LogprobFn | None:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return None

    def run(hidden, weight, targets, softcap):
        loss = linear_cross_entropy(
            hidden,
            weight,
            targets,
            ignore_index=IGNORE,
            softcap=softcap,
            reduction="none",
            filter_eps=filter_eps,
        )
        return -loss.float()

    return run


def liger() -> LogprobFn | None:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None

    def run(hidden, weight, targets, softcap):
        loss = liger_fused_linear_cross_entropy(
            hidden, weight, targets, ignore_index=IGNORE, reduction="none", softcap=softcap
        )
        loss = loss[0] if isinstance(loss, tuple) else loss
        return -loss.float()

    return run


def implementations(device: str) -> list[tuple[str, LogprobFn | None, str]]:
    """(name, function or None, why it is missing)."""
    rows: list[tuple[str, LogprobFn | None, str]] = [
        ("full logits, fp32 log_softmax, gather", full_logits, ""),
        ("dpo.kernels, PyTorch path", ours("torch"), ""),
    ]
    triton_usable = device == "cuda" or _triton_interpreted()
    rows.append(("dpo.kernels, Triton path", ours("triton") if triton_usable else None, "needs CUDA"))
    on_cuda = device == "cuda"
    rows.append(
        (
            "Cut Cross-Entropy (default filter)",
            cut_cross_entropy("auto") if on_cuda else None,
            "not installed",
        )
    )
    rows.append(("Cut Cross-Entropy, exact", cut_cross_entropy(None) if on_cuda else None, "not installed"))
    rows.append(("Liger fused linear cross-entropy", liger() if on_cuda else None, "not installed"))
    if not on_cuda:
        rows[-3:] = [(name, None, "needs CUDA") for name, _, _ in rows[-3:]]
    return rows


def _triton_interpreted() -> bool:
    try:
        from dpo.kernels.triton_logprobs import is_interpreted
    except ImportError:
        return False
    return is_interpreted()


# ---------------------------------------------------------------------------------------- timing


def median_ms(step: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            began = time.perf_counter()
            step()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def peak_extra_gib(step: Callable[[], object], device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**30


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def measure(fn: LogprobFn, workload, reference, trainable: bool, softcap, device, warmup, repeats):
    hidden, weight, targets, upstream = workload
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_(trainable)
    inputs = (hidden, weight) if trainable else (hidden,)

    def step():
        return torch.autograd.grad(fn(hidden, weight, targets, softcap), inputs, upstream)

    values = fn(hidden, weight, targets, softcap)
    (grad_hidden, *_) = torch.autograd.grad(values, inputs, upstream)
    error = max(relative_error(values.detach(), reference[0]), relative_error(grad_hidden, reference[1]))
    nan = bool(values.isnan().any() or grad_hidden.isnan().any())
    del values, grad_hidden
    peak = peak_extra_gib(step, device)
    return median_ms(step, device, warmup, repeats), peak, error, nan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="tokens (including masked positions)")
    parser.add_argument("--h", type=int, default=4096, help="hidden size")
    parser.add_argument("--v", type=int, default=128256, help="vocabulary size")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--softcap", type=float, default=None, help="final-logit softcap (Gemma-2: 30)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "bench/logprob.py: no CUDA device. The timings only mean something on a GPU; for a smoke test "
            "pass --device cpu with small shapes, e.g. --device cpu --n 256 --h 64 --v 1000"
        )
    if args.device == "cpu" and args.n * args.v > CPU_MAX_LOGITS:
        sys.exit(
            f"bench/logprob.py: --device cpu is a smoke test; N*V = {args.n * args.v} is over {CPU_MAX_LOGITS}. "
            "Pass smaller --n/--v, e.g. --n 256 --h 64 --v 1000"
        )
    dtype = getattr(torch, args.dtype)
    workload = make_workload(args.n, args.h, args.v, dtype, args.device)
    hidden, weight, targets, upstream = workload
    reference = float64_reference(hidden, weight, targets, upstream, args.softcap)

    matmul_ms = median_ms(lambda: hidden @ weight.T, args.device, args.warmup, args.repeats)
    kept = int((targets != IGNORE).sum())
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"# {device_name}, torch {torch.__version__}, {args.dtype}")
    print(
        f"N={args.n} ({kept} kept), H={args.h}, V={args.v}, softcap={args.softcap}; "
        f"one {args.dtype} N x H x V matmul: {matmul_ms:.2f} ms"
    )
    for trainable in (False, True):
        print(f"\n{'Trainable' if trainable else 'Frozen'} LM head:")
        print("| implementation | ms fwd+bwd | x one matmul | peak extra GiB | rel. error |")
        print("|---|---|---|---|---|")
        for name, fn, missing in implementations(args.device):
            if fn is None:
                print(f"| {name} | skipped: {missing} | | | |")
                continue
            ms, peak, error, nan = measure(
                fn, workload, reference, trainable, args.softcap, args.device, args.warmup, args.repeats
            )
            peak_text = "n/a" if peak is None else f"{peak:.2f}"
            error_text = f"{error:.1e}" + (" (NaN!)" if nan else "")
            print(f"| {name} | {ms:.1f} | {ms / matmul_ms:.2f} | {peak_text} | {error_text} |")
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
