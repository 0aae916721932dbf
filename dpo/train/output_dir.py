"""A run's output directory: the marker that records every path dpo-train wrote there, and the run lock.

::

    OUT/.dpo-train        the marker: JSON naming dpo-train, its version, and what dpo-train wrote here:
                            files    every file, as a path relative to OUT
                            dirs     every folder it created
                            scratch  folders that hold nothing but dpo-train's: its temporary folders
                                     (.tmp-*) and the wandb/ and mlflow/ folders of its trackers
    OUT/.dpo-train.lock   the run lock: flock-ed by the running process, which writes its pid into it

A path is recorded before it is first written, so a run killed at any moment has recorded everything it
left behind, and the marker is replaced atomically on every change. Deleting (``--overwrite``, checkpoint
rotation, cleaning up after a killed run) goes only through :meth:`RunDirectory.remove`, which removes a
recorded file only while it is still a regular file reached without passing through a symlink, a recorded
folder only once it is empty, and a scratch folder whole. Nothing that was not recorded is ever deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from dpo.files import TEMP_PREFIX, FileLock, LockHeld, describe_holder, write_text_atomic, writing
from dpo.train.metric_log import TENSORBOARD_DIR

MARKER = ".dpo-train"
LOCK_FILE = ".dpo-train.lock"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_FILE = "samples.jsonl"  # greedy held-out answers (dpo.train.samples)
# The names a run writes directly inside its output directory (those of an earlier dpo-train, whose
# marker recorded no paths, are only the first three: see RunDirectory.adopt_unrecorded).
LEGACY_RUN_FILES = ("recipe.yaml", "metrics.jsonl", "final_metrics.json")
RUN_FILES = (*LEGACY_RUN_FILES, "README.md", "train.log", "curves.png", SAMPLES_FILE)
ADAPTER_DIR = "adapter"
# wandb/ and mlflow/ are recorded whole, as folders only their tracker writes in (dpo.train.trackers).
RUN_DIRS = (ADAPTER_DIR, CHECKPOINTS_DIR, TENSORBOARD_DIR, "wandb", "mlflow")
RUN_OUTPUTS = RUN_FILES + RUN_DIRS


class CheckpointError(ValueError):
    """A checkpoint or output directory that cannot be used; the message names the file and what to do."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dpo-train")
    except PackageNotFoundError:
        return "not installed"


def _valid_relative(text: Any, marker: Path) -> str:
    """A recorded path: relative, no ``..`` or ``.`` parts (a marker edited to point elsewhere is refused)."""
    path = PurePosixPath(text) if isinstance(text, str) else None
    if path is None or path.is_absolute() or not path.parts or any(p in ("", ".", "..") for p in path.parts):
        raise CheckpointError(f"{marker}: records {text!r}, which is not a path inside the output directory; the "
                              "marker is damaged (delete it only if this folder holds no dpo-train run)")
    return path.as_posix()


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


@dataclass
class RunDirectory:
    """An output directory with its marker: what dpo-train wrote there, and (while a run holds it) its lock.

    Attributes:
        root: the output directory.
        files: files written here, relative to ``root``.
        dirs: folders created here.
        scratch: folders created here whose whole content is dpo-train's (temporary folders, trackers' folders).
        lock: the run lock while a run holds the directory.
        created: the run holding it created the folder (it did not exist before).
    """

    root: Path
    files: set[str] = field(default_factory=set)
    dirs: set[str] = field(default_factory=set)
    scratch: set[str] = field(default_factory=set)
    lock: FileLock | None = None
    created: bool = False

    # ----------------------------------------------------------------------------------- the marker

    @classmethod
    def read(cls, root: Path) -> RunDirectory | None:
        """The marker of ``root``, or None where dpo-train did not create the folder."""
        marker = root / MARKER
        if not os.path.lexists(marker):
            return None
        try:
            if marker.is_symlink() or not marker.is_file():
                raise ValueError("not a regular file")
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{marker}: not a readable dpo-train marker ({exc}); delete it only if this folder "
                                  "holds no dpo-train run") from None
        if not isinstance(data, dict) or data.get("created_by") != "dpo-train":
            raise CheckpointError(f"{marker}: not a dpo-train marker; delete it only if this folder holds no "
                                  "dpo-train run")
        if "written" not in data:
            return cls.adopt_unrecorded(root)
        written = data.get("written") if isinstance(data.get("written"), dict) else {}
        lists = {key: written.get(key, []) for key in ("files", "dirs", "scratch")}
        if not all(isinstance(value, list) for value in lists.values()):
            raise CheckpointError(f"{marker}: its record of written paths is damaged")
        return cls(root, *({_valid_relative(p, marker) for p in lists[key]} for key in ("files", "dirs", "scratch")))

    @classmethod
    def adopt_unrecorded(cls, root: Path) -> RunDirectory:
        """The record of a folder whose marker an earlier dpo-train wrote before markers recorded paths.

        Such a run can still be resumed (or overwritten), so what it provably wrote is adopted: the run files
        (``recipe.yaml``, ``metrics.jsonl``, ``final_metrics.json``, ``samples.jsonl``), each checkpoint folder with a readable
        dpo-train manifest and exactly the files that manifest lists, the files a saved adapter and tokenizer
        consist of, and TensorBoard event files. Anything else there (a file of the user's inside
        ``adapter/``, a checkpoint folder without a manifest) is not adopted, so it is never deleted. The
        record is written in the current format at the next change.
        """
        directory = cls(root)
        regular = [name for name in LEGACY_RUN_FILES if directory._is_regular(name)]
        directory.files.update(regular)
        for folder, keep in ((ADAPTER_DIR, _is_adapter_file), (TENSORBOARD_DIR, _is_event_file)):
            names = [entry.name for entry in _scan(root / folder) if keep(entry.name)]
            names = [name for name in names if directory._is_regular(f"{folder}/{name}")]
            if names:
                directory.dirs.add(folder)
                directory.files.update(f"{folder}/{name}" for name in names)
        for entry in _scan(root / CHECKPOINTS_DIR):
            listed = _manifest_files(root / CHECKPOINTS_DIR / entry.name)
            if listed is None:
                continue
            relative = f"{CHECKPOINTS_DIR}/{entry.name}"
            names = [name for name in [*listed, CHECKPOINT_MANIFEST] if directory._is_regular(f"{relative}/{name}")]
            directory.dirs.add(CHECKPOINTS_DIR)
            directory.dirs.update({relative} | {f"{relative}/{parent.as_posix()}" for name in names
                                                for parent in PurePosixPath(name).parents if parent.as_posix() != "."})
            directory.files.update(f"{relative}/{name}" for name in names)
        return directory

    def _is_regular(self, relative: str) -> bool:
        status = self._lstat(relative)
        return status is not None and stat.S_ISREG(status.st_mode)

    @classmethod
    def create(cls, root: Path) -> RunDirectory:
        """The marker of ``root``, written (empty) if there is none; ``root`` is created if needed."""
        existing = cls.read(root) if root.is_dir() else None
        if existing is not None:
            return existing
        with writing(root, "output directory"):
            root.mkdir(parents=True, exist_ok=True)
        directory = cls(root)
        directory.save()
        return directory

    def save(self) -> None:
        """Replace the marker atomically with the current record."""
        data = {"created_by": "dpo-train", "version": _version(),
                "written": {"files": sorted(self.files), "dirs": sorted(self.dirs), "scratch": sorted(self.scratch)}}
        with writing(self.root / MARKER, "run marker"):
            write_text_atomic(self.root / MARKER, json.dumps(data, indent=1) + "\n")

    def record(self, *, files: Iterable[str] = (), dirs: Iterable[str] = (), scratch: Iterable[str] = ()) -> None:
        """Add paths (relative to the root) to the record before they are written."""
        before = (len(self.files), len(self.dirs), len(self.scratch))
        self.files.update(files)
        self.dirs.update(dirs)
        self.scratch.update(scratch)
        if (len(self.files), len(self.dirs), len(self.scratch)) != before:
            self.save()

    def record_tree(self, relative: str, names: Iterable[str]) -> None:
        """Record the folder ``relative`` with the files ``names`` (relative to it) and their sub-folders."""
        names = list(names)
        folders = {relative} | {f"{relative}/{parent.as_posix()}" for name in names
                                for parent in PurePosixPath(name).parents if parent.as_posix() != "."}
        self.record(dirs=folders, files=[f"{relative}/{name}" for name in names])

    def forget(self, prefix: str) -> None:
        """Drop every recorded path at or under ``prefix`` (they no longer exist)."""
        kept = [{p for p in paths if not _under(p, prefix)} for paths in (self.files, self.dirs, self.scratch)]
        if kept != [self.files, self.dirs, self.scratch]:
            self.files, self.dirs, self.scratch = kept
            self.save()

    def owns(self, relative: str) -> bool:
        """Whether ``relative`` was recorded, and is still the kind of entry that was recorded there."""
        status = self._lstat(relative)
        if status is None:
            return False
        if relative in self.files:
            return stat.S_ISREG(status.st_mode)
        if relative in self.dirs or relative in self.scratch:
            return stat.S_ISDIR(status.st_mode)
        return False

    def wrote_anything(self) -> bool:
        """Whether any recorded file still exists (a previous run's outputs are here)."""
        return any(self._lstat(p) is not None for p in self.files | self.scratch)

    # ------------------------------------------------------------------------------------- writing

    def mkdir(self, relative: str) -> Path:
        """Create the folder ``relative`` (and its parents), recording each one created."""
        path = self.root
        for part in PurePosixPath(relative).parts:
            path = path / part
            name = path.relative_to(self.root).as_posix()
            if not path.is_dir() or path.is_symlink():
                self.record(dirs=[name])
                with writing(path, "output directory"):
                    path.mkdir()
        return self.root / relative

    def rename(self, old: str, new: str) -> None:
        """Move the recorded entry ``old`` (and what is recorded under it) to ``new``, records included."""
        def moved(paths: set[str]) -> list[str]:
            return [new + path[len(old):] for path in paths if _under(path, old)]

        self.record(files=moved(self.files), dirs=moved(self.dirs), scratch=moved(self.scratch))
        with writing(self.root / new, "output directory"):
            os.replace(self.root / old, self.root / new)
        self.forget(old)

    def write_text(self, relative: str, text: str, what: str) -> Path:
        """Record ``relative``, then replace it atomically with ``text``."""
        self.record(files=[relative])
        path = self.root / relative
        with writing(path, what, len(text.encode("utf-8"))):
            write_text_atomic(path, text)
        return path

    def write_folder(self, relative: str, fill: Callable[[Path], None], what: str, needed: int | None = None) -> Path:
        """Write a folder whose file names a library chooses (``save_pretrained``): ``fill`` writes into a
        scratch folder, then every file it made is recorded and moved into ``relative``.

        Raises:
            CheckpointError: a file of that name is already in ``relative`` and dpo-train did not write it.
        """
        scratch = f"{TEMP_PREFIX}{PurePosixPath(relative).name}"
        self.remove(scratch)
        self.record(scratch=[scratch])
        try:
            with writing(self.root / scratch, what, needed):
                (self.root / scratch).mkdir()
                fill(self.root / scratch)
                made = sorted(p.relative_to(self.root / scratch).as_posix()
                              for p in (self.root / scratch).rglob("*") if p.is_file())
                targets = [f"{relative}/{name}" for name in made]
                foreign = [t for t in targets if self._lstat(t) is not None and not self.owns(t)]
                if foreign:
                    raise CheckpointError(f"{self.root / foreign[0]} was not written by dpo-train; move it away "
                                          f"so that the {what} can be saved there")
                for folder in sorted({PurePosixPath(t).parent.as_posix() for t in targets}):
                    self.mkdir(folder)
                self.record(files=targets)
                for name, target in zip(made, targets):
                    os.replace(self.root / scratch / name, self.root / target)
        finally:
            self.remove(scratch)
        return self.root / relative

    # ------------------------------------------------------------------------------------- deleting

    def _lstat(self, relative: str) -> os.stat_result | None:
        """``lstat`` of ``root/relative`` if it exists and every folder on the way is a real folder (not a
        symlink); None otherwise, so nothing is ever reached through a link."""
        path = self.root
        parts = PurePosixPath(relative).parts
        for index, part in enumerate(parts):
            path = path / part
            try:
                status = os.lstat(path)
            except FileNotFoundError:
                return None
            if index < len(parts) - 1 and not stat.S_ISDIR(status.st_mode):
                return None
        return status

    def remove(self, prefix: str) -> list[str]:
        """Delete what is recorded at or under ``prefix`` and forget it.

        A recorded file goes only while it is a regular file (with its ``.tmp-NAME`` sibling, left by an
        interrupted atomic write); a scratch folder goes whole; a recorded folder goes only once empty.

        Returns:
            Paths (relative) that were left in place: what is not dpo-train's, and folders holding it.
        """
        kept = []
        for relative in sorted(p for p in self.files if _under(p, prefix)):
            for candidate in (relative, PurePosixPath(relative).with_name(f"{TEMP_PREFIX}"
                                                                           f"{PurePosixPath(relative).name}").as_posix()):
                status = self._lstat(candidate)
                if status is not None and stat.S_ISREG(status.st_mode):
                    with writing(self.root / candidate, "output directory"):
                        os.unlink(self.root / candidate)
                elif status is not None and candidate == relative:
                    kept.append(relative)  # replaced by a link or a folder since: not dpo-train's
        for relative in sorted(p for p in self.scratch if _under(p, prefix)):
            status = self._lstat(relative)
            if status is not None and stat.S_ISDIR(status.st_mode):
                with writing(self.root / relative, "output directory"):
                    shutil.rmtree(self.root / relative)  # removes links inside without following them
        for relative in sorted((p for p in self.dirs if _under(p, prefix)), key=lambda p: -len(PurePosixPath(p).parts)):
            status = self._lstat(relative)
            if status is None or not stat.S_ISDIR(status.st_mode):
                continue
            inside = sorted(f"{relative}/{entry.name}" for entry in os.scandir(self.root / relative))
            if inside:  # what is left is the user's (or a recorded folder holding the user's, named already)
                kept += [entry for entry in inside if entry not in self.dirs]
            else:
                os.rmdir(self.root / relative)
        self.forget(prefix)
        return kept

    def foreign_inside(self, relative: str) -> list[str]:
        """Entries under the recorded folder ``relative`` that dpo-train did not record (the user's)."""
        found = []
        if self._lstat(relative) is None or not (self.root / relative).is_dir():
            return found
        for current, folders, names in os.walk(self.root / relative):
            for name in sorted(folders + names):
                entry = (Path(current) / name).relative_to(self.root).as_posix()
                if entry not in self.files and entry not in self.dirs:
                    found.append(entry)
            folders[:] = [f for f in folders if (Path(current) / f).relative_to(self.root).as_posix() in self.dirs]
        return found

    def remove_all(self) -> tuple[int, list[str]]:
        """Delete every recorded path (``--overwrite``); returns how many files went and what was left."""
        count = sum(1 for p in self.files if (status := self._lstat(p)) is not None and stat.S_ISREG(status.st_mode))
        kept: list[str] = []
        for top in sorted({PurePosixPath(p).parts[0] for p in self.files | self.dirs | self.scratch}):
            kept += self.remove(top)
        return count, kept

    def discard(self) -> None:
        """Delete everything recorded, for a fresh run that stopped before it produced anything (its inputs
        did not load); a folder the run created goes too, marker and lock included, if nothing else is in it."""
        self.remove_all()
        if not self.created or any(entry not in (MARKER, LOCK_FILE) for entry in os.listdir(self.root)):
            return
        for name in (MARKER, LOCK_FILE):
            with writing(self.root / name, "output directory"):
                os.unlink(self.root / name)
        os.rmdir(self.root)

    # ----------------------------------------------------------------------------------------- lock

    def close(self) -> None:
        """Release the run lock."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


# ------------------------------------------------------------- what an earlier version's run wrote

# A checkpoint's manifest (dpo.train.checkpoint writes it, and takes these names from here).
CHECKPOINT_MANIFEST = "manifest.json"
CHECKPOINT_FORMAT = "dpo-train-checkpoint"
# The files peft's save_pretrained and a tokenizer's save_pretrained write into a saved adapter folder.
_ADAPTER_FILES = ("README.md", "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
                  "added_tokens.json")


def _is_adapter_file(name: str) -> bool:
    return name.startswith(("adapter_", "tokenizer")) or name in _ADAPTER_FILES


def _is_event_file(name: str) -> bool:
    return name.startswith("events.out.tfevents.")


def _scan(folder: Path) -> list[os.DirEntry]:
    """The entries of a real folder (not a symlink to one), sorted by name; [] where there is none."""
    try:
        if folder.is_symlink() or not folder.is_dir():
            return []
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError:
        return []


def _manifest_files(folder: Path) -> list[str] | None:
    """The files a checkpoint folder's dpo-train manifest lists, or None where it has no readable one."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        manifest = json.loads((folder / CHECKPOINT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != CHECKPOINT_FORMAT or not isinstance(files, dict):
        return None
    names = []
    for name in files:
        path = PurePosixPath(name) if isinstance(name, str) else None
        if path is None or path.is_absolute() or not path.parts or any(p in ("", ".", "..") for p in path.parts):
            return None
        names.append(path.as_posix())
    return names


# ------------------------------------------------------------------------------------------- checks


def take_lock(root: Path) -> FileLock:
    """The run lock of ``root``, taken at once.

    Raises:
        CheckpointError: another process holds it (named by its process id).
    """
    try:
        with writing(root / LOCK_FILE, "run lock"):
            return FileLock(root / LOCK_FILE).acquire()
    except LockHeld as held:
        raise CheckpointError(
            f"output.dir {root} is in use by another dpo-train run ({describe_holder(held.holder)} holds "
            f"{root / LOCK_FILE}); wait for it to finish or set output.dir to another folder") from None


def probe_lock(root: Path) -> None:
    """Refuse, naming the holder, if a run holds ``root``'s lock; takes nothing (the lock file must exist)."""
    if (root / LOCK_FILE).is_file():
        take_lock(root).release()


def taken_outputs(root: Path, directory: RunDirectory | None) -> list[str]:
    """Output names of a run that exist in ``root`` but are not dpo-train's (or not what it recorded)."""
    owner = directory or RunDirectory(root)
    return [name for name in RUN_OUTPUTS if os.path.lexists(root / name) and not owner.owns(name)]


def input_conflicts(root: Path, inputs: Sequence[tuple[str, Path]], directory: RunDirectory | None,
                    resume: bool) -> list[str]:
    """Inputs of the run (recipe, data, model, caches) that are or lie inside a path the run writes.

    The run's own recorded ``recipe.yaml`` read back to resume (``dpo-train OUT/recipe.yaml --resume``) is
    the one input allowed there: a resume deletes nothing.
    """
    problems = []
    for key, path in inputs:
        try:
            real = path.expanduser().resolve()
        except OSError:
            continue
        for name in RUN_OUTPUTS:
            output = (root / name).resolve()
            if real != output and output not in real.parents:
                continue
            if resume and name == "recipe.yaml" and directory is not None and directory.owns(name):
                continue
            problems.append(f"{key} ({path}) is {'' if real == output else 'inside '}{root / name}, which a run writes")
    return problems
