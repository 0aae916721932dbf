"""On-disk cache of tokenized splits, and content fingerprints.

A tokenized split is stored under a key hashing everything its token ids depend on: the canonical
rows (so the data files, column mapping, layout and skipped rows), the tokenizer, the chat template,
the length settings, the unpaired conversion and its seed, and :data:`FORMAT_VERSION` (bumped when
the tokenization code changes its output). Any change is a different key, so a stale entry is never
read. Entries are written to a temporary folder and renamed into place, so a crash leaves none half-written.

Each entry ends with ``checksums.json`` (written last, before the rename): the size and SHA-256 of every
other file. An entry is used only if every file matches; a changed byte (a disk error, an edit) is
reported and the split tokenized again. Writers of one entry take ``KEY.lock`` in turn: a second one waits,
then reads what the first wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dpo.files import FileLock, describe_holder, sha256_of_file, writing

# 2: entries carry checksums.json.
FORMAT_VERSION = 2
CHECKSUMS = "checksums.json"


class DamagedEntry(Exception):
    """A cache entry whose files do not match its checksums (or cannot be read); it is tokenized again."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dpo-train/tokenized`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dpo-train" / "tokenized"


def rows_hash(rows: list[dict[str, Any]]) -> str:
    """A hash of canonical rows (their JSON, key order fixed)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """A hash of what makes a tokenizer produce its ids: its full definition and special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode("utf-8"))
    digest.update(repr((tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    return digest.hexdigest()


def key_of(parts: dict[str, Any]) -> str:
    """The cache key of a split: a hash of ``parts`` (JSON-serialisable) and the format version."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def content_hash(table: pa.Table) -> str:
    """A hash of a table's values (not of how Arrow happens to chunk or slice them).

    List columns hash their row lengths and their flattened values, so ``[[1, 2], [3]]`` and
    ``[[1], [2, 3]]`` differ.
    """
    digest = hashlib.sha256()
    for name in sorted(table.column_names):
        column = table.column(name).combine_chunks()
        digest.update(f"{name}:{column.type}".encode())
        if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
            column = column.flatten()
        digest.update(np.ascontiguousarray(column.to_numpy(zero_copy_only=False)).tobytes())
    return digest.hexdigest()[:32]


def _checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``folder`` but the checksum file."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_of_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CHECKSUMS}


def verify_entry(entry: Path) -> None:
    """Check every file of ``entry`` against its ``checksums.json``.

    Raises:
        DamagedEntry: naming the first file that is missing, extra, resized or changed.
    """
    try:
        expected = json.loads((entry / CHECKSUMS).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DamagedEntry(f"{CHECKSUMS} is missing or unreadable ({exc})") from None
    if not isinstance(expected, dict):
        raise DamagedEntry(f"{CHECKSUMS} is not a JSON object")
    found = {p.relative_to(entry).as_posix(): p for p in entry.rglob("*") if p.is_file() and p.name != CHECKSUMS}
    for name in sorted(set(expected) | set(found)):
        if name not in found:
            raise DamagedEntry(f"{name} is missing")
        if name not in expected:
            raise DamagedEntry(f"{name} is not listed in {CHECKSUMS}")
        size = found[name].stat().st_size
        if size != expected[name].get("size"):
            raise DamagedEntry(f"{name} is {size} bytes, {CHECKSUMS} says {expected[name].get('size')}")
        if sha256_of_file(found[name]) != expected[name].get("sha256"):
            raise DamagedEntry(f"{name} does not match its SHA-256 in {CHECKSUMS}")


def load_entry(cache_dir: Path, key: str) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]] | None:
    """``(dataset, meta, arrays)`` stored under ``key``, or ``None`` on a miss.

    ``meta["fingerprint"]`` is computed here from the token ids read back, never taken from the file.

    Raises:
        DamagedEntry: the entry exists but its files do not match their checksums, or cannot be read.
    """
    import datasets

    entry = cache_dir / key
    if not entry.is_dir():
        return None
    verify_entry(entry)
    try:
        dataset = datasets.load_from_disk(str(entry / "dataset"))
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        with np.load(entry / "arrays.npz") as stored:
            arrays = {name: stored[name] for name in stored.files}
    except Exception as exc:  # files that match their checksums yet do not load: written by something else
        raise DamagedEntry(f"it cannot be read ({exc})") from None
    meta["fingerprint"] = content_hash(dataset.with_format("arrow")[:])
    return dataset, meta, arrays


def entry_lock(cache_dir: Path, key: str, log: Callable[[str], None]) -> FileLock:
    """The lock of entry ``key``, taken (waiting while another process writes the entry)."""
    with writing(cache_dir, "tokenized-data cache"):
        cache_dir.mkdir(parents=True, exist_ok=True)
        return FileLock(cache_dir / f"{key}.lock").acquire(wait=True, on_wait=lambda holder: log(
            f"tokenized-data cache: {cache_dir / key} is being written by {describe_holder(holder)}; waiting for it"))


def save_entry(cache_dir: Path, key: str, dataset: Any, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Store a tokenized split under ``key`` (atomically: written aside, checksummed, then renamed over any
    damaged entry of that key). The caller holds :func:`entry_lock`."""
    entry = cache_dir / key
    with writing(cache_dir, "tokenized-data cache"):
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
        try:
            dataset.save_to_disk(str(staging / "dataset"))
            np.savez(staging / "arrays.npz", **arrays)
            (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
            (staging / CHECKSUMS).write_text(json.dumps(_checksums(staging), indent=1), encoding="utf-8")
            if entry.exists():  # a damaged entry of this key: replaced
                damaged = Path(tempfile.mkdtemp(prefix=f".{key}-damaged-", dir=cache_dir))
                os.replace(entry, damaged / key)
                shutil.rmtree(damaged)
            staging.rename(entry)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
