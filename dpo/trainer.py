"""The training loop: one function, read top to bottom.

recipe -> data -> reference log-probs -> policy -> per-sequence log-probs -> loss -> optimizer step ->
metrics and adapter. The loss comes from the registry (``dpo.losses``); the loop only reads its flags
(needs a reference? paired?), never its name.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dpo.data import collate_paired, collate_unpaired, kto_balance_warning, prepare_data
from dpo.losses import LossOutput, LossSpec, PairedLogps, UnpairedLogps, get_loss
from dpo.model import (
    LogprobSettings,
    add_lora,
    load_base_model,
    load_tokenizer,
    sequence_logprobs,
)
from dpo.recipe import Recipe, TrainConfig
from dpo.reference import ReferenceLogps, length_sorted_batches
from dpo.reference_setup import reference_logps

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------- small pieces


@dataclass
class MetricWindow:
    """Averages each metric over every value seen since the last reset (not a mean of batch means)."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, metrics: dict[str, Tensor]) -> None:
        for key, values in metrics.items():
            values = values.detach().float().reshape(-1)
            if values.numel() == 0:
                continue
            self.sums[key] = self.sums.get(key, 0.0) + float(values.sum())
            self.counts[key] = self.counts.get(key, 0) + values.numel()

    def means(self) -> dict[str, float]:
        return {key: self.sums[key] / self.counts[key] for key in self.sums}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()


def build_optimizer(params: list[torch.nn.Parameter], train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' 8-bit (optionally paged) AdamW."""
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if train.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=train.lr, weight_decay=train.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = train.warmup_steps if train.warmup_steps is not None else int(train.warmup_ratio * total_steps)
    name = "constant_with_warmup" if train.scheduler == "constant" else train.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def split_logps(first: Tensor, second: Tensor, first_tokens: Tensor, second_tokens: Tensor,
                batch: dict[str, Tensor], spec: LossSpec) -> PairedLogps | UnpairedLogps:
    """Arrange per-row values of a ``2B``-row batch as the loss's input type."""
    if spec.paired:
        return PairedLogps(first, second, first_tokens, second_tokens)
    return UnpairedLogps(first, first_tokens, second, second_tokens, batch["label"])


def batch_loss(policy, batch: dict[str, Tensor], spec: LossSpec, options: dict[str, float],
               reference: ReferenceLogps | None, settings: LogprobSettings) -> LossOutput:
    """Policy log-probs for one collated batch, looked-up reference values, and the registered loss."""
    sums, counts = sequence_logprobs(policy, batch["input_ids"], batch["attention_mask"], batch["labels"], settings)
    b = batch["index"].shape[0]
    counts = counts.float()
    policy_logps = split_logps(sums[:b], sums[b:], counts[:b], counts[b:], batch, spec)
    reference_logps = None
    if reference is not None:
        ref_first, ref_second = reference.lookup(batch["index"])
        reference_logps = split_logps(ref_first, ref_second, counts[:b], counts[b:], batch, spec)
    return spec.compute(policy_logps, reference_logps, options)


@torch.no_grad()
def evaluate(model, loader: DataLoader, loss_fn, device) -> dict[str, float]:
    """Loss and metrics averaged over every example of ``loader`` (model in eval mode: no dropout)."""
    was_training = model.training
    model.eval()
    window = MetricWindow()
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = loss_fn(model, batch, "eval")
        window.add({"loss": out.losses, **out.metrics})
    model.train(was_training)
    means = window.means()
    if "rewards/desirable" in means and "rewards/undesirable" in means:
        # Unpaired losses have no pairs to rank; the gap between the two kinds plays that role.
        means["rewards/gap"] = means["rewards/desirable"] - means["rewards/undesirable"]
    return means


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def describe_eval(tag: str, metrics: dict[str, float]) -> str:
    shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
    return f"eval ({tag}): {shown}"


# ------------------------------------------------------------------------------------------- setup


@dataclass
class TrainSetup:
    """What the loop trains and how it scores a batch; built once per run by the task's setup function.

    Attributes:
        model: the trainable model (a peft model; only adapter parameters require grad).
        tokenizer: saved beside the adapter.
        train_rows: tokenized training examples.
        eval_rows: tokenized held-out examples.
        collate: list of rows -> batch of tensors.
        loss_fn: ``(model, batch, split) -> LossOutput``; ``split`` is "train" or "eval" (which rows'
            precomputed values to look up).
        headline: metric printed before and after training, with its label.
        drop_last: whether the last short training batch is dropped (losses whose estimate needs full batches).
    """

    model: torch.nn.Module
    tokenizer: object
    train_rows: object
    eval_rows: object
    collate: Callable[[list[dict]], dict[str, Tensor]]
    loss_fn: Callable[[torch.nn.Module, dict[str, Tensor], str], LossOutput]
    headline: tuple[str, str] = ("rewards/accuracies", "held-out preference accuracy")
    drop_last: bool = False


def preference_setup(recipe: Recipe, device, log: Log) -> TrainSetup:
    """DPO-family training: data, policy with a fresh adapter, reference log-probs, registered loss."""
    cfg = recipe.train
    spec = get_loss(recipe.loss.name)
    options = recipe.loss.options()
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer, unpaired=not spec.paired, seed=cfg.seed, log=log)
    if len(data.train) == 0:
        raise ValueError(f"data.train: no usable training examples in {recipe.data.train}")
    if not spec.paired:
        labels = data.train["label"]
        warning = kto_balance_warning(sum(labels), len(labels) - sum(labels),
                                      options["desirable_weight"], options["undesirable_weight"])
        if warning:
            log(f"warning: {warning}")
    collate = partial(collate_paired if spec.paired else collate_unpaired, pad_token_id=tokenizer.pad_token_id)
    base = load_base_model(recipe.model, device=device)
    policy = add_lora(base, recipe.lora, recipe.model.gradient_checkpointing)
    settings = LogprobSettings(cfg.logprob_impl, cfg.logprob_chunk_size)
    # Reference log-probs, once, before any training step; the step only looks them up.
    reference_train = reference_eval = None
    if spec.needs_reference:
        reference_train, reference_eval = compute_references(recipe, policy, data, collate, settings, device, log)

    references = {"train": reference_train, "eval": reference_eval}

    def loss_fn(model, batch, split):
        return batch_loss(model, batch, spec, options, references[split], settings)

    headline = (("rewards/accuracies", "held-out preference accuracy") if spec.paired
                else ("rewards/gap", "held-out reward gap, desirable minus undesirable"))
    return TrainSetup(policy, tokenizer, data.train, data.eval, collate, loss_fn, headline, drop_last=not spec.paired)


# ------------------------------------------------------------------------------------------ the loop


def train(recipe: Recipe, log: Log = print) -> dict[str, dict[str, float]]:
    """Train a LoRA adapter as the recipe says; returns eval metrics before and after training."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cfg = recipe.train
    out_dir = Path(recipe.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
    metrics_path = out_dir / "metrics.jsonl"
    set_seed(cfg.seed)
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision="fp16" if cfg.loss_scaler else "no")
    device = accelerator.device

    # 1. Data, model and loss for the recipe's task.
    setup = preference_setup(recipe, device, log)
    model, loss_fn = setup.model, setup.loss_fn

    # 2. Optimizer, schedule, loaders.
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(setup.train_rows, batch_size=cfg.batch_size, shuffle=True, generator=generator,
                              collate_fn=setup.collate, drop_last=setup.drop_last)
    # Evaluation batches the held-out rows exactly as the reference precompute does, so an untrained
    # policy reproduces the reference bit for bit (margins exactly 0, accuracy exactly chance).
    eval_loader = DataLoader(setup.eval_rows, collate_fn=setup.collate,
                             batch_sampler=length_sorted_batches(setup.eval_rows, recipe.reference.batch_size))
    steps_per_epoch = max(1, len(train_loader) // cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    has_eval = len(setup.eval_rows) > 0

    # 3. Held-out metrics before training.
    before = evaluate(model, eval_loader, loss_fn, device) if has_eval else {}
    if before:
        log(describe_eval("before training", before))
        append_jsonl(metrics_path, {"split": "eval", "step": 0, **before})

    # 4. The loop. A step is one optimizer update over grad_accum micro-batches.
    model.train()
    window = MetricWindow()
    step, epoch, tokens, grad_norm = 0, 0, 0, float("nan")
    window_start = time.perf_counter()
    progress = tqdm(total=total_steps, desc="train", disable=not accelerator.is_main_process)
    while step < total_steps:
        for batch in train_loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                out = loss_fn(model, batch, "train")
                loss = out.losses.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.add({"loss": out.losses, **out.metrics})
            tokens += int(batch["attention_mask"].sum())
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            if step % cfg.log_every == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                record = {"split": "train", "step": step, "epoch": epoch, **window.means(),
                          "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                          "tokens_per_s": tokens / elapsed if elapsed > 0 else float("nan")}
                append_jsonl(metrics_path, record)
                progress.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", setup.headline[0]) if k in record})
                window.reset()
                tokens, window_start = 0, time.perf_counter()
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps and has_eval:
                metrics = evaluate(model, eval_loader, loss_fn, device)
                append_jsonl(metrics_path, {"split": "eval", "step": step, **metrics})
                log(describe_eval(f"step {step}", metrics))
            if step >= total_steps:
                break
        epoch += 1
    progress.close()

    # 5. Held-out metrics after training, adapter and tokenizer.
    after = evaluate(model, eval_loader, loss_fn, device) if has_eval else {}
    if after:
        log(describe_eval("after training", after))
        append_jsonl(metrics_path, {"split": "eval", "step": step, **after})
    adapter_dir = out_dir / "adapter"
    accelerator.unwrap_model(model).save_pretrained(adapter_dir, safe_serialization=True)
    setup.tokenizer.save_pretrained(adapter_dir)
    summary = {"eval_before": before, "eval_after": after, "steps": step}
    (out_dir / "final_metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    key, label = setup.headline
    if key in before and key in after:
        log(f"{label}: {before[key]:.3f} before -> {after[key]:.3f} after training")
    log(f"adapter saved to {adapter_dir}")
    return summary


def compute_references(recipe: Recipe, policy, data, collate, settings: LogprobSettings,
                       device, log: Log) -> tuple[ReferenceLogps, ReferenceLogps]:
    """Reference log-probs for both splits through the on-disk cache (``dpo.reference_setup``): read on a
    hit, without loading or running anything; computed on a miss by a separate model if the recipe names
    one (loaded only meanwhile), else by the policy's base with the adapter disabled."""
    return reference_logps(recipe, data, collate, settings, device, log, policy=policy)
