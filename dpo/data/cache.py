"""On-disk cache of tokenized splits, and content fingerprints.

A tokenized split is stored under a key hashing everything its token ids depend on: the canonical
rows (so the data files, column mapping, layout and skipped rows), the tokenizer, the chat template,
the length settings, the unpaired conversion and its seed, and :data:`FORMAT_VERSION` (bumped when
the tokenization code changes its output). Any change is a different key, so a stale entry is never
read. Entries are written to a temporary folder and renamed into place, so a crash leaves none half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FORMAT_VERSION = 1


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


def load_entry(cache_dir: Path, key: str) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]] | None:
    """``(dataset, meta, arrays)`` stored under ``key``, or ``None`` on a miss."""
    import datasets

    entry = cache_dir / key
    if not (entry / "meta.json").is_file():
        return None
    dataset = datasets.load_from_disk(str(entry / "dataset"))
    meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
    with np.load(entry / "arrays.npz") as stored:
        arrays = {name: stored[name] for name in stored.files}
    return dataset, meta, arrays


def save_entry(cache_dir: Path, key: str, dataset: Any, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Store a tokenized split under ``key`` (atomically: written aside, then renamed)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache_dir / key
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_dir))
    try:
        dataset.save_to_disk(str(staging / "dataset"))
        np.savez(staging / "arrays.npz", **arrays)
        (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        if entry.exists():  # written meanwhile by another run from the same data: identical content
            shutil.rmtree(staging)
        else:
            staging.rename(entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
