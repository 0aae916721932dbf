"""Benchmark: a DPO step on padded, packed and packed + prefix-shared batches (and TRL's DPOTrainer).

Run from the repository root:

    python bench/throughput.py                      # CPU shape (the default), about 5 minutes on 2 cores
    python bench/throughput.py --shape 1b           # Llama-3.2-1B shape on a CUDA GPU
    python bench/throughput.py --shape tiny         # a smoke run: every path runs, the figures mean nothing

Workload: a random-weight Llama (``--shape``: ``cpu`` is 4 layers, hidden 512, 8 heads, vocabulary 32000,
untied, float32; ``1b`` is the Llama-3.2-1B shape, hidden 2048, 16 layers, 32 heads, 8 KV heads, vocabulary
128256, tied, bfloat16, gradient checkpointing), a LoRA adapter (r 16, alpha 32, every linear layer), DPO
with beta 0.1, AdamW, reference log-probs precomputed before the timed steps (as with a cache hit). The
pairs follow the realistic length mix: prompts log-normal with median 120 tokens (clipped to 8..768),
chosen and rejected lengths drawn separately, log-normal with median 250, each side (prompt + completion) at
most 1024 tokens, sigma 0.8, seeded; the ``cpu`` shape scales every length by 1/4. Every trainer sees the
same pairs in the same order: ``--pairs`` of them, ``--batch`` a step, the first step untimed.

Modes, each in its own process (so each peak memory is its own), alternated over ``--repeats`` rounds
(the machine may be shared: ratios are taken within a round); with ``--interleave`` our three modes run in one
process instead, step k of each before step k + 1 of any, so that a load which comes and goes hits them alike
(the figures to quote on a shared machine; no per-mode peak memory then):

* ``padded``: today's batches, 2B rows (prompt + chosen, prompt + rejected), each padded to the longest;
* ``packed``: the 2B sequences packed into rows without padding between them, each prompt still twice;
* ``packed+prefix``: one segment ``[prompt | chosen | rejected]`` per pair, packed (``train.packing``);
* ``trl``: TRL's ``DPOTrainer`` on the same model, LoRA, pairs and batch, with its best settings
  (precomputed reference log-probs, ``padding_free`` when this version accepts it), when TRL is installed.

Columns: seconds per optimizer step (median of the timed steps), pairs/s and real tokens/s at that median
(tokens: prompt + chosen and prompt + rejected of every pair, no padding: the same count for every mode), the token positions the network
ran over per step (padding included), the first step's loss (the same computation gives the same value) and
peak memory (CUDA: ``max_memory_allocated`` over the timed steps; CPU: the process's peak resident memory).
The last line is ``packed+prefix vs padded: X.XXx pairs/s; vs TRL: Y.YYx`` (``n/a`` without TRL).
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/tokenize.py would shadow the standard library's tokenize module (torch imports it), so this folder
# leaves the path; the repository root goes first so that `dpo` imports without installing.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the table (read when tqdm is imported)

import torch  # noqa: E402

MODES = ("padded", "packed", "packed+prefix", "trl")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    dtype: str
    checkpointing: bool
    device: str
    scale: float  # of the realistic length mix
    pairs: int
    batch: int
    threads: int = 2


SHAPES = {
    "cpu": Shape(512, 4, 8, 8, 1376, 32000, False, "float32", False, "cpu", 0.25, 64, 8),
    "1b": Shape(2048, 16, 32, 8, 8192, 128256, True, "bfloat16", True, "cuda", 1.0, 96, 8),
    "tiny": Shape(64, 2, 4, 2, 128, 512, False, "float32", False, "cpu", 1 / 16, 12, 4, threads=1),
}


# --------------------------------------------------------------------------------------------- data


def length_mix(pairs: int, scale: float, seed: int) -> list[tuple[int, int, int]]:
    """``(prompt, chosen, rejected)`` token counts of the realistic mix, every length scaled by ``scale``."""
    rng = random.Random(seed)

    def lognormal(median: float) -> int:
        return round(rng.lognormvariate(math.log(median * scale), 0.8))

    side_max = round(1024 * scale)
    out = []
    for _ in range(pairs):
        prompt = min(max(lognormal(120), round(8 * scale), 1), round(768 * scale))
        chosen, rejected = (min(max(lognormal(250), 2), side_max - prompt) for _ in range(2))
        out.append((prompt, chosen, rejected))
    return out


def make_rows(shape: Shape, pairs: int, seed: int) -> list[dict]:
    """Tokenized pairs of the mix: BOS + prompt characters, completion characters + EOS, drawn from the
    character tokenizer's ordinary tokens, so that TRL, which tokenizes text, gets exactly these ids."""
    from dpo.quickstart import build_tokenizer

    tokenizer = build_tokenizer()
    ordinary = [i for i in range(len(tokenizer)) if i not in tokenizer.all_special_ids]
    rng = random.Random(seed + 1)

    def ids(n: int) -> list[int]:
        return [rng.choice(ordinary) for _ in range(n)]

    rows = []
    for index, (prompt, chosen, rejected) in enumerate(length_mix(pairs, shape.scale, seed)):
        rows.append({"index": index, "prompt_ids": [tokenizer.bos_token_id] + ids(prompt - 1),
                     "chosen_ids": ids(chosen - 1) + [tokenizer.eos_token_id],
                     "rejected_ids": ids(rejected - 1) + [tokenizer.eos_token_id]})
    return rows


def real_tokens(rows: list[dict]) -> int:
    return sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)


# --------------------------------------------------------------------------------------------- model


def build_model(shape: Shape):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
                         tie_word_embeddings=shape.tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         attn_implementation="sdpa")
    torch.manual_seed(0)
    dtype = getattr(torch, shape.dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(shape.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class OurSteps:
    """Our trainer's DPO step in one ``mode`` (``padded``, ``packed``, ``packed+prefix``), its reference
    log-probs precomputed; :meth:`step` runs micro-batch ``k``."""

    def __init__(self, mode: str, shape: Shape, rows: list[dict]):
        from functools import partial

        from dpo.data import choose_collate, collate_packed_paired
        from dpo.data.pack import default_row_tokens
        from dpo.losses import get_loss
        from dpo.model import LogprobSettings, SequenceLogprobs, add_lora, plan_packing
        from dpo.recipe import DPOLoss, LoraConfig, TrainConfig
        from dpo.reference.compute import compute_reference_logps
        from dpo.train.loop import build_optimizer

        self.mode, self.shape, self.rows = mode, shape, rows
        device = shape.device
        policy = add_lora(build_model(shape), LoraConfig(r=16, alpha=32), shape.checkpointing)
        max_length = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
        packing = None
        if mode == "padded":
            self.collate = choose_collate(True, 0, "off", None, device)
        else:
            packing = plan_packing(policy, max_length, device)
            if isinstance(packing, str):
                raise SystemExit(f"this model cannot take packed batches: {packing}")
            self.collate = partial(collate_packed_paired, pad_token_id=0, row_tokens=default_row_tokens(device),
                                   share_prompt=mode == "packed+prefix")
        self.logprobs = SequenceLogprobs(policy, LogprobSettings(), packing)

        def adapter_off(batch):
            with policy.disable_adapter():
                return self.logprobs(batch)

        self.logprobs.eval()
        with torch.no_grad():
            self.reference = compute_reference_logps(rows, self.collate, adapter_off, shape.batch, device,
                                                     "reference", lambda _: None)
        self.logprobs.train()
        self.spec, self.options = get_loss("dpo"), DPOLoss(name="dpo", beta=0.1).options()
        self.params = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, TrainConfig(lr=5e-5))
        self.steps = len(rows) // shape.batch

    def step(self, k: int) -> tuple[float, int, int, float]:
        """``(seconds, real tokens, positions run, loss)`` of micro-batch ``k`` (collating included)."""
        from dpo.train.setup import batch_loss

        device, chunk = self.shape.device, self.rows[k * self.shape.batch : (k + 1) * self.shape.batch]
        sync(device)
        start = time.perf_counter()
        batch = {key: v.to(device) for key, v in self.collate(chunk).items()}
        loss = batch_loss(self.logprobs, batch, self.spec, self.options, self.reference).losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start, real_tokens(chunk), batch["input_ids"].numel(), float(loss.detach())


def new_record(mode: str) -> dict:
    return {"mode": mode, "times": [], "tokens": [], "positions": [], "first_loss": None, "peak": None}


def add_step(record: dict, k: int, measured: tuple[float, int, int, float]) -> None:
    seconds, tokens, positions, loss = measured
    if k == 0:
        record["first_loss"] = loss
        return
    record["times"].append(seconds)
    record["tokens"].append(tokens)
    record["positions"].append(positions)


def measure_ours(mode: str, shape: Shape, rows: list[dict]) -> dict:
    """One run of our trainer's step in ``mode``, alone in this process (so the peak memory is its own)."""
    steps = OurSteps(mode, shape, rows)
    record = new_record(mode)
    for k in range(steps.steps):
        if k == 1 and shape.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        add_step(record, k, steps.step(k))
    record["positions"] = statistics.mean(record["positions"])
    record["peak"] = peak_memory(shape.device)
    return record


def measure_interleaved(modes: list[str], shape: Shape, rows: list[dict]) -> list[dict]:
    """Our modes in one process, step k of every mode before step k + 1 of any (who goes first rotates), so a
    load that comes and goes on a shared machine hits them alike. No per-mode peak memory."""
    runs = [OurSteps(mode, shape, rows) for mode in modes]
    records = [new_record(mode) for mode in modes]
    for k in range(runs[0].steps):
        order = list(range(len(runs)))
        order = order[k % len(order):] + order[: k % len(order)]
        for i in order:
            add_step(records[i], k, runs[i].step(k))
    for record in records:
        record["positions"] = statistics.mean(record["positions"])
    return records


def measure_trl(shape: Shape, rows: list[dict]) -> dict:
    """TRL's DPOTrainer on the same model, LoRA, pairs (as text of the same tokens) and batch."""
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from dpo.quickstart import build_tokenizer

    device = shape.device
    tokenizer = build_tokenizer()

    def text(ids: list[int]) -> str:
        return tokenizer.decode([i for i in ids if i not in tokenizer.all_special_ids])

    dataset = Dataset.from_list([{"prompt": text(r["prompt_ids"]), "chosen": text(r["chosen_ids"]),
                                  "rejected": text(r["rejected_ids"])} for r in rows])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.first_loss = None
            self._start = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            if state.global_step == 1 and device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            if state.global_step > 1:
                self.times.append(time.perf_counter() - self._start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.first_loss is None and logs and "loss" in logs:
                self.first_loss = float(logs["loss"])

    steps = len(rows) // shape.batch
    with tempfile.TemporaryDirectory() as out_dir:
        wanted = dict(output_dir=out_dir, per_device_train_batch_size=shape.batch, max_steps=steps,
                      learning_rate=5e-5, beta=0.1, bf16=shape.dtype == "bfloat16", use_cpu=device == "cpu",
                      gradient_checkpointing=shape.checkpointing,
                      gradient_checkpointing_kwargs={"use_reentrant": False} if shape.checkpointing else None,
                      precompute_ref_log_probs=True, padding_free=True, max_length=None, max_prompt_length=None,
                      max_completion_length=None, logging_steps=1, save_strategy="no", report_to="none",
                      dataloader_num_workers=0, seed=0, max_grad_norm=1.0, lr_scheduler_type="constant")
        # TRL's config fields change between releases: pass the ones this version has.
        fields = trl.DPOConfig.__dataclass_fields__
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        settings = {k: v for k, v in wanted.items() if k in fields}
        for attempt in (settings, {k: v for k, v in settings.items() if k != "padding_free"}):
            timer = StepTimer()
            try:
                trainer = trl.DPOTrainer(model=build_model(shape), args=trl.DPOConfig(**attempt),
                                         train_dataset=dataset, processing_class=tokenizer,
                                         peft_config=peft_config, callbacks=[timer])
                trainer.train()
                break
            except (ValueError, NotImplementedError, RuntimeError) as exc:
                if "padding_free" not in attempt:
                    raise
                print(f"TRL with padding_free failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                      "running it without", file=sys.stderr)
        if device == "cuda":
            torch.cuda.empty_cache()
    padding_free = bool(attempt.get("padding_free"))
    timed = rows[shape.batch : steps * shape.batch]
    # TRL shuffles the pairs: per-step token counts are unknown, so every timed step counts the mean.
    mean_tokens = real_tokens(timed) / max(1, len(timed) // shape.batch)
    return {"mode": "trl", "times": timer.times, "tokens": [mean_tokens] * len(timer.times), "positions": None,
            "first_loss": timer.first_loss, "peak": peak_memory(device),
            "note": f"TRL {trl.__version__}{', padding_free' if padding_free else ''}"}


# --------------------------------------------------------------------------------------------- driver


def child(mode: str, shape_name: str, pairs: int, seed: int) -> None:
    shape = SHAPES[shape_name]
    if shape.device == "cpu":
        torch.set_num_threads(shape.threads)
    rows = make_rows(shape, pairs, seed)
    result = measure_trl(shape, rows) if mode == "trl" else measure_ours(mode, shape, rows)
    print("RESULT " + json.dumps(result), flush=True)


def run_child(mode: str, args) -> dict | str:
    shape = SHAPES[args.shape]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if shape.device == "cpu":
        env["OMP_NUM_THREADS"] = str(shape.threads)
    command = [sys.executable, str(Path(__file__).resolve()), "--shape", args.shape, "--pairs", str(args.pairs),
               "--seed", str(args.seed), "--threads", str(shape.threads), "--child", mode]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"failed: {tail[:200]}"


def trl_available() -> bool:
    try:
        import trl  # noqa: F401
    except ImportError:
        return False
    return True


def machine(shape: Shape) -> str:
    if shape.device == "cuda":
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device visible"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores visible, {shape.threads} threads"


def gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def summarize(results: dict[str, list[dict]], modes: list[str], batch: int) -> list[str]:
    """The table and the closing line, ratios taken within each round."""
    lines = ["| mode | s/step | pairs/s | real tokens/s | positions/step | first loss | peak memory | "
             "pairs/s vs padded |", "|---|---|---|---|---|---|---|---|"]
    rates: dict[str, list[float]] = {}
    for mode in modes:
        runs = results[mode]
        per_step = [statistics.median(r["times"]) for r in runs]
        pairs_per_s = [batch / s for s in per_step]
        tokens_per_s = [statistics.mean(r["tokens"]) / s for r, s in zip(runs, per_step)]
        rates[mode] = pairs_per_s
        ratios = [a / b for a, b in zip(pairs_per_s, rates.get("padded", pairs_per_s))]
        positions = runs[0]["positions"]
        lines.append("| " + " | ".join([
            mode + (f" ({runs[0]['note']})" if runs[0].get("note") else ""),
            " / ".join(f"{s:.3f}" for s in per_step),
            " / ".join(f"{p:.2f}" for p in pairs_per_s),
            " / ".join(f"{t:,.0f}" for t in tokens_per_s),
            f"{positions:,.0f}" if positions else "-",
            f"{runs[0]['first_loss']:.6f}" if runs[0]["first_loss"] is not None else "-",
            " / ".join(gib(r["peak"]) if r["peak"] is not None else "-" for r in runs),
            " / ".join(f"{x:.2f}x" for x in ratios),
        ]) + " |")
    ours = rates.get("packed+prefix")
    vs_padded = (f"{statistics.median(a / b for a, b in zip(ours, rates['padded'])):.2f}x"
                 if ours and "padded" in rates else "n/a")
    vs_trl = (f"{statistics.median(a / b for a, b in zip(ours, rates['trl'])):.2f}x"
              if ours and "trl" in rates else "n/a")
    lines.append(f"packed+prefix vs padded: {vs_padded} pairs/s; vs TRL: {vs_trl}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--pairs", type=int, default=None, help="pairs in all (default: the shape's)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every mode, alternated")
    parser.add_argument("--seed", type=int, default=0, help="of the length mix and the token ids")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--no-trl", action="store_true", help="skip TRL even when it is installed")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: the shape's)")
    parser.add_argument("--interleave", action="store_true",
                        help="our modes in one process, step by step in turn (robust ratios on a shared machine; no "
                             "per-mode peak memory; TRL, if any, still in its own process)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        SHAPES[args.shape] = replace(SHAPES[args.shape], threads=args.threads)
    shape = SHAPES[args.shape]
    args.pairs = args.pairs or shape.pairs
    if args.child:
        child(args.child, args.shape, args.pairs, args.seed)
        return
    if shape.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench/throughput.py --shape {args.shape} needs a CUDA device; none is visible here "
                 "(--shape cpu runs on the CPU)")
    if args.pairs < 2 * shape.batch:
        sys.exit(f"--pairs must be at least two batches ({2 * shape.batch}): the first step is not timed")
    if shape.device == "cpu" and args.interleave:
        torch.set_num_threads(shape.threads)
    modes = [m for m in args.modes if m != "trl" or (trl_available() and not args.no_trl)]
    rows = make_rows(shape, args.pairs, args.seed)
    lengths = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    print(f"# DPO step throughput, shape {args.shape} ({shape.layers} layers, hidden {shape.hidden}, vocabulary "
          f"{shape.vocab}, {shape.dtype}{', gradient checkpointing' if shape.checkpointing else ''}), LoRA r16, "
          f"{args.pairs} pairs, {shape.batch} a step, first step untimed; {machine(shape)}")
    print(f"# length mix (seed {args.seed}): prompt median {statistics.median(p for p, _, _ in lengths):.0f}, "
          f"completion median {statistics.median([c for _, c, _ in lengths] + [r for _, _, r in lengths]):.0f}, "
          f"longest side {max(p + max(c, r) for p, c, r in lengths)}; torch {torch.__version__}")
    results: dict[str, list[dict]] = {m: [] for m in modes}
    failures: dict[str, str] = {}
    for round_ in range(args.repeats):
        order = modes[round_ % len(modes):] + modes[: round_ % len(modes)]  # alternate who goes first
        if args.interleave:
            ours = [m for m in order if m != "trl"]
            for result in measure_interleaved(ours, shape, rows):
                results[result["mode"]].append(result)
                print(f"# round {round_ + 1}, {result['mode']}: {statistics.median(result['times']):.3f} s/step",
                      flush=True)
            order = [m for m in order if m == "trl"]
        for mode in order:
            if mode in failures:
                continue
            result = run_child(mode, args)
            if isinstance(result, str):
                failures[mode] = result
                print(f"# {mode}: {result}", flush=True)
                continue
            results[mode].append(result)
            print(f"# round {round_ + 1}, {mode}: {statistics.median(result['times']):.3f} s/step", flush=True)
    # A mode that failed in any round is left out of the table (its ratios would pair rounds wrongly).
    shown = [m for m in modes if m not in failures and len(results[m]) == args.repeats]
    if "trl" not in modes:
        print("# TRL: not installed (or --no-trl)")
    for line in summarize(results, shown, shape.batch):
        print(line)


if __name__ == "__main__":
    main()
