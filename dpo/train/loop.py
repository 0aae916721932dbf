"""The training loop: one function, read top to bottom.

recipe -> task setup (data, model, step module, loss, reference log-probs, batch source;
:mod:`dpo.train.setup`) -> optimizer steps over the step module's forward and the loss -> evaluations,
checkpoints, metrics -> adapter. The loop never looks at the task or the loss by name: it runs what the setup
hands it. Each epoch's micro-batches come from the batch source: shuffled training rows, or for an online
task one rollout, sampled when the epoch starts (see ARCHITECTURE.md, "One loop for offline and online
training").
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

from dpo.files import WriteFailed
from dpo.recipe import Recipe, RecipeError, TrainConfig
from dpo.reference import Processes, length_sorted_batches
from dpo.reward import load_gold
from dpo.train import curves
from dpo.train.checkpoint import (
    CheckpointError,
    LoopState,
    StopSignals,
    TooManyBadSteps,
    TrainingInterrupted,
    capture_rng,
    check_resume,
    find_checkpoint,
    latest_checkpoint,
    prepare_output_dir,
    read_checkpoint_state,
    recipe_differences,
    resume_state,
    rewind_metrics,
    run_differences,
    run_inputs,
    run_record,
    save_adapters,
    save_checkpoint,
    version_notes,
)
from dpo.train.console import RunConsole, format_train_line
from dpo.train.engine import (
    broadcast,
    build_accelerator,
    describe_engine,
    engine_name,
    full_adapter,
    full_optimizer_state,
    gather_head_with_step,
    inner_optimizer,
    load_full_state,
    no_grad_module,
    place_quant_states,
    shards_parameters,
)
from dpo.train.guards import Guards
from dpo.train.inputs import check_inputs
from dpo.train.metric_log import MetricLog
from dpo.train.parallel import lockstep, merge_sums, shard
from dpo.train.plan import plan_steps, warmup_steps
from dpo.train.run_files import RUN_README, model_card, run_readme, set_adapter_base
from dpo.train.samples import SAMPLES_FILE, HeldOutAnswers
from dpo.train.setup import SETUPS
from dpo.train.trackers import require_trackers

Log = Callable[[str], None]
Gather = Callable[[object], list]

# How long a process of a multi-process run waits for the others at a collective: the longest waits are for
# one process's work alone (a machine's tokenizing, another run writing a reference cache entry this run needs).
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


def build_optimizer(params: list[torch.nn.Parameter] | list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' 8-bit (optionally paged) AdamW, over parameters or parameter groups
    (a group's ``lr`` overrides ``train.lr``).

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


def grad_norm(value) -> float:
    """The gradient norm an engine reports as a float: a sharded engine's is a replicated tensor, DeepSpeed's
    may be missing when it clips nothing (NaN)."""
    if value is None:
        return math.nan
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return float(value)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    from transformers import get_scheduler

    warmup = warmup_steps(train, total_steps)
    name = "constant_with_warmup" if train.scheduler == "constant" else train.scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@torch.no_grad()
def evaluate(model, loader: DataLoader, loss_fn, device, gather: Gather = lambda obj: [obj],
             counted: list[bool] | None = None) -> dict[str, float]:
    """Loss and metrics averaged over every example of ``loader`` (``model``, the step module, in eval mode:
    no dropout).

    In a multi-process run each process evaluates its share of the batches and ``gather`` (accelerate's
    ``gather_object``) brings every process's sums together, so all of them return the same means.
    ``counted`` marks, per batch, whether it counts: False on a repeat that only keeps the processes' forwards
    in step (:func:`dpo.train.parallel.lockstep`).
    """
    was_training = model.training
    model.eval()
    window = MetricWindow()
    for position, batch in enumerate(loader):
        batch = {k: v.to(device) for k, v in batch.items()}
        out = loss_fn(model, batch, "eval")
        if counted is not None and not counted[position]:
            continue
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
          overwrite: bool = False, recipe_file: Path | None = None,
          console: RunConsole | None = None) -> dict[str, dict[str, float]]:
    """Train a LoRA adapter as the recipe says; returns eval metrics before and after training.

    Args:
        recipe: the run.
        log: where messages go (when no ``console`` is given).
        resume: continue from a checkpoint: True (or "latest") for the output directory's latest one, or
            a checkpoint folder; None starts afresh.
        force: resume even where settings that change the result differ from the checkpoint's (warned).
        overwrite: start afresh in an output directory that is not empty (the files a previous run recorded
            there are deleted, nothing else).
        recipe_file: the recipe's file, which the run must never delete or replace.
        console: the run's terminal and ``train.log`` (:class:`dpo.train.console.RunConsole`); by default one
            that writes to ``log``.

    Raises:
        CheckpointError: the output directory is refused (or held by another run), or the checkpoint is
            damaged or does not match.
        WriteFailed: a write failed (disk full); the message says which checkpoint is intact.
        TrainingInterrupted: SIGINT/SIGTERM; the current step was finished and a checkpoint written.
        TooManyBadSteps: ``train.max_bad_steps`` steps in a row were non-finite; the last good checkpoint stays.

    Launched as several processes (``accelerate launch`` or ``torchrun``), the step module trains under the
    engine the launch chose (DDP, FSDP2 or DeepSpeed: :mod:`dpo.train.engine`) and each process takes its
    share of every epoch's micro-batches (see :mod:`dpo.train.parallel`), so a step's batch is
    ``batch_size * grad_accum`` pairs per process; the processes of a machine share its tokenized-data cache,
    all processes share the reference precompute, and the main process alone writes the output directory.
    """
    console = console if console is not None else RunConsole(log, verbose=True)
    log = console.log
    require_trackers(recipe.output)
    check_inputs(recipe)  # every path the run reads, before anything is created
    gold = load_gold(recipe.eval.gold) if recipe.eval.gold else None  # the user's code: fails before anything slow
    accelerator = build_accelerator(recipe, SETUP_TIMEOUT)
    out_dir, run_dir = Path(recipe.output.dir), None
    try:
        # 0. The output directory, checked and locked before anything slow (by the main process, which alone
        # writes there; the lock is held until the run ends).
        if accelerator.is_main_process:
            run_dir = prepare_output_dir(out_dir, resume=resume, overwrite=overwrite, log=log,
                                         inputs=run_inputs(recipe, recipe_file))
            console.open_log(run_dir, resumed=bool(resume))
        return _train(accelerator, run_dir, recipe, console, resume=resume, force=force, gold=gold)
    except WriteFailed as exc:
        latest = latest_checkpoint(out_dir) if out_dir.is_dir() else None
        exc.kept = exc.kept or (f"The last checkpoint, {latest}, is intact; continue from it with --resume."
                                if latest is not None else "No checkpoint had been written yet.")
        raise
    finally:
        console.close_bar()
        if run_dir is not None:
            run_dir.close()
        # A process that exits with its process group still open is aborted by the collective library's
        # threads (multi-process runs); in a single process this does nothing.
        accelerator.end_training()


def _train(accelerator, run_dir, recipe: Recipe, console: RunConsole, *, resume: str | Path | bool | None,
           force: bool, gold=None) -> dict[str, dict[str, float]]:
    """The body of :func:`train`, given the run's ``accelerate.Accelerator``, its output directory (a
    :class:`dpo.train.output_dir.RunDirectory` on the main process, None on the others), its console and the
    ``eval.gold`` scorer."""
    from accelerate.utils import gather_object, set_seed

    log = console.log
    cfg = recipe.train
    out_dir = Path(recipe.output.dir)
    recipe_tree = yaml.safe_load(recipe.to_yaml())
    set_seed(cfg.seed)
    device = accelerator.device
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    if not is_main:
        log = _quiet  # the main process says everything once
    engine = engine_name(accelerator)
    if world > 1:
        log(f"engine: {describe_engine(accelerator)}")

    def gather(obj) -> list:
        return gather_object([obj]) if world > 1 else [obj]

    # 0. The checkpoint to resume from (the output directory is ready: see train), checked before anything slow.
    # The main process reads it and the others get it from there: several machines need not share a disk.
    accelerator.wait_for_everyone()
    found = None
    if is_main and resume:
        try:
            found = find_checkpoint(out_dir, resume, log)
            if found is not None:
                check_resume(recipe_differences(found.run, recipe_tree), found, force, log)
        except CheckpointError as exc:
            found = exc
    found = broadcast(accelerator, found)
    if isinstance(found, CheckpointError):
        raise found
    checkpoint = found

    # 1. Data and model for the recipe's task, on every process at once: the processes of a machine share its
    # tokenized-data cache (one tokenizes each split, the others wait for its entry and read it), and loading
    # can itself be collective (DeepSpeed ZeRO-3 partitions each weight as it is created). A model the engine
    # shards is loaded on the CPU: the engine moves each process's shard to its device.
    sharded = shards_parameters(accelerator)
    load_device = torch.device("cpu") if sharded else device
    try:
        setup = SETUPS[recipe.task](recipe, load_device, log, shardable=sharded)
    except BaseException:
        if is_main and checkpoint is None:
            run_dir.discard()  # a fresh run that could not load its inputs leaves nothing behind
        raise
    model, loss_fn = setup.model, setup.loss_fn
    set_adapter_base(model, recipe.model.path)  # adapter_config.json names the base by its absolute path

    # 2. Optimizer and engine. Parameter groups (one, unless the task trains parts at their own learning rate),
    # in the optimizer's order. Every process starts from process 0's adapter: DDP and DeepSpeed send it when
    # they wrap the module, FSDP shards each process's own copy, so it is sent here first.
    groups = setup.param_groups([(name, p) for name, p in model.named_parameters() if p.requires_grad])
    trainable = [named for members, _ in groups for named in members]
    param_names, params = [name for name, _ in trainable], [p for _, p in trainable]
    if engine == "fsdp2":
        with torch.no_grad():
            for param, value in zip(params, broadcast(accelerator, [p.detach().cpu() for p in params]), strict=True):
                param.copy_(value)
    optimizer = build_optimizer([{"params": [p for _, p in members], **options} for members, options in groups], cfg)
    step_module, optimizer = accelerator.prepare(setup.step_module, optimizer)
    gather_head_with_step(accelerator, step_module)
    if sharded:
        place_quant_states(model, device)
    if world > 1:
        set_seed(cfg.seed + rank)  # each process draws its own dropout masks
    # Passes without gradients (evaluation, the reference) run through the step module itself unless the
    # engine shards it; then every process runs as many forwards (dpo.train.parallel.lockstep).
    no_grad_step = no_grad_module(accelerator, step_module)
    processes = Processes(rank=rank, world=world, local_main=accelerator.is_local_main_process, gather=gather,
                          lockstep=sharded)
    if setup.references is not None:
        setup.references(no_grad_step, processes)
    run = run_record(recipe_tree, setup.fingerprints, world, engine)
    if checkpoint is not None:
        check_resume(run_differences(checkpoint.run, run), checkpoint, force, log)
        for note in version_notes(checkpoint.run, run):
            log(f"warning: resuming with {note}; the result may differ in the last bits")
    if is_main:
        run_dir.write_text("recipe.yaml", recipe.to_yaml(), "resolved recipe")
        run_dir.write_text(RUN_README, run_readme(recipe), "run README")
    metrics_path = out_dir / "metrics.jsonl"  # written through MetricLog, by the main process only

    # The schedule and the data order. An epoch is a pass over the training rows, or an online task's rollout
    # (see dpo.train.setup).
    plan = plan_steps(len(setup.train_rows), cfg, drop_last=setup.drop_last, world=world,
                      micro_batches=setup.batches.micro_batches(cfg.batch_size, world, log),
                      epochs=setup.batches.epochs(cfg.epochs))
    if plan.left_out:
        log(f"note: {plan.micro_batches} micro-batches an epoch over {world} processes: the last {plan.left_out} "
            "of each epoch's shuffled order are left out, so every process takes as many")
    total_steps = plan.total_steps
    # Not handed to accelerate.prepare: its scheduler wrapper would step once per process. Built on the torch
    # optimizer inside the engine's wrappers, whose parameter groups the engine steps.
    scheduler = build_scheduler(inner_optimizer(optimizer), cfg, total_steps)
    # Evaluation batches the held-out rows exactly as the reference precompute does, so an untrained
    # policy reproduces the reference bit for bit (margins exactly 0, accuracy exactly chance). The
    # loader gets its own generator: each pass draws a seed, which must not come from the global one that
    # dropout uses (eval_every may change on resume without changing the result).
    all_eval_batches = length_sorted_batches(setup.eval_rows, recipe.reference.batch_size)
    eval_batches = (lockstep(all_eval_batches, rank, world) if sharded
                    else [(batch, True) for batch in shard(all_eval_batches, rank, world, whole_rounds=False)])
    eval_loader = DataLoader(setup.eval_rows, collate_fn=setup.collate, generator=torch.Generator(),
                             batch_sampler=[batch for batch, _ in eval_batches])
    eval_counted = [counted for _, counted in eval_batches]
    has_eval = len(setup.eval_rows) > 0
    # Greedy answers come from the main process alone, which a sharded engine's model cannot do by itself.
    if sharded and recipe.eval.generate and setup.eval_prompts:
        log(f"eval.generate: no greedy answers under {engine} (the parameters are "
            "sharded across the processes); sample the saved adapter instead (dpo-train compare)")
    answers = HeldOutAnswers.build(recipe, setup.tokenizer, setup.eval_prompts, gold, None if sharded else run_dir,
                                   log)
    guards = Guards(cfg.warn and recipe.task == "preference", log)  # their advice is for the preference losses

    def held_out(step: int) -> dict[str, float]:
        """Held-out metrics of the policy as it is now: the pairs' (all processes), its answers' (main), and
        the change since the before-training evaluation."""
        pairs = evaluate(no_grad_step, eval_loader, loss_fn, device, gather, eval_counted) if has_eval else {}
        return guards.since_start({**pairs, **answers.evaluate(model, step, device)}) if pairs else {}

    def save(loop: LoopState) -> Path | None:
        # The checkpoint holds the metric window of all processes, resumed by the main one alone, and the
        # adapter and optimizer state as full tensors, whatever the engine shards.
        loop.window_sums, loop.window_counts = merge_sums(gather((window.sums, window.counts)))
        rng_states = gather(capture_rng())
        adapter_state = full_adapter(accelerator, model, param_names)
        optimizer_state = full_optimizer_state(accelerator, model, optimizer, param_names)
        path = None
        if is_main:
            path = save_checkpoint(run_dir, loop, model=model, optimizer=optimizer, scheduler=scheduler,
                                   scaler=accelerator.scaler, param_names=param_names, rng_states=rng_states,
                                   run=run, keep_last=cfg.keep_last, log=log, batch_state=setup.batches.state(),
                                   adapter_state=adapter_state, optimizer_state=optimizer_state)
        accelerator.wait_for_everyone()
        return path

    # 3. Where to start: a checkpoint's state, or the untrained policy's held-out metrics.
    if checkpoint is not None:
        state = None
        if is_main:
            try:
                state = read_checkpoint_state(checkpoint, model, param_names)
            except CheckpointError as exc:
                state = exc
        state = broadcast(accelerator, state)
        if isinstance(state, CheckpointError):
            raise state
        load_full_state(accelerator, model, optimizer, param_names, state["adapter"], state["optimizer"])
        setup.batches.load_state(state["batches"])
        loop = resume_state(state, checkpoint, scheduler=scheduler, scaler=accelerator.scaler, process_index=rank,
                            force=force, log=log)
        saved_world = checkpoint.run.get("num_processes", world)
        if saved_world != world:  # --force: the same place in the epoch's order, counted in this run's shares
            loop.micro_batch = loop.micro_batch * saved_world // world
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
    metric_log = MetricLog(out_dir, trackers=recipe.output.trackers(), enabled=is_main, run_dir=run_dir,
                           resumed_step=loop.step if checkpoint is not None else None,
                           project=recipe.output.project, config=recipe_tree)
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
    console.start_bar(total_steps, initial=loop.step, enabled=is_main)
    run_start = time.perf_counter()
    with StopSignals() as signals:
        while loop.step < total_steps:
            started = time.perf_counter()
            batches = setup.batches.epoch(loop.epoch, rank, world)  # an online task samples its rollout here
            window_start += time.perf_counter() - started  # tokens_per_s is the update's (rollouts log their own)
            while loop.micro_batch < len(batches) and loop.step < total_steps:
                batch = {k: v.to(device) for k, v in batches[loop.micro_batch].items()}
                loop.micro_batch += 1
                with accelerator.accumulate(step_module):
                    out = loss_fn(step_module, batch, "train")
                    loss = out.losses.mean()
                    step_losses.append(float(loss.detach()))
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:  # the engine has reduced the gradients of this step
                        loop.grad_norm = grad_norm(accelerator.clip_grad_norm_(step_module.parameters(),
                                                                               cfg.max_grad_norm or math.inf))
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
                tokens += int(batch["sequence_lengths"].sum())
                if not accelerator.sync_gradients:
                    continue
                loop.step += 1
                console.advance()
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
                    console.show_metrics(record)
                    log(format_train_line(record, total_steps, time.perf_counter() - run_start))
                    window.reset()
                    tokens, window_start = 0, time.perf_counter()
                evaluating = cfg.eval_every and loop.step % cfg.eval_every == 0 and loop.step < total_steps and has_eval
                if evaluating:
                    metrics = held_out(loop.step)
                    metric_log.write(guards.check({"split": "eval", "step": loop.step, **metrics}))
                    log(describe_eval(f"step {loop.step}", metrics))
                    if is_main:
                        curves.write_run_curves(run_dir, log)
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
    console.close_bar()
    if saved_step != loop.step:
        last_checkpoint = save(loop)

    # 5. Held-out metrics after training, adapter and tokenizer.
    after = held_out(loop.step)
    if after:
        log(describe_eval("after training", after))
        metric_log.write(guards.check({"split": "eval", "step": loop.step, **after}))
    metric_log.close()
    if is_main:
        curves.write_run_curves(run_dir, log)
    adapter_dir = out_dir / "adapter"
    summary = {"eval_before": loop.eval_before, "eval_after": after, "steps": loop.step, "warnings": guards.said,
               **setup.batches.summary()}
    adapter_state = full_adapter(accelerator, model, param_names) if engine != "single" else None
    if is_main:
        def save_adapter(folder: Path) -> None:
            save_adapters(model, folder, adapter_state)
            setup.tokenizer.save_pretrained(folder)
            # peft's README.md is a template to fill in; this one is filled in.
            (folder / "README.md").write_text(model_card(recipe, summary, setup.fingerprints, setup.headline),
                                              encoding="utf-8")

        run_dir.write_folder("adapter", save_adapter, "adapter",
                             needed=sum(p.numel() * p.element_size() for p in params))
        run_dir.write_text("final_metrics.json", json.dumps(summary, indent=2), "final metrics")
        run_dir.write_text(RUN_README, run_readme(recipe, summary), "run README")
    key, label = setup.headline
    if key in loop.eval_before and key in after:
        log(f"{label}: {loop.eval_before[key]:.3f} before -> {after[key]:.3f} after training")
    log(f"adapter saved to {adapter_dir}")
    return summary
