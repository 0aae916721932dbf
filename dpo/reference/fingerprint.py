"""Content identities of model and adapter folders, and the digest that turns key parts into a file name.

A reference cache entry is valid only for the exact network that produced it, so the identity of a local
folder is a SHA-256 of every file the network is built from (config, weights, index files, remote code),
never of its path or timestamps: a copy of the same checkpoint elsewhere has the same identity, a
re-saved or fine-tuned one does not. Tokenizer files are left out on purpose: they act through the token
ids, which the data fingerprint already covers.

Hashing every byte of a large checkpoint on each run would be slow, so finished digests are memoized in
a small side index keyed by the file's resolved path, size, mtime, ctime, inode and device. A file that
is rewritten in any way changes at least its ctime (which no user tool can set back), so the memo can go
stale only if the filesystem lies about ctime; then the file is hashed again.

A model given as a hub id is identified by the commit of its snapshot in the local Hugging Face cache
(the snapshot's files are content-addressed blobs of that commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dpo.files import sha256_of_file

# Files from_pretrained builds the network from. Everything else in a model folder (tokenizer files,
# generation settings, README) cannot change the log-probs of given token ids.
NETWORK_FILE_NAMES = ("config.json", "adapter_config.json")
NETWORK_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".py")
INDEX_SUFFIX = ".index.json"  # sharded checkpoints: which tensor lives in which shard


class IdentityError(ValueError):
    """A model or adapter whose identity cannot be established; the message says what to do."""


def network_files(folder: Path) -> list[Path]:
    """The files of ``folder`` (top level, as from_pretrained reads it) that define the network."""
    return sorted(
        path for path in folder.iterdir()
        if path.is_file() and not path.name.startswith(".")
        and (path.name in NETWORK_FILE_NAMES or path.name.endswith(INDEX_SUFFIX)
             or path.suffix in NETWORK_FILE_SUFFIXES)
    )


class HashIndex:
    """Memoized file digests, stored as JSON in ``path`` (a speed-up only: losing it costs a re-hash).

    Args:
        path: the index file; None keeps the memo in memory only.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                self.entries = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.entries = {}  # unreadable memo: start over, every file is hashed again
        self.hashed: list[Path] = []  # files actually read by this instance (the rest came from the memo)

    @staticmethod
    def _stamp(resolved: Path) -> list[int]:
        stat = resolved.stat()
        return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]

    def digests(self, files: list[Path]) -> dict[str, str]:
        """``{file name: sha256}`` for ``files``; unknown or changed files are hashed, in parallel threads."""
        resolved = {path: path.resolve() for path in files}
        stamps = {path: self._stamp(resolved[path]) for path in files}
        result: dict[str, str] = {}
        stale: list[Path] = []
        for path in files:
            entry = self.entries.get(str(resolved[path]))
            if entry is not None and entry.get("stamp") == stamps[path]:
                result[path.name] = entry["sha256"]
            else:
                stale.append(path)
        if stale:
            workers = max(1, min(len(stale), os.cpu_count() or 1))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                fresh = dict(zip(stale, pool.map(lambda p: sha256_of_file(resolved[p]), stale)))
            for path, digest in fresh.items():
                if self._stamp(resolved[path]) != stamps[path]:
                    raise IdentityError(f"{path} changed while it was being hashed; run again once it is written")
                result[path.name] = digest
                self.entries[str(resolved[path])] = {"stamp": stamps[path], "sha256": digest}
            self.hashed.extend(stale)
            self.save()
        return result

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump(self.entries, out)
            os.replace(temporary, self.path)
        except OSError:
            pass  # a read-only cache folder: the memo is only a speed-up


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a hub model id (offline lookup), or None if it is not cached."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not a valid repo id, not in the cache, or huggingface_hub refused it offline
        return None


def folder_identity(location: str, index: HashIndex, what: str, gguf_file: str | None = None) -> dict[str, Any]:
    """The identity of a model or adapter named by a local folder or a hub id, or of one GGUF file in it.

    Args:
        location: a local folder, or a hub id present in the local Hugging Face cache.
        index: the digest memo.
        what: the recipe key naming ``location``, for error messages (e.g. ``model.path``).
        gguf_file: a GGUF checkpoint in ``location``: transformers builds the network from that file alone
            (config, weights), so it alone is the identity; other files of the folder, other GGUF files
            among them, do not count.

    Returns:
        ``{"files": {name: sha256}}`` for a local folder (with ``"gguf": name`` for a GGUF file), ``{"hub":
        id, "commit": sha}`` for a hub snapshot (with ``"gguf"``).
    """
    folder = Path(location).expanduser()
    if folder.is_dir() and gguf_file is not None:
        path = folder / gguf_file
        if not path.is_file():
            raise IdentityError(f"{what}: {gguf_file} is not a file in {location}")
        return {"gguf": gguf_file, "files": index.digests([path])}
    if folder.is_dir():
        files = network_files(folder)
        if not files:
            raise IdentityError(f"{what}: {location} holds no config or weight files")
        return {"files": index.digests(files)}
    snapshot = hub_snapshot(location)
    if snapshot is None:
        raise IdentityError(
            f"{what}: {location!r} is neither a local folder nor a model in the local Hugging Face cache, so the "
            "reference cache cannot tell which weights it is; download it first or point to a local folder"
        )
    return {"hub": location, "commit": snapshot.name, **({"gguf": gguf_file} if gguf_file else {})}


def digest_of(parts: dict[str, Any]) -> str:
    """A 40-hex-digit SHA-256 prefix of ``parts`` as canonical JSON (keys sorted)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:40]
