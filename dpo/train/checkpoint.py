"""Checkpoints and the output directory: everything a run needs to stop and resume bit-exactly.

A run's output directory::

    OUT/.dpo-train                 marker: dpo-train created this directory
    OUT/recipe.yaml, metrics.jsonl, final_metrics.json, adapter/
    OUT/checkpoints/step-000040/
        adapter/                   the peft adapter (adapter_model.safetensors, adapter_config.json)
        optimizer.safetensors      optimizer state tensors, keyed "<parameter index>.<name>"
        optimizer.json             parameter names, hyper-parameters, non-tensor state (step counts)
        scheduler.json             learning-rate schedule position
        scaler.json                loss-scaler state (only when a loss scaler runs)
        rng.json                   python, numpy, torch and CUDA generator states, one entry per process
        state.json                 loop position (epoch, micro-batch), global step, counters, metric window
        run.json                   resolved recipe, data and reference fingerprints, process count, versions
        manifest.json              written last: size and SHA-256 of every file above

A checkpoint is written into a temporary folder beside its target, every file fsynced, the folder renamed
into place, and only then the manifest written (atomically). A folder without a valid manifest is not a
checkpoint. Only safetensors and JSON are ever read back: nothing in a checkpoint is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dpo.train.metric_log import TENSORBOARD_DIR

Log = Callable[[str], None]

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
MARKER = ".dpo-train"
FORMAT = "dpo-train-checkpoint"
FORMAT_VERSION = 1
# What a run writes into its output directory; --overwrite removes exactly these (and the marker).
RUN_OUTPUTS = ("recipe.yaml", "metrics.jsonl", "final_metrics.json", "adapter", CHECKPOINTS_DIR, TENSORBOARD_DIR)
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".old-"

# Recipe keys that cannot change the trained result (logging, saving, where things go), so a resume
# ignores them.
IGNORED_ON_RESUME = frozenset({
    "output.dir", "train.log_every", "train.eval_every", "train.save_every",
    "train.keep_last", "train.max_bad_steps", "data.num_proc", "data.cache_dir", "reference.batch_size",
    "reference.cache_dir", "reference.verify",
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


class CheckpointError(ValueError):
    """A checkpoint or output directory that cannot be used; the message names the file and what to do."""


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


def _sync_file(path: Path) -> None:
    """Flush ``path``'s data to disk (every file of a checkpoint passes through here once)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX; Windows cannot open folders)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_bytes(value: Any, name: str) -> bytes:
    try:
        # NaN and infinity are written as the bare words NaN and Infinity, which Python reads back.
        return json.dumps(value, indent=1).encode("utf-8")
    except TypeError as exc:
        raise TypeError(f"{name}: cannot store this value as JSON ({exc})") from None


def _write_new_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
    _sync_file(path)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves either the old or the new content."""
    temp = path.with_name(f"{_TEMP_PREFIX}{path.name}.{os.getpid()}")
    temp.unlink(missing_ok=True)
    _write_new_file(temp, text.encode("utf-8"))
    os.replace(temp, path)
    _sync_dir(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def run_record(recipe_tree: dict[str, Any], fingerprints: dict[str, str], num_processes: int) -> dict[str, Any]:
    """What a checkpoint remembers about the run that wrote it (``run.json``)."""
    return {"recipe": recipe_tree, "fingerprints": dict(fingerprints), "num_processes": num_processes,
            "versions": library_versions()}


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


def remove_inside(root: Path, path: Path) -> None:
    """Delete ``path``, an entry directly inside ``root``. A symlink is removed, never followed."""
    if path.name in ("", ".", "..") or path.parent.resolve() != root.resolve():
        raise CheckpointError(f"refusing to delete {path}: it is not an entry of {root}")
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)  # removes links found inside without following them


def prepare_output_dir(out_dir: Path, *, resume: bool, overwrite: bool, log: Log) -> None:
    """Apply the output-directory rules and make sure ``out_dir`` exists with the dpo-train marker.

    A new or empty directory is used as is. A non-empty one is refused unless the run resumes, or
    ``overwrite`` is set (then the previous run's outputs, and only those, are deleted).
    """
    if resume and overwrite:
        raise CheckpointError("--resume continues the run in output.dir and --overwrite deletes it; pass one")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output.dir {out_dir} is a file; set output.dir to a folder")
    entries = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    ours = MARKER in entries
    entries = [name for name in entries if name != MARKER]
    if entries and not resume:
        if not overwrite and ours:
            raise CheckpointError(
                f"output.dir {out_dir} holds a previous dpo-train run: continue it with --resume, start over "
                "with --overwrite (deletes its outputs), or set output.dir to a new folder")
        if not overwrite:
            raise CheckpointError(
                f"output.dir {out_dir} is not empty and was not created by dpo-train ({', '.join(entries[:5])}"
                f"{', ...' if len(entries) > 5 else ''}); set output.dir to a new or empty folder, or pass "
                "--overwrite to write into it (only dpo-train's own outputs there are deleted)")
        for name in RUN_OUTPUTS:
            if os.path.lexists(out_dir / name):
                remove_inside(out_dir, out_dir / name)
                log(f"--overwrite: removed {out_dir / name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not (out_dir / MARKER).is_file():
        marker = {"created_by": "dpo-train", "version": library_versions()["dpo-train"]}
        write_text_atomic(out_dir / MARKER, json.dumps(marker) + "\n")


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


def _optimizer_files(optimizer, param_names: list[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer's state dict into tensors (safetensors) and everything else (JSON)."""
    state_dict = optimizer.state_dict()
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


def list_checkpoints(out_dir: Path) -> list[tuple[int, int, Path]]:
    """Complete checkpoints under ``out_dir`` as ``(sequence, step, folder)``, oldest written first."""
    root = out_dir / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            if _STEP_DIR.match(entry.name) and entry.is_dir() and not entry.is_symlink():
                manifest = _read_manifest(entry)
                if manifest is not None:
                    found.append((int(manifest["sequence"]), int(manifest["step"]), entry))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The most recently written complete checkpoint (by write order, so a run resumed from an older
    checkpoint supersedes the later ones it abandoned)."""
    complete = list_checkpoints(out_dir)
    return complete[-1][2] if complete else None


def save_checkpoint(out_dir: Path, loop: LoopState, *, model, optimizer, scheduler, scaler,
                    param_names: list[str], rng_states: list[dict[str, Any]], run: dict[str, Any],
                    keep_last: int, log: Log) -> Path:
    """Write a checkpoint of step ``loop.step`` atomically, then rotate to the ``keep_last`` newest.

    Args:
        out_dir: the run's output directory.
        loop: the loop's position and counters.
        model: the peft model (its adapter is saved with ``save_pretrained``).
        optimizer: its ``state_dict`` is saved as safetensors + JSON.
        scheduler: learning-rate scheduler (``state_dict`` as JSON).
        scaler: the fp16 loss scaler, or None.
        param_names: names of the optimizer's parameters, in its order.
        rng_states: :func:`capture_rng` of every process, by process index.
        run: :func:`run_record` of this run.
        keep_last: how many complete checkpoints to keep.
        log: progress messages.

    Returns:
        The checkpoint folder.
    """
    root = out_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        root.mkdir(parents=True)
        _sync_dir(out_dir)
    for stale in root.iterdir():
        if stale.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
            remove_inside(root, stale)  # left by a run that was killed while writing
    name = f"step-{loop.step:06d}"
    temp = root / f"{_TEMP_PREFIX}{name}"
    temp.mkdir()

    model.save_pretrained(temp / "adapter", safe_serialization=True)
    for path in sorted((temp / "adapter").iterdir()):
        _sync_file(path)
    _sync_dir(temp / "adapter")
    from safetensors.torch import save_file

    tensors, meta = _optimizer_files(optimizer, param_names)
    save_file(tensors, temp / "optimizer.safetensors")
    _sync_file(temp / "optimizer.safetensors")
    _write_new_file(temp / "optimizer.json", _json_bytes(meta, "optimizer.json"))
    _write_new_file(temp / "scheduler.json", _json_bytes(scheduler.state_dict(), "scheduler.json"))
    if scaler is not None:
        _write_new_file(temp / "scaler.json", _json_bytes(scaler.state_dict(), "scaler.json"))
    _write_new_file(temp / "rng.json", _json_bytes({"processes": rng_states}, "rng.json"))
    _write_new_file(temp / "state.json", _json_bytes(asdict(loop), "state.json"))
    _write_new_file(temp / "run.json", _json_bytes(run, "run.json"))
    _sync_dir(temp)

    files = {p.relative_to(temp).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(temp.rglob("*")) if p.is_file()}
    complete = list_checkpoints(out_dir)
    target = root / name
    if os.path.lexists(target):
        # The same step written before: by a run resumed from an older checkpoint, or an unfinished write.
        # Moved aside first so that a complete checkpoint of this step exists at every moment or none does.
        trash = root / f"{_TRASH_PREFIX}{name}"
        os.replace(target, trash)
        _sync_dir(root)
    os.replace(temp, target)
    _sync_dir(root)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": loop.step,
                "sequence": max((seq for seq, _, _ in complete), default=0) + 1, "files": files}
    manifest_temp = target / f"{_TEMP_PREFIX}{MANIFEST}"
    _write_new_file(manifest_temp, _json_bytes(manifest, MANIFEST))
    os.replace(manifest_temp, target / MANIFEST)
    _sync_dir(target)
    if os.path.lexists(root / f"{_TRASH_PREFIX}{name}"):
        remove_inside(root, root / f"{_TRASH_PREFIX}{name}")
    log(f"checkpoint: step {loop.step} saved to {target}")
    rotate_checkpoints(out_dir, keep_last, log)
    return target


def rotate_checkpoints(out_dir: Path, keep_last: int, log: Log) -> None:
    """Delete all but the ``keep_last`` most recently written complete checkpoints.

    Only folders with a dpo-train manifest are touched; anything else under ``checkpoints/`` stays.
    """
    root = out_dir / CHECKPOINTS_DIR
    complete = list_checkpoints(out_dir)
    for _, step, folder in complete[: max(0, len(complete) - keep_last)]:
        # The manifest goes first: from then on the folder is not a checkpoint, whatever remains of it.
        (folder / MANIFEST).unlink()
        _sync_dir(folder)
        remove_inside(root, folder)
        log(f"checkpoint: removed step {step} ({folder.name}), keeping the last {keep_last}")


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
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: content does not match the manifest's SHA-256 (corrupted or "
                                  "altered); resume from an earlier checkpoint")
    for required in ("state.json", "run.json", "rng.json", "optimizer.json", "optimizer.safetensors",
                     "scheduler.json", "adapter/adapter_model.safetensors"):
        if required not in manifest["files"]:
            raise CheckpointError(f"{path / required}: not listed in the manifest; the checkpoint is incomplete")
    loop = LoopState.from_dict(_read_json(path / "state.json"), str(path / "state.json"))
    return Checkpoint(path=path, step=int(manifest["step"]), loop=loop, run=_read_json(path / "run.json"))


def find_checkpoint(out_dir: Path, resume: str | Path | bool) -> Checkpoint:
    """The checkpoint ``--resume`` names: ``True``/``"latest"`` for the output directory's latest one."""
    if resume is True or resume == "latest":
        latest = latest_checkpoint(out_dir)
        if latest is None:
            raise CheckpointError(f"--resume: no complete checkpoint in {out_dir / CHECKPOINTS_DIR}; run "
                                  "without --resume to start training, or pass --resume PATH")
        return load_checkpoint(latest)
    return load_checkpoint(Path(resume))


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _restore_adapter(model, path: Path) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    saved = _read_safetensors(path)
    expected = get_peft_model_state_dict(model)
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise CheckpointError(f"{path}: the adapter does not match this model's (missing: {missing[:3]}, "
                              f"unexpected: {extra[:3]}); the lora section or the model differs")
    for key, tensor in saved.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(tensor.shape)}, this model's "
                                  f"{tuple(expected[key].shape)}; the lora section or the model differs")
    set_peft_model_state_dict(model, saved)


def _restore_optimizer(optimizer, directory: Path, param_names: list[str]) -> None:
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
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{directory / 'optimizer.safetensors'}: does not fit the optimizer "
                              f"train.optimizer builds ({exc})") from None


def restore_checkpoint(checkpoint: Checkpoint, *, model, optimizer, scheduler, scaler,
                       param_names: list[str], process_index: int) -> LoopState:
    """Load a verified checkpoint into the run's objects; the RNG states last, so the next draw matches.

    Returns:
        The loop state to continue from.
    """
    directory = checkpoint.path
    _restore_adapter(model, directory / "adapter" / "adapter_model.safetensors")
    _restore_optimizer(optimizer, directory, param_names)
    scheduler.load_state_dict(_read_json(directory / "scheduler.json"))
    if scaler is not None:
        scaler.load_state_dict(_read_json(directory / "scaler.json"))
    processes = _read_json(directory / "rng.json").get("processes", [])
    if process_index >= len(processes):
        raise CheckpointError(f"{directory / 'rng.json'}: no generator state for process {process_index} "
                              f"({len(processes)} saved)")
    restore_rng(processes[process_index])
    return LoopState.from_dict(asdict(checkpoint.loop), str(directory / "state.json"))


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
            os.write(2, f"\n{name} again: exiting now; the last complete checkpoint is intact\n".encode())
            os._exit(128 + signum)
        self.received = signum
        # os.write, not print: a signal handler may run in the middle of another write to the stream.
        os.write(2, f"\n{name}: finishing the current step, then writing a checkpoint "
                    f"(send it again to exit at once)\n".encode())
