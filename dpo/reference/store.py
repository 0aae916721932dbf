"""The reference cache on disk: one safetensors file per fingerprint, written atomically, checked on read.

``<dir>/<fingerprint>.safetensors`` holds four ``[n]`` tensors (``first``, ``second`` float32 summed
log-probs; ``first_tokens``, ``second_tokens`` int64 counts) and, in the safetensors header, metadata:
the format name and version, the full fingerprint, the example count, a SHA-256 of the tensor bytes and
the key parts (for people reading the file). A file is accepted only if all of these agree with what the
reader expects, so a truncated, corrupted or foreign file is never used.

An unfinished precompute keeps its progress in ``<dir>/<fingerprint>.partial.safetensors`` (the same
tensors plus a ``done`` mask, and ``complete: false``); that name is never read as a finished entry.
Every write goes to a temporary file in the same folder, is fsynced, then renamed over the target.
Processes that would compute one entry take ``<dir>/<fingerprint>.lock`` in turn (:meth:`ReferenceStore.lock`):
a second one waits, then reads the finished entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from dpo.files import FileLock, LockHeld, describe_holder, writing

FORMAT_NAME = "dpo-train reference log-probs"
# Bump when the file layout or the meaning of a stored value changes: older files then miss, never mislead.
FORMAT_VERSION = 1
VALUE_NAMES = ("first", "second", "first_tokens", "second_tokens")
VALUE_DTYPES = {"first": torch.float32, "second": torch.float32,
                "first_tokens": torch.int64, "second_tokens": torch.int64, "done": torch.bool}


class CacheFileError(ValueError):
    """A cache file that must not be used (truncated, corrupted, another fingerprint, wrong count)."""


@dataclass
class StoredValues:
    """Tensors of one cache file and whether each example is filled in.

    Attributes:
        tensors: ``first``, ``second`` ``[n]`` float32 and ``first_tokens``, ``second_tokens`` ``[n]`` int64.
        done: ``[n]`` bool, True where the example's values are computed (all True in a finished file).
    """

    tensors: dict[str, Tensor]
    done: Tensor

    @classmethod
    def empty(cls, count: int) -> StoredValues:
        tensors = {name: torch.zeros(count, dtype=VALUE_DTYPES[name]) for name in VALUE_NAMES}
        return cls(tensors, torch.zeros(count, dtype=torch.bool))


def tensors_checksum(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


class ReferenceStore:
    """Reference cache files in one folder.

    Args:
        directory: the cache folder (created on first write).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, fingerprint: str) -> Path:
        return self.directory / f"{fingerprint}.safetensors"

    def partial_path(self, fingerprint: str) -> Path:
        return self.directory / f"{fingerprint}.partial.safetensors"

    def lock(self, fingerprint: str, log, wait: bool = True) -> FileLock | None:
        """The writer lock of one entry, taken: waits (saying so) while another process computes it, or with
        ``wait=False`` returns None at once when another process holds it."""
        with writing(self.directory, "reference cache"):
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.directory / f"{fingerprint}.lock")
            if not wait:
                try:
                    return lock.acquire()
                except LockHeld:
                    return None
            return lock.acquire(wait=True, on_wait=lambda holder: log(
                f"reference cache: {self.path(fingerprint)} is being written by {describe_holder(holder)}; waiting "
                "for it"))

    # ------------------------------------------------------------------------------------------- read

    def load(self, fingerprint: str, count: int) -> dict[str, Tensor] | None:
        """The finished values for ``fingerprint``; None if there is no file.

        Raises:
            CacheFileError: the file exists but fails the completeness check (the message says how).
        """
        path = self.path(fingerprint)
        if not path.is_file():
            return None
        values = self._read(path, fingerprint, count, complete=True)
        return values.tensors

    def load_partial(self, fingerprint: str, count: int) -> StoredValues | None:
        """The progress of an interrupted precompute, or None when there is none usable."""
        path = self.partial_path(fingerprint)
        if not path.is_file():
            return None
        try:
            return self._read(path, fingerprint, count, complete=False)
        except CacheFileError:
            return None  # a damaged progress file is only lost work: start from scratch

    def _read(self, path: Path, fingerprint: str, count: int, complete: bool) -> StoredValues:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CacheFileError(f"cannot read it ({exc})") from None
        metadata = _header_metadata(data)
        expected = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "fingerprint": fingerprint,
                    "count": str(count), "complete": "true" if complete else "false"}
        for key, value in expected.items():
            if metadata.get(key) != value:
                raise CacheFileError(f"its {key} is {metadata.get(key)!r}, expected {value!r}")
        try:
            tensors = load_safetensors(data)
        except Exception as exc:  # safetensors raises its own error types for malformed buffers
            raise CacheFileError(f"malformed tensor data ({exc})") from None
        names = set(VALUE_NAMES) | (set() if complete else {"done"})
        if set(tensors) != names:
            raise CacheFileError(f"it holds tensors {sorted(tensors)}, expected {sorted(names)}")
        for name, tensor in tensors.items():
            if tensor.dtype != VALUE_DTYPES[name] or tuple(tensor.shape) != (count,):
                raise CacheFileError(f"tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, expected "
                                     f"{VALUE_DTYPES[name]} ({count},)")
        if tensors_checksum(tensors) != metadata.get("checksum"):
            raise CacheFileError("its checksum does not match its contents")
        done = tensors.pop("done") if not complete else torch.ones(count, dtype=torch.bool)
        return StoredValues(tensors, done)

    # ------------------------------------------------------------------------------------------ write

    def save(self, fingerprint: str, tensors: dict[str, Tensor], parts: dict[str, Any],
             extra: dict[str, str] | None = None) -> Path:
        """Write the finished entry atomically and drop any progress file of the same fingerprint."""
        path = self._write(self.path(fingerprint), fingerprint, dict(tensors), parts, True, extra)
        self.partial_path(fingerprint).unlink(missing_ok=True)
        return path

    def save_partial(self, fingerprint: str, values: StoredValues, parts: dict[str, Any]) -> Path:
        """Write the progress of an unfinished precompute atomically."""
        return self._write(self.partial_path(fingerprint), fingerprint,
                           {**values.tensors, "done": values.done}, parts, False, None)

    def _write(self, path: Path, fingerprint: str, tensors: dict[str, Tensor], parts: dict[str, Any],
               complete: bool, extra: dict[str, str] | None) -> Path:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        count = next(iter(tensors.values())).shape[0]
        metadata = {**(extra or {}), "format": FORMAT_NAME, "version": str(FORMAT_VERSION),
                    "fingerprint": fingerprint, "count": str(count), "complete": "true" if complete else "false",
                    "checksum": tensors_checksum(tensors), "key": json.dumps(parts, sort_keys=True, default=str)}
        data = save_safetensors(tensors, metadata=metadata)
        with writing(path, "reference cache", len(data)):
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.directory)
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        _fsync_directory(self.directory)
        return path


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer, checking that the header and the data fit the file."""
    if len(data) < 8:
        raise CacheFileError(f"the file is truncated ({len(data)} bytes)")
    (header_size,) = struct.unpack("<Q", data[:8])
    if 8 + header_size > len(data):
        raise CacheFileError("the file is truncated inside its header")
    try:
        header = json.loads(data[8 : 8 + header_size])
    except ValueError:
        raise CacheFileError("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CacheFileError("its header is not a JSON object")
    try:
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (KeyError, IndexError, TypeError, ValueError):
        raise CacheFileError("its header does not describe tensors") from None
    if 8 + header_size + max(ends, default=0) != len(data):
        raise CacheFileError(f"its size is {len(data)} bytes, the header describes "
                             f"{8 + header_size + max(ends, default=0)} (truncated or padded)")
    metadata = header.get("__metadata__")
    return metadata if isinstance(metadata, dict) else {}


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
