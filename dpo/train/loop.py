"""The training loop: one function, read top to bottom.

recipe -> task setup (data, model, step module, loss, reference log-probs; :mod:`dpo.train.setup`) ->
optimizer steps over the step module's forward and the loss -> evaluations, checkpoints, metrics ->
adapter. The loop never looks at the task or the loss by name: it runs what the setup hands it.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dpo.files import WriteFailed
from dpo.recipe import Recipe, RecipeError, TrainConfig
from dpo.reference import length_sorted_batches
from dpo.reward import load_gold
from dpo.train.checkpoint import (
    LoopState,
    StopSignals,
    TooManyBadSteps,
    TrainingInterrupted,
    capture_rng,
    check_resume,
    find_checkpoint,
    latest_checkpoint,
    prepare_output_dir,
    recipe_differences,
    restore_checkpoint,
    rewind_metrics,
    run_differences,
    run_inputs,
    run_record,
    save_checkpoint,
    version_notes,
)
from dpo.train.guards import Guards
from dpo.train.metric_log import MetricLog, require_tensorboard
from dpo.train.parallel import average_gradients, broadcast_parameters, merge_sums, shard
from dpo.train.samples import SAMPLES_FILE, HeldOutAnswers
from dpo.train.setup import preference_setup, reward_setup

Log = Callable[[str], None]
Gather = Callable[[object], list]

# How long the other processes of a multi-process run wait for the main one to prepare the data and fill
# the reference cache (precompute it beforehand with `dpo-train cache` to not wait at all).
SETUP_TIMEOUT = timedelta(hours=6)


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
    """AdamW from torch, or bitsandbytes' 8-bit (optionally paged) AdamW.

    The 8-bit variants keep both moments of every tensor of 4096+ values in 8 bits with one float32 scale
    per 256 (2 bytes a parameter instead of 8); the paged one keeps them in unified memory that can spill
    to the host when the GPU runs short (and, on a machine without CUDA, behaves as the unpaged one).
    """
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise RecipeError(f"train.optimizer: {train.optimizer} needs bitsandbytes "
                          f"(pip install 'dpo-train[quant]'), or use adamw: {exc}") from None

    cls = bnb.optim.AdamW8bit if train.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=train.lr, weight_decay=train.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = train.warmup_steps if train.warmup_steps is not None else int(train.warmup_ratio * total_steps)
    name = "constant_with_warmup" if train.scheduler == "constant" else train.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@torch.no_grad()
def evaluate(model, loader: DataLoader, loss_fn, device, gather: Gather = lambda obj: [obj]) -> dict[str, float]:
    """Loss and metrics averaged over every example of ``loader`` (``model``, the step module, in eval mode:
    no dropout).

    In a multi-process run each process evaluates its share of the batches and ``gather`` (accelerate's
    ``gather_object``) brings every process's sums together, so all of them return the same means.
    """
    was_training = model.training
    model.eval()
    window = MetricWindow()
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = loss_fn(model, batch, "eval")
        window.add({"loss": out.losses, **out.metrics})
    model.train(was_training)
    window = MetricWindow(*merge_sums(gather((window.sums, window.counts))))
    means = window.means()
    if "rewards/desirable" in means and "rewards/undesirable" in means:
        # Unpaired losses have no pairs to rank; the gap between the two kinds plays that role.
        means["rewards/gap"] = means["rewards/desirable"] - means["rewards/undesirable"]
    return means


def _quiet(message: str) -> None:
    """The log of processes other than the main one."""


def describe_eval(tag: str, metrics: dict[str, float]) -> str:
    shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
    return f"eval ({tag}): {shown}"


# ------------------------------------------------------------------------------------------ the loop


def epoch_batches(num_rows: int, batch_size: int, seed: int, epoch: int, drop_last: bool) -> list[list[int]]:
    """Row positions of every micro-batch of one epoch, in order.

    The shuffle depends only on ``(seed, epoch)``, so a resumed run rebuilds the order from its
    checkpointed position instead of replaying a data loader's hidden state.
    """
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    batches = [order[i : i + batch_size] for i in range(0, num_rows, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def count_step(loop: LoopState, losses: list[float], applied: bool, scaler_active: bool, log: Log) -> None:
    """Update the bad-step counters after a step and report a skipped one with its real values."""
    if applied:
        loop.consecutive_bad_steps = 0
        return
    loss = sum(losses) / len(losses)
    if scaler_active and math.isfinite(loss):
        # fp16 gradients overflowed: the loss scaler skipped the update and lowered its scale, as designed.
        loop.scaler_overflows += 1
        log(f"step {loop.step}: fp16 gradient overflow (grad_norm={loop.grad_norm}); the loss scaler skipped "
            "the update and lowered its scale")
        return
    loop.bad_steps += 1
    loop.consecutive_bad_steps += 1
    log(f"warning: step {loop.step}: non-finite loss or gradient norm (loss={loss}, grad_norm={loop.grad_norm}); "
        f"optimizer step skipped ({loop.consecutive_bad_steps} in a row, {loop.bad_steps} in all)")


def train(recipe: Recipe, log: Log = print, *, resume: str | Path | bool | None = None, force: bool = False,
          overwrite: bool = False, recipe_file: Path | None = None) -> dict[str, dict[str, float]]:
    """Train a LoRA adapter as the recipe says; returns eval metrics before and after training.

    Args:
        recipe: the run.
        log: where messages go.
        resume: continue from a checkpoint: True (or "latest") for the output directory's latest one, or
            a checkpoint folder; None starts afresh.
        force: resume even where settings that change the result differ from the checkpoint's (warned).
        overwrite: start afresh in an output directory that is not empty (the files a previous run recorded
            there are deleted, nothing else).
        recipe_file: the recipe's file, which the run must never delete or replace.

    Raises:
        CheckpointError: the output directory is refused (or held by another run), or the checkpoint is
            damaged or does not match.
        WriteFailed: a write failed (disk full); the message says which checkpoint is intact.
        TrainingInterrupted: SIGINT/SIGTERM; the current step was finished and a checkpoint written.
        TooManyBadSteps: ``train.max_bad_steps`` steps in a row were non-finite; the last good checkpoint stays.

    Launched as several processes (``accelerate launch`` or ``torchrun``), each one takes its share of every
    epoch's micro-batches (see :mod:`dpo.train.parallel`), so a step's batch is ``batch_size * grad_accum``
    pairs per process; the main process prepares the data and the reference cache first, and alone writes
    files.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    require_tensorboard(recipe.output.tensorboard)
    gold = load_gold(recipe.eval.gold) if recipe.eval.gold else None  # the user's code: fails before anything slow
    accelerator = Accelerator(gradient_accumulation_steps=recipe.train.grad_accum,
                              mixed_precision="fp16" if recipe.train.loss_scaler else "no",
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=SETUP_TIMEOUT)])
    out_dir, run_dir = Path(recipe.output.dir), None
    try:
        # 0. The output directory, checked and locked before anything slow (by the main process, which alone
        # writes there; the lock is held until the run ends).
        if accelerator.is_main_process:
            run_dir = prepare_output_dir(out_dir, resume=resume, overwrite=overwrite, log=log,
                                         inputs=run_inputs(recipe, recipe_file))
        return _train(accelerator, run_dir, recipe, log, resume=resume, force=force, gold=gold)
    except WriteFailed as exc:
        latest = latest_checkpoint(out_dir) if out_dir.is_dir() else None
        exc.kept = exc.kept or (f"The last checkpoint, {latest}, is intact; continue from it with --resume."
                                if latest is not None else "No checkpoint had been written yet.")
        raise
    finally:
        if run_dir is not None:
            run_dir.close()
        # A process that exits with its process group still open is aborted by the collective library's
        # threads (multi-process runs); in a single process this does nothing.
        accelerator.end_training()


def _train(accelerator, run_dir, recipe: Recipe, log: Log, *, resume: str | Path | bool | None,
           force: bool, gold=None) -> dict[str, dict[str, float]]:
    """The body of :func:`train`, given the run's ``accelerate.Accelerator``, its output directory (a
    :class:`dpo.train.output_dir.RunDirectory` on the main process, None on the others) and the
    ``eval.gold`` scorer."""
    from accelerate.utils import gather_object, set_seed

    cfg = recipe.train
    out_dir = Path(recipe.output.dir)
    recipe_tree = yaml.safe_load(recipe.to_yaml())
    set_seed(cfg.seed)
    device = accelerator.device
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if not is_main:
        log = _quiet  # the main process says everything once

    # 0. The checkpoint to resume from (the output directory is ready: see train), checked before anything slow.
    accelerator.wait_for_everyone()
    checkpoint = find_checkpoint(out_dir, resume, log) if resume else None
    if checkpoint is not None:
        check_resume(recipe_differences(checkpoint.run, recipe_tree), checkpoint, force, log)

    # 1. Data, model and loss for the recipe's task. The main process goes first: it fills the tokenized
    # data and reference caches, which the others then read.
    with accelerator.main_process_first():
        setup = (reward_setup(recipe, device, log) if recipe.task == "reward"
                 else preference_setup(recipe, device, log))
    model, step_module, loss_fn = setup.model, setup.step_module, setup.loss_fn
    run = run_record(recipe_tree, setup.fingerprints, world)
    if checkpoint is not None:
        check_resume(run_differences(checkpoint.run, run), checkpoint, force, log)
        for note in version_notes(checkpoint.run, run):
            log(f"warning: resuming with {note}; the result may differ in the last bits")
    if is_main:
        run_dir.write_text("recipe.yaml", recipe.to_yaml(), "resolved recipe")
    metrics_path = out_dir / "metrics.jsonl"  # written through MetricLog, by the main process only

    # 2. Optimizer, schedule, data order.
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    param_names, params = [name for name, _ in trainable], [p for _, p in trainable]
    if world > 1:
        # Every process starts from process 0's adapter, and draws its own dropout masks.
        broadcast_parameters(params)
        set_seed(cfg.seed + rank)
    num_rows = len(setup.train_rows)
    micro_batches = num_rows // cfg.batch_size if setup.drop_last else math.ceil(num_rows / cfg.batch_size)
    if micro_batches == 0:
        raise ValueError(f"data.train: {num_rows} training examples, fewer than train.batch_size "
                         f"({cfg.batch_size}) which this loss needs in every batch; lower train.batch_size")
    if micro_batches < world:
        raise ValueError(f"data.train: {num_rows} training examples make {micro_batches} micro-batches of "
                         f"train.batch_size={cfg.batch_size}, fewer than the {world} processes that each need "
                         "one; lower train.batch_size or use fewer processes")
    if micro_batches % world:
        log(f"note: {micro_batches} micro-batches an epoch over {world} processes: the last {micro_batches % world} "
            "of each epoch's shuffled order are left out, so every process takes as many")
    steps_per_epoch = max(1, micro_batches // world // cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = build_optimizer(params, cfg)
    # Not handed to accelerate.prepare: its scheduler wrapper would step once per process, and the step module
    # is not wrapped in DDP (see dpo.train.parallel).
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    optimizer = accelerator.prepare(optimizer)
    # Evaluation batches the held-out rows exactly as the reference precompute does, so an untrained
    # policy reproduces the reference bit for bit (margins exactly 0, accuracy exactly chance). The
    # loader gets its own generator: each pass draws a seed, which must not come from the global one that
    # dropout uses (eval_every may change on resume without changing the result).
    eval_batches = shard(length_sorted_batches(setup.eval_rows, recipe.reference.batch_size), rank, world,
                         whole_rounds=False)
    eval_loader = DataLoader(setup.eval_rows, collate_fn=setup.collate, generator=torch.Generator(),
                             batch_sampler=eval_batches)
    has_eval = len(setup.eval_rows) > 0
    answers = HeldOutAnswers.build(recipe, setup.tokenizer, setup.eval_prompts, gold, run_dir, log)
    guards = Guards(cfg.warn, log)

    def held_out(step: int) -> dict[str, float]:
        """Held-out metrics of the policy as it is now: the pairs' (all processes), its answers' (main), and
        the change since the before-training evaluation."""
        pairs = evaluate(step_module, eval_loader, loss_fn, device, gather) if has_eval else {}
        return guards.since_start({**pairs, **answers.evaluate(model, step, device)}) if pairs else {}

    def gather(obj) -> list:
        return gather_object([obj]) if world > 1 else [obj]

    def save(loop: LoopState) -> Path | None:
        # The checkpoint holds the metric window of all processes, resumed by the main one alone.
        loop.window_sums, loop.window_counts = merge_sums(gather((window.sums, window.counts)))
        rng_states = gather(capture_rng())
        path = None
        if is_main:
            path = save_checkpoint(run_dir, loop, model=model, optimizer=optimizer, scheduler=scheduler,
                                   scaler=accelerator.scaler, param_names=param_names, rng_states=rng_states,
                                   run=run, keep_last=cfg.keep_last, log=log)
        accelerator.wait_for_everyone()
        return path

    # 3. Where to start: a checkpoint's state, or the untrained policy's held-out metrics.
    if checkpoint is not None:
        loop = restore_checkpoint(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler,
                                  scaler=accelerator.scaler, param_names=param_names, process_index=rank)
        if not is_main:
            loop.window_sums, loop.window_counts = {}, {}
        if is_main and rewind_metrics(metrics_path, loop.step, final=loop.step >= total_steps):
            log(f"metrics.jsonl: dropped the records after step {loop.step} (those steps run again)")
        if is_main:
            rewind_metrics(out_dir / SAMPLES_FILE, loop.step, final=loop.step >= total_steps)
        log(f"resumed from {checkpoint.path}: step {loop.step} of {total_steps} "
            f"(epoch {loop.epoch}, micro-batch {loop.micro_batch})")
    else:
        loop = LoopState()
    # Events are flushed record by record, so a run that stops early loses none of them.
    metric_log = MetricLog(out_dir, tensorboard=recipe.output.tensorboard, enabled=is_main, run_dir=run_dir,
                           resumed_step=loop.step if checkpoint is not None else None)
    if checkpoint is None:
        loop.eval_before = held_out(0)
        if loop.eval_before:
            log(describe_eval("before training", loop.eval_before))
            metric_log.write({"split": "eval", "step": 0, **loop.eval_before})
    guards.start = loop.eval_before  # a resumed run's, from its checkpoint
    last_checkpoint, saved_step = (checkpoint.path, loop.step) if checkpoint is not None else (None, None)

    # 4. The loop. A step is one optimizer update over grad_accum micro-batches (on every process);
    # checkpoints fall between steps, where accelerate's accumulation counter is aligned, so a resumed run
    # counts the same way. ``loop.micro_batch`` counts this process's micro-batches of the epoch.
    step_module.train()
    window = MetricWindow(dict(loop.window_sums), dict(loop.window_counts))
    tokens, window_start, step_losses = 0, time.perf_counter(), []
    progress = tqdm(total=total_steps, initial=loop.step, desc="train", disable=not is_main)
    with StopSignals() as signals:
        while loop.step < total_steps:
            batches = shard(epoch_batches(num_rows, cfg.batch_size, cfg.seed, loop.epoch, setup.drop_last),
                            rank, world, whole_rounds=True)
            while loop.micro_batch < len(batches) and loop.step < total_steps:
                rows = [setup.train_rows[i] for i in batches[loop.micro_batch]]
                loop.micro_batch += 1
                batch = {k: v.to(device) for k, v in setup.collate(rows).items()}
                with accelerator.accumulate(step_module):
                    out = loss_fn(step_module, batch, "train")
                    loss = out.losses.mean()
                    step_losses.append(float(loss.detach()))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        if world > 1:
                            average_gradients(params)
                        loop.grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
                        applied = all(map(math.isfinite, step_losses)) and math.isfinite(loop.grad_norm)
                        applied = all(gather(applied))  # a step is taken by every process or by none
                        if applied:
                            optimizer.step()
                            if not optimizer.step_was_skipped:  # the fp16 loss scaler found an overflow
                                scheduler.step()
                        else:
                            # Skipped: with no gradients the optimizer moves nothing; a loss scaler still
                            # needs the call to record the overflow and lower its scale.
                            optimizer.zero_grad(set_to_none=True)
                            if accelerator.scaler is not None:
                                optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window.add({"loss": out.losses, **out.metrics})
                tokens += int(batch["attention_mask"].sum())
                if not accelerator.sync_gradients:
                    continue
                loop.step += 1
                progress.update(1)
                count_step(loop, step_losses, applied, accelerator.scaler is not None, log)
                step_losses = []
                too_many_bad = loop.consecutive_bad_steps >= cfg.max_bad_steps
                if loop.step % cfg.log_every == 0 or loop.step == total_steps or too_many_bad:
                    elapsed = time.perf_counter() - window_start
                    parts = gather((window.sums, window.counts, tokens))
                    window = MetricWindow(*merge_sums([part[:2] for part in parts]))
                    tokens = sum(part[2] for part in parts)
                    # Non-finite values are written as they are (json writes NaN / Infinity; Python reads them).
                    record = {"split": "train", "step": loop.step, "epoch": loop.epoch, **window.means(),
                              "grad_norm": loop.grad_norm, "lr": scheduler.get_last_lr()[0],
                              "tokens_per_s": tokens / elapsed if elapsed > 0 else float("nan"),
                              "bad_steps": loop.bad_steps, "bad_steps_consecutive": loop.consecutive_bad_steps}
                    if accelerator.scaler is not None:
                        record["scaler_overflows"] = loop.scaler_overflows
                    metric_log.write(guards.check(record))
                    progress.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", setup.headline[0]) if k in record})
                    window.reset()
                    tokens, window_start = 0, time.perf_counter()
                evaluating = cfg.eval_every and loop.step % cfg.eval_every == 0 and loop.step < total_steps and has_eval
                if evaluating:
                    metrics = held_out(loop.step)
                    metric_log.write(guards.check({"split": "eval", "step": loop.step, **metrics}))
                    log(describe_eval(f"step {loop.step}", metrics))
                elif cfg.sample_every and loop.step % cfg.sample_every == 0 and loop.step < total_steps:
                    answers.sample(model, loop.step, device)
                if too_many_bad:
                    kept = (f"the last good checkpoint is {last_checkpoint}; resume from it with --resume once the "
                            "cause is fixed" if last_checkpoint else "no checkpoint was written before them")
                    raise TooManyBadSteps(
                        f"stopped at step {loop.step}: {loop.consecutive_bad_steps} steps in a row had a non-finite "
                        f"loss or gradient norm (train.max_bad_steps={cfg.max_bad_steps}); {kept}. Lower train.lr, "
                        "set train.max_grad_norm, or check the data of these steps")
                stop = any(gather(signals.received is not None))  # every process stops at the same step
                periodic = cfg.save_every and loop.step % cfg.save_every == 0 and loop.consecutive_bad_steps == 0
                if stop or periodic:
                    last_checkpoint, saved_step = save(loop), loop.step
                if stop:
                    name = signal.Signals(signals.received or signal.SIGTERM).name
                    raise TrainingInterrupted(
                        f"stopped by {name} after step {loop.step} of {total_steps}; checkpoint written to "
                        f"{last_checkpoint}. Continue with: dpo-train RECIPE --resume",
                        signals.received or signal.SIGTERM)
            if loop.micro_batch >= len(batches):
                loop.epoch, loop.micro_batch = loop.epoch + 1, 0
    progress.close()
    if saved_step != loop.step:
        last_checkpoint = save(loop)

    # 5. Held-out metrics after training, adapter and tokenizer.
    after = held_out(loop.step)
    if after:
        log(describe_eval("after training", after))
        metric_log.write(guards.check({"split": "eval", "step": loop.step, **after}))
    metric_log.close()
    adapter_dir = out_dir / "adapter"
    summary = {"eval_before": loop.eval_before, "eval_after": after, "steps": loop.step, "warnings": guards.said}
    if is_main:
        def save_adapter(folder: Path) -> None:
            model.save_pretrained(folder, safe_serialization=True)
            setup.tokenizer.save_pretrained(folder)

        run_dir.write_folder("adapter", save_adapter, "adapter",
                             needed=sum(p.numel() * p.element_size() for p in params))
        run_dir.write_text("final_metrics.json", json.dumps(summary, indent=2), "final metrics")
    key, label = setup.headline
    if key in loop.eval_before and key in after:
        log(f"{label}: {loop.eval_before[key]:.3f} before -> {after[key]:.3f} after training")
    log(f"adapter saved to {adapter_dir}")
    return summary
