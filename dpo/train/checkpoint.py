"""Checkpoints and the output directory: everything a run needs to stop and resume bit-exactly.

A run's output directory (its marker and lock: :mod:`dpo.train.output_dir`)::

    OUT/.dpo-train                 marker: dpo-train created this directory, and every path it wrote here
    OUT/.dpo-train.lock            the lock of the run that holds the directory
    OUT/recipe.yaml, metrics.jsonl, final_metrics.json, samples.jsonl, adapter/
    OUT/checkpoints/step-000040/
        adapter/                   the peft adapter (adapter_model.safetensors, adapter_config.json); further
                                   trained adapters (an online task's value model) in adapter/NAME/
        optimizer.safetensors      optimizer state tensors, keyed "<parameter index>.<name>"
        optimizer.json             parameter names, hyper-parameters, non-tensor state (step counts)
        scheduler.json             learning-rate schedule position
        scaler.json                loss-scaler state (only when a loss scaler runs)
        rng.json                   python, numpy, torch and CUDA generator states, one entry per process
        state.json                 loop position (epoch, micro-batch), global step, counters, metric window
        batches.safetensors        what the batch source needs to give the same batches (an online task's
                                   current rollout, KL coefficient and budget); absent when nothing
        run.json                   resolved recipe, data and reference fingerprints, process count, versions
        manifest.json              written last: size and SHA-256 of every file above

A checkpoint is written into a temporary folder beside its target, every file fsynced, the folder renamed
into place, and only then the manifest written (atomically). A folder without a manifest is not a
checkpoint (and is cleaned up when the run resumes); one whose manifest is damaged is reported and skipped.
Only safetensors and JSON are ever read back: nothing in a checkpoint is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dpo.files import TEMP_PREFIX, sha256_of_file, write_text_atomic, writing
from dpo.files import sync_dir as _sync_dir
from dpo.files import sync_file as _sync_file
from dpo.train.output_dir import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_MANIFEST,
    CHECKPOINTS_DIR,
    LOCK_FILE,
    MARKER,
    CheckpointError,
    RunDirectory,
    input_conflicts,
    probe_lock,
    take_lock,
    taken_outputs,
)
from dpo.train.trackers import require_trackers

Log = Callable[[str], None]

MANIFEST = CHECKPOINT_MANIFEST
FORMAT = CHECKPOINT_FORMAT
FORMAT_VERSION = 1
BATCH_STATE = "batches.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TRASH_PREFIX = ".old-"

# Recipe keys that cannot change the trained result (logging, saving, where things go), so a resume
# ignores them.
IGNORED_ON_RESUME = frozenset({
    "output.dir", "output.report_to", "output.project", "output.tensorboard", "train.log_every", "train.eval_every", "train.save_every",
    "train.keep_last", "train.max_bad_steps", "data.num_proc", "data.cache_dir", "reference.batch_size",
    "reference.cache_dir", "reference.verify",
    # What evaluations add and what the run says: greedy answers (run under a saved and restored RNG state)
    # and the guards' warnings change no weight.
    "train.warn", "train.sample_every", "eval.generate", "eval.max_new_tokens", "eval.gold", "eval.samples",
})
# Paths whose content a fingerprint checks: when the checkpoint has that fingerprint, a moved file is
# fine and a changed one is caught by the fingerprint. Reference log-probs are a function of the model's
# weights, so they stand in for the model.
CONTENT_CHECKED = {
    "data.train": "data.train",
    "data.eval": "data.eval",
    "model.path": "reference.train",
    "reference.model_path": "reference.train",
    "reference.adapter": "reference.train",
}


class TrainingStopped(RuntimeError):
    """The run stopped before its last step; ``exit_code`` is the process status the CLI exits with."""

    exit_code = 1


class TrainingInterrupted(TrainingStopped):
    """SIGINT or SIGTERM: the current step was finished and a checkpoint written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell convention for "ended by signal N"


class TooManyBadSteps(TrainingStopped):
    """``max_bad_steps`` consecutive steps had a non-finite loss or gradient norm."""

    exit_code = 3


# ----------------------------------------------------------------------------------- loop state


@dataclass
class LoopState:
    """Where the training loop is and what it has counted; ``state.json`` of a checkpoint.

    Attributes:
        step: optimizer steps taken, skipped (non-finite) steps included.
        epoch: current pass over the training data.
        micro_batch: index of the next micro-batch of ``epoch`` to run.
        bad_steps: steps skipped for a non-finite loss or gradient norm, in total.
        consecutive_bad_steps: the current run of such steps (0 after a good step).
        scaler_overflows: steps the fp16 loss scaler skipped (it lowers its scale and goes on).
        grad_norm: the last gradient norm (before clipping).
        eval_before: held-out metrics of the untrained policy.
        window_sums: running sums of the metrics not yet logged.
        window_counts: how many values each sum holds.
    """

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    bad_steps: int = 0
    consecutive_bad_steps: int = 0
    scaler_overflows: int = 0
    grad_norm: float = math.nan
    eval_before: dict[str, float] = field(default_factory=dict)
    window_sums: dict[str, float] = field(default_factory=dict)
    window_counts: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> LoopState:
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(values))
        if missing:
            raise CheckpointError(f"{source}: missing {', '.join(missing)}; the checkpoint is damaged")
        return cls(**{k: values[k] for k in names})


# -------------------------------------------------------------------------------- small helpers


def _json_bytes(value: Any, name: str) -> bytes:
    try:
        # NaN and infinity are written as the bare words NaN and Infinity, which Python reads back.
        return json.dumps(value, indent=1).encode("utf-8")
    except TypeError as exc:
        raise TypeError(f"{name}: cannot store this value as JSON ({exc})") from None


def _write_new_file(path: Path, data: bytes) -> None:
    try:
        with open(path, "xb") as handle:
            handle.write(data)
    except OSError as exc:
        exc.filename = exc.filename or str(path)  # a failed write() names no file; the message should
        raise
    _sync_file(path)


def tensor_fingerprint(*tensors: Tensor) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes (equal iff the tensors are bitwise equal)."""
    digest = hashlib.sha256()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for name in ("dpo-train", "torch", "transformers", "peft", "accelerate", "safetensors", "numpy"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_record(recipe_tree: dict[str, Any], fingerprints: dict[str, str], num_processes: int,
               engine: str = "single") -> dict[str, Any]:
    """What a checkpoint remembers about the run that wrote it (``run.json``); ``engine`` is
    :func:`dpo.train.engine.engine_name` (``single``, ``ddp``, ``fsdp2``, ``deepspeed-zeroN``)."""
    return {"recipe": recipe_tree, "fingerprints": dict(fingerprints), "num_processes": num_processes,
            "engine": engine, "versions": library_versions()}


# ------------------------------------------------------------------------------------ RNG states


def capture_rng() -> dict[str, Any]:
    """This process's python, numpy, torch and CUDA generator states, as JSON-ready lists."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist(),
            "cuda": cuda}


def restore_rng(state: dict[str, Any]) -> None:
    """Set every generator to a state from :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(torch.tensor(cuda_state, dtype=torch.uint8), device)


# --------------------------------------------------------------------------- output directory


Inputs = Sequence[tuple[str, Path]]


@dataclass(frozen=True)
class OutputPlan:
    """What a run does with its output directory, decided before anything is written.

    Attributes:
        marker: the directory's marker (None: dpo-train did not create it).
        start_over: delete what a previous run recorded there first (``--overwrite``, or ``--resume`` that
            finds no checkpoint).
        restart: ``--resume`` found no checkpoint: the run starts from step 0.
        summary: one line saying what happens, for ``--dry-run``.
    """

    marker: RunDirectory | None
    start_over: bool
    restart: bool
    summary: str


def _listing(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def plan_output_dir(out_dir: Path, *, resume: str | Path | bool | None, overwrite: bool,
                    inputs: Inputs = ()) -> OutputPlan:
    """Apply the output-directory rules without touching anything.

    A new or empty folder is used as is. In a folder dpo-train did not create (no marker), a run's output
    names must all be free: ``--overwrite`` then writes beside what is there and deletes nothing. A folder
    holding a previous run needs ``--resume`` (continue) or ``--overwrite`` (delete exactly the paths that
    run recorded). In every case a run refuses when one of its output names is taken by something dpo-train
    did not write, or when an input (recipe, data, model, caches) is or lies inside one of them.

    Args:
        out_dir: ``output.dir``.
        resume: ``--resume`` (True/"latest", or a checkpoint folder), or None.
        overwrite: ``--overwrite``.
        inputs: ``(recipe key, path)`` of everything the run reads.

    Raises:
        CheckpointError: the folder is refused; the message names what is in the way and what to do.
    """
    if resume and overwrite:
        raise CheckpointError("--resume continues the run in output.dir and --overwrite deletes it; pass one")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output.dir {out_dir} is a file; set output.dir to a folder")
    exists = out_dir.is_dir()
    own = {MARKER, LOCK_FILE, f"{TEMP_PREFIX}{MARKER}"}
    entries = sorted(p.name for p in out_dir.iterdir() if p.name not in own) if exists else []
    marker = RunDirectory.read(out_dir) if exists else None
    taken = taken_outputs(out_dir, marker)
    latest = resume is True or resume == "latest"
    if marker is None:
        if not entries:
            restart = bool(latest)
            return OutputPlan(None, False, restart, f"{out_dir}: {'empty' if exists else 'new'} folder; the run "
                              f"starts{' from step 0 (nothing to resume)' if restart else ''}")
        if not overwrite:
            raise CheckpointError(
                f"output.dir {out_dir} is not empty and was not created by dpo-train ({_listing(entries)})"
                f"{', so it holds no run to resume' if resume else ''}; set output.dir to a new or empty folder, or "
                "pass --overwrite to write into it beside what is there (dpo-train never deletes what it did not write)")
        if taken:
            raise CheckpointError(
                f"--overwrite: output.dir {out_dir} was not created by dpo-train, and it holds {_listing(taken)}, "
                "names a run writes; dpo-train deletes or replaces only what it wrote itself: move them away, or "
                "set output.dir to another folder")
        _check_inputs(out_dir, inputs, None, bool(resume))
        return OutputPlan(None, False, False, f"{out_dir}: not created by dpo-train; the run writes beside "
                          f"{len(entries)} entries already there and deletes none")
    if taken:
        raise CheckpointError(
            f"output.dir {out_dir}: dpo-train did not write {_listing(taken)} there (or it was replaced since), and a "
            "run writes these names; move them away, or set output.dir to another folder")
    _check_inputs(out_dir, inputs, marker, bool(resume))
    previous = marker.wrote_anything()
    if resume:
        complete, damaged = scan_checkpoints(out_dir)
        restart = latest and not complete and not damaged
        summary = (f"{out_dir}: holds no checkpoint; the run starts from step 0" if restart
                   else f"{out_dir}: the run resumes")
    elif previous and not overwrite:
        raise CheckpointError(
            f"output.dir {out_dir} holds a previous dpo-train run: continue it with --resume, start over with "
            "--overwrite (deletes the files that run wrote, nothing else), or set output.dir to a new folder")
    else:
        restart = False
        files = sum(1 for path in marker.files if os.path.lexists(out_dir / path))
        summary = (f"{out_dir}: --overwrite deletes the {files} files the previous run wrote there (and nothing "
                   "else)" if previous else f"{out_dir}: the run starts")
    start_over = restart or not resume
    if start_over:
        # A new run writes its checkpoints by these names: a user's file inside one of the old ones would
        # stand in its way (and is never deleted).
        blocked = [entry for folder in sorted(marker.dirs) if _STEP_DIR.match(Path(folder).name)
                   and Path(folder).parent.as_posix() == CHECKPOINTS_DIR for entry in marker.foreign_inside(folder)]
        if blocked:
            raise CheckpointError(
                f"output.dir {out_dir}: {_listing(blocked)} inside the previous run's checkpoints were not written "
                "by dpo-train, and the new run writes checkpoints there; move them away first")
    return OutputPlan(marker, start_over, restart, summary)


def _check_inputs(out_dir: Path, inputs: Inputs, marker: RunDirectory | None, resume: bool) -> None:
    conflicts = input_conflicts(out_dir, inputs, marker, resume)
    if conflicts:
        raise CheckpointError(f"output.dir {out_dir}: {'; '.join(conflicts)}, and would be replaced or deleted; "
                              "set output.dir to another folder, or move these inputs out of it")


def run_inputs(recipe, recipe_file: Path | None = None) -> list[tuple[str, Path]]:
    """What a run reads, as ``(recipe key, path)``: the recipe file, data, chat template file, model,
    reference and cache folders. None of it may be a path the run writes or deletes."""
    data, reference = recipe.data, recipe.reference
    template = data.chat_template
    if template is not None and ("{{" in template or "{%" in template):
        template = None  # an inline template, not a file
    online = getattr(recipe, "online", None)
    named = [("the recipe", recipe_file), ("model.path", recipe.model.path),
             ("model.adapter", getattr(recipe.model, "adapter", None)),
             ("online.reward_model", online.reward_model if online is not None else None), ("data.train", data.train),
             ("data.eval", data.eval), ("data.chat_template", template), ("data.cache_dir", data.cache_dir),
             ("reference.model_path", reference.model_path), ("reference.adapter", reference.adapter),
             ("reference.cache_dir", reference.cache_dir)]
    return [(key, Path(value)) for key, value in named if value is not None]


def check_output_dir(out_dir: Path, *, resume: str | Path | bool | None, overwrite: bool,
                     inputs: Inputs = ()) -> str:
    """Every output-directory check of a real run, writing nothing (``--dry-run``); returns the plan's summary.

    Raises:
        CheckpointError: the real run would be refused (also when another run holds the folder).
    """
    if out_dir.is_dir():
        probe_lock(out_dir)
    return plan_output_dir(out_dir, resume=resume, overwrite=overwrite, inputs=inputs).summary


def preflight(recipe, *, resume: str | Path | bool | None = None, overwrite: bool = False, force: bool = False,
              recipe_file: Path | None = None) -> str:
    """Every check a run makes before it loads anything, writing nothing (``--dry-run``): TensorBoard, every
    path the run reads (:func:`dpo.train.inputs.check_inputs`), the output directory and its lock, and with ``resume`` the checkpoint it would take and the recipe values
    that differ from it.

    Returns:
        What the run would do, a few lines.

    Raises:
        CheckpointError, RecipeError: the run would be refused; the message says why.
    """
    import yaml

    from dpo.train.inputs import check_inputs

    require_trackers(recipe.output)
    check_inputs(recipe)
    out_dir = Path(recipe.output.dir)
    lines = [check_output_dir(out_dir, resume=resume, overwrite=overwrite, inputs=run_inputs(recipe, recipe_file))]
    if resume and out_dir.is_dir():
        checkpoint = find_checkpoint(out_dir, resume, lines.append)
        if checkpoint is not None:
            differences = recipe_differences(checkpoint.run, yaml.safe_load(recipe.to_yaml()))
            check_resume(differences, checkpoint, force, lines.append)
            lines.append(f"resumes from {checkpoint.path} (step {checkpoint.step}); the data and reference "
                         "log-probs are compared with it when the run starts")
    return "\n".join(lines)


def prepare_output_dir(out_dir: Path, *, resume: str | Path | bool | None, overwrite: bool, log: Log,
                       inputs: Inputs = ()) -> RunDirectory:
    """Apply the output-directory rules (:func:`plan_output_dir`), take the run lock and set up the marker.

    Returns:
        The directory, holding the lock until :meth:`RunDirectory.close` (or the process ends).

    Raises:
        CheckpointError: the folder is refused, or another run holds it (named by its process id).
    """
    if out_dir.is_dir():
        probe_lock(out_dir)  # "in use by process N" before any other complaint about the folder
    plan_output_dir(out_dir, resume=resume, overwrite=overwrite, inputs=inputs)  # refuse before creating anything
    created = not os.path.lexists(out_dir)
    with writing(out_dir, "output directory"):
        out_dir.mkdir(parents=True, exist_ok=True)
    lock = take_lock(out_dir)
    try:
        plan = plan_output_dir(out_dir, resume=resume, overwrite=overwrite, inputs=inputs)  # now under the lock
        directory = plan.marker or RunDirectory.create(out_dir)
        if plan.start_over:
            removed, kept = directory.remove_all()
            what = "--resume: no checkpoint to resume from" if plan.restart else "--overwrite"
            if removed or kept:
                log(f"{what}: removed the {removed} files the previous run wrote in {out_dir}"
                    + (f"; kept {_listing(kept)} (not written by dpo-train)" if kept else ""))
        elif resume:
            clean_incomplete_checkpoints(directory, log)
        if plan.restart:
            log(f"--resume: {out_dir / CHECKPOINTS_DIR} holds no checkpoint (the run stopped before its first one); "
                "starting from step 0")
        directory.lock, directory.created = lock, created
        return directory
    except BaseException:
        lock.release()
        raise


def clean_incomplete_checkpoints(directory: RunDirectory, log: Log) -> None:
    """Delete what a killed run left under ``checkpoints/``: temporary folders, and step folders without a
    manifest (a save or a rotation cut short). Only recorded files go (see :meth:`RunDirectory.remove`)."""
    for scratch in sorted(s for s in directory.scratch if s.startswith(f"{CHECKPOINTS_DIR}/")):
        directory.remove(scratch)
        log(f"checkpoint: removed {directory.root / scratch}, left by a run that stopped while saving")
    root = directory.root / CHECKPOINTS_DIR
    if not root.is_dir() or root.is_symlink():
        return
    for entry in sorted(root.iterdir()):
        if (_STEP_DIR.match(entry.name) and entry.is_dir() and not entry.is_symlink()
                and not os.path.lexists(entry / MANIFEST)):
            kept = directory.remove(f"{CHECKPOINTS_DIR}/{entry.name}")
            log(f"checkpoint: removed the incomplete {entry} (no manifest: its save or deletion was cut short)"
                + (f"; kept {_listing(kept)} (not written by dpo-train)" if kept else ""))


def rewind_metrics(path: Path, step: int, final: bool = False) -> int:
    """Drop the metric records that the checkpoint of ``step`` had not seen; returns how many.

    Those are the records after ``step``, a record cut short by a crash (a last line that is not valid
    JSON), and, when ``step`` is the run's last (``final``), the closing evaluation at ``step``, which is
    written after that checkpoint and which the resumed run writes again.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            dropped += 1
            continue
        written_after = record.get("step", 0) > step or (final and record.get("step") == step
                                                          and record.get("split") == "eval")
        if written_after:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return dropped


# --------------------------------------------------------------------------------------- writing


def _optimizer_files(state_dict: dict[str, Any], param_names: list[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer's state dict into tensors (safetensors) and everything else (JSON)."""
    tensors: dict[str, Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()

    def put(name: str, value: Tensor) -> None:
        value = value.detach().cpu().contiguous()
        if value.data_ptr() in seen and value.numel() > 0:
            value = value.clone()  # safetensors refuses tensors that share memory (8-bit quantile maps)
        seen.add(value.data_ptr())
        tensors[name] = value

    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                put(f"{index}.{key}", value)
            elif isinstance(value, dict):
                # bitsandbytes keeps its 8-bit moments and quantile maps in one nested dict per parameter.
                nested = values.setdefault(str(index), {}).setdefault(key, {})
                for sub, item in value.items():
                    if isinstance(item, Tensor):
                        put(f"{index}.{key}.{sub}", item)
                    else:
                        nested[sub] = item
            else:
                values.setdefault(str(index), {})[key] = value
    meta = {"param_names": param_names, "param_groups": state_dict["param_groups"], "values": values}
    return tensors, meta


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the checkpoint is damaged") from None


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a complete checkpoint, or None where there is none (an unfinished write)."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dpo-train checkpoint manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {manifest.get('format_version')} is not "
                              f"supported (this dpo-train reads version {FORMAT_VERSION})")
    if not (isinstance(manifest.get("step"), int) and isinstance(manifest.get("sequence"), int)
            and isinstance(manifest.get("files"), dict)):
        raise CheckpointError(f"{path}: the manifest lacks its step, sequence or file list; the checkpoint is damaged")
    return manifest


def scan_checkpoints(out_dir: Path) -> tuple[list[tuple[int, int, Path]], list[tuple[Path, str]]]:
    """Checkpoint folders under ``out_dir``: the complete ones as ``(sequence, step, folder)``, oldest written
    first, and the damaged ones (a manifest that cannot be read) as ``(folder, what is wrong)``.

    A folder without a manifest is in neither list: it is not a checkpoint. Listing never fails because of
    one folder.
    """
    root = out_dir / CHECKPOINTS_DIR
    complete, damaged = [], []
    if root.is_dir():
        for entry in root.iterdir():
            if _STEP_DIR.match(entry.name) and entry.is_dir() and not entry.is_symlink():
                try:
                    manifest = _read_manifest(entry)
                except CheckpointError as exc:
                    damaged.append((entry, str(exc)))
                    continue
                if manifest is not None:
                    complete.append((int(manifest["sequence"]), int(manifest["step"]), entry))
    return sorted(complete), sorted(damaged)


def list_checkpoints(out_dir: Path) -> list[tuple[int, int, Path]]:
    """Complete checkpoints under ``out_dir`` as ``(sequence, step, folder)``, oldest written first."""
    return scan_checkpoints(out_dir)[0]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The most recently written complete checkpoint (by write order, so a run resumed from an older
    checkpoint supersedes the later ones it abandoned)."""
    complete = list_checkpoints(out_dir)
    return complete[-1][2] if complete else None


def save_checkpoint(directory: RunDirectory, loop: LoopState, *, model, optimizer, scheduler, scaler,
                    param_names: list[str], rng_states: list[dict[str, Any]], run: dict[str, Any],
                    keep_last: int, log: Log, batch_state: dict[str, Tensor] | None = None,
                    adapter_state: dict[str, Tensor] | None = None, optimizer_state: dict[str, Any] | None = None
                    ) -> Path:
    """Write a checkpoint of step ``loop.step`` atomically, then rotate to the ``keep_last`` newest.

    Every path is recorded in the directory's marker before it is written. A write that fails (a full
    disk) removes the unfinished folder and raises :class:`dpo.files.WriteFailed`; the checkpoints already
    there are untouched.

    Args:
        directory: the run's output directory.
        loop: the loop's position and counters.
        model: the peft model (its adapter is saved with ``save_pretrained``).
        optimizer: its ``state_dict`` is saved as safetensors + JSON (unless ``optimizer_state`` is given).
        scheduler: learning-rate scheduler (``state_dict`` as JSON).
        scaler: the fp16 loss scaler, or None.
        param_names: names of the optimizer's parameters, in its order.
        rng_states: :func:`capture_rng` of every process, by process index.
        run: :func:`run_record` of this run.
        keep_last: how many complete checkpoints to keep.
        log: progress messages.
        batch_state: the batch source's tensors (written as ``batches.safetensors`` when not empty).
        adapter_state: the trainable parameters as full tensors, by ``named_parameters()`` name (gathered from
            an engine that shards them, :func:`dpo.train.engine.full_adapter`); None reads them from ``model``.
        optimizer_state: the optimizer's state dict with full tensors (likewise); None asks ``optimizer``.

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save as safetensors_bytes

    out_dir = directory.root
    root = directory.mkdir(CHECKPOINTS_DIR)
    for stale in sorted(s for s in directory.scratch if s.startswith(f"{CHECKPOINTS_DIR}/")):
        directory.remove(stale)  # left by a run that was killed while writing
    name = f"step-{loop.step:06d}"
    temp_name, target_name = f"{CHECKPOINTS_DIR}/{TEMP_PREFIX}{name}", f"{CHECKPOINTS_DIR}/{name}"
    trash_name = f"{CHECKPOINTS_DIR}/{_TRASH_PREFIX}{name}"
    temp, target, trash = out_dir / temp_name, out_dir / target_name, out_dir / trash_name
    tensors, meta = _optimizer_files(optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                                     param_names)
    payloads = {"optimizer.safetensors": safetensors_bytes(tensors), "optimizer.json": _json_bytes(meta, "optimizer.json"),
                "scheduler.json": _json_bytes(scheduler.state_dict(), "scheduler.json")}
    if scaler is not None:
        payloads["scaler.json"] = _json_bytes(scaler.state_dict(), "scaler.json")
    payloads["rng.json"] = _json_bytes({"processes": rng_states}, "rng.json")
    payloads["state.json"] = _json_bytes(asdict(loop), "state.json")
    payloads["run.json"] = _json_bytes(run, "run.json")
    if batch_state:
        payloads[BATCH_STATE] = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in batch_state.items()})
    # What the folder takes: these files, and the adapter's weights (as many bytes as its parameters).
    needed = sum(map(len, payloads.values())) + sum(p.numel() * p.element_size() for p in model.parameters()
                                                    if p.requires_grad)
    directory.record(scratch=[temp_name])
    try:
        with writing(temp, "checkpoint", needed):
            temp.mkdir()
            save_adapters(model, temp / "adapter", adapter_state)
            for path in sorted((temp / "adapter").rglob("*")):
                if path.is_file():
                    _sync_file(path)
            for folder in sorted({path.parent for path in (temp / "adapter").rglob("*")}):
                _sync_dir(folder)
            for name, data in payloads.items():
                _write_new_file(temp / name, data)
            _sync_dir(temp)

            files = {p.relative_to(temp).as_posix(): {"size": p.stat().st_size, "sha256": sha256_of_file(p)}
                     for p in sorted(temp.rglob("*")) if p.is_file()}
            complete = list_checkpoints(out_dir)
            if os.path.lexists(target):
                # The same step written before: by a run resumed from an older checkpoint, or an unfinished
                # write. Moved aside first so that a complete checkpoint of this step exists at every moment or
                # none does.
                if not directory.owns(target_name):
                    raise CheckpointError(f"{target} was not written by dpo-train; move it away so that the "
                                          f"checkpoint of step {loop.step} can be saved")
                directory.rename(target_name, trash_name)
                _sync_dir(root)
            directory.forget(target_name)
            directory.record_tree(target_name, [*files, MANIFEST])
            os.replace(temp, target)
            _sync_dir(root)
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": loop.step,
                        "sequence": max((seq for seq, _, _ in complete), default=0) + 1, "files": files}
            manifest_temp = target / f"{TEMP_PREFIX}{MANIFEST}"
            _write_new_file(manifest_temp, _json_bytes(manifest, MANIFEST))
            os.replace(manifest_temp, target / MANIFEST)
            _sync_dir(target)
    except BaseException:
        directory.remove(temp_name)  # the unfinished checkpoint goes
        if os.path.lexists(trash):  # and the one it was to replace comes back
            directory.remove(target_name)
            directory.rename(trash_name, target_name)
        raise
    directory.remove(trash_name)  # the replaced checkpoint's files (anything else in it stays)
    log(f"checkpoint: step {loop.step} saved to {target}")
    rotate_checkpoints(directory, keep_last, log)
    return target


def rotate_checkpoints(directory: RunDirectory, keep_last: int, log: Log) -> None:
    """Delete all but the ``keep_last`` most recently written complete checkpoints.

    Only complete checkpoints are touched, and in them only the files the run recorded; anything else under
    ``checkpoints/`` stays, damaged folders included (they are reported when a run resumes).
    """
    complete = list_checkpoints(directory.root)
    for _, step, folder in complete[: max(0, len(complete) - keep_last)]:
        # The manifest goes first: from then on the folder is not a checkpoint, whatever remains of it.
        with writing(folder / MANIFEST, "checkpoint"):
            (folder / MANIFEST).unlink()
            _sync_dir(folder)
        kept = directory.remove(f"{CHECKPOINTS_DIR}/{folder.name}")
        log(f"checkpoint: removed step {step} ({folder.name}), keeping the last {keep_last}"
            + (f"; kept {_listing(kept)} (not written by dpo-train)" if kept else ""))


# --------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: every file the manifest lists is present with its size and hash.

    Attributes:
        path: the checkpoint folder.
        step: its global step.
        loop: the loop state it was written at.
        run: its :func:`run_record`.
    """

    path: Path
    step: int
    loop: LoopState
    run: dict[str, Any]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Verify a checkpoint folder against its manifest and read its loop state and run record.

    Raises:
        CheckpointError: naming the folder or file that is missing, truncated or altered.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder (checkpoints are OUT/checkpoints/step-NNNNNN)")
    manifest = _read_manifest(path)
    if manifest is None:
        raise CheckpointError(f"{path}: no {MANIFEST}, so not a complete checkpoint (its writing was cut "
                              "short); resume from an earlier one")
    for relative, expected in manifest["files"].items():
        file = path / relative
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the checkpoint; resume from an earlier one")
        if file.stat().st_size != expected["size"]:
            raise CheckpointError(f"{file}: {file.stat().st_size} bytes, the manifest says {expected['size']} "
                                  "(truncated or replaced); resume from an earlier checkpoint")
        if sha256_of_file(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: content does not match the manifest's SHA-256 (corrupted or "
                                  "altered); resume from an earlier checkpoint")
    for required in ("state.json", "run.json", "rng.json", "optimizer.json", "optimizer.safetensors",
                     "scheduler.json", "adapter/adapter_model.safetensors"):
        if required not in manifest["files"]:
            raise CheckpointError(f"{path / required}: not listed in the manifest; the checkpoint is incomplete")
    loop = LoopState.from_dict(_read_json(path / "state.json"), str(path / "state.json"))
    return Checkpoint(path=path, step=int(manifest["step"]), loop=loop, run=_read_json(path / "run.json"))


def find_checkpoint(out_dir: Path, resume: str | Path | bool, log: Log = print) -> Checkpoint | None:
    """The checkpoint ``--resume`` names: ``True``/``"latest"`` for the output directory's newest valid one.

    Damaged checkpoints (a manifest that cannot be read, a file that does not match it) are skipped, each
    named in a warning. With no checkpoint folder at all the run starts from step 0: None.

    Raises:
        CheckpointError: a named checkpoint is missing or damaged, or every checkpoint there is.
    """
    if not (resume is True or resume == "latest"):
        return load_checkpoint(Path(resume))
    complete, damaged = scan_checkpoints(out_dir)
    skipped = [problem for _, problem in damaged]  # each names its file
    for _, _, folder in reversed(complete):
        try:
            checkpoint = load_checkpoint(folder)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        for problem in skipped:
            log(f"warning: --resume: skipped a damaged checkpoint: {problem}")
        return checkpoint
    if skipped:
        listing = "\n  ".join(skipped)
        raise CheckpointError(f"--resume: no usable checkpoint in {out_dir / CHECKPOINTS_DIR}:\n  {listing}\n"
                              "Resume from another one with --resume PATH, or start over with --overwrite")
    return None


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def trained_adapters(model) -> list[str]:
    """The names of ``model``'s peft adapters that have trainable parameters (the policy's ``default`` always)."""
    names = ["default"]
    for name in getattr(model, "peft_config", {}):
        if name != "default" and any(p.requires_grad and f".{name}." in n for n, p in model.named_parameters()):
            names.append(name)
    return names


def save_adapters(model, folder: Path, state_dict: dict[str, Tensor] | None = None) -> None:
    """Save the trained adapters of a peft model (``default`` in ``folder``, others in ``folder/NAME``); frozen
    ones (an online task's reward or reference adapter) are read from where they came from instead.

    ``state_dict``: the trainable parameters as full tensors by ``named_parameters()`` name (gathered from an
    engine that shards them); None reads them from ``model``.
    """
    model.save_pretrained(folder, safe_serialization=True, selected_adapters=trained_adapters(model),
                          **({"state_dict": state_dict} if state_dict is not None else {}))


def adapter_names(model, adapter_name: str = "default") -> dict[str, str]:
    """The keys of adapter ``adapter_name``'s file (peft's names, without the adapter's name) ->
    ``named_parameters()`` names."""
    from peft import get_peft_model_state_dict

    params = dict(model.named_parameters())
    by_id = {id(param): name for name, param in params.items()}
    saved = get_peft_model_state_dict(model, state_dict=params, adapter_name=adapter_name)
    return {key: by_id[id(param)] for key, param in saved.items()}


def _read_adapters(model, directory: Path) -> dict[str, Tensor]:
    """Every trained adapter of ``model`` from a checkpoint's ``adapter/`` folder, by parameter name."""
    tensors: dict[str, Tensor] = {}
    for name in trained_adapters(model):
        folder = directory if name == "default" else directory / name
        tensors.update(_read_adapter(model, folder / "adapter_model.safetensors", name))
    return tensors


def _read_adapter(model, path: Path, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter file's tensors by parameter name, checked against ``model``'s adapter ``adapter_name``."""
    saved = _read_safetensors(path)
    names = adapter_names(model, adapter_name)
    params = dict(model.named_parameters())
    if set(saved) != set(names):
        missing, extra = sorted(set(names) - set(saved)), sorted(set(saved) - set(names))
        raise CheckpointError(f"{path}: the adapter does not match this model's (missing: {missing[:3]}, "
                              f"unexpected: {extra[:3]}); the lora section or the model differs")
    for key, tensor in saved.items():
        shape = tuple(getattr(params[names[key]], "ds_shape", params[names[key]].shape))  # ZeRO-3: partitioned
        if tuple(tensor.shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, this model's {shape}; the lora "
                                  "section or the model differs")
    return {names[key]: tensor for key, tensor in saved.items()}


def _read_optimizer(directory: Path, param_names: list[str]) -> dict[str, Any]:
    """The optimizer's state dict (``torch.optim.Optimizer.state_dict()`` layout) from its two files."""
    meta = _read_json(directory / "optimizer.json")
    if meta.get("param_names") != param_names:
        raise CheckpointError(f"{directory / 'optimizer.json'}: the optimizer state is for other parameters "
                              f"({len(meta.get('param_names', []))} saved, {len(param_names)} trained now)")
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in meta["values"].items()}
    for key, tensor in _read_safetensors(directory / "optimizer.safetensors").items():
        index, name, *sub = key.split(".", 2)
        entry = state.setdefault(int(index), {})
        if sub:  # a tensor of a nested dict (see _optimizer_files)
            entry.setdefault(name, {})[sub[0]] = tensor
        else:
            entry[name] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


def read_checkpoint_state(checkpoint: Checkpoint, model, param_names: list[str]) -> dict[str, Any]:
    """Everything a verified checkpoint restores, read and checked against ``model``: ``adapter`` (full tensors
    by parameter name), ``optimizer`` (state dict), ``scheduler``, ``scaler`` (or None), ``rng`` (one state per
    process that wrote it), ``loop`` (:class:`LoopState` as a dict) and ``batches`` (the batch source's tensors,
    see :class:`dpo.train.setup.BatchSource`; empty for the offline tasks).

    Plain dicts, lists and tensors, so that the main process can send them to the others
    (:func:`dpo.train.engine.broadcast`); nothing is loaded into the model here.
    """
    directory = checkpoint.path
    scaler_path = directory / "scaler.json"
    return {
        "adapter": _read_adapters(model, directory / "adapter"),
        "optimizer": _read_optimizer(directory, param_names),
        "scheduler": _read_json(directory / "scheduler.json"),
        "scaler": _read_json(scaler_path) if scaler_path.is_file() else None,
        "rng": _read_json(directory / "rng.json").get("processes", []),
        "loop": asdict(LoopState.from_dict(asdict(checkpoint.loop), str(directory / "state.json"))),
        "batches": _read_safetensors(directory / BATCH_STATE) if (directory / BATCH_STATE).is_file() else {},
    }


def resume_state(state: dict[str, Any], checkpoint: Checkpoint, *, scheduler, scaler, process_index: int,
                 force: bool = False, log: Log = print) -> LoopState:
    """Restore the schedule, the loss scaler and this process's generators (last, so that the next draw
    matches) from :func:`read_checkpoint_state`; returns the loop state to continue from.

    A process the checkpoint holds no generator state for (it was written by fewer processes) keeps its
    own under ``force``; otherwise that is an error.
    """
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    processes = state["rng"]
    if process_index < len(processes):
        restore_rng(processes[process_index])
    elif force:
        log(f"warning: --force: {checkpoint.path / 'rng.json'} holds no generator state for process {process_index} "
            f"({len(processes)} saved); it keeps its own")
    else:
        raise CheckpointError(f"{checkpoint.path / 'rng.json'}: no generator state for process {process_index} "
                              f"({len(processes)} saved)")
    return LoopState.from_dict(state["loop"], str(checkpoint.path / "state.json"))


def restore_checkpoint(checkpoint: Checkpoint, *, model, optimizer, scheduler, scaler,
                       param_names: list[str], process_index: int, batches=None) -> LoopState:
    """Load a verified checkpoint into one process's objects (nothing sharded); the RNG states last, so the
    next draw matches.

    Args:
        batches: the run's batch source, given the checkpoint's ``batches.safetensors`` (see
            :class:`dpo.train.setup.BatchSource`); None to skip.

    Returns:
        The loop state to continue from.
    """
    state = read_checkpoint_state(checkpoint, model, param_names)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state["adapter"].items():
            params[name].copy_(tensor)
    if batches is not None:
        batches.load_state(state["batches"])
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint.path / 'optimizer.safetensors'}: does not fit the optimizer "
                              f"train.optimizer builds ({exc})") from None
    return resume_state(state, checkpoint, scheduler=scheduler, scaler=scaler, process_index=process_index)


# ----------------------------------------------------------------------------- resume agreement


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_ABSENT = "(absent)"


def recipe_differences(saved_run: dict[str, Any], recipe_tree: dict[str, Any]) -> list[str]:
    """Recipe values that differ from the checkpoint's and change the result, one line each."""
    saved, now = _flatten(saved_run["recipe"]), _flatten(recipe_tree)
    fingerprints = saved_run.get("fingerprints", {})
    lines = []
    for key in sorted(saved.keys() | now.keys()):
        if key in IGNORED_ON_RESUME or CONTENT_CHECKED.get(key) in fingerprints:
            continue
        before, after = saved.get(key, _ABSENT), now.get(key, _ABSENT)
        if before in (None, _ABSENT) and after in (None, _ABSENT):
            continue  # a key added since the checkpoint was written, at its default "none"
        if before != after:
            lines.append(f"{key}: {before!r} in the checkpoint, {after!r} now")
    return lines


def run_differences(saved_run: dict[str, Any], current_run: dict[str, Any]) -> list[str]:
    """Data and reference fingerprints and the process count that differ from the checkpoint's."""
    saved, now = saved_run.get("fingerprints", {}), current_run["fingerprints"]
    lines = []
    for key in sorted(saved.keys() | now.keys()):
        if saved.get(key) != now.get(key):
            what = "reference log-probs (model weights or data)" if key.startswith("reference") else "tokenized data"
            lines.append(f"{key}: {what} differ, fingerprint {str(saved.get(key))[:12]} in the checkpoint, "
                         f"{str(now.get(key))[:12]} now")
    if saved_run.get("num_processes") != current_run["num_processes"]:
        lines.append(f"number of processes: {saved_run.get('num_processes')} in the checkpoint, "
                     f"{current_run['num_processes']} now")
    # Checkpoints written before engines were recorded name none; their engine is not compared.
    if "engine" in saved_run and saved_run["engine"] != current_run.get("engine"):
        lines.append(f"engine: {saved_run['engine']} in the checkpoint, {current_run.get('engine')} now (the "
                     "same updates, rounded differently)")
    return lines


def check_resume(differences: list[str], checkpoint: Checkpoint, force: bool, log: Log) -> None:
    """Refuse to resume when something that changes the result differs, or warn under ``force``."""
    if not differences:
        return
    listing = "\n".join(f"  {line}" for line in differences)
    if force:
        log(f"warning: --force: resuming from {checkpoint.path} although these differ from the run that wrote "
            f"it; the result will not match an uninterrupted run:\n{listing}")
        return
    raise CheckpointError(f"cannot resume from {checkpoint.path}: these differ from the run that wrote it, "
                          f"and each changes the result:\n{listing}\nRestore them, or pass --force to resume anyway.")


def version_notes(saved_run: dict[str, Any], current_run: dict[str, Any]) -> list[str]:
    """Library versions that differ (a resume may then not be bit-exact; worth a warning, not a refusal)."""
    saved, now = saved_run.get("versions", {}), current_run["versions"]
    return [f"{name} {saved.get(name)} in the checkpoint, {now.get(name)} now"
            for name in sorted(saved.keys() | now.keys()) if saved.get(name) != now.get(name)]


# --------------------------------------------------------------------------------------- signals


class StopSignals:
    """Within ``with StopSignals() as signals:``, the first SIGINT or SIGTERM only sets
    ``signals.received`` (the loop finishes its step, checkpoints and stops); a second one exits at once.

    Exiting at once cannot corrupt a checkpoint: one is complete only once its manifest is in place.
    Outside the main thread signals cannot be caught, and the handlers are left alone.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            _say(f"\n{name} again: exiting now; the last complete checkpoint is intact\n")
            os._exit(128 + signum)
        self.received = signum
        _say(f"\n{name}: finishing the current step, then writing a checkpoint (send it again to exit at once)\n")


def _say(text: str) -> None:
    """Write to stderr from a signal handler: os.write, not print (the handler may run in the middle of
    another write to the stream), and nothing if stderr has no reader any more (``| tee`` stopped by the
    same Ctrl-C): the checkpoint matters, the message does not."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass
